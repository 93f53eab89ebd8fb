"""End-to-end rows for the model families beyond image ViTs (issue 19): Conv-Adapter on ResNet-50
(batch 8 at 224 px) and ST-Adapter on CLIP ViT-B/16 over video (2 clips x 8 frames at 224 px),
train steps, contenders as in bench/test_e2e.py:

  eager            fastpeft.inject(model, Method()) (the reference)
  compile          torch.compile of that model (opt-in like bench/test_e2e.py: --bench-compile
                   ConvAdapter,STAdapter or all)
  timm-ckpt        the eager model with timm's set_grad_checkpointing()
  patch            fastpeft.patch(model)
  patch-recompute  fastpeft.patch(model, recompute=True)

The model sizes are the issue's, not --bench-model's (--bench-img-size overrides the image size
for quick runs). These rows are not in the smoke run (bench/smoke.py selects others by name).
"""
from __future__ import annotations

from typing import Any

import pytest
import timm
import torch

import fastpeft
from bench import measure
from bench.rows import skip, timed

FAMILIES = {
    # label: (timm model, method, batch shape (without channels / size), units per step)
    "ConvAdapter": ("resnet50", lambda: fastpeft.ConvAdapter(reduction=8), (8,), "images/s"),
    "STAdapter": ("vit_base_patch16_clip_quickgelu_224",
                  lambda: fastpeft.STAdapter(width=384, positions=("mlp",), frames=8), (2, 8), "clips/s"),
}
CONTENDERS = ("eager", "compile", "timm-ckpt", "patch", "patch-recompute")


@pytest.mark.bench_e2e
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("method", sorted(FAMILIES))
def test_family(benchmark, bench_cfg, collector, compiler_problem, method, contender):
    cfg = bench_cfg
    name, make, shape, unit = FAMILIES[method]
    img = cfg.img_size or 224
    benchmark.group = f"e2e train {method}"
    row: dict[str, Any] = {"suite": "e2e", "name": method, "size": None, "contender": contender, "mode": "train",
                           "model": name, "batch": "x".join(map(str, shape)), "dtype": cfg.dtype_name}
    if contender == "compile":
        if compiler_problem:
            skip(collector, row, compiler_problem)
        if not cfg.compile_selected(method):
            skip(collector, row, "torch.compile rows are opt-in (--bench-compile=all or a list naming this method)")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=cfg.classes,
                              **({} if method == "ConvAdapter" else {"img_size": img}))
    model = model.to(device=cfg.device, dtype=cfg.dtype)
    method_cfg = make()
    torch.manual_seed(1)
    fastpeft.inject(model, method_cfg)
    row["config"] = method_cfg.describe()
    note = []
    try:
        if contender == "timm-ckpt":
            model.set_grad_checkpointing(True)
        if contender.startswith("patch"):
            report = fastpeft.patch(model, backend=cfg.backend, recompute=contender == "patch-recompute")
            note.append(f"patched {len(report.patched)} places [{report.backend}]")
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        skip(collector, row, f"{contender} cannot be applied to {method}: {type(e).__name__}: {e}")
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(*shape, 3, img, img, generator=g).to(device=cfg.device, dtype=cfg.dtype)
    y = torch.randint(0, cfg.classes, shape[:1], generator=g).to(cfg.device)
    fwd = model
    if contender == "compile":
        measure.configure_inductor()
        torch._dynamo.reset()
        fwd = torch.compile(model)
    step = measure.train_step(model, fwd, x, y)

    try:
        row["first_call_s"], _ = measure.first_call(step, contender == "compile")
    except Exception as e:  # noqa: BLE001  (reported, not fatal)
        skip(collector, row, f"{contender} failed on {method}: {type(e).__name__}: {str(e)[:300]}")
    row["saved_bytes"] = measure.saved_bytes(step, model)
    row["saved_method"] = "fastpeft.profile.saved_activation_bytes (storages, params/buffers excluded)"
    row["cuda_memory"] = measure.cuda_peak(step, cfg.device)
    if note:
        row["note"] = "; ".join(note)
    timed(benchmark, collector, row, step, rounds=cfg.rounds, warmup=0, units=shape[0], unit_name=unit)
