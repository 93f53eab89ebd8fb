"""Names fastpeft wheels and checks their toolchain before `make wheel` compiles anything.

    python tools/wheel_tag.py local BACKEND        print the local version suffix ("" for none)
    python tools/wheel_tag.py wheel-name BACKEND   print dist/<the wheel `make wheel` builds>
    python tools/wheel_tag.py version              print the base version (fastpeft/version.py)

BACKEND is cuda | cpu | none. For cuda it fails (exit 1), before any build starts, when there
is no nvcc or nvcc's major version differs from torch's CUDA, naming both versions. The naming
and toolchain logic lives in setup.py (wheel_local_version, choose_backend), imported from here
so the two can never disagree; tests/test_wheel_naming.py tests it without building.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_setup():
    """setup.py as a module (its setup() call is behind `if __name__ == "__main__"`)."""
    spec = importlib.util.spec_from_file_location("fastpeft_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_version(setup_mod) -> str:
    saved = os.environ.pop("FASTPEFT_LOCAL_VERSION", None)
    try:
        return setup_mod.read_version()
    finally:
        if saved is not None:
            os.environ["FASTPEFT_LOCAL_VERSION"] = saved


def local_version(setup_mod, backend: str) -> str:
    """Preflight for `backend`, then its suffix. Raises SystemExit with the reason on failure."""
    if backend == "none":
        return ""
    try:
        import torch
    except ImportError:
        raise SystemExit(f"a {backend} wheel builds against the installed torch, which is missing")
    if backend == "cuda":
        setup_mod.default_cuda_home()
        nvcc = setup_mod.nvcc_version(setup_mod.cuda_home())
        setup_mod.choose_backend("cuda", torch.version.cuda, nvcc)  # exits naming both versions
    return setup_mod.wheel_local_version(backend, torch.__version__, torch.version.cuda)


def wheel_name(version: str, local: str, backend: str) -> str:
    """The filename pip gives the wheel: pure py3-none-any for none, else cpXY-cpXY-<platform>."""
    full = f"{version}+{local}" if local else version
    if backend == "none":
        return f"fastpeft-{full}-py3-none-any.whl"
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    return f"fastpeft-{full}-{py}-{py}-{plat}.whl"


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("local", "wheel-name", "version"):
        print(__doc__, file=sys.stderr)
        return 2
    setup_mod = load_setup()
    if argv[0] == "version":
        print(base_version(setup_mod))
        return 0
    if len(argv) != 2 or argv[1] not in ("cuda", "cpu", "none"):
        print(f"usage: wheel_tag.py {argv[0]} cuda|cpu|none (got {argv[1:]})", file=sys.stderr)
        return 2
    backend = argv[1]
    try:
        local = local_version(setup_mod, backend)
    except SystemExit as exc:
        print(f"make wheel: {exc}", file=sys.stderr)
        return 1
    if argv[0] == "local":
        print(local)
    else:
        print(os.path.join("dist", wheel_name(base_version(setup_mod), local, backend)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
