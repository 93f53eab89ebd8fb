"""Fused ST-Adapter (fastpeft.methods.st_adapter.STAdapterModule; Pan et al., NeurIPS 2022, official
code linziyi96/st-adapter `models_adapter.py`):

    out = cat[x[:, :P], x[:, P:] + fc2(tconv(fc1(x[:, P:])))]

x [B*T, L, D] holds the frames of B clips (row b*T + t), L = P prefix tokens + N patch tokens; tconv
is the depthwise k_t-tap temporal conv (Conv3d kernel (k_t, 1, 1), zero padding k_t // 2, bias)
over the T frames of a clip, per channel and patch position. Rows of the [M, C] intermediates (M =
B*T*N patch rows) are m = (b*T + t)*N + n, so frame t +- o of the same clip and position is row
m +- o*N.

Forward:
  down (vendor GEMM)   u = x W1^T + b1 over all B*T*L rows (one addmm on the contiguous [.., D]
                       input, no D-wide copy of the strided patch rows), patch rows kept [M, C]
  _st_up_fwd_kernel    out_patch = x_patch + b2 + tconv(u) W2^T: the temporal conv is the GEMM's
                       A-operand prologue (k_t masked loads of u per K tile), the bias and the
                       residual its epilogue; c = tconv(u) is never written
Saved for backward: x (the residual stream, alive anyway) and u [M, C]; nothing D-wide is new.

Backward (deterministic; no atomics):
  dc = g W2 (vendor GEMM on the [.., D] rows, patch rows kept)
  _st_tconv_kernel     c = tconv(u) (recomputed, for dW2) and du = tconv^T(dc) (the same kernel with
                       the taps reversed: the transpose of a zero-padded correlation), both written
                       into [B*T, L, C] buffers whose prefix rows are zero, so that
  dW2 = g^T c, dW1 = du^T x and dx = g + du W1 are single GEMMs over all rows (the prefix rows add 0)
  conv taps: dw[:, j] = sum_m dc[m] u[m + (j - k_t//2) N] and db = colsum(dc), in fp32 (torch)
"""
from __future__ import annotations

import torch

from fastpeft.kernels._common import CheckedSignatures, check_tensor, describe, use_triton
from fastpeft.kernels.st_adapter import KT_SUPPORTED, launch_tconv, launch_up_fwd

__all__ = ["st_adapter", "st_adapter_ref", "KT_SUPPORTED"]


# ----------------------------------------------------------------------------------------------
# Validation (once, where the arguments arrive: `st_adapter`)
# ----------------------------------------------------------------------------------------------
def _validate(x, w1, b1, conv_w, conv_b, w2, b2, frames, num_prefix, grid=None):
    op = "st_adapter"
    check_tensor(op, "x", x, dim=3)
    BT, L, D = x.shape
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
        raise ValueError(f"{op}: frames must be a positive int, got {frames!r}")
    if not isinstance(num_prefix, int) or isinstance(num_prefix, bool) or not 0 <= num_prefix < L:
        raise ValueError(f"{op}: num_prefix must be an int in [0, L={L}), got {num_prefix!r}")
    if BT % frames:
        raise ValueError(f"{op}: {BT} frames (x {describe(x)}) are not whole clips of {frames} frames")
    if grid is not None and L != num_prefix + grid[0] * grid[1]:
        raise ValueError(f"{op}: expected {num_prefix} prefix + {grid[0]}x{grid[1]} patch tokens = "
                         f"{num_prefix + grid[0] * grid[1]}, got x {describe(x)}")
    check_tensor(op, "w1", w1, dim=2, like=x)
    C = w1.shape[0]
    if w1.shape[1] != D or C < 1:
        raise ValueError(f"{op}: w1 must be [C, D] = [C, {D}], got {describe(w1)}")
    check_tensor(op, "b1", b1, shape=(C,), like=x)
    check_tensor(op, "conv_w", conv_w, dim=2, like=x)
    if conv_w.shape[0] != C or conv_w.shape[1] % 2 == 0:
        raise ValueError(f"{op}: conv_w must be [C, k_t] = [{C}, odd k_t] (the Conv3d weight [C, 1, k_t, 1, 1] "
                         f"reshaped), got {describe(conv_w)}")
    check_tensor(op, "conv_b", conv_b, shape=(C,), like=x)
    check_tensor(op, "w2", w2, shape=(D, C), like=x)
    check_tensor(op, "b2", b2, shape=(D,), like=x)


