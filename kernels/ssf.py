"""SSF family (dongzelian/SSF `models/vision_transformer.py`): scale-shift and its fusions with neighbours.

  ssf          y = x * γ + β                       (after qkv, attn.proj, fc2, patch embed)
  ssf_gelu     g = GELU(z * γ + β)                 (fc1 -> SSF -> GELU: saves only z)
  layernorm_ssf y = LN(x; a, c) * γ + β            (LN1, LN2, final norm: saves x, mean, rstd)

What each op saves for backward (besides its parameters, resident anyway):
  ssf: x (its input).  ssf_gelu: z (its input), instead of eager's z, z*γ+β and GELU's input.
  layernorm_ssf: x (its input) and per-row mean/rstd in fp32 (8 B per row); x̂ is recomputed.

Layers:
  _ssf_fwd_kernel / _ssf_bwd_kernel                       elementwise (runtime act: 0 none, 1 gelu)
  _layernorm_ssf_fwd_kernel / _layernorm_ssf_bwd_kernel   row-wise LN + affine
  ssf_fwd / ssf_bwd / layernorm_ssf_fwd / layernorm_ssf_bwd   launchers
  torch.ops.fastpeft.{ssf_triton, ssf_gelu, ssf_backward, layernorm_ssf, layernorm_ssf_backward}
  ssf / ssf_gelu / layernorm_ssf                           functionals
  ssf_ref / ssf_gelu_ref / layernorm_ssf_ref               plain-torch references

Column reductions (grads of γ, β, a, c) are deterministic and finished in the backward launch
itself: each of S row-split programs accumulates fp32 partials for its rows in registers and
writes them to a cached [2, S, D] scratch (`_common.split_workspace`); the program that arrives
last at its column block's counter (`_common.last_split`) sums the S partials in split order and
writes the gradients. One launch per op in forward and one in backward.
For LayerNorm + SSF only two column sums are needed: S1 = Σ g·x̂ and S0 = Σ g, then
dγ = a·S1 + c·S0, dβ = S0, da = γ·S1, dc = γ·S0.
(`fastpeft::scale_shift` is the C++ extension's op; this file's Triton one is `ssf_triton`.)
"""
from __future__ import annotations

import torch

from ._common import tl, triton
from ._common import (AOT_DTYPES, TRITON_PTR, CheckedSignatures, cdiv, check_tensor, describe, next_pow2,
                      flat, last_split, row_splits, rows_of, split_sums, split_workspace, use_triton)
from ._common import Cfg, cast_param

ACTS = {"none": 0, "gelu": 1}
MAX_LN_WIDTH = 8192
# The fp32 torch path takes aten's native LayerNorm forward / backward from this width up, the
# step-by-step math below it: the native CPU backward forms x̂ as x·rstd - mean·rstd, which cancels
# when a row's spread is tiny against its mean (always at width 1, where x̂ is exactly 0 and rstd
# is 1/sqrt(eps)), and puts that error into dγ and dx; at width 2 (x̂ = ±1, dx all cancellation)
# its mean/rstd are not accurate enough either (tests/test_reliability.py, float64 comparison).
NATIVE_LN_MIN_WIDTH = 4

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


# ----------------------------------------------------------------------------------------------
# References (clarity first)
# ----------------------------------------------------------------------------------------------
def ssf_ref(x, scale, shift):
    """y = x * γ + β over the last dim, in fp32, cast to x.dtype."""
    return (x.float() * scale.float() + shift.float()).to(x.dtype)


def ssf_gelu_ref(z, scale, shift):
    """g = GELU(z * γ + β) (erf GELU, as timm's nn.GELU), in fp32, cast to z.dtype."""
    return torch.nn.functional.gelu(z.float() * scale.float() + shift.float()).to(z.dtype)


