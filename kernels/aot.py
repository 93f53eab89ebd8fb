"""Ahead-of-time compile check of every shipped Triton kernel configuration for real GPUs.

    python -m fastpeft.kernels.aot [--arch 80 90] [--jobs 2] [--only adapter_fwd,...] [--smoke]

No GPU is needed: each (kernel, constexpr config, dtype) the launchers can pick (the `CONFIGS`
tables in the kernel modules, enumerated by their `aot_specs()`) is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`; the cubin is inspected with
`cuobjdump --dump-resource-usage`. Fails (exit 1, with a table of offenders) on a compile error,
dynamic shared memory above the arch's per-block limit, or any STACK/LOCAL use (register
spills). `--smoke` checks one (the smallest) config per kernel (tests/kernels/test_aot.py).

Pointer arguments and the row width are compiled with 16-divisibility, as the JIT specialises
them for contiguous tensors with D % 16 == 0 (all ViT widths); the other integer/float arguments
are runtime values (`do_not_specialize`), so these binaries are the ones launched.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# Per-block dynamic shared memory limits (bytes): the CUDA C++ Programming Guide's compute
# capability table ("maximum amount of shared memory per thread block", opt-in).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
MODULES = ("fastpeft.kernels.adapter", "fastpeft.kernels.ssf", "fastpeft.kernels.lowrank",
           "fastpeft.kernels.convpass", "fastpeft.kernels.st_adapter",
           "fastpeft.kernels.conv_adapter")
DIVISIBLE_INTS = ("D",)  # integer args compiled as multiples of 16 (see docstring)


def _specs():
    import importlib
    out = []
    for mod in MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a broken import inside the module is an error, not "absent"
                raise
            print(f"aot: {mod} is not present; skipped", file=sys.stderr)
            continue
        for i, spec in enumerate(m.aot_specs()):
            out.append((mod, i, spec))
    return out


def _cuobjdump() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise SystemExit(f"cuobjdump not found at {path}")
    return path


def _describe_spec(spec) -> dict:
    name, _fn, _sig, constexprs, cfg, dtype = spec
    return {"kernel": name, "dtype": dtype.replace("torch.", ""),
            "config": ",".join(f"{k}={v}" for k, v in constexprs.items()) + f",w={cfg.num_warps},s={cfg.num_stages}"}


def _compile_one(job):
    """Worker: compile spec `idx` of module `mod` for `arch`; returns a result row (dict). Never
    raises: any failure (including the module changing under us) becomes the row's error."""
    mod, idx, arch, workdir, expect = job
    row = {**expect, "arch": arch, "regs": None, "shared": None, "stack": None, "local": None,
           "error": None, "seconds": 0.0}
    try:
        import importlib

        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        spec = importlib.import_module(mod).aot_specs()[idx]
        if _describe_spec(spec) != expect:
            raise RuntimeError(f"{mod}.aot_specs() changed while checking (entry {idx})")
        name, fn, sig, constexprs, cfg, dtype = spec
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:200]
        return row
    t0 = time.time()
    try:
        names = list(sig)
        attrs = {}
        for arg, ty in sig.items():
            if ty.startswith("*") or arg in DIVISIBLE_INTS:
                attrs[(names.index(arg),)] = [["tt.divisibility", 16]]
        full_sig = dict(sig)
        for k in constexprs:
            full_sig[k] = "constexpr"
        src = ASTSource(fn=fn, signature=full_sig, constexprs=constexprs, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        row["shared"] = int(k.metadata.shared)
        cubin = os.path.join(workdir, f"{name}_{idx}_sm{arch}.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([_cuobjdump(), "--dump-resource-usage", cubin], capture_output=True,
                             text=True, check=True).stdout
        for key in ("REG", "STACK", "LOCAL"):
            mm = re.search(rf"\b{key}:(\d+)", res)
            row[key.lower() if key != "REG" else "regs"] = int(mm.group(1)) if mm else None
    except Exception as e:  # noqa: BLE001 - reported as an offender
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]
    row["seconds"] = time.time() - t0
    return row


