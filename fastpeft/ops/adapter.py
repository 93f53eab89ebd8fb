"""The bottleneck adapter op: out = base + s * (up(drop(act(down(x) + b_d))) + b_u) (+ residual).

One op covers AdaptFormer parallel / sequential and NOAH / Pfeiffer serial adapters (the official
code each cites: fastpeft/methods/adaptformer.py, adapter.py). Layers, each doing one job:

  adapter_ref                                    plain-torch reference: the spec and the test oracle
  _validate / _validate_bwd                      checks (ValueError before any launch)
  _adapter_fwd_torch / _adapter_bwd_torch        torch math with the kernels' saving policy (CPU)
  torch.ops.fastpeft.adapter / adapter_backward  custom ops (fake + autograd): what torch.compile traces
  _AdapterFunction                               the eager path: the same launchers without the op dispatch
  adapter                                        public functional
  adapter_rows / adapter_rows_ref                its per-row form (a mixed multi-task batch: each image its
                                                 own weights, fastpeft/ops/_rows.py) and that form's reference

The Triton kernels, their launchers and configs are in kernels/adapter.py; training saves only
x and the rank-r pre-activation (fp32), the dropout mask is regenerated from the seed.
"""
from __future__ import annotations

import torch

from ._autograd import once_differentiable
from ..kernels._common import (CheckedSignatures, check_features, cast_param, check_dropout, check_p,
                               check_tensor, describe, use_triton)
from ..kernels.adapter import (ACTS, MAX_RANK, dropout_keep_mask, launch_bwd, launch_fwd, launch_rows_bwd,
                               launch_rows_fwd)


