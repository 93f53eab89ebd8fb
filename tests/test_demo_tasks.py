"""The many-tasks demo (fastpeft/demo_tasks.py; also part of `demo --quick` in tests/test_cli.py):
two task files loaded onto one backbone give, in one mixed batch, each task's own predictions,
and each file is the task's tensors plus a small header."""
from __future__ import annotations

import argparse

import torch
from rich.console import Console

from fastpeft.demo_tasks import demo_tasks


def test_demo_tasks_quick():
    out = demo_tasks(argparse.Namespace(quick=True), Console(file=None, quiet=True), torch.device("cpu"))
    assert set(out["tasks"]) == {"angle", "diagonal"}
    for r in out["tasks"].values():
        assert r["acc_mixed"] == r["acc_own"] and r["max_diff"] < 1e-5
        assert 4 * r["params"] < r["file_bytes"] < 4 * r["params"] + 16 * 1024  # fp32 tensors + header
