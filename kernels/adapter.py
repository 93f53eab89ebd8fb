"""Fused bottleneck adapter: out = base + s * (up(drop(act(down(x) + b_d))) + b_u) (+ residual).

One kernel family covers (the official code each method cites: fastpeft/methods/adaptformer.py, adapter.py):
  * AdaptFormer parallel:   x = y (residual stream), base = the FFN branch, residual = y
  * AdaptFormer sequential: x = base = f (drop-pathed FFN output)
  * NOAH / Pfeiffer serial: x = base = h, s = 1, act = quick_gelu
The rank-r intermediate never touches memory in the forward; training saves only x (an input,
already alive) and the rank-r pre-activation a = down(x) + b_d in fp32 ([M, r], r <= 128: at
r = 64 that is 1/6 of an fp16 x). The dropout mask is never stored: it is regenerated from a
saved int64 seed with Philox (tl.rand(seed, row * r + col)); `dropout_keep_mask` reproduces it
bit-exactly in plain torch for the reference path and the tests.

Kernels and launchers (the op, functional and reference: fastpeft/ops/adapter.py):
  _adapter_fwd_kernel / _adapter_bwd_kernel / _adapter_bwd_dw_kernel   Triton kernels
  launch_fwd / launch_bwd                                              launchers
  _adapter_rows_*_kernel, launch_rows_fwd / launch_rows_bwd            per-row forms (below)

Backward (deterministic: no atomics):
  _adapter_bwd_kernel     one program per BLOCK_M rows: dh = g @ W_u (loop over D), da =
                          s * dh * mask/(1-p) * act'(a), dx = da @ W_d (loop over D); writes dx,
                          h and da ([M, r], x dtype), per-program partials of db_d and of
                          sum(h * dh) (for a learnable s).
  _adapter_bwd_dw_kernel  grid (D / BLOCK_N, S row-splits): dW_u = g^T h, dW_d = da^T x,
                          colsum(g) accumulated in fp32 registers, written as [S, ...] partials.
  _adapter_bwd_finish_kernel sums the partials in a fixed order (deterministic), applies s.

Per-row kernels (a mixed multi-task batch: B images of L rows, image b with its own task's
adapter; fastpeft/ops/adapter.py `adapter_rows`): `_adapter_rows_{fwd,bwd,dw,finish}_kernel`
run the same tile functions (`_fwd_tile`, `_bwd_tile`, `_dw_partials`, `_finish`) as the
single-task kernels, which stay as they were. The row grid is image-major (B * row blocks per
image, a block never straddles two images), so each program offsets its weights by its image
(stride: the weight's size per image, 0 for a shared one); the weight-gradient partials and
their finish get an image axis (each image's sums over its own rows only). Dropout masks are the
single-task kernels' for the same seed and row numbers. Launches: 1 forward, 3 backward, for
the whole batch whatever its mix of tasks (`launch_rows_fwd` / `launch_rows_bwd`).
"""
from __future__ import annotations

import torch

from ._common import Cfg, keep_scale, rank_down, rank_down_t, rank_up_store, row_rank_tile, tl, triton
from ._common import (AOT_DTYPES, TRITON_PTR, cdiv, dummy, inv_keep, next_pow2, column_splits, row_splits,
                      rows_of, seed_or_zero, zeros_const, dot_precision, with_tf32_variants)

ACTS = {"relu": 0, "gelu": 1, "quick_gelu": 2}
MAX_RANK = 128