def offences(row) -> list[str]:
    out = []
    if row["error"]:
        out.append(row["error"])
    else:
        if row["shared"] is not None and row["shared"] > SHARED_LIMIT[row["arch"]]:
            out.append(f"shared {row['shared']} B > sm_{row['arch']} limit {SHARED_LIMIT[row['arch']]} B")
        if row["stack"] is None or row["stack"] > 0:
            out.append(f"STACK {row['stack']} (register spills)")
        if row["local"] is not None and row["local"] > 0:
            out.append(f"LOCAL {row['local']} (register spills)")
    return out


def run(archs=(80, 90), jobs=2, only=None, smoke=False, verbose=True):
    """Compile the matrix; returns (rows, bad_rows, seconds)."""
    t0 = time.time()
    specs = _specs()
    if only:
        specs = [s for s in specs if s[2][0] in only]
    if smoke:  # one config per kernel name: the first listed (fp16, the smallest R_PAD / block)
        seen, kept = set(), []
        for s in specs:
            if s[2][0] not in seen:
                seen.add(s[2][0])
                kept.append(s)
        specs = kept
    with tempfile.TemporaryDirectory(prefix="fastpeft_aot_") as workdir:
        work = [(mod, idx, arch, workdir, _describe_spec(spec)) for mod, idx, spec in specs for arch in archs]
        jobs = max(1, min(jobs, 2, len(work)))
        if verbose:
            print_header()
        rows = []
        if jobs == 1:
            results = map(_compile_one, work)
        else:
            import multiprocessing as mp
            ex = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))
            results = ex.map(_compile_one, work)
        for row in results:  # in order, printed as they finish (CI logs show progress)
            rows.append(row)
            if verbose:
                print_row(row)
        if jobs > 1:
            ex.shutdown()
    bad = [r for r in rows if offences(r)]
    secs = time.time() - t0
    if verbose:
        print(f"\n{len(rows)} compilations ({len(specs)} configs x {len(archs)} archs) in {secs:.1f} s "
              f"with {jobs} process(es); {len(bad)} offender(s)")
        if bad:
            print("\nOFFENDERS:")
            for r in bad:
                print(f"  {r['kernel']:<22} {r['dtype']:<9} sm_{r['arch']}  {r['config']}: {'; '.join(offences(r))}")
    return rows, bad, secs


# ----------------------------------------------------------------------------------------------
# Programs per launch at the bench shapes (ViT-B/16, batch 8: 1,576 rows, width 768, MLP 3072)
# ----------------------------------------------------------------------------------------------
BENCH_ROWS, BENCH_WIDTH, BENCH_HIDDEN, BENCH_TOKENS = 8 * 197, 768, 3072, 197


