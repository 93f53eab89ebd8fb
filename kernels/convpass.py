"""Fused Convpass bypass (JieShibo/PETL-ViT `convpass/vtab/convpass.py`; `fastpeft.methods.convpass.ConvpassModule`):

    out = base + s * up(drop(QuickGELU(conv(QuickGELU(down(h))))))

h [B, N, D] is the LayerNorm'd input, laid out [prefix tokens (P), patch grid (Gh x Gw, row-major)];
the 3x3 conv (pad 1) runs on the d-channel patch grid (d = 8 officially) and every prefix token goes
through the conv's centre tap + bias (a 1x1 image with padding 1 sees only the centre tap).

Three stages, two fused ops around a plain-torch conv (the ops, functional and reference:
fastpeft/ops/convpass.py; the kernels and launchers here):

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


import torch

from ._common import (AOT_DTYPES, TRITON_PTR, cdiv, dummy, inv_keep, keep_scale, column_splits,
                      finish_row_splits, rank_down_t_range, rank_up_store, row_rank_tile, split_workspace,
                      rows_of, seed_or_zero, tl, triton, dot_precision, with_tf32_variants)
from ._common import Cfg
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
# Launchers (Triton path)
# ----------------------------------------------------------------------------------------------
def _config(kernel: str, d: int, t: torch.Tensor):
    """(padded bypass width, Cfg) that `kernel` launches with for bypass width d and t's dtype."""
    dp = r_pad_of(d)
    return dp, CONFIGS[kernel][(dp, t.element_size())]


_PLANS: dict = {}


def _plan(kernel: str, d: int, t: torch.Tensor, m: int, width: int):
    """`_config` plus the grid of a launch over m rows whose other loop runs over `width` columns:
    (padded width, Cfg, row blocks, columns per split, splits); kept per launch shape (a few
    entries per model: looked up instead of recomputed on every launch)."""
    key = (kernel, d, t.dtype, m, width, t.device)
    plan = _PLANS.get(key)
    if plan is None:
        dp, c = _config(kernel, d, t)
        rb = cdiv(m, c.BLOCK_M)
        per_split, splits = column_splits(width, c.BLOCK_N, rb, t.device)
        if len(_PLANS) >= 1024:
            _PLANS.clear()
        plan = _PLANS[key] = (dp, c, rb, per_split, splits)
    return plan


def launch_down_fwd(x, w_down, b_down):
    x2 = rows_of(x)
    d = w_down.shape[0]
    wd = w_down.contiguous()
    u, a = launch_down(x2, wd, wd.shape[1], 1, d, bias=b_down.contiguous() if b_down is not None else None,
                       act=ACT_QUICK_GELU, save_pre=True)
    return u.view(*x.shape[:-1], d), a


def launch_down_bwd(grad_u, x, a, w_down):
    x2 = rows_of(x)
    gu = rows_of(grad_u)
    m, D = x2.shape
    d = w_down.shape[0]
    dev, dt = x.device, x.dtype
    dx = torch.empty((m, D), dtype=dt, device=dev)
    da = torch.empty((m, d), dtype=dt, device=dev)
    if m:
        dp, c, rb, n_split, splits = _plan("convpass_down_bwd", d, x, m, D)
        _convpass_down_bwd_kernel[(rb, splits)](
            gu, a, w_down.contiguous(), da, dx, m, D, d, n_split,
            BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, R_PAD=dp, PREC=dot_precision(dt, dev), num_warps=c.num_warps,
            num_stages=c.num_stages)
    # dW_d = da^T x on the vendor BLAS; db_d = colsum(da) accumulated in fp32
    return dx.view(x.shape), torch.mm(da.t(), x2), da.sum(0, dtype=torch.float32).to(dt)


def launch_up_fwd(c, w_up, b_up, base, scale: float, p: float, seed):
    c2 = rows_of(c)
    m, d = c2.shape
    D = w_up.shape[0]
    dev = c.device
    out = torch.empty((m, D), dtype=c.dtype, device=dev)
    if m:
        dp, cf, rb, n_split, splits = _plan("convpass_up_fwd", d, c, m, D)
        unused = dummy(dev, c.dtype)
        _convpass_up_fwd_kernel[(rb, splits)](
            c2, w_up.contiguous(), b_up.contiguous() if b_up is not None else unused,
            rows_of(base) if base is not None else unused, seed_or_zero(seed, p, dev), out,
            m, D, d, float(p), inv_keep(p), float(scale), int(b_up is not None), int(base is not None),
            int(p > 0.0), n_split, BLOCK_M=cf.BLOCK_M, BLOCK_N=cf.BLOCK_N, R_PAD=dp, PREC=dot_precision(c.dtype, dev),
            num_warps=cf.num_warps, num_stages=cf.num_stages)
    return out.view(*c.shape[:-1], D)


def launch_up_bwd(grad_out, c, w_up, scale: float, p: float, seed):
    c2 = rows_of(c)
    m, d = c2.shape
    D = w_up.shape[0]
    g2 = rows_of(grad_out)
    dev, dt = c.device, c.dtype
    dc, h = torch.empty((2, m, d), dtype=dt, device=dev)  # (one allocation for both [m, d] outputs)
    if m:
        dp, cf, rb, k_split, splits = _plan("convpass_up_bwd", d, c, m, D)  # (splits of the reduction here)
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
# Functional and reference
# ----------------------------------------------------------------------------------------------


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
