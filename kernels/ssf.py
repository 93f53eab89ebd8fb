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


@triton.jit(do_not_specialize=["act"])
def _ssf_fwd_kernel(
    X,      # [M, D] input (x dtype), contiguous
    SCALE,  # [D] γ
    SHIFT,  # [D] β
    Y,      # [M, D] output: act(x * γ + β)
    M, D, act,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    m2 = (rows < M)[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    g = tl.load(SCALE + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(SHIFT + cols, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=m2, other=0.0).to(tl.float32)
    y = x * g[None, :] + b[None, :]
    if act == 1:
        y = _gelu(y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["S", "act"])
def _ssf_bwd_kernel(
    G,      # [M, D] grad of y
    X,      # [M, D] saved input
    SCALE,  # [D] γ
    SHIFT,  # [D] β (read when act == 1)
    DX,     # [M, D] out: grad of x
    PS,     # [2, S, D] fp32 scratch: partial Σ dt * x (grad of γ), then partial Σ dt (grad of β)
    LOCK,   # [>= cdiv(D, BLOCK_N)] int32 arrival counters, zero (left zero)
    DSC,    # [D] out (x dtype): grad of γ = Σ dt * x
    DSH,    # [D] out (x dtype): grad of β = Σ dt
    M, D, S, act,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    gam = tl.load(SCALE + cols, mask=cmask, other=0.0).to(tl.float32)
    bet = tl.load(SHIFT + cols, mask=cmask, other=0.0).to(tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(pid_s * BLOCK_M, M, S * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        m2 = (rows < M)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        g = tl.load(G + offs, mask=m2, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=m2, other=0.0).to(tl.float32)
        if act == 1:
            g = g * _gelu_grad(x * gam[None, :] + bet[None, :])
        tl.store(DX + offs, (g * gam[None, :]).to(DX.dtype.element_ty), mask=m2)
        acc1 += tl.sum(g * x, axis=0)
        acc0 += tl.sum(g, axis=0)
    tl.store(PS + pid_s.to(tl.int64) * D + cols, acc1, mask=cmask)
    tl.store(PS + (S + pid_s).to(tl.int64) * D + cols, acc0, mask=cmask)
    if last_split(LOCK, pid_n, S):  # the last split of this column block finishes the sums
        s1, s0 = split_sums(PS, S, D, cols, cmask, BLOCK_N)
        tl.store(DSC + cols, s1.to(DSC.dtype.element_ty), mask=cmask)
        tl.store(DSH + cols, s0.to(DSH.dtype.element_ty), mask=cmask)
        tl.atomic_xchg(LOCK + pid_n, 0)


@triton.jit(do_not_specialize=["eps", "has_w", "has_b"])
def _layernorm_ssf_fwd_kernel(
    X,      # [M, D] input, contiguous
    LNW,    # [D] LayerNorm weight a (read when has_w)
    LNB,    # [D] LayerNorm bias c (read when has_b)
    SCALE,  # [D] γ
    SHIFT,  # [D] β
    Y,      # [M, D] out: (x̂ a + c) γ + β
    MEAN,   # [M] fp32 out
    RSTD,   # [M] fp32 out
    M, D, eps, has_w, has_b,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
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


@triton.jit(do_not_specialize=["S", "has_w", "has_b", "want_ln"])
def _layernorm_ssf_bwd_kernel(
    G,      # [M, D] grad of y
    X,      # [M, D] saved input
    LNW,    # [D] a (read when has_w)
    LNB,    # [D] c (read when has_b)
    SCALE,  # [D] γ
    MEAN,   # [M] fp32 saved
    RSTD,   # [M] fp32 saved
    DX,     # [M, D] out
    PS,     # [2, S, D] fp32 scratch: partial Σ g x̂, then partial Σ g
    LOCK,   # [>= 1] int32 arrival counter, zero (left zero)
    DW,     # [D] out (x dtype): d_ln_weight = γ S1 (written when want_ln)
    DB,     # [D] out (x dtype): d_ln_bias = γ S0 (written when want_ln)
    DSC,    # [D] out (x dtype): dγ = a S1 + c S0
    DSH,    # [D] out (x dtype): dβ = S0
    M, D, S, has_w, has_b, want_ln,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(SCALE + cols, mask=cmask, other=0.0).to(tl.float32)
    if has_w:
        w = w * tl.load(LNW + cols, mask=cmask, other=0.0).to(tl.float32)
    acc1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for m0 in range(pid * BLOCK_M, M, S * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
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
    if last_split(LOCK, 0, S):  # the last split finishes the column sums
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
        tl.atomic_xchg(LOCK, 0)


def launch_ssf_fwd(x, scale, shift, act: int):
    x2 = flat(x)
    d = x.shape[-1]
    m = x.numel() // d
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    c = CONFIGS["ssf_fwd"][0]
    _ssf_fwd_kernel[(cdiv(m, c.BLOCK_M), cdiv(d, c.BLOCK_N))](
        x2, scale.contiguous(), shift.contiguous(), y, m, d, act,
        BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, num_warps=c.num_warps, num_stages=c.num_stages)
    return y


def launch_ssf_bwd(grad_out, x, scale, shift, act: int):
    x2, g2 = flat(x), flat(grad_out)
    d = x.shape[-1]
    m = x.numel() // d
    dt, dev = x.dtype, x.device
    dx = torch.empty(x.shape, dtype=dt, device=dev)
    dscale = torch.empty(d, dtype=dt, device=dev)
    dshift = torch.empty(d, dtype=dt, device=dev)
    if m == 0:
        return dx, dscale.zero_(), dshift.zero_()
    c = CONFIGS["ssf_bwd"][0]
    ncol = cdiv(d, c.BLOCK_N)
    s = row_splits(m, c.BLOCK_M, ncol, dev)
    ps, lock = split_workspace(dev, 2 * s * d, ncol)
    _ssf_bwd_kernel[(ncol, s)](
        g2, x2, scale.contiguous(), shift.contiguous(), dx, ps, lock, dscale, dshift, m, d, s, act,
        BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, num_warps=c.num_warps, num_stages=c.num_stages)
    return dx, dscale, dshift


def launch_ln_fwd(x, ln_weight, ln_bias, scale, shift, eps: float):
    x2 = flat(x)
    d = x.shape[-1]
    m = x.numel() // d
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty((m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return y, mean, rstd
    bd = ln_block_d(d)
    c = CONFIGS["layernorm_ssf_fwd"][bd]
    sc = scale.contiguous()
    _layernorm_ssf_fwd_kernel[(cdiv(m, c.BLOCK_M),)](
        x2, ln_weight.contiguous() if ln_weight is not None else sc,
        ln_bias.contiguous() if ln_bias is not None else sc, sc, shift.contiguous(), y, mean, rstd,
        m, d, float(eps), int(ln_weight is not None), int(ln_bias is not None),
        BLOCK_M=c.BLOCK_M, BLOCK_D=bd, num_warps=c.num_warps, num_stages=c.num_stages)
    return y, mean, rstd


def launch_ln_bwd(grad_out, x, ln_weight, ln_bias, scale, mean, rstd, want_ln: bool = True):
    """(dx, d_ln_weight, d_ln_bias, dscale, dshift); the LayerNorm grads are None unless `want_ln`."""
    x2, g2 = flat(x), flat(grad_out)
    d = x.shape[-1]
    m = x.numel() // d
    dt, dev = x.dtype, x.device
    dx = torch.empty(x.shape, dtype=dt, device=dev)
    bd = ln_block_d(d)
    c = CONFIGS["layernorm_ssf_bwd"][bd]
    if m == 0:
        z = torch.zeros(d, dtype=torch.float32, device=dev)
        dx, dw, db, dscale, dshift = ln_finalize(dx, z, z, ln_weight, ln_bias, scale)
        return (dx, dw, db, dscale, dshift) if want_ln else (dx, None, None, dscale, dshift)
    s = row_splits(m, c.BLOCK_M, 1, dev)
    ps, lock = split_workspace(dev, 2 * s * d, 1)
    dscale = torch.empty(d, dtype=dt, device=dev)
    dshift = torch.empty(d, dtype=dt, device=dev)
    dw = torch.empty(d, dtype=dt, device=dev) if want_ln else None
    db = torch.empty(d, dtype=dt, device=dev) if want_ln else None
    sc = scale.contiguous()
    _layernorm_ssf_bwd_kernel[(s,)](
        g2, x2, ln_weight.contiguous() if ln_weight is not None else sc,
        ln_bias.contiguous() if ln_bias is not None else sc, sc, mean, rstd, dx, ps, lock,
        dw if want_ln else dscale, db if want_ln else dscale, dscale, dshift,
        m, d, s, int(ln_weight is not None), int(ln_bias is not None), int(want_ln),
        BLOCK_M=c.BLOCK_M, BLOCK_D=bd, num_warps=c.num_warps, num_stages=c.num_stages)
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
# Ahead-of-time compile list (kernels/aot.py)
# ----------------------------------------------------------------------------------------------
def aot_specs():
    specs = []
    for dt in AOT_DTYPES:
        P = TRITON_PTR[dt]
        c = CONFIGS["ssf_fwd"][0]
        specs.append(("ssf_fwd", _ssf_fwd_kernel,
                      {"X": P, "SCALE": P, "SHIFT": P, "Y": P, "M": "i32", "D": "i32", "act": "i32"},
                      dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N), c, str(dt)))
        c = CONFIGS["ssf_bwd"][0]
        specs.append(("ssf_bwd", _ssf_bwd_kernel,
                      {"G": P, "X": P, "SCALE": P, "SHIFT": P, "DX": P, "PS": "*fp32", "LOCK": "*i32",
                       "DSC": P, "DSH": P, "M": "i32", "D": "i32", "S": "i32", "act": "i32"},
                      dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N), c, str(dt)))
        for bd, c in CONFIGS["layernorm_ssf_fwd"].items():
            specs.append(("layernorm_ssf_fwd", _layernorm_ssf_fwd_kernel,
                          {"X": P, "LNW": P, "LNB": P, "SCALE": P, "SHIFT": P, "Y": P, "MEAN": "*fp32",
                           "RSTD": "*fp32", "M": "i32", "D": "i32", "eps": "fp32", "has_w": "i32", "has_b": "i32"},
                          dict(BLOCK_M=c.BLOCK_M, BLOCK_D=bd), c, str(dt)))
        for bd, c in CONFIGS["layernorm_ssf_bwd"].items():
            specs.append(("layernorm_ssf_bwd", _layernorm_ssf_bwd_kernel,
                          {"G": P, "X": P, "LNW": P, "LNB": P, "SCALE": P, "MEAN": "*fp32", "RSTD": "*fp32",
                           "DX": P, "PS": "*fp32", "LOCK": "*i32", "DW": P, "DB": P, "DSC": P, "DSH": P,
                           "M": "i32", "D": "i32", "S": "i32", "has_w": "i32", "has_b": "i32", "want_ln": "i32"},
                          dict(BLOCK_M=c.BLOCK_M, BLOCK_D=bd), c, str(dt)))
    return specs
