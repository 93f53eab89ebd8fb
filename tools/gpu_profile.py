"""Where a patched training step spends its time on a GPU: median step time (CUDA events) of the
eager reference and `fastpeft.patch` for a few methods and batch sizes, the GPU-busy fraction
(sum of kernel times / step time: low means the step waits on the host), and the top kernels.

    python tools/gpu_profile.py --methods AdaptFormer,LoRA,SSF --batches 8,64 --out DIR
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import fastpeft

METHODS = {
    "AdaptFormer": lambda: fastpeft.AdaptFormer(dim=64),
    "LoRA": lambda: fastpeft.LoRA(rank=8),
    "SSF": lambda: fastpeft.SSF(),
    "FacT-TK": lambda: fastpeft.FacT(kind="tk", rank=8),
    "Convpass": lambda: fastpeft.Convpass(dim=8),
    "VQT": lambda: fastpeft.VQT(num_queries=10),
}


def step_fn(model, x, y):
    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def median_ms(fn, n=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def kernel_table(fn, top=12):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    total = sum(e.self_device_time_total for e in ev) / 3 / 1e3
    rows = sorted(ev, key=lambda e: -e.self_device_time_total)[:top]
    return total, [(e.key[:70], round(e.self_device_time_total / 3 / 1e3, 3), e.count // 3) for e in rows]


def host_report(fn, top=20):
    """Host side of a step: ops by self CPU time, synchronizations, and (sync debug mode) where
    the step blocks on the device."""
    import warnings

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    lines = [f"  {e.self_cpu_time_total / 3 / 1e3:8.3f} ms {e.count // 3:6d}  {e.key[:80]}" for e in ev]
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message)]
    return lines, syncs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="AdaptFormer,LoRA,SSF")
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--host", action="store_true", help="host-side report (self CPU time, syncs) per row")
    a = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    results = []
    for name in a.methods.split(","):
        torch.manual_seed(0)
        base = fastpeft.inject(timm.create_model("vit_base_patch16_224", num_classes=100), METHODS[name]())
        base = base.to("cuda", dtype).train()
        patched = copy.deepcopy(base)
        fastpeft.patch(patched)
        for batch in map(int, a.batches.split(",")):
            x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
            y = torch.randint(0, 100, (batch,), device="cuda")
            for label, m in (("eager", base), ("patch", patched)):
                fn = step_fn(m, x, y)
                ms = median_ms(fn)
                busy, top = kernel_table(fn)
                r = dict(method=name, batch=batch, contender=label, step_ms=round(ms, 2),
                         gpu_busy_ms=round(busy, 2), busy_frac=round(busy / ms, 2), top=top)
                results.append(r)
                print(f"{name:12s} b{batch:<3d} {label:6s} step {ms:7.2f} ms  kernels {busy:7.2f} ms "
                      f"({busy / ms:4.0%} busy)", flush=True)
                if a.host:
                    lines, syncs = host_report(fn)
                    r["host"], r["syncs"] = lines, syncs
                    print("\n".join(lines), f"\n  syncs in one step: {len(syncs)}", *syncs[:3], sep="\n", flush=True)
    for r in results:
        print(f"\n== {r['method']} b{r['batch']} {r['contender']}: top kernels (ms/step, launches/step)")
        for k, t, c in r["top"]:
            print(f"  {t:8.3f} {c:5d}  {k}")
    if a.out:
        with open(f"{a.out}/profile-{a.dtype}.json", "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
