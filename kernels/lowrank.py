"""Triton kernels for a rank-R delta on a frozen projection (nn.Linear W [N, D], bias [N]):

    out = x W^T + bias + u B^T,     u = drop(x A^T)   (dropout after the down projection)
                                 or u = drop(x) A^T   (dropout on the input, NOAH LoRA)

with down matrix A [R, D] and up matrix B [N, R] (each method's A and B: fastpeft/ops/lowrank.py).

GEMMs run on the vendor BLAS (out = addmm(bias, x, W^T); out.addmm_(u, B^T); dx = g W + dz A;
dA = dz^T x; dB = g^T u); Triton regenerates the dropout masks from the seed: the rank-R down
projection with dropout, NOAH's masked dx term (gemm, LR_MASK) and dA = dz^T drop(x). Kernels:

  _lowrank_down_kernel  u[M, R] = epi(drop_in(X)[M, D] @ P[R, D]^T); P by runtime strides (A in the
                        forward, B^T in the backward); epilogue: +bias, QuickGELU, saved fp32
                        pre-activation, output dropout, scale (the Convpass down projection uses it)
  _lowrank_gemm_kernel  OUT[M, N] = X[M, D] @ W^T + U[M, R] @ B^T (+ bias); TRANS picks the layouts
                        (forward: W [N, D], B [N, R]; backward dx: W [D, N], A [R, N]); LR_MASK
                        multiplies the rank term by the input-dropout mask (NOAH's dx)
  _lowrank_dw_kernel    per-split fp32 partials of P[M, R]^T Q[M, C] (Q optionally input-dropped)
                        and of colsum(Q): deterministic (no atomics), the launcher sums the splits

and their per-row twins for a mixed multi-task batch (B images of L rows, each image its own
task's factors, read at the image's offset: grid axis 1 is the image; `launch_rows_fwd` /
`launch_rows_bwd` run the frozen GEMM once over the batch and the rank-R products as bmm):

  _lowrank_rows_down_kernel  u = drop_out(drop_in(X_b) @ P_b^T) (split-K as the down kernel)
  _lowrank_rows_lr_kernel    OUT += keep * (U_b @ P_b) in place (NOAH's dx rank term)
  _lowrank_rows_dw_kernel    OUT_b = P_b^T drop(Q_b), one image's rows per program (NOAH's dA)

The ops, the methods' functionals and the references are in fastpeft/ops/lowrank.py; its eager
Function and its registered op share these launchers (launch_fwd / launch_bwd). Saved for backward: x (the projection
input) and u [M, R] in x's dtype -- plus the int64 seed; the dropout mask is never stored (Philox
`tl.rand(seed, offset)` regenerated, bit-exact with `adapter.dropout_keep_mask` in torch; offsets
row * width + col of the tensor it drops: [M, D] for input dropout, [M, R] for rank dropout).
W is frozen (no gradient, asserted by the functionals); bias gets colsum(g) when it requires grad.

tl.dot needs every dim >= 16 on sm_80/sm_90: the rank is padded to R_PAD = max(16, pow2(R)) with
masked (zero) loads, which is exact. R > MAX_RANK falls back to the torch path of the same op.
"""
from __future__ import annotations



import torch

from ._common import (dot_precision, with_tf32_variants, AOT_DTYPES, TRITON_PTR, cdiv, dummy, inv_keep,
                      keep_scale, column_splits, finish_row_splits, next_pow2, rank_down_range,
                      row_rank_tile, split_workspace, row_splits, rows_of, seed_or_zero, tl, triton)
from ._common import MAX_GRID_YZ, Cfg

MAX_RANK = 128
R_PADS = (16, 32, 64, 128)
ACT_NONE, ACT_QUICK_GELU = 0, 1