# ----------------------------------------------------------------------------------------------
# The torch twins of the launchers (the same decomposition, the same saved tensors)
# ----------------------------------------------------------------------------------------------
def _down(x, w1, b1, P):
    """u [M, C] (x dtype) = the patch rows of x W1^T + b1, from one GEMM over all rows."""
    BT, L, D = x.shape
    C = w1.shape[0]
    u = torch.addmm(b1, x.reshape(BT * L, D), w1.t()).view(BT, L, C)
    return u[:, P:].reshape(BT * (L - P), C)


def _tconv_torch(u, conv_w, conv_b, T, N, flip, out_L=None, out_P=0):
    M, C = u.shape
    KT = conv_w.shape[1]
    v = u.view(-1, T, N, C).to(torch.float32)
    w = conv_w.to(torch.float32)
    acc = torch.zeros_like(v) if conv_b is None else conv_b.to(torch.float32).expand_as(v).clone()
    for j in range(KT):
        off = j - KT // 2
        tap = w[:, KT - 1 - j if flip else j]
        if abs(off) >= T:
            continue
        if off >= 0:
            acc[:, :T - off] += v[:, off:] * tap
        else:
            acc[:, -off:] += v[:, :T + off] * tap
    acc = acc.to(u.dtype).view(M, C)
    if out_L is None:
        return acc
    out = torch.zeros((M // N, out_L, C), dtype=u.dtype, device=u.device)
    out[:, out_P:] = acc.view(M // N, N, C)
    return out


def _triton_ok(x, conv_w) -> bool:
    return use_triton(x) and conv_w.shape[1] in KT_SUPPORTED


def _fwd(x, w1, b1, conv_w, conv_b, w2, b2, frames: int, num_prefix: int, triton_path: bool):
    """(out [B*T, L, D], u [M, C])."""
    BT, L, D = x.shape
    P, N = num_prefix, L - num_prefix
    x = x.contiguous()
    u = _down(x, w1, b1, P)
    out = torch.empty_like(x)
    out[:, :P] = x[:, :P]
    if triton_path:
        launch_up_fwd(u, conv_w, conv_b, w2, b2, x, out, frames, P)
    else:
        c = _tconv_torch(u, conv_w, conv_b, frames, N, False)
        f32 = torch.float32
        v = c.to(f32) @ w2.to(f32).t() + b2.to(f32)
        out[:, P:] = (x[:, P:].to(f32) + v.view(BT, N, D)).to(x.dtype)
    return out, u


def _bwd(g, x, u, w1, conv_w, conv_b, w2, frames: int, num_prefix: int, triton_path: bool):
    """(dx, dw1, db1, dconv_w [C, k_t], dconv_b, dw2, db2), each in x's dtype."""
    BT, L, D = x.shape
    P, N = num_prefix, L - num_prefix
    M, C = u.shape
    KT = conv_w.shape[1]
    f32, dt = torch.float32, x.dtype
    g = g.contiguous()
    x2, g2 = x.reshape(BT * L, D), g.reshape(BT * L, D)
    dc = (g2 @ w2).view(BT, L, C)[:, P:].reshape(M, C)
    tconv = launch_tconv if triton_path else _tconv_torch
    c_full = tconv(u, conv_w, conv_b, frames, N, False, L, P)  # recomputed c; prefix rows 0
    du_full = tconv(dc, conv_w, None, frames, N, True, L, P)  # tconv^T(dc); prefix rows 0
    dw2 = g2.t() @ c_full.view(BT * L, C)
    db2 = g[:, P:].sum((0, 1), dtype=f32)
    du2 = du_full.view(BT * L, C)
    dw1 = du2.t() @ x2
    db1 = du2.sum(0, dtype=f32)
    dx = torch.addmm(g2, du2, w1).view(BT, L, D)
    # conv taps and bias: fp32 sums over the rows that tap j reads (frame t + j - k_t // 2)
    dcv = dc.view(-1, frames, N, C).to(f32)
    uv = u.view(-1, frames, N, C).to(f32)
    dcw = torch.zeros((C, KT), dtype=f32, device=x.device)
    for j in range(KT):
        off = j - KT // 2
        if abs(off) >= frames:
            continue
        if off >= 0:
            dcw[:, j] = (dcv[:, :frames - off] * uv[:, off:]).sum((0, 1, 2))
        else:
            dcw[:, j] = (dcv[:, -off:] * uv[:, :frames + off]).sum((0, 1, 2))
    dcb = dcv.sum((0, 1, 2))
    return dx, dw1.to(dt), db1.to(dt), dcw.to(dt), dcb.to(dt), dw2.to(dt), db2.to(dt)


# ----------------------------------------------------------------------------------------------
# Custom ops (what torch.compile traces) and the eager autograd.Function
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastpeft::st_adapter", mutates_args=())
def _st_adapter_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor,
                   w2: torch.Tensor, b2: torch.Tensor, frames: int, num_prefix: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(x, w1, b1, conv_w, conv_b, w2, b2, frames, num_prefix)
    return _fwd(x, w1, b1, conv_w, conv_b, w2, b2, frames, num_prefix, _triton_ok(x, conv_w))


@_st_adapter_op.register_fake
def _st_adapter_fake(x, w1, b1, conv_w, conv_b, w2, b2, frames, num_prefix):
    BT, L, _ = x.shape
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((BT * (L - num_prefix), w1.shape[0]))


@torch.library.custom_op("fastpeft::st_adapter_backward", mutates_args=())
def _st_adapter_backward_op(g: torch.Tensor, x: torch.Tensor, u: torch.Tensor, w1: torch.Tensor, conv_w: torch.Tensor,
                            conv_b: torch.Tensor, w2: torch.Tensor, frames: int, num_prefix: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor, torch.Tensor]:
    return _bwd(g, x.contiguous(), u, w1, conv_w, conv_b, w2, frames, num_prefix, _triton_ok(x, conv_w))


@_st_adapter_backward_op.register_fake
def _st_adapter_backward_fake(g, x, u, w1, conv_w, conv_b, w2, frames, num_prefix):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(w1), w1.new_empty(w1.shape[:1]),
            torch.empty_like(conv_w), torch.empty_like(conv_b), torch.empty_like(w2), w2.new_empty(w2.shape[:1]))


def _setup(ctx, inputs, output):
    x, w1, b1, conv_w, conv_b, w2, b2, frames, num_prefix = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1], w1, conv_w, conv_b, w2)
    ctx.frames, ctx.num_prefix = frames, num_prefix


