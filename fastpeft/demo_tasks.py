"""The "many tasks, one backbone" part of `python -m fastpeft demo` (fastpeft/multitask.py): two
tasks trained as single-task LoRA models on one frozen backbone, saved as task files, loaded side
by side onto a fresh copy of that backbone, then one mixed batch whose rows alternate between
the tasks. Data: the ConvNet demo's generated stripes (fastpeft/demo_families.py), labelled two
ways: "angle" (4 orientations) and "diagonal" (diagonal stripes or not). Nothing is downloaded.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import fastpeft

from .demo_families import IMG, stripes

TASKS = {"angle": lambda y: y, "diagonal": lambda y: y % 2}  # label functions of the stripe angle class


def _backbone(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same frozen backbone every time it is built
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=IMG,
                             patch_size=8, depth=4).to(device)


def _train(label_fn, x, y, steps: int, device) -> torch.nn.Module:
    m = _backbone(device)
    fastpeft.inject(m, fastpeft.LoRA(rank=8))
    opt = torch.optim.AdamW([p for _, p in fastpeft.trainable_parameters(m)], lr=3e-3)
    m.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (16,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x[idx].to(device)), label_fn(y[idx]).to(device)).backward()
        opt.step()
    return m.eval()


def demo_tasks(args, console: Console, device: torch.device) -> dict:
    quick = bool(getattr(args, "quick", False))
    steps, n_test = (3, 8) if quick else (12, 64)
    console.rule("[bold]Many tasks, one backbone: task files and a mixed batch")
    x, y = stripes(16 * steps, seed=0)
    tx, ty = stripes(n_test, seed=1)
    out: dict = {"tasks": {}}
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vmap's per-row fallback for CPU attention
        singles, files = {}, {}
        for name, fn in TASKS.items():
            singles[name] = _train(fn, x, y, steps, device)
            files[name] = fastpeft.save(singles[name], Path(d) / f"{name}.safetensors")
        shared = _backbone(device)
        backbone_bytes = sum(p.numel() * p.element_size() for p in shared.parameters())
        for name, path in files.items():
            fastpeft.load(shared, path, task=name)
        shared.eval()
        names = [list(TASKS)[i % len(TASKS)] for i in range(n_test)]  # rows alternate between the tasks
        ids = fastpeft.task_index(shared, names, device=device)
        with torch.no_grad():
            mixed = shared(tx.to(device), task=ids).cpu()
        table = Table(title=f"one mixed batch of {n_test} rows on one vit_tiny backbone ({backbone_bytes / 2**20:.1f} MiB, "
                            f"4 blocks), rows alternating between the tasks")
        for col in ("task", "method", "file KiB", "params", "acc own", "acc mixed", "max |diff|"):
            table.add_column(col, justify="left" if col in ("task", "method") else "right")
        for k, (name, fn) in enumerate(TASKS.items()):
            rows = [i for i, n in enumerate(names) if n == name]
            with torch.no_grad():
                own = singles[name](tx[rows].to(device)).cpu()
            labels = fn(ty[rows])
            acc_own = (own.argmax(-1) == labels).float().mean().item()
            acc_mixed = (mixed[rows].argmax(-1) == labels).float().mean().item()
            diff = (own - mixed[rows]).abs().max().item()
            size = files[name].stat().st_size
            info = fastpeft.tasks(shared)[name]
            out["tasks"][name] = {"file_bytes": size, "params": info["params"], "acc_own": acc_own,
                                  "acc_mixed": acc_mixed, "max_diff": diff}
            table.add_row(name, "LoRA r=8", f"{size / 1024:,.1f}", f"{info['params']:,}", f"{acc_own:.0%}",
                          f"{acc_mixed:.0%}", f"{diff:.1e}")
    console.print(table)
    console.print(f"{steps} AdamW steps per task on generated stripes (LoRA and the head train). acc own: the "
                  "task's single-task model; acc mixed: its rows of the mixed batch; max |diff|: their logits. "
                  "Each task file holds the task's tensors "
                  "and a JSON header, the backbone is shared. Code: fastpeft.load(backbone, path, task=name); "
                  "backbone(x, task=fastpeft.task_index(backbone, names))", highlight=False)
    return out
