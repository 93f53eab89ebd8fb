"""Triton kernel of the fused Conv-Adapter epilogue (the op, its torch twin, autograd and
reference: fastpeft/ops/conv_adapter.py):

    out = base + se * (W2 act(h) + b2),   h = conv1(x) (the grouped k x k conv, with its bias)

h [B, K, Ho, Wo] is the adapter's K-wide intermediate, W2 [C, K] the 1x1 up-projection, se [C] the
per-channel scale, act ReLU (0) or exact GELU (1), base / out [B, C, Ho, Wo] NCHW.
`_ca_up_fwd_kernel` computes one [BLOCK_C, BLOCK_S] tile of one image: act, the 1x1 GEMM
([C, K] x [K, Ho*Wo]) over K chunks, its bias, the scale and the add to base, so neither act(h)
nor the C-wide conv2 output is written.
"""
from __future__ import annotations

import torch

from ._common import AOT_DTYPES, TRITON_PTR, cdiv, dot_precision, tl, triton, with_tf32_variants
from ._common import Cfg

ACTS = {"relu": 0, "gelu": 1}

# keyed by element bytes: [BLOCK_C, BLOCK_S] output tiles of one image, K (the adapter width,
# 8..128 in ResNet-50 / ConvNeXt at reductions 4..8) in chunks of BLOCK_K = 16 (tl.dot's minimum).
CONFIGS: dict[int, Cfg] = {
    2: Cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2),
    4: Cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2),
}


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(h, 0.0)
    return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))


@triton.jit(do_not_specialize=["C", "K", "S"])
def _ca_up_fwd_kernel(
    H,      # [B, K, S] conv1 output (x dtype), contiguous (S = Ho * Wo)
    W2,     # [C, K] up weight (the 1x1 conv's [C, K, 1, 1])
    B2,     # [C] up bias
    SE,     # [C] per-channel scale
    BASE,   # [B, C, S] frozen branch, contiguous
    OUT,    # [B, C, S]
    C, K, S,
    ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,  # tl.dot input_precision for fp32 ("ieee" | "tf32", `dot_precision`)
):
    n_s = tl.cdiv(S, BLOCK_S)
    pid = tl.program_id(0)
    b = (pid // n_s).to(tl.int64)
    ss = (pid % n_s) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = ss < S
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        h = tl.load(H + (b * K + ks[:, None]) * S + ss[None, :], mask=kmask[:, None] & smask[None, :], other=0.0)
        a = _act(h.to(tl.float32), ACT).to(W2.dtype.element_ty)
        w = tl.load(W2 + cs[:, None] * K + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(w, a, input_precision=PREC)
    acc += tl.load(B2 + cs, mask=cmask, other=0.0).to(tl.float32)[:, None]
    acc *= tl.load(SE + cs, mask=cmask, other=0.0).to(tl.float32)[:, None]
    offs = (b * C + cs[:, None]) * S + ss[None, :]
    m2 = cmask[:, None] & smask[None, :]
    acc += tl.load(BASE + offs, mask=m2, other=0.0).to(tl.float32)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------------------------
# Launcher (arguments checked by the caller: fastpeft/ops/conv_adapter.py)
# ----------------------------------------------------------------------------------------------
def launch_up(h, w2, b2, se, base, act: str):
    """out [B, C, Ho, Wo] = base + se * (W2 act(h) + b2) from `_ca_up_fwd_kernel`; h [B, K, Ho, Wo],
    w2 [C, K], b2 / se [C], base [B, C, Ho, Wo], act a key of ACTS."""
    B, K, Ho, Wo = h.shape
    C, S = w2.shape[0], Ho * Wo
    h, base = h.contiguous(), base.contiguous()
    out = torch.empty_like(base)
    if B and S:
        cf = CONFIGS[h.element_size()]
        _ca_up_fwd_kernel[(B * cdiv(S, cf.BLOCK_N), cdiv(C, cf.BLOCK_M))](
            h, w2.contiguous(), b2, se, base, out, C, K, S, ACT=ACTS[act], BLOCK_C=cf.BLOCK_M, BLOCK_S=cf.BLOCK_N,
            BLOCK_K=cf.BLOCK_K, PREC=dot_precision(h.dtype, h.device), num_warps=cf.num_warps,
            num_stages=cf.num_stages)
    return out


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile list (kernels/aot.py)
# ----------------------------------------------------------------------------------------------
def aot_specs():
    specs = []
    for dt in AOT_DTYPES:
        P = TRITON_PTR[dt]
        c = CONFIGS[dt.itemsize]
        for act in ACTS.values():
            sig = {"H": P, "W2": P, "B2": P, "SE": P, "BASE": P, "OUT": P, "C": "i32", "K": "i32", "S": "i32"}
            specs.append(("conv_adapter_up_fwd", _ca_up_fwd_kernel, sig,
                          dict(ACT=act, BLOCK_C=c.BLOCK_M, BLOCK_S=c.BLOCK_N, BLOCK_K=c.BLOCK_K, PREC="ieee"), c,
                          str(dt)))
    return with_tf32_variants(specs)