def _backward(ctx, g, _gu):
    x, u, w1, conv_w, conv_b, w2 = ctx.saved_tensors
    grads = torch.ops.fastpeft.st_adapter_backward(g, x, u, w1, conv_w, conv_b, w2, ctx.frames, ctx.num_prefix)
    need = ctx.needs_input_grad
    return (*(t if need[i] else None for i, t in enumerate(grads)), None, None)


_st_adapter_op.register_autograd(_backward, setup_context=_setup)


class _STAdapterFunction(torch.autograd.Function):
    """The eager path of `fastpeft::st_adapter` (saves x and u): the same launchers (or torch
    math) as the registered op, arguments validated by the caller; the path is decided once."""

    @staticmethod
    def forward(ctx, x, w1, b1, conv_w, conv_b, w2, b2, frames, num_prefix, triton_path):
        out, u = _fwd(x, w1, b1, conv_w, conv_b, w2, b2, frames, num_prefix, triton_path)
        ctx.save_for_backward(x, u, w1, conv_w, conv_b, w2)
        ctx.args = (frames, num_prefix, triton_path)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, u, w1, conv_w, conv_b, w2 = ctx.saved_tensors
        frames, num_prefix, triton_path = ctx.args
        grads = _bwd(g, x.contiguous(), u, w1, conv_w, conv_b, w2, frames, num_prefix, triton_path)
        need = ctx.needs_input_grad
        return (*(t if need[i] else None for i, t in enumerate(grads)), None, None, None)


