"""End-to-end rows: every PETL method x every contender x {train step, inference} on one timm ViT.

Contenders (README "Benchmarks"), all on the same seeded model weights and inputs:
  eager            fastpeft.inject(model, Method()) — the reference implementation
  compile          torch.compile of that same model (default mode)
  peft             HF peft where it covers the method (LoRA r=8 on timm `attn.qkv`)
  timm-ckpt        the eager model with timm's `set_grad_checkpointing()` (memory contender)
  patch            fastpeft.patch(model)
  patch-recompute  fastpeft.patch(model, recompute=True)
  patch+compile    torch.compile(fastpeft.patch(model)) (default mode)
  compile-reduce-overhead, patch+compile-reduce-overhead
                   the same two with mode="reduce-overhead" (CUDA graphs); CUDA only

A train step is zero_grad + forward + cross-entropy + backward + AdamW step on the trainable
parameters; inference is a no_grad forward in eval mode. Contenders that cannot run here are
recorded as skipped with the reason.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import pytest
import timm
import torch
import torch.nn.functional as F

import fastpeft
from bench import measure
from bench.measure import build_model
from bench.rows import skip, timed

#: (row label, fastpeft class name, constructor kwargs or a function of the depth giving them).
#: Defaults are the official settings (each method's module in fastpeft/methods/ cites its source);
#: AdaptFormer dim 64 and LoRA r=8 as in the project's performance baseline; NOAH as a uniform subnet from its released search space.
METHODS: list[tuple[str, str, Any]] = [
    ("LinearProbe", "LinearProbe", {}),
    ("BitFit", "BitFit", {}),
    ("AdaptFormer", "AdaptFormer", {"dim": 64}),
    ("Adapter", "Adapter", {}),
    ("LoRA", "LoRA", {"rank": 8}),
    ("FacT-TT", "FacT", {"kind": "tt"}),
    ("FacT-TK", "FacT", {"kind": "tk"}),
    ("KAdaptation", "KAdaptation", {}),
    ("SSF", "SSF", {}),
    ("Convpass", "Convpass", {}),
    ("VPT", "VPT", {}),
    ("VQT", "VQT", {}),
    ("NOAH", "NOAH", lambda depth: {"adapter_dims": [5] * depth, "lora_ranks": [5] * depth,
                                     "prompt_lens": [10] * depth}),
]
CONTENDERS = ("eager", "compile", "peft", "timm-ckpt", "patch", "patch-recompute", "patch+compile",
              "compile-reduce-overhead", "patch+compile-reduce-overhead")
#: contenders that run under torch.compile (opt-in per method: --bench-compile)
COMPILED = ("compile", "patch+compile", "compile-reduce-overhead", "patch+compile-reduce-overhead")
MODES = ("train", "infer")

#: What HF peft offers for each method (peft targets transformers-style modules; on a timm ViT
#: only LoRA on the fused `qkv` Linear is the same method).
PEFT_MISSING = {
    "LinearProbe": "nothing to compare: no adapter (peft would only mark the head trainable)",
    "BitFit": "HF peft has no BitFit (bias-only) tuner",
    "AdaptFormer": "HF peft has no AdaptFormer (parallel bottleneck adapter) tuner",
    "Adapter": "HF peft has no serial bottleneck adapter for timm ViTs",
    "FacT-TT": "HF peft has no FacT (tensorized shared-factor) tuner",
    "FacT-TK": "HF peft has no FacT (tensorized shared-factor) tuner",
    "KAdaptation": "HF peft's LoKr is a different Kronecker parametrization than KAdaptation's shared PHM rule",
    "SSF": "HF peft has no SSF tuner (IA3 scales only, no shift and no placement after LayerNorms)",
    "Convpass": "HF peft has no convolutional bypass tuner",
    "VPT": "HF peft's prompt tuning targets transformers language models, not timm ViTs",
    "VQT": "HF peft has no visual query tuning",
    "NOAH": "HF peft has no NOAH (searched prompt+LoRA+adapter) tuner",
}

TRAIN_ONLY = {
    "timm-ckpt": "gradient checkpointing only changes the training step",
    "patch-recompute": "recompute only changes the training step",
}


def _params() -> list:
    out = []
    for label, _, _ in METHODS:
        for mode in MODES:
            for contender in CONTENDERS:
                out.append(pytest.param(label, contender, mode, id=f"{label}-{contender}-{mode}"))
    return out


@pytest.fixture(scope="session")
def batch(bench_cfg):
    """Seeded images and labels, generated once and shared by every row."""
    img = bench_cfg.img_size or timm.create_model(bench_cfg.model, pretrained=False).patch_embed.img_size[0]
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(bench_cfg.batch, 3, img, img, generator=g)
    y = torch.randint(0, bench_cfg.classes, (bench_cfg.batch,), generator=g)
    return x.to(device=bench_cfg.device, dtype=bench_cfg.dtype), y.to(bench_cfg.device)


def _inject(model, label: str):
    _, cls_name, kwargs = next(m for m in METHODS if m[0] == label)
    cls = getattr(fastpeft, cls_name)
    method = cls(**(kwargs(len(model.blocks)) if callable(kwargs) else kwargs))
    torch.manual_seed(1)
    fastpeft.inject(model, method)
    return method.describe()


def _peft_lora(model):
    with measure.hf_imports():
        from peft import LoraConfig, get_peft_model

        # Same math as fastpeft.LoRA() (NOAH style): delta = B A dropout(x) on all of q, k, v,
        # scale alpha/r = 1, dropout 0.1; the head stays trainable.
        cfg = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.1, target_modules=["qkv"], modules_to_save=["head"])
        return get_peft_model(model, cfg)


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@pytest.mark.bench_e2e
@pytest.mark.parametrize(("method", "contender", "mode"), _params())
def test_e2e(benchmark, bench_cfg, collector, compiler_problem, batch, method, contender, mode):
    cfg = bench_cfg
    benchmark.group = f"e2e {mode} {method}"
    row: dict[str, Any] = {"suite": "e2e", "name": method, "size": None, "contender": contender, "mode": mode,
                           "model": cfg.model, "batch": cfg.batch, "dtype": cfg.dtype_name}
    cls_name = next(m[1] for m in METHODS if m[0] == method)
    if getattr(fastpeft, cls_name, None) is None:
        skip(collector, row, f"fastpeft.{cls_name} not yet available")
    if contender in TRAIN_ONLY and mode != "train":
        skip(collector, row, TRAIN_ONLY[contender])
    if contender == "peft":
        if method != "LoRA":
            skip(collector, row, PEFT_MISSING.get(method, "HF peft does not cover this method"))
        try:
            measure.import_peft()
        except ImportError:
            skip(collector, row, "HF peft not installed (make bench installs it)")
    if contender.startswith("patch") and getattr(fastpeft, "patch", None) is None:
        skip(collector, row, "fastpeft.patch not yet available")
    if contender.endswith("reduce-overhead") and cfg.device.type != "cuda":
        skip(collector, row, 'mode="reduce-overhead" (CUDA graphs) needs a CUDA device')
    if contender in COMPILED:
        if compiler_problem:
            skip(collector, row, compiler_problem)
        if not cfg.compile_selected(method):
            skip(collector, row, "torch.compile rows are opt-in for this method (--bench-compile=all): the first "
                                 "compile costs ~40 s (train) + ~12 s (inference) per method on the 2-core CPU")

    device, sync = cfg.device, _sync(cfg.device)
    x, y = batch
    model = build_model(cfg)
    depth = len(model.blocks)
    note = []
    try:
        if contender == "peft":
            model = _peft_lora(model)
            row["config"] = "peft LoraConfig(r=8, lora_alpha=8, lora_dropout=0.1, target_modules=['qkv'])"
        else:
            row["config"] = _inject(model, method)
        if contender == "timm-ckpt":
            model.set_grad_checkpointing(True)
        if contender.startswith("patch"):
            report = fastpeft.patch(model, backend=cfg.backend, recompute=contender == "patch-recompute")
            note.append(f"patched {len(report.patched)} places [{report.backend}]" if report.patched
                        else "patch changed nothing (no fused op applies yet)")
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        skip(collector, row, f"{contender} cannot be applied to {method}: {type(e).__name__}: {e}")

    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    fwd = model
    cudagraphs = contender.endswith("reduce-overhead")
    if contender in COMPILED:
        measure.configure_inductor()
        torch._dynamo.reset()  # a fresh cache per row: no recompile limit across methods
        fwd = torch.compile(model, mode="reduce-overhead" if cudagraphs else None)

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.autocast_dtype is not None:
        row["autocast"] = cfg.autocast

    def autocast():
        if cfg.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=cfg.autocast_dtype)

    opt = torch.optim.AdamW(params, lr=1e-4) if mode == "train" else None

    if mode == "train":
        model.train()

        def fwd_bwd():
            opt.zero_grad(set_to_none=True)
            if cudagraphs:  # a new iteration: the previous step's graph outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with autocast():
                loss = F.cross_entropy(fwd(x), y)
            loss.backward()

        def step():
            fwd_bwd()
            opt.step()
            sync()
    else:
        model.eval()

        def step():
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad(), autocast():
                fwd(x)
            sync()

    # First call: warmup, and for torch.compile the compile itself (its kernels' bytes counted).
    try:
        row["first_call_s"], graph_bytes = measure.first_call(step, contender in COMPILED)
    except Exception as e:  # noqa: BLE001  (a contender that fails here is reported, not fatal)
        skip(collector, row, f"{contender} failed on {method} ({mode}): {type(e).__name__}: {str(e)[:300]}")

    if mode == "train":
        row["saved_bytes"] = measure.saved_bytes(step, model)
        row["saved_method"] = "fastpeft.profile.saved_activation_bytes (storages, params/buffers excluded)"
        if contender == "patch-recompute":
            from fastpeft.recompute import SAC_SEEN_BY_HOOKS

            if not SAC_SEEN_BY_HOOKS:  # torch without checkpoint(respect_saved_tensors_hooks=...)
                row["note"] = ((row.get("note") or "") + " saved bytes miss the GEMM outputs selective "
                               "checkpointing keeps (this torch hides them from saved-tensor hooks); "
                               "cuda_memory sees them").strip()
    row["cuda_memory"] = measure.cuda_peak(step, device)

    if contender in COMPILED:
        launches, how = measure.profiled_launches(step, device)
        extra = measure.traffic(opt.step).bytes if mode == "train" else 0
        row.update(hbm_bytes=graph_bytes["bytes"] + extra, launches=launches, launches_method=how,
                   hbm_method="Inductor count_bytes of the compiled graphs' kernels"
                              + (" + dispatch-mode optimizer step" if mode == "train" else ""))
    else:
        tm = measure.traffic(step)
        row.update(hbm_bytes=tm.bytes, hbm_method="dispatch mode: inputs+outputs of every aten/custom op")
        if device.type == "cuda":
            row["launches"], row["launches_method"] = measure.profiled_launches(step, device)
        else:
            row["launches"], row["launches_method"] = tm.ops, "aten ops dispatched (proxy for kernel launches)"
    row["launches_per_block"] = row["launches"] / depth if row.get("launches") is not None else None
    if note:
        row["note"] = "; ".join(note)

    timed(benchmark, collector, row, step, rounds=cfg.rounds, warmup=0, units=cfg.batch, unit_name="images/s")
