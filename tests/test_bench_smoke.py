"""The benchmark suite stays runnable: `python -m bench.smoke` (tiny model, --benchmark-disable)
in a subprocess, then its results JSON through bench.report. Timings are never asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # The bench measures what users run: no Triton interpreter (tests/conftest.py sets it for the
    # kernel tests; under it the smoke run takes ~4x longer).
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "bench.smoke", "--save", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    (results,) = [p for p in tmp_path.glob("*.json") if not p.stem.endswith("-host_overhead")]
    doc = json.loads(results.read_text())
    rows = doc["rows"]
    for key in ("device", "torch", "triton", "git_sha"):
        assert key in doc["machine"]
    ok = {(r["name"], r["contender"], r["mode"]) for r in rows if r["status"] == "ok"}
    assert ("AdaptFormer", "eager", "train") in ok and ("AdaptFormer", "eager", "infer") in ok
    assert ("scale_shift", "eager", "fwd+bwd") in ok
    # every row is either measured or skipped with a reason, never dropped
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["reason"], r
        else:
            assert r["time_median_s"] > 0 and r["hbm_bytes"] > 0 and r["launches"] > 0, r
            if r["mode"] in ("train", "fwd+bwd"):
                assert r["saved_bytes"] is not None, r
    eager = next(r for r in rows if r["suite"] == "e2e" and r["contender"] == "eager" and r["mode"] == "train")
    assert eager["time_vs_eager"] == 1.0 and eager["saved_bytes"] > 0

    if str(REPO) not in sys.path:  # plain `pytest` (not `python -m pytest`) leaves the repo root off sys.path
        sys.path.insert(0, str(REPO))
    from bench import report

    assert report.main([str(results), "--out-dir", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / f"{results.stem}.md").read_text()
    assert "| AdaptFormer | eager |" in md and "Skipped rows and why" in md

    # the host-overhead mode (--bench-host): its own JSON and markdown, Triton launches counted
    (host,) = tmp_path.glob("*-host_overhead.json")
    hdoc = json.loads(host.read_text())
    assert hdoc["config"]["host"] and hdoc["machine"]["threads"] == 1
    hrows = {(r["name"], r["contender"]): r for r in hdoc["rows"]}
    assert {n for n, _ in hrows} == {"AdaptFormer", "SSF", "VQT"}
    for (name, contender), r in hrows.items():
        assert r["suite"] == "host" and r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok":
            assert r["time_median_s"] > 0 and r["aten_ops"] > 0, r
    assert hrows[("SSF", "eager")]["triton_launches"] == 0
    assert hrows[("SSF", "patch")]["triton_launches"] > 0 and hrows[("SSF", "patch")]["backend"] == "triton"
    assert hrows[("SSF", "patch")]["time_vs_eager"] is not None
    hmd = host.with_suffix(".md").read_text()
    assert "| SSF | patch |" in hmd and "Triton/block" in hmd
