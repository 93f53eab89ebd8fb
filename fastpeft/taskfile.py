"""Task files: a fine-tuned PETL task as a small file on top of a shared frozen backbone.

    fastpeft.save(model, "cifar100-lora.safetensors")        # the method tensors only
    backbone = timm.create_model("vit_base_patch16_224", num_classes=100)
    fastpeft.load(backbone, "cifar100-lora.safetensors")     # inject + load: the same model

One safetensors file holds the task's tensors (every trainable parameter, and every parameter and
buffer an injected method added, replaced or re-initialised: adapters, factors, prompts, scales
and shifts, BitFit's biases, a trained head) under their `state_dict` names, and a JSON header in
the safetensors metadata (key "fastpeft"): the format, fastpeft's version, the methods' configs in
injection order, the backbone's timm name and its architecture fingerprint (width, depth, heads,
MLP width, patch size, token grid and layout, classes). The frozen backbone is not in the file: it
is the model `load` is given, and a backbone of another shape is refused, naming what differs,
before anything is touched.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import _refuse_if_multitask, _refuse_if_patched, inject, injections, remove
from .methods.base import Method, ViTInfo, vit_info
from .version import __version__

__all__ = ["save", "load", "write", "read_header", "FORMAT"]

#: the header's "format" field; a reader refuses files of another format
FORMAT = "fastpeft-task/1"
_META_KEY = "fastpeft"

#: the ViTInfo fields a task's tensors and forward depend on
_FINGERPRINT = ("embed_dim", "depth", "num_heads", "head_dim", "attn_dim", "mlp_hidden", "num_prefix_tokens",
                "has_class_token", "grid_size", "patch_size", "in_chans", "global_pool", "num_classes", "distilled")


def _fingerprint(info: ViTInfo) -> dict[str, Any]:
    out = {}
    for name in _FINGERPRINT:
        value = getattr(info, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _method_record(method: Method) -> dict[str, Any]:
    """{"method": class name, "config": fields, "tuples": fields given as tuples} (JSON has lists
    only: the record says which were tuples, so the config comes back equal)."""
    config, tuples = {}, []
    for f in dataclasses.fields(method):  # type: ignore[arg-type]
        value = getattr(method, f.name)
        if isinstance(value, tuple):
            tuples.append(f.name)
        config[f.name] = list(value) if isinstance(value, tuple) else value
    return {"method": type(method).__name__, "config": config, "tuples": tuples}


def _method_from_record(record: Any) -> Method:
    from . import methods as _methods

    known = {n: getattr(_methods, n) for n in _methods.__all__}
    known = {n: c for n, c in known.items() if isinstance(c, type) and issubclass(c, Method) and c is not Method}
    if not isinstance(record, dict) or record.get("method") not in known or not isinstance(record.get("config"), dict):
        raise ValueError(f"task file: unknown method record {record!r}; known methods: {sorted(known)}")
    cls = known[record["method"]]
    names = {f.name for f in dataclasses.fields(cls)}
    config = record["config"]
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"task file: {cls.__name__} has no field(s) {unknown} (a file from another fastpeft version?)")
    tuples = set(record.get("tuples", ()))
    return cls(**{k: tuple(v) if k in tuples else v for k, v in config.items()})


def _owned_names(model: nn.Module) -> list[str]:
    """The state_dict names the injected methods own: everything they added, replaced or
    re-initialised (`Injection.added` / `replaced` paths, `params`, `overwritten`)."""
    prefixes: set[str] = set()
    names: set[str] = set()
    for inj in injections(model):
        prefixes.update(inj.added)
        prefixes.update(inj.replaced)
        names.update(inj.params)
        names.update(inj.overwritten)
    return [k for k in model.state_dict(keep_vars=True)
            if k in names or any(k == p or k.startswith(p + ".") for p in prefixes)]


def _task_names(model: nn.Module) -> list[str]:
    """What a task file holds: the methods' own tensors and every other trainable parameter (the
    classifier head, or anything the user unfroze)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    owned = set(_owned_names(model))
    return [k for k in model.state_dict(keep_vars=True) if k in owned or k in trainable]


def _timm_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") if isinstance(cfg, dict) else None


