"""Fused Convpass bypass (JieShibo/PETL-ViT `convpass/vtab/convpass.py`; `fastpeft.methods.convpass.ConvpassModule`):

    out = base + s * up(drop(QuickGELU(conv(QuickGELU(down(h))))))

h [B, N, D] is the LayerNorm'd input, laid out [prefix tokens (P), patch grid (Gh x Gw, row-major)];
the 3x3 conv (pad 1) runs on the d-channel patch grid (d = 8 officially) and every prefix token goes
through the conv's centre tap + bias (a 1x1 image with padding 1 sees only the centre tap).

Three stages, two fused ops around a plain-torch conv:

  fastpeft::convpass_down  u = QuickGELU(h W_d^T + b_d)                 [M, d]  (lowrank's down kernel:
                           bias + QuickGELU epilogue; saves h and the fp32 pre-activation a [M, d])
  conv (torch)             c = conv3x3(u on the grid) | centre tap for prefix tokens
  fastpeft::convpass_up    out = base + s * (drop(QuickGELU(c)) W_u^T + b_u) [M, D]
                           (_convpass_up_fwd_kernel; saves c [M, d] only)

Why the conv stays in torch: it reads and writes [B, N, d] tensors, d / D = 1/96 of the D-wide
traffic of the two fused ops (9 d^2 = 576 MACs per token vs 2 d D = 12,288 for down + up), and its
backward (input and weight grads over the grid, boundary handling) is exactly what cuDNN / ATen
already provide; a dedicated kernel would save two small launches, not bytes that matter.

Backward (deterministic; no atomics):
  _convpass_up_bwd_kernel    dh = g W_u over D; dc = s * dh * keep * QuickGELU'(c); also writes
                             h = drop(QuickGELU(c)) [M, d] for dW_u
  lowrank's dw kernel        dW_u = s * h^T g and db_u = s * colsum(g) (one pass over g);
                             dW_d = da^T h_in
  _convpass_down_bwd_kernel  da = du * QuickGELU'(a); dx = da W_d over D
Saved for backward: h (the bypass input, x dtype), a [M, d] fp32, c [M, d] (x dtype), the seed;
the conv saves its own input u [M, d]. The dropout mask is regenerated (Philox, offsets
row * d + col of the [M, d] activation; `adapter.dropout_keep_mask` in torch).
"""
from __future__ import annotations

import math

import torch

from ._common import (CheckedSignatures, check_dropout, check_p, AOT_DTYPES, TRITON_PTR, cdiv, check_tensor, describe, dummy,
                      inv_keep, keep_scale, column_splits, finish_row_splits, rank_down_t, rank_down_t_range, rank_up_store,
                      row_rank_tile, split_workspace, rows_of, seed_or_zero, tl, triton, use_triton,
                      dot_precision, with_tf32_variants)
from ._common import Cfg, cast_param
from .adapter import dropout_keep_mask, dropout_keep_scale
from .lowrank import ACT_QUICK_GELU, _quick_gelu, launch_down, r_pad_of

MAX_DIM = 32  # bypass widths d above this (official: 8) run the torch math of the same ops
DIM_PADS = (16, 32)

