"""Mixed-task batches (issue 18, fastpeft/multitask.py): one frozen backbone, T = 1, 4, 16 LoRA
tasks, the batch's rows spread over the tasks (row i -> task i mod T), train steps:

  single       one single-task model (fastpeft.inject(model, LoRA(rank=8))) on the whole batch: the
               step a mixed batch is held to (target: fused <= 1.15x of it)
  fused        model(x, task=ids): each name stacked over the tasks, gathered per row, one vmapped
               forward and backward (no loop over tasks)
  fused-recompute  the fused mixed batch under fastpeft.patch(model, recompute=True): each block one
               checkpointed region (fastpeft/recompute.py rows_block), for its saved bytes
  loop         fastpeft.multitask.looped_forward: each task's rows through its own single-task
               forward, one task after the other (the same shared backbone)
  peft         HF peft's mixed-adapter LoRA (`adapter_names=`): inference only in peft, so its train
               row is recorded as skipped with the reason, and it runs in the inference rows

Inference rows (`mode=infer`, group "multitask infer LoRA"): the same contenders' eval
forward under `torch.no_grad()`, peft included (its LoRA on `qkv` with rank 8 and a per-task head
as `modules_to_save`, one adapter per task, `model(x, adapter_names=[task per row])`).

A train step is zero_grad + forward + cross-entropy + backward + AdamW step, as in
bench/test_e2e.py; each row's first step (the saved-bytes pass) is its warmup. Besides time and saved activation bytes each row records the resident bytes
of the model's parameters and buffers (backbone once + the tasks' tensors), what T separate
single-task models would hold instead, and the bytes of one task's file on disk
(fastpeft.save(..., task=)). Run on ViT-B/16, batch 16:

    pytest bench/test_multitask.py --bench-model vit_base_patch16_224 --bench-batch 16 \\
        --bench-rounds 3 --bench-save bench/results --bench-tag multitask
"""
from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import fastpeft
from bench import measure
from bench.measure import build_model
from bench.rows import skip, timed
from fastpeft import multitask

TASK_COUNTS = (1, 4, 16)
CONTENDERS = ("single", "fused", "fused-recompute", "loop", "peft")


def _params() -> list:
    out = [pytest.param(1, "single", id="single")]
    for t in TASK_COUNTS:
        for c in CONTENDERS[1:]:
            out.append(pytest.param(t, c, id=f"T{t}-{c}"))
    return out


