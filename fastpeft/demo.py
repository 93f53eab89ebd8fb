"""The method part of `python -m fastpeft demo`: every PETL method injected into a random-init
timm ViT, a short training run on generated data (the loss must go down), and per method its
trainable parameters, saved-activation memory and step time, reference vs `fastpeft.patch`.

No weights or datasets are downloaded: the data is a fixed synthetic task (each class is a
distinct low-frequency pattern plus noise), small enough to fit in a few steps.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import timm
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import fastpeft
from fastpeft.methods.base import vit_info


def demo_configs(depth: int) -> list[tuple[str, object]]:
    """One representative config per method (sizes from the official VTAB settings)."""
    m = fastpeft
    cfgs: list[tuple[str, object]] = []

    def add(label: str, name: str, **kw):
        cls = getattr(m, name, None)
        if cls is not None:
            cfgs.append((label, cls(**kw)))

    add("linear probe", "LinearProbe")
    add("BitFit", "BitFit")
    add("AdaptFormer", "AdaptFormer", dim=64)
    add("Adapter (NOAH)", "Adapter", dim=8)
    add("LoRA qkv (NOAH)", "LoRA", rank=8)
    add("LoRA q,v (PETL-ViT)", "LoRA", rank=8, targets=("q", "v"))
    add("FacT-TT", "FacT", kind="tt", rank=8)
    add("FacT-TK", "FacT", kind="tk", rank=8)
    add("KAdaptation", "KAdaptation")
    add("SSF", "SSF")
    add("Convpass", "Convpass", dim=8)
    add("VPT-deep", "VPT", num_tokens=10, deep=True)
    add("VQT", "VQT", num_queries=1)
    if getattr(m, "NOAH", None) is not None:
        dims = [8, 8, 4, 4] + [0] * (depth - 4) if depth >= 4 else [8] * depth
        cfgs.append(("NOAH subnet", m.NOAH(adapter_dims=dims, lora_ranks=dims, prompt_lens=dims)))
    return cfgs


def synthetic_task(num_classes: int, n: int, img_size: int, seed: int = 0):
    """`n` images whose class is a smooth random pattern, plus noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.nn.functional.interpolate(
        torch.randn(num_classes, 3, 4, 4, generator=g), size=img_size, mode="bilinear", align_corners=False
    )
    labels = torch.arange(n) % num_classes
    images = patterns[labels] + 0.5 * torch.randn(n, 3, img_size, img_size, generator=g)
    return images, labels


@dataclass
class Row:
    label: str
    params: int
    saved_ref: int
    saved_patched: int | None
    step_ref: float
    loss_first: float
    loss_last: float


def _saved_bytes(model, images, labels) -> int:
    from fastpeft.profile import saved_activation_bytes

    def fwd():
        return torch.nn.functional.cross_entropy(model(images), labels)

    return saved_activation_bytes(fwd, exclude=[model])


def run_one(label: str, cfg, args, images, labels, steps: int, device) -> Row:
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=int(labels.max()) + 1)
    fastpeft.inject(model, cfg)
    model.to(device).train()
    images, labels = images.to(device), labels.to(device)
    params = sum(p.numel() for _, p in fastpeft.trainable_parameters(model))
    opt = torch.optim.AdamW([p for _, p in fastpeft.trainable_parameters(model)], lr=1e-3)
    saved_ref = _saved_bytes(model, images, labels)
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    saved_patched = None
    report = fastpeft.patch(model, recompute=True)
    if report:
        saved_patched = _saved_bytes(model, images, labels)
    return Row(label, params, saved_ref, saved_patched, sorted(times)[len(times) // 2], losses[0], losses[-1])


def demo_methods(args: argparse.Namespace, console: Console) -> list[Row]:
    device = torch.device("cuda" if getattr(args, "device", "auto") in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    quick = bool(getattr(args, "quick", False))
    probe = timm.create_model(args.model, pretrained=False)
    info = vit_info(probe)
    img = info.grid_size[0] * info.patch_size[0]
    steps = 3 if quick else 12
    images, labels = synthetic_task(num_classes=4, n=4 if quick else 8, img_size=img)
    cfgs = demo_configs(info.depth)
    if quick:  # a smoke run (tests/test_cli.py): one method of each kind of attachment
        cfgs = [c for c in cfgs if c[0] in ("AdaptFormer", "SSF", "VQT")]
    console.rule(f"[bold]PETL methods on {args.model} (random init), {len(images)} generated images, {steps} AdamW steps")
    rows: list[Row] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("methods", total=len(cfgs))
        for label, cfg in cfgs:
            progress.update(task, description=f"training {label}")
            rows.append(run_one(label, cfg, args, images, labels, steps, device))
            progress.advance(task)

    example = timm.create_model(args.model, pretrained=False, num_classes=4)
    fastpeft.inject(example, cfgs[min(2, len(cfgs) - 1)][1])
    console.print("fastpeft.summary(model) for one of them:")
    console.print(fastpeft.summary(example), markup=False, highlight=False, soft_wrap=True)

    t = Table(title=f"per method, {device.type}; saved = activation bytes autograd keeps for backward (parameters excluded)")
    for col in ("method", "trainable params", "saved (reference)", "saved (patch, recompute)", "step (ref)", "loss first -> last"):
        t.add_column(col, justify="right" if col != "method" else "left")
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    for r in rows:
        patched = "-" if r.saved_patched is None else f"{mib(r.saved_patched)} ({r.saved_patched / max(r.saved_ref, 1):.2f}x)"
        ok = "[green]" if r.loss_last < r.loss_first else "[red]"
        t.add_row(r.label, f"{r.params:,}", mib(r.saved_ref), patched, f"{r.step_ref * 1e3:,.0f} ms",
                  f"{ok}{r.loss_first:.3f} -> {r.loss_last:.3f}")
    console.print(t)
    bad = [r.label for r in rows if not r.loss_last < r.loss_first]
    if bad:
        console.print(f"[red]loss did not decrease for: {', '.join(bad)}")
    else:
        console.print(f"[green]loss decreased for all {len(rows)} methods")
    return rows
