"""fastpeft.ops.lowrank.kadaptation_h (KAdaptation's two dropped Kronecker sums as one node) against
the reference's own ops (`fastpeft.methods.kadaptation.kron_sum`, then torch dropout): the same
values and dropout draws bit for bit, gradients to float rounding, what it keeps.

Tolerances: forward bit-exact (the same ops); fp32 gradients rtol 1e-5 / atol 1e-7 (the backward
regroups the same products into other GEMMs); bf16 autocast gradients rtol 2e-2 / atol 1e-3 (bf16
products, rounded at other points than autograd's).
"""
from __future__ import annotations

import pytest
import torch

import fastpeft.ops.lowrank as L
from fastpeft.methods.kadaptation import kron_sum
from tests.kernels.conftest import assert_close

FP32 = dict(atol=1e-7, rtol=1e-5)
BF16 = dict(atol=1e-3, rtol=2e-2)


def _factors(n: int, m: int, k1: int, k2: int, shared: bool, g: torch.Generator):
    def p(*shape):
        return (0.5 * torch.randn(*shape, generator=g)).requires_grad_(True)

    rule1, rule2 = (p(n, n, k1), p(n, k1, n)), (p(n, n, k1), p(n, k1, n))
    q = (p(n, m, k2), p(n, k2, m))
    v = q if shared else (p(n, m, k2), p(n, k2, m))
    return rule1, rule2, q, v


def _leaves(f):
    out = []
    for pair in f:
        out += [t for t in pair if not any(t is o for o in out)]
    return out


def _reference(rule1, rule2, q, v, p, training):
    drop = torch.nn.Dropout(p).train(training)
    return drop(kron_sum(*rule1, *q)), drop(kron_sum(*rule2, *v))


def _op(rule1, rule2, q, v, p, training, compact=False):
    return L.kadaptation_h(rule1, rule2, q, v, dropout_p=p, training=training, compact=compact)


@pytest.mark.parametrize("n,m,k1,k2", [(4, 3, 1, 1), (3, 5, 2, 2), (8, 2, 1, 2)])
@pytest.mark.parametrize("shared", [True, False], ids=["v-uses-q", "own-v"])
@pytest.mark.parametrize("p,training", [(0.5, True), (0.1, True), (0.0, True), (0.5, False)])
@pytest.mark.parametrize("compact", [False, True])
def test_same_values_draws_and_gradients_as_the_reference(n, m, k1, k2, shared, p, training, compact):
    g = torch.Generator().manual_seed(n * 100 + m * 10 + k1 + k2)
    f = _factors(n, m, k1, k2, shared, g)
    leaves = _leaves(f)
    grads = [torch.randn(n * m, n * m, generator=g) for _ in range(2)]
    runs = []
    for fn in (_reference, lambda *a: _op(*a, compact=compact)):
        torch.manual_seed(7)
        out = fn(*f, p, training)
        after = torch.rand(3)  # (the generator's stream after the call: the same draws were taken)
        runs.append((out, torch.autograd.grad(out, leaves, grads), after))
    (ref, ref_g, ref_after), (got, got_g, got_after) = runs
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert torch.equal(ref_after, got_after)
    for i, (want, have) in enumerate(zip(ref_g, got_g)):
        assert_close(f"grad {i}", have, want, FP32)


def test_compact_keeps_bits_and_gives_the_same_gradients():
    # the masks as torch keeps them (the CPU's float noise), or as bits: D^2 / 8 bytes per mask;
    # neither keeps the [n, n, n] rule products (rebuilt) or any [D, D] tensor besides the masks
    g = torch.Generator().manual_seed(3)
    n, m = 8, 4
    d = n * m
    f = _factors(n, m, 1, 1, True, g)
    leaves = _leaves(f)
    grads = [torch.randn(d, d, generator=g) for _ in range(2)]
    runs = {}
    for compact in (False, True):
        saved = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
            out = _op(*f, 0.5, True, compact=compact)
        kept = sorted((tuple(s.shape), s.dtype) for s in saved if not any(s is t for t in leaves))
        runs[compact] = kept, torch.autograd.grad(out, leaves, grads)
    w = ((n, m, m), torch.float32)  # (the per-layer factors' product, [n, m, m]: kept, small)
    assert runs[False][0] == sorted([w, ((d, d), torch.float32), ((d, d), torch.float32)]), runs[False][0]
    assert runs[True][0] == sorted([w, ((2 * d * d // 8,), torch.uint8)]), runs[True][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[True][1]))


def test_bits_round_trip_any_length():
    g = torch.Generator().manual_seed(0)
    for numel in (1, 7, 8, 9, 64, 1001):
        keep = torch.rand(numel, generator=g) < 0.5
        packed = L._pack_bits(keep)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // 8)
        assert torch.equal(L._unpack_bits(packed, (numel,)), keep)


def test_under_bf16_autocast_as_the_reference():
    # autocast runs the products in bf16 (forward and, re-entered, backward), as the reference's
    # autograd does for the ops it recorded under autocast
    g = torch.Generator().manual_seed(5)
    f = _factors(4, 6, 1, 1, False, g)
    leaves = _leaves(f)
    grads = [torch.randn(24, 24, generator=g, dtype=torch.bfloat16) for _ in range(2)]
    runs = []
    for fn in (_reference, _op):
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(*f, 0.5, True)
        runs.append((out, torch.autograd.grad(out, leaves, grads)))
    assert all(a.dtype == torch.bfloat16 and torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    for i, (want, have) in enumerate(zip(runs[0][1], runs[1][1])):
        assert have.dtype == want.dtype == torch.float32
        assert_close(f"grad {i}", have, want, BF16)
