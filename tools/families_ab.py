"""Interleaved timing of the issue-19 family rows (bench/test_families.py: Conv-Adapter on
ResNet-50, batch 8 at 224 px; ST-Adapter on CLIP ViT-B/16, 2 clips x 8 frames): the contenders of
one family live in one process and their train steps alternate round by round (the order
reversed every other round), so drift on a shared machine hits all alike; the `pytest bench`
rows run one contender after the other.

    python tools/families_ab.py ConvAdapter STAdapter --rounds 5 --threads 2 [--out FILE.md]

Prints (and with --out writes as markdown) per contender: the median step time, its ratio to
eager's median, the median of the per-round ratios (paired), the saved activation bytes
(bench.measure.saved_bytes, as the bench) and their ratio, and the machine's load (`os.getloadavg`)
before and after. Not a test: nothing is asserted; `pytest bench` remains the record.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastpeft  # noqa: E402
from bench import measure  # noqa: E402
from bench.test_families import FAMILIES  # noqa: E402

CONTENDERS = ("eager", "timm-ckpt", "patch", "patch-recompute")


def build(method: str, contender: str, img: int):
    """(train step, model) of one bench row, built as bench/test_families.py builds it."""
    name, make, shape, _ = FAMILIES[method]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=100,
                              **({} if method == "ConvAdapter" else {"img_size": img}))
    torch.manual_seed(1)
    fastpeft.inject(model, make())
    if contender == "timm-ckpt":
        model.set_grad_checkpointing(True)
    if contender.startswith("patch"):
        fastpeft.patch(model, recompute=contender == "patch-recompute")
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(*shape, 3, img, img, generator=g)
    y = torch.randint(0, 100, shape[:1], generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step, model


def run(method: str, contenders, rounds: int, img: int) -> list[str]:
    load0 = os.getloadavg()
    steps, saved = {}, {}
    for c in contenders:
        step, model = build(method, c, img)
        step()  # warm-up
        saved[c] = measure.saved_bytes(step, model)
        steps[c] = step
    times: dict[str, list[float]] = {c: [] for c in contenders}
    for r in range(rounds):
        for c in (contenders if r % 2 == 0 else contenders[::-1]):
            t0 = time.perf_counter()
            steps[c]()
            times[c].append(time.perf_counter() - t0)
    load1 = os.getloadavg()
    base = statistics.median(times["eager"])
    lines = [f"### {method} ({FAMILIES[method][0]}, batch {'x'.join(map(str, FAMILIES[method][2]))} at {img} px, "
             f"{torch.get_num_threads()} threads, {rounds} alternating rounds)", "",
             f"load average (1/5/15 min) before {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}, "
             f"after {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}", "",
             "| contender | median step | vs eager | paired ratio (median) | saved | vs eager | rounds (s) |",
             "|---|---|---|---|---|---|---|"]
    for c in contenders:
        med = statistics.median(times[c])
        paired = statistics.median(a / b for a, b in zip(times[c], times["eager"]))
        lines.append(f"| {c} | {med:.3f} s | {med / base:.3f}x | {paired:.3f}x | {saved[c] / 2**20:.1f} MiB | "
                     f"{saved[c] / saved['eager']:.3f}x | {' '.join(f'{t:.2f}' for t in times[c])} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("methods", nargs="*", default=sorted(FAMILIES), help="of: " + ", ".join(sorted(FAMILIES)))
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="comma list; eager is always included")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    contenders = ["eager"] + [c for c in args.contenders.split(",") if c and c != "eager"]
    bad = [c for c in contenders if c not in CONTENDERS] + [m for m in args.methods if m not in FAMILIES]
    if bad:
        ap.error(f"unknown: {', '.join(bad)}")
    out = [f"# Family rows, interleaved ({measure.machine_info(torch.device('cpu'))['device']}, "
           f"torch {torch.__version__})", ""]
    for method in args.methods:
        lines = run(method, contenders, args.rounds, args.img_size)
        print("\n".join(lines), flush=True)
        out += lines
    if args.out:
        Path(args.out).write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
