"""Host-overhead mode (README "Benchmarks", `make bench-host`): what a patched train step costs
in Python and dispatch work alone, next to the eager reference, on a model whose compute is
negligible.

* Model: timm `vit_tiny_patch16_224` at 32 px (4 patches + the class token = 5 tokens), batch 1,
  one CPU thread, fp32, random init, every method of `fastpeft.demo.demo_configs`.
* Patched models take the Triton path (`fastpeft.patch(model, backend="triton")`; CPU tensors
  reach it under TRITON_INTERPRET=1, set here before triton is imported, and the kernels' own
  backend is set to "triton" for the whole step, so that the backward, which runs outside the
  forward's `fastpeft.fused.common.kernel_call` context, takes the Triton path too, as it does on
  CUDA tensors) with every Triton launch
  replaced by a counter at Triton's own level (`bench.measure.triton_launches_stubbed`): the
  kernels cost nothing, all the host work around them remains. The kernels' outputs are left
  unwritten, so the numbers a patched step computes are garbage: only its time and its op counts
  mean anything.
* Contenders, each a separately built model with the same seeded weights: `eager` (the injected
  reference, unpatched), `timm-ckpt` (the reference with timm's `set_grad_checkpointing()`),
  `patch` and `patch-recompute` (`recompute=True`).
* A step is forward + cross-entropy + backward (gradients set to None first; no optimizer).
  After warm-up steps, every round times one step of each contender back to back, in an order
  that rotates each round; the median over rounds is the host time per step. `paired_vs_eager`
  is the median over rounds of (contender / eager in the same round), robust to slow drift of a
  shared machine.
* Counts per step (one extra, untimed step each): Triton launches, and the aten ops that do work
  (`bench.measure.HostOpCounter`: a TorchDispatchMode; custom ops are looked through, so the aten
  ops inside them count too), both divided by the depth for "per block" (the stem and head's
  few ops are shared out over the blocks, as in the other bench rows).

Run by `pytest bench --bench-host` (bench/test_host.py, in a subprocess: the interpreter setting
and the one thread must not leak into other rows), or directly:

    python -m bench.host --json out.json [--method SSF --method ...] [--rounds 40] [--depth 2]
"""
from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("bench.host needs TRITON_INTERPRET=1 before triton is imported; run it as "
                       "`python -m bench.host` or through `pytest bench --bench-host`")
os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from typing import Any, Callable  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastpeft  # noqa: E402
from bench.measure import (  # noqa: E402
    HOST_BATCH as BATCH,
    HOST_CLASSES as CLASSES,
    HOST_IMG_SIZE as IMG_SIZE,
    HOST_MODEL as MODEL,
    HostOpCounter,
    triton_launches_stubbed,
)
from fastpeft.demo import demo_configs  # noqa: E402
CONTENDERS = ("eager", "timm-ckpt", "patch", "patch-recompute")
#: The depth demo_configs' method list is built for (NOAH's subnet needs >= 4 blocks for its
#: published shape; the list itself does not depend on the depth).
LABEL_DEPTH = 12


def method_labels() -> list[str]:
    return [label for label, _ in demo_configs(LABEL_DEPTH)]


def _method(label: str, depth: int):
    for name, method in demo_configs(depth):
        if name == label:
            return method
    raise ValueError(f"no method {label!r} in fastpeft.demo.demo_configs; have {method_labels()}")


def build(label: str, contender: str, *, depth: int | None, img_size: int, backend: str):
    """One contender's model: same seeded backbone and adapter weights for every contender."""
    torch.manual_seed(0)
    kw: dict[str, Any] = {"img_size": img_size, "num_classes": CLASSES}
    if depth is not None:
        kw["depth"] = depth
    model = timm.create_model(MODEL, pretrained=False, **kw)
    method = _method(label, len(model.blocks))
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. KAdaptation's official-init notice
        fastpeft.inject(model, method)
    report = None
    if contender == "timm-ckpt":
        model.set_grad_checkpointing(True)
    elif contender.startswith("patch"):
        report = fastpeft.patch(model, backend=backend, recompute=contender == "patch-recompute")
    return model.train(), report


def _stepper(model, x, y) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()

    return step


