"""SSF family (dongzelian/SSF `models/vision_transformer.py`): scale-shift and its fusions with neighbours.

  ssf          y = x * γ + β                       (after qkv, attn.proj, fc2, patch embed)
  ssf_gelu     g = GELU(z * γ + β)                 (fc1 -> SSF -> GELU: saves only z)
  layernorm_ssf y = LN(x; a, c) * γ + β            (LN1, LN2, final norm: saves x, mean, rstd)

What each op saves for backward (besides its parameters, resident anyway):
  ssf: x (its input).  ssf_gelu: z (its input), instead of eager's z, z*γ+β and GELU's input.
  layernorm_ssf: x (its input) and per-row mean/rstd in fp32 (8 B per row); x̂ is recomputed.

Kernels (ops, functionals and references: fastpeft/ops/ssf.py):
  _ssf_fwd_kernel / _ssf_bwd_kernel                       elementwise (runtime act: 0 none, 1 gelu)
  _layernorm_ssf_fwd_kernel / _layernorm_ssf_bwd_kernel   row-wise LN + affine
  launch_ssf_fwd / launch_ssf_bwd / launch_ln_fwd / launch_ln_bwd   launchers
  launch_ssf_rows_* / launch_ln_rows_*    the same kernels with ROWS=True: a mixed multi-task batch,
                                          each image with its own parameters (see that section)

Column reductions (grads of γ, β, a, c) are deterministic and finished in the backward launch
itself: each of S row-split programs accumulates fp32 partials for its rows in registers and
writes them to a cached [2, S, D] scratch (`_common.split_workspace`); the program that arrives
last at its column block's counter (`_common.last_split`) sums the S partials in split order and
writes the gradients. One launch per op in forward and one in backward.
For LayerNorm + SSF only two column sums are needed: S1 = Σ g·x̂ and S0 = Σ g, then
dγ = a·S1 + c·S0, dβ = S0, da = γ·S1, dc = γ·S0.
The plain scale-shift has one registered op, the extension's `fastpeft::scale_shift`; these
kernels are its eager Triton path and its CUDA kernels in a build without CUDA sources.
"""
from __future__ import annotations

import functools

import torch

from ._common import tl, triton
from ._common import (AOT_DTYPES, TRITON_PTR, cdiv, next_pow2, flat, last_split, row_splits, split_sums,
                      split_workspace)
from ._common import Cfg

ACTS = {"none": 0, "gelu": 1}
MAX_LN_WIDTH = 8192

# Single source of truth for launchers and kernels/aot.py.
CONFIGS: dict[str, dict[int, Cfg]] = {
    # elementwise tiles [BLOCK_M, BLOCK_N]; one config for every width (D is a runtime bound)
    "ssf_fwd": {0: Cfg(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=1)},
    "ssf_bwd": {0: Cfg(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=1)},
    # keyed by BLOCK_D = next_pow2(D) (>= 64): a whole row per tile; BLOCK_M rows per step so a
    # tile holds ~4K elements (fp32: 32 values per thread at 4 warps).
    "layernorm_ssf_fwd": {
        64: Cfg(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1),
        128: Cfg(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=1),
        256: Cfg(BLOCK_M=16, BLOCK_N=256, num_warps=4, num_stages=1),
        512: Cfg(BLOCK_M=8, BLOCK_N=512, num_warps=4, num_stages=1),
        1024: Cfg(BLOCK_M=4, BLOCK_N=1024, num_warps=4, num_stages=1),
        2048: Cfg(BLOCK_M=2, BLOCK_N=2048, num_warps=8, num_stages=1),
        4096: Cfg(BLOCK_M=1, BLOCK_N=4096, num_warps=8, num_stages=1),
        8192: Cfg(BLOCK_M=1, BLOCK_N=8192, num_warps=16, num_stages=1),
    },
    "layernorm_ssf_bwd": {
        64: Cfg(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1),
        128: Cfg(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=1),
        256: Cfg(BLOCK_M=8, BLOCK_N=256, num_warps=4, num_stages=1),
        512: Cfg(BLOCK_M=4, BLOCK_N=512, num_warps=4, num_stages=1),
        1024: Cfg(BLOCK_M=2, BLOCK_N=1024, num_warps=4, num_stages=1),
        2048: Cfg(BLOCK_M=1, BLOCK_N=2048, num_warps=8, num_stages=1),
        4096: Cfg(BLOCK_M=1, BLOCK_N=4096, num_warps=8, num_stages=1),
        8192: Cfg(BLOCK_M=1, BLOCK_N=8192, num_warps=16, num_stages=1),
    },
}