# ----------------------------------------------------------------------------------------------
# Reference (clarity first; autograd-differentiable; the test oracle)
# ----------------------------------------------------------------------------------------------
def act_ref(a: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return torch.relu(a)
    if act == "gelu":
        return torch.nn.functional.gelu(a)
    if act == "quick_gelu":
        return a * torch.sigmoid(1.702 * a)
    raise ValueError(f"act must be one of {tuple(ACTS)}, got {act!r}")


def adapter_ref(x, w_down, b_down, w_up, b_up, *, base=None, residual=None, scale=1.0,
                act="relu", dropout_p=0.0, seed=None):
    """out = base + s * (up(dropout(act(down(x)))) ) + residual, computed in fp32, cast to x.dtype.

    `scale` is a float or a tensor; dropout (p > 0) uses the kernels' Philox mask for `seed`.
    """
    f32 = torch.float32
    a = torch.nn.functional.linear(x.to(f32), w_down.to(f32), None if b_down is None else b_down.to(f32))
    h = act_ref(a, act)
    if dropout_p > 0.0:
        keep = dropout_keep_mask(seed, h.numel() // h.shape[-1], h.shape[-1], dropout_p).view(h.shape)
        h = h * keep / (1.0 - dropout_p)
    u = torch.nn.functional.linear(h, w_up.to(f32), None if b_up is None else b_up.to(f32))
    s = scale.to(f32) if isinstance(scale, torch.Tensor) else scale
    out = s * u
    if base is not None:
        out = out + base.to(f32)
    if residual is not None:
        out = out + residual.to(f32)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Validation (ValueError before any launch)
# ----------------------------------------------------------------------------------------------
def _validate(x, w_down, b_down, w_up, b_up, base, residual, scale_t, act, p, seed):
    op = "adapter"
    d = check_features(op, x)
    check_tensor(op, "w_down", w_down, dim=2, like=x)
    r = w_down.shape[0]
    if w_down.shape[1] != d:
        raise ValueError(f"{op}: w_down must be [r, D] = [r, {d}], got w_down {describe(w_down)} "
                         f"for x {describe(x)}")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"{op}: rank r = {r} (w_down {describe(w_down)}) must be in 1..{MAX_RANK}")
    check_tensor(op, "w_up", w_up, shape=(d, r), like=x)
    if b_down is not None:
        check_tensor(op, "b_down", b_down, shape=(r,), like=x)
    if b_up is not None:
        check_tensor(op, "b_up", b_up, shape=(d,), like=x)
    for name, t in (("base", base), ("residual", residual)):
        if t is not None:
            check_tensor(op, name, t, shape=x.shape, like=x)
    if scale_t is not None:
        check_tensor(op, "scale", scale_t, like=x, dtype=scale_t.dtype)
        if scale_t.numel() != 1:
            raise ValueError(f"{op}: a tensor scale must have one element, got scale {describe(scale_t)}")
    if act not in ACTS.values():
        raise ValueError(f"{op}: act code {act} is not one of {ACTS}")
    check_dropout(op, p, seed, x, "x")


def _validate_bwd(grad_out, x, a, w_down, w_up, b_up, scale_t, act, p, seed):
    """The registered backward op's arguments: the forward's, grad_out like x, a [M, r] fp32."""
    _validate(x, w_down, None, w_up, b_up, None, None, scale_t, act, p, seed)
    op = "adapter_backward"
    check_tensor(op, "grad_out", grad_out, shape=x.shape, like=x)
    check_tensor(op, "a", a, shape=(x.numel() // x.shape[-1], w_down.shape[0]), like=x, dtype=torch.float32)


def adapter_fwd(x, w_down, b_down, w_up, b_up, base, residual, scale_t, scale: float, act: int,
                p: float, seed, save: bool):
    """Triton forward. Returns (out like x, a [M, r] fp32 or an empty [0, r] when not save)."""
    _validate(x, w_down, b_down, w_up, b_up, base, residual, scale_t, act, p, seed)
    return launch_fwd(x, w_down, b_down, w_up, b_up, base, residual, scale_t, scale, act, p, seed, save)


def adapter_bwd(grad_out, x, a, w_down, w_up, b_up, scale_t, scale: float, act: int, p: float, seed):
    """Triton backward. Returns (dx, dW_down, db_down, dW_up, db_up, dscale) in x's dtype
    (dscale fp32 [1], zero when scale_t is None)."""
    r = w_down.shape[0]
    m = x.numel() // x.shape[-1]
    if (grad_out.shape[-1:] != x.shape[-1:] or grad_out.numel() != x.numel() or grad_out.dtype != x.dtype
            or a.shape != (m, r)):
        raise ValueError(f"adapter_backward: grad_out {describe(grad_out)} / a {describe(a)} do not "
                         f"match x {describe(x)} and rank {r}")
    out = launch_bwd(grad_out, x, a, w_down, w_up, b_up, scale_t, scale, act, p, seed)
    return out if out[5] is not None else (*out[:5], torch.zeros(1, device=x.device))


# ----------------------------------------------------------------------------------------------
# Torch math with the kernels' saving policy (CPU / no Triton): saves x and a only.
# ----------------------------------------------------------------------------------------------
def _act_grad_torch(a: torch.Tensor, act: int) -> torch.Tensor:
    if act == 0:
        return (a > 0).to(a.dtype)
    if act == 1:
        return 0.5 * (1.0 + torch.erf(a * 0.7071067811865476)) + a * 0.3989422804014327 * torch.exp(-0.5 * a * a)
    sg = torch.sigmoid(1.702 * a)
    return sg + 1.702 * a * sg * (1.0 - sg)


_ACT_NAMES = {v: k for k, v in ACTS.items()}


def _keep_scale_torch(seed, m, r, p):
    if p <= 0.0:
        return None
    return dropout_keep_mask(seed, m, r, p).to(torch.float32) * (1.0 / (1.0 - p))


def _adapter_fwd_torch(x, w_down, b_down, w_up, b_up, base, residual, scale_t, scale, act, p, seed, save):
    f32 = torch.float32
    d, r = x.shape[-1], w_down.shape[0]
    x2 = x.reshape(-1, d)
    m = x2.shape[0]
    a = x2.to(f32) @ w_down.to(f32).t()
    if b_down is not None:
        a = a + b_down.to(f32)
    h = act_ref(a, _ACT_NAMES[act])
    keep = _keep_scale_torch(seed, m, r, p)
    if keep is not None:
        h = h * keep
    u = h.to(x.dtype).to(f32) @ w_up.to(f32).t()
    if b_up is not None:
        u = u + b_up.to(f32)
    s = scale * scale_t.reshape(()).to(f32) if scale_t is not None else scale
    out = s * u
    if base is not None:
        out = out + base.reshape(-1, d).to(f32)
    if residual is not None:
        out = out + residual.reshape(-1, d).to(f32)
    a_saved = a if save else a.new_empty((0, r))
    return out.to(x.dtype).view(x.shape), a_saved


def _adapter_bwd_torch(grad_out, x, a, w_down, w_up, b_up, scale_t, scale, act, p, seed):
    f32 = torch.float32
    d, r = x.shape[-1], w_down.shape[0]
    g = grad_out.reshape(-1, d).to(f32)
    x2 = x.reshape(-1, d).to(f32)
    m = x2.shape[0]
    s = scale * scale_t.reshape(()).to(f32) if scale_t is not None else torch.tensor(scale, dtype=f32)
    dh = g @ w_up.to(f32)
    h = act_ref(a, _ACT_NAMES[act])
    dact = _act_grad_torch(a, act)
    keep = _keep_scale_torch(seed, m, r, p)
    if keep is not None:
        h = h * keep
        dact = dact * keep
    da = s * dh * dact
    colsum_g = g.sum(0)
    dx = da @ w_down.to(f32)
    dwd = da.t() @ x2
    dbd = da.sum(0)
    dwu = s * (g.t() @ h)
    dbu = s * colsum_g
    ds = None
    if scale_t is not None:
        bu = b_up.to(f32) if b_up is not None else torch.zeros_like(colsum_g)
        ds = scale * ((h * dh).sum() + (bu * colsum_g).sum()).reshape(1)
    dt = x.dtype
    return dx.to(dt).view(x.shape), dwd.to(dt), dbd.to(dt), dwu.to(dt), dbu.to(dt), ds


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastpeft::adapter", mutates_args=())
def _adapter_op(x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None,
                w_up: torch.Tensor, b_up: torch.Tensor | None, base: torch.Tensor | None,
                residual: torch.Tensor | None, scale_t: torch.Tensor | None, scale: float, act: int,
                p: float, seed: torch.Tensor | None, save: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(x, w_down, b_down, w_up, b_up, base, residual, scale_t, act, p, seed)
    fn = launch_fwd if use_triton(x) else _adapter_fwd_torch
    return fn(x, w_down, b_down, w_up, b_up, base, residual, scale_t, scale, act, p, seed, save)


@_adapter_op.register_fake
def _adapter_fake(x, w_down, b_down, w_up, b_up, base, residual, scale_t, scale, act, p, seed, save):
    _validate(x, w_down, b_down, w_up, b_up, base, residual, scale_t, act, p, seed)
    m = x.numel() // x.shape[-1] if save else 0
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        x.new_empty((m, w_down.shape[0]), dtype=torch.float32)


def _backward_impl(triton_path: bool, grad_out, x, a, w_down, w_up, b_up, scale_t, scale, act, p, seed):
    """The backward math both autograd paths run (ds None without a learnable scale)."""
    grad_out = grad_out.contiguous()
    fn = launch_bwd if triton_path else _adapter_bwd_torch
    return fn(grad_out, x, a, w_down, w_up, b_up, scale_t, scale, act, p, seed)


@torch.library.custom_op("fastpeft::adapter_backward", mutates_args=())
def _adapter_backward_op(grad_out: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                         w_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor | None,
                         scale_t: torch.Tensor | None, scale: float, act: int, p: float,
                         seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor, torch.Tensor, torch.Tensor]:
    _CHECKED.check(False, lambda: _validate_bwd(grad_out, x, a, w_down, w_up, b_up, scale_t, act, p, seed),
                   grad_out, x, a, w_down, w_up, b_up, scale_t, seed, extra=("bwd", act, p))
    if use_triton(x):
        return adapter_bwd(grad_out.contiguous(), x, a, w_down, w_up, b_up, scale_t, scale, act, p, seed)
    out = _backward_impl(False, grad_out, x, a, w_down, w_up, b_up, scale_t, scale, act, p, seed)
    return out if out[5] is not None else (*out[:5], torch.zeros(1, device=x.device))


@_adapter_backward_op.register_fake
def _adapter_backward_fake(grad_out, x, a, w_down, w_up, b_up, scale_t, scale, act, p, seed):
    _validate_bwd(grad_out, x, a, w_down, w_up, b_up, scale_t, act, p, seed)
    r, d = w_down.shape
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((r, d)),
            x.new_empty((r,)), x.new_empty((d, r)), x.new_empty((d,)),
            x.new_empty((1,), dtype=torch.float32))


def _grads(need, has_base, has_res, grad_out, scale_t, dx, dwd, dbd, dwu, dbu, ds):
    """The input gradients in the op's argument order (both autograd paths)."""
    return (dx if need[0] else None, dwd if need[1] else None, dbd if need[2] else None,
            dwu if need[3] else None, dbu if need[4] else None,
            grad_out if has_base and need[5] else None,
            grad_out if has_res and need[6] else None,
            ds.reshape(scale_t.shape).to(scale_t.dtype) if scale_t is not None and need[7] else None)


def _adapter_setup_context(ctx, inputs, output):
    x, w_down, b_down, w_up, b_up, base, residual, scale_t, scale, act, p, seed, save = inputs
    _, a = output
    ctx.mark_non_differentiable(a)
    ctx.save_for_backward(x, a, w_down, w_up, b_up, scale_t, seed)
    ctx.scale, ctx.act, ctx.p = scale, act, p
    ctx.has = (base is not None, residual is not None)


def _adapter_backward(ctx, grad_out, _grad_a):
    x, a, w_down, w_up, b_up, scale_t, seed = ctx.saved_tensors
    if a.shape[0] != x.numel() // x.shape[-1]:
        raise RuntimeError("fastpeft::adapter was called with save=False; it cannot be differentiated")
    grads = torch.ops.fastpeft.adapter_backward(
        grad_out, x, a, w_down, w_up, b_up, scale_t, ctx.scale, ctx.act, ctx.p, seed)
    return (*_grads(ctx.needs_input_grad, *ctx.has, grad_out, scale_t, *grads), None, None, None, None, None)


_adapter_op.register_autograd(_adapter_backward, setup_context=_adapter_setup_context)


class _AdapterFunction(torch.autograd.Function):
    """The eager path of `fastpeft::adapter`: the same launchers (or torch math) and saved tensors
    as the registered op, without the custom-op dispatch; arguments validated by the caller.
    `triton_path` is decided once in forward and reused by backward."""

    @staticmethod
    def forward(ctx, x, w_down, b_down, w_up, b_up, base, residual, scale_t, scale, act, p, seed, triton_path):
        save = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 4, 7))
        fn = launch_fwd if triton_path else _adapter_fwd_torch
        out, a = fn(x, w_down, b_down, w_up, b_up, base, residual, scale_t, scale, act, p, seed, save)
        if save:
            ctx.save_for_backward(x, a, w_down, w_up, b_up, scale_t, seed)
        ctx.args = (save, scale, act, p, triton_path, base is not None, residual is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        save, scale, act, p, triton_path, has_base, has_res = ctx.args
        need = ctx.needs_input_grad
        if not save:  # only base / residual need a gradient: the identity
            return (None,) * 5 + (grad_out if has_base and need[5] else None,
                                  grad_out if has_res and need[6] else None) + (None,) * 6
        x, a, w_down, w_up, b_up, scale_t, seed = ctx.saved_tensors
        grads = _backward_impl(triton_path, grad_out, x, a, w_down, w_up, b_up, scale_t, scale, act, p, seed)
        return (*_grads(need, has_base, has_res, grad_out, scale_t, *grads), None, None, None, None, None, None)


_CHECKED = CheckedSignatures()


def _args(op: str, x, w_down, b_down, w_up, b_up, scale, act, dropout_p, training, seed):
    """The checks and normalisation `adapter` and `adapter_rows` share: (act code, the weights cast
    to x's dtype, the learnable scale tensor or None, the float scale, the dropout p in effect, the
    seed: drawn when dropout is on and none was given)."""
    act_code = ACTS.get(act) if isinstance(act, str) else None
    if act_code is None:
        raise ValueError(f"{op}: act must be one of {tuple(ACTS)}, got {act!r}")
    check_tensor(op, "x", x)
    dt = x.dtype
    w_down, b_down, w_up, b_up = (cast_param(t, dt) for t in (w_down, b_down, w_up, b_up))
    scale_t = scale if isinstance(scale, torch.Tensor) else None
    scale_f = 1.0 if scale_t is not None else float(scale)
    p = check_p(op, dropout_p)  # (in range even when not training, as F.dropout)
    p = p if training else 0.0
    if p > 0.0 and seed is None:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    return act_code, w_down, b_down, w_up, b_up, scale_t, scale_f, p, seed


def adapter(x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, w_up: torch.Tensor,
            b_up: torch.Tensor | None, *, base: torch.Tensor | None = None,
            residual: torch.Tensor | None = None, scale: float | torch.Tensor = 1.0,
            act: str = "relu", dropout_p: float = 0.0, training: bool = False,
            seed: torch.Tensor | None = None) -> torch.Tensor:
    """out = base + s * (W_u drop(act(W_d x + b_d)) + b_u) + residual.

    x, base, residual: [..., D] float32/float16/bfloat16, same dtype and device. w_down [r, D],
    b_down [r] or None, w_up [D, r], b_up [D] or None (cast to x.dtype, differentiably), r <= 128.
    scale: a float, or a one-element tensor (learnable; gets a gradient). act: relu | gelu |
    quick_gelu. Dropout (p = dropout_p) on the rank-r activation only when `training`; its mask
    is drawn from `seed` (int64, one element; drawn from torch's generator when None).
    Returns a contiguous tensor of x's shape and dtype.

    Eager calls run one autograd.Function over the launchers, with the argument checks run once
    per call signature (`_CHECKED`); under torch.compile the call is the registered
    `torch.ops.fastpeft.adapter` (fake and autograd formulas, checked when traced), which shares
    the same launchers.
    """
    act_code, w_down, b_down, w_up, b_up, scale_t, scale_f, p, seed = _args(
        "adapter", x, w_down, b_down, w_up, b_up, scale, act, dropout_p, training, seed)
    compiling = torch.compiler.is_compiling()
    _CHECKED.check(compiling, lambda: _validate(x, w_down, b_down, w_up, b_up, base, residual, scale_t, act_code, p, seed),
                   x, w_down, b_down, w_up, b_up, base, residual, scale_t, seed if p > 0.0 else None,
                   extra=(act_code, p))
    if p <= 0.0:
        seed = None
    if compiling:
        save = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, w_down, b_down, w_up, b_up, scale_t))
        out, _ = torch.ops.fastpeft.adapter(x, w_down, b_down, w_up, b_up, base, residual, scale_t,
                                            scale_f, act_code, p, seed, save)
        return out
    return _AdapterFunction.apply(x, w_down, b_down, w_up, b_up, base, residual, scale_t, scale_f, act_code,
                                  p, seed, use_triton(x))


