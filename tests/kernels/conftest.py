"""Helpers shared by the kernel tests (plain functions: `from tests.kernels.conftest import ...`).

Kernel tests run on CPU tensors through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); `gpu` tests need it off.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# For modules whose every test needs the interpreter.
interpreter_only = pytest.mark.skipif(not INTERPRETING,
                                      reason="kernel tests run on CPU through the Triton interpreter")


@pytest.fixture
def needs_interpreter_unless_gpu(request):
    """CPU tests drive the kernels through the interpreter; `gpu` tests need it off. Modules use
    it with `pytestmark = pytest.mark.usefixtures("needs_interpreter_unless_gpu")`."""
    if "gpu" not in request.keywords and not INTERPRETING:
        pytest.skip("kernel tests run on CPU through the Triton interpreter (TRITON_INTERPRET=1)")


# Tolerances of a fused op with GEMMs inside (rank-r products, convolutions) vs the fp32-upcast
# reference, per dtype, for outputs and every gradient (atol scaled as `assert_close` says).
GEMM_TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
}


def assert_close(name, got, want, tol):
    """got vs the (fp32-upcast) reference with tol = dict(atol, rtol); atol is scaled by
    max(1, max|want|): weight grads are sums over rows and grow with them."""
    want = want.float()
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want, atol=tol["atol"] * scale, rtol=tol["rtol"],
                               msg=lambda m: f"{name}: {m}")


def assert_matches_reference(out, grads, ref_out, ref_grads, inputs, dtype, tol):
    """A fused op's output and every input gradient against the fp32 reference run: same dtype
    (the inputs') and shape, values within `tol`; the same inputs got gradients."""
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close("out", out, ref_out, tol)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert grads[k].dtype == inputs[k].dtype and grads[k].shape == inputs[k].shape, k
        assert_close(f"grad {k}", grads[k], ref_grads[k], tol)


def assert_compiles_like_eager(f, args, tol, grad_names=()):
    """torch.compile(f, fullgraph=True, backend="aot_eager") on the torch backend gives the eager
    call's value and, for `grad_names` (one per arg), its gradients w.r.t. args."""
    from fastpeft.kernels import backend

    torch._dynamo.reset()
    with backend("torch"):
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
        g_got = torch.autograd.grad(got, args) if grad_names else ()
        want = f(*args)
        g_want = torch.autograd.grad(want, args) if grad_names else ()
    assert_close("compiled", got, want, tol)
    for n, a, b in zip(grad_names, g_got, g_want):
        assert_close(f"compiled grad {n}", a, b, tol)


def check_aot_smoke(tmp_path, kernels):
    """`python -m fastpeft.kernels.aot --smoke` on `kernels`: one small config each compiles for
    sm_80 and sm_90 with no error, no spills and shared memory within the arch's limit."""
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("triton's bundled cuobjdump is missing")
    out = tmp_path / "aot.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the interpreter would replace the real compiler
    proc = subprocess.run([sys.executable, "-m", "fastpeft.kernels.aot", "--smoke", "--jobs", "2", "--only",
                           ",".join(kernels), "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in kernels for a in (80, 90)}
    for r in rows:
        assert r["error"] is None, r
        assert r["stack"] == 0 and (r["local"] or 0) == 0, r
        assert r["shared"] <= {80: 166912, 90: 232448}[r["arch"]], r
