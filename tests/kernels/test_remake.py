"""`fastpeft.ops._autograd.remaker` / `remake`: the ops whose backward node can give their output
again from what they keep for their own backward (`output_again`), which fastpeft/recompute.py's
lean halves use instead of re-running the layers that made it. The value must be forward's bit
for bit, on every path (Triton through the interpreter on CPU, and the torch math); where the op
did not keep what that takes, or for the per-row forms, there is none.
"""
from __future__ import annotations

import pytest
import torch

import fastpeft.ops.lowrank as L
import fastpeft.ops.ssf as S
from fastpeft.kernels import backend
from fastpeft.ops._autograd import remake, remaker

pytestmark = pytest.mark.usefixtures("needs_interpreter_unless_gpu")

BACKENDS = ["triton", "torch"]


def _param(g, *shape, std=0.3, grad=True, dtype=torch.float32):
    return (std * torch.randn(*shape, generator=g)).to(dtype).requires_grad_(grad)


def _assert_remade(out):
    node = remaker(out)
    assert node is not None, type(out.grad_fn).__name__
    with torch.no_grad():
        again = remake(node)
    assert again is not None and again.dtype == out.dtype and torch.equal(again, out)


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("p,drop_input", [(0.0, False), (0.2, False), (0.2, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_linear_remakes_its_output(which, p, drop_input, dtype):
    g = torch.Generator().manual_seed(1)
    x = _param(g, 2, 7, 32, std=1.0, dtype=dtype)
    weight, bias = _param(g, 96, 32, grad=False, dtype=dtype), _param(g, 96, dtype=dtype)
    a, b = _param(g, 4, 32, dtype=dtype), _param(g, 96, 4, dtype=dtype)
    with backend(which):
        out = L.lowrank_linear(x, weight, bias, a, b, dropout_p=p, drop_input=drop_input, training=True,
                               seed=torch.tensor([3]))
        _assert_remade(out)


@pytest.mark.parametrize("which", BACKENDS)
def test_lowrank_linear_remakes_factors_it_rebuilds(which):
    # LoRA (PETL-ViT) keeps its parameters and remakes A and B (`rebuild`): the remade output uses
    # the remade B, and backward then reuses it (the gradients are the op's without a remake)
    g = torch.Generator().manual_seed(2)
    x = _param(g, 9, 32, std=1.0)
    weight, bias = _param(g, 96, 32, grad=False), _param(g, 96)
    downs = {"q": _param(g, 4, 32), "v": _param(g, 4, 32)}
    ups = {"q": _param(g, 32, 4), "v": _param(g, 32, 4)}
    leaves = [x, bias, *downs.values(), *ups.values()]
    grads = []
    for again in (False, True):
        with backend(which):
            out = L.lora_petl_qkv(x, weight, bias, downs, ups, scale=0.5, dropout_p=0.1, training=True,
                                  seed=torch.tensor([5]))
            if again:
                _assert_remade(out)
            grads.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("layer,din,dout,core", [("qkv", 32, 96, (12, 4)), ("fc2", 128, 32, (4, 16))])
def test_fact_linear_remakes_its_output(which, layer, din, dout, core):
    g = torch.Generator().manual_seed(3)
    x = _param(g, 2, 5, din, std=1.0)
    weight, bias = _param(g, dout, din, grad=False), _param(g, dout)
    u, v, c = _param(g, 4, 32), _param(g, 32, 4), _param(g, *core)
    with backend(which):
        out = L.fact_linear(x, weight, bias, u, v, c, layer=layer, scale=10.0, dropout_p=0.1, training=True,
                            seed=torch.tensor([1]))
        _assert_remade(out)


def test_qv_folded_linear_remakes_its_output_where_it_kept_x_and_h():
    g = torch.Generator().manual_seed(4)
    weight, bias = _param(g, 96, 32, grad=False), _param(g, 96)
    h_q, h_v = _param(g, 32, 32), _param(g, 32, 32)
    x = _param(g, 2, 5, 32, std=1.0)
    _assert_remade(L.qv_folded_linear(x, weight, bias, h_q, h_v, 2.0, 3.0))
    # x needs no gradient: the two H are not kept, so nothing remakes the output
    out = L.qv_folded_linear(x.detach(), weight, bias, h_q, h_v, 2.0, 3.0)
    node = remaker(out)
    assert node is not None and remake(node) is None


@pytest.mark.parametrize("which", BACKENDS)
def test_ssf_remakes_its_output(which):
    g = torch.Generator().manual_seed(5)
    x = _param(g, 2, 5, 48, std=1.0)
    with backend(which):
        _assert_remade(S.ssf(x, _param(g, 48), _param(g, 48)))


@pytest.mark.parametrize("which", BACKENDS)
def test_layernorm_ssf_remakes_its_output(which):
    g = torch.Generator().manual_seed(8)
    x = _param(g, 2, 5, 48, std=1.0)
    with backend(which):
        _assert_remade(S.layernorm_ssf(x, _param(g, 48), _param(g, 48), _param(g, 48), _param(g, 48), 1e-6))


def test_ops_without_output_again_have_no_remaker():
    g = torch.Generator().manual_seed(6)
    x = _param(g, 5, 32, std=1.0)
    assert remaker(torch.nn.functional.linear(x, _param(g, 8, 32))) is None
    assert remaker(x) is None  # (a leaf: no node)


def test_per_row_forms_do_not_remake():
    # (a mixed multi-task batch, Triton's per-row launchers: the lean halves do not run under vmap)
    g = torch.Generator().manual_seed(7)
    x = _param(g, 2, 5, 32, std=1.0)
    weight, bias = _param(g, 96, 32, grad=False), _param(g, 96)
    with backend("triton"):
        for out in (L.lowrank_linear_rows(x, weight, bias, _param(g, 2, 4, 32), _param(g, 2, 96, 4)),
                    S.ssf_rows(2, x, _param(g, 2, 32), _param(g, 2, 32))):
            node = remaker(out)
            assert node is not None and remake(node) is None
