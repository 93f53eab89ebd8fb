"""The extension loader: build record, backends, and every fallback path.

Fallbacks that would change process-wide op registration run in a subprocess.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastpeft
from fastpeft import _ext
from fastpeft.ops.scale_shift import SCHEMAS

PACKAGE_DIR = Path(fastpeft.__file__).parent
BUILD_FIELDS = {"version", "torch", "torch_cuda", "nvcc", "backend", "arch_list", "cxx11_abi",
                "python", "git_sha", "build_time"}
RUNTIME_FIELDS = {"extension_loaded", "fallback_reason", "runtime_torch", "runtime_torch_cuda"}

# Imports fastpeft, uses the op (forward + backward), and reports what happened as JSON.
PROBE_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fastpeft
        import fastpeft.ops
        from fastpeft import _ext
        _ext.load(); _ext.build_info(); _ext.backends()   # cached: must not warn again
        import torch
        torch.manual_seed(0)
        x = torch.randn(5, 3, requires_grad=True)
        s = torch.randn(3, requires_grad=True)
        b = torch.randn(3, requires_grad=True)
        y = fastpeft.ops.scale_shift(x, s, b)
        y.sum().backward()
        err = (y - fastpeft.ops.scale_shift_ref(x, s, b)).abs().max().item()
        err = max(err, (s.grad - x.sum(0)).abs().max().item())
    ops = torch.ops.fastpeft
    print(json.dumps({
        "package": fastpeft.__file__,
        "warnings": [str(w.message) for w in caught
                     if issubclass(w.category, RuntimeWarning) and "fastpeft" in str(w.message)],
        "loaded_so": "fastpeft._C" in sys.modules,
        "available": _ext.load().available,
        "max_err": err,
        "schemas": [str(ops.scale_shift.default._schema),
                    str(ops.scale_shift_backward.default._schema)],
    }))
    """
)


def _probe(env_extra, cwd):
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE_SCRIPT], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_build_info_fields():
    info = _ext.build_info()
    assert RUNTIME_FIELDS <= info.keys()
    assert info["runtime_torch"] == torch.__version__
    assert info["runtime_torch_cuda"] == torch.version.cuda
    assert info["extension_loaded"] == _ext.load().available
    assert (info["fallback_reason"] is None) == info["extension_loaded"]
    if not _ext.BUILD_INFO_PATH.exists():
        pytest.skip("not built (no fastpeft/_build_info.json): `make build`")
    assert BUILD_FIELDS <= info.keys()
    assert info["version"].split("+")[0] == fastpeft.__version__
    assert info["backend"] in {"cuda", "cpu", "none"}
    assert (info["arch_list"] is not None) == (info["backend"] == "cuda")
    if info["backend"] != "none" and not os.environ.get("FASTPEFT_DISABLE_EXT"):
        assert info["extension_loaded"], info["fallback_reason"]


def test_backends():
    b = _ext.backends()
    assert set(b) == {"extension_cpu", "extension_cuda", "cuda_device", "triton",
                      "triton_interpreter", "reference"}
    assert all(isinstance(v, bool) for v in b.values())
    assert b["reference"] is True
    assert b["extension_cpu"] == _ext.load().available
    assert b["triton_interpreter"] == (os.environ.get("TRITON_INTERPRET") == "1")


def test_schemas_match_the_python_fallback_definitions():
    ops = torch.ops.fastpeft
    for qualname, op in (("fastpeft::scale_shift", ops.scale_shift),
                         ("fastpeft::scale_shift_backward", ops.scale_shift_backward)):
        assert str(op.default._schema) == qualname + SCHEMAS[qualname]