# ----------------------------------------------------------------------------------------------
# Per-row form: a mixed multi-task batch (fastpeft/ops/_rows.py), every image its own adapter
# ----------------------------------------------------------------------------------------------
def _per_row(t: torch.Tensor, images: int, single_dim: int) -> torch.Tensor:
    """A weight as [B, ...]: one per image as it is, a shared one (the single-task shape) expanded."""
    return t if t.dim() == single_dim + 1 else t.expand(images, *t.shape)


def _rows_scale(scale, images: int):
    """The scale as the reference multiplies [B, L, D] by: a float, a shared 0-d tensor, or [B, 1, 1]."""
    if not isinstance(scale, torch.Tensor):
        return scale
    s = scale.to(torch.float32).reshape(-1)
    return s.reshape(()) if s.numel() == 1 else s.view(images, 1, 1)


def adapter_rows_ref(images: int, x, w_down, b_down, w_up, b_up, *, base=None, residual=None, scale=1.0,
                     act="relu", dropout_p=0.0, seed=None):
    """`adapter_rows` in plain torch (the test oracle): image b of x [B, ..., D] (its L rows) gets
    out_b = base_b + s_b (up_b(dropout(act(down_b(x_b)))) ) + residual_b with its own weights
    (w_down [B, r, D] or shared [r, D], likewise b_down, w_up, b_up; scale a float, a one-element
    tensor or one value per image [B] / [B, 1]), in fp32, cast to x's dtype. Dropout (p > 0) uses
    the kernels' Philox mask for `seed` over the B L rows, as `adapter_ref` on the same rows."""
    f32 = torch.float32
    d = x.shape[-1]
    xb = x.reshape(images, -1, d).to(f32)
    wd = _per_row(w_down, images, 2).to(f32)
    r = wd.shape[1]
    a = xb @ wd.transpose(1, 2)
    if b_down is not None:
        a = a + _per_row(b_down, images, 1).to(f32)[:, None, :]
    h = act_ref(a, act)
    if dropout_p > 0.0:
        keep = dropout_keep_mask(seed, h.shape[0] * h.shape[1], r, dropout_p).view(h.shape)
        h = h * keep / (1.0 - dropout_p)
    u = h @ _per_row(w_up, images, 2).to(f32).transpose(1, 2)
    if b_up is not None:
        u = u + _per_row(b_up, images, 1).to(f32)[:, None, :]
    out = _rows_scale(scale, images) * u
    if base is not None:
        out = out + base.reshape(out.shape).to(f32)
    if residual is not None:
        out = out + residual.reshape(out.shape).to(f32)
    return out.to(x.dtype).view(x.shape)