def _bench_calls():
    """(label, thunk) pairs: every fused op the bench's ViT-B/16 rows run, forward and backward,
    on meta tensors of the bench shapes (no memory, no GPU: only the launch grids matter)."""
    import torch

    from fastpeft.ops import adapter as kad, convpass as kc, lowrank as kl, ssf as kssf  # the functionals

    M, D, H, dev = BENCH_ROWS, BENCH_WIDTH, BENCH_HIDDEN, torch.device("meta")

    def t(*shape, grad=False):
        return torch.empty(shape, device=dev).requires_grad_(grad)

    def run(fn):
        def thunk():
            out = fn()
            out.backward(torch.empty_like(out))
        return thunk

    x = t(8, BENCH_TOKENS, D, grad=True)
    seed = torch.zeros(1, dtype=torch.int64, device=dev)
    calls = []
    for r in (8, 64):
        calls.append((f"adapter r={r} dropout", run(lambda r=r: kad.adapter(
            x, t(r, D, grad=True), t(r, grad=True), t(D, r, grad=True), t(D, grad=True), residual=x, scale=0.1,
            act="relu", dropout_p=0.1, training=True, seed=seed))))
    calls.append(("ssf D=768", run(lambda: kssf.ssf(x, t(D, grad=True), t(D, grad=True)))))
    calls.append(("ssf_gelu D=3072", run(lambda: kssf.ssf_gelu(t(8, BENCH_TOKENS, H, grad=True), t(H, grad=True),
                                                                  t(H, grad=True)))))
    calls.append(("layernorm_ssf D=768", run(lambda: kssf.layernorm_ssf(x, t(D), t(D), t(D, grad=True),
                                                                          t(D, grad=True)))))
    calls.append(("lowrank qkv r=8 rank dropout", run(lambda: kl.lowrank_linear(
        x, t(3 * D, D), t(3 * D), t(8, D, grad=True), t(3 * D, 8, grad=True), dropout_p=0.1, training=True,
        seed=seed))))
    calls.append(("lowrank qkv r=8 input dropout (NOAH)", run(lambda: kl.lowrank_linear(
        x, t(3 * D, D), t(3 * D), t(8, D, grad=True), t(3 * D, 8, grad=True), dropout_p=0.1, drop_input=True,
        training=True, seed=seed))))
    # a mixed multi-task batch: every image its own task's LoRA factors (the per-row forms)
    calls.append(("lowrank rows r=8 rank dropout (PETL)", run(lambda: kl.lowrank_linear_rows(
        x, t(3 * D, D), t(3 * D), t(8, 8, D, grad=True), t(8, 3 * D, 8, grad=True), dropout_p=0.1, training=True,
        seed=seed))))
    calls.append(("lowrank rows r=8 input dropout (NOAH)", run(lambda: kl.lowrank_linear_rows(
        x, t(3 * D, D), t(3 * D), t(8, 8, D, grad=True), t(8, 3 * D, 8, grad=True), dropout_p=0.1, drop_input=True,
        training=True, seed=seed))))
    calls.append(("convpass dim=8", run(lambda: kc.convpass(
        x, t(8, D, grad=True), t(8, grad=True), t(8, 8, 3, 3, grad=True), t(8, grad=True), t(D, 8, grad=True),
        t(D, grad=True), grid=(14, 14), num_prefix=1, scale=0.01, dropout_p=0.1, training=True, seed=seed))))
    return calls


def bench_launches(sms: int = 132) -> list[dict]:
    """One row per Triton launch of `_bench_calls()`: the op, kernel, dtype (fp32), the constexpr
    config, grid programs and whether they fill one wave of `sms` SMs. Launches are recorded,
    never run (JITFunction.run replaced for the duration)."""
    from triton.runtime.jit import JITFunction

    from . import _common

    classes = [JITFunction]
    try:  # under TRITON_INTERPRET=1 `triton.jit` made InterpretedFunctions
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass

    rows: list[dict] = []
    label = [""]

    def record(self, *args, grid, warmup, **kw):
        g = grid if isinstance(grid, tuple) else (grid,)
        programs = 1
        for n in g:
            programs *= int(n)
        consts = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
        name = getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "?")
        rows.append({"op": label[0], "kernel": name, "grid": tuple(int(n) for n in g),
                     "programs": programs, "fills_wave": programs >= sms,
                     "config": ",".join(f"{k}={v}" for k, v in consts.items())
                     + f",w={kw.get('num_warps')},s={kw.get('num_stages')}"})

    saved_run = [(cls, cls.__dict__["run"]) for cls in classes]
    saved = _common.interpreting, _common._backend
    for cls in classes:
        cls.run = record
    _common.interpreting = lambda: True  # use_triton: the Triton path for these (meta) tensors
    _common._backend = "triton"
    try:
        for name, thunk in _bench_calls():
            label[0] = name
            thunk()
    finally:
        for cls, run_ in saved_run:
            cls.run = run_
        _common.interpreting, _common._backend = saved
        for key in [k for k in _common._SPLIT_WS if k[0].type == "meta"]:  # (the recorded launches' scratch)
            del _common._SPLIT_WS[key]
    return rows