def save(model: nn.Module, path: str | Path) -> Path:
    """Write the task of `model` (its injected methods' configs and tensors) to `path` as
    safetensors. Works on a patched model (patching never changes names). A model with merged
    methods is refused: their tensors are folded into the backbone (`fastpeft.unmerge` first)."""
    vit_info(model)  # a timm ViT, or a clear ValueError
    _refuse_if_multitask(model, "save")  # one task of several: fastpeft.save(model, path, task=...)
    injs = injections(model)
    if not injs:
        raise ValueError("fastpeft.save: the model has no injected method (fastpeft.inject(model, ...) first)")
    merged = [inj.method.name for inj in injs if inj.merged]
    if merged:
        raise ValueError(f"fastpeft.save: {', '.join(merged)} is merged into the backbone weights; call "
                         "fastpeft.unmerge(model) first (a task file holds the method tensors, not merged weights)")
    state = model.state_dict(keep_vars=True)
    # (copies: safetensors refuses tensors that share storage, e.g. views of one prompt tensor)
    tensors = {k: state[k].detach().to("cpu").contiguous().clone() for k in _task_names(model)}
    return write(model, path, [inj.method for inj in injs], tensors)


def write(model: nn.Module, path: str | Path, methods: list[Method], tensors: dict[str, torch.Tensor]) -> Path:
    """Write a task file: `tensors` (single-task names, CPU, contiguous, unshared) of `methods`,
    with the header of `model`'s backbone (`save`; a multi-task model's task: fastpeft/multitask.py)."""
    from safetensors.torch import save_file

    header = {
        "format": FORMAT,
        "fastpeft_version": __version__,
        "timm_model": _timm_name(model),
        "backbone": _fingerprint(vit_info(model)),
        "methods": [_method_record(m) for m in methods],
        "tensors": sorted(tensors),
    }
    path = Path(path)
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(header)})
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a task file (format, version, timm name, backbone, methods, tensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fastpeft.load: no task file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # a file that is not safetensors
        raise ValueError(f"fastpeft.load: {path} is not a safetensors task file ({e})") from None
    if _META_KEY not in meta:
        raise ValueError(f"fastpeft.load: {path} has no fastpeft header (not written by fastpeft.save)")
    header = json.loads(meta[_META_KEY])
    if header.get("format") != FORMAT:
        raise ValueError(f"fastpeft.load: {path} has format {header.get('format')!r}; this fastpeft reads {FORMAT!r}")
    return header


def _check_backbone(header: dict, info: ViTInfo, model: nn.Module, path: Path) -> None:
    saved, here = header["backbone"], _fingerprint(info)
    diff = [f"{k}={saved.get(k)!r} (file) vs {here[k]!r} (model)" for k in _FINGERPRINT if saved.get(k) != here[k]]
    if diff:
        names = f" ({header.get('timm_model')} -> {_timm_name(model)})" if header.get("timm_model") else ""
        raise ValueError(f"fastpeft.load: {path} was saved on another backbone{names}: {'; '.join(diff)}")


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """Inject the task in `path` into the plain timm ViT `model` and load its tensors; returns
    `model`. Into a model that already holds exactly the file's methods (same configs, in the same
    order; patched or not) only the tensors are loaded. Every check (format, backbone shape,
    method configs, tensor names and shapes) runs before the model changes; if anything fails
    after the methods are injected, they are removed again: the model is as before."""
    path = Path(path)
    _refuse_if_multitask(model, "load")
    header = read_header(path)
    info = vit_info(model)
    _check_backbone(header, info, model, path)
    methods = [_method_from_record(r) for r in header["methods"]]
    for m in methods:
        m.check(info)
    have = [inj.method for inj in injections(model)]
    fresh = not have
    if not fresh and [_method_record(m) for m in have] != [_method_record(m) for m in methods]:
        raise ValueError(
            f"fastpeft.load: the model already holds {', '.join(m.describe() for m in have)}; the task file holds "
            f"{', '.join(m.describe() for m in methods)}. Load into a plain backbone (or fastpeft.remove(model) first)"
        )
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if fresh:
        _refuse_if_patched(model, "load")
    done: list[Method] = []
    try:
        if fresh:
            for m in methods:
                inject(model, m)
                done.append(m)
        _copy_in(model, tensors, path)
    except BaseException:
        for m in reversed(done):
            remove(model, type(m))
        raise
    return model


def _copy_in(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    state = model.state_dict(keep_vars=True)
    missing = sorted(set(_owned_names(model)) - set(tensors))
    extra = sorted(set(tensors) - set(state))
    if missing or extra:
        raise ValueError(f"fastpeft.load: {path} does not match the injected methods: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unknown {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(state[k].shape):
            raise ValueError(f"fastpeft.load: {k} has shape {tuple(t.shape)} in {path}, "
                             f"{tuple(state[k].shape)} in the model")
    with torch.no_grad():
        for k, t in tensors.items():
            state[k].copy_(t)