def _validate_rows(images, x, w_down, b_down, w_up, b_up, base, residual, scale_t, act, p, seed):
    op = "adapter_rows"
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"{op}: images must be a positive int (the rows' count B), got {images!r}")
    d = check_features(op, x)
    if x.dim() < 2 or x.shape[0] != images:
        raise ValueError(f"{op}: x must be [B, ..., D] with B = images = {images} first, got x {describe(x)}")

    def per_row_or_shared(name, t, single):
        """`t` is `single` (shared) or [images, *single] (one per image)."""
        if t is None:
            return
        check_tensor(op, name, t, like=x)
        if tuple(t.shape) not in (tuple(single), (images, *single)):
            raise ValueError(f"{op}: {name} must be {list(single)} (shared) or {[images, *single]} (one per "
                             f"image), got {name} {describe(t)} for x {describe(x)}")

    check_tensor(op, "w_down", w_down, like=x)
    if w_down.dim() not in (2, 3) or w_down.shape[-1] != d:
        raise ValueError(f"{op}: w_down must be [r, D] or [B, r, D] with D = {d}, got w_down {describe(w_down)}")
    r = w_down.shape[-2]
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"{op}: rank r = {r} (w_down {describe(w_down)}) must be in 1..{MAX_RANK}")
    per_row_or_shared("w_down", w_down, (r, d))
    per_row_or_shared("w_up", w_up, (d, r))
    per_row_or_shared("b_down", b_down, (r,))
    per_row_or_shared("b_up", b_up, (d,))
    for name, t in (("base", base), ("residual", residual)):
        if t is not None:
            check_tensor(op, name, t, shape=x.shape, like=x)
    if scale_t is not None:
        check_tensor(op, "scale", scale_t, like=x, dtype=scale_t.dtype)
        if scale_t.numel() != 1 and not (scale_t.dim() >= 1 and scale_t.shape[0] == images
                                         and scale_t.numel() == images):
            raise ValueError(f"{op}: a tensor scale must have one element (shared) or one per image "
                             f"([{images}] or [{images}, 1]), got scale {describe(scale_t)}")
    if act not in ACTS.values():
        raise ValueError(f"{op}: act code {act} is not one of {ACTS}")
    check_dropout(op, p, seed, x, "x")