def _attach_resources(launches: list[dict], rows: list[dict]) -> None:
    """Registers / shared memory of the compiled config each launch uses (fp32, per arch)."""
    def norm(cfg: str, stages: bool = True) -> frozenset:
        # PREC: the launch's own choice (ieee here, no GPU); True/False vs 1/0; a launch that
        # leaves num_stages to triton's default matches on the rest
        out = set()
        for x in cfg.split(","):
            k, _, v = x.partition("=")
            if k == "PREC" or (k == "s" and not stages):
                continue
            out.add((k, {"True": "1", "False": "0"}.get(v, v)))
        return frozenset(out)

    for ln in launches:
        stages = not ln["config"].endswith(",s=None")
        for r in rows:
            # (spec names extend the kernel's: lowrank_down_indrop, lowrank_gemm_dx_drop; the
            # constexprs tell them apart)
            if r["kernel"].startswith(ln["kernel"].lstrip("_").replace("_kernel", "")):
                if r["dtype"] == "float32" and norm(r["config"], stages) == norm(ln["config"], stages):
                    ln[f"regs_sm{r['arch']}"] = r["regs"]
                    ln[f"shared_sm{r['arch']}"] = r["shared"]


def print_launches(launches: list[dict], archs=(80, 90)) -> None:
    print(f"\nLaunches at the bench shapes (ViT-B/16, batch 8: {BENCH_ROWS} rows x {BENCH_WIDTH}; fp32; "
          f"one wave = 132 SMs):")
    hdr = f"{'op':<36} {'kernel':<30} {'grid':<12} {'progs':>5} " + \
        " ".join(f"{'regs/shm sm' + str(a):>16}" for a in archs)
    print(hdr)
    print("-" * len(hdr))
    for ln in launches:
        res = " ".join(f"{str(ln.get(f'regs_sm{a}', '-')) + '/' + str(ln.get(f'shared_sm{a}', '-')):>16}"
                       for a in archs)
        flag = "" if ln["fills_wave"] else "  < one wave"
        print(f"{ln['op']:<36} {ln['kernel']:<30} {str(ln['grid']):<12} {ln['programs']:>5} {res}{flag}")
    short = [ln for ln in launches if not ln["fills_wave"]]
    print(f"{len(launches)} launches, {len(short)} below one wave")


_HDR = f"{'kernel':<22} {'dtype':<9} {'arch':<6} {'regs':>4} {'shared':>7} {'stack':>5}  config"


def print_header() -> None:
    print(_HDR)
    print("-" * len(_HDR), flush=True)


def print_row(r) -> None:
    def fmt(v):
        return "-" if v is None else str(v)
    print(f"{r['kernel']:<22} {r['dtype']:<9} sm_{r['arch']:<3} {fmt(r['regs']):>4} {fmt(r['shared']):>7} "
          f"{fmt(r['stack']):>5}  {r['config']}{'  ' + ', '.join(offences(r)) if offences(r) else ''}", flush=True)


def print_table(rows) -> None:
    print_header()
    for r in rows:
        print_row(r)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastpeft.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (at most 2)")
    ap.add_argument("--only", default="", help="comma-separated kernel names")
    ap.add_argument("--smoke", action="store_true", help="one config per kernel")
    ap.add_argument("--json", default="", help="also write the result rows to this JSON file")
    ap.add_argument("--no-launches", action="store_true",
                    help="skip the report of programs per launch at the bench shapes")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # triton.jit picked the interpreter at import time; compile from a clean process.
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET")
        return subprocess.call([sys.executable, "-m", "fastpeft.kernels.aot", *(argv if argv is not None else sys.argv[1:])], env=env)
    only = {s for s in args.only.split(",") if s}
    rows, bad, secs = run(tuple(args.arch), args.jobs, only, args.smoke)
    launches = []
    if not args.no_launches:
        launches = bench_launches()
        _attach_resources(launches, rows)
        print_launches(launches, tuple(args.arch))
    if args.json:
        import json
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"seconds": secs, "kernels": sorted({s[2][0] for s in _specs()}), "rows": rows,
                       "offenders": len(bad), "launches": launches}, f, indent=1, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
