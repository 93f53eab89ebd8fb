"""Triton kernels of the fused ST-Adapter (the op, its torch twins, autograd and reference:
fastpeft/ops/st_adapter.py). x [B*T, L, D] holds the frames of B clips (row b*T + t), L = P prefix
tokens + N patch tokens; u [M, C] the down-projected patch rows, m = (b*T + t)*N + n, so frame
t +- o of the same clip and position is row m +- o*N. tconv is the depthwise k_t-tap temporal conv
(zero padding k_t // 2) over the T frames of a clip.

  _st_up_fwd_kernel   out_patch = x_patch + b2 + tconv(u) W2^T: the temporal conv is the GEMM's
                      A-operand prologue (k_t masked loads of u per K tile), the bias and the
                      residual its epilogue; tconv(u) is never written
  _st_tconv_kernel    tconv(u) (with bias), or with the taps reversed (the transpose of the
                      zero-padded correlation, for the backward), optionally scattered into a
                      [frames, L_OUT, C] buffer at token offset P_OUT
"""
from __future__ import annotations

import torch

from ._common import AOT_DTYPES, TRITON_PTR, cdiv, dot_precision, tl, triton, with_tf32_variants
from ._common import Cfg

# keyed by element bytes (kernels/aot.py compiles each for sm_80 / sm_90 with no spills). Half
# types: 64x64 output tiles over K chunks of 32 adapter channels on 8 warps (4 warps spilled with
# the k_t-tap prologue); fp32 32x32 on 4 warps (as kernels/convpass.py). The elementwise temporal
# conv: 32x64 tiles (64x64 spilled its int64 row offsets for k_t >= 3).
CONFIGS: dict[str, dict[int, Cfg]] = {
    "st_up_fwd": {2: Cfg(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
                  4: Cfg(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)},
    "st_tconv": {2: Cfg(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1),
                 4: Cfg(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1)},
}
BLOCK_K = 32
KT_SUPPORTED = (1, 3, 5)  # temporal taps compiled (official: 3); others run the torch math


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tconv_tile(U, CW, CB, rows64, rmask, t, ks, kmask, N, T, C, has_bias, flip, KT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_K] fp32 tile of tconv(U) (taps reversed when flip) at rows / channels."""
    a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if has_bias:
        a += tl.load(CB + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(KT):
        off = j - KT // 2
        tt = t + off
        valid = rmask & (tt >= 0) & (tt < T)
        src = rows64 + off * N
        uj = tl.load(U + src[:, None] * C + ks[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        tap = tl.where(flip != 0, KT - 1 - j, j)
        wj = tl.load(CW + ks * KT + tap, mask=kmask, other=0.0).to(tl.float32)
        a += uj.to(tl.float32) * wj[None, :]
    return a


@triton.jit(do_not_specialize=["M", "N", "T", "L", "P", "C"])
def _st_up_fwd_kernel(
    U,      # [M, C] down projection of the patch rows (x dtype), contiguous
    CW,     # [C, KT] temporal taps (x dtype), contiguous
    CB,     # [C] conv bias
    W2,     # [D, C] up weight
    B2,     # [D] up bias
    X,      # [B*T, L, D] adapter input, contiguous
    OUT,    # [B*T, L, D] output (patch rows written here; prefix rows by the launcher)
    M, N, T, L, P, D, C,
    KT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,  # tl.dot input_precision for fp32 ("ieee" | "tf32", `dot_precision`)
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    bt = rows64 // N
    t = (bt % T).to(tl.int32)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < C
        a = _tconv_tile(U, CW, CB, rows64, rmask, t, ks, kmask, N, T, C, 1, 0, KT, BLOCK_M, BLOCK_K)
        w2t = tl.load(W2 + cols[None, :] * C + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.dot(a.to(W2.dtype.element_ty), w2t, input_precision=PREC)
    acc += tl.load(B2 + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    xrow = bt * L + P + (rows64 - bt * N)
    offs = xrow[:, None] * D + cols[None, :]
    m2 = rmask[:, None] & cmask[None, :]
    acc += tl.load(X + offs, mask=m2, other=0.0).to(tl.float32)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["M", "N", "T", "C", "L_OUT", "P_OUT", "has_bias", "flip"])
def _st_tconv_kernel(
    U,      # [M, C] input rows (x dtype), contiguous
    CW,     # [C, KT] taps
    CB,     # [C] bias, read when has_bias
    OUT,    # [M / N frames, L_OUT, C]: row m goes to frame m // N, token P_OUT + m % N
    M, N, T, C, L_OUT, P_OUT, has_bias, flip,
    KT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    bt = rows64 // N
    t = (bt % T).to(tl.int32)
    ks = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = ks < C
    a = _tconv_tile(U, CW, CB, rows64, rmask, t, ks, kmask, N, T, C, has_bias, flip, KT, BLOCK_M, BLOCK_N)
    orow = bt * L_OUT + P_OUT + (rows64 - bt * N)
    tl.store(OUT + orow[:, None] * C + ks[None, :], a.to(OUT.dtype.element_ty), mask=rmask[:, None] & kmask[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers (arguments checked by the caller: fastpeft/ops/st_adapter.py)
# ----------------------------------------------------------------------------------------------
def launch_up_fwd(u, conv_w, conv_b, w2, b2, x, out, frames: int, num_prefix: int):
    """out[:, P:] = x[:, P:] + b2 + tconv(u) W2^T from `_st_up_fwd_kernel` (the patch rows only);
    u [M, C], conv_w [C, k_t] (k_t in KT_SUPPORTED), x / out [B*T, L, D] contiguous."""
    BT, L, D = x.shape
    M, C = u.shape
    if M:
        cf = CONFIGS["st_up_fwd"][x.element_size()]
        _st_up_fwd_kernel[(cdiv(M, cf.BLOCK_M), cdiv(D, cf.BLOCK_N))](
            u, conv_w.contiguous(), conv_b, w2.contiguous(), b2, x, out, M, L - num_prefix, frames, L, num_prefix, D,
            C, KT=conv_w.shape[1], BLOCK_M=cf.BLOCK_M, BLOCK_N=cf.BLOCK_N, BLOCK_K=BLOCK_K,
            PREC=dot_precision(x.dtype, x.device), num_warps=cf.num_warps, num_stages=cf.num_stages)
    return out


def launch_tconv(u, conv_w, conv_b, T, N, flip, out_L=None, out_P=0):
    """tconv(u) (bias when conv_b is given; taps reversed when flip) as [M, C], or scattered into a
    zero-prefixed [M / N, out_L, C] buffer."""
    M, C = u.shape
    KT = conv_w.shape[1]
    frames = M // N
    out = (torch.empty((M, C), dtype=u.dtype, device=u.device) if out_L is None
           else torch.zeros((frames, out_L, C), dtype=u.dtype, device=u.device))
    if M:
        cf = CONFIGS["st_tconv"][u.element_size()]
        _st_tconv_kernel[(cdiv(M, cf.BLOCK_M), cdiv(C, cf.BLOCK_N))](
            u, conv_w.contiguous(), conv_b if conv_b is not None else conv_w, out,
            M, N, T, C, out_L if out_L is not None else N, out_P if out_L is not None else 0,
            int(conv_b is not None), int(flip), KT=KT, BLOCK_M=cf.BLOCK_M, BLOCK_N=cf.BLOCK_N,
            num_warps=cf.num_warps, num_stages=cf.num_stages)
    return out


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile list (kernels/aot.py)
# ----------------------------------------------------------------------------------------------
def aot_specs():
    specs = []
    for dt in AOT_DTYPES:
        P = TRITON_PTR[dt]
        for kt in KT_SUPPORTED:
            c = CONFIGS["st_up_fwd"][dt.itemsize]
            sig = {"U": P, "CW": P, "CB": P, "W2": P, "B2": P, "X": P, "OUT": P, "M": "i32", "N": "i32",
                   "T": "i32", "L": "i32", "P": "i32", "D": "i32", "C": "i32"}
            specs.append(("st_up_fwd", _st_up_fwd_kernel, sig,
                          dict(KT=kt, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, BLOCK_K=BLOCK_K, PREC="ieee"), c, str(dt)))
            c = CONFIGS["st_tconv"][dt.itemsize]
            sig = {"U": P, "CW": P, "CB": P, "OUT": P, "M": "i32", "N": "i32", "T": "i32", "C": "i32",
                   "L_OUT": "i32", "P_OUT": "i32", "has_bias": "i32", "flip": "i32"}
            specs.append(("st_tconv", _st_tconv_kernel, sig, dict(KT=kt, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N),
                          c, str(dt)))
    return with_tf32_variants(specs)
