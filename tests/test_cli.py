"""`python -m fastpeft` end to end, in a subprocess as a user would run it."""

import os
import subprocess
import sys


def _run(*args, tmp_path):
    # cwd=tmp_path: the installed package is imported, not whatever is in the test's cwd.
    # The timeout is generous: `demo --quick` also trains each PETL method for a few steps.
    return subprocess.run([sys.executable, "-m", "fastpeft", *args], cwd=tmp_path,
                          env={**os.environ, "COLUMNS": "120"}, capture_output=True, text=True,
                          timeout=600)


def test_demo_quick(tmp_path):
    out = _run("demo", "--quick", "--device", "cpu", "--out", str(tmp_path / "res"), tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "max relative error" in out.stdout
    assert "MISMATCH" not in out.stdout
    assert "recompute" in out.stdout and "results written to" in out.stdout
    assert (tmp_path / "res" / "demo.md").exists()
    assert "Conv-Adapter" in out.stdout and "ST-Adapter" in out.stdout  # the ConvNet / video section


def test_info(tmp_path):
    out = _run("info", tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "extension_loaded" in out.stdout and "reference" in out.stdout


def test_bad_subcommand_exits_nonzero(tmp_path):
    assert _run("nope", tmp_path=tmp_path).returncode == 2
