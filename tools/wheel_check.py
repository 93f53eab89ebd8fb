"""`make wheel-check`: install a built wheel into a fresh virtualenv and prove it works.

    python tools/wheel_check.py --wheel dist/fastpeft-...whl [--sdist dist/fastpeft-X.tar.gz]
                                [--cuobjdump PATH] [--archs sm_80,sm_90] [--keep]

Checks, all from outside the source tree (cwd = a temp dir, no PYTHONPATH):
  1. wheel contents: exactly one fastpeft/_C*.so (none for a pure wheel), _build_info.json,
     fastpeft/kernels, no top-level `kernels`/`tests`; the local version matches the build record.
  2. a fresh venv (mktemp -d) gets the wheel with `pip install --no-deps`; torch & co come from
     the project venv through a .pth file (a .pth-added path is no site dir, so the project's
     editable-install finder there is never run). fastpeft and fastpeft._C must resolve inside
     the fresh venv.
  3. fastpeft.build_info(): backend, version, git sha; for a CUDA wheel "cuda" == torch's CUDA and
     "archs" lists every requested arch. The extension loads without warnings, its CPU kernel is
     the compiled one (dispatcher: registered from csrc/cpu/), and scale_shift (fwd + bwd) and the
     VQT ops match their references on CPU tensors.
  4. CUDA wheel: `cuobjdump --list-elf` on the installed _C lists a cubin per requested arch,
     and `--list-ptx` the PTX ones.
  5. mismatch fallback: the installed _build_info.json is edited to another torch minor version,
     then another CUDA version: import warns exactly once, never loads _C, and the ops still
     match the references.
  6. --sdist: it carries csrc/ (headers too), kernels/, README, pyproject, MANIFEST.in and no
     build outputs; a wheel built FROM it (backend cpu, the fast one) installs and passes 3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs inside the fresh venv; prints one JSON line.
PROBE = textwrap.dedent(
    r"""
    import json, os, sys, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import fastpeft, fastpeft.ops
        from fastpeft import _ext
        status = _ext.load(); info = fastpeft.build_info(); _ext.load()  # cached: warns at most once
        torch.manual_seed(0)
        errs = {}
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(7, 5, 33, dtype=dtype).requires_grad_()
            s = torch.randn(33, dtype=dtype).requires_grad_()
            b = torch.randn(33, dtype=dtype).requires_grad_()
            y = torch.ops.fastpeft.scale_shift(x, s, b)
            ref = fastpeft.ops.scale_shift_ref(x, s, b)
            errs[f"scale_shift_op_{dtype}"] = (y.float() - ref.float()).abs().max().item()
            y2 = fastpeft.ops.scale_shift(x, s, b)
            y2.float().sum().backward()
            gx, gs, gb = sys.modules["fastpeft.ops.scale_shift"].scale_shift_backward_ref(torch.ones_like(x), x, s)
            errs[f"scale_shift_fn_{dtype}"] = (y2.float() - ref.float()).abs().max().item()
            errs[f"scale_shift_grad_{dtype}"] = max((x.grad.float() - gx.float()).abs().max().item(),
                                                    (s.grad.float() - gs.float()).abs().max().item(),
                                                    (b.grad.float() - gb.float()).abs().max().item())
        from fastpeft.ops import vqt
        q, k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
        out, lse = torch.ops.fastpeft.vqt_query_attention(q, k, v, 0.25)
        rout, rlse = vqt.vqt_query_attention_ref(q, k, v, 0.25)
        errs["vqt_query_attention"] = max((out - rout).abs().max().item(), (lse - rlse).abs().max().item())
        cls, queries = torch.randn(3, 8), torch.randn(2, 3, 4, 8)
        out, norms = torch.ops.fastpeft.vqt_aggregate(cls, queries, 1e-12)
        rout, rnorms = vqt.vqt_aggregate_ref(cls, queries, 1e-12)
        errs["vqt_aggregate"] = max((out - rout).abs().max().item(), (norms - rnorms).abs().max().item())
    c_mod = sys.modules.get("fastpeft._C")
    print(json.dumps({
        "prefix": sys.prefix,
        "package": fastpeft.__file__,
        "c_file": getattr(c_mod, "__file__", None),
        "editable_finders": [type(f).__module__ for f in sys.meta_path if "editable" in type(f).__module__.lower()],
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                     and "fastpeft" in str(w.message)],
        "available": status.available, "has_cpu": status.has_cpu, "has_cuda": status.has_cuda,
        "reason": status.reason,
        "build_info": info,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cpu_kernel": [l for l in torch._C._dispatch_dump("fastpeft::scale_shift").splitlines()
                       if l.startswith("CPU:")],
        "errs": errs,
    }))
    """
)

# bf16 rounds once from the fp32 result in both kernel and reference; allow one bf16 ulp-ish.
TOL = {"float32": 1e-5, "bfloat16": 1e-2}


class CheckFailed(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)
    print(f"  ok  {what}")


def run(cmd, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        shown = " ".join(str(c) if len(str(c)) < 200 else "<script>" for c in cmd)
        raise CheckFailed(f"{shown} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "FASTPEFT_DISABLE_EXT", "TRITON_INTERPRET",
                        "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(extra)
    return env


class FreshVenv:
    """A venv in a temp dir with torch & co visible from the project venv via a .pth file."""

    def __init__(self, base: Path):
        self.dir = base / "venv"
        run([sys.executable, "-m", "venv", str(self.dir)])
        self.python = self.dir / "bin" / "python"
        self.site = Path(run([str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                             ).stdout.strip())
        self.pth = self.site / "_fastpeft_check_deps.pth"
        self.cwd = base

    def add_deps(self) -> None:
        paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
        self.pth.write_text("".join(p + "\n" for p in paths))

    def remove_deps(self) -> None:
        self.pth.unlink(missing_ok=True)

    def pip_install(self, wheel: Path) -> None:
        # Without the .pth, so pip never sees (or tries to replace) the project's editable fastpeft.
        self.remove_deps()
        run([str(self.python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
             "--force-reinstall", str(wheel)], cwd=self.cwd, env=clean_env())
        self.add_deps()

    def probe(self) -> dict:
        out = run([str(self.python), "-c", PROBE], cwd=self.cwd, env=clean_env())
        return json.loads(out.stdout.strip().splitlines()[-1])


def check_wheel_contents(wheel: Path) -> dict:
    print(f"wheel contents: {wheel.name}")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = json.loads(zf.read("fastpeft/_build_info.json")) if "fastpeft/_build_info.json" in names else None
    check(info is not None, "fastpeft/_build_info.json is in the wheel")
    so = [n for n in names if re.fullmatch(r"fastpeft/_C[^/]*\.(so|pyd)", n)]
    stray = [n for n in names if n.endswith((".so", ".o", ".cubin")) and n not in so]
    if info["backend"] == "none":
        check(not so, "pure wheel: no compiled extension")
        check(wheel.name.endswith("-py3-none-any.whl"), "pure wheel is tagged py3-none-any")
    else:
        check(len(so) == 1, f"exactly one fastpeft/_C*.so ({so})")
    check(not stray, f"no other binaries ({stray})")
    check(any(n.startswith("fastpeft/kernels/") for n in names), "fastpeft/kernels/ (Triton sources) included")
    check(not any(n.startswith(("kernels/", "tests/", "bench/", "csrc/")) for n in names),
          "no top-level kernels/, tests/, bench/, csrc/")
    version = wheel.name.split("-")[1]
    local = version.partition("+")[2]
    check(info["version"] == version, f"build record version {info['version']} == wheel version {version}")
    if info["backend"] == "cuda":
        major, minor = info["torch_cuda"].split(".")[:2]
        torch_mm = ".".join(info["torch"].split("+")[0].split(".")[:2])
        check(local == f"cu{major}{minor}torch{torch_mm}", f"local version +{local} names CUDA {info['torch_cuda']} and torch {torch_mm}")
    elif info["backend"] == "none":
        check(local == "", "pure wheel has no local version")
    else:
        check(local.startswith("cpu"), f"CPU-extension wheel's local version +{local} is not a CUDA one")
    check(info.get("git_sha") not in (None, "", "unknown"), f"git sha recorded ({info.get('git_sha')})")
    return info


def check_installed(venv: FreshVenv, wheel_info: dict, archs: list[str]) -> dict:
    print("installed wheel, imported from outside the source tree:")
    p = venv.probe()
    prefix = str(venv.dir.resolve())
    check(str(Path(p["package"]).resolve()).startswith(prefix), f"fastpeft imported from the fresh venv ({p['package']})")
    check(not p["editable_finders"], "no editable-install finder active")
    backend = wheel_info["backend"]
    info = p["build_info"]
    check(info["backend"] == backend and info["version"] == wheel_info["version"], "build_info() is the wheel's record")
    if backend == "none":
        check(not p["available"] and len(p["warnings"]) == 1, "pure wheel: one warning, reference ops")
    else:
        check(p["c_file"] is not None and str(Path(p["c_file"]).resolve()).startswith(prefix),
              f"fastpeft._C loaded from the fresh venv ({p['c_file']})")
        check(p["available"] and p["has_cpu"], "fastpeft._ext.load().available (compiled extension in use)")
        check(not p["warnings"], f"no fallback warnings ({p['warnings']})")
        check(len(p["cpu_kernel"]) == 1 and "csrc/cpu/scale_shift.cpp" in p["cpu_kernel"][0],
              f"CPU kernel of fastpeft::scale_shift is the compiled one ({p['cpu_kernel']})")
    if backend == "cuda":
        check(info["cuda"] == p["torch_cuda"], f"build_info()['cuda'] == torch.version.cuda ({info['cuda']})")
        check(p["has_cuda"], "the extension registered CUDA kernels")
        missing = [a for a in archs if a not in info["archs"]]
        check(not missing, f"build_info()['archs'] {info['archs']} lists {archs}")
    check_errs(p)
    return p


def check_errs(p: dict) -> None:
    bad = {k: v for k, v in p["errs"].items() if not v <= TOL["bfloat16" if "bfloat16" in k else "float32"]}
    check(not bad, f"CPU ops match the references ({len(p['errs'])} checks; max err "
                   f"{max(p['errs'].values()):.2e}){'' if not bad else f': {bad}'}")


def check_cubins(so: Path, cuobjdump: str, archs: list[str]) -> None:
    print(f"compiled GPU code in {so.name}:")
    check(bool(cuobjdump) and os.access(cuobjdump, os.X_OK), f"cuobjdump available ({cuobjdump})")
    elfs = run([cuobjdump, "--list-elf", str(so)]).stdout
    ptxs = subprocess.run([cuobjdump, "--list-ptx", str(so)], capture_output=True, text=True).stdout
    for arch in archs:
        if arch.startswith("sm_"):
            n = len(re.findall(rf"\.{arch}\.cubin", elfs))
            check(n > 0, f"cuobjdump --list-elf: {n} {arch} cubin(s)")
        elif arch.startswith("compute_"):
            n = len(re.findall(rf"\.sm_{arch[len('compute_'):]}\.ptx", ptxs))
            check(n > 0, f"cuobjdump --list-ptx: {n} {arch} PTX")


def check_mismatch(venv: FreshVenv, info_path: Path) -> None:
    print("mismatch fallback of the installed wheel:")
    original = info_path.read_text(encoding="utf-8")
    info = json.loads(original)
    major, minor = info["torch"].split("+")[0].split(".")[:2]
    cases = [("torch", f"{major}.{int(minor) - 1}.0", "built for torch")]
    if info.get("torch_cuda"):
        cases.append(("torch_cuda", "11.8", "CUDA 11.8"))
    try:
        for key, value, needle in cases:
            info_path.write_text(json.dumps({**info, key: value}), encoding="utf-8")
            p = venv.probe()
            check(not p["available"] and p["c_file"] is None,
                  f"{key}={value}: extension refused before loading ({p['reason']})")
            check(len(p["warnings"]) == 1 and needle in p["warnings"][0],
                  f"{key}={value}: exactly one warning naming the mismatch")
            check_errs(p)
    finally:
        info_path.write_text(original, encoding="utf-8")


def check_sdist(sdist: Path, venv: FreshVenv, tmp: Path) -> None:
    print(f"sdist: {sdist.name}")
    with tarfile.open(sdist) as tf:
        names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
    for want in ("README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "GIT_SHA", "csrc/ops.cpp",
                 "kernels/__init__.py", "fastpeft/_ext.py"):
        check(want in names, f"carries {want}")
    for tree, exts in (("csrc/include/", (".h",)), ("csrc/cpu/", (".cpp",)), ("csrc/cuda/", (".cu",))):
        want = sorted(str(p.relative_to(ROOT)) for p in (ROOT / tree).rglob("*") if p.suffix in exts)
        have = sorted(n for n in names if n.startswith(tree) and n.endswith(exts))
        check(want and want == have, f"carries all of {tree} ({len(have)} files)")
    check(not [n for n in names if n.endswith((".so", ".o")) or n.endswith("_build_info.json")],
          "no build outputs")
    check("+" not in sdist.name, "no local version on the sdist")

    out_dir = tmp / "from-sdist"
    t0 = time.time()
    run([sys.executable, "-m", "pip", "wheel", "-q", str(sdist), "--no-build-isolation", "--no-deps",
         "-w", str(out_dir)], cwd=tmp,
        env=clean_env(FASTPEFT_BUILD_BACKEND="cpu", FASTPEFT_LOCAL_VERSION=local_cpu_version()))
    wheels = list(out_dir.glob("fastpeft-*.whl"))
    check(len(wheels) == 1, f"a wheel builds from the sdist (backend cpu, {time.time() - t0:.0f}s): "
                            f"{wheels[0].name if wheels else None}")
    info = check_wheel_contents(wheels[0])
    check(info["backend"] == "cpu", "the sdist-built wheel has the CPU extension")
    venv.pip_install(wheels[0])
    check_installed(venv, info, [])


def local_cpu_version() -> str:
    import torch
    major, minor = torch.__version__.split(".")[:2]
    return f"cputorch{major}.{minor}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", required=True, type=Path)
    ap.add_argument("--sdist", type=Path)
    ap.add_argument("--cuobjdump", default=os.environ.get("CUOBJDUMP", ""))
    ap.add_argument("--archs", default="", help="comma-separated; default: the wheel's build record")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()

    t0 = time.time()
    wheel = args.wheel.resolve()
    if not wheel.exists():
        print(f"wheel-check: FAIL: {wheel} does not exist (`make wheel` first)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="fastpeft-wheel-check-"))
    try:
        info = check_wheel_contents(wheel)
        archs = [a for a in args.archs.split(",") if a] or list(info.get("archs") or [])
        if info["backend"] == "cuda":
            check(bool(archs), f"requested archs known ({archs})")
        print(f"fresh venv: {tmp / 'venv'}")
        venv = FreshVenv(tmp)
        venv.pip_install(wheel)
        p = check_installed(venv, info, archs)
        if info["backend"] == "cuda":
            check_cubins(Path(p["c_file"]), args.cuobjdump, archs)
        if info["backend"] != "none":
            check_mismatch(venv, venv.site / "fastpeft" / "_build_info.json")
        if args.sdist:
            check_sdist(args.sdist.resolve(), venv, tmp)
    except CheckFailed as exc:
        print(f"wheel-check: FAIL: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wheel-check: OK: {wheel.name} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
