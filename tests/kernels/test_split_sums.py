"""The scale-shift backwards finish their row-split column sums inside the launch (the last
program of a column block sums the partials: kernels/_common.py `last_split`, `split_sums`,
`split_workspace`): deterministic, correct with several splits, counters left at zero.

Kernels run through the Triton interpreter on CPU (backend "triton").
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastpeft.kernels.ssf as KS  # noqa: E402
import fastpeft.ops.ssf as K  # noqa: E402
from fastpeft.kernels import _common, backend  # noqa: E402
from tests.kernels.conftest import assert_close  # noqa: E402
from tests.kernels.test_ssf_kernels import TOL, params  # noqa: E402

pytestmark = pytest.mark.usefixtures("needs_interpreter_unless_gpu")


@pytest.mark.parametrize("fn", ["ssf", "ssf_gelu", "layernorm_ssf"])
def test_split_column_sums_are_finished_in_launch_deterministic_and_leave_counters_zero(fn):
    # 300 rows: several row splits per column block (two column blocks for ssf at width 200)
    m, d = 300, 200
    x = torch.randn(m, d)
    grad = torch.randn(m, d)
    lnw, lnb, scale, shift = (p.requires_grad_(True) for p in params(d, torch.float32, n=4))
    leaves = (lnw, lnb, scale, shift) if fn == "layernorm_ssf" else (scale, shift)
    ref_fn = {"ssf": K.ssf_ref, "ssf_gelu": K.ssf_gelu_ref, "layernorm_ssf": K.layernorm_ssf_ref}[fn]
    args = (x, *leaves)

    def once(f, which):
        for p in leaves:
            p.grad = None
        with backend(which):
            f(*args).backward(grad)
        return [p.grad.clone() for p in leaves]

    s = _common.row_splits(m, KS.CONFIGS["ssf_bwd"][0].BLOCK_M, 1, x.device)
    assert s > 1  # the test needs several splits per column block
    a, b = once(getattr(K, fn), "triton"), once(getattr(K, fn), "triton")
    for ga, gb in zip(a, b):
        assert torch.equal(ga, gb)  # fixed summation order, whichever program arrives last
    for name, ga, gr in zip(["p0", "p1", "p2", "p3"], a, once(ref_fn, "torch")):
        assert_close(f"grad {name}", ga, gr, TOL[torch.float32])
    locks = [lock for (dev, _), (_, lock) in _common._SPLIT_WS.items() if dev.type == "cpu"]
    assert locks
    for lock in locks:
        assert int(lock.abs().sum()) == 0