def ln_block_d(d: int) -> int:
    return max(64, next_pow2(d))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gelu(t):
    return 0.5 * t * (1.0 + tl.math.erf(t * 0.7071067811865476))


@triton.jit
def _gelu_grad(t):
    return 0.5 * (1.0 + tl.math.erf(t * 0.7071067811865476)) + t * 0.3989422804014327 * tl.exp(-0.5 * t * t)


@triton.jit(do_not_specialize=["act", "R", "SC_IMG", "SH_IMG"])
def _ssf_fwd_kernel(
    X,      # [M, D] input (x dtype), contiguous
    SCALE,  # [D] γ; ROWS: image i's γ at SCALE + i D when SC_IMG
    SHIFT,  # [D] β; ROWS: image i's β at SHIFT + i D when SH_IMG
    Y,      # [M, D] output: act(x * γ + β)
    M, D, act,
    R, SC_IMG, SH_IMG,  # ROWS only: rows per image (M = B R); γ, β per image (1: [B, D]) or shared (0)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,  # a mixed multi-task batch: grid axis 2 is the image, with its own γ / β
):
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    if ROWS:
        img = tl.program_id(2)
        local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = local < R
        rows = img * R + local
        g = tl.load(SCALE + img.to(tl.int64) * D * SC_IMG + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(SHIFT + img.to(tl.int64) * D * SH_IMG + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        g = tl.load(SCALE + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(SHIFT + cols, mask=cmask, other=0.0).to(tl.float32)
    m2 = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=m2, other=0.0).to(tl.float32)
    y = x * g[None, :] + b[None, :]
    if act == 1:
        y = _gelu(y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["S", "act", "R", "SC_IMG", "SH_IMG"])
def _ssf_bwd_kernel(
    G,      # [M, D] grad of y
    X,      # [M, D] saved input
    SCALE,  # [D] γ; ROWS: image i's at SCALE + i D when SC_IMG
    SHIFT,  # [D] β (read when act == 1); ROWS: image i's at SHIFT + i D when SH_IMG
    DX,     # [M, D] out: grad of x
    PS,     # [2, S, D] fp32 scratch: partial Σ dt * x (grad of γ), then partial Σ dt (grad of β);
            # ROWS: one [2, S, D] per image
    LOCK,   # [>= cdiv(D, BLOCK_N)] int32 arrival counters, zero (left zero); ROWS: per image too
    DSC,    # [D] out (x dtype): grad of γ = Σ dt * x; ROWS: [B, D], image i's sum over its rows
    DSH,    # [D] out (x dtype): grad of β = Σ dt; ROWS: [B, D]
    M, D, S, act,
    R, SC_IMG, SH_IMG,  # ROWS only: rows per image (M = B R); γ, β per image (1: [B, D]) or shared (0)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,  # a mixed multi-task batch: grid axis 2 is the image (S splits of its rows)
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    if ROWS:
        img = tl.program_id(2)
        first = img * R
        nrows = R
        gam = tl.load(SCALE + img.to(tl.int64) * D * SC_IMG + cols, mask=cmask, other=0.0).to(tl.float32)
        bet = tl.load(SHIFT + img.to(tl.int64) * D * SH_IMG + cols, mask=cmask, other=0.0).to(tl.float32)
        PS += img.to(tl.int64) * 2 * S * D
        lock = img * tl.num_programs(0) + pid_n
        DSC += img.to(tl.int64) * D
        DSH += img.to(tl.int64) * D
    else:
        first = 0
        nrows = M
        gam = tl.load(SCALE + cols, mask=cmask, other=0.0).to(tl.float32)
        bet = tl.load(SHIFT + cols, mask=cmask, other=0.0).to(tl.float32)
        lock = pid_n
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(pid_s * BLOCK_M, nrows, S * BLOCK_M):
        local = m0 + tl.arange(0, BLOCK_M)
        m2 = (local < nrows)[:, None] & cmask[None, :]
        offs = (first + local).to(tl.int64)[:, None] * D + cols[None, :]
        g = tl.load(G + offs, mask=m2, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=m2, other=0.0).to(tl.float32)
        if act == 1:
            g = g * _gelu_grad(x * gam[None, :] + bet[None, :])
        tl.store(DX + offs, (g * gam[None, :]).to(DX.dtype.element_ty), mask=m2)
        acc1 += tl.sum(g * x, axis=0)
        acc0 += tl.sum(g, axis=0)
    tl.store(PS + pid_s.to(tl.int64) * D + cols, acc1, mask=cmask)
    tl.store(PS + (S + pid_s).to(tl.int64) * D + cols, acc0, mask=cmask)
    if last_split(LOCK, lock, S):  # the last split of this column block finishes the sums
        s1, s0 = split_sums(PS, S, D, cols, cmask, BLOCK_N)
        tl.store(DSC + cols, s1.to(DSC.dtype.element_ty), mask=cmask)
        tl.store(DSH + cols, s0.to(DSH.dtype.element_ty), mask=cmask)
        tl.atomic_xchg(LOCK + lock, 0)


@triton.jit(do_not_specialize=["eps", "has_w", "has_b", "R", "W_IMG", "B_IMG", "SC_IMG", "SH_IMG"])
def _layernorm_ssf_fwd_kernel(
    X,      # [M, D] input, contiguous
    LNW,    # [D] LayerNorm weight a (read when has_w); ROWS: image i's at LNW + i D when W_IMG
    LNB,    # [D] LayerNorm bias c (read when has_b); ROWS: image i's at LNB + i D when B_IMG
    SCALE,  # [D] γ; ROWS: image i's at SCALE + i D when SC_IMG
    SHIFT,  # [D] β; ROWS: image i's at SHIFT + i D when SH_IMG
    Y,      # [M, D] out: (x̂ a + c) γ + β
    MEAN,   # [M] fp32 out
    RSTD,   # [M] fp32 out
    M, D, eps, has_w, has_b,
    R, W_IMG, B_IMG, SC_IMG, SH_IMG,  # ROWS only: rows per image (M = B R); a, c, γ, β each per image
                                      # (1: [B, D]) or shared (0: [D])
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,  # a mixed multi-task batch: grid axis 1 is the image, with its own a, c, γ, β
):
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if ROWS:
        img = tl.program_id(1)
        local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = local < R
        rows = img * R + local
        off = img.to(tl.int64) * D  # image i's parameter row, where per image
        LNW += off * W_IMG
        LNB += off * B_IMG
        SCALE += off * SC_IMG
        SHIFT += off * SH_IMG
    else:
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
    m2 = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=m2, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(m2, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)
    gam = tl.load(SCALE + cols, mask=cmask, other=0.0).to(tl.float32)
    bet = tl.load(SHIFT + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None]
    if has_w:
        y = y * tl.load(LNW + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if has_b:
        y = y + tl.load(LNB + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = y * gam[None, :] + bet[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["S", "has_w", "has_b", "want_ln", "R", "W_IMG", "B_IMG", "SC_IMG"])
def _layernorm_ssf_bwd_kernel(
    G,      # [M, D] grad of y
    X,      # [M, D] saved input
    LNW,    # [D] a (read when has_w); ROWS: image i's at LNW + i D when W_IMG
    LNB,    # [D] c (read when has_b); ROWS: image i's at LNB + i D when B_IMG
    SCALE,  # [D] γ; ROWS: image i's at SCALE + i D when SC_IMG
    MEAN,   # [M] fp32 saved
    RSTD,   # [M] fp32 saved
    DX,     # [M, D] out
    PS,     # [2, S, D] fp32 scratch: partial Σ g x̂, then partial Σ g; ROWS: one per image
    LOCK,   # [>= 1] int32 arrival counter, zero (left zero); ROWS: [>= B], one per image
    DW,     # [D] out (x dtype): d_ln_weight = γ S1 (written when want_ln); ROWS: [B, D] per image
    DB,     # [D] out (x dtype): d_ln_bias = γ S0 (written when want_ln); ROWS: [B, D]
    DSC,    # [D] out (x dtype): dγ = a S1 + c S0; ROWS: [B, D]
    DSH,    # [D] out (x dtype): dβ = S0; ROWS: [B, D]
    M, D, S, has_w, has_b, want_ln,
    R, W_IMG, B_IMG, SC_IMG,  # ROWS only: rows per image (M = B R); a, c, γ each per image (1: [B, D])
                              # or shared (0: [D])
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,  # a mixed multi-task batch: grid axis 1 is the image (S splits of its rows)
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if ROWS:
        img = tl.program_id(1)
        first = img * R
        nrows = R
        off = img.to(tl.int64) * D  # image i's parameter / gradient row
        LNW += off * W_IMG
        LNB += off * B_IMG
        SCALE += off * SC_IMG
        PS += off * 2 * S
        DW += off
        DB += off
        DSC += off
        DSH += off
        lock = img
    else:
        first = 0
        nrows = M
        lock = 0
    w = tl.load(SCALE + cols, mask=cmask, other=0.0).to(tl.float32)
    if has_w:
        w = w * tl.load(LNW + cols, mask=cmask, other=0.0).to(tl.float32)
    acc1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for m0 in range(pid * BLOCK_M, nrows, S * BLOCK_M):
        local = m0 + tl.arange(0, BLOCK_M)
        rmask = local < nrows
        rows = first + local
        m2 = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=m2, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=m2, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)
        dxhat = g * w[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / D
        c2 = tl.sum(dxhat, axis=1) / D
        dx = (dxhat - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=m2)
        acc1 += tl.sum(g * xhat, axis=0)
        acc0 += tl.sum(g, axis=0)
    tl.store(PS + pid.to(tl.int64) * D + cols, acc1, mask=cmask)
    tl.store(PS + (S + pid).to(tl.int64) * D + cols, acc0, mask=cmask)
    if last_split(LOCK, lock, S):  # the last split finishes the column sums
        s1, s0 = split_sums(PS, S, D, cols, cmask, BLOCK_D)
        gam = tl.load(SCALE + cols, mask=cmask, other=0.0).to(tl.float32)
        if want_ln:
            tl.store(DW + cols, (gam * s1).to(DW.dtype.element_ty), mask=cmask)
            tl.store(DB + cols, (gam * s0).to(DB.dtype.element_ty), mask=cmask)
        ds = s1
        if has_w:
            ds = tl.load(LNW + cols, mask=cmask, other=0.0).to(tl.float32) * s1
        if has_b:
            ds += tl.load(LNB + cols, mask=cmask, other=0.0).to(tl.float32) * s0
        tl.store(DSC + cols, ds.to(DSC.dtype.element_ty), mask=cmask)
        tl.store(DSH + cols, s0.to(DSH.dtype.element_ty), mask=cmask)
        tl.atomic_xchg(LOCK + lock, 0)


def launch_ssf_fwd(x, scale, shift, act: int):
    x2, d, m, y = _ssf_output(x)
    if m == 0:
        return y
    c = CONFIGS["ssf_fwd"][0]
    _ssf_fwd_kernel[(cdiv(m, c.BLOCK_M), cdiv(d, c.BLOCK_N))](
        x2, scale.contiguous(), shift.contiguous(), y, m, d, act, m, 0, 0,
        BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, ROWS=False, num_warps=c.num_warps, num_stages=c.num_stages)
    return y


@functools.lru_cache(maxsize=512)
def _bwd_grid(m: int, d: int, block_m: int, block_n: int, dev) -> tuple[int, int]:
    """(column blocks, row splits) of a single-task backward launch (`launch_ssf_bwd` /
    `launch_ln_bwd`): it depends on the shape and the device only, so it is worked out once."""
    ncol = cdiv(d, block_n)
    return ncol, row_splits(m, block_m, ncol, dev)


def launch_ssf_bwd(grad_out, x, scale, shift, act: int):
    x2, g2 = flat(x), flat(grad_out)
    d = x2.shape[-1]
    m = x2.numel() // d
    sc = scale.contiguous()
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    dscale, dshift = torch.empty_like(sc), torch.empty_like(sc)  # (scale: [d] in x's dtype)
    if m == 0:
        return dx, dscale.zero_(), dshift.zero_()
    dev = x2.device
    c = CONFIGS["ssf_bwd"][0]
    ncol, s = _bwd_grid(m, d, c.BLOCK_M, c.BLOCK_N, dev)
    ps, lock = split_workspace(dev, 2 * s * d, ncol)
    _ssf_bwd_kernel[(ncol, s)](
        g2, x2, sc, shift.contiguous(), dx, ps, lock, dscale, dshift, m, d, s, act, m, 0, 0,
        BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, ROWS=False, num_warps=c.num_warps, num_stages=c.num_stages)
    return dx, dscale, dshift


def _ssf_output(x):
    """(x as [M, D] rows, D, M, y: a contiguous tensor like x): a forward launch's output."""
    x2 = flat(x)
    d = x.shape[-1]
    m = x.numel() // d
    return x2, d, m, torch.empty_like(x2, memory_format=torch.contiguous_format)


def _ln_outputs(x):
    """(x as [M, D] rows, D, M, y like x, mean [M], rstd [M] fp32): a LayerNorm+SSF forward's outputs."""
    x2, d, m, y = _ssf_output(x)
    mean = torch.empty((m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    return x2, d, m, y, mean, rstd


def launch_ln_fwd(x, ln_weight, ln_bias, scale, shift, eps: float):
    x2, d, m, y, mean, rstd = _ln_outputs(x)
    if m == 0:
        return y, mean, rstd
    bd = ln_block_d(d)
    c = CONFIGS["layernorm_ssf_fwd"][bd]
    sc = scale.contiguous()
    _layernorm_ssf_fwd_kernel[(cdiv(m, c.BLOCK_M),)](
        x2, sc if ln_weight is None else ln_weight.contiguous(), sc if ln_bias is None else ln_bias.contiguous(),
        sc, shift.contiguous(), y, mean, rstd,
        m, d, float(eps), int(ln_weight is not None), int(ln_bias is not None), m, 0, 0, 0, 0,
        BLOCK_M=c.BLOCK_M, BLOCK_D=bd, ROWS=False, num_warps=c.num_warps, num_stages=c.num_stages)
    return y, mean, rstd


def launch_ln_bwd(grad_out, x, ln_weight, ln_bias, scale, mean, rstd, want_ln: bool = True):
    """(dx, d_ln_weight, d_ln_bias, dscale, dshift); the LayerNorm grads are None unless `want_ln`."""
    x2, g2 = flat(x), flat(grad_out)
    d = x2.shape[-1]
    m = x2.numel() // d
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    bd = ln_block_d(d)
    c = CONFIGS["layernorm_ssf_bwd"][bd]
    if m == 0:
        z = torch.zeros(d, dtype=torch.float32, device=x2.device)
        dx, dw, db, dscale, dshift = ln_finalize(dx, z, z, ln_weight, ln_bias, scale)
        return (dx, dw, db, dscale, dshift) if want_ln else (dx, None, None, dscale, dshift)
    dev = x2.device
    _, s = _bwd_grid(m, d, c.BLOCK_M, bd, dev)
    ps, lock = split_workspace(dev, 2 * s * d, 1)
    sc = scale.contiguous()  # [d] in x's dtype: the d-vector outputs are allocated like it
    dscale, dshift = torch.empty_like(sc), torch.empty_like(sc)
    if want_ln:
        dw, db = torch.empty_like(sc), torch.empty_like(sc)
    else:
        dw = db = None
    _layernorm_ssf_bwd_kernel[(s,)](
        g2, x2, sc if ln_weight is None else ln_weight.contiguous(), sc if ln_bias is None else ln_bias.contiguous(),
        sc, mean, rstd, dx, ps, lock, dscale if dw is None else dw, dscale if db is None else db, dscale, dshift,
        m, d, s, int(ln_weight is not None), int(ln_bias is not None), int(want_ln), m, 0, 0, 0,
        BLOCK_M=c.BLOCK_M, BLOCK_D=bd, ROWS=False, num_warps=c.num_warps, num_stages=c.num_stages)
    return dx, dw, db, dscale, dshift


def ln_finalize(dx, s1, s0, ln_weight, ln_bias, scale):
    """dγ = a·S1 + c·S0, dβ = S0, da = γ·S1, dc = γ·S0 (S1 = Σ g x̂, S0 = Σ g; fp32)."""
    dt = dx.dtype
    gam = scale.float()
    a = ln_weight.float() if ln_weight is not None else 1.0
    dscale = a * s1
    if ln_bias is not None:
        dscale = dscale + ln_bias.float() * s0
    return dx, (gam * s1).to(dt), (gam * s0).to(dt), dscale.to(dt), s0.to(dt)


# ----------------------------------------------------------------------------------------------
# Per-image launchers: a mixed multi-task batch (fastpeft/ops/_rows.py), where each of the B images
# (M / B contiguous rows of x) has its own γ / β (and LayerNorm a / c when those are per task too).
# The same kernels with ROWS=True and the same tiles: a grid axis over the images, so a row block
# never straddles two images and each image's parameter gradients are its own column sums, finished
# in the launch like the single-task ones (one [2, S, D] partial buffer and counter set per image).
# A parameter is [B, D] (per image, contiguous) or [D] (shared); a shared parameter's
# per-image gradients are accumulated in fp32 and summed over the images.
# ----------------------------------------------------------------------------------------------
def _per_image(t) -> int:
    """1 for a (contiguous) [B, D] parameter, row i image i's; 0 for a shared [D] one (or None). A
    flag, not a stride: the kernels offset by i * D, whose 16-divisibility the JIT knows, so the
    parameter loads stay vectorised (an unknown stride would not be)."""
    return 0 if t is None or t.dim() == 1 else 1


def _rows_grad(p, b: int, d: int, dt, dev):
    """Per-image gradient buffer [B, D] for parameter p: p's dtype when p is per image, fp32 when
    shared (then summed by `_rows_total`)."""
    return torch.empty((b, d), dtype=dt if p.dim() == 2 else torch.float32, device=dev)


def _rows_total(p, g):
    return g if p.dim() == 2 else g.sum(0).to(p.dtype)


def launch_ssf_rows_fwd(x, scale, shift, act: int, b: int):
    """act(x * γ_i + β_i) on image i's rows: x [B, ..., D] (B images of M / B rows), γ, β [B, D] or [D]."""
    x2, d, m, y = _ssf_output(x)
    if m == 0:
        return y
    r = m // b
    c = CONFIGS["ssf_fwd"][0]
    sc, sh = scale.contiguous(), shift.contiguous()
    _ssf_fwd_kernel[(cdiv(r, c.BLOCK_M), cdiv(d, c.BLOCK_N), b)](
        x2, sc, sh, y, m, d, act, r, _per_image(sc), _per_image(sh),
        BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, ROWS=True, num_warps=c.num_warps, num_stages=c.num_stages)
    return y


def launch_ssf_rows_bwd(grad_out, x, scale, shift, act: int, b: int):
    """(dx, dγ, dβ): dγ, dβ [B, D] (image i's sums over its rows) for per-image γ, β; [D] for shared."""
    x2, g2 = flat(x), flat(grad_out)
    d = x.shape[-1]
    m = x.numel() // d
    dev = x.device
    sc, sh = scale.contiguous(), shift.contiguous()
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    dsc, dsh = _rows_grad(sc, b, d, sc.dtype, dev), _rows_grad(sh, b, d, sh.dtype, dev)
    if m == 0:
        return dx, _rows_total(sc, dsc.zero_()), _rows_total(sh, dsh.zero_())
    r = m // b
    c = CONFIGS["ssf_bwd"][0]
    ncol = cdiv(d, c.BLOCK_N)
    s = row_splits(r, c.BLOCK_M, ncol * b, dev)
    ps, lock = split_workspace(dev, 2 * s * d * b, ncol * b)
    _ssf_bwd_kernel[(ncol, s, b)](
        g2, x2, sc, sh, dx, ps, lock, dsc, dsh, m, d, s, act, r, _per_image(sc), _per_image(sh),
        BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, ROWS=True, num_warps=c.num_warps, num_stages=c.num_stages)
    return dx, _rows_total(sc, dsc), _rows_total(sh, dsh)


def launch_ln_rows_fwd(x, ln_weight, ln_bias, scale, shift, eps: float, b: int):
    """(y, mean [M], rstd [M]): LN(x; a_i, c_i) γ_i + β_i on image i's rows; each of a, c, γ, β
    [B, D] or [D] (a, c may be None)."""
    x2, d, m, y, mean, rstd = _ln_outputs(x)
    if m == 0:
        return y, mean, rstd
    r = m // b
    bd = ln_block_d(d)
    c = CONFIGS["layernorm_ssf_fwd"][bd]
    sc = scale.contiguous()
    w = ln_weight.contiguous() if ln_weight is not None else None
    lb = ln_bias.contiguous() if ln_bias is not None else None
    sh = shift.contiguous()
    _layernorm_ssf_fwd_kernel[(cdiv(r, c.BLOCK_M), b)](
        x2, w if w is not None else sc, lb if lb is not None else sc, sc, sh, y, mean, rstd,
        m, d, float(eps), int(w is not None), int(lb is not None),
        r, _per_image(w), _per_image(lb), _per_image(sc), _per_image(sh),
        BLOCK_M=c.BLOCK_M, BLOCK_D=bd, ROWS=True, num_warps=c.num_warps, num_stages=c.num_stages)
    return y, mean, rstd


def launch_ln_rows_bwd(grad_out, x, ln_weight, ln_bias, scale, shift, mean, rstd, b: int, want_ln: bool = True):
    """(dx, da, dc, dγ, dβ) of `launch_ln_rows_fwd`, each parameter's gradient shaped like it ([B, D]
    per image, [D] shared); da, dc are None unless `want_ln` (and None for an absent a / c).
    `shift` is only read for its shape."""
    x2, g2 = flat(x), flat(grad_out)
    d = x.shape[-1]
    m = x.numel() // d
    dev = x.device
    sc = scale.contiguous()
    w = ln_weight.contiguous() if ln_weight is not None else None
    lb = ln_bias.contiguous() if ln_bias is not None else None
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    dsc, dsh = _rows_grad(sc, b, d, sc.dtype, dev), _rows_grad(shift, b, d, sc.dtype, dev)
    want_ln = want_ln and (w is not None or lb is not None)
    # (both written when want_ln, an absent one's into its own unused buffer: no aliasing)
    dw = _rows_grad(sc if w is None else w, b, d, sc.dtype, dev) if want_ln else None
    db = _rows_grad(sc if lb is None else lb, b, d, sc.dtype, dev) if want_ln else None
    if m == 0:
        for t in (dsc, dsh, dw, db):
            if t is not None:
                t.zero_()
    else:
        r = m // b
        bd = ln_block_d(d)
        c = CONFIGS["layernorm_ssf_bwd"][bd]
        s = row_splits(r, c.BLOCK_M, b, dev)
        ps, lock = split_workspace(dev, 2 * s * d * b, b)
        _layernorm_ssf_bwd_kernel[(s, b)](
            g2, x2, w if w is not None else sc, lb if lb is not None else sc, sc, mean, rstd, dx, ps, lock,
            dw if dw is not None else dsc, db if db is not None else dsc, dsc, dsh,
            m, d, s, int(w is not None), int(lb is not None), int(want_ln), r,
            _per_image(w), _per_image(lb), _per_image(sc),
            BLOCK_M=c.BLOCK_M, BLOCK_D=bd, ROWS=True, num_warps=c.num_warps, num_stages=c.num_stages)
    return (dx, None if dw is None or w is None else _rows_total(w, dw),
            None if db is None or lb is None else _rows_total(lb, db), _rows_total(sc, dsc), _rows_total(shift, dsh))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile list (kernels/aot.py)
# ----------------------------------------------------------------------------------------------
def aot_specs():
    """Each kernel twice: the single-task form (ROWS=False) and the per-image one of a mixed
    multi-task batch (ROWS=True, `*_rows_*`), with the same tiles."""
    specs = []
    for dt in AOT_DTYPES:
        P = TRITON_PTR[dt]
        for rows, tag in ((False, ""), (True, "_rows")):
            c = CONFIGS["ssf_fwd"][0]
            specs.append((f"ssf{tag}_fwd", _ssf_fwd_kernel,
                          {"X": P, "SCALE": P, "SHIFT": P, "Y": P, "M": "i32", "D": "i32", "act": "i32",
                           "R": "i32", "SC_IMG": "i32", "SH_IMG": "i32"},
                          dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, ROWS=rows), c, str(dt)))
            c = CONFIGS["ssf_bwd"][0]
            specs.append((f"ssf{tag}_bwd", _ssf_bwd_kernel,
                          {"G": P, "X": P, "SCALE": P, "SHIFT": P, "DX": P, "PS": "*fp32", "LOCK": "*i32",
                           "DSC": P, "DSH": P, "M": "i32", "D": "i32", "S": "i32", "act": "i32",
                           "R": "i32", "SC_IMG": "i32", "SH_IMG": "i32"},
                          dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, ROWS=rows), c, str(dt)))
            for bd, c in CONFIGS["layernorm_ssf_fwd"].items():
                specs.append((f"layernorm_ssf{tag}_fwd", _layernorm_ssf_fwd_kernel,
                              {"X": P, "LNW": P, "LNB": P, "SCALE": P, "SHIFT": P, "Y": P, "MEAN": "*fp32",
                               "RSTD": "*fp32", "M": "i32", "D": "i32", "eps": "fp32", "has_w": "i32",
                               "has_b": "i32", "R": "i32", "W_IMG": "i32", "B_IMG": "i32", "SC_IMG": "i32",
                               "SH_IMG": "i32"},
                              dict(BLOCK_M=c.BLOCK_M, BLOCK_D=bd, ROWS=rows), c, str(dt)))
            for bd, c in CONFIGS["layernorm_ssf_bwd"].items():
                specs.append((f"layernorm_ssf{tag}_bwd", _layernorm_ssf_bwd_kernel,
                              {"G": P, "X": P, "LNW": P, "LNB": P, "SCALE": P, "MEAN": "*fp32", "RSTD": "*fp32",
                               "DX": P, "PS": "*fp32", "LOCK": "*i32", "DW": P, "DB": P, "DSC": P, "DSH": P,
                               "M": "i32", "D": "i32", "S": "i32", "has_w": "i32", "has_b": "i32",
                               "want_ln": "i32", "R": "i32", "W_IMG": "i32", "B_IMG": "i32", "SC_IMG": "i32"},
                              dict(BLOCK_M=c.BLOCK_M, BLOCK_D=bd, ROWS=rows), c, str(dt)))
    return specs