# ----------------------------------------------------------------------------------------------
# Functional and reference
# ----------------------------------------------------------------------------------------------
def _cast(t, dtype):
    return t.to(dtype) if t.dtype != dtype else t


_CHECKED = CheckedSignatures()


def st_adapter(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor,
               w2: torch.Tensor, b2: torch.Tensor, *, frames: int, num_prefix: int = 1,
               grid: tuple[int, int] | None = None) -> torch.Tensor:
    """ST(x) = cat[x[:, :P], x[:, P:] + fc2(tconv(fc1(x[:, P:])))] (module docstring).

    x [B*T, P + N, D] float32/float16/bfloat16 (frames b-major); w1 [C, D], b1 [C]; conv_w: the
    Conv3d weight [C, 1, k_t, 1, 1] (or [C, k_t]), k_t odd; conv_b [C]; w2 [D, C], b2 [D] (cast to
    x.dtype, differentiably). grid (optional) checks N = Gh * Gw. k_t in KT_SUPPORTED runs the
    Triton kernels (CUDA, or the interpreter), anything else the torch math of the same ops.
    """
    check_tensor("st_adapter", "conv_w", conv_w)
    if conv_w.dim() == 5:
        if conv_w.shape[1] != 1 or conv_w.shape[3:] != (1, 1):
            raise ValueError(f"st_adapter: conv_w must be a depthwise (k_t, 1, 1) Conv3d weight [C, 1, k_t, 1, 1], "
                             f"got {describe(conv_w)}")
        conv_w = conv_w.reshape(conv_w.shape[0], conv_w.shape[2])
    w1, b1, conv_w, conv_b, w2, b2 = (_cast(t, x.dtype) if isinstance(t, torch.Tensor) else t
                                      for t in (w1, b1, conv_w, conv_b, w2, b2))
    compiling = torch.compiler.is_compiling()
    _CHECKED.check(compiling, lambda: _validate(x, w1, b1, conv_w, conv_b, w2, b2, frames, num_prefix, grid),
                   x, w1, b1, conv_w, conv_b, w2, b2, extra=(frames, num_prefix, grid))
    if compiling:
        return torch.ops.fastpeft.st_adapter(x, w1, b1, conv_w, conv_b, w2, b2, frames, num_prefix)[0]
    return _STAdapterFunction.apply(x, w1, b1, conv_w, conv_b, w2, b2, frames, num_prefix, _triton_ok(x, conv_w))


def st_adapter_ref(x, w1, b1, conv_w, conv_b, w2, b2, *, frames: int, num_prefix: int = 1, grid=None):
    """`STAdapterModule.forward` in fp32 with plain torch ops (Linear, depthwise Conv3d over
    [B, C, T, N, 1], Linear, concatenation), cast back to x's dtype."""
    F = torch.nn.functional
    f = (lambda t: t.to(torch.float32))
    BT, L, D = x.shape
    P, N, T = num_prefix, L - num_prefix, frames
    kt = conv_w.shape[2] if conv_w.dim() == 5 else conv_w.shape[1]
    cw = f(conv_w).reshape(-1, 1, kt, 1, 1)
    u = F.linear(f(x[:, P:]), f(w1), f(b1))  # [BT, N, C]
    C = u.shape[-1]
    u = u.reshape(BT // T, T, N, C).permute(0, 3, 1, 2).unsqueeze(-1)  # [B, C, T, N, 1]
    c = F.conv3d(u, cw, f(conv_b), padding=(kt // 2, 0, 0), groups=C)
    c = c.squeeze(-1).permute(0, 2, 3, 1).reshape(BT, N, C)
    return torch.cat([f(x[:, :P]), f(x[:, P:]) + F.linear(c, f(w2), f(b2))], 1).to(x.dtype)
