"""Helpers shared by the patch tests (plain functions: `from tests.patch.conftest import ...`)."""
from __future__ import annotations

import torch

import fastpeft
from tests.methods.conftest import grads_of


def train_step(m, x, seed: int | None = None):
    """One forward + backward of square().mean(); `seed` fixes the dropout / DropPath draws (the
    same in two runs). Returns (loss, {name: grad})."""
    m.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    loss = m(x).square().mean()
    loss.backward()
    return loss.detach(), grads_of(m)


def forward_backward(m, x):
    """One forward + backward of square().mean(). Returns (output, {name: grad})."""
    m.zero_grad(set_to_none=True)
    out = m(x)
    out.square().mean().backward()
    return out.detach(), grads_of(m)


def assert_step_close(m, x, out0, g0, atol: float, rtol: float):
    """`forward_backward(m, x)` matches (out0, g0) within atol / rtol; returns its (out, grads)."""
    out1, g1 = forward_backward(m, x)
    torch.testing.assert_close(out1, out0, atol=atol, rtol=rtol)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=atol, rtol=rtol, msg=n)
    return out1, g1


def close_scaled(a, b, tol: float) -> None:
    """a vs b with rtol = tol and atol = tol * max(1, max|b|)."""
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


def assert_recompute_bit_exact(m, x, backend: str, seed: int = 3) -> None:
    """patch(recompute=True) gives the default patch's loss and gradients bit for bit."""
    fastpeft.patch(m, backend=backend)
    loss0, g0 = train_step(m, x, seed)
    fastpeft.patch(m, backend=backend, recompute=True)
    loss1, g1 = train_step(m, x, seed)
    assert torch.equal(loss1, loss0)
    assert g1.keys() == g0.keys() and g0
    for n in g0:
        assert torch.equal(g1[n], g0[n]), n


def assert_compiled_step_matches(m, x, loss0, g0) -> None:
    """torch.compile(m, fullgraph=True, backend="aot_eager") gives loss0 and the gradients g0."""
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    m.zero_grad(set_to_none=True)
    loss = compiled(x).square().mean()
    loss.backward()
    close_scaled(loss.detach(), loss0, 1e-5)
    for n, g in grads_of(m).items():
        close_scaled(g, g0[n], 1e-4)
