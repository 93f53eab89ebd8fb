"""Ahead-of-time compile check (kernels/aot.py) on one small config per kernel: each compiles
for sm_80 and sm_90 within the shared-memory limit and without register spills. The full
matrix of shipped configs is `make triton-check` (`python -m fastpeft.kernels.aot`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

# at least these (other kernel modules listed in aot.MODULES add theirs)
KERNELS = {"adapter_fwd", "adapter_bwd", "adapter_bwd_dw", "philox_rand", "ssf_fwd", "ssf_bwd",
           "layernorm_ssf_fwd", "layernorm_ssf_bwd", "ssf_rows_fwd", "ssf_rows_bwd", "layernorm_ssf_rows_fwd",
           "layernorm_ssf_rows_bwd"}


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="triton's bundled cuobjdump is missing")
def test_one_config_per_kernel_compiles_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "aot.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the interpreter would replace the real compiler
    proc = subprocess.run([sys.executable, "-m", "fastpeft.kernels.aot", "--smoke", "--jobs", "2",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows, kernels = result["rows"], set(result["kernels"])
    assert KERNELS <= kernels
    assert {r["kernel"] for r in rows} == kernels     # one config of every kernel
    for kernel in kernels:
        assert {r["arch"] for r in rows if r["kernel"] == kernel} == {80, 90}, kernel
    for r in rows:
        assert r["error"] is None, r
        assert r["stack"] == 0 and (r["local"] or 0) == 0, r      # no register spills
        assert r["regs"] and r["regs"] <= 255, r
        assert r["shared"] <= {80: 166912, 90: 232448}[r["arch"]], r


def test_bench_shape_launch_report_counts_programs_per_launch():
    # recorded on meta tensors (no GPU, nothing launched): every launch of the bench's ViT-B/16
    # batch-8 ops fills one wave of 132 SMs (row-tiled rank-r kernels split their output width or
    # their reduction when rows are few)
    from fastpeft.kernels import _common, aot

    backend_before = _common.get_backend()
    launches = aot.bench_launches()
    assert _common.get_backend() == backend_before and _common.interpreting() == _common._INTERPRETING
    by = {}
    for ln in launches:
        by.setdefault(ln["kernel"], []).append(ln)
        assert ln["programs"] == __import__("math").prod(ln["grid"]) and ln["fills_wave"] == (ln["programs"] >= 132)
    for k in ("_adapter_fwd_kernel", "_adapter_bwd_kernel", "_ssf_fwd_kernel", "_ssf_bwd_kernel",
              "_layernorm_ssf_fwd_kernel", "_layernorm_ssf_bwd_kernel", "_convpass_up_fwd_kernel",
              "_convpass_down_bwd_kernel", "_convpass_up_bwd_kernel", "_lowrank_down_kernel",
              "_adapter_bwd_dw_kernel", "_adapter_bwd_finish_kernel", "_lowrank_gemm_kernel", "_lowrank_dw_kernel"):
        assert by.get(k) and all(ln["fills_wave"] for ln in by[k]), (k, by.get(k))
    assert all(ln["fills_wave"] for ln in launches), [ln for ln in launches if not ln["fills_wave"]]