# ----------------------------------------------------------------------------------------------
# Configurations: the single source of truth for the launchers and kernels/aot.py.
# Keyed by R_PAD (the rank padded to a power of two >= 16: tl.dot needs every dim >= 16 on
# sm_80/sm_90). Widths (D) are runtime loop bounds, so they do not multiply the configs.
# ----------------------------------------------------------------------------------------------
R_PADS = (16, 32, 64, 128)
# "lp" = fp16/bf16 (tensor-core tl.dot); "fp32" = tl.dot with input_precision="ieee" (exact fp32
# FMA, like torch's fp32 matmul without TF32), which keeps whole tiles in registers: smaller
# tiles. Every entry below compiles for sm_80/sm_90 with no spills (kernels/aot.py); the first
# choices (64-row tiles for fp32 at r >= 32, 128-wide dW tiles at r = 128) spilled.
_LP16 = Cfg(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=2)
CONFIGS: dict[str, dict[tuple[int, str], Cfg]] = {
    # rows x (D chunk) tiles; acc [BLOCK_M, R_PAD] fp32 stays in registers.
    "adapter_fwd": {
        # (64, "lp") at 4 warps spilled on sm_80 once the output columns were split (STACK 24)
        (16, "lp"): _LP16, (32, "lp"): _LP16,
        (64, "lp"): Cfg(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, num_warps=8, num_stages=2),
        (128, "lp"): Cfg(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, num_warps=8, num_stages=2),
        (16, "fp32"): Cfg(BLOCK_M=32, BLOCK_K=32, BLOCK_N=64, num_warps=4, num_stages=2),
        (32, "fp32"): Cfg(BLOCK_M=32, BLOCK_K=32, BLOCK_N=64, num_warps=4, num_stages=2),
        (64, "fp32"): Cfg(BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, num_warps=4, num_stages=2),
        (128, "fp32"): Cfg(BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, num_warps=8, num_stages=2),
    },
    "adapter_bwd": {
        (16, "lp"): _LP16, (32, "lp"): _LP16, (64, "lp"): _LP16,
        (128, "lp"): Cfg(BLOCK_M=32, BLOCK_K=64, BLOCK_N=64, num_warps=8, num_stages=2),
        (16, "fp32"): Cfg(BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, num_warps=4, num_stages=2),
        (32, "fp32"): Cfg(BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, num_warps=4, num_stages=2),
        (64, "fp32"): Cfg(BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, num_warps=4, num_stages=2),
        (128, "fp32"): Cfg(BLOCK_M=16, BLOCK_K=32, BLOCK_N=32, num_warps=8, num_stages=2),
    },
    # (D chunk) x R_PAD and R_PAD x (D chunk) fp32 accumulators in registers.
    "adapter_bwd_dw": {
        (16, "lp"): Cfg(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=2),
        (32, "lp"): Cfg(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=2),
        (64, "lp"): Cfg(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
        (128, "lp"): Cfg(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),
        (16, "fp32"): Cfg(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
        (32, "fp32"): Cfg(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
        (64, "fp32"): Cfg(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
        (128, "fp32"): Cfg(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2),
    },
}

# The per-row kernels (a mixed multi-task batch): the single-task tiles, except where the image's
# weight offsets (int64, one more live pointer per weight) made the single-task choice spill
# (kernels/aot.py): 8 warps there.
_W8 = Cfg(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, num_warps=8, num_stages=2)
CONFIGS["adapter_rows_fwd"] = {**CONFIGS["adapter_fwd"], (16, "lp"): _W8, (32, "lp"): _W8}
CONFIGS["adapter_rows_bwd"] = {**CONFIGS["adapter_bwd"], (64, "lp"): _W8}
CONFIGS["adapter_rows_dw"] = {**CONFIGS["adapter_bwd_dw"],
                              (64, "fp32"): Cfg(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2)}


def config(kernel: str, rank: int, dtype: torch.dtype) -> tuple[int, Cfg]:
    """(R_PAD, Cfg) the launcher uses for `kernel` at this rank and dtype."""
    rp = r_pad_of(rank)
    return rp, CONFIGS[kernel][(rp, "fp32" if dtype == torch.float32 else "lp")]


def r_pad_of(rank: int) -> int:
    return max(16, next_pow2(rank))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _act_fwd(a, act):
    """act: 0 relu, 1 gelu (erf), 2 quick_gelu (a * sigmoid(1.702 a)). Maps 0 to 0 (exact padding)."""
    if act == 0:
        h = tl.maximum(a, 0.0)
    elif act == 1:
        h = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    else:
        h = a * tl.sigmoid(1.702 * a)
    return h


@triton.jit
def _act_bwd(a, act):
    """d act / d a."""
    if act == 0:
        d = tl.where(a > 0.0, 1.0, 0.0)
    elif act == 1:
        d = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476)) + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)
    else:
        sg = tl.sigmoid(1.702 * a)
        d = sg + 1.702 * a * sg * (1.0 - sg)
    return d


@triton.jit
def _fwd_tile(X, WD, BD, WU, BU, BASE, RES, SCALE_T, SEED, OUT, A, rows64, rmask, rk, kmask, pid_n,
              D, R, act, p, inv_keep, scale, use_scale_t, has_base, has_res, save_a, use_dropout, n_split,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
              PREC: tl.constexpr):
    """The forward of one program's BLOCK_M rows (rows64 / rmask; X, BASE, RES, OUT, A indexed by
    row) and its split `pid_n` of the output columns, with the weights WD, BD, WU, BU, SCALE_T
    given (one task's: the single-task kernel's, or a row block's image's in the per-row kernel)."""
    # a = x @ W_d^T + b_d, accumulated over D in fp32; padded rank columns stay exactly 0.
    acc = rank_down(X, WD, D, 1, rows64, rmask, rk, kmask, D, SEED, p, inv_keep, False, BLOCK_M, BLOCK_K, R_PAD,
                    PREC)
    bd = tl.load(BD + rk, mask=kmask, other=0.0).to(tl.float32)
    a = acc + bd[None, :]
    if save_a:
        if pid_n == 0:
            tl.store(A + rows64[:, None] * R + rk[None, :], a, mask=rmask[:, None] & kmask[None, :])

    h = _act_fwd(a, act)
    if use_dropout:
        h = h * keep_scale(SEED, rows64, rk, R, p, inv_keep)
    h = h.to(X.dtype.element_ty)

    s = scale
    if use_scale_t:
        s = s * tl.load(SCALE_T).to(tl.float32)

    # out = base + s * (h @ W_u^T + b_u) + residual, one D chunk of this split at a time.
    n_end = tl.minimum(D, (pid_n + 1) * n_split)
    for n0 in range(pid_n * n_split, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_end
        wuT = tl.load(WU + cols[None, :] * R + rk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        u = tl.dot(h, wuT, input_precision=PREC)
        bu = tl.load(BU + cols, mask=cmask, other=0.0).to(tl.float32)
        o = s * (u + bu[None, :])
        m2 = rmask[:, None] & cmask[None, :]
        offs = rows64[:, None] * D + cols[None, :]
        if has_base:
            o += tl.load(BASE + offs, mask=m2, other=0.0).to(tl.float32)
        if has_res:
            o += tl.load(RES + offs, mask=m2, other=0.0).to(tl.float32)
        tl.store(OUT + offs, o.to(OUT.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["R", "act", "p", "inv_keep", "scale", "use_scale_t", "has_base",
                               "has_res", "save_a", "use_dropout", "n_split"])
def _adapter_fwd_kernel(
    X,        # [M, D] input of the down projection (x dtype), contiguous
    WD,       # [R, D] down weight (x dtype)
    BD,       # [R]    down bias (zeros when the module has none)
    WU,       # [D, R] up weight
    BU,       # [D]    up bias
    BASE,     # [M, D] added to the output when has_base (else any valid pointer)
    RES,      # [M, D] residual, added when has_res
    SCALE_T,  # [1]    learnable scale (fp32), used when use_scale_t
    SEED,     # [1]    int64 dropout seed, read when use_dropout
    OUT,      # [M, D] output (x dtype)
    A,        # [M, R] fp32 pre-activation, written when save_a
    M, D, R, act, p, inv_keep, scale, use_scale_t, has_base, has_res, save_a, use_dropout,
    n_split,  # output columns per program along grid axis 1 (a multiple of BLOCK_N)
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    PREC: tl.constexpr,  # tl.dot input_precision for fp32 ("ieee" | "tf32", `dot_precision`)
):
    # grid (row blocks, column splits): when rows are few, the output width is split over
    # programs so the grid fills the GPU; each split recomputes the (rank-r, cheap) down
    # projection of its rows and writes its own columns; split 0 saves the pre-activation.
    _, rows64, rmask, rk, kmask = row_rank_tile(M, R, BLOCK_M, R_PAD)
    _fwd_tile(X, WD, BD, WU, BU, BASE, RES, SCALE_T, SEED, OUT, A, rows64, rmask, rk, kmask, tl.program_id(1),
              D, R, act, p, inv_keep, scale, use_scale_t, has_base, has_res, save_a, use_dropout, n_split,
              BLOCK_M, BLOCK_K, BLOCK_N, R_PAD, PREC)


@triton.jit
def _image_rows(L, NBLK, BLOCK_M: tl.constexpr):
    """A per-row kernel's program on grid axis 0 = image * NBLK + row block of that image (NBLK
    blocks of BLOCK_M rows per image of L rows; a block never straddles two images):
    (image as int64, rows64 (global row numbers), rmask)."""
    pid = tl.program_id(0)
    img = pid // NBLK
    local = (pid - img * NBLK) * BLOCK_M + tl.arange(0, BLOCK_M)
    img64 = img.to(tl.int64)
    return img64, img64 * L + local.to(tl.int64), local < L


@triton.jit(do_not_specialize=["L", "NBLK", "R", "act", "p", "inv_keep", "scale", "use_scale_t", "has_base",
                               "has_res", "save_a", "use_dropout", "n_split", "s_wd", "s_bd", "s_wu", "s_bu",
                               "s_st"])
def _adapter_rows_fwd_kernel(
    X,        # [B L, D] input of the down projection (x dtype): B images of L rows, contiguous
    WD,       # image i's [R, D] down weight at WD + i * s_wd (s_wd = R D per image, 0 shared)
    BD,       # image i's [R] down bias at BD + i * s_bd
    WU,       # image i's [D, R] up weight at WU + i * s_wu
    BU,       # image i's [D] up bias at BU + i * s_bu
    BASE,     # [B L, D] added to the output when has_base
    RES,      # [B L, D] residual, added when has_res
    SCALE_T,  # image i's learnable scale (fp32) at SCALE_T + i * s_st, used when use_scale_t
    SEED,     # [1] int64 dropout seed: the mask of row m is the single-task kernel's (global rows)
    OUT,      # [B L, D] output (x dtype)
    A,        # [B L, R] fp32 pre-activation, written when save_a
    L, NBLK, D, R, act, p, inv_keep, scale, use_scale_t, has_base, has_res, save_a, use_dropout, n_split,
    s_wd, s_bd, s_wu, s_bu, s_st,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    PREC: tl.constexpr,
):
    # grid (B * NBLK row blocks, column splits): `_adapter_fwd_kernel` with each row block's
    # weights its image's (a mixed multi-task batch: every image its own task's adapter).
    img, rows64, rmask = _image_rows(L, NBLK, BLOCK_M)
    rk = tl.arange(0, R_PAD)
    kmask = rk < R
    _fwd_tile(X, WD + img * s_wd, BD + img * s_bd, WU + img * s_wu, BU + img * s_bu, BASE, RES,
              SCALE_T + img * s_st, SEED, OUT, A, rows64, rmask, rk, kmask, tl.program_id(1),
              D, R, act, p, inv_keep, scale, use_scale_t, has_base, has_res, save_a, use_dropout, n_split,
              BLOCK_M, BLOCK_K, BLOCK_N, R_PAD, PREC)


@triton.jit
def _bwd_tile(G, A, WD, WU, SCALE_T, SEED, DX, H, DA, PBD, PDS, pid, rows64, rmask, rk, kmask, pid_n,
              D, R, act, p, inv_keep, scale, use_scale_t, use_dropout, n_split,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
              PREC: tl.constexpr):
    """The backward rows of one program (rows64 / rmask) and its split `pid_n` of the dx columns,
    with the weights WD, WU, SCALE_T given; the partial sums go to PBD / PDS at index `pid`."""
    rkmask = rmask[:, None] & kmask[None, :]

    # dh = g @ W_u (unscaled), over D.
    dh = rank_down_t(G, WU, rows64, rmask, rk, kmask, D, R, BLOCK_M, BLOCK_N, R_PAD, PREC)

    a = tl.load(A + rows64[:, None] * R + rk[None, :], mask=rkmask, other=0.0)
    h = _act_fwd(a, act)
    dact = _act_bwd(a, act)
    if use_dropout:
        keep = keep_scale(SEED, rows64, rk, R, p, inv_keep)
        h = h * keep
        dact = dact * keep
    s = scale
    if use_scale_t:
        s = s * tl.load(SCALE_T).to(tl.float32)
    da = s * dh * dact
    da_lo = da.to(DA.dtype.element_ty)
    if pid_n == 0:
        tl.store(PDS + pid, tl.sum(tl.sum(h * dh, axis=1), axis=0))
        tl.store(PBD + pid * R_PAD + rk, tl.sum(da, axis=0))
        tl.store(H + rows64[:, None] * R + rk[None, :], h.to(H.dtype.element_ty), mask=rkmask)
        tl.store(DA + rows64[:, None] * R + rk[None, :], da_lo, mask=rkmask)

    # dx = da @ W_d, over this split's columns.
    rank_up_store(DX, da_lo, WD, rows64, rmask, rk, kmask, D, pid_n * n_split,
                  tl.minimum(D, (pid_n + 1) * n_split), BLOCK_K, PREC)


@triton.jit(do_not_specialize=["R", "act", "p", "inv_keep", "scale", "use_scale_t", "use_dropout", "n_split"])
def _adapter_bwd_kernel(
    G,        # [M, D] grad of out (x dtype)
    A,        # [M, R] fp32 saved pre-activation
    WD,       # [R, D]
    WU,       # [D, R]
    SCALE_T,  # [1] fp32 learnable scale, read when use_scale_t
    SEED,     # [1] int64
    DX,       # [M, D] out: grad of x
    H,        # [M, R] out: h = drop(act(a)) (x dtype), for dW_u
    DA,       # [M, R] out: grad of a (x dtype), for dW_d
    PBD,      # [P, R_PAD] fp32 out: per-program partial colsum(da) (grad of b_d)
    PDS,      # [P] fp32 out: per-program partial sum(h * (g @ W_u)) (grad of a learnable s)
    M, D, R, act, p, inv_keep, scale, use_scale_t, use_dropout,
    n_split,  # dx columns per program along grid axis 1 (a multiple of BLOCK_K)
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    PREC: tl.constexpr,
):
    # grid (row blocks, dx column splits): as the forward, each split recomputes its rows' rank-r
    # da and writes its own dx columns; split 0 writes h, da and the partial sums.
    pid, rows64, rmask, rk, kmask = row_rank_tile(M, R, BLOCK_M, R_PAD)
    _bwd_tile(G, A, WD, WU, SCALE_T, SEED, DX, H, DA, PBD, PDS, pid, rows64, rmask, rk, kmask, tl.program_id(1),
              D, R, act, p, inv_keep, scale, use_scale_t, use_dropout, n_split,
              BLOCK_M, BLOCK_K, BLOCK_N, R_PAD, PREC)


@triton.jit(do_not_specialize=["L", "NBLK", "R", "act", "p", "inv_keep", "scale", "use_scale_t", "use_dropout",
                               "n_split", "s_wd", "s_wu", "s_st"])
def _adapter_rows_bwd_kernel(
    G,        # [B L, D] grad of out (x dtype): B images of L rows
    A,        # [B L, R] fp32 saved pre-activation
    WD,       # image i's [R, D] at WD + i * s_wd (R D per image, 0 shared)
    WU,       # image i's [D, R] at WU + i * s_wu
    SCALE_T,  # image i's fp32 learnable scale at SCALE_T + i * s_st, read when use_scale_t
    SEED,     # [1] int64
    DX,       # [B L, D] out: grad of x
    H,        # [B L, R] out: h (x dtype), for dW_u
    DA,       # [B L, R] out: grad of a (x dtype), for dW_d
    PBD,      # [B NBLK, R_PAD] fp32 out: per-program partial colsum(da), image i's at rows i NBLK..
    PDS,      # [B NBLK] fp32 out: per-program partial sum(h * (g @ W_u))
    L, NBLK, D, R, act, p, inv_keep, scale, use_scale_t, use_dropout, n_split, s_wd, s_wu, s_st,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    PREC: tl.constexpr,
):
    # grid (B * NBLK row blocks, dx column splits): `_adapter_bwd_kernel` with each row block's
    # weights its image's; the partials of image i are programs i NBLK .. i NBLK + NBLK - 1.
    img, rows64, rmask = _image_rows(L, NBLK, BLOCK_M)
    rk = tl.arange(0, R_PAD)
    kmask = rk < R
    _bwd_tile(G, A, WD + img * s_wd, WU + img * s_wu, SCALE_T + img * s_st, SEED, DX, H, DA, PBD, PDS,
              tl.program_id(0), rows64, rmask, rk, kmask, tl.program_id(1),
              D, R, act, p, inv_keep, scale, use_scale_t, use_dropout, n_split,
              BLOCK_M, BLOCK_K, BLOCK_N, R_PAD, PREC)


@triton.jit
def _dw_partials(G, X, H, DA, PWU, PWD, PBU, M, D, R, S, pid_n, pid_s,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, PREC: tl.constexpr):
    """Split `pid_s` of S (rows pid_s BLOCK_M, + S BLOCK_M, ... of M) for column block `pid_n`:
    partial g^T h, da^T x and colsum(g) stored at split pid_s of PWU / PWD / PBU."""
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    rk = tl.arange(0, R_PAD)
    kmask = rk < R
    acc_wu = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    acc_wd = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
    acc_bu = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(pid_s * BLOCK_M, M, S * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        m2 = rmask[:, None] & cmask[None, :]
        offs = rows64[:, None] * D + cols[None, :]
        g = tl.load(G + offs, mask=m2, other=0.0)
        x = tl.load(X + offs, mask=m2, other=0.0)
        rk2 = rmask[:, None] & kmask[None, :]
        h = tl.load(H + rows64[:, None] * R + rk[None, :], mask=rk2, other=0.0)
        da = tl.load(DA + rows64[:, None] * R + rk[None, :], mask=rk2, other=0.0)
        acc_wu = tl.dot(tl.trans(g), h, acc_wu, input_precision=PREC)
        acc_wd = tl.dot(tl.trans(da), x, acc_wd, input_precision=PREC)
        acc_bu += tl.sum(g.to(tl.float32), axis=0)
    base = pid_s.to(tl.int64) * D * R
    tl.store(PWU + base + cols[:, None] * R + rk[None, :], acc_wu, mask=cmask[:, None] & kmask[None, :])
    tl.store(PWD + base + rk[:, None] * D + cols[None, :], acc_wd, mask=kmask[:, None] & cmask[None, :])
    tl.store(PBU + pid_s.to(tl.int64) * D + cols, acc_bu, mask=cmask)


@triton.jit(do_not_specialize=["R", "S"])
def _adapter_bwd_dw_kernel(
    G,     # [M, D] grad of out
    X,     # [M, D] adapter input
    H,     # [M, R] h from _adapter_bwd_kernel
    DA,    # [M, R] da from _adapter_bwd_kernel
    PWU,   # [S, D, R] fp32 out: partial g^T h     (unscaled grad of W_u)
    PWD,   # [S, R, D] fp32 out: partial da^T x    (grad of W_d)
    PBU,   # [S, D]    fp32 out: partial colsum(g) (unscaled grad of b_u)
    M, D, R, S,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, PREC: tl.constexpr,
):
    _dw_partials(G, X, H, DA, PWU, PWD, PBU, M, D, R, S, tl.program_id(0), tl.program_id(1),
                 BLOCK_M, BLOCK_N, R_PAD, PREC)


@triton.jit(do_not_specialize=["L", "R", "S"])
def _adapter_rows_dw_kernel(
    G,     # [B L, D] grad of out: B images of L rows
    X,     # [B L, D] adapter input
    H,     # [B L, R] h from _adapter_rows_bwd_kernel
    DA,    # [B L, R] da from _adapter_rows_bwd_kernel
    PWU,   # [B, S, D, R] fp32 out: image i's partial g^T h over its own rows
    PWD,   # [B, S, R, D] fp32 out: image i's partial da^T x
    PBU,   # [B, S, D]    fp32 out: image i's partial colsum(g)
    L, D, R, S,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, PREC: tl.constexpr,
):
    # grid (column blocks, B * S): `_adapter_bwd_dw_kernel` over one image's L rows, its partials
    # in the image's own slice (each image's weights get the gradient of its own rows only).
    pid1 = tl.program_id(1)
    img = (pid1 // S).to(tl.int64)
    rows0 = img * L
    _dw_partials(G + rows0 * D, X + rows0 * D, H + rows0 * R, DA + rows0 * R, PWU + img * S * D * R,
                 PWD + img * S * R * D, PBU + img * S * D, L, D, R, S, tl.program_id(0), pid1 % S,
                 BLOCK_M, BLOCK_N, R_PAD, PREC)


@triton.jit
def _finish(PWU, PWD, PBU, PBD, PDS, BU, SCALE_T, DWU, DWD, DBU, DBD, DS, pid,
            D, R, S, P1, scale, use_scale_t, has_bu, want_ds, R_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Program `pid` of the finish of one weight set's partials (see `_adapter_bwd_finish_kernel`)."""
    s = scale
    if use_scale_t:
        s = s * tl.load(SCALE_T).to(tl.float32)
    n = D * R
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    acc_wu = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_wd = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, S):
        base = i * n
        acc_wu += tl.load(PWU + base + offs, mask=m, other=0.0)
        acc_wd += tl.load(PWD + base + offs, mask=m, other=0.0)
    tl.store(DWU + offs, (s * acc_wu).to(DWU.dtype.element_ty), mask=m)
    tl.store(DWD + offs, acc_wd.to(DWD.dtype.element_ty), mask=m)
    mb = offs < D
    acc_bu = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, S):
        acc_bu += tl.load(PBU + i * D + offs, mask=mb, other=0.0)
    tl.store(DBU + offs, (s * acc_bu).to(DBU.dtype.element_ty), mask=mb)
    if pid == 0:
        rk = tl.arange(0, R_PAD)
        acc_bd = tl.zeros((R_PAD,), dtype=tl.float32)
        for i in range(0, P1):
            acc_bd += tl.load(PBD + i * R_PAD + rk)
        tl.store(DBD + rk, acc_bd.to(DBD.dtype.element_ty), mask=rk < R)
        if want_ds:
            ar = tl.arange(0, BLOCK)
            tot = tl.zeros((BLOCK,), dtype=tl.float32)
            for j0 in range(0, P1, BLOCK):
                tot += tl.load(PDS + j0 + ar, mask=j0 + ar < P1, other=0.0)
            if has_bu:
                for d0 in range(0, D, BLOCK):
                    dm = d0 + ar < D
                    cs = tl.zeros((BLOCK,), dtype=tl.float32)
                    for i in range(0, S):
                        cs += tl.load(PBU + i * D + d0 + ar, mask=dm, other=0.0)
                    tot += cs * tl.load(BU + d0 + ar, mask=dm, other=0.0).to(tl.float32)
            tl.store(DS, scale * tl.sum(tot, axis=0))


@triton.jit(do_not_specialize=["D", "R", "S", "P1", "scale", "use_scale_t", "has_bu", "want_ds"])
def _adapter_bwd_finish_kernel(
    PWU, PWD, PBU,  # [S, D, R], [S, R, D], [S, D] fp32 partials of _adapter_bwd_dw_kernel
    PBD, PDS,       # [P1, R_PAD], [P1] fp32 partials of _adapter_bwd_kernel
    BU,             # [D] up bias, read when has_bu and want_ds
    SCALE_T,        # [1] learnable scale, read when use_scale_t
    DWU, DWD, DBU, DBD,  # [D, R], [R, D], [D], [R] out (x dtype)
    DS,             # [1] fp32 out: grad of the learnable scale, written when want_ds
    D, R, S, P1, scale, use_scale_t, has_bu, want_ds,
    R_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """The partial sums finished in one launch (deterministic: fixed order over S and P1) with the
    scale applied: dW_u = s sum_S PWU, dW_d = sum_S PWD, db_u = s sum_S PBU over BLOCK flat
    elements per program; program 0 also sums db_d over P1 and ds = scale (sum PDS + b_u . colsum(g))."""
    _finish(PWU, PWD, PBU, PBD, PDS, BU, SCALE_T, DWU, DWD, DBU, DBD, DS, tl.program_id(0),
            D, R, S, P1, scale, use_scale_t, has_bu, want_ds, R_PAD, BLOCK)


@triton.jit(do_not_specialize=["NPROG", "D", "R", "S", "P1", "scale", "use_scale_t", "has_bu", "want_ds",
                               "s_bu", "s_st"])
def _adapter_rows_finish_kernel(
    PWU, PWD, PBU,  # [B, S, D, R], [B, S, R, D], [B, S, D] fp32 partials of _adapter_rows_dw_kernel
    PBD, PDS,       # [B P1, R_PAD], [B P1] fp32 partials of _adapter_rows_bwd_kernel (P1 = its NBLK)
    BU,             # image i's [D] up bias at BU + i * s_bu, read when has_bu and want_ds
    SCALE_T,        # image i's learnable scale at SCALE_T + i * s_st, read when use_scale_t
    DWU, DWD, DBU, DBD,  # [B, D, R], [B, R, D], [B, D], [B, R] out (x dtype): each image's gradients
    DS,             # [B] fp32 out: each image's grad of its learnable scale, written when want_ds
    NPROG, D, R, S, P1, scale, use_scale_t, has_bu, want_ds, s_bu, s_st,
    R_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid (B * NPROG): `_adapter_bwd_finish_kernel` once per image on its own partials and weights.
    pid = tl.program_id(0)
    img = pid // NPROG
    i64 = img.to(tl.int64)
    n = D * R
    _finish(PWU + i64 * S * n, PWD + i64 * S * n, PBU + i64 * S * D, PBD + i64 * P1 * R_PAD, PDS + i64 * P1,
            BU + i64 * s_bu, SCALE_T + i64 * s_st, DWU + i64 * n, DWD + i64 * n, DBU + i64 * D, DBD + i64 * R,
            DS + i64, pid - img * NPROG, D, R, S, P1, scale, use_scale_t, has_bu, want_ds, R_PAD, BLOCK)


@triton.jit
def _philox_rand_kernel(SEED, OUT, N, BLOCK: tl.constexpr):
    """OUT[i] = tl.rand(seed, i) for i < N: the stream the adapter dropout uses (tests only)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(SEED)
    tl.store(OUT + offs, tl.rand(seed, offs.to(tl.int64)), mask=offs < N)


# ----------------------------------------------------------------------------------------------
# Philox in plain torch: bit-exact with tl.rand(seed, offsets) (triton/language/random.py,
# 10 rounds, 32-bit counters: c0 = offset low word, c1 = offset high word, key = seed).
# ----------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a * b for a, b < 2^32 without overflowing int64: split b into 16-bit halves.
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox_uniform(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """tl.rand(seed, offsets) in torch: seed int64 (numel 1), offsets int64 >= 0 -> fp32 in [0, 1)."""
    seed = seed.reshape(()).to(torch.int64)
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0 = offsets.to(torch.int64) & _M32
    c1 = (offsets.to(torch.int64) >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)          # bitcast to int32
    x = torch.where(x < 0, -x - 1, x).to(torch.int32)     # ~x
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=x.device)


def dropout_keep_mask(seed: torch.Tensor, rows: int, rank: int, p: float) -> torch.Tensor:
    """The [rows, rank] bool keep-mask the kernels draw for seed and dropout probability p."""
    offs = torch.arange(rows * rank, dtype=torch.int64, device=seed.device).view(rows, rank)
    return philox_uniform(seed, offs) >= torch.tensor(p, dtype=torch.float32)


def dropout_keep_scale(seed: torch.Tensor, rows: int, width: int, p: float) -> torch.Tensor:
    """`dropout_keep_mask` as the fp32 factor dropout multiplies by: keep / (1 - p)."""
    return dropout_keep_mask(seed, rows, width, p).to(torch.float32) * (1.0 / (1.0 - p))


def philox_uniform_triton(seed: torch.Tensor, n: int) -> torch.Tensor:
    """tl.rand(seed, arange(n)) from a Triton kernel (GPU or interpreter); for checking the above."""
    out = torch.empty(n, dtype=torch.float32, device=seed.device)
    _philox_rand_kernel[(cdiv(n, 1024),)](seed, out, n, BLOCK=1024)
    return out


# ----------------------------------------------------------------------------------------------
# Launchers: check, reshape, allocate, launch (Triton path only)
# ----------------------------------------------------------------------------------------------
def _flags(p, scale_t):
    return (1 if p > 0.0 else 0), inv_keep(p), (1 if scale_t is not None else 0)


def _scale_ptr(scale_t, dev):
    if scale_t is None:
        return dummy(dev)
    return scale_t if scale_t.dtype == torch.float32 else scale_t.float()


def launch_fwd(x, w_down, b_down, w_up, b_up, base, residual, scale_t, scale: float, act: int,
                p: float, seed, save: bool):
    """The Triton forward on validated arguments (see `adapter_fwd`)."""
    d, r = x.shape[-1], w_down.shape[0]
    x2, m, dev, out, a, bd, bu = _fwd_outputs(x, r, b_down, b_up, save)
    if m == 0:
        return out.view(x.shape), a
    unused = dummy(dev)
    use_dropout, inv_keep_p, use_st = _flags(p, scale_t)
    rp, c = config("adapter_fwd", r, x.dtype)
    row_blocks = cdiv(m, c.BLOCK_M)
    n_split, col_splits = column_splits(d, c.BLOCK_N, row_blocks, dev)
    _adapter_fwd_kernel[(row_blocks, col_splits)](
        x2, w_down.contiguous(), bd.contiguous(), w_up.contiguous(), bu.contiguous(),
        rows_of(base) if base is not None else x2, rows_of(residual) if residual is not None else x2,
        _scale_ptr(scale_t, dev), seed_or_zero(seed, p, dev), out, a if save else unused,
        m, d, r, act, p, inv_keep_p, float(scale), use_st, int(base is not None),
        int(residual is not None), int(save), use_dropout, n_split,
        BLOCK_M=c.BLOCK_M, BLOCK_K=c.BLOCK_K, BLOCK_N=c.BLOCK_N, R_PAD=rp, PREC=dot_precision(x.dtype, dev),
        num_warps=c.num_warps, num_stages=c.num_stages)
    return out.view(x.shape), a


#: elements per program of the finish kernel: small, so that its grid (D * R / FINISH_BLOCK: 192
#: programs at ViT-B width and rank 8) still fills one wave of a 132-SM GPU; one warp each
FINISH_BLOCK = 32
FINISH_WARPS = 1
#: the per-row finish: the images multiply its grid (B * D * R / ROWS_FINISH_BLOCK programs: 384
#: at ViT-B width, rank 8 and 16 images), so each program takes a wider slice
ROWS_FINISH_BLOCK = 256
ROWS_FINISH_WARPS = 8



def _fwd_outputs(x, r: int, b_down, b_up, save: bool):
    """(x as [M, D] rows, M, device, out [M, D] like x, a [M or 0, r] fp32: the saved pre-activation,
    the down / up biases or cached zeros): a forward launch's operands."""
    d = x.shape[-1]
    x2 = rows_of(x)
    m = x2.shape[0]
    dev = x.device
    out = torch.empty((m, d), dtype=x.dtype, device=dev)
    a = torch.empty((m if save else 0, r), dtype=torch.float32, device=dev)
    bd = b_down if b_down is not None else zeros_const(r, dev, x.dtype)
    bu = b_up if b_up is not None else zeros_const(d, dev, x.dtype)
    return x2, m, dev, out, a, bd, bu


def _bwd_scratch(m: int, r: int, p1: int, rp: int, dt, dev) -> tuple[torch.Tensor, ...]:
    """The backward launch's outputs besides dx: h and da [M, R] in x's dtype, and the fp32
    per-row-block partials of the down bias [P1, R_PAD] and of the learnable scale [P1]."""
    return (torch.empty((m, r), dtype=dt, device=dev), torch.empty((m, r), dtype=dt, device=dev),
            torch.empty((p1, rp), dtype=torch.float32, device=dev), torch.empty((p1,), dtype=torch.float32, device=dev))


def launch_bwd(grad_out, x, a, w_down, w_up, b_up, scale_t, scale: float, act: int, p: float, seed):
    """The Triton backward on validated arguments (see `adapter_bwd`): three launches (rows,
    weight-grad partials, finish)."""
    d, r = x.shape[-1], w_down.shape[0]
    x2 = rows_of(x)
    g2 = rows_of(grad_out)
    m = x2.shape[0]
    dev, dt = x.device, x.dtype
    dx = torch.empty((m, d), dtype=dt, device=dev)
    if m == 0:
        z = torch.zeros
        return (dx.view(x.shape), z(r, d, dtype=dt, device=dev), z(r, dtype=dt, device=dev),
                z(d, r, dtype=dt, device=dev), z(d, dtype=dt, device=dev),
                z(1, device=dev) if scale_t is not None else None)
    use_dropout, inv_keep_p, use_st = _flags(p, scale_t)
    st = _scale_ptr(scale_t, dev)
    sd = seed_or_zero(seed, p, dev)
    rp, c1 = config("adapter_bwd", r, dt)
    prec = dot_precision(dt, dev)
    p1 = cdiv(m, c1.BLOCK_M)
    h, da, pbd, pds = _bwd_scratch(m, r, p1, rp, dt, dev)
    wd, wu = w_down.contiguous(), w_up.contiguous()
    n_split, col_splits = column_splits(d, c1.BLOCK_K, p1, dev)
    _adapter_bwd_kernel[(p1, col_splits)](
        g2, a, wd, wu, st, sd, dx, h, da, pbd, pds,
        m, d, r, act, p, inv_keep_p, float(scale), use_st, use_dropout, n_split,
        BLOCK_M=c1.BLOCK_M, BLOCK_K=c1.BLOCK_K, BLOCK_N=c1.BLOCK_N, R_PAD=rp, PREC=prec,
        num_warps=c1.num_warps, num_stages=c1.num_stages)
    _, c2 = config("adapter_bwd_dw", r, dt)
    ncol = cdiv(d, c2.BLOCK_N)
    s_splits = row_splits(m, c2.BLOCK_M, ncol, dev)
    pwu = torch.empty((s_splits, d, r), dtype=torch.float32, device=dev)
    pwd = torch.empty((s_splits, r, d), dtype=torch.float32, device=dev)
    pbu = torch.empty((s_splits, d), dtype=torch.float32, device=dev)
    _adapter_bwd_dw_kernel[(ncol, s_splits)](
        g2, x2, h, da, pwu, pwd, pbu, m, d, r, s_splits,
        BLOCK_M=c2.BLOCK_M, BLOCK_N=c2.BLOCK_N, R_PAD=rp, PREC=prec,
        num_warps=c2.num_warps, num_stages=c2.num_stages)
    # finish: deterministic sums of the partials and the scale, one launch
    dwd = torch.empty((r, d), dtype=dt, device=dev)
    dbd = torch.empty((r,), dtype=dt, device=dev)
    dwu = torch.empty((d, r), dtype=dt, device=dev)
    dbu = torch.empty((d,), dtype=dt, device=dev)
    ds = torch.empty((1,), dtype=torch.float32, device=dev) if scale_t is not None else dummy(dev)
    _adapter_bwd_finish_kernel[(cdiv(d * r, FINISH_BLOCK),)](
        pwu, pwd, pbu, pbd, pds, b_up if b_up is not None else dx, st, dwu, dwd, dbu, dbd, ds,
        d, r, s_splits, p1, float(scale), use_st, int(b_up is not None), int(scale_t is not None),
        R_PAD=rp, BLOCK=FINISH_BLOCK, num_warps=FINISH_WARPS)
    return dx.view(x.shape), dwd, dbd, dwu, dbu, ds if scale_t is not None else None


# ----------------------------------------------------------------------------------------------
# Per-row launchers (a mixed multi-task batch: B images, each with its own adapter weights)
# ----------------------------------------------------------------------------------------------
def _per_image(t, single_dim: int, images: int, n: int) -> int:
    """The image stride of a weight the per-row kernels read: n (its elements per image) when it
    carries one copy per image ([B, ...], one more dim than the single-task weight), 0 when shared."""
    return n if t is not None and t.dim() == single_dim + 1 else 0


def _scale_stride(scale_t, images: int) -> int:
    """1 when the learnable scale holds one value per image ([B] or [B, 1]), 0 when one is shared."""
    return 1 if scale_t is not None and scale_t.numel() == images and images > 1 else 0


def launch_rows_fwd(images: int, x, w_down, b_down, w_up, b_up, base, residual, scale_t, scale: float,
                    act: int, p: float, seed, save: bool):
    """The per-row forward on validated arguments (fastpeft/ops/adapter.py `adapter_rows`): x
    [B, ..., D] holds B = `images` images of L = x.numel() / (B D) rows; each weight is either
    per image (w_down [B, r, D], b_down [B, r], w_up [B, D, r], b_up [B, D], scale_t [B] / [B, 1])
    or shared (the single-task shapes). One launch; the dropout mask is the single-task kernel's
    for the same seed and rows. Returns (out like x, a [B L, r] fp32 or [0, r] when not save)."""
    d, r = x.shape[-1], w_down.shape[-2]
    x2, m, dev, out, a, bd, bu = _fwd_outputs(x, r, b_down, b_up, save)
    L = m // images
    if m == 0:
        return out.view(x.shape), a
    use_dropout, inv_keep_p, use_st = _flags(p, scale_t)
    rp, c = config("adapter_rows_fwd", r, x.dtype)
    nblk = cdiv(L, c.BLOCK_M)
    n_split, col_splits = column_splits(d, c.BLOCK_N, images * nblk, dev)
    _adapter_rows_fwd_kernel[(images * nblk, col_splits)](
        x2, w_down.contiguous(), bd.contiguous(), w_up.contiguous(), bu.contiguous(),
        rows_of(base) if base is not None else x2, rows_of(residual) if residual is not None else x2,
        _scale_ptr(scale_t, dev), seed_or_zero(seed, p, dev), out, a if save else dummy(dev),
        L, nblk, d, r, act, p, inv_keep_p, float(scale), use_st, int(base is not None),
        int(residual is not None), int(save), use_dropout, n_split,
        _per_image(w_down, 2, images, r * d), _per_image(b_down, 1, images, r), _per_image(w_up, 2, images, d * r),
        _per_image(b_up, 1, images, d), _scale_stride(scale_t, images),
        BLOCK_M=c.BLOCK_M, BLOCK_K=c.BLOCK_K, BLOCK_N=c.BLOCK_N, R_PAD=rp, PREC=dot_precision(x.dtype, dev),
        num_warps=c.num_warps, num_stages=c.num_stages)
    return out.view(x.shape), a


def launch_rows_bwd(images: int, grad_out, x, a, w_down, w_up, b_up, scale_t, scale: float, act: int, p: float,
                    seed):
    """The per-row backward on validated arguments: three launches (rows, weight-grad partials per
    image, finish per image), as `launch_bwd`. Returns (dx like x, dW_d [B, r, D], db_d [B, r],
    dW_u [B, D, r], db_u [B, D], ds [B] fp32 or None): every image's gradients of its own rows
    (the caller sums them over the images for a shared weight)."""
    d, r = x.shape[-1], w_down.shape[-2]
    x2 = rows_of(x)
    g2 = rows_of(grad_out)
    m = x2.shape[0]
    L = m // images
    dev, dt = x.device, x.dtype
    dx = torch.empty((m, d), dtype=dt, device=dev)
    if m == 0:
        z = torch.zeros
        return (dx.view(x.shape), z(images, r, d, dtype=dt, device=dev), z(images, r, dtype=dt, device=dev),
                z(images, d, r, dtype=dt, device=dev), z(images, d, dtype=dt, device=dev),
                z(images, device=dev) if scale_t is not None else None)
    use_dropout, inv_keep_p, use_st = _flags(p, scale_t)
    st = _scale_ptr(scale_t, dev)
    s_st = _scale_stride(scale_t, images)
    sd = seed_or_zero(seed, p, dev)
    rp, c1 = config("adapter_rows_bwd", r, dt)
    prec = dot_precision(dt, dev)
    nblk = cdiv(L, c1.BLOCK_M)
    p1 = images * nblk
    h, da, pbd, pds = _bwd_scratch(m, r, p1, rp, dt, dev)
    wd, wu = w_down.contiguous(), w_up.contiguous()
    n_split, col_splits = column_splits(d, c1.BLOCK_K, p1, dev)
    _adapter_rows_bwd_kernel[(p1, col_splits)](
        g2, a, wd, wu, st, sd, dx, h, da, pbd, pds,
        L, nblk, d, r, act, p, inv_keep_p, float(scale), use_st, use_dropout, n_split,
        _per_image(w_down, 2, images, r * d), _per_image(w_up, 2, images, d * r), s_st,
        BLOCK_M=c1.BLOCK_M, BLOCK_K=c1.BLOCK_K, BLOCK_N=c1.BLOCK_N, R_PAD=rp, PREC=prec,
        num_warps=c1.num_warps, num_stages=c1.num_stages)
    _, c2 = config("adapter_rows_dw", r, dt)
    ncol = cdiv(d, c2.BLOCK_N)
    s_splits = row_splits(L, c2.BLOCK_M, ncol * images, dev)
    pwu = torch.empty((images, s_splits, d, r), dtype=torch.float32, device=dev)
    pwd = torch.empty((images, s_splits, r, d), dtype=torch.float32, device=dev)
    pbu = torch.empty((images, s_splits, d), dtype=torch.float32, device=dev)
    _adapter_rows_dw_kernel[(ncol, images * s_splits)](
        g2, x2, h, da, pwu, pwd, pbu, L, d, r, s_splits,
        BLOCK_M=c2.BLOCK_M, BLOCK_N=c2.BLOCK_N, R_PAD=rp, PREC=prec,
        num_warps=c2.num_warps, num_stages=c2.num_stages)
    dwd = torch.empty((images, r, d), dtype=dt, device=dev)
    dbd = torch.empty((images, r), dtype=dt, device=dev)
    dwu = torch.empty((images, d, r), dtype=dt, device=dev)
    dbu = torch.empty((images, d), dtype=dt, device=dev)
    ds = torch.empty((images,), dtype=torch.float32, device=dev) if scale_t is not None else dummy(dev)
    nprog = cdiv(d * r, ROWS_FINISH_BLOCK)
    _adapter_rows_finish_kernel[(images * nprog,)](
        pwu, pwd, pbu, pbd, pds, b_up if b_up is not None else dx, st, dwu, dwd, dbu, dbd, ds,
        nprog, d, r, s_splits, nblk, float(scale), use_st, int(b_up is not None), int(scale_t is not None),
        _per_image(b_up, 1, images, d), s_st,
        R_PAD=rp, BLOCK=ROWS_FINISH_BLOCK, num_warps=ROWS_FINISH_WARPS)
    return dx.view(x.shape), dwd, dbd, dwu, dbu, ds if scale_t is not None else None




# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile list (kernels/aot.py)
# ----------------------------------------------------------------------------------------------
def _rows_specs(dt, P, rp):
    """The per-row kernels at one dtype and R_PAD: the single-task kernels' configs, with the rows
    per image, row blocks per image and the weights' image strides as runtime arguments."""
    key = (rp, "fp32" if dt == torch.float32 else "lp")
    strides = lambda *names: {n: "i32" for n in names}  # noqa: E731
    c = CONFIGS["adapter_rows_fwd"][key]
    sig = {"X": P, "WD": P, "BD": P, "WU": P, "BU": P, "BASE": P, "RES": P, "SCALE_T": "*fp32", "SEED": "*i64",
           "OUT": P, "A": "*fp32", "L": "i32", "NBLK": "i32", "D": "i32", "R": "i32", "act": "i32", "p": "fp32",
           "inv_keep": "fp32", "scale": "fp32", "use_scale_t": "i32", "has_base": "i32", "has_res": "i32",
           "save_a": "i32", "use_dropout": "i32", "n_split": "i32", **strides("s_wd", "s_bd", "s_wu", "s_bu", "s_st")}
    out = [("adapter_rows_fwd", _adapter_rows_fwd_kernel, sig,
            dict(BLOCK_M=c.BLOCK_M, BLOCK_K=c.BLOCK_K, BLOCK_N=c.BLOCK_N, R_PAD=rp, PREC="ieee"), c, str(dt))]
    c = CONFIGS["adapter_rows_bwd"][key]
    sig = {"G": P, "A": "*fp32", "WD": P, "WU": P, "SCALE_T": "*fp32", "SEED": "*i64", "DX": P, "H": P, "DA": P,
           "PBD": "*fp32", "PDS": "*fp32", "L": "i32", "NBLK": "i32", "D": "i32", "R": "i32", "act": "i32",
           "p": "fp32", "inv_keep": "fp32", "scale": "fp32", "use_scale_t": "i32", "use_dropout": "i32",
           "n_split": "i32", **strides("s_wd", "s_wu", "s_st")}
    out.append(("adapter_rows_bwd", _adapter_rows_bwd_kernel, sig,
                dict(BLOCK_M=c.BLOCK_M, BLOCK_K=c.BLOCK_K, BLOCK_N=c.BLOCK_N, R_PAD=rp, PREC="ieee"), c, str(dt)))
    c = CONFIGS["adapter_rows_dw"][key]
    sig = {"G": P, "X": P, "H": P, "DA": P, "PWU": "*fp32", "PWD": "*fp32", "PBU": "*fp32",
           "L": "i32", "D": "i32", "R": "i32", "S": "i32"}
    out.append(("adapter_rows_dw", _adapter_rows_dw_kernel, sig,
                dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, R_PAD=rp, PREC="ieee"), c, str(dt)))
    sig = {"PWU": "*fp32", "PWD": "*fp32", "PBU": "*fp32", "PBD": "*fp32", "PDS": "*fp32", "BU": P,
           "SCALE_T": "*fp32", "DWU": P, "DWD": P, "DBU": P, "DBD": P, "DS": "*fp32", "NPROG": "i32",
           "D": "i32", "R": "i32", "S": "i32", "P1": "i32", "scale": "fp32", "use_scale_t": "i32",
           "has_bu": "i32", "want_ds": "i32", **strides("s_bu", "s_st")}
    out.append(("adapter_rows_finish", _adapter_rows_finish_kernel, sig, dict(R_PAD=rp, BLOCK=ROWS_FINISH_BLOCK),
                Cfg(BLOCK_M=0, BLOCK_N=0, num_warps=ROWS_FINISH_WARPS, num_stages=1), str(dt)))
    return out


def aot_specs():
    """Every (kernel, signature, constexprs, num_warps, num_stages) the launchers can launch."""
    specs = []
    for dt in AOT_DTYPES:
        P = TRITON_PTR[dt]
        for rp in R_PADS:
            c = CONFIGS["adapter_fwd"][(rp, "fp32" if dt == torch.float32 else "lp")]
            sig = {"X": P, "WD": P, "BD": P, "WU": P, "BU": P, "BASE": P, "RES": P,
                   "SCALE_T": "*fp32", "SEED": "*i64", "OUT": P, "A": "*fp32",
                   "M": "i32", "D": "i32", "R": "i32", "act": "i32", "p": "fp32", "inv_keep": "fp32",
                   "scale": "fp32", "use_scale_t": "i32", "has_base": "i32", "has_res": "i32",
                   "save_a": "i32", "use_dropout": "i32", "n_split": "i32"}
            specs.append(("adapter_fwd", _adapter_fwd_kernel, sig,
                          dict(BLOCK_M=c.BLOCK_M, BLOCK_K=c.BLOCK_K, BLOCK_N=c.BLOCK_N, R_PAD=rp, PREC="ieee"), c, str(dt)))
            c = CONFIGS["adapter_bwd"][(rp, "fp32" if dt == torch.float32 else "lp")]
            sig = {"G": P, "A": "*fp32", "WD": P, "WU": P, "SCALE_T": "*fp32", "SEED": "*i64",
                   "DX": P, "H": P, "DA": P, "PBD": "*fp32", "PDS": "*fp32",
                   "M": "i32", "D": "i32", "R": "i32", "act": "i32", "p": "fp32", "inv_keep": "fp32",
                   "scale": "fp32", "use_scale_t": "i32", "use_dropout": "i32", "n_split": "i32"}
            specs.append(("adapter_bwd", _adapter_bwd_kernel, sig,
                          dict(BLOCK_M=c.BLOCK_M, BLOCK_K=c.BLOCK_K, BLOCK_N=c.BLOCK_N, R_PAD=rp, PREC="ieee"), c, str(dt)))
            c = CONFIGS["adapter_bwd_dw"][(rp, "fp32" if dt == torch.float32 else "lp")]
            sig = {"G": P, "X": P, "H": P, "DA": P, "PWU": "*fp32", "PWD": "*fp32", "PBU": "*fp32",
                   "M": "i32", "D": "i32", "R": "i32", "S": "i32"}
            specs.append(("adapter_bwd_dw", _adapter_bwd_dw_kernel, sig,
                          dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, R_PAD=rp, PREC="ieee"), c, str(dt)))
            sig = {"PWU": "*fp32", "PWD": "*fp32", "PBU": "*fp32", "PBD": "*fp32", "PDS": "*fp32", "BU": P,
                   "SCALE_T": "*fp32", "DWU": P, "DWD": P, "DBU": P, "DBD": P, "DS": "*fp32",
                   "D": "i32", "R": "i32", "S": "i32", "P1": "i32", "scale": "fp32", "use_scale_t": "i32",
                   "has_bu": "i32", "want_ds": "i32"}
            specs.append(("adapter_bwd_finish", _adapter_bwd_finish_kernel, sig,
                          dict(R_PAD=rp, BLOCK=FINISH_BLOCK), Cfg(BLOCK_M=0, BLOCK_N=0, num_warps=FINISH_WARPS,
                                                                  num_stages=1),
                          str(dt)))
            specs += _rows_specs(dt, P, rp)
    specs.append(("philox_rand", _philox_rand_kernel, {"SEED": "*i64", "OUT": "*fp32", "N": "i32"},
                  dict(BLOCK=1024), Cfg(BLOCK_M=0, BLOCK_N=0, num_warps=4, num_stages=1), "fp32"))
    return with_tf32_variants(specs)