def layernorm_ssf_ref(x, ln_weight, ln_bias, scale, shift, eps=1e-6):
    """y = LayerNorm(x; a, c) * γ + β, in fp32, cast to x.dtype."""
    y = torch.nn.functional.layer_norm(
        x.float(), (x.shape[-1],), None if ln_weight is None else ln_weight.float(),
        None if ln_bias is None else ln_bias.float(), eps)
    return (y * scale.float() + shift.float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _validate_ssf(op, x, scale, shift):
    check_tensor(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., C] with C > 0, got x {describe(x)}")
    c = x.shape[-1]
    check_tensor(op, "scale", scale, shape=(c,), like=x)
    check_tensor(op, "shift", shift, shape=(c,), like=x)


def _validate_ln(x, ln_weight, ln_bias, scale, shift, eps):
    op = "layernorm_ssf"
    _validate_ssf(op, x, scale, shift)
    c = x.shape[-1]
    if c > MAX_LN_WIDTH:
        raise ValueError(f"{op}: width {c} exceeds the supported maximum {MAX_LN_WIDTH} (x {describe(x)})")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None:
            check_tensor(op, name, t, shape=(c,), like=x)
    if not eps > 0.0:
        raise ValueError(f"{op}: eps must be > 0, got {eps}")


def _validate_ssf_bwd(grad_out, x, scale, shift, act):
    """The registered backward op's arguments: the forward's, grad_out like x, act 0 or 1."""
    op = "ssf_backward"
    _validate_ssf(op, x, scale, shift)
    check_tensor(op, "grad_out", grad_out, shape=x.shape, like=x)
    if act not in ACTS.values():
        raise ValueError(f"{op}: act code {act!r} is not one of {ACTS}")


def _validate_ln_bwd(grad_out, x, ln_weight, ln_bias, scale, mean, rstd):
    """The registered backward op's arguments: the forward's, grad_out like x, mean / rstd [M] fp32."""
    op = "layernorm_ssf_backward"
    _validate_ln(x, ln_weight, ln_bias, scale, scale, 1.0)
    check_tensor(op, "grad_out", grad_out, shape=x.shape, like=x)
    m = x.numel() // x.shape[-1]
    check_tensor(op, "mean", mean, shape=(m,), like=x, dtype=torch.float32)
    check_tensor(op, "rstd", rstd, shape=(m,), like=x, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Launchers (Triton path)
# ----------------------------------------------------------------------------------------------
def ssf_fwd(x, scale, shift, act: int):
    """y = act(x * scale + shift); returns a contiguous tensor like x."""
    _validate_ssf("ssf", x, scale, shift)
    return _ssf_fwd_launch(x, scale, shift, act)


def _ssf_fwd_launch(x, scale, shift, act: int):
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


def ssf_bwd(grad_out, x, scale, shift, act: int):
    """Returns (dx, dscale, dshift) in x's dtype."""
    _validate_ssf("ssf_backward", x, scale, shift)
    if grad_out.numel() != x.numel() or grad_out.shape[-1:] != x.shape[-1:] or grad_out.dtype != x.dtype:
        raise ValueError(f"ssf_backward: grad_out {describe(grad_out)} does not match x {describe(x)}")
    return _ssf_bwd_launch(grad_out, x, scale, shift, act)


def _ssf_bwd_launch(grad_out, x, scale, shift, act: int):
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


def layernorm_ssf_fwd(x, ln_weight, ln_bias, scale, shift, eps: float):
    """Returns (y like x, mean [M] fp32, rstd [M] fp32)."""
    _validate_ln(x, ln_weight, ln_bias, scale, shift, eps)
    return _ln_fwd_launch(x, ln_weight, ln_bias, scale, shift, eps)


def _ln_fwd_launch(x, ln_weight, ln_bias, scale, shift, eps: float):
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


def layernorm_ssf_bwd(grad_out, x, ln_weight, ln_bias, scale, mean, rstd):
    """Returns (dx, d_ln_weight, d_ln_bias, dscale, dshift); the LN grads are [D] even when the
    LayerNorm has no affine (then unused)."""
    m = x.numel() // x.shape[-1] if x.dim() else 0
    if (grad_out.numel() != x.numel() or grad_out.shape[-1:] != x.shape[-1:] or grad_out.dtype != x.dtype
            or mean.shape != (m,) or rstd.shape != (m,)):
        raise ValueError(f"layernorm_ssf_backward: grad_out {describe(grad_out)}, mean {describe(mean)}, "
                         f"rstd {describe(rstd)} do not match x {describe(x)}")
    return _ln_bwd_launch(grad_out, x, ln_weight, ln_bias, scale, mean, rstd)


def _ln_bwd_launch(grad_out, x, ln_weight, ln_bias, scale, mean, rstd, want_ln: bool = True):
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
        dx, dw, db, dscale, dshift = _ln_finalize(dx, z, z, ln_weight, ln_bias, scale)
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


def _ln_finalize(dx, s1, s0, ln_weight, ln_bias, scale):
    """dγ = a·S1 + c·S0, dβ = S0, da = γ·S1, dc = γ·S0 (S1 = Σ g x̂, S0 = Σ g; fp32)."""
    dt = dx.dtype
    gam = scale.float()
    a = ln_weight.float() if ln_weight is not None else 1.0
    dscale = a * s1
    if ln_bias is not None:
        dscale = dscale + ln_bias.float() * s0
    return dx, (gam * s1).to(dt), (gam * s0).to(dt), dscale.to(dt), s0.to(dt)


# ----------------------------------------------------------------------------------------------
# Torch math with the kernels' saving policy (CPU / no Triton)
# ----------------------------------------------------------------------------------------------
def _ssf_fwd_torch(x, scale, shift, act):
    y = ssf_gelu_ref(x, scale, shift) if act == 1 else ssf_ref(x, scale, shift)
    return y.contiguous()  # the op's contract (and its fake): contiguous, whatever x's strides


def _ssf_bwd_torch(grad_out, x, scale, shift, act):
    d = x.shape[-1]
    g = grad_out.reshape(-1, d).float()
    x2 = x.reshape(-1, d).float()
    if act == 1:
        t = x2 * scale.float() + shift.float()
        g = torch.ops.aten.gelu_backward(g, t)  # erf GELU'(t) * g in one native pass
    dx = (g * scale.float()).to(x.dtype).view(x.shape)
    return dx, (g * x2).sum(0).to(x.dtype), g.sum(0).to(x.dtype)


def _folded_affine(ln_weight, ln_bias, scale, shift):
    """LN(x; a, c) * γ + β == x̂ * (a γ) + (c γ + β): the SSF folded into LayerNorm's affine."""
    w = scale if ln_weight is None else ln_weight * scale
    b = shift if ln_bias is None else ln_bias * scale + shift
    return w, b


def _layernorm_ssf_fwd_torch(x, ln_weight, ln_bias, scale, shift, eps):
    d = x.shape[-1]
    if x.dtype == torch.float32 and d >= NATIVE_LN_MIN_WIDTH:
        # one native LayerNorm kernel with the folded affine (much faster on a CPU than the
        # step-by-step math below); mean/rstd come out of the same pass
        w, b = _folded_affine(ln_weight, ln_bias, scale, shift)
        y, mean, rstd = torch.native_layer_norm(x.reshape(-1, d), (d,), w, b, eps)
        return y.view(x.shape), mean.view(-1), rstd.view(-1)
    x2 = x.reshape(-1, d).float()
    var, mean = torch.var_mean(x2, dim=1, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = (x2 - mean[:, None]) * rstd[:, None]
    if ln_weight is not None:
        y = y * ln_weight.float()
    if ln_bias is not None:
        y = y + ln_bias.float()
    y = y * scale.float() + shift.float()
    return y.to(x.dtype).view(x.shape), mean, rstd


def _layernorm_ssf_bwd_torch(grad_out, x, ln_weight, ln_bias, scale, mean, rstd):
    d = x.shape[-1]
    if x.dtype == torch.float32 and d >= NATIVE_LN_MIN_WIDTH:
        # native backward with the folded affine: its weight/bias grads are S1 = Σ g x̂ and S0 = Σ g
        w, b = _folded_affine(ln_weight, ln_bias, scale, torch.zeros_like(scale))
        dx, s1, s0 = torch.ops.aten.native_layer_norm_backward(
            grad_out.reshape(-1, d), x.reshape(-1, d), (d,), mean.view(-1, 1), rstd.view(-1, 1), w, b,
            [True, True, True])
        return _ln_finalize(dx.view(x.shape), s1, s0, ln_weight, ln_bias, scale)
    g = grad_out.reshape(-1, d).float()
    xhat = (x.reshape(-1, d).float() - mean[:, None]) * rstd[:, None]
    w = scale.float() * (ln_weight.float() if ln_weight is not None else 1.0)
    dxhat = g * w
    c1 = (dxhat * xhat).mean(1, keepdim=True)
    c2 = dxhat.mean(1, keepdim=True)
    dx = ((dxhat - (xhat * c1 + c2)) * rstd[:, None]).to(x.dtype).view(x.shape)
    return _ln_finalize(dx, (g * xhat).sum(0), g.sum(0), ln_weight, ln_bias, scale)


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
def _contig_like(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastpeft::ssf_triton", mutates_args=())
def _ssf_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    _validate_ssf("ssf", x, scale, shift)
    return (_ssf_fwd_launch if use_triton(x) else _ssf_fwd_torch)(x, scale, shift, 0)


@torch.library.custom_op("fastpeft::ssf_gelu", mutates_args=())
def _ssf_gelu_op(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    _validate_ssf("ssf", z, scale, shift)
    return (_ssf_fwd_launch if use_triton(z) else _ssf_fwd_torch)(z, scale, shift, 1)


@torch.library.custom_op("fastpeft::ssf_backward", mutates_args=())
def _ssf_backward_op(grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                     act: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _CHECKED.check(False, lambda: _validate_ssf_bwd(grad_out, x, scale, shift, act), grad_out, x, scale, shift,
                   extra=("ssf_bwd", act))
    grad_out = grad_out.contiguous()
    return (ssf_bwd if use_triton(x) else _ssf_bwd_torch)(grad_out, x, scale, shift, act)


@_ssf_op.register_fake
def _ssf_fake(x, scale, shift):
    _validate_ssf("ssf", x, scale, shift)
    return _contig_like(x)


@_ssf_gelu_op.register_fake
def _ssf_gelu_fake(z, scale, shift):
    _validate_ssf("ssf_gelu", z, scale, shift)
    return _contig_like(z)


@_ssf_backward_op.register_fake
def _ssf_backward_fake(grad_out, x, scale, shift, act):
    _validate_ssf_bwd(grad_out, x, scale, shift, act)
    return _contig_like(x), scale.new_empty(scale.shape, dtype=x.dtype), scale.new_empty(scale.shape, dtype=x.dtype)


def _ssf_setup(ctx, inputs, output):
    x, scale, shift = inputs
    ctx.save_for_backward(x, scale, shift)


def _make_ssf_backward(act):
    def backward(ctx, grad_out):
        x, scale, shift = ctx.saved_tensors
        dx, dscale, dshift = torch.ops.fastpeft.ssf_backward(grad_out, x, scale, shift, act)
        nx, ns, nb = ctx.needs_input_grad
        return dx if nx else None, dscale if ns else None, dshift if nb else None
    return backward


_ssf_op.register_autograd(_make_ssf_backward(0), setup_context=_ssf_setup)
_ssf_gelu_op.register_autograd(_make_ssf_backward(1), setup_context=_ssf_setup)


@torch.library.custom_op("fastpeft::layernorm_ssf", mutates_args=())
def _layernorm_ssf_op(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
                      scale: torch.Tensor, shift: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _validate_ln(x, ln_weight, ln_bias, scale, shift, eps)
    fn = _ln_fwd_launch if use_triton(x) else _layernorm_ssf_fwd_torch
    return fn(x, ln_weight, ln_bias, scale, shift, eps)


@_layernorm_ssf_op.register_fake
def _layernorm_ssf_fake(x, ln_weight, ln_bias, scale, shift, eps):
    _validate_ln(x, ln_weight, ln_bias, scale, shift, eps)
    m = x.numel() // x.shape[-1]
    return _contig_like(x), x.new_empty((m,), dtype=torch.float32), x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("fastpeft::layernorm_ssf_backward", mutates_args=())
def _layernorm_ssf_backward_op(grad_out: torch.Tensor, x: torch.Tensor, ln_weight: torch.Tensor | None,
                               ln_bias: torch.Tensor | None, scale: torch.Tensor, mean: torch.Tensor,
                               rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                            torch.Tensor, torch.Tensor]:
    _CHECKED.check(False, lambda: _validate_ln_bwd(grad_out, x, ln_weight, ln_bias, scale, mean, rstd),
                   grad_out, x, ln_weight, ln_bias, scale, mean, rstd, extra=("ln_bwd",))
    grad_out = grad_out.contiguous()
    fn = layernorm_ssf_bwd if use_triton(x) else _layernorm_ssf_bwd_torch
    return fn(grad_out, x, ln_weight, ln_bias, scale, mean, rstd)


@_layernorm_ssf_backward_op.register_fake
def _layernorm_ssf_backward_fake(grad_out, x, ln_weight, ln_bias, scale, mean, rstd):
    _validate_ln_bwd(grad_out, x, ln_weight, ln_bias, scale, mean, rstd)
    d = x.shape[-1]
    return (_contig_like(x),) + tuple(x.new_empty((d,)) for _ in range(4))


def _ln_setup(ctx, inputs, output):
    x, ln_weight, ln_bias, scale, shift, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, ln_weight, ln_bias, scale, mean, rstd)


def _ln_backward(ctx, grad_out, _gm, _gr):
    x, ln_weight, ln_bias, scale, mean, rstd = ctx.saved_tensors
    dx, dw, db, dscale, dshift = torch.ops.fastpeft.layernorm_ssf_backward(
        grad_out, x, ln_weight, ln_bias, scale, mean, rstd)
    n = ctx.needs_input_grad
    return (dx if n[0] else None, dw if n[1] and ln_weight is not None else None,
            db if n[2] and ln_bias is not None else None, dscale if n[3] else None,
            dshift if n[4] else None, None)


_layernorm_ssf_op.register_autograd(_ln_backward, setup_context=_ln_setup)


class _SSFFunction(torch.autograd.Function):
    """The eager path of `fastpeft::ssf_triton` / `fastpeft::ssf_gelu` (act 0 / 1): the same
    launchers (or torch math) and saved tensor (x) as the registered ops, without the custom-op
    dispatch; arguments validated by the caller. The path is decided once in forward."""

    @staticmethod
    def forward(ctx, x, scale, shift, act, triton_path):
        y = (_ssf_fwd_launch if triton_path else _ssf_fwd_torch)(x, scale, shift, act)
        ctx.save_for_backward(x, scale, shift)
        ctx.args = (act, triton_path)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, scale, shift = ctx.saved_tensors
        act, triton_path = ctx.args
        grad_out = grad_out.contiguous()
        dx, dscale, dshift = (_ssf_bwd_launch if triton_path else _ssf_bwd_torch)(grad_out, x, scale, shift, act)
        nx, ns, nb = ctx.needs_input_grad[:3]
        return dx if nx else None, dscale if ns else None, dshift if nb else None, None, None


class _LayerNormSSFFunction(torch.autograd.Function):
    """The eager path of `fastpeft::layernorm_ssf` (saves x, mean, rstd), as `_SSFFunction`."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, scale, shift, eps, triton_path):
        fn = _ln_fwd_launch if triton_path else _layernorm_ssf_fwd_torch
        y, mean, rstd = fn(x, ln_weight, ln_bias, scale, shift, eps)
        ctx.save_for_backward(x, ln_weight, ln_bias, scale, mean, rstd)
        ctx.triton_path = triton_path
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, ln_weight, ln_bias, scale, mean, rstd = ctx.saved_tensors
        n = ctx.needs_input_grad
        if ctx.triton_path:
            dx, dw, db, dscale, dshift = _ln_bwd_launch(grad_out.contiguous(), x, ln_weight, ln_bias, scale, mean,
                                                        rstd, n[1] or n[2])
        else:
            dx, dw, db, dscale, dshift = _layernorm_ssf_bwd_torch(grad_out.contiguous(), x, ln_weight, ln_bias,
                                                                  scale, mean, rstd)
        return (dx if n[0] else None, dw if n[1] and ln_weight is not None else None,
                db if n[2] and ln_bias is not None else None, dscale if n[3] else None,
                dshift if n[4] else None, None, None)


# ----------------------------------------------------------------------------------------------
# Functionals: eager calls run the autograd.Functions above with the checks once per call
# signature (`_CHECKED`); under torch.compile they call the registered ops (checked when traced).
# ----------------------------------------------------------------------------------------------
_CHECKED = CheckedSignatures()




def _ssf_call(op, x, scale, shift, act):
    if not isinstance(x, torch.Tensor):
        check_tensor(op, "x", x)  # TypeError
    scale, shift = cast_param(scale, x.dtype), cast_param(shift, x.dtype)
    compiling = torch.compiler.is_compiling()
    _CHECKED.check(compiling, lambda: _validate_ssf(op, x, scale, shift), x, scale, shift, extra=(op,))
    if compiling:
        return (torch.ops.fastpeft.ssf_gelu if act else torch.ops.fastpeft.ssf_triton)(x, scale, shift)
    return _SSFFunction.apply(x, scale, shift, act, use_triton(x))


def ssf(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """y = x * scale + shift over the last dim. x [..., C] fp32/fp16/bf16; scale, shift [C]
    (cast to x.dtype, differentiably). Returns a contiguous tensor like x; saves only x."""
    return _ssf_call("ssf", x, scale, shift, 0)


def ssf_gelu(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """g = GELU(z * scale + shift) (erf GELU): the fc1 -> SSF -> GELU epilogue; saves only z."""
    return _ssf_call("ssf_gelu", z, scale, shift, 1)


def layernorm_ssf(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
                  scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = LayerNorm(x; ln_weight, ln_bias, eps) * scale + shift over the last dim (C <= 8192).
    Saves x and per-row mean/rstd (fp32) only. Every parameter may require grad."""
    if not isinstance(x, torch.Tensor):
        check_tensor("layernorm_ssf", "x", x)  # TypeError
    ln_weight, ln_bias, scale, shift = (cast_param(t, x.dtype) for t in (ln_weight, ln_bias, scale, shift))
    eps = float(eps)
    compiling = torch.compiler.is_compiling()
    _CHECKED.check(compiling, lambda: _validate_ln(x, ln_weight, ln_bias, scale, shift, eps),
                   x, ln_weight, ln_bias, scale, shift, extra=("ln", eps))
    if compiling:
        y, _, _ = torch.ops.fastpeft.layernorm_ssf(x, ln_weight, ln_bias, scale, shift, eps)
        return y
    return _LayerNormSSFFunction.apply(x, ln_weight, ln_bias, scale, shift, eps, use_triton(x))


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
