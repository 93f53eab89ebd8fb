"""Wheel naming and toolchain preflight (setup.py + tools/wheel_tag.py), without building anything."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_mod = _load("fastpeft_setup_under_test", ROOT / "setup.py")
wheel_tag = _load("fastpeft_wheel_tag_under_test", ROOT / "tools" / "wheel_tag.py")


@pytest.mark.parametrize(
    "backend, torch_version, cuda, expected",
    [
        ("cuda", "2.14.1+cu130", "13.0", "cu130torch2.14"),
        ("cuda", "2.11.0+cu126", "12.6", "cu126torch2.11"),
        ("cuda", "2.11.0", "12.8", "cu128torch2.11"),
        ("cuda", "2.10.0a0+git1234", "12.9", "cu129torch2.10"),
        ("cuda", "2.14.1", "13", "cu130torch2.14"),
        ("cpu", "2.14.1+cu130", "13.0", "cputorch2.14"),
        ("cpu", "2.12.0+cpu", None, "cputorch2.12"),
        ("none", "2.14.1+cu130", "13.0", ""),
        ("none", None, None, ""),
    ],
)
def test_local_version(backend, torch_version, cuda, expected):
    assert setup_mod.wheel_local_version(backend, torch_version, cuda) == expected


def test_local_version_errors():
    with pytest.raises(SystemExit, match="CPU-only"):
        setup_mod.wheel_local_version("cuda", "2.14.1+cpu", None)
    with pytest.raises(SystemExit, match="torch is missing"):
        setup_mod.wheel_local_version("cuda", None, None)


def test_local_version_is_pep440():
    from packaging.version import Version

    v = Version("0.1.0+" + setup_mod.wheel_local_version("cuda", "2.14.1+cu130", "13.0"))
    assert v.local == "cu130torch2.14" and v.public == "0.1.0"


@pytest.mark.parametrize(
    "arch_list, expected",
    [
        ("8.0;9.0+PTX", ["sm_80", "sm_90", "compute_90"]),
        ("8.0 8.6 9.0", ["sm_80", "sm_86", "sm_90"]),
        ("10.0+PTX", ["sm_100", "compute_100"]),
        (None, []),
    ],
)
def test_arch_names(arch_list, expected):
    assert setup_mod.arch_names(arch_list) == expected


def test_nvcc_major_mismatch_names_both_versions():
    with pytest.raises(SystemExit) as exc:
        setup_mod.choose_backend("cuda", "13.0", "12.4")
    msg = str(exc.value)
    assert "nvcc 12.4" in msg and "CUDA 13.0" in msg and "major version" in msg


def test_missing_nvcc_names_torch_cuda(monkeypatch):
    monkeypatch.setenv("CUDA_HOME", "/nonexistent-cuda")
    with pytest.raises(SystemExit) as exc:
        setup_mod.choose_backend("cuda", "12.6", None)
    msg = str(exc.value)
    assert "no nvcc at /nonexistent-cuda/bin/nvcc" in msg and "CUDA 12.6" in msg and "12.x" in msg


def test_minor_mismatch_is_fine_and_auto_falls_back(capsys):
    assert setup_mod.choose_backend("cuda", "13.0", "13.1") == "cuda"
    assert setup_mod.choose_backend("auto", "13.0", "12.4") == "cpu"
    assert "differ in major version" in capsys.readouterr().err


def test_wheel_names():
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    name = wheel_tag.wheel_name("0.1.0", "cu130torch2.14", "cuda")
    assert name.startswith(f"fastpeft-0.1.0+cu130torch2.14-{py}-{py}-") and name.endswith(".whl")
    assert wheel_tag.wheel_name("0.1.0", "", "none") == "fastpeft-0.1.0-py3-none-any.whl"


def test_preflight_cli_fails_early_without_nvcc(tmp_path):
    """`make wheel`'s first step: exit 1 with the reason, before any build starts."""
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch: the CUDA preflight fails for that reason instead")
    env = {"PATH": "/usr/bin:/bin", "CUDA_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "wheel_tag.py"), "local", "cuda"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1
    assert f"no nvcc at {tmp_path}/bin/nvcc" in out.stderr and f"CUDA {torch.version.cuda}" in out.stderr
    ok = subprocess.run([sys.executable, str(ROOT / "tools" / "wheel_tag.py"), "local", "none"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip() == ""
