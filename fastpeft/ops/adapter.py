"""The bottleneck adapter op: out = base + s * (up(drop(act(down(x) + b_d))) + b_u) (+ residual).

One op covers AdaptFormer parallel / sequential and NOAH / Pfeiffer serial adapters (the official
code each cites: fastpeft/methods/adaptformer.py, adapter.py). Layers, each doing one job:

  adapter_ref                                    plain-torch reference: the spec and the test oracle
  _validate / _validate_bwd                      checks (ValueError before any launch)
  _adapter_fwd_torch / _adapter_bwd_torch        torch math with the kernels' saving policy (CPU)
  torch.ops.fastpeft.adapter / adapter_backward  custom ops (fake + autograd): what torch.compile traces
  _AdapterFunction                               the eager path: the same launchers without the op dispatch
  adapter                                        public functional

The Triton kernels, their launchers and configs are in kernels/adapter.py; training saves only
x and the rank-r pre-activation (fp32), the dropout mask is regenerated from the seed.
"""
from __future__ import annotations

import torch

from ..kernels._common import (CheckedSignatures, cast_param, check_dropout, check_p, check_tensor, describe,
                               use_triton)
from ..kernels.adapter import ACTS, MAX_RANK, dropout_keep_mask, launch_bwd, launch_fwd


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
    check_tensor(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., D] with D > 0, got x {describe(x)}")
    d = x.shape[-1]
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
    @torch.autograd.function.once_differentiable
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
    act_code = ACTS.get(act) if isinstance(act, str) else None
    if act_code is None:
        raise ValueError(f"adapter: act must be one of {tuple(ACTS)}, got {act!r}")
    check_tensor("adapter", "x", x)
    dt = x.dtype
    w_down, b_down, w_up, b_up = (cast_param(t, dt) for t in (w_down, b_down, w_up, b_up))
    scale_t = scale if isinstance(scale, torch.Tensor) else None
    scale_f = 1.0 if scale_t is not None else float(scale)
    p = check_p("adapter", dropout_p)  # (in range even when not training, as F.dropout)
    p = p if training else 0.0
    if p > 0.0 and seed is None:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
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