def _fold(g: torch.Tensor, dim: int, single_dim: int) -> torch.Tensor:
    """Per-image gradients [B, ...] of a weight with `dim` dims: as they are for a per-image
    weight, summed over the images (in fp32) for a shared one (`single_dim` dims)."""
    return g if dim == single_dim + 1 else g.float().sum(0).to(g.dtype)


class _AdapterRowsFunction(torch.autograd.Function):
    """`adapter_rows` on the Triton per-row launchers: saves x and the rank-r pre-activation
    (fp32), as the single-task op; the masks are regenerated from the seed in backward."""

    @staticmethod
    def forward(ctx, images, x, w_down, b_down, w_up, b_up, base, residual, scale_t, scale, act, p, seed):
        save = any(ctx.needs_input_grad[i] for i in (1, 2, 3, 4, 5, 8))
        st = None if scale_t is None else scale_t.reshape(-1)
        out, a = launch_rows_fwd(images, x, w_down, b_down, w_up, b_up, base, residual, st, scale, act, p, seed,
                                 save)
        if save:
            ctx.save_for_backward(x, a, w_down, w_up, b_up, scale_t, seed)
        ctx.args = (images, save, scale, act, p, base is not None, residual is not None,
                    None if b_down is None else b_down.dim())
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        images, save, scale, act, p, has_base, has_res, bd_dim = ctx.args
        need = ctx.needs_input_grad
        pass_through = (grad_out if has_base and need[6] else None, grad_out if has_res and need[7] else None)
        if not save:  # only base / residual need a gradient: the identity
            return (None,) * 6 + pass_through + (None,) * 5
        x, a, w_down, w_up, b_up, scale_t, seed = ctx.saved_tensors
        st = None if scale_t is None else scale_t.reshape(-1)
        dx, dwd, dbd, dwu, dbu, ds = launch_rows_bwd(images, grad_out.contiguous(), x, a, w_down, w_up, b_up, st,
                                                     scale, act, p, seed)
        dscale = None
        if scale_t is not None and need[8]:
            dscale = (ds if st.numel() == images and images > 1 else ds.sum()).reshape(scale_t.shape)
            dscale = dscale.to(scale_t.dtype)
        return (None, dx if need[1] else None, _fold(dwd, w_down.dim(), 2) if need[2] else None,
                _fold(dbd, bd_dim, 1) if need[3] else None, _fold(dwu, w_up.dim(), 2) if need[4] else None,
                _fold(dbu, b_up.dim(), 1) if need[5] else None,
                *pass_through, dscale, None, None, None, None)