@pytest.mark.parametrize(
    ("built", "running", "cuda_built", "cuda_running", "problem"),
    [
        ("2.14.1+cu130", "2.14.1+cu130", "13.0", "13.0", None),
        ("2.14.0", "2.14.1+cu130", "13.0", "13.0", None),  # patch releases share the C++ ABI
        ("2.13.0+cu130", "2.14.1+cu130", "13.0", "13.0", "built for torch 2.13.0+cu130 but torch 2.14.1+cu130"),
        ("2.14.1+cu128", "2.14.1+cu130", "12.8", "13.0", "CUDA 12.8 but the running torch has CUDA 13.0"),
        ("2.14.1+cpu", "2.14.1+cu130", None, "13.0", "CUDA None"),
        ("2.14.1+cu130", "2.14.1+cpu", "13.0", None, "has CUDA None"),
    ],
)
def test_compare_build(built, running, cuda_built, cuda_running, problem):
    info = {"torch": built, "torch_cuda": cuda_built}
    result = _ext.compare_build(info, running, cuda_running)
    if problem is None:
        assert result is None
    else:
        assert problem in result


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"torch": "1.0.0", "torch_cuda": torch.version.cuda, "backend": "cpu"}, "built for torch 1.0.0"),
        ({"torch": torch.__version__, "torch_cuda": "99.9", "backend": "cuda"}, "CUDA 99.9"),
        ({"torch": torch.__version__, "torch_cuda": torch.version.cuda, "backend": "none"},
         "FASTPEFT_BUILD_BACKEND=none"),
        ("{not json", "unreadable"),
    ],
    ids=["torch", "cuda", "none", "corrupt"],
)
def test_probe_refuses_a_mismatched_build_without_importing(record, reason, tmp_path, monkeypatch):
    path = tmp_path / "_build_info.json"
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    monkeypatch.setattr(_ext, "BUILD_INFO_PATH", path)
    monkeypatch.delenv("FASTPEFT_DISABLE_EXT", raising=False)
    status = _ext.probe()
    assert not status.available and not status.has_cpu and not status.has_cuda
    assert reason in status.reason


def test_probe_honours_disable(monkeypatch):
    monkeypatch.setenv("FASTPEFT_DISABLE_EXT", "1")
    status = _ext.probe()
    assert not status.available and "FASTPEFT_DISABLE_EXT" in status.reason


def test_disabled_extension_falls_back_with_one_warning(tmp_path):
    report = _probe({"FASTPEFT_DISABLE_EXT": "1"}, cwd=tmp_path)
    assert len(report["warnings"]) == 1, report["warnings"]
    assert "FASTPEFT_DISABLE_EXT" in report["warnings"][0]
    assert "reference" in report["warnings"][0]
    assert not report["loaded_so"] and not report["available"]
    assert report["max_err"] < 1e-5
    # The Python-defined schemas are the very ones the C++ library defines.
    assert report["schemas"] == [q + s for q, s in SCHEMAS.items()]


def test_mismatched_build_record_falls_back_without_loading_the_so(tmp_path):
    # A copy of the package (compiled .so included) whose build record claims another torch.
    copy = tmp_path / "fastpeft"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    record = {**_ext.read_build_info(), "torch": "1.0.0", "backend": "cpu"}
    (copy / "_build_info.json").write_text(json.dumps(record))
    env = {"PYTHONPATH": str(tmp_path), "FASTPEFT_DISABLE_EXT": ""}
    report = _probe(env, cwd=tmp_path)
    assert report["package"].startswith(str(copy))
    assert len(report["warnings"]) == 1, report["warnings"]
    assert "built for torch 1.0.0" in report["warnings"][0]
    assert not report["loaded_so"] and not report["available"]
    assert report["max_err"] < 1e-5


def test_import_fastpeft_does_not_load_the_extension(tmp_path):
    # Importing the package must stay cheap and side-effect free: no .so, no CUDA init.
    code = ("import sys, fastpeft, torch; "
            "print('fastpeft._C' in sys.modules, torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# --- build-time backend selection (setup.py), decided from the toolchain alone ----------------

SETUP_PY = Path(__file__).resolve().parents[1] / "setup.py"


@pytest.fixture
def setup_module():
    if not SETUP_PY.exists():
        pytest.skip("not a source checkout")
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastpeft_setup", SETUP_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only; setup() runs under __main__
    return module


@pytest.mark.parametrize(
    ("requested", "torch_cuda", "nvcc", "expected"),
    [
        ("auto", "13.0", "13.0", "cuda"),
        ("auto", "13.0", None, "cpu"),  # no toolkit
        ("auto", None, "13.0", "cpu"),  # CPU-only torch
        ("auto", "13.0", "12.4", "cpu"),  # nvcc torch cannot build with
        ("cpu", "13.0", "13.0", "cpu"),
        ("none", None, None, "none"),
        ("cuda", "13.0", "13.1", "cuda"),  # minor versions may differ
    ],
)
def test_choose_backend(setup_module, requested, torch_cuda, nvcc, expected):
    assert setup_module.choose_backend(requested, torch_cuda, nvcc) == expected


@pytest.mark.parametrize(
    ("torch_cuda", "nvcc", "message"),
    [
        (None, "13.0", "torch is CPU-only"),
        ("13.0", None, "no nvcc at"),
        ("13.0", "12.4", "nvcc 12.4"),
        ("12.8", "13.0", "torch's CUDA 12.8"),
    ],
)
def test_cuda_backend_fails_naming_the_missing_piece(setup_module, torch_cuda, nvcc, message):
    with pytest.raises(SystemExit, match=message):
        setup_module.choose_backend("cuda", torch_cuda, nvcc)