def _timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def measure_method(label: str, *, rounds: int, warmup: int = 3, depth: int | None = None,
                   img_size: int = IMG_SIZE, backend: str = "triton",
                   contenders: tuple[str, ...] = CONTENDERS) -> list[dict[str, Any]]:
    """Rows (bench row dicts, suite "host") for one method: every contender, timed alternately."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(BATCH, 3, img_size, img_size, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    rows: dict[str, dict[str, Any]] = {}
    steps: dict[str, Callable[[], None]] = {}
    for c in contenders:
        row: dict[str, Any] = {"suite": "host", "name": label, "size": None, "contender": c, "mode": "train",
                               "model": MODEL, "img_size": img_size, "batch": BATCH, "dtype": "fp32",
                               "threads": torch.get_num_threads()}
        rows[c] = row
        try:
            model, report = build(label, c, depth=depth, img_size=img_size, backend=backend)
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
            row.update(status="skipped", reason=f"{c} cannot be applied to {label}: {type(e).__name__}: {e}")
            continue
        row["config"] = repr(_method(label, len(model.blocks)))[:200]
        row["depth"] = len(model.blocks)
        row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if report is not None:
            row["backend"] = report.backend
            row["patched"] = len(report.patched)
            row["note"] = f"patched {len(report.patched)} places [{report.backend}]"
        steps[c] = _stepper(model, x, y)

    from fastpeft.kernels import _common

    kernel_backend = "triton" if backend == "triton" else _common.get_backend()
    with triton_launches_stubbed() as launches, _common.backend(kernel_backend):
        live = list(steps)
        for c in list(live):
            try:
                for _ in range(max(1, warmup)):
                    steps[c]()
            except Exception as e:  # noqa: BLE001  (a contender that fails is reported, not fatal)
                rows[c].update(status="skipped", reason=f"{c} failed on {label}: {type(e).__name__}: {str(e)[:300]}")
                live.remove(c)
        for c in live:
            launches.reset()
            counter = HostOpCounter()
            with counter:
                steps[c]()
            depth_c = rows[c]["depth"]
            rows[c].update(
                triton_launches=launches.total, aten_ops=counter.ops, custom_ops=counter.custom,
                launches=launches.total + counter.ops,
                triton_per_block=launches.total / depth_c, aten_per_block=counter.ops / depth_c,
                launches_per_block=(launches.total + counter.ops) / depth_c,
                launches_method="Triton launches (stubbed, counted at triton's run) + aten ops that do work "
                                "(TorchDispatchMode, custom ops looked through)",
                triton_by_kernel=dict(launches.by_kernel),
            )
        times: dict[str, list[float]] = {c: [] for c in live}
        for r in range(rounds):
            # no garbage-collector pause inside a round (a full collect costs about a step here):
            # one collect between rounds, none while the contenders' steps run
            gc.collect()
            gc.disable()
            try:
                k = r % max(1, len(live))
                for c in live[k:] + live[:k]:
                    times[c].append(_timed(steps[c]))
            finally:
                gc.enable()

    for c in live:
        ts = times[c]
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        rows[c].update(status="ok", time_median_s=statistics.median(ts), time_iqr_s=q[2] - q[0] if len(ts) >= 2 else None,
                       time_mean_s=statistics.fmean(ts), time_min_s=min(ts), time_max_s=max(ts), rounds=len(ts),
                       throughput=BATCH / statistics.median(ts), throughput_unit="images/s")
        if "eager" in times and c != "eager":
            rows[c]["paired_vs_eager"] = statistics.median(a / b for a, b in zip(ts, times["eager"]))
        elif c == "eager":
            rows[c]["paired_vs_eager"] = 1.0
    return [rows[c] for c in contenders]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="write the rows here (a JSON list)")
    ap.add_argument("--method", action="append", default=None,
                    help="a demo_configs label (repeatable; labels contain commas); default: every method")
    ap.add_argument("--rounds", type=int, default=40, help="timed rounds per contender")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    ap.add_argument("--depth", type=int, default=None, help="override the model's depth (smoke runs)")
    ap.add_argument("--img-size", type=int, default=IMG_SIZE)
    ap.add_argument("--backend", default="triton", help="fastpeft.patch backend (triton: the GPU path)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # unwritten kernel outputs must not slow the ops reading them
    gc.collect()
    gc.freeze()  # the ~400k objects of the imported modules: out of every later collect
    labels = args.method or method_labels()
    out: list[dict[str, Any]] = []
    for label in labels:
        try:
            rows = measure_method(label, rounds=max(1, args.rounds), warmup=args.warmup, depth=args.depth,
                                  img_size=args.img_size, backend=args.backend)
        except Exception as e:  # noqa: BLE001  (recorded; the other methods still run)
            traceback.print_exc()
            rows = [{"suite": "host", "name": label, "size": None, "contender": c, "mode": "train",
                     "status": "skipped", "reason": f"host measurement failed: {type(e).__name__}: {str(e)[:300]}"}
                    for c in CONTENDERS]
        out.extend(rows)
        ok = {r["contender"]: r for r in rows if r.get("status") == "ok"}
        if "eager" in ok:
            e = ok["eager"]["time_median_s"]
            print(f"{label:22}" + "  ".join(f"{c} {r['time_median_s'] * 1e3:.1f}ms ({r['time_median_s'] / e:.2f}x, "
                                            f"{r['launches_per_block']:.0f}/blk)" for c, r in ok.items()),
                  file=sys.stderr, flush=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
