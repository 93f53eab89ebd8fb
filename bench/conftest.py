"""pytest-benchmark suite: options, shared fixtures, and the session collector.

Every test records one row (run or skipped, with the reason) into the session-scoped
`Collector`; at session end it fills in the ratios to the eager reference, prints a summary and,
with `--bench-save DIR`, writes `DIR/<device>-<date>.json` (read by `python -m bench.report`).
The same metrics also go into each benchmark's `extra_info`, so `--benchmark-json` carries them.

`--bench-host` switches to the host-overhead mode instead (bench/test_host.py, bench/host.py): only
its rows run, on a fixed tiny model with the Triton launches stubbed, one thread, and the results
go to `DIR/<device>-<date>-host_overhead.{json,md}`.

Defaults finish on the 2-core CPU machines (see README "Benchmarks"); the GPU setting of
the project's baseline is `--bench-model vit_base_patch16_224 --bench-batch 128 --bench-dtype bf16
--bench-device cuda --bench-compile all`.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.measure import H100_BW, HOST_BATCH, HOST_CLASSES, HOST_IMG_SIZE, HOST_MODEL, machine_info

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Methods whose torch.compile rows run by default: a first compile costs ~40 s (train) + ~12 s
#: (inference) per method on the 2-core CPU machines (measured, vit_small), so all 13 would
#: take ~11 min alone. These two are the ones the project's baseline has compile numbers for.
DEFAULT_COMPILE = ("AdaptFormer", "SSF")


def pytest_addoption(parser):
    g = parser.getgroup("fastpeft bench")
    g.addoption("--bench-model", default="vit_small_patch16_224", help="timm model name (random init)")
    g.addoption("--bench-batch", type=int, default=8, help="images per step")
    g.addoption("--bench-dtype", default="fp32", choices=sorted(DTYPES), help="model and input dtype")
    g.addoption("--bench-device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.addoption("--bench-depth", type=int, default=None, help="override the model's depth (smoke runs)")
    g.addoption("--bench-img-size", type=int, default=None, help="override the image size (smoke runs)")
    g.addoption("--bench-classes", type=int, default=100, help="classifier classes")
    g.addoption("--bench-rounds", type=int, default=3, help="timed rounds per end-to-end row (after 1 warmup)")
    g.addoption("--bench-op-rounds", type=int, default=10, help="timed rounds per op row (after 2 warmups)")
    g.addoption("--bench-op-sizes", default="8x197x384,8x197x768",
                help="comma list of BxNxD op sizes (tokens x width); GPU: 128x197x768")
    g.addoption("--bench-compile", default=",".join(DEFAULT_COMPILE),
                help="methods whose torch.compile rows run: 'all', 'none' or a comma list")
    g.addoption("--bench-op-compile", default="first", choices=("all", "first", "none"),
                help="torch.compile op rows: at every size, the first size only, or none")
    g.addoption("--bench-backend", default="auto", help="fastpeft.patch backend")
    g.addoption("--bench-save", default=None, help="directory to write <device>-<date>.json into")
    g.addoption("--bench-tag", default="",
                help="appended to the results file name: <device>-<date>-<tag>.json (e.g. vit_base_b64_bf16)")
    g.addoption("--bench-matmul-precision", default="highest", choices=("highest", "high", "medium"),
                help="torch.set_float32_matmul_precision for the run (high: TF32 fp32 matmuls on CUDA)")
    g.addoption("--bench-autocast", default="none", choices=("none", "bf16", "fp16"),
                help="end-to-end rows run forward + loss under torch.autocast with this dtype (model stays "
                     "--bench-dtype)")
    g.addoption("--bench-host", action="store_true",
                help="host-overhead mode (bench/host.py): only the host rows run; vit_tiny at 32 px, batch 1, "
                     "1 thread, Triton launches stubbed (--bench-model/--bench-batch/--bench-img-size ignored)")
    g.addoption("--bench-host-rounds", type=int, default=40, help="timed rounds per host-mode contender")


@dataclass
class BenchConfig:
    model: str
    batch: int
    dtype_name: str
    device: torch.device
    depth: int | None
    img_size: int | None
    classes: int
    rounds: int
    op_rounds: int
    op_sizes: list[tuple[int, int, int]]
    compile_methods: str
    op_compile: str
    backend: str
    disabled: bool
    host: bool = False
    tag: str = ""
    matmul_precision: str = "highest"
    autocast: str = "none"

    @property
    def suffix(self) -> str:
        """Appended to the results file name (--bench-tag; the host-overhead mode's files are kept
        apart by default)."""
        tag = self.tag or ("host_overhead" if self.host else "")
        return f"-{tag}" if tag else ""

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.autocast == "none" else DTYPES[self.autocast]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    def compile_selected(self, method: str) -> bool:
        sel = self.compile_methods.strip()
        if sel == "all":
            return True
        if sel in ("", "none"):
            return False
        return method in {s.strip() for s in sel.split(",")}

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "batch": self.batch, "dtype": self.dtype_name, "device": str(self.device),
            "depth": self.depth, "img_size": self.img_size, "classes": self.classes, "rounds": self.rounds,
            "op_rounds": self.op_rounds, "op_sizes": ["x".join(map(str, s)) for s in self.op_sizes],
            "compile": self.compile_methods, "op_compile": self.op_compile,
            "backend": self.backend, "benchmark_disabled": self.disabled, "host": self.host,
            "tag": self.tag, "matmul_precision": self.matmul_precision, "autocast": self.autocast,
        }


def _parse_sizes(text: str) -> list[tuple[int, int, int]]:
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise pytest.UsageError(f"--bench-op-sizes: {item!r} is not BxNxD (e.g. 8x197x768)")
        sizes.append(tuple(int(p) for p in parts))  # type: ignore[arg-type]
    return sizes


def _config(config) -> BenchConfig:
    opt = config.getoption
    device = torch.device(opt("--bench-device"))
    if opt("--bench-host"):
        return BenchConfig(
            model=HOST_MODEL, batch=HOST_BATCH, dtype_name="fp32", device=torch.device("cpu"),
            depth=opt("--bench-depth"), img_size=HOST_IMG_SIZE, classes=HOST_CLASSES, rounds=max(1, opt("--bench-host-rounds")), op_rounds=0, op_sizes=[],
            compile_methods="none", op_compile="none", backend="triton",
            disabled=bool(getattr(config.option, "benchmark_disable", False)), host=True, tag=opt("--bench-tag"),
        )
    return BenchConfig(
        model=opt("--bench-model"), batch=opt("--bench-batch"), dtype_name=opt("--bench-dtype"),
        device=device, depth=opt("--bench-depth"), img_size=opt("--bench-img-size"),
        classes=opt("--bench-classes"), rounds=max(1, opt("--bench-rounds")),
        op_rounds=max(1, opt("--bench-op-rounds")), op_sizes=_parse_sizes(opt("--bench-op-sizes")),
        compile_methods=opt("--bench-compile"), op_compile=opt("--bench-op-compile"),
        backend=opt("--bench-backend"),
        disabled=bool(getattr(config.option, "benchmark_disable", False)),
        tag=opt("--bench-tag"), matmul_precision=opt("--bench-matmul-precision"), autocast=opt("--bench-autocast"),
    )


# --- collector -------------------------------------------------------------------------------

@dataclass
class Collector:
    cfg: BenchConfig
    machine: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows.append(row)
        return row

    def eager_of(self, row: dict[str, Any]) -> dict[str, Any] | None:
        for r in self.rows:
            if (r["suite"], r["name"], r.get("size"), r["mode"]) == (row["suite"], row["name"], row.get("size"), row["mode"]) \
                    and r["contender"] == "eager" and r["status"] == "ok":
                return r
        return None

    def finish(self) -> None:
        for r in self.rows:
            if r["status"] != "ok":
                continue
            if r.get("hbm_bytes") is not None:
                r["h100_lower_bound_s"] = r["hbm_bytes"] / H100_BW
            ref = self.eager_of(r)
            for key, ratio in (("time_median_s", "time_vs_eager"), ("saved_bytes", "saved_vs_eager"),
                               ("hbm_bytes", "hbm_vs_eager")):
                a = r.get(key)
                b = ref.get(key) if ref else None
                r[ratio] = (a / b) if (a is not None and b) else None

    def document(self) -> dict[str, Any]:
        return {"schema": "fastpeft-bench/1", "machine": self.machine, "config": self.cfg.as_dict(), "rows": self.rows}


_COLLECTOR_KEY = pytest.StashKey[Collector]()


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_e2e: end-to-end method rows")
    config.addinivalue_line("markers", "bench_op: per-op rows")
    config.addinivalue_line("markers", "bench_host: host-overhead rows (run only with --bench-host)")
    if config.getoption("--bench-host", default=False):
        torch.set_num_threads(1)  # what the host rows run with (bench/host.py); recorded in the machine info
    elif config.getoption("--bench-matmul-precision", default=None):
        torch.set_float32_matmul_precision(config.getoption("--bench-matmul-precision"))


def pytest_collection_modifyitems(session, config, items):
    """--bench-host runs the host rows and nothing else; without it they are left out."""
    host = config.getoption("--bench-host")
    keep = [it for it in items if (it.get_closest_marker("bench_host") is not None) == host]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[it for it in items if it not in keep])
        items[:] = keep


def _collector(config) -> Collector:
    if _COLLECTOR_KEY not in config.stash:
        cfg = _config(config)
        config.stash[_COLLECTOR_KEY] = Collector(cfg=cfg, machine=machine_info(cfg.device))
    return config.stash[_COLLECTOR_KEY]


@pytest.fixture(scope="session")
def bench_cfg(request) -> BenchConfig:
    return _collector(request.config).cfg


@pytest.fixture(scope="session")
def collector(request) -> Collector:
    return _collector(request.config)


@pytest.fixture(scope="session")
def compiler_problem() -> str | None:
    """Why torch.compile cannot run here, or None."""
    if not shutil.which("g++") and not shutil.which("c++") and not shutil.which("clang++"):
        return "torch.compile on CPU needs a C++ compiler (none on PATH)"
    return None


def pytest_sessionfinish(session, exitstatus):
    if _COLLECTOR_KEY not in session.config.stash:
        return
    col = session.config.stash[_COLLECTOR_KEY]
    col.finish()
    out = session.config.getoption("--bench-save")
    if out and col.rows:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{col.machine['device_slug']}-{col.machine['date']}{col.cfg.suffix}.json"
        path.write_text(json.dumps(col.document(), indent=1, default=str) + "\n")
        if col.cfg.host:  # the host table is the result: write its markdown beside it now
            from bench import report

            path.with_suffix(".md").write_text(report.markdown(col.document()))
        session.config.stash[_SAVED_KEY] = str(path)


_SAVED_KEY = pytest.StashKey[str]()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """`--benchmark-json` output also carries the skipped rows and the machine."""
    if _COLLECTOR_KEY in config.stash:
        col = config.stash[_COLLECTOR_KEY]
        output_json["fastpeft"] = {"machine": col.machine, "config": col.cfg.as_dict(),
                                   "skipped": [r for r in col.rows if r["status"] != "ok"]}


def _fmt_time(s):
    return "-" if s is None else (f"{s * 1e3:.1f}ms" if s < 1 else f"{s:.2f}s")


def _fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def _fmt_mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}MiB"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _COLLECTOR_KEY not in config.stash:
        return
    col = config.stash[_COLLECTOR_KEY]
    if not col.rows:
        return
    tr = terminalreporter
    if col.cfg.host:
        from bench import report

        tr.section(f"fastpeft bench --bench-host: {col.machine['device']}")
        for line in report.markdown(col.document()).splitlines():
            tr.write_line(line)
        if _SAVED_KEY in config.stash:
            tr.write_line(f"results written to {config.stash[_SAVED_KEY]} (and .md)")
        return
    tr.section(f"fastpeft bench: {col.machine['device']} | {col.cfg.model} batch {col.cfg.batch} {col.cfg.dtype_name}")
    tr.write_line(f"{'row':52} {'median':>9} {'vs eager':>8} {'saved':>11} {'vs eager':>8} {'launches':>8}")
    for r in col.rows:
        label = f"{r['suite']}:{r['name']}{'@' + r['size'] if r.get('size') else ''} {r['contender']} {r['mode']}"
        if r["status"] == "ok":
            tr.write_line(f"{label:52} {_fmt_time(r.get('time_median_s')):>9} {_fmt_ratio(r.get('time_vs_eager')):>8} "
                          f"{_fmt_mib(r.get('saved_bytes')):>11} {_fmt_ratio(r.get('saved_vs_eager')):>8} "
                          f"{r.get('launches') if r.get('launches') is not None else '-':>8}")
        else:
            tr.write_line(f"{label:52} {r['status']}: {r.get('reason', '')}")
    if _SAVED_KEY in config.stash:
        tr.write_line(f"results written to {config.stash[_SAVED_KEY]}")
