"""fastpeft.ops.lowrank.fact_linear's eager op (`_FacTFunction`: addmm chains over the chunks, no
block-diagonal matrices) against `lowrank_linear` on the effective matrices of `fact_effective`
(what torch.compile traces): same dropout masks, same values and gradients; what it saves; errors.

Kernels run through the Triton interpreter on CPU (backend "triton"); the torch path too.
"""
from __future__ import annotations

import functools

import pytest
import torch

import fastpeft.ops.lowrank as L
from fastpeft.kernels import backend
from tests.kernels.conftest import assert_close

pytestmark = pytest.mark.usefixtures("needs_interpreter_unless_gpu")

TOL = dict(atol=2e-5, rtol=2e-4)
D, R = 32, 4
SHAPES = {"qkv": (D, 3 * D, (3 * R, R)), "proj": (D, D, (R, R)), "fc1": (D, 4 * D, (4 * R, R)),
          "fc2": (4 * D, D, (R, 4 * R))}


def _leaves(layer, rows, g):
    din, dout, cshape = SHAPES[layer]
    return {"x": torch.randn(2, rows, din, generator=g).requires_grad_(True),
            "weight": torch.randn(dout, din, generator=g) / din ** 0.5,
            "bias": (0.1 * torch.randn(dout, generator=g)).requires_grad_(True),
            "u": (torch.randn(R, D, generator=g) / D ** 0.5).requires_grad_(True),
            "v": (0.1 * torch.randn(D, R, generator=g)).requires_grad_(True),
            "core": (0.5 * torch.randn(*cshape, generator=g)).requires_grad_(True)}


def _run(fn, t, grad):
    for v in t.values():
        v.grad = None
    out = fn(t)
    out.backward(grad)
    return out.detach(), {k: v.grad.clone() for k, v in t.items() if v.requires_grad}


@pytest.mark.parametrize("which", ["triton", "torch"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("layer", sorted(SHAPES))
def test_fact_op_matches_lowrank_on_effective_matrices(layer, p, which):
    g = torch.Generator().manual_seed(3)
    t = _leaves(layer, 37, g)
    seed = torch.tensor([11], dtype=torch.int64)
    grad = torch.randn(2, 37, SHAPES[layer][1], generator=g)
    with backend(which):
        got, got_g = _run(lambda t: L.fact_linear(t["x"], t["weight"], t["bias"], t["u"], t["v"], t["core"],
                                                  layer=layer, scale=3.0, dropout_p=p, training=True, seed=seed),
                          t, grad)
        want, want_g = _run(lambda t: L.lowrank_linear(
            t["x"], t["weight"], t["bias"], *L.fact_effective(layer, t["u"], t["v"], t["core"], 3.0),
            dropout_p=p, training=True, seed=seed), t, grad)
    assert_close("out", got, want, TOL)
    for k in want_g:
        assert_close(f"grad {k}", got_g[k], want_g[k], TOL)


def test_fact_op_saves_x_and_u_only():
    g = torch.Generator().manual_seed(0)
    t = _leaves("fc1", 7, g)
    saved = []
    with backend("triton"), torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        L.fact_linear(t["x"], t["weight"], t["bias"], t["u"], t["v"], t["core"], layer="fc1", scale=2.0,
                      dropout_p=0.1, training=True, seed=torch.tensor([1]))
    params = {t[k].data_ptr() for k in ("weight", "bias", "u", "v", "core", "x")}
    shapes = sorted(tuple(s.shape) for s in saved if s.data_ptr() not in params and s.numel() > 1)
    # u [M, 4r] besides the parameters: not A [4r, D] (rebuilt in backward), no [4D, 4r] block matrix
    assert shapes == [(14, 4 * R)], shapes


@pytest.mark.parametrize("layer", ["qkv", "fc2"])
def test_fact_op_remakes_a_core_made_from_parameters(layer):
    """FacT-TK's core is made from FacTc and FacTp (`fact_tk_core`): with `rebuild_core` the op keeps
    those, not the core, and gives the same output and gradients (FacTc / FacTp's included) as
    without it, where it keeps the core."""
    from fastpeft.methods.fact import fact_tk_core

    g = torch.Generator().manual_seed(4)
    t = _leaves(layer, 7, g)
    del t["core"]
    t["fact_c"] = (0.5 * torch.randn(R, R, R, generator=g)).requires_grad_(True)
    t["fact_p"] = (0.5 * torch.randn(R, 24, generator=g)).requires_grad_(True)
    grad = torch.randn(2, 7, SHAPES[layer][1], generator=g)
    rebuild = functools.partial(fact_tk_core, i=1, layer=layer)

    def call(t, remake):
        return L.fact_linear(t["x"], t["weight"], t["bias"], t["u"], t["v"], rebuild(t["fact_c"], t["fact_p"]),
                             layer=layer, scale=2.0, dropout_p=0.1, training=True, seed=torch.tensor([1]),
                             rebuild_core=(rebuild, (t["fact_c"], t["fact_p"])) if remake else None)

    saved = {}
    for remake in (False, True):
        shapes = saved[remake] = []
        with backend("triton"), torch.autograd.graph.saved_tensors_hooks(lambda s: shapes.append(s) or s, lambda s: s):
            call(t, remake)
    core_shape = SHAPES[layer][2]
    assert any(tuple(s.shape) == core_shape for s in saved[False])
    assert not any(tuple(s.shape) == core_shape for s in saved[True]), [tuple(s.shape) for s in saved[True]]
    with backend("triton"):
        want, want_g = _run(lambda t: call(t, False), t, grad)
        got, got_g = _run(lambda t: call(t, True), t, grad)
    assert torch.equal(got, want)
    assert got_g.keys() == want_g.keys() and all(torch.equal(got_g[k], want_g[k]) for k in want_g)


def test_fact_op_errors():
    g = torch.Generator().manual_seed(0)
    t = _leaves("qkv", 3, g)
    with pytest.raises(ValueError, match=r"core\[0\] must have shape"):
        L.fact_linear(t["x"], t["weight"], None, t["u"], t["v"], torch.ones(2 * R, R), layer="qkv")
    with pytest.raises(ValueError, match=r"weight must have shape"):
        L.fact_linear(t["x"], t["weight"][:-1], None, t["u"], t["v"], t["core"], layer="qkv")
    with pytest.raises(ValueError, match=r"layer must be one of"):
        L.fact_linear(t["x"], t["weight"], None, t["u"], t["v"], t["core"], layer="fc3")
    with pytest.raises(TypeError):
        L.fact_linear("x", t["weight"], None, t["u"], t["v"], t["core"], layer="qkv")