_CHECKED_ROWS = CheckedSignatures()


def adapter_rows(images: int, x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None,
                 w_up: torch.Tensor, b_up: torch.Tensor | None, *, base: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, scale: float | torch.Tensor = 1.0, act: str = "relu",
                 dropout_p: float = 0.0, training: bool = False, seed: torch.Tensor | None = None) -> torch.Tensor:
    """The per-row form of `adapter` (a mixed multi-task batch, called through
    fastpeft/ops/_rows.py `rows_call`): x [B, ..., D] holds B = `images` images of L rows each
    (x.numel() / (B D)), image b computed with its own weights: w_down [B, r, D], b_down [B, r],
    w_up [B, D, r], b_up [B, D] (or any of them shared: the single-task shape), scale a float, a
    one-element tensor or one per image ([B] / [B, 1], learnable). base / residual like x.
    Gradients: one per image for the per-image weights (each image's own rows), summed for shared
    ones. Dropout (training, p = dropout_p) is the single-task kernel's Philox stream over the B L
    rows for `seed` (drawn from torch's generator when None), regenerated in backward.

    Triton: one forward launch and three backward launches for the whole batch, whatever the mix
    of tasks. Without Triton (or under torch.compile) it runs `adapter_rows_ref` (same masks).
    """
    act_code, w_down, b_down, w_up, b_up, scale_t, scale_f, p, seed = _args(
        "adapter_rows", x, w_down, b_down, w_up, b_up, scale, act, dropout_p, training, seed)
    compiling = torch.compiler.is_compiling()
    _CHECKED_ROWS.check(compiling, lambda: _validate_rows(images, x, w_down, b_down, w_up, b_up, base, residual,
                                                         scale_t, act_code, p, seed),
                        x, w_down, b_down, w_up, b_up, base, residual, scale_t, seed if p > 0.0 else None,
                        extra=(images, act_code, p))
    if p <= 0.0:
        seed = None
    if compiling or not use_triton(x):
        return adapter_rows_ref(images, x, w_down, b_down, w_up, b_up, base=base, residual=residual,
                                scale=scale if scale_t is not None else scale_f, act=act, dropout_p=p, seed=seed)
    return _AdapterRowsFunction.apply(images, x, w_down, b_down, w_up, b_up, base, residual, scale_t, scale_f,
                                      act_code, p, seed)
