"""Convpass's fused op: h -> down (+bias, QuickGELU) -> 3x3 conv over the patch grid -> QuickGELU
-> dropout -> up (+bias) -> * s (+ base).

  convpass              public functional: down and up as custom ops (`fastpeft::convpass_down`,
                        `convpass_up` and their backwards: fake + autograd, what torch.compile
                        traces) around the vendor conv2d; eager `_ConvpassFunction`
  convpass_checked      the eager bypass for a call site that checked its arguments' signature
                        once (`check_bypass`, `bypass_signature`: fastpeft/fused/convpass.py)
  conv_tokens           the 3x3 conv over the token grid (prefix tokens pass through)
  convpass_ref          plain-torch reference: the test oracle

The Triton kernels, launchers and configs are in kernels/convpass.py (down projection: the
low-rank down kernel of kernels/lowrank.py).
"""
from __future__ import annotations

import math

import torch

from ._autograd import once_differentiable
from ..kernels._common import (CheckedSignatures, check_features, cast_param, check_dropout, check_p,
                               check_tensor, describe, use_triton)
from ..kernels.adapter import dropout_keep_mask, dropout_keep_scale
from ..kernels.convpass import MAX_DIM, launch_down_bwd, launch_down_fwd, launch_up_bwd, launch_up_fwd


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _validate_down(x, w_down, b_down):
    op = "convpass_down"
    check_features(op, x)
    check_tensor(op, "w_down", w_down, dim=2, like=x)
    d = w_down.shape[0]
    if w_down.shape[1] != x.shape[-1] or d < 1:
        raise ValueError(f"{op}: w_down must be [d, D] = [d, {x.shape[-1]}] with d >= 1, "
                         f"got w_down {describe(w_down)} for x {describe(x)}")
    if b_down is not None:
        check_tensor(op, "b_down", b_down, shape=(d,), like=x)


def _validate_conv(h, w_down, conv_w, conv_b, grid, num_prefix, scale):
    """The conv and token-grid arguments: conv_w [d, d, 3, 3] and conv_b [d] for w_down's d (any
    float dtype on h's device: cast to h's), grid two positive ints and num_prefix an int >= 0
    with num_prefix + Gh * Gw = h's tokens, a finite scale."""
    op = "convpass"
    d = w_down.shape[0] if isinstance(w_down, torch.Tensor) and w_down.dim() == 2 else None
    check_tensor(op, "conv_w", conv_w, dim=4, like=h, dtype=conv_w.dtype if isinstance(conv_w, torch.Tensor) else None)
    if d is not None and tuple(conv_w.shape) != (d, d, 3, 3):
        raise ValueError(f"{op}: conv_w must be [d, d, 3, 3] = [{d}, {d}, 3, 3] for w_down {describe(w_down)}, "
                         f"got conv_w {describe(conv_w)}")
    if conv_b is not None:
        check_tensor(op, "conv_b", conv_b, shape=(conv_w.shape[0],), like=h, dtype=conv_b.dtype
                     if isinstance(conv_b, torch.Tensor) else None)
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"{op}: grid must be two positive ints (Gh, Gw), got {grid!r}")
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or num_prefix < 0:
        raise ValueError(f"{op}: num_prefix must be an int >= 0, got {num_prefix!r}")
    if h.shape[1] != num_prefix + grid[0] * grid[1]:
        raise ValueError(f"{op}: expected {num_prefix} prefix + {grid[0]}x{grid[1]} patch tokens = "
                         f"{num_prefix + grid[0] * grid[1]}, got h {describe(h)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number, got {scale!r}")


def _validate_up(c, w_up, b_up, base, p, seed):
    op = "convpass_up"
    check_tensor(op, "c", c)
    if c.dim() < 1 or c.shape[-1] < 1:
        raise ValueError(f"{op}: c must be [..., d] with d >= 1, got c {describe(c)}")
    d = c.shape[-1]
    check_tensor(op, "w_up", w_up, dim=2, like=c)
    if w_up.shape[1] != d:
        raise ValueError(f"{op}: w_up must be [D, d] = [D, {d}], got w_up {describe(w_up)} for c {describe(c)}")
    D = w_up.shape[0]
    if b_up is not None:
        check_tensor(op, "b_up", b_up, shape=(D,), like=c)
    if base is not None:
        check_tensor(op, "base", base, shape=(*c.shape[:-1], D), like=c)
    check_dropout(op, p, seed, c, "c")


