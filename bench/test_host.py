"""Host-overhead rows (`pytest bench --bench-host`, bench/host.py).

Every method of `fastpeft.demo.demo_configs` x {eager, timm-ckpt, patch, patch-recompute}: host
time of a train step with the Triton launches stubbed, its ratio to eager, and Triton launches +
aten ops per block. The measurement itself is bench/host.py, run once per session in a
subprocess for all selected methods (it needs TRITON_INTERPRET=1 before triton is imported and
one thread, neither of which may leak into this process's other rows). With
--benchmark-disable (the smoke run) each contender runs one untimed-quality round.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fastpeft.demo import demo_configs

REPO = Path(__file__).resolve().parent.parent
LABELS = [label for label, _ in demo_configs(12)]


def _id(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


def _selected(session) -> list[str]:
    out = []
    for item in session.items:
        cs = getattr(item, "callspec", None)
        if item.get_closest_marker("bench_host") is not None and cs is not None and "method" in cs.params:
            out.append(cs.params["method"])
    return out


@pytest.fixture(scope="session")
def host_rows(request, bench_cfg, tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """Runs bench/host.py once for every selected method; rows by method label."""
    labels = _selected(request.session)
    out = tmp_path_factory.mktemp("host") / "rows.json"
    smoke = bench_cfg.disabled
    cmd = [sys.executable, "-m", "bench.host", "--json", str(out),
           "--rounds", "1" if smoke else str(bench_cfg.rounds), "--warmup", "1" if smoke else "3"]
    if bench_cfg.depth is not None:
        cmd += ["--depth", str(bench_cfg.depth)]
    for label in labels:
        cmd += ["--method", label]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    # stderr passes through: one summary line per method as it finishes (shown live with -s;
    # otherwise pytest keeps it and shows it with a failure)
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, timeout=4 * 3600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"bench.host failed (rc {proc.returncode}); its stderr is above\n{proc.stdout[-3000:]}")
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in json.loads(out.read_text()):
        rows.setdefault(r["name"], []).append(r)
    return rows


@pytest.mark.bench_host
@pytest.mark.parametrize("method", LABELS, ids=[_id(label) for label in LABELS])
def test_host(bench_cfg, collector, host_rows, method):
    rows = host_rows.get(method)
    assert rows, f"bench.host returned no rows for {method!r}"
    for r in rows:
        collector.add(r)
    by = {r["contender"]: r for r in rows}
    assert by["eager"]["status"] == "ok", by["eager"]
    for c, r in by.items():
        if r["status"] != "ok":
            assert r.get("reason"), r
            continue
        assert r["time_median_s"] > 0 and r["aten_ops"] > 0 and r["launches"] == r["aten_ops"] + r["triton_launches"], r
        if c.startswith("patch"):
            assert r["backend"] == "triton", r
    skipped = [f"{c}: {r['reason']}" for c, r in by.items() if r["status"] != "ok"]
    if skipped:
        print(f"{method}: skipped " + "; ".join(skipped))
