"""Interleaved A/B timing of a method's eager train step against `fastpeft.patch` (default or
recompute=True) on ViT-B/16: both models live in one process and their steps alternate, so drift
on a shared machine hits both alike (the `pytest bench` rows run one contender after the other).

    python tools/recompute_ab.py Adapter KAdaptation --rounds 6 --threads 2 [--mode patch]

Prints, per method, the median step times, their ratio and the per-round (paired) ratios.
Not a test: nothing is asserted; `pytest bench` remains the record.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastpeft  # noqa: E402
from bench.test_e2e import METHODS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("methods", nargs="+", help="bench row labels: " + ", ".join(m[0] for m in METHODS))
    ap.add_argument("--mode", choices=("recompute", "patch"), default="recompute")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--model", default="vit_base_patch16_224")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(args.batch, 3, 224, 224, generator=g)
    y = torch.randint(0, 100, (args.batch,), generator=g)
    for label in args.methods:
        _, cls, kw = next(m for m in METHODS if m[0] == label)
        torch.manual_seed(0)
        eager = timm.create_model(args.model, pretrained=False, num_classes=100)
        torch.manual_seed(1)
        fastpeft.inject(eager, getattr(fastpeft, cls)(**(kw(len(eager.blocks)) if callable(kw) else kw)))
        eager.train()
        patched = copy.deepcopy(eager)
        fastpeft.patch(patched, recompute=args.mode == "recompute")
        steps = {}
        for name, model in (("eager", eager), (args.mode, patched)):
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()

            step()  # warm-up
            steps[name] = step
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        a, b = times.values()
        med_a, med_b = statistics.median(a), statistics.median(b)
        print(f"{label}: eager {med_a:.3f} s, {args.mode} {med_b:.3f} s, ratio {med_b / med_a:.3f}; "
              f"paired {' '.join(f'{q / p:.3f}' for p, q in zip(a, b))}", flush=True)


if __name__ == "__main__":
    main()