def _validate_down_bwd(grad_u, x, a, w_down):
    """The registered backward op's arguments: the forward's, grad_u [..., d] like x, a [M, d] fp32."""
    _validate_down(x, w_down, None)
    op = "convpass_down_backward"
    d = w_down.shape[0]
    check_tensor(op, "grad_u", grad_u, shape=(*x.shape[:-1], d), like=x)
    check_tensor(op, "a", a, shape=(x.numel() // x.shape[-1], d), like=x, dtype=torch.float32)


def _validate_up_bwd(grad_out, c, w_up, p, seed):
    """The registered backward op's arguments: the forward's, grad_out [..., D] like c."""
    _validate_up(c, w_up, None, None, p, seed)
    check_tensor("convpass_up_backward", "grad_out", grad_out, shape=(*c.shape[:-1], w_up.shape[0]), like=c)


def convpass_down_bwd(grad_u, x, a, w_down):
    """(dx like x, dw_down [d, D], db_down [d]) in x's dtype."""
    d = w_down.shape[0]
    m = x.numel() // x.shape[-1]
    if grad_u.numel() != m * d or grad_u.shape[-1] != d or a.shape != (m, d):
        raise ValueError(f"convpass_down_backward: grad_u {describe(grad_u)} / a {describe(a)} do not match "
                         f"x {describe(x)} and w_down {describe(w_down)}")
    return launch_down_bwd(grad_u, x, a, w_down)


def convpass_up_fwd(c, w_up, b_up, base, scale: float, p: float, seed):
    _validate_up(c, w_up, b_up, base, p, seed)
    return launch_up_fwd(c, w_up, b_up, base, scale, p, seed)


def convpass_up_bwd(grad_out, c, w_up, scale: float, p: float, seed):
    """(dc like c, dw_up [D, d], db_up [D]) in c's dtype."""
    D = w_up.shape[0]
    m = c.numel() // c.shape[-1]
    if grad_out.numel() != m * D or grad_out.shape[-1] != D:
        raise ValueError(f"convpass_up_backward: grad_out {describe(grad_out)} does not match c {describe(c)}, "
                         f"w_up {describe(w_up)}")
    return launch_up_bwd(grad_out, c, w_up, scale, p, seed)


# ----------------------------------------------------------------------------------------------
# Torch math with the kernels' saving policy
# ----------------------------------------------------------------------------------------------
def _qg(a):
    return a * torch.sigmoid(1.702 * a)


def _qg_grad(a):
    sg = torch.sigmoid(1.702 * a)
    return sg + 1.702 * a * sg * (1.0 - sg)


def _convpass_down_fwd_torch(x, w_down, b_down):
    f32 = torch.float32
    a = x.reshape(-1, x.shape[-1]).to(f32) @ w_down.to(f32).t()
    if b_down is not None:
        a = a + b_down.to(f32)
    return _qg(a).to(x.dtype).view(*x.shape[:-1], w_down.shape[0]), a


def _convpass_down_bwd_torch(grad_u, x, a, w_down):
    f32 = torch.float32
    d = w_down.shape[0]
    da = (grad_u.reshape(-1, d).to(f32) * _qg_grad(a)).to(x.dtype).to(f32)
    x2 = x.reshape(-1, x.shape[-1]).to(f32)
    dt = x.dtype
    return (da @ w_down.to(f32)).to(dt).view(x.shape), (da.t() @ x2).to(dt), da.sum(0).to(dt)


def _convpass_up_fwd_torch(c, w_up, b_up, base, scale, p, seed):
    f32 = torch.float32
    d, D = c.shape[-1], w_up.shape[0]
    c2 = c.reshape(-1, d).to(f32)
    h = _qg(c2)
    if p > 0:
        h = h * dropout_keep_scale(seed, c2.shape[0], d, p)
    o = h.to(c.dtype).to(f32) @ w_up.to(f32).t()
    if b_up is not None:
        o = o + b_up.to(f32)
    o = o * scale
    if base is not None:
        o = o + base.reshape(-1, D).to(f32)
    return o.to(c.dtype).view(*c.shape[:-1], D)


def _convpass_up_bwd_torch(grad_out, c, w_up, scale, p, seed):
    f32 = torch.float32
    d, D = c.shape[-1], w_up.shape[0]
    c2 = c.reshape(-1, d).to(f32)
    g = grad_out.reshape(-1, D).to(f32)
    h, dact = _qg(c2), _qg_grad(c2)
    if p > 0:
        keep = dropout_keep_scale(seed, c2.shape[0], d, p)
        h, dact = h * keep, dact * keep
    dc = scale * (g @ w_up.to(f32)) * dact
    dt = c.dtype
    return dc.to(dt).view(c.shape), (scale * (g.t() @ h.to(dt).to(f32))).to(dt), (scale * g.sum(0)).to(dt)


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
def _triton_ok(t, d: int) -> bool:
    return use_triton(t) and d <= MAX_DIM


@torch.library.custom_op("fastpeft::convpass_down", mutates_args=())
def _convpass_down_op(x: torch.Tensor, w_down: torch.Tensor,
                      b_down: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    _validate_down(x, w_down, b_down)
    return (launch_down_fwd if _triton_ok(x, w_down.shape[0]) else _convpass_down_fwd_torch)(x, w_down, b_down)


@_convpass_down_op.register_fake
def _convpass_down_fake(x, w_down, b_down):
    _validate_down(x, w_down, b_down)
    d = w_down.shape[0]
    return x.new_empty((*x.shape[:-1], d)), x.new_empty((x.numel() // x.shape[-1], d), dtype=torch.float32)


@torch.library.custom_op("fastpeft::convpass_down_backward", mutates_args=())
def _convpass_down_backward_op(grad_u: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                               w_down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _CHECKED.check(False, lambda: _validate_down_bwd(grad_u, x, a, w_down), grad_u, x, a, w_down, extra=("down_bwd",))
    grad_u = grad_u.contiguous()
    fn = convpass_down_bwd if use_triton(x) and w_down.shape[0] <= MAX_DIM else _convpass_down_bwd_torch
    return fn(grad_u, x, a, w_down)


@_convpass_down_backward_op.register_fake
def _convpass_down_backward_fake(grad_u, x, a, w_down):
    _validate_down_bwd(grad_u, x, a, w_down)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(w_down),
            w_down.new_empty((w_down.shape[0],)))


def _down_setup(ctx, inputs, output):
    x, w_down, b_down = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1], w_down)


def _down_backward(ctx, grad_u, _grad_a):
    x, a, w_down = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db = torch.ops.fastpeft.convpass_down_backward(grad_u, x, a, w_down)
    return dx if need[0] else None, dw if need[1] else None, db if need[2] else None


_convpass_down_op.register_autograd(_down_backward, setup_context=_down_setup)


@torch.library.custom_op("fastpeft::convpass_up", mutates_args=())
def _convpass_up_op(c: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor | None, base: torch.Tensor | None,
                    scale: float, p: float, seed: torch.Tensor | None) -> torch.Tensor:
    _validate_up(c, w_up, b_up, base, p, seed)
    fn = launch_up_fwd if _triton_ok(c, c.shape[-1]) else _convpass_up_fwd_torch
    return fn(c, w_up, b_up, base, scale, p, seed)


@_convpass_up_op.register_fake
def _convpass_up_fake(c, w_up, b_up, base, scale, p, seed):
    _validate_up(c, w_up, b_up, base, p, seed)
    return c.new_empty((*c.shape[:-1], w_up.shape[0]))


@torch.library.custom_op("fastpeft::convpass_up_backward", mutates_args=())
def _convpass_up_backward_op(grad_out: torch.Tensor, c: torch.Tensor, w_up: torch.Tensor, scale: float,
                             p: float, seed: torch.Tensor | None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _CHECKED.check(False, lambda: _validate_up_bwd(grad_out, c, w_up, p, seed), grad_out, c, w_up, seed,
                   extra=("up_bwd", p))
    grad_out = grad_out.contiguous()
    fn = convpass_up_bwd if use_triton(c) and c.shape[-1] <= MAX_DIM else _convpass_up_bwd_torch
    return fn(grad_out, c, w_up, scale, p, seed)


@_convpass_up_backward_op.register_fake
def _convpass_up_backward_fake(grad_out, c, w_up, scale, p, seed):
    _validate_up_bwd(grad_out, c, w_up, p, seed)
    return (torch.empty_like(c, memory_format=torch.contiguous_format), torch.empty_like(w_up),
            w_up.new_empty((w_up.shape[0],)))


def _up_setup(ctx, inputs, output):
    c, w_up, b_up, base, scale, p, seed = inputs
    ctx.save_for_backward(c, w_up, seed)
    ctx.scale, ctx.p, ctx.has_base = scale, p, base is not None


def _up_backward(ctx, grad_out):
    c, w_up, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    dc, dw, db = torch.ops.fastpeft.convpass_up_backward(grad_out, c, w_up, ctx.scale, ctx.p, seed)
    return (dc if need[0] else None, dw if need[1] else None, db if need[2] else None,
            grad_out if ctx.has_base and need[3] else None, None, None, None)


_convpass_up_op.register_autograd(_up_backward, setup_context=_up_setup)


class _DownFunction(torch.autograd.Function):
    """The eager path of `fastpeft::convpass_down` (saves x and the fp32 pre-activation): the same
    launchers (or torch math) as the registered op, arguments validated by the caller; the path
    is decided once in forward."""

    @staticmethod
    def forward(ctx, x, w_down, b_down, triton_path):
        u, a = (launch_down_fwd if triton_path else _convpass_down_fwd_torch)(x, w_down, b_down)
        ctx.save_for_backward(x, a, w_down)
        ctx.triton_path = triton_path
        return u

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_u):
        x, a, w_down = ctx.saved_tensors
        fn = launch_down_bwd if ctx.triton_path else _convpass_down_bwd_torch
        dx, dw, db = fn(grad_u.contiguous(), x, a, w_down)
        need = ctx.needs_input_grad
        return dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None


class _UpFunction(torch.autograd.Function):
    """The eager path of `fastpeft::convpass_up` (saves c and the seed), as `_DownFunction`."""

    @staticmethod
    def forward(ctx, c, w_up, b_up, base, scale, p, seed, triton_path):
        fn = launch_up_fwd if triton_path else _convpass_up_fwd_torch
        out = fn(c, w_up, b_up, base, scale, p, seed)
        ctx.save_for_backward(c, w_up, seed)
        ctx.args = (scale, p, base is not None, triton_path)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        c, w_up, seed = ctx.saved_tensors
        scale, p, has_base, triton_path = ctx.args
        fn = launch_up_bwd if triton_path else _convpass_up_bwd_torch
        dc, dw, db = fn(grad_out.contiguous(), c, w_up, scale, p, seed)
        need = ctx.needs_input_grad
        return (dc if need[0] else None, dw if need[1] else None, db if need[2] else None,
                grad_out if has_base and need[3] else None, None, None, None, None)


def _conv_tokens_backward(dc, u, conv_w, grid, num_prefix, has_bias):
    """(du, dconv_w, dconv_b or None) of `conv_tokens` for the gradient dc [B, N, d] of its output:
    one convolution backward over the patch grid, plus the prefix rows' centre-tap GEMMs. (Views by
    narrow/select, the grid's input gradient written straight into du's rows: the same values as
    slicing and concatenating, with fewer copies.)"""
    B, N, d = u.shape
    gh, gw = grid
    P = num_prefix
    dpatch = dc.narrow(1, P, N - P).reshape(B, gh, gw, d).permute(0, 3, 1, 2)
    upatch = u.narrow(1, P, N - P).reshape(B, gh, gw, d).permute(0, 3, 1, 2)
    gin, dw, db = torch.ops.aten.convolution_backward(
        dpatch, upatch, conv_w, [d] if has_bias else None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [True, True, has_bias])
    if not P:
        return gin.permute(0, 2, 3, 1).reshape(B, gh * gw, d), dw, db
    du = torch.empty((B, N, d), dtype=dc.dtype, device=dc.device)
    du.narrow(1, P, N - P).view(B, gh, gw, d).copy_(gin.permute(0, 2, 3, 1))
    dpre = dc.narrow(1, 0, P).reshape(B * P, d)
    centre = conv_w.select(3, 1).select(2, 1)  # W[:, :, 1, 1]
    if B == 1:  # (the prefix rows of du are contiguous: the GEMM writes them in place)
        torch.mm(dpre, centre, out=du.narrow(1, 0, P).view(P, d))
    else:
        du.narrow(1, 0, P).copy_((dpre @ centre).view(B, P, d))
    dw.select(3, 1).select(2, 1).addmm_(dpre.t(), u.narrow(1, 0, P).reshape(B * P, d))
    if has_bias:
        db += dpre.sum(0)
    return du, dw, db


class _ConvpassFunction(torch.autograd.Function):
    """The whole bypass as one eager node: the down launch (+ QuickGELU), the grid conv
    (`conv_tokens`), the up launch (QuickGELU, dropout, scale, base); backward: the up-backward
    launch, one convolution backward (+ the prefix rows' two small GEMMs), the down-backward
    launch. Saves what `_DownFunction`, the conv and `_UpFunction` save apart (h, the fp32
    pre-activation, the conv input u, the conv output c, the seed), with one Python node instead
    of three plus the conv's views, slices and cat."""

    @staticmethod
    def forward(ctx, h, w_down, b_down, conv_w, conv_b, w_up, b_up, base, seed, spec):
        # spec: (grid, num_prefix, scale, p, down_triton, up_triton) -- one argument, not six
        grid, num_prefix, scale, p, down_triton, up_triton = spec
        u, a = (launch_down_fwd if down_triton else _convpass_down_fwd_torch)(h, w_down, b_down)
        c = _conv_tokens_eager(u, conv_w, conv_b, grid, num_prefix)
        out = (launch_up_fwd if up_triton else _convpass_up_fwd_torch)(c, w_up, b_up, base, scale, p, seed)
        ctx.save_for_backward(h, a, w_down, u, conv_w, c, w_up, seed)
        ctx.args = (spec, base is not None, conv_b is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, a, w_down, u, conv_w, c, w_up, seed = ctx.saved_tensors
        (grid, num_prefix, scale, p, down_triton, up_triton), has_base, has_cb = ctx.args
        need = ctx.needs_input_grad
        g = grad_out.contiguous()
        dc, dw_up, db_up = (launch_up_bwd if up_triton else _convpass_up_bwd_torch)(g, c, w_up, scale, p, seed)
        du, dconv_w, dconv_b = _conv_tokens_backward(dc, u, conv_w, grid, num_prefix, has_cb)
        dh, dw_down, db_down = (launch_down_bwd if down_triton else _convpass_down_bwd_torch)(du, h, a, w_down)
        return (dh if need[0] else None, dw_down if need[1] else None, db_down if need[2] else None,
                dconv_w if need[3] else None, dconv_b if need[4] else None, dw_up if need[5] else None,
                db_up if need[6] else None, g if has_base and need[7] else None, None, None)


_CHECKED = CheckedSignatures()


def conv_tokens(u, conv_w, conv_b, grid, num_prefix):
    """The Convpass conv on u [B, P + Gh*Gw, d]: 3x3 (pad 1) over the patch grid; prefix tokens
    through the centre tap W[:, :, 1, 1] + bias (what the official 1x1-image conv computes)."""
    B, N, d = u.shape
    gh, gw = grid
    if N != num_prefix + gh * gw:
        raise ValueError(f"convpass: expected {num_prefix} prefix + {gh}x{gw} patch tokens = "
                         f"{num_prefix + gh * gw}, got u {describe(u)}")
    patches = u[:, num_prefix:].reshape(B, gh, gw, d).permute(0, 3, 1, 2)
    patches = torch.nn.functional.conv2d(patches, conv_w, conv_b, padding=1).permute(0, 2, 3, 1).reshape(B, gh * gw, d)
    if not num_prefix:
        return patches
    prefix = torch.nn.functional.linear(u[:, :num_prefix], conv_w[:, :, 1, 1], conv_b)
    return torch.cat([prefix, patches], 1)


def _conv_tokens_eager(u, conv_w, conv_b, grid, num_prefix):
    """`conv_tokens` (same values, contiguous) for `_ConvpassFunction`, where no autograd records
    it: the grid's output and the prefix rows written straight into one [B, N, d] tensor (one copy
    each instead of a reshape copy and a cat), views by narrow/select."""
    B, N, d = u.shape
    gh, gw = grid
    P = num_prefix
    patches = u.narrow(1, P, N - P).reshape(B, gh, gw, d).permute(0, 3, 1, 2)
    patches = torch.nn.functional.conv2d(patches, conv_w, conv_b, padding=1).permute(0, 2, 3, 1)
    out = torch.empty((B, N, d), dtype=u.dtype, device=u.device)
    out.narrow(1, P, N - P).view(B, gh, gw, d).copy_(patches)
    if P:
        out.narrow(1, 0, P).copy_(torch.nn.functional.linear(u.narrow(1, 0, P), conv_w.select(3, 1).select(2, 1),
                                                             conv_b))
    return out


def convpass(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, conv_w: torch.Tensor,
             conv_b: torch.Tensor | None, w_up: torch.Tensor, b_up: torch.Tensor | None, *, grid: tuple[int, int],
             num_prefix: int = 1, scale: float = 1.0, base: torch.Tensor | None = None, dropout_p: float = 0.1,
             training: bool = False, seed: torch.Tensor | None = None) -> torch.Tensor:
    """base + scale * C(h), C the Convpass bypass (module docstring).

    h [B, P + Gh*Gw, D] float32/float16/bfloat16; w_down [d, D], b_down [d], conv_w [d, d, 3, 3],
    conv_b [d], w_up [D, d], b_up [D] (cast to h.dtype, differentiably); d <= MAX_DIM (32) runs
    the Triton kernels, wider bypasses the torch math of the same ops. base [B, N, D]
    or None (the residual stream the bypass is added to; keep it None when a DropPath acts on the
    bypass and apply DropPath to the result). Dropout p on the d-wide activation when `training`.
    """
    check_tensor("convpass", "h", h, dim=3)
    w_down, b_down, conv_w, conv_b, w_up, b_up = (cast_param(t, h.dtype) for t in (w_down, b_down, conv_w, conv_b, w_up, b_up))
    p = check_p("convpass", dropout_p)  # (in range even when not training, as F.dropout)
    p = p if training else 0.0
    if p > 0.0 and seed is None:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=h.device)
    # eager: one autograd.Function for the bypass, checks once per call signature; compiling: the
    # registered ops
    compiling = torch.compiler.is_compiling()
    if not compiling:
        def validate():
            _validate_down(h, w_down, b_down)
            _validate_conv(h, w_down, conv_w, conv_b, grid, num_prefix, scale)
            _validate_up(h.new_empty((*h.shape[:-1], w_down.shape[0])), w_up, b_up, base, p, seed)

        _CHECKED.check(False, validate, h, w_down, b_down, conv_w, conv_b, w_up, b_up, base,
                       seed if p > 0 else None, extra=("bypass", repr(grid), repr(num_prefix), repr(scale), p))
        ok = _triton_ok(h, w_down.shape[0])
        return _ConvpassFunction.apply(h, w_down, b_down, conv_w, conv_b, w_up, b_up, base, seed if p > 0 else None,
                                       (tuple(grid), num_prefix, float(scale), p, ok, ok))
    _CHECKED.check(compiling, lambda: _validate_down(h, w_down, b_down), h, w_down, b_down, extra=("down",))
    _CHECKED.check(compiling, lambda: _validate_conv(h, w_down, conv_w, conv_b, grid, num_prefix, scale),
                   h, w_down, conv_w, conv_b, extra=("conv", repr(grid), repr(num_prefix), repr(scale)))
    if compiling:
        u, _ = torch.ops.fastpeft.convpass_down(h, w_down, b_down)
    else:
        u = _DownFunction.apply(h, w_down, b_down, _triton_ok(h, w_down.shape[0]))
    c = conv_tokens(u, conv_w, conv_b, grid, num_prefix).contiguous()
    _CHECKED.check(compiling, lambda: _validate_up(c, w_up, b_up, base, p, seed),
                   c, w_up, b_up, base, seed if p > 0 else None, extra=("up", p))
    seed = seed if p > 0 else None
    if compiling:
        return torch.ops.fastpeft.convpass_up(c, w_up, b_up, base, float(scale), p, seed)
    return _UpFunction.apply(c, w_up, b_up, base, float(scale), p, seed, _triton_ok(c, c.shape[-1]))


def bypass_signature(h, params, training: bool, p: float):
    """What `convpass_checked` is valid for: h's shape, dtype and device and each parameter's
    (w_down, b_down, conv_w, conv_b, w_up, b_up; None allowed), the mode and dropout rate."""
    sig = [h.shape, h.dtype, h.device, training, p]
    for t in params:
        sig += (None, None, None) if t is None else (t.shape, t.dtype, t.device)
    return sig


def check_bypass(h, params, *, grid, num_prefix, scale, p):
    """`convpass`'s checks (base None, dropout p; parameters cast to h's dtype first, as it does):
    raises ValueError / TypeError, or returns whether `convpass_checked` may run these arguments
    (the parameters already in h's dtype; else `convpass` casts them on every call)."""
    check_tensor("convpass", "h", h, dim=3)
    w_down, b_down, conv_w, conv_b, w_up, b_up = (cast_param(t, h.dtype) for t in params)
    p = check_p("convpass", p)
    _validate_down(h, w_down, b_down)
    _validate_conv(h, w_down, conv_w, conv_b, grid, num_prefix, scale)
    seed = torch.zeros(1, dtype=torch.int64, device=h.device) if p > 0 else None
    _validate_up(h.new_empty((*h.shape[:-1], w_down.shape[0])), w_up, b_up, None, p, seed)
    return all(t is None or t.dtype == h.dtype for t in params)


def convpass_checked(h, params, *, grid: tuple[int, int], num_prefix: int, scale: float, p: float) -> torch.Tensor:
    """`convpass(h, *params, grid=..., num_prefix=..., scale=..., dropout_p=p, training=p > 0)`
    (eager, no base) for a caller that ran `check_bypass` on arguments with this
    `bypass_signature` (fastpeft/fused/convpass.py caches it per call site): the autograd.Function
    directly, with a fresh dropout seed when p > 0."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=h.device) if p > 0.0 else None
    ok = _triton_ok(h, params[0].shape[0])
    return _ConvpassFunction.apply(h, *params, None, seed, (grid, num_prefix, scale, p, ok, ok))


def convpass_ref(h, w_down, b_down, conv_w, conv_b, w_up, b_up, *, grid, num_prefix=1, scale=1.0, base=None,
                 dropout_p=0.0, seed=None):
    """`ConvpassModule.forward` (official math: prefix tokens as 1x1 images through the conv) in
    fp32, times scale, plus base; dropout mask from `seed` (offsets row * d + col)."""
    F = torch.nn.functional
    f = (lambda t: t.to(torch.float32) if isinstance(t, torch.Tensor) else t)
    B, N, _ = h.shape
    gh, gw = grid
    P = num_prefix
    u = _qg(F.linear(f(h), f(w_down), f(b_down)))
    d = u.shape[-1]
    patches = u[:, P:].reshape(B, gh, gw, d).permute(0, 3, 1, 2)
    patches = F.conv2d(patches, f(conv_w), f(conv_b), padding=1).permute(0, 2, 3, 1).reshape(B, gh * gw, d)
    if P:
        prefix = u[:, :P].reshape(B * P, 1, 1, d).permute(0, 3, 1, 2)
        prefix = F.conv2d(prefix, f(conv_w), f(conv_b), padding=1).reshape(B, P, d)
        u = torch.cat([prefix, patches], 1)
    else:
        u = patches
    u = _qg(u)
    if dropout_p > 0:
        u = u * dropout_keep_mask(seed, B * N, d, dropout_p).view(B, N, d) / (1.0 - dropout_p)
    out = F.linear(u, f(w_up), f(b_up)) * scale
    if base is not None:
        out = out + f(base)
    return out.to(h.dtype)