def _resident(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _row(benchmark, cfg, suite: str, mode: str, tasks: int, contender: str) -> dict[str, Any]:
    benchmark.group = f"{suite.replace('-infer', '')} {mode} LoRA"
    return {"suite": suite, "name": f"LoRA T={tasks}", "size": None, "contender": contender, "mode": mode,
            "model": cfg.model, "batch": cfg.batch, "dtype": cfg.dtype_name, "tasks": tasks}


def _vs_single(collector, row: dict[str, Any]) -> dict[str, Any] | None:
    """The suite's single-task row (measured first), with this row's time ratio to it recorded."""
    single = next((r for r in collector.rows if r["suite"] == row["suite"] and r["contender"] == "single"
                   and r["status"] == "ok"), None)
    if single is None or single is row:
        return None
    row["time_vs_single"] = row["time_median_s"] / single["time_median_s"]
    return single


@pytest.mark.bench_e2e
@pytest.mark.parametrize("mode", ("train", "infer"))
@pytest.mark.parametrize(("tasks", "contender"), _params())
def test_multitask(benchmark, bench_cfg, collector, mode, tasks, contender):
    row = _row(benchmark, bench_cfg, "multitask" if mode == "train" else "multitask-infer", mode, tasks, contender)
    if contender == "loop" and tasks == 1:
        skip(collector, row, "T=1: the loop is one single-task forward over the whole batch (the single row)")
    if contender == "peft":
        try:
            measure.import_peft()
        except ImportError:
            skip(collector, row, "HF peft not installed (make bench installs it)")
        if mode == "train":
            skip(collector, row, "HF peft's mixed-adapter batches (adapter_names=) are inference-only: no train step")
    if contender == "fused-recompute" and mode == "infer":
        skip(collector, row, "recompute changes nothing in a forward without backward (the fused row)")
    (_train if mode == "train" else _infer)(benchmark, bench_cfg, collector, row, tasks, contender)


def _train(benchmark, cfg, collector, row: dict[str, Any], tasks: int, contender: str) -> None:
    method = fastpeft.LoRA(rank=8)
    model = build_model(cfg)
    backbone_bytes = _resident(model)
    torch.manual_seed(1)
    if contender == "single":
        fastpeft.inject(model, method)
    else:
        for k in range(tasks):
            fastpeft.inject(model, method, task=f"task{k}")
    row["config"] = method.describe()
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row["resident_bytes"] = _resident(model)
    task_bytes = row["resident_bytes"] - backbone_bytes
    with tempfile.TemporaryDirectory() as d:
        path = fastpeft.save(model, Path(d) / "task.safetensors", task=None if contender == "single" else "task0")
        row["disk_bytes_per_task"] = path.stat().st_size
    per_task = task_bytes // max(1, tasks if contender != "single" else 1)
    row["separate_models_bytes"] = (tasks if contender != "single" else 1) * (backbone_bytes + per_task)

    g = torch.Generator().manual_seed(1234)
    img = cfg.img_size or model.patch_embed.img_size[0]
    x = torch.randn(cfg.batch, 3, img, img, generator=g).to(device=cfg.device, dtype=cfg.dtype)
    y = torch.randint(0, cfg.classes, (cfg.batch,), generator=g).to(cfg.device)
    ids = (torch.arange(cfg.batch) % tasks).to(cfg.device)
    if contender == "single":
        fwd = model
    elif contender.startswith("fused"):
        if contender == "fused-recompute":
            fastpeft.patch(model, recompute=True)

        def fwd(x):
            return model(x, task=ids)
    else:
        def fwd(x):
            return multitask.looped_forward(model, x, ids)
    step = measure.train_step(model, fwd, x, y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vmap's per-row fallback for CPU attention
        t0 = time.perf_counter()  # the first call (the warmup) is the saved-bytes pass
        row["saved_bytes"] = measure.saved_bytes(step, model)
        row["first_call_s"] = time.perf_counter() - t0
        row["saved_method"] = "fastpeft.profile.saved_activation_bytes (storages, params/buffers excluded)"
        timed(benchmark, collector, row, step, rounds=cfg.rounds, warmup=0, units=cfg.batch, unit_name="images/s")
    single = _vs_single(collector, row)
    if single is not None:
        row["saved_vs_single"] = row["saved_bytes"] / single["saved_bytes"] if single["saved_bytes"] else None


def _peft_model(cfg, tasks: int):
    """HF peft's LoRA on qkv (rank 8, alpha 8: scale 1 like fastpeft.LoRA's), one adapter per task,
    each with its own classifier head (`modules_to_save`)."""
    from peft import LoraConfig, get_peft_model

    def config():
        return LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["qkv"], modules_to_save=["head"])

    model = get_peft_model(build_model(cfg), config(), adapter_name="task0")
    for k in range(1, tasks):
        model.add_adapter(f"task{k}", config())
    return model


def _infer(benchmark, cfg, collector, row: dict[str, Any], tasks: int, contender: str) -> None:
    torch.manual_seed(1)
    names = [f"task{k % tasks}" for k in range(cfg.batch)]
    if contender == "peft":
        with measure.hf_imports():
            model = _peft_model(cfg, tasks)

        def fwd(x):
            return model(x, adapter_names=names)
    else:
        model = build_model(cfg)
        method = fastpeft.LoRA(rank=8)
        if contender == "single":
            fastpeft.inject(model, method)
            fwd = model
        else:
            for k in range(tasks):
                fastpeft.inject(model, method, task=f"task{k}")
            ids = fastpeft.task_index(model, names, device=cfg.device)
            if contender == "fused":
                def fwd(x):
                    return model(x, task=ids)
            else:
                def fwd(x):
                    return multitask.looped_forward(model, x, ids)
    model.eval()
    row["resident_bytes"] = _resident(model)
    g = torch.Generator().manual_seed(1234)
    img = cfg.img_size or (model.get_base_model() if contender == "peft" else model).patch_embed.img_size[0]
    x = torch.randn(cfg.batch, 3, img, img, generator=g).to(device=cfg.device, dtype=cfg.dtype)

    def step():
        with torch.no_grad():
            fwd(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vmap's per-row fallback for CPU attention
        with measure.hf_imports() if contender == "peft" else contextlib.nullcontext():
            step()  # warmup (peft's first forward imports more of transformers)
        timed(benchmark, collector, row, step, rounds=cfg.rounds, warmup=0, units=cfg.batch, unit_name="images/s")
    _vs_single(collector, row)
