"""Loads the compiled extension `fastpeft._C` once, lazily, and never fatally.

The extension only registers kernels for the `torch.ops.fastpeft.*` ops; when it cannot be
used (disabled, not built, built for another torch/CUDA, fails to load) fastpeft/ops/ defines
the same ops on the pure-torch reference instead, after exactly one RuntimeWarning.

Nothing here touches CUDA at import: `backends()` asks torch about devices only when called.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

# Written by setup.py at build time (see there for the fields).
BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")

_TRUTHY = {"1", "true", "yes", "on"}


@dataclasses.dataclass(frozen=True)
class ExtensionStatus:
    available: bool  # fastpeft._C is imported and its kernels are registered
    has_cpu: bool  # it registered CPU kernels
    has_cuda: bool  # it registered CUDA kernels
    reason: str  # why it is not available ("" when it is)
    build_info: dict[str, Any]  # contents of _build_info.json ({} when absent)


def read_build_info(path: Path | None = None) -> dict[str, Any]:
    """The build-time record, or {} when the package was never built (e.g. a bare checkout)."""
    path = BUILD_INFO_PATH if path is None else path
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        return {"unreadable": f"{path}: {exc}"}


def _major_minor(version: str | None) -> str | None:
    if not version:
        return None
    return ".".join(version.split("+")[0].split(".")[:2])


def compare_build(info: dict[str, Any], torch_version: str, cuda_version: str | None) -> str | None:
    """Why a .so described by `info` must not be loaded into this torch, or None if it may.

    A C++ extension links against libtorch's unstable C++ ABI: loading one built for another
    torch minor release (or another CUDA) crashes or misbehaves, so we refuse before dlopen.
    """
    built_torch = info.get("torch")
    if built_torch and _major_minor(built_torch) != _major_minor(torch_version):
        return f"fastpeft._C was built for torch {built_torch} but torch {torch_version} is running"
    if "torch_cuda" in info and info["torch_cuda"] != cuda_version:
        return (
            f"fastpeft._C was built for torch CUDA {info['torch_cuda']} but the running torch has "
            f"CUDA {cuda_version}"
        )
    return None


def probe() -> ExtensionStatus:
    """Decide whether the extension can be used, importing it if so. Uncached, never warns."""
    info = read_build_info()

    def fallback(reason: str) -> ExtensionStatus:
        return ExtensionStatus(False, False, False, reason, info)

    if os.environ.get("FASTPEFT_DISABLE_EXT", "").strip().lower() in _TRUTHY:
        return fallback("the compiled extension is disabled by FASTPEFT_DISABLE_EXT")
    if "unreadable" in info:
        return fallback(f"the build record is unreadable ({info['unreadable']})")
    if info.get("backend") == "none":
        return fallback("fastpeft was built without its extension (FASTPEFT_BUILD_BACKEND=none)")
    mismatch = compare_build(info, torch.__version__, torch.version.cuda)
    if mismatch:
        return fallback(
            f"{mismatch}; rebuild with `pip install -e . --no-build-isolation`, or install the "
            f"fastpeft wheel built for this torch and CUDA (+cu<CUDA>torch<A.B>, see README 'Wheels')"
        )
    try:
        module = importlib.import_module("fastpeft._C")
    except Exception as exc:  # noqa: BLE001  (ImportError/OSError mostly; never fail the import)
        return fallback(f"fastpeft._C could not be loaded ({type(exc).__name__}: {exc})")
    compiled = module.compiled_info()
    return ExtensionStatus(True, True, bool(compiled["with_cuda"]), "", info)


@functools.cache
def load() -> ExtensionStatus:
    """The extension status, probed once per process; warns once if falling back."""
    status = probe()
    if not status.available:
        warnings.warn(
            f"fastpeft: {status.reason}; using the pure-torch reference ops instead",
            RuntimeWarning,
            stacklevel=2,
        )
    return status


def build_info() -> dict[str, Any]:
    """The build record plus what this process actually runs with."""
    status = load()
    return {
        **status.build_info,
        "extension_loaded": status.available,
        "fallback_reason": status.reason or None,
        "runtime_torch": torch.__version__,
        "runtime_torch_cuda": torch.version.cuda,
    }


def backends() -> dict[str, bool]:
    """Which execution paths this process can use; the reference is always there."""
    status = load()
    try:
        importlib.import_module("triton")
        triton_ok = True
    except Exception:  # noqa: BLE001  (a broken triton install must not break a status query)
        triton_ok = False
    return {
        "extension_cpu": status.has_cpu,
        "extension_cuda": status.has_cuda,
        "cuda_device": torch.cuda.is_available(),
        "triton": triton_ok,
        "triton_interpreter": os.environ.get("TRITON_INTERPRET", "") == "1",
        "reference": True,
    }