# keyed by (padded bypass width max(16, pow2(d)), element bytes): acc [BLOCK_M, DIM_PAD] fp32,
# D in BLOCK_N chunks. fp32 uses 32x32 tiles: at 64x64 its ieee (FMA) dots spilled on sm_80
# (STACK 32..3712).
_HALF = Cfg(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
_F32 = Cfg(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
CONFIGS: dict[str, dict[tuple[int, int], Cfg]] = {
    name: {(dp, size): (_F32 if size == 4 else _HALF) for dp in DIM_PADS for size in (2, 4)}
    for name in ("convpass_up_fwd", "convpass_up_bwd", "convpass_down_bwd")
}


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _quick_gelu_grad(a):
    sg = tl.sigmoid(1.702 * a)
    return sg + 1.702 * a * sg * (1.0 - sg)


@triton.jit(do_not_specialize=["M", "R", "p", "inv_keep", "scale", "has_bias", "has_base", "use_dropout", "n_split"])
def _convpass_up_fwd_kernel(
    C,      # [M, R] conv output (x dtype), contiguous
    WU,     # [D, R] up weight
    BU,     # [D]    up bias, added when has_bias
    BASE,   # [M, D] added when has_base
    SEED,   # [1]    int64, read when use_dropout
    OUT,    # [M, D]
    M, D, R, p, inv_keep, scale, has_bias, has_base, use_dropout,
    n_split,  # output columns per program along grid axis 1 (a multiple of BLOCK_N)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    PREC: tl.constexpr,  # tl.dot input_precision for fp32 ("ieee" | "tf32", `dot_precision`)
):
    # grid (row blocks, column splits): each split writes its own output columns
    _, rows64, rmask, rk, kmask = row_rank_tile(M, R, BLOCK_M, R_PAD)
    pid_n = tl.program_id(1)
    c = tl.load(C + rows64[:, None] * R + rk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    h = _quick_gelu(c.to(tl.float32))
    if use_dropout:
        h = h * keep_scale(SEED, rows64, rk, R, p, inv_keep)
    h = h.to(C.dtype.element_ty)
    n_end = tl.minimum(D, (pid_n + 1) * n_split)
    for n0 in range(pid_n * n_split, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_end
        wut = tl.load(WU + cols[None, :] * R + rk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        o = tl.dot(h, wut, input_precision=PREC)
        if has_bias:
            o += tl.load(BU + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        o = o * scale
        m2 = rmask[:, None] & cmask[None, :]
        offs = rows64[:, None] * D + cols[None, :]
        if has_base:
            o += tl.load(BASE + offs, mask=m2, other=0.0).to(tl.float32)
        tl.store(OUT + offs, o.to(OUT.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["M", "R", "p", "inv_keep", "scale", "use_dropout", "k_split", "S"])
def _convpass_up_bwd_kernel(
    G,      # [M, D] grad of out (x dtype), contiguous
    C,      # [M, R] saved conv output
    WU,     # [D, R]
    SEED,   # [1] int64
    DC,     # [M, R] out: grad of c (x dtype)
    H,      # [M, R] out: drop(QuickGELU(c)) (x dtype), for dW_u
    PS,     # [S, M, R_PAD] fp32 scratch: per-split partial g @ W_u (read when S > 1)
    LOCK,   # [>= row blocks] int32 arrival counters, zero (left zero)
    M, D, R, p, inv_keep, scale, use_dropout,
    k_split, S,  # columns of D per split (a multiple of BLOCK_N) and splits (grid axis 1)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, PREC: tl.constexpr,
):
    # grid (row blocks, K splits): as kernels/lowrank.py's down kernel, the D reduction of dh is
    # split when rows are few; the last split of a row block sums the partials and writes DC, H
    pid, rows64, rmask, rk, kmask = row_rank_tile(M, R, BLOCK_M, R_PAD)
    pid_k = tl.program_id(1)
    dh = rank_down_t_range(G, WU, rows64, rmask, rk, kmask, D, pid_k * k_split,
                           tl.minimum(D, (pid_k + 1) * k_split), R, BLOCK_M, BLOCK_N, R_PAD, PREC)
    dh, last = finish_row_splits(dh, PS, LOCK, pid, pid_k, S, M, rows64, rmask, rk, R_PAD)
    if last:
        _convpass_up_bwd_epilogue(dh, C, SEED, DC, H, rows64, rmask, rk, kmask, R, p, inv_keep, scale,
                                  use_dropout)


@triton.jit
def _convpass_up_bwd_epilogue(dh, C, SEED, DC, H, rows64, rmask, rk, kmask, R, p, inv_keep, scale, use_dropout):
    rkmask = rmask[:, None] & kmask[None, :]
    offs = rows64[:, None] * R + rk[None, :]
    c = tl.load(C + offs, mask=rkmask, other=0.0).to(tl.float32)
    h = _quick_gelu(c)
    dact = _quick_gelu_grad(c)
    if use_dropout:
        keep = keep_scale(SEED, rows64, rk, R, p, inv_keep)
        h = h * keep
        dact = dact * keep
    tl.store(DC + offs, (scale * dh * dact).to(DC.dtype.element_ty), mask=rkmask)
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=rkmask)


@triton.jit(do_not_specialize=["M", "R", "n_split"])
def _convpass_down_bwd_kernel(
    GU,     # [M, R] grad of u = QuickGELU(a) (x dtype), contiguous
    A,      # [M, R] fp32 saved pre-activation
    WD,     # [R, D] down weight
    DA,     # [M, R] out: grad of a (x dtype), for dW_d / db_d
    DX,     # [M, D] out: grad of the bypass input
    M, D, R,
    n_split,  # dx columns per program along grid axis 1 (a multiple of BLOCK_N)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, PREC: tl.constexpr,
):
    # grid (row blocks, dx column splits): split 0 also writes da
    _, rows64, rmask, rk, kmask = row_rank_tile(M, R, BLOCK_M, R_PAD)
    pid_n = tl.program_id(1)
    rkmask = rmask[:, None] & kmask[None, :]
    offs = rows64[:, None] * R + rk[None, :]
    gu = tl.load(GU + offs, mask=rkmask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=rkmask, other=0.0)
    da = (gu * _quick_gelu_grad(a)).to(DA.dtype.element_ty)
    if pid_n == 0:
        tl.store(DA + offs, da, mask=rkmask)
    rank_up_store(DX, da, WD, rows64, rmask, rk, kmask, D, pid_n * n_split, tl.minimum(D, (pid_n + 1) * n_split),
                  BLOCK_N, PREC)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _validate_down(x, w_down, b_down):
    op = "convpass_down"
    check_tensor(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., D] with D > 0, got x {describe(x)}")
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


# ----------------------------------------------------------------------------------------------
# Launchers (Triton path)
# ----------------------------------------------------------------------------------------------
def _config(kernel: str, d: int, t: torch.Tensor):
    """(padded bypass width, Cfg) that `kernel` launches with for bypass width d and t's dtype."""
    dp = r_pad_of(d)
    return dp, CONFIGS[kernel][(dp, t.element_size())]


def convpass_down_fwd(x, w_down, b_down):
    """(u [..., d] x dtype, a [M, d] fp32)."""
    _validate_down(x, w_down, b_down)
    return _down_fwd_launch(x, w_down, b_down)


def _down_fwd_launch(x, w_down, b_down):
    x2 = rows_of(x)
    d = w_down.shape[0]
    wd = w_down.contiguous()
    u, a = launch_down(x2, wd, wd.shape[1], 1, d, bias=b_down.contiguous() if b_down is not None else None,
                       act=ACT_QUICK_GELU, save_pre=True)
    return u.view(*x.shape[:-1], d), a


def convpass_down_bwd(grad_u, x, a, w_down):
    """(dx like x, dw_down [d, D], db_down [d]) in x's dtype."""
    d = w_down.shape[0]
    m = x.numel() // x.shape[-1]
    if grad_u.numel() != m * d or grad_u.shape[-1] != d or a.shape != (m, d):
        raise ValueError(f"convpass_down_backward: grad_u {describe(grad_u)} / a {describe(a)} do not match "
                         f"x {describe(x)} and w_down {describe(w_down)}")
    return _down_bwd_launch(grad_u, x, a, w_down)


def _down_bwd_launch(grad_u, x, a, w_down):
    x2 = rows_of(x)
    gu = rows_of(grad_u)
    m, D = x2.shape
    d = w_down.shape[0]
    dev, dt = x.device, x.dtype
    dx = torch.empty((m, D), dtype=dt, device=dev)
    da = torch.empty((m, d), dtype=dt, device=dev)
    if m:
        dp, c = _config("convpass_down_bwd", d, x)
        rb = cdiv(m, c.BLOCK_M)
        n_split, splits = column_splits(D, c.BLOCK_N, rb, dev)
        _convpass_down_bwd_kernel[(rb, splits)](
            gu, a, w_down.contiguous(), da, dx, m, D, d, n_split,
            BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, R_PAD=dp, PREC=dot_precision(dt, dev), num_warps=c.num_warps,
            num_stages=c.num_stages)
    # dW_d = da^T x on the vendor BLAS; db_d = colsum(da) accumulated in fp32
    return dx.view(x.shape), torch.mm(da.t(), x2), da.sum(0, dtype=torch.float32).to(dt)


def convpass_up_fwd(c, w_up, b_up, base, scale: float, p: float, seed):
    _validate_up(c, w_up, b_up, base, p, seed)
    return _up_fwd_launch(c, w_up, b_up, base, scale, p, seed)


def _up_fwd_launch(c, w_up, b_up, base, scale: float, p: float, seed):
    c2 = rows_of(c)
    m, d = c2.shape
    D = w_up.shape[0]
    dev = c.device
    out = torch.empty((m, D), dtype=c.dtype, device=dev)
    if m:
        dp, cf = _config("convpass_up_fwd", d, c)
        unused = dummy(dev, c.dtype)
        rb = cdiv(m, cf.BLOCK_M)
        n_split, splits = column_splits(D, cf.BLOCK_N, rb, dev)
        _convpass_up_fwd_kernel[(rb, splits)](
            c2, w_up.contiguous(), b_up.contiguous() if b_up is not None else unused,
            rows_of(base) if base is not None else unused, seed_or_zero(seed, p, dev), out,
            m, D, d, float(p), inv_keep(p), float(scale), int(b_up is not None), int(base is not None),
            int(p > 0.0), n_split, BLOCK_M=cf.BLOCK_M, BLOCK_N=cf.BLOCK_N, R_PAD=dp, PREC=dot_precision(c.dtype, dev),
            num_warps=cf.num_warps, num_stages=cf.num_stages)
    return out.view(*c.shape[:-1], D)


def convpass_up_bwd(grad_out, c, w_up, scale: float, p: float, seed):
    """(dc like c, dw_up [D, d], db_up [D]) in c's dtype."""
    D = w_up.shape[0]
    m = c.numel() // c.shape[-1]
    if grad_out.numel() != m * D or grad_out.shape[-1] != D:
        raise ValueError(f"convpass_up_backward: grad_out {describe(grad_out)} does not match c {describe(c)}, "
                         f"w_up {describe(w_up)}")
    return _up_bwd_launch(grad_out, c, w_up, scale, p, seed)


def _up_bwd_launch(grad_out, c, w_up, scale: float, p: float, seed):
    c2 = rows_of(c)
    m, d = c2.shape
    D = w_up.shape[0]
    g2 = rows_of(grad_out)
    dev, dt = c.device, c.dtype
    dc = torch.empty((m, d), dtype=dt, device=dev)
    h = torch.empty((m, d), dtype=dt, device=dev)
    if m:
        dp, cf = _config("convpass_up_bwd", d, c)
        rb = cdiv(m, cf.BLOCK_M)
        k_split, splits = column_splits(D, cf.BLOCK_N, rb, dev)  # (splits of the reduction here)
        ps, lock = split_workspace(dev, splits * m * dp, rb) if splits > 1 else (dummy(dev), dummy(dev))
        _convpass_up_bwd_kernel[(rb, splits)](
            g2, c2, w_up.contiguous(), seed_or_zero(seed, p, dev), dc, h, ps, lock,
            m, D, d, float(p), inv_keep(p), float(scale), int(p > 0.0), k_split, splits,
            BLOCK_M=cf.BLOCK_M, BLOCK_N=cf.BLOCK_N, R_PAD=dp, PREC=dot_precision(dt, dev), num_warps=cf.num_warps,
            num_stages=cf.num_stages)
    # dW_u = s g^T h on the vendor BLAS (contiguous, as the registered fake promises); db_u = s colsum(g)
    dwu = torch.mm(g2.t(), h)
    dbu = g2.sum(0, dtype=torch.float32)
    if scale != 1.0:
        dwu.mul_(scale)
        dbu.mul_(scale)
    return dc.view(c.shape), dwu, dbu.to(dt)


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
    return (_down_fwd_launch if _triton_ok(x, w_down.shape[0]) else _convpass_down_fwd_torch)(x, w_down, b_down)


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
    fn = _up_fwd_launch if _triton_ok(c, c.shape[-1]) else _convpass_up_fwd_torch
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
        u, a = (_down_fwd_launch if triton_path else _convpass_down_fwd_torch)(x, w_down, b_down)
        ctx.save_for_backward(x, a, w_down)
        ctx.triton_path = triton_path
        return u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_u):
        x, a, w_down = ctx.saved_tensors
        fn = _down_bwd_launch if ctx.triton_path else _convpass_down_bwd_torch
        dx, dw, db = fn(grad_u.contiguous(), x, a, w_down)
        need = ctx.needs_input_grad
        return dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None


class _UpFunction(torch.autograd.Function):
    """The eager path of `fastpeft::convpass_up` (saves c and the seed), as `_DownFunction`."""

    @staticmethod
    def forward(ctx, c, w_up, b_up, base, scale, p, seed, triton_path):
        fn = _up_fwd_launch if triton_path else _convpass_up_fwd_torch
        out = fn(c, w_up, b_up, base, scale, p, seed)
        ctx.save_for_backward(c, w_up, seed)
        ctx.args = (scale, p, base is not None, triton_path)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        c, w_up, seed = ctx.saved_tensors
        scale, p, has_base, triton_path = ctx.args
        fn = _up_bwd_launch if triton_path else _convpass_up_bwd_torch
        dc, dw, db = fn(grad_out.contiguous(), c, w_up, scale, p, seed)
        need = ctx.needs_input_grad
        return (dc if need[0] else None, dw if need[1] else None, db if need[2] else None,
                grad_out if has_base and need[3] else None, None, None, None, None)


def _conv_tokens_backward(dc, u, conv_w, grid, num_prefix, has_bias):
    """(du, dconv_w, dconv_b or None) of `conv_tokens` for the gradient dc [B, N, d] of its output:
    one convolution backward over the patch grid, plus the prefix rows' centre-tap GEMMs."""
    B, N, d = u.shape
    gh, gw = grid
    P = num_prefix
    dpatch = dc[:, P:].reshape(B, gh, gw, d).permute(0, 3, 1, 2)
    upatch = u[:, P:].reshape(B, gh, gw, d).permute(0, 3, 1, 2)
    gin, dw, db = torch.ops.aten.convolution_backward(
        dpatch, upatch, conv_w, [d] if has_bias else None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [True, True, has_bias])
    gin = gin.permute(0, 2, 3, 1).reshape(B, gh * gw, d)
    if not P:
        return gin, dw, db
    dpre = dc[:, :P].reshape(B * P, d)
    du = torch.cat([(dpre @ conv_w[:, :, 1, 1]).view(B, P, d), gin], 1)
    dw[:, :, 1, 1] += dpre.t() @ u[:, :P].reshape(B * P, d)
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
    def forward(ctx, h, w_down, b_down, conv_w, conv_b, w_up, b_up, base, grid, num_prefix, scale, p, seed,
                down_triton, up_triton):
        u, a = (_down_fwd_launch if down_triton else _convpass_down_fwd_torch)(h, w_down, b_down)
        c = conv_tokens(u, conv_w, conv_b, grid, num_prefix).contiguous()
        out = (_up_fwd_launch if up_triton else _convpass_up_fwd_torch)(c, w_up, b_up, base, scale, p, seed)
        ctx.save_for_backward(h, a, w_down, u, conv_w, c, w_up, seed)
        ctx.args = (grid, num_prefix, scale, p, base is not None, conv_b is not None, down_triton, up_triton)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        h, a, w_down, u, conv_w, c, w_up, seed = ctx.saved_tensors
        grid, num_prefix, scale, p, has_base, has_cb, down_triton, up_triton = ctx.args
        need = ctx.needs_input_grad
        g = grad_out.contiguous()
        dc, dw_up, db_up = (_up_bwd_launch if up_triton else _convpass_up_bwd_torch)(g, c, w_up, scale, p, seed)
        du, dconv_w, dconv_b = _conv_tokens_backward(dc, u, conv_w, grid, num_prefix, has_cb)
        dh, dw_down, db_down = (_down_bwd_launch if down_triton else _convpass_down_bwd_torch)(du, h, a, w_down)
        return (dh if need[0] else None, dw_down if need[1] else None, db_down if need[2] else None,
                dconv_w if need[3] else None, dconv_b if need[4] else None, dw_up if need[5] else None,
                db_up if need[6] else None, g if has_base and need[7] else None,
                None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Functional and reference
# ----------------------------------------------------------------------------------------------


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
        d = w_down.shape[0]
        return _ConvpassFunction.apply(h, w_down, b_down, conv_w, conv_b, w_up, b_up, base, tuple(grid),
                                       num_prefix, float(scale), p, seed if p > 0 else None,
                                       _triton_ok(h, d), _triton_ok(h, d))
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


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile list (kernels/aot.py); the down projection is lowrank's down kernel.
# ----------------------------------------------------------------------------------------------
def aot_specs():
    specs = []
    for dt in AOT_DTYPES:
        P = TRITON_PTR[dt]
        for dp in DIM_PADS:
            c = CONFIGS["convpass_up_fwd"][(dp, dt.itemsize)]
            sig = {"C": P, "WU": P, "BU": P, "BASE": P, "SEED": "*i64", "OUT": P, "M": "i32", "D": "i32",
                   "R": "i32", "p": "fp32", "inv_keep": "fp32", "scale": "fp32", "has_bias": "i32",
                   "has_base": "i32", "use_dropout": "i32", "n_split": "i32"}
            specs.append(("convpass_up_fwd", _convpass_up_fwd_kernel, sig,
                          dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, R_PAD=dp, PREC="ieee"), c, str(dt)))
            c = CONFIGS["convpass_up_bwd"][(dp, dt.itemsize)]
            sig = {"G": P, "C": P, "WU": P, "SEED": "*i64", "DC": P, "H": P, "PS": "*fp32", "LOCK": "*i32",
                   "M": "i32", "D": "i32", "R": "i32", "p": "fp32", "inv_keep": "fp32", "scale": "fp32",
                   "use_dropout": "i32", "k_split": "i32", "S": "i32"}
            specs.append(("convpass_up_bwd", _convpass_up_bwd_kernel, sig,
                          dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, R_PAD=dp, PREC="ieee"), c, str(dt)))
            c = CONFIGS["convpass_down_bwd"][(dp, dt.itemsize)]
            sig = {"GU": P, "A": "*fp32", "WD": P, "DA": P, "DX": P, "M": "i32", "D": "i32", "R": "i32",
                   "n_split": "i32"}
            specs.append(("convpass_down_bwd", _convpass_down_bwd_kernel, sig,
                          dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, R_PAD=dp, PREC="ieee"), c, str(dt)))
    return with_tf32_variants(specs)
