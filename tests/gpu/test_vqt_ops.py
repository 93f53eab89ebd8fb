"""The CUDA VQT ops (csrc/cuda/vqt.cu) against the plain-torch references: the CPU suite's shapes
and per-dtype tolerances (tests/test_vqt_ops.py), plus the issue's extremes (Q 64, N 1025, head
dims 32..128) and torch.library.opcheck on CUDA tensors."""
from __future__ import annotations

import pytest
import torch

from fastpeft import _ext
from fastpeft.ops import vqt_aggregate, vqt_query_attention, vqt_query_attention_ref
from fastpeft.ops.vqt import vqt_query_attention_backward_ref
from tests.gpu.conftest import on_gpu, to_cuda
from tests.test_vqt_ops import (AGG_SHAPES, LSE_TOL, SHAPES, TOLERANCES, _aggregate_inputs, _attention_inputs,
                                _features, _run, _run_aggregate)

pytestmark = on_gpu

EXTRA = [(8, 12, 50, 197, 64), (2, 16, 64, 1025, 128), (4, 12, 10, 577, 96)]


def test_the_extension_provides_the_cuda_kernels():
    assert _ext.load().has_cuda, _ext.load()
    for op in ("vqt_query_attention", "vqt_query_attention_backward", "vqt_aggregate", "vqt_aggregate_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastpeft::{op}", "CUDA"), op


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES + EXTRA, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "qkv-views"])
def test_attention_matches_reference(shape, dtype, strided, generator):
    q, k, v, grad_out = to_cuda(_attention_inputs(shape, dtype, generator, strided_kv=strided))
    scale = shape[-1] ** -0.5
    if shape[-1] > 128:  # (the CPU kernel's d=768 absorbed-backward shape: CUDA never takes that form)
        with pytest.raises(ValueError, match="head dims up to 128"):
            vqt_query_attention(q, k, v, scale)
        return
    out, lse, grad_q = _run(vqt_query_attention, q, k, v, grad_out, scale)
    r_out, r_lse, r_grad = _run(vqt_query_attention_ref, q.float(), k.float(), v.float(), grad_out.float(), scale)
    atol, rtol = TOLERANCES[dtype]
    assert out.is_cuda and out.dtype == dtype and grad_q.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), r_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, r_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])
    torch.testing.assert_close(grad_q.float(), r_grad, atol=atol * r_grad.abs().max().item(), rtol=rtol)


def test_backward_op_matches_reference_backward(generator):
    q, k, v, grad_out = to_cuda(_attention_inputs((2, 12, 10, 197, 64), torch.float32, generator))
    _, lse = vqt_query_attention_ref(q, k, v, 0.125)
    delta = torch.randn(2, 12, 10, generator=generator).cuda()
    got = torch.ops.fastpeft.vqt_query_attention_backward(grad_out, q, k, v, lse, delta, 0.125)
    want = vqt_query_attention_backward_ref(grad_out, q, k, v, lse, delta, 0.125)
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", AGG_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_aggregate_matches_reference(shape, dtype, generator):
    cls, queries, grad = to_cuda(_aggregate_inputs(shape, dtype, generator))
    got = _run_aggregate(vqt_aggregate, cls, queries, grad)
    want = _run_aggregate(_features, cls.float(), queries.float(), grad.float())
    atol, rtol = TOLERANCES[dtype]
    for name, g, w in zip(("out", "grad_cls", "grad_queries"), got, want):
        assert g.is_cuda and g.dtype == dtype and g.shape == w.shape, name
        torch.testing.assert_close(g.float(), w, atol=atol * max(1.0, w.abs().max().item()), rtol=rtol,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype, generator):
    q, k, v, _ = to_cuda(_attention_inputs((2, 3, 5, 11, 32), dtype, generator))
    torch.library.opcheck(torch.ops.fastpeft.vqt_query_attention.default, (q.requires_grad_(), k, v, 0.35))
    cls, queries, _ = to_cuda(_aggregate_inputs((2, 8, 3, 2), dtype, generator))
    torch.library.opcheck(torch.ops.fastpeft.vqt_aggregate.default,
                          (cls.requires_grad_(), queries.requires_grad_(), 1e-12))


def test_mixed_devices_refused_before_launch():
    q = torch.randn(2, 3, 4, 32, device="cuda")
    k = torch.randn(2, 3, 9, 32)
    with pytest.raises(ValueError, match="device mismatch"):
        vqt_query_attention(q, k, k)
