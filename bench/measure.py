"""What every bench row measures besides time: saved activation bytes, modeled memory traffic,
kernel launches, and the machine it ran on.

* Saved bytes: `fastpeft.profile.saved_activation_bytes` (saved_tensors_hooks, distinct
  storages, parameter and buffer storages excluded); on CUDA also `max_memory_allocated`.
* Modeled traffic (`TrafficMode`): a TorchDispatchMode that adds, for every aten op reaching the
  dispatcher, the bytes of its tensor inputs and outputs (views, allocations and metadata ops
  excluded). For eager code this is the "each op reads its inputs from HBM and writes its outputs
  back" model; a fused custom op (`torch.ops.fastpeft.*`) is one op, so it contributes its real
  inputs + outputs. Compiled graphs are invisible to a dispatch mode: for them the bench uses
  Inductor's own per-kernel count (`compiled_graph_bytes`).
* Kernel launches: eager -> the number of non-view aten ops dispatched (a proxy: on a GPU each is
  one kernel, sometimes two); compiled on CPU -> torch.profiler events of Inductor's C++ kernels
  plus the extern aten ops they call; on CUDA -> the device kernels the profiler records.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastpeft.profile import custom_op_keyset

#: H100 SXM HBM3 bandwidth (NVIDIA's H100 datasheet), for the lower bound `bytes / H100_BW`.
H100_BW = 3.35e12

REPO = Path(__file__).resolve().parent.parent

# Ops that move no data and launch no kernel (allocation, metadata, aliasing). Views are caught
# by `OpOverload.is_view`; these are the non-view ones.
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view",
    "lift_fresh", "set_", "resize_", "detach", "alias", "_reshape_alias", "_local_scalar_dense",
    "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "record_stream",
}


def _nbytes(t: torch.Tensor) -> int:
    """Bytes an op touches for `t`: its logical size, capped by its storage (broadcast inputs
    expanded with stride 0 are read once)."""
    logical = t.numel() * t.element_size()
    try:
        return min(logical, int(t.untyped_storage().nbytes()))
    except (RuntimeError, NotImplementedError):
        return logical


class TrafficMode(TorchDispatchMode):
    """Counts modeled HBM bytes (inputs + outputs of each op) and dispatched ops."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_KERNEL:
            moved = sum(_nbytes(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
            moved += sum(_nbytes(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            self.bytes += moved
            self.ops += 1
            self.by_op[f"{func.namespace}::{name}"] += 1
        return out


def traffic(fn: Callable[[], Any]) -> TrafficMode:
    """Run `fn()` under a TrafficMode and return it (`.bytes`, `.ops`, `.by_op`)."""
    mode = TrafficMode()
    with mode:
        fn()
    return mode


def saved_bytes(fn: Callable[[], Any], exclude: torch.nn.Module | list) -> int:
    """Saved-for-backward bytes of `fn()`; `exclude`: the model, or the weight tensors of an op."""
    from fastpeft.profile import saved_activation_bytes

    return saved_activation_bytes(fn, exclude=[exclude] if isinstance(exclude, torch.nn.Module) else exclude)


def cuda_peak(fn: Callable[[], Any], device: torch.device) -> dict[str, int] | None:
    """Peak allocated bytes during `fn()` on CUDA (absolute, and above what was allocated before)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"max_memory_allocated": int(peak), "above_start": int(peak - before)}


# --- compiled graphs -------------------------------------------------------------------------

def configure_inductor() -> None:
    """Before any torch.compile in the bench: name Inductor's C++ kernels in the profiler (a
    RECORD_FUNCTION per kernel; no cost while no profiler runs) and compile every graph afresh
    so its byte count (computed during codegen only) is always available."""
    import torch._inductor.config as ic

    ic.cpp.enable_kernel_profile = True
    ic.fx_graph_cache = False


@contextlib.contextmanager
def compiled_graph_bytes():
    """Within the block, Inductor sums each compiled graph's kernels' read+write buffer sizes
    (`GraphLowering.count_bytes`, extern kernels included) into `result["bytes"]`."""
    from torch._inductor import compile_fx, metrics

    log = compile_fx.inductor_metrics_log
    saved = (log.level, log.propagate, list(log.handlers))
    result: dict[str, int] = {}
    start = metrics.num_bytes_accessed
    log.setLevel(logging.INFO)
    log.propagate = False
    log.handlers = [logging.NullHandler()]
    try:
        yield result
    finally:
        result["bytes"] = int(metrics.num_bytes_accessed - start)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        log.handlers = saved[2]


_PROFILER_SKIP = re.compile(
    r"^aten::(as_strided|expand|transpose|t|view|reshape|_reshape_alias|resolve_conj|resolve_neg|"
    r"empty|empty_like|empty_strided|resize_|detach|alias|unsqueeze|squeeze|permute|select|slice|"
    r"lift_fresh|_unsafe_view|contiguous|clone_if_needed|set_)$"
)



def build_model(cfg) -> torch.nn.Module:
    """The frozen backbone: random init, seeded, so every contender starts from the same weights."""
    torch.manual_seed(0)
    kw: dict[str, Any] = {}
    if cfg.depth is not None:
        kw["depth"] = cfg.depth
    if cfg.img_size is not None:
        kw["img_size"] = cfg.img_size
    model = timm.create_model(cfg.model, pretrained=False, num_classes=cfg.classes, **kw)
    return model.to(device=cfg.device, dtype=cfg.dtype)


def train_step(model: torch.nn.Module, fwd: Callable, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The benchmarked train step of `model` run through `fwd`: zero_grad, cross-entropy, backward,
    AdamW on the trainable parameters, then a device sync (so a timer sees the whole step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.device.type == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(fwd(x), y).backward()
        opt.step()
        sync()
    return step


def first_call(step, compiled: bool) -> tuple[float, dict]:
    """The warm-up call of a row, timed: for torch.compile it is the compile itself, and the
    compiled graphs' kernel bytes are counted into the returned dict's "bytes"."""
    graph_bytes: dict = {"bytes": 0}
    t0 = time.perf_counter()
    if compiled:
        with compiled_graph_bytes() as graph_bytes:
            step()
    else:
        step()
    return time.perf_counter() - t0, graph_bytes

def profiled_launches(fn: Callable[[], Any], device: torch.device) -> tuple[int, str]:
    """Kernel launches of `fn()` as the profiler sees them. CUDA: device kernels. CPU: Inductor's
    C++ kernels (`*cpp_fused*`) plus top-level aten ops that do work (no views/allocations)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        n = sum(1 for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
        return n, "profiler: CUDA kernels"
    n = 0
    for e in events:
        if "cpp_fused" in e.name:
            n += 1
        elif e.name.startswith("aten::") and not _PROFILER_SKIP.match(e.name):
            parent = e.cpu_parent
            if parent is None or not parent.name.startswith("aten::"):
                n += 1
    return n, "profiler: Inductor C++ kernels + top-level extern aten ops"


# --- machine ---------------------------------------------------------------------------------

def _git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "") if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    """An installed distribution's version, read from its metadata (importing peft would import
    transformers, see `hf_imports`)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def hf_imports():
    """Imports of HF peft (and the transformers it imports) with this repository's root off
    sys.path meanwhile: pytest puts the root there, and its top-level kernels/ directory
    (fastpeft's Triton sources, installed as fastpeft.kernels only) would shadow the `kernels`
    package transformers imports. transformers imports lazily, so building a peft model and its
    first forward belong inside too. The `kernels` modules loaded meanwhile leave sys.modules
    afterwards (tests import the repository's kernels/ by that name)."""
    saved = sys.path[:]
    before = {k for k in sys.modules if k == "kernels" or k.startswith("kernels.")}
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    try:
        yield
    finally:
        sys.path[:] = saved
        for k in [k for k in sys.modules if (k == "kernels" or k.startswith("kernels.")) and k not in before]:
            del sys.modules[k]


def import_peft():
    """`import peft` (ImportError when it is not installed) under `hf_imports`."""
    with hf_imports():
        import peft
    return peft


def machine_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {_cpu_name()}, {torch.get_num_threads()} threads"
    slug = re.sub(r"[^a-z0-9]+", "-", (name if device.type == "cuda" else f"cpu-{_cpu_name()}-{torch.get_num_threads()}t").lower()).strip("-")
    return {
        "device": name,
        "device_slug": slug,
        "device_type": device.type,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "peft": _version("peft"),
        "fastpeft": _version("fastpeft"),
        "python": platform.python_version(),
        "git_sha": _git_sha(),
        "date": _dt.datetime.now().strftime("%Y-%m-%d"),
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "host_os": platform.platform(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


# --- host overhead (`pytest bench --bench-host`) ----------------------------------------------

#: The host-overhead mode's model (bench/host.py): compute is negligible, host work is all that is
#: left. 32 px at patch 16 is 4 patches + the class token = 5 tokens.
HOST_MODEL = "vit_tiny_patch16_224"
HOST_IMG_SIZE = 32
HOST_BATCH = 1
HOST_CLASSES = 100

class TritonLaunches:
    """What `triton_launches_stubbed()` counted: `.total` launches and `.by_kernel` per name."""

    def __init__(self):
        self.by_kernel: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_kernel.values())

    def reset(self) -> None:
        self.by_kernel.clear()


def _triton_kernel_classes() -> list[type]:
    """The classes whose `run` every Triton launch goes through: `kernel[grid](...)` is
    `KernelInterface.__getitem__` -> `self.run(grid=..., warmup=False, ...)`, and autotuners /
    heuristics end in the wrapped function's `run`. Compiled kernels are `JITFunction`s; under
    TRITON_INTERPRET=1 `triton.jit` returns `InterpretedFunction`s instead."""
    from triton.runtime.jit import JITFunction

    classes: list[type] = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - a triton without the interpreter
        return classes
    classes.append(InterpretedFunction)
    return classes


@contextlib.contextmanager
def triton_launches_stubbed():
    """Within the block every Triton kernel launch is replaced by a counter at Triton's own level
    (the `run` of `JITFunction` / `InterpretedFunction`): the host work up to the launch (argument
    checks, allocations, grid computation, every aten op around it) still runs, the kernel
    itself costs nothing and writes nothing (its outputs keep whatever `torch.empty` gave them).
    Yields a `TritonLaunches`. Ahead-of-time compiles (`warmup=True`) are not launches and do
    nothing either.

    Those unwritten outputs are whatever the allocator's memory held, denormal floats among them,
    and they flow on into the aten ops after the kernel: a CPU's arithmetic on denormals takes a
    microcode assist per element, which can slow the GEMMs downstream of a stubbed kernel many
    times over: a cost that no real kernel's output (nor any eager step here) brings. So
    denormals are flushed to zero inside the block (`torch.set_flush_denormal`, restored to
    torch's default, off, after it), for every contender timed within it alike."""
    counts = TritonLaunches()

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            counts.by_kernel[getattr(self, "__name__", None) or type(self).__name__] += 1
        return None

    saved = [(cls, cls.__dict__["run"]) for cls in _triton_kernel_classes()]
    for cls, _ in saved:
        cls.run = run
    torch.set_flush_denormal(True)
    try:
        yield counts
    finally:
        torch.set_flush_denormal(False)
        for cls, orig in saved:
            cls.run = orig


class HostOpCounter(TorchDispatchMode):
    """Counts the aten ops that do work (each one is a kernel launch on a GPU): non-view ops that
    are not allocations or metadata (`_NO_KERNEL`). A custom op (any namespace but aten/prims)
    is transparent: its own backend implementation is run with this mode active, so the aten ops
    it issues are counted one by one (`.custom` counts the custom op calls themselves)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.custom = 0
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prims"):
            keyset = custom_op_keyset(func, args, kwargs)
            if keyset is not None:
                self.custom += 1
                self.by_op[f"{func.namespace}::{func.overloadpacket.__name__} (custom)"] += 1
                with self:  # the mode is popped while its handler runs: push it for the inner ops
                    return func.redispatch(keyset, *args, **kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_KERNEL:
            self.ops += 1
            self.by_op[f"{func.namespace}::{name}"] += 1
        return out