# ----------------------------------------------------------------------------------------------
# Configurations: the single source of truth for the launchers and kernels/aot.py.
# ----------------------------------------------------------------------------------------------
CONFIGS: dict[str, dict[int, Cfg]] = {
    # keyed by (R_PAD, IN_DROP): acc [BLOCK_M, R_PAD] fp32 in registers, D streamed in BLOCK_K
    # chunks. BLOCK_K 64 spilled for fp32 on sm_80 (the ieee fp32 dot is FMA: STACK up to 3568
    # at R_PAD 32/64), and with IN_DROP (a Philox number per x element of the tile, NOAH's input
    # dropout) up to 1176: every variant streams 32 columns. R_PAD 128 spilled in fp32 (STACK
    # 24-32) once the split-K partials are summed in the kernel: 32-row tiles there (16 with
    # IN_DROP: STACK 8 at 32 on sm_80).
    "lowrank_down": {
        (16, 0): Cfg(BLOCK_M=64, BLOCK_N=0, BLOCK_K=32, num_warps=4, num_stages=2),
        (32, 0): Cfg(BLOCK_M=64, BLOCK_N=0, BLOCK_K=32, num_warps=4, num_stages=2),
        (64, 0): Cfg(BLOCK_M=64, BLOCK_N=0, BLOCK_K=32, num_warps=8, num_stages=2),
        (128, 0): Cfg(BLOCK_M=32, BLOCK_N=0, BLOCK_K=32, num_warps=8, num_stages=2),
        (16, 1): Cfg(BLOCK_M=64, BLOCK_N=0, BLOCK_K=32, num_warps=4, num_stages=2),
        (32, 1): Cfg(BLOCK_M=64, BLOCK_N=0, BLOCK_K=32, num_warps=4, num_stages=2),
        (64, 1): Cfg(BLOCK_M=64, BLOCK_N=0, BLOCK_K=32, num_warps=8, num_stages=2),
        (128, 1): Cfg(BLOCK_M=16, BLOCK_N=0, BLOCK_K=32, num_warps=8, num_stages=2),
    },
    # keyed by (LR_MASK, element bytes); R is a runtime loop bound over BLOCK_K chunks, like D.
    # 128x128x32 tiles, 3 stages, 48 KiB shared in fp16/bf16. fp32 (an ieee dot: FMA, no tensor
    # cores) spilled at 128x128x32 on sm_80 (STACK 16 / 96 for dx): 64x64x16 there.
    # The input-dropout dx variant (LR_MASK) keeps a second fp32 accumulator and a Philox tile:
    # 128x128 spilled on sm_80 (fp16 STACK 16), in fp32 128x64x32 (STACK 24) and 64x64x32 (16) too.
    "lowrank_gemm": {
        (0, 2): Cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
        (0, 4): Cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3),
        (1, 2): Cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
        (1, 4): Cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3),
    },
    # keyed by (R_PAD, element bytes): acc [R_PAD, BLOCK_N] fp32; rows streamed in BLOCK_M
    # chunks per split. fp32 R_PAD 32 at 128 columns / 4 warps spilled (STACK 8): 8 warps.
    "lowrank_dw": {
        (16, 2): Cfg(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=2),
        (32, 2): Cfg(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=2),
        (64, 2): Cfg(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
        (128, 2): Cfg(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
        (16, 4): Cfg(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=2),
        (32, 4): Cfg(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
        (64, 4): Cfg(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
        (128, 4): Cfg(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
    },
}
# The per-row kernels of a mixed multi-task batch (one image per grid row, each with its own
# factors). rows_down is the down kernel's loop without the split-K epilogue: its configs.
CONFIGS["lowrank_rows_down"] = dict(CONFIGS["lowrank_down"])
# keyed by element bytes: OUT[rows, cols] += keep * (U[rows, :R] @ P_img[:R, cols]), an fp32
# accumulator and a Philox tile; R streamed in BLOCK_K chunks.
CONFIGS["lowrank_rows_lr"] = {
    2: Cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=2),
    4: Cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2),
}
# keyed by (R_PAD, element bytes): the dw kernel's rows with 32 columns (grid: column blocks x
# images, each program one image's rows: narrow tiles so that a batch of 8 fills a wave)
CONFIGS["lowrank_rows_dw"] = {k: Cfg(BLOCK_M=c.BLOCK_M, BLOCK_N=32, num_warps=4, num_stages=c.num_stages)
                              for k, c in CONFIGS["lowrank_dw"].items()}
GROUP_M = 8  # program swizzle of the gemm: 8 row blocks share W column tiles in L2


def r_pad_of(rank: int) -> int:
    return max(16, next_pow2(rank))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _quick_gelu(a):
    return a * tl.sigmoid(1.702 * a)


@triton.jit(do_not_specialize=["M", "R", "stride_pr", "stride_pk", "p", "inv_keep", "scale",
                               "out_drop", "has_bias", "act", "save_pre", "k_split", "S"])
def _lowrank_down_kernel(
    X,      # [M, D] input rows (x dtype), contiguous
    P,      # [R, D] down matrix, element (r, k) at r * stride_pr + k * stride_pk
    BIAS,   # [R]    added when has_bias
    SEED,   # [1]    int64, read when in_drop or out_drop
    OUT,    # [M, R] output (x dtype)
    PRE,    # [M, R] fp32 pre-activation (after bias, before act/dropout), written when save_pre
    PS,     # [S, M, R_PAD] fp32 scratch: per-split partial products (read when S > 1)
    LOCK,   # [>= row blocks] int32 arrival counters, zero (left zero)
    M, D, R, stride_pr, stride_pk, p, inv_keep, scale, out_drop, has_bias, act, save_pre,
    k_split, S,  # columns of D per split (a multiple of BLOCK_K) and splits (grid axis 1)
    IN_DROP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    PREC: tl.constexpr,  # tl.dot input_precision for fp32 ("ieee" | "tf32", `dot_precision`)
):
    # grid (row blocks, K splits): with few rows the D reduction is split over S programs per row
    # block (the grid fills the GPU); each stores its fp32 partial, the last to arrive sums them
    # in split order (deterministic, `_common.last_split`) and runs the epilogue.
    pid, rows64, rmask, rk, kmask = row_rank_tile(M, R, BLOCK_M, R_PAD)
    pid_k = tl.program_id(1)
    acc = rank_down_range(X, P, stride_pr, stride_pk, rows64, rmask, rk, kmask, D, pid_k * k_split,
                          tl.minimum(D, (pid_k + 1) * k_split), SEED, p, inv_keep, IN_DROP, BLOCK_M, BLOCK_K,
                          R_PAD, PREC)
    rkmask = rmask[:, None] & kmask[None, :]
    acc, last = finish_row_splits(acc, PS, LOCK, pid, pid_k, S, M, rows64, rmask, rk, R_PAD)
    if last:
        _lowrank_down_epilogue(acc, BIAS, SEED, OUT, PRE, rows64, rk, kmask, rkmask, R, p, inv_keep, scale,
                               out_drop, has_bias, act, save_pre)


@triton.jit
def _lowrank_down_epilogue(acc, BIAS, SEED, OUT, PRE, rows64, rk, kmask, rkmask, R, p, inv_keep, scale,
                           out_drop, has_bias, act, save_pre):
    offs = rows64[:, None] * R + rk[None, :]
    if has_bias:
        acc += tl.load(BIAS + rk, mask=kmask, other=0.0).to(tl.float32)[None, :]
    if save_pre:
        tl.store(PRE + offs, acc, mask=rkmask)
    if act == 1:
        acc = _quick_gelu(acc)
    if out_drop:
        acc = acc * keep_scale(SEED, rows64, rk, R, p, inv_keep)
    acc = acc * scale
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=rkmask)


@triton.jit(do_not_specialize=["M", "R", "has_bias", "p", "inv_keep"])
def _lowrank_gemm_kernel(
    X,     # [M, D] rows (x dtype), contiguous
    W,     # TRANS=0: [N, D] (frozen weight, forward); TRANS=1: [D, N] (the weight, for dx = g W)
    U,     # [M, R] rank activations (x dtype), contiguous
    B,     # TRANS=0: [N, R] (up matrix); TRANS=1: [R, N] (down matrix A, for dx)
    BIAS,  # [N] added when has_bias
    SEED,  # [1] int64, read when LR_MASK
    OUT,   # [M, N] output (x dtype)
    M, N, D, R, has_bias, p, inv_keep,
    TRANS: tl.constexpr, LR_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    PREC: tl.constexpr,
):
    # grouped program order: GROUP row blocks walk the same column tiles (L2 reuse of W)
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * n_n
    first_m = (pid // per_group) * GROUP
    gsize = tl.minimum(n_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % gsize
    pid_n = (pid % per_group) // gsize

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # frozen projection: K loop over D
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        x = tl.load(X + rows64[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if TRANS:
            w = tl.load(W + ks[:, None] * N + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        else:
            w = tl.load(W + cols[None, :] * D + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PREC)
    # low-rank term: the same K loop continued over R more columns ([x | u] @ [W | B]^T)
    if LR_MASK:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc2 = acc
    for r0 in range(0, R, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        smask = rs < R
        u = tl.load(U + rows64[:, None] * R + rs[None, :], mask=rmask[:, None] & smask[None, :], other=0.0)
        if TRANS:
            b = tl.load(B + rs[:, None] * N + cols[None, :], mask=smask[:, None] & cmask[None, :], other=0.0)
        else:
            b = tl.load(B + cols[None, :] * R + rs[:, None], mask=smask[:, None] & cmask[None, :], other=0.0)
        acc2 = tl.dot(u, b, acc2, input_precision=PREC)
    if LR_MASK:
        acc = acc + acc2 * keep_scale(SEED, rows64, cols, N, p, inv_keep)
    else:
        acc = acc2
    if has_bias:
        acc += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rows64[:, None] * N + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["M", "R", "S", "p", "inv_keep", "q_drop", "want_colsum"])
def _lowrank_dw_kernel(
    P,     # [M, R] (x dtype), contiguous
    Q,     # [M, D] (x dtype), contiguous
    SEED,  # [1] int64, read when q_drop
    PW,    # [S, R, D] fp32 out: partial P^T drop(Q)
    PC,    # [S, D]    fp32 out: partial colsum(Q), written when want_colsum
    M, D, R, S, p, inv_keep, q_drop, want_colsum,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    rk = tl.arange(0, R_PAD)
    kmask = rk < R
    acc = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
    csum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(pid_s * BLOCK_M, M, S * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        q = tl.load(Q + rows64[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        if want_colsum:
            csum += tl.sum(q.to(tl.float32), axis=0)
        if q_drop:
            q = (q.to(tl.float32) * keep_scale(SEED, rows64, cols, D, p, inv_keep)).to(Q.dtype.element_ty)
        pm = tl.load(P + rows64[:, None] * R + rk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(tl.trans(pm), q, acc, input_precision=PREC)
    base = pid_s.to(tl.int64) * R * D
    tl.store(PW + base + rk[:, None] * D + cols[None, :], acc, mask=kmask[:, None] & cmask[None, :])
    if want_colsum:
        tl.store(PC + pid_s.to(tl.int64) * D + cols, csum, mask=cmask)


# ----------------------------------------------------------------------------------------------
# Per-row kernels: a mixed multi-task batch of B images with L rows (tokens) each, x [B*L, D],
# every image its own factors (image b = row // L: grid axis 1). The per-image matrices sit at
# P + b * stride_pi (stride_pi 0: one matrix shared by every image). Dropout offsets are the
# single-task op's over the whole [B*L, width] tensor.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _image_rows(L, BLOCK_M: tl.constexpr, pid_m):
    """(image, rows64 (global), rmask) of the row block `pid_m` of the image on grid axis 1."""
    img = tl.program_id(1).to(tl.int64)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return img, img * L + local, local < L


@triton.jit(do_not_specialize=["M", "L", "R", "stride_pi", "stride_pr", "stride_pk", "p", "inv_keep", "out_drop",
                               "k_split", "S"])
def _lowrank_rows_down_kernel(
    X,      # [M = B*L, D] input rows (x dtype), contiguous
    P,      # [B, R, D] per-image down matrices: (b, r, k) at b * stride_pi + r * stride_pr + k * stride_pk
    SEED,   # [1] int64, read when IN_DROP or out_drop
    OUT,    # [M, R] output (x dtype)
    PS,     # [S, M, R_PAD] fp32 scratch: per-split partial products (read when S > 1)
    LOCK,   # [>= row blocks of the batch] int32 arrival counters, zero (left zero)
    M, L, D, R, stride_pi, stride_pr, stride_pk, p, inv_keep, out_drop,
    k_split, S,  # columns of D per split (a multiple of BLOCK_K) and splits (grid axis 2)
    IN_DROP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    PREC: tl.constexpr,
):
    # grid (row blocks per image, images, K splits): u = drop_out(drop_in(X_b) @ P_b^T). With few
    # rows the D reduction is split as in `_lowrank_down_kernel` (the last split to arrive sums
    # the partials in split order: deterministic) so that the grid fills the GPU.
    pid_m = tl.program_id(0)
    img, rows64, rmask = _image_rows(L, BLOCK_M, pid_m)
    pid_k = tl.program_id(2)
    rk = tl.arange(0, R_PAD)
    kmask = rk < R
    acc = rank_down_range(X, P + img * stride_pi, stride_pr, stride_pk, rows64, rmask, rk, kmask, D, pid_k * k_split,
                          tl.minimum(D, (pid_k + 1) * k_split), SEED, p, inv_keep, IN_DROP, BLOCK_M, BLOCK_K, R_PAD,
                          PREC)
    acc, last = finish_row_splits(acc, PS, LOCK, img * tl.num_programs(0) + pid_m, pid_k, S, M, rows64, rmask, rk,
                                  R_PAD)
    if last:
        if out_drop:
            acc = acc * keep_scale(SEED, rows64, rk, R, p, inv_keep)
        tl.store(OUT + rows64[:, None] * R + rk[None, :], acc.to(OUT.dtype.element_ty),
                 mask=rmask[:, None] & kmask[None, :])


@triton.jit(do_not_specialize=["L", "R", "stride_pi", "stride_pr", "stride_pk", "p", "inv_keep"])
def _lowrank_rows_lr_kernel(
    OUT,    # [B*L, D] (x dtype), contiguous, updated in place: OUT += keep * (U_b @ P_b)
    U,      # [B*L, R] (x dtype), contiguous
    P,      # [B, R, D] per-image matrices (the down matrices A: NOAH's dx rank term), by strides
    SEED,   # [1] int64: the input-dropout mask over [B*L, D]
    L, D, R, stride_pi, stride_pr, stride_pk, p, inv_keep,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    # grid (row blocks per image x column blocks, images)
    n_n = tl.cdiv(D, BLOCK_N)
    pid = tl.program_id(0)
    img, rows64, rmask = _image_rows(L, BLOCK_M, pid // n_n)
    cols = (pid % n_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    pb = P + img * stride_pi
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        smask = rs < R
        u = tl.load(U + rows64[:, None] * R + rs[None, :], mask=rmask[:, None] & smask[None, :], other=0.0)
        pt = tl.load(pb + rs[:, None] * stride_pr + cols[None, :] * stride_pk, mask=smask[:, None] & cmask[None, :],
                     other=0.0)
        acc = tl.dot(u, pt, acc, input_precision=PREC)
    offs = rows64[:, None] * D + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    o = tl.load(OUT + offs, mask=omask, other=0.0).to(tl.float32)
    o = o + acc * keep_scale(SEED, rows64, cols, D, p, inv_keep)
    tl.store(OUT + offs, o.to(OUT.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["L", "R", "p", "inv_keep", "q_drop"])
def _lowrank_rows_dw_kernel(
    P,      # [B*L, R] (x dtype), contiguous
    Q,      # [B*L, D] (x dtype), contiguous
    SEED,   # [1] int64, read when q_drop
    OUT,    # [B, R, D] (x dtype): OUT_b = P_b^T drop(Q_b), summed in fp32
    L, D, R, p, inv_keep, q_drop,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, PREC: tl.constexpr,
):
    # grid (column blocks, images): each program walks its image's L rows (deterministic)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    rk = tl.arange(0, R_PAD)
    kmask = rk < R
    acc = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, L, BLOCK_M):
        img, rows64, rmask = _image_rows(L, BLOCK_M, m0 // BLOCK_M)
        q = tl.load(Q + rows64[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        if q_drop:
            q = (q.to(tl.float32) * keep_scale(SEED, rows64, cols, D, p, inv_keep)).to(Q.dtype.element_ty)
        pm = tl.load(P + rows64[:, None] * R + rk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(tl.trans(pm), q, acc, input_precision=PREC)
    img = tl.program_id(1).to(tl.int64)
    tl.store(OUT + img * R * D + rk[:, None] * D + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=kmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers (Triton path): check, reshape, allocate, launch
# ----------------------------------------------------------------------------------------------
def launch_down(x2, p_mat, stride_pr, stride_pk, r, *, bias=None, act=ACT_NONE, save_pre=False,
                p=0.0, seed=None, in_drop=False, out_drop=False, scale=1.0):
    """u [M, r] (x dtype) = epi(drop_in(x2) @ P^T); returns (u, pre fp32 [M, r] or None)."""
    m, d = x2.shape
    dev = x2.device
    out = torch.empty((m, r), dtype=x2.dtype, device=dev)
    pre = torch.empty((m, r), dtype=torch.float32, device=dev) if save_pre else None
    if m == 0:
        return out, pre
    rp = r_pad_of(r)
    in_drop = int(in_drop and p > 0)
    c = CONFIGS["lowrank_down"][(rp, in_drop)]
    row_blocks = cdiv(m, c.BLOCK_M)
    k_split, splits = column_splits(d, c.BLOCK_K, row_blocks, dev)  # (splits of the reduction here)
    if splits > 1:
        ps, lock = split_workspace(dev, splits * m * rp, row_blocks)
    else:
        ps = lock = dummy(dev)
    _lowrank_down_kernel[(row_blocks, splits)](
        x2, p_mat, bias if bias is not None else dummy(dev), seed_or_zero(seed, p, dev), out,
        pre if save_pre else dummy(dev), ps, lock,
        m, d, r, stride_pr, stride_pk, float(p), inv_keep(p), float(scale),
        int(out_drop and p > 0), int(bias is not None), int(act), int(save_pre), k_split, splits,
        IN_DROP=in_drop, BLOCK_M=c.BLOCK_M, BLOCK_K=c.BLOCK_K, R_PAD=rp,
        PREC="ieee" if in_drop else dot_precision(x2.dtype, dev),  # (tf32 + the Philox tile spilled: aot.py)
        num_warps=c.num_warps, num_stages=c.num_stages)
    return out, pre


def launch_gemm(x2, w, u, b, n, *, bias=None, trans=False, lr_mask=False, p=0.0, seed=None):
    """OUT [M, n] = x2 @ W^T + u @ B^T (+ bias), layouts per `trans` (see the kernel)."""
    m, d = x2.shape
    r = u.shape[1]
    dev = x2.device
    out = torch.empty((m, n), dtype=x2.dtype, device=dev)
    if m == 0 or n == 0:
        return out
    lr_mask = bool(lr_mask and p > 0)
    c = CONFIGS["lowrank_gemm"][(int(lr_mask), x2.element_size())]
    grid = (cdiv(m, c.BLOCK_M) * cdiv(n, c.BLOCK_N),)
    _lowrank_gemm_kernel[grid](
        x2, w, u, b, bias if bias is not None else dummy(dev), seed_or_zero(seed, p, dev), out,
        m, n, d, r, int(bias is not None), float(p), inv_keep(p),
        TRANS=bool(trans), LR_MASK=lr_mask, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N,
        BLOCK_K=c.BLOCK_K, GROUP=GROUP_M, PREC=dot_precision(x2.dtype, dev), num_warps=c.num_warps,
        num_stages=c.num_stages)
    return out


def launch_dw(pm, q, *, colsum=False, q_drop=False, p=0.0, seed=None):
    """(P^T drop(Q) [R, D] fp32, colsum(Q) [D] fp32 or None): deterministic split-row sums."""
    m, r = pm.shape
    d = q.shape[1]
    dev = q.device
    if m == 0:
        return (torch.zeros((r, d), dtype=torch.float32, device=dev),
                torch.zeros(d, dtype=torch.float32, device=dev) if colsum else None)
    rp = r_pad_of(r)
    c = CONFIGS["lowrank_dw"][(rp, q.element_size())]
    ncol = cdiv(d, c.BLOCK_N)
    s = row_splits(m, c.BLOCK_M, ncol, dev)
    pw = torch.empty((s, r, d), dtype=torch.float32, device=dev)
    pc = torch.empty((s, d), dtype=torch.float32, device=dev) if colsum else dummy(dev)
    _lowrank_dw_kernel[(ncol, s)](
        pm, q, seed_or_zero(seed, p, dev), pw, pc, m, d, r, s, float(p), inv_keep(p),
        int(q_drop and p > 0), int(colsum),
        BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, R_PAD=rp, PREC=dot_precision(q.dtype, dev), num_warps=c.num_warps,
        num_stages=c.num_stages)
    if s == 1:  # one split: the partial is the sum
        return pw[0], (pc[0] if colsum else None)
    return pw.sum(0), (pc.sum(0) if colsum else None)


def launch_fwd(x, weight, bias, a, b, p: float, seed, drop_input: bool):
    """The forward on validated arguments: the frozen GEMM and the rank-R up-projection on the vendor
    BLAS (out = addmm(bias, x, W^T), then out += u B^T in place); Triton only for the rank-R
    down-projection when a dropout mask is regenerated from the seed (input or rank dropout)."""
    x2 = rows_of(x)
    r = a.shape[0]
    if p > 0.0:
        a_c = a.contiguous()
        u, _ = launch_down(x2, a_c, a_c.shape[1], 1, r, p=p, seed=seed, in_drop=drop_input, out_drop=not drop_input)
    else:
        u = torch.mm(x2, a.t())
    return lowrank_up(x, weight, bias, u, b, x2), u


def lowrank_up(x, weight, bias, u, b, x2=None):
    """`launch_fwd`'s output given its u: out = addmm(bias, x, W^T), then out += u B^T in place
    (x2: x's rows, where the caller has them)."""
    x2 = rows_of(x) if x2 is None else x2
    out = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
    out.addmm_(u, b.t())
    return out.view(*x.shape[:-1], weight.shape[0])


def launch_bwd(grad_out, x, weight, a, b, u, p: float, seed, drop_input: bool, need=(True, True, True, True)):
    """The backward on validated arguments: (dx, da, db, dbias) in x's dtype, None where `need`
    (dx, da, db, dbias) says so. GEMMs on the vendor BLAS (dx = g W + dz A with addmm, dA = dz^T x,
    dB = g^T u); Triton regenerates the dropout masks: dz = drop'(g B) with rank dropout, and with
    input dropout dx's rank term (mask on [M, D]) and dA = dz^T drop(x)."""
    x2 = rows_of(x)
    g2 = rows_of(grad_out)
    r = a.shape[0]
    need_dx, need_da, need_db, need_dbias = need
    rank_drop = p > 0.0 and not drop_input
    in_drop = p > 0.0 and drop_input
    dz = None
    if need_dx or need_da:
        if rank_drop:  # dz = drop'(g B): B [N, R] read as P(r, k) = B[k, r]
            b_c = b.contiguous()
            dz, _ = launch_down(g2, b_c, 1, r, r, p=p, seed=seed, out_drop=True)
        else:
            dz = torch.mm(g2, b)
    dx = da = db = dbias = None
    if need_dx:
        if in_drop:  # dx = g W + (dz A) * keep_x / (1 - p): mask regenerated over [M, D]
            dx = launch_gemm(g2, weight.contiguous(), dz, a.contiguous(), x.shape[-1], trans=True, lr_mask=True,
                             p=p, seed=seed)
        else:
            dx = torch.mm(g2, weight)
            dx.addmm_(dz, a)
        dx = dx.view(x.shape)
    if need_da:
        if in_drop:
            da32, _ = launch_dw(dz, x2, q_drop=True, p=p, seed=seed)
            da = da32.to(x.dtype)
        else:
            da = torch.mm(dz.t(), x2)
    if need_db:
        db = torch.mm(g2.t(), u)
    if need_dbias:
        dbias = g2.sum(0)
    return dx, da, db, dbias


# ----------------------------------------------------------------------------------------------
# Per-row launchers (a mixed multi-task batch): x [B*L, D], per-image matrices [B, ., .] read by
# strides (stride 0 on the image axis: shared). One launch per op over the whole batch.
# ----------------------------------------------------------------------------------------------
MAX_IMAGES = MAX_GRID_YZ  # the image axis of the per-row kernels is grid axis 1


def launch_rows_down(x2, p_mat, images, stride_pi, stride_pr, stride_pk, r, *, p=0.0, seed=None, in_drop=False,
                     out_drop=False):
    """u [B*L, r] (x dtype) = drop_out(drop_in(x2_b) @ P_b^T) per image b (L = rows // images)."""
    m, d = x2.shape
    dev = x2.device
    out = torch.empty((m, r), dtype=x2.dtype, device=dev)
    if m == 0:
        return out
    rp = r_pad_of(r)
    in_drop = int(in_drop and p > 0)
    c = CONFIGS["lowrank_rows_down"][(rp, in_drop)]
    rows = m // images
    blocks = cdiv(rows, c.BLOCK_M)
    k_split, splits = column_splits(d, c.BLOCK_K, blocks * images, dev)  # (splits of the reduction here)
    if splits > 1:
        ps, lock = split_workspace(dev, splits * m * rp, blocks * images)
    else:
        ps = lock = dummy(dev)
    _lowrank_rows_down_kernel[(blocks, images, splits)](
        x2, p_mat, seed_or_zero(seed, p, dev), out, ps, lock, m, rows, d, r, stride_pi, stride_pr, stride_pk,
        float(p), inv_keep(p), int(out_drop and p > 0), k_split, splits,
        IN_DROP=in_drop, BLOCK_M=c.BLOCK_M, BLOCK_K=c.BLOCK_K, R_PAD=rp,
        PREC="ieee" if in_drop else dot_precision(x2.dtype, dev),  # (as launch_down)
        num_warps=c.num_warps, num_stages=c.num_stages)
    return out


def launch_rows_lr(out, u, p_mat, images, p, seed):
    """out [B*L, D] += keep(seed, p over [B*L, D]) * (u_b @ P_b) per image, in place; P [B, R, D]."""
    m, d = out.shape
    r = u.shape[1]
    if m == 0 or d == 0:
        return out
    c = CONFIGS["lowrank_rows_lr"][out.element_size()]
    rows = m // images
    _lowrank_rows_lr_kernel[(cdiv(rows, c.BLOCK_M) * cdiv(d, c.BLOCK_N), images)](
        out, u, p_mat, seed_or_zero(seed, p, out.device), rows, d, r, p_mat.stride(0), p_mat.stride(1),
        p_mat.stride(2), float(p), inv_keep(p),
        BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K, PREC=dot_precision(out.dtype, out.device),
        num_warps=c.num_warps, num_stages=c.num_stages)
    return out


def launch_rows_dw(pm, q, images, *, q_drop=False, p=0.0, seed=None):
    """[B, R, D] (q dtype) = P_b^T drop(Q_b) per image (fp32 sums), pm [B*L, R], q [B*L, D]."""
    m, r = pm.shape
    d = q.shape[1]
    out = torch.empty((images, r, d), dtype=q.dtype, device=q.device)
    if m == 0:
        return out.zero_()
    rp = r_pad_of(r)
    c = CONFIGS["lowrank_rows_dw"][(rp, q.element_size())]
    _lowrank_rows_dw_kernel[(cdiv(d, c.BLOCK_N), images)](
        pm, q, seed_or_zero(seed, p, q.device), out, m // images, d, r, float(p), inv_keep(p), int(q_drop and p > 0),
        BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, R_PAD=rp, PREC=dot_precision(q.dtype, q.device),
        num_warps=c.num_warps, num_stages=c.num_stages)
    return out


def _frozen_rows(x2, weight, bias, images, rows):
    """x2 W^T + bias on the vendor BLAS: bias [N] (addmm) or [B, N] (one per image)."""
    if bias is None:
        return torch.mm(x2, weight.t())
    if bias.dim() == 1:
        return torch.addmm(bias, x2, weight.t())
    out = torch.mm(x2, weight.t())
    out.view(images, rows, out.shape[1]).add_(bias.unsqueeze(1))
    return out


def launch_rows_fwd(x, weight, bias, a, b, p: float, seed, drop_input: bool):
    """The per-row forward on validated arguments, x [B, ..., D], a [B, R, D], b [B, N, R], bias
    None / [N] / [B, N]: the frozen GEMM over the whole batch on the vendor BLAS (addmm), the rank-R
    products per image as batched GEMMs (bmm / baddbmm), Triton for the down projection when a
    dropout mask is regenerated from the seed. Returns (out [B, ..., N], u [B*L, R])."""
    images = a.shape[0]
    x2 = rows_of(x)
    m, d = x2.shape
    n, r = weight.shape[0], a.shape[1]
    rows = m // images
    if p > 0.0:
        u = launch_rows_down(x2, a, images, a.stride(0), a.stride(1), a.stride(2), r, p=p, seed=seed,
                             in_drop=drop_input, out_drop=not drop_input)
    else:
        u = torch.bmm(x2.view(images, rows, d), a.transpose(1, 2)).view(m, r)
    out = _frozen_rows(x2, weight, bias, images, rows)
    out.view(images, rows, n).baddbmm_(u.view(images, rows, r), b.transpose(1, 2))
    return out.view(*x.shape[:-1], n), u


def launch_rows_bwd(grad_out, x, weight, a, b, u, p: float, seed, drop_input: bool, bias_rows: bool,
                    need=(True, True, True, True)):
    """The per-row backward: (dx, da [B, R, D], db [B, N, R], dbias [N] or [B, N] (`bias_rows`)), None
    where `need` (dx, da, db, dbias) says so. dx = g W (mm) + dz_b A_b, dA_b = dz_b^T x_b,
    dB_b = g_b^T u_b (bmm); Triton regenerates the masks: dz = drop'(g_b B_b) with rank dropout;
    with input dropout the masked rank term of dx and dA_b = dz_b^T drop(x_b)."""
    images = a.shape[0]
    x2, g2 = rows_of(x), rows_of(grad_out)
    m, d = x2.shape
    n, r = weight.shape[0], a.shape[1]
    rows = m // images
    need_dx, need_da, need_db, need_dbias = need
    rank_drop = p > 0.0 and not drop_input
    in_drop = p > 0.0 and drop_input
    g3 = g2.view(images, rows, n)
    dz = None
    if need_dx or need_da:
        if rank_drop:  # P(r, k) = B_b[k, r]
            dz = launch_rows_down(g2, b, images, b.stride(0), b.stride(2), b.stride(1), r, p=p, seed=seed,
                                  out_drop=True)
        else:
            dz = torch.bmm(g3, b).view(m, r)
    dx = da = db = dbias = None
    if need_dx:
        dx = torch.mm(g2, weight)
        if in_drop:
            launch_rows_lr(dx, dz, a, images, p, seed)
        else:
            dx.view(images, rows, d).baddbmm_(dz.view(images, rows, r), a)
        dx = dx.view(x.shape)
    if need_da:
        if in_drop:
            da = launch_rows_dw(dz, x2, images, q_drop=True, p=p, seed=seed)
        else:
            da = torch.bmm(dz.view(images, rows, r).transpose(1, 2), x2.view(images, rows, d))
    if need_db:
        db = torch.bmm(g3.transpose(1, 2), u.view(images, rows, r))
    if need_dbias:
        dbias = g3.sum(1) if bias_rows else g2.sum(0)
    return dx, da, db, dbias


# ----------------------------------------------------------------------------------------------
# Torch math with the kernels' saving policy (CPU / no Triton / R > MAX_RANK): saves x and u.
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Functionals
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile list (kernels/aot.py). The reduction width is the `D` argument of every
# kernel (compiled 16-divisible, as the JIT specialises it for ViT widths).
# ----------------------------------------------------------------------------------------------
def aot_specs():
    specs = []
    for dt in AOT_DTYPES:
        P = TRITON_PTR[dt]
        for (rp, in_drop), c in CONFIGS["lowrank_down"].items():
            sig = {"X": P, "P": P, "BIAS": P, "SEED": "*i64", "OUT": P, "PRE": "*fp32", "PS": "*fp32",
                   "LOCK": "*i32", "M": "i32", "D": "i32", "R": "i32", "stride_pr": "i32", "stride_pk": "i32",
                   "p": "fp32", "inv_keep": "fp32", "scale": "fp32", "out_drop": "i32",
                   "has_bias": "i32", "act": "i32", "save_pre": "i32", "k_split": "i32", "S": "i32"}
            specs.append(("lowrank_down_indrop" if in_drop else "lowrank_down", _lowrank_down_kernel, sig,
                          dict(IN_DROP=in_drop, BLOCK_M=c.BLOCK_M, BLOCK_K=c.BLOCK_K, R_PAD=rp, PREC="ieee"), c,
                          str(dt)))
        sig = {"X": P, "W": P, "U": P, "B": P, "BIAS": P, "SEED": "*i64", "OUT": P,
               "M": "i32", "N": "i32", "D": "i32", "R": "i32", "has_bias": "i32", "p": "fp32",
               "inv_keep": "fp32"}
        for name, trans, lr_mask in (("lowrank_gemm", 0, 0), ("lowrank_gemm_dx", 1, 0),
                                     ("lowrank_gemm_dx_drop", 1, 1)):
            c = CONFIGS["lowrank_gemm"][(lr_mask, dt.itemsize)]
            specs.append((name, _lowrank_gemm_kernel, sig,
                          dict(TRANS=trans, LR_MASK=lr_mask, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N,
                               BLOCK_K=c.BLOCK_K, GROUP=GROUP_M, PREC="ieee"), c, str(dt)))
        for rp in R_PADS:
            c = CONFIGS["lowrank_dw"][(rp, dt.itemsize)]
            sig = {"P": P, "Q": P, "SEED": "*i64", "PW": "*fp32", "PC": "*fp32", "M": "i32", "D": "i32",
                   "R": "i32", "S": "i32", "p": "fp32", "inv_keep": "fp32", "q_drop": "i32", "want_colsum": "i32"}
            specs.append(("lowrank_dw", _lowrank_dw_kernel, sig,
                          dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, R_PAD=rp, PREC="ieee"), c, str(dt)))
        for (rp, in_drop), c in CONFIGS["lowrank_rows_down"].items():
            sig = {"X": P, "P": P, "SEED": "*i64", "OUT": P, "PS": "*fp32", "LOCK": "*i32", "M": "i32", "L": "i32",
                   "D": "i32", "R": "i32", "stride_pi": "i32", "stride_pr": "i32", "stride_pk": "i32", "p": "fp32",
                   "inv_keep": "fp32", "out_drop": "i32", "k_split": "i32", "S": "i32"}
            specs.append(("lowrank_rows_down_indrop" if in_drop else "lowrank_rows_down", _lowrank_rows_down_kernel,
                          sig, dict(IN_DROP=in_drop, BLOCK_M=c.BLOCK_M, BLOCK_K=c.BLOCK_K, R_PAD=rp, PREC="ieee"),
                          c, str(dt)))
        c = CONFIGS["lowrank_rows_lr"][dt.itemsize]
        sig = {"OUT": P, "U": P, "P": P, "SEED": "*i64", "L": "i32", "D": "i32", "R": "i32", "stride_pi": "i32",
               "stride_pr": "i32", "stride_pk": "i32", "p": "fp32", "inv_keep": "fp32"}
        specs.append(("lowrank_rows_lr", _lowrank_rows_lr_kernel, sig,
                      dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K, PREC="ieee"), c, str(dt)))
        for rp in R_PADS:
            c = CONFIGS["lowrank_rows_dw"][(rp, dt.itemsize)]
            sig = {"P": P, "Q": P, "SEED": "*i64", "OUT": P, "L": "i32", "D": "i32", "R": "i32", "p": "fp32",
                   "inv_keep": "fp32", "q_drop": "i32"}
            specs.append(("lowrank_rows_dw", _lowrank_rows_dw_kernel, sig,
                          dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, R_PAD=rp, PREC="ieee"), c, str(dt)))
    return with_tf32_variants(specs, ieee_only=lambda cx: cx.get("IN_DROP") == 1)
