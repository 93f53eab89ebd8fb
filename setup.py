"""Build script for fastpeft: the Python package plus the optional `fastpeft._C` extension.

Install with `pip install -e . --no-build-isolation` so the extension compiles against the torch
already installed. Environment knobs (see README.md):

  FASTPEFT_BUILD_BACKEND  auto | cuda | cpu | none   (default auto)
      auto  CUDA extension iff torch is a CUDA build and $CUDA_HOME/bin/nvcc exists, else CPU.
            Decided from the toolchain only: no GPU is probed (build machines have none).
      cuda  CUDA extension, or fail naming what is missing.
      cpu   C++ extension with the CPU kernels only (csrc/ops.cpp + csrc/cpu/*.cpp).
      none  no extension; fastpeft runs on its pure-torch reference ops.
  TORCH_CUDA_ARCH_LIST    default "8.0;9.0+PTX" (A100, H100 + PTX for newer GPUs)
  MAX_JOBS                parallel compile jobs (default 2)
  NVCC_THREADS            passed to nvcc as --threads N (parallel per-arch compilation)
  CUDA_HOME               default /usr/local/cuda when unset and present
  FASTPEFT_LOCAL_VERSION  local version suffix for wheels, e.g. cu130torch2.14 -> 0.1.0+cu130torch2.14
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import re
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join("fastpeft", "_build_info.json")
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
BACKENDS = ("auto", "cuda", "cpu", "none")


def read_version() -> str:
    with open(os.path.join(ROOT, "fastpeft", "version.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__\s*=\s*"([^"]+)"', f.read(), re.M)
    if not match:
        raise RuntimeError("fastpeft/version.py has no __version__ = \"X.Y.Z\" line")
    version = match.group(1)
    local = os.environ.get("FASTPEFT_LOCAL_VERSION", "").strip().lstrip("+")
    # A local suffix describes the binary (CUDA/torch it was built for), which an sdist has not.
    if local and "sdist" not in sys.argv[1:]:
        if not re.fullmatch(r"[A-Za-z0-9]+(\.[A-Za-z0-9]+)*", local):
            raise SystemExit(f"FASTPEFT_LOCAL_VERSION={local!r} is not a PEP 440 local version")
        version = f"{version}+{local}"
    return version


def wheel_local_version(backend: str, torch_version: str | None, torch_cuda: str | None) -> str:
    """The PEP 440 local suffix naming what a wheel's binary was built for ("" = portable).

    cuda: cu<CUDA major><minor>torch<A.B>, e.g. torch 2.14.1+cu130 -> "cu130torch2.14" (the
    flash-attention/xformers convention: pip users pick the wheel matching their torch/CUDA).
    cpu:  cputorch<A.B> (the .so still links libtorch's C++ ABI of that torch minor release).
    none: "" (pure Python, runs on any torch >= the declared minimum).
    """
    if backend == "none":
        return ""
    if not torch_version:
        raise SystemExit(f"a {backend} wheel needs torch installed to name it (torch is missing)")
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    if not match:
        raise SystemExit(f"cannot parse the torch version {torch_version!r}")
    torch_tag = f"torch{match.group(1)}.{match.group(2)}"
    if backend == "cpu":
        return "cpu" + torch_tag
    if backend != "cuda":
        raise SystemExit(f"no wheel naming for backend {backend!r}")
    if not torch_cuda:
        raise SystemExit(f"a CUDA wheel needs a CUDA build of torch; torch {torch_version} is CPU-only")
    major, minor = (torch_cuda.split(".") + ["0"])[:2]
    return f"cu{int(major)}{int(minor)}{torch_tag}"


def arch_names(arch_list: str | None) -> list[str]:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX") -> ["sm_80", "sm_90", "compute_90"] (PTX last)."""
    if not arch_list:
        return []
    sms, ptx = [], []
    for item in re.split(r"[;\s,]+", arch_list.strip()):
        if not item:
            continue
        num = item.split("+")[0].replace(".", "")
        sms.append(f"sm_{num}")
        if item.upper().endswith("+PTX"):
            ptx.append(f"compute_{num}")
    return sms + ptx


def default_cuda_home() -> None:
    # `nvcc` on PATH may be a wrapper (e.g. /usr/local/bin/nvcc), from which torch would infer a
    # CUDA_HOME without headers. Must run before torch.utils.cpp_extension is imported: it reads
    # CUDA_HOME once, at import.
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        if os.path.exists("/usr/local/cuda"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


def put_ninja_on_path() -> None:
    # torch looks for `ninja` on PATH; with an unactivated venv (`.venv/bin/pip install`) the
    # pip-installed ninja is not there and torch silently falls back to a serial distutils build.
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def cuda_home() -> str | None:
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or None


def nvcc_version(home: str | None) -> str | None:
    """`major.minor` of $CUDA_HOME/bin/nvcc, or None when there is no nvcc."""
    if not home:
        return None
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    if not match:
        raise SystemExit(f"could not parse the version of {nvcc} from:\n{out}")
    return match.group(1)


def choose_backend(requested: str, torch_cuda: str | None, nvcc: str | None) -> str:
    """Resolve FASTPEFT_BUILD_BACKEND to the backend to build; fail loudly for impossible `cuda`."""
    if requested not in BACKENDS:
        raise SystemExit(f"FASTPEFT_BUILD_BACKEND={requested!r}: expected one of {', '.join(BACKENDS)}")
    if requested in ("cpu", "none"):
        return requested
    nvcc_path = os.path.join(cuda_home() or "$CUDA_HOME", "bin", "nvcc")
    problems = []
    if torch_cuda is None:
        problems.append("the installed torch is CPU-only (torch.version.cuda is None)")
    if nvcc is None:
        wanted = f"a CUDA {torch_cuda.split('.')[0]}.x toolkit, matching torch's CUDA {torch_cuda}" if torch_cuda else "the CUDA toolkit"
        problems.append(f"no nvcc at {nvcc_path} (set CUDA_HOME to {wanted})")
    if not problems and nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        problems.append(
            f"nvcc {nvcc} ({nvcc_path}) and torch's CUDA {torch_cuda} differ in major version "
            f"(use a CUDA {torch_cuda.split('.')[0]}.x toolkit, or a torch built for CUDA {nvcc.split('.')[0]})"
        )
    if not problems:
        return "cuda"
    if requested == "cuda":
        raise SystemExit("FASTPEFT_BUILD_BACKEND=cuda cannot build: " + "; ".join(problems))
    print(f"fastpeft: building the CPU extension only: {'; '.join(problems)}", file=sys.stderr)
    return "cpu"


def git_sha() -> str:
    if os.environ.get("FASTPEFT_GIT_SHA"):  # set by `make wheel`, which builds from a copy of the tree
        return os.environ["FASTPEFT_GIT_SHA"]
    try:  # an sdist carries the commit it was made from (`make sdist` writes GIT_SHA)
        with open(os.path.join(ROOT, "GIT_SHA"), encoding="utf-8") as f:
            return f.read().strip() or "unknown"
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_build_info(info: dict) -> None:
    # Read at runtime by fastpeft/_ext.py to refuse a .so built for another torch/CUDA.
    with open(os.path.join(ROOT, BUILD_INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")


def extension_modules(backend: str, torch):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -ffp-contract=off: no FMA contraction, so CPU results round like the eager reference
    # (see csrc/include/fastpeft/scale_shift.h). No -march: the wheel must stay portable.
    cxx = ["-O3", "-ffp-contract=off", f'-DFASTPEFT_TORCH_VERSION="{torch.__version__}"']
    link = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is an inline template that expands to `#pragma omp parallel` when
        # torch is built with OpenMP; without -fopenmp it would silently run single-threaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc", "include")], extra_link_args=link)
    if backend == "cpu":
        return [CppExtension("fastpeft._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)]

    nvcc = ["-O3", "-DFASTPEFT_WITH_CUDA"]
    threads = os.environ.get("NVCC_THREADS")
    if threads:
        nvcc += ["--threads", str(int(threads))]
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    cxx.append("-DFASTPEFT_WITH_CUDA")
    return [CUDAExtension("fastpeft._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)]


def main() -> None:
    version = read_version()
    requested = os.environ.get("FASTPEFT_BUILD_BACKEND", "auto").strip().lower() or "auto"
    default_cuda_home()
    os.environ.setdefault("MAX_JOBS", "2")
    put_ninja_on_path()

    try:
        import torch
    except ImportError:
        if requested != "none":
            raise SystemExit(
                "fastpeft's extension builds against the installed torch, which is missing: install "
                "torch first and use `pip install --no-build-isolation`, or set FASTPEFT_BUILD_BACKEND=none"
            )
        torch = None

    torch_version = torch.__version__ if torch else None
    torch_cuda = torch.version.cuda if torch else None
    nvcc = nvcc_version(cuda_home())
    backend = choose_backend(requested, torch_cuda, nvcc)
    if backend == "cuda":
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

    if "sdist" not in sys.argv[1:]:
        write_build_info(
            {
                "version": version,
                "torch": torch_version,
                "torch_cuda": torch_cuda,
                "nvcc": nvcc,
                "backend": backend,
                "arch_list": os.environ["TORCH_CUDA_ARCH_LIST"] if backend == "cuda" else None,
                # What a CUDA binary was built for: torch's CUDA (the wheel's +cuXYZ) and the
                # compiled GPU targets ("sm_80", "sm_90", "compute_90" = PTX).
                "cuda": torch_cuda if backend == "cuda" else None,
                "archs": arch_names(os.environ["TORCH_CUDA_ARCH_LIST"]) if backend == "cuda" else [],
                "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI) if torch else None,
                "python": platform.python_version(),
                "git_sha": git_sha(),
                "build_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
        )

    ext_modules, cmdclass = [], {}
    if backend != "none":
        from torch.utils.cpp_extension import BuildExtension

        ext_modules = extension_modules(backend, torch)
        cmdclass = {"build_ext": BuildExtension}

    setup(
        version=version,
        # fastpeft.kernels lives at top-level kernels/ (Triton sources) but installs only
        # under fastpeft: there must never be an importable top-level `kernels` package.
        packages=find_packages(include=["fastpeft", "fastpeft.*"]) + ["fastpeft.kernels"],
        package_dir={"fastpeft.kernels": "kernels"},
        package_data={"fastpeft": ["_build_info.json"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":
    main()
