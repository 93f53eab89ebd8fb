"""Every Triton kernel family compiled for the GPU it runs on, forward and every gradient against
its plain-torch reference (fp32-upcast), in fp32, fp16 and bf16, over the CPU suites' odd shapes
(the interpreter cannot run bf16 there, so bf16 kernel numerics are only proven here).

Tolerances are the CPU suites' per-dtype tables (tests/kernels/*): the kernels accumulate in fp32
(fp32 dots with input_precision="ieee"), so a GPU changes only the summation order. The adapter
and SSF kernels have their GPU tests beside their CPU ones.
"""
from __future__ import annotations

import pytest
import torch

import fastpeft.ops.convpass as C
import fastpeft.ops.lowrank as L
from fastpeft.kernels import backend
from tests.gpu.conftest import on_gpu, to_cuda
from tests.kernels import test_convpass_kernel as tc
from tests.kernels import test_lowrank_kernels as tl
from tests.kernels.conftest import assert_close

pytestmark = on_gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def seed(v):
    return torch.tensor([v], dtype=torch.int64, device="cuda")


def leaves_cuda(leaves):
    return {k: (to_cuda(v), t) for k, (v, t) in leaves.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", tl.CASES, ids=tl.IDS)
def test_lowrank_linear(case, dtype):
    rows, d, n, r, p, drop_input = case
    leaves, grad = tl.generic_inputs(rows, d, n, r, dtype)
    with backend("triton"):
        out = tl.check_against(tl._generic, tl._generic_ref, leaves_cuda(leaves), grad.cuda(), tl.TOL[dtype], p=p,
                               drop_input=drop_input, seed=seed(100 + rows))
    assert out.dtype == dtype and out.is_cuda


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lowrank_linear_many_rows(dtype):
    # ViT-B qkv at batch 8 (1576 rows): several row tiles, ranks below tl.dot's 16 padded.
    leaves, grad = tl.generic_inputs(8 * 197, 768, 3 * 768, 4, dtype, seed=3)
    with backend("triton"):
        tl.check_against(tl._generic, tl._generic_ref, leaves_cuda(leaves), grad.cuda(), tl.TOL[dtype], p=0.1,
                         drop_input=False, seed=seed(5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_noah(dtype):
    g = torch.Generator().manual_seed(2)
    D = 192
    leaves = {"x": (tl.rnd(g, 37, D, dtype=dtype), True),
              "weight": (tl.rnd(g, 3 * D, D, std=D ** -0.5, dtype=dtype), False),
              "bias": (tl.rnd(g, 3 * D, std=0.1, dtype=dtype), False),
              "lora_a": (tl.rnd(g, 16, D, std=0.02, dtype=dtype), True),
              "lora_b": (tl.rnd(g, 3 * D, 16, std=0.02, dtype=dtype), True)}
    with backend("triton"):
        tl.check_against(tl._noah, tl._noah_ref, leaves_cuda(leaves), tl.rnd(g, 37, 3 * D, dtype=dtype).cuda(),
                         tl.TOL[dtype], seed=seed(4))


@pytest.mark.parametrize("rows,D,r", [(1, 192, 4), (37, 384, 1), (395, 768, 8)])
def test_lora_petl(rows, D, r):
    g = torch.Generator().manual_seed(3)
    leaves = {"x": (tl.rnd(g, rows, D), True), "weight": (tl.rnd(g, 3 * D, D, std=D ** -0.5), False),
              "bias": (tl.rnd(g, 3 * D, std=0.1), False),
              "aq": (tl.rnd(g, r, D, std=D ** -0.5), True), "av": (tl.rnd(g, r, D, std=D ** -0.5), True),
              "bq": (tl.rnd(g, D, r, std=0.3), True), "bv": (tl.rnd(g, D, r, std=0.3), True)}
    with backend("triton"):
        tl.check_against(tl._petl, tl._petl_ref, leaves_cuda(leaves), tl.rnd(g, rows, 3 * D).cuda(),
                         tl.TOL[torch.float32], seed=seed(8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", ["qkv", "proj", "fc1", "fc2"])
def test_fact_tt(layer, dtype):
    g = torch.Generator().manual_seed(4)
    D, r, rows = 64, 4, 37
    din, dout = tl.FACT_SHAPES[layer]
    shape = {"qkv": (3 * r, r), "proj": (r, r), "fc1": (4 * r, r), "fc2": (r, 4 * r)}[layer]
    leaves = {"x": (tl.rnd(g, rows, din, dtype=dtype), True),
              "weight": (tl.rnd(g, dout, din, std=din ** -0.5, dtype=dtype), False),
              "bias": (tl.rnd(g, dout, std=0.1, dtype=dtype), False),
              "fact_u": (tl.rnd(g, r, D, std=D ** -0.5, dtype=dtype), True),
              "fact_v": (tl.rnd(g, D, r, std=0.1, dtype=dtype), True),
              "core": (tl.rnd(g, *shape, std=0.5, dtype=dtype), True)}
    with backend("triton"):
        tl.check_against(tl._fact, tl._fact_ref, leaves_cuda(leaves), tl.rnd(g, rows, dout, dtype=dtype).cuda(),
                         tl.TOL[dtype], layer=layer, seed=seed(6))


@pytest.mark.parametrize("rows,p", [(7, 0.0), (37, 0.5)])
def test_kadaptation(rows, p):
    g = torch.Generator().manual_seed(6)
    n, m, D = 8, 8, 64
    leaves = {"x": (tl.rnd(g, rows, D), True), "weight": (tl.rnd(g, 3 * D, D, std=D ** -0.5), False),
              "bias": (tl.rnd(g, 3 * D, std=0.1), False),
              "rl1": (tl.rnd(g, n, n, 1, std=0.1), True), "rr1": (tl.rnd(g, n, 1, n, std=0.1), True),
              "rl2": (tl.rnd(g, n, n, 1, std=0.1), True), "rr2": (tl.rnd(g, n, 1, n, std=0.1), True),
              "ql": (tl.rnd(g, n, m, 1, std=0.1), True), "qr": (tl.rnd(g, n, 1, m, std=0.1), True),
              "b_shared": (tl.rnd(g, D, std=0.1), True)}
    with backend("triton"):
        tl.check_against(tl._kad, tl._kad_ref, leaves_cuda(leaves), tl.rnd(g, rows, 3 * D).cuda(),
                         tl.TOL[torch.float32], p=p, seed=seed(21))


def test_lowrank_dropout_mask_is_the_cpu_mask():
    # The Philox stream the GPU kernels draw is the one the CPU reference regenerates.
    rows, d, r, p = 37, 64, 8, 0.5
    g = torch.Generator().manual_seed(8)
    x, w, a, b = tl.rnd(g, rows, d), tl.rnd(g, 16, d), tl.rnd(g, r, d), tl.rnd(g, 16, r)
    s = torch.tensor([31], dtype=torch.int64)
    with backend("triton"):
        got = L.lowrank_linear(*to_cuda((x, w, None, a, b)), dropout_p=p, training=True, seed=s.cuda())
    want = L.lowrank_linear_ref(x, w, None, a, b, dropout_p=p, seed=s)
    assert_close("out", got.cpu(), want, tl.TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", tc.CASES + [(8, (14, 14), 1, 768, 8, 0.1, True)],
                         ids=tc.IDS + ["B8-g14x14-P1-D768-d8-p0.1-base"])
def test_convpass(case, dtype):
    t, grad = tc.make(case, dtype)
    t, grad, s = to_cuda(t), grad.cuda(), seed(41)
    with backend("triton"):
        out, grads = tc.run(C.convpass, t, grad, case, s, training=True)
    ref_out, ref_grads = tc.run(C.convpass_ref, {k: v.float() for k, v in t.items()}, grad.float(), case, s)
    assert out.dtype == dtype and out.is_cuda and out.shape == ref_out.shape
    assert_close("out", out, ref_out, tc.TOL[dtype])
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert_close(f"grad {k}", grads[k], ref_grads[k], tc.TOL[dtype])


def test_opcheck_custom_ops_on_cuda():
    # fake kernels (shapes, strides) and autograd registrations agree with the compiled kernels
    tl.test_opcheck("triton", device="cuda")
    tc.test_opcheck("triton", device="cuda")
