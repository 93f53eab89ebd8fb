"""Load checkpoints saved by the official PETL repositories into a fastpeft/timm model.

    model = timm.create_model("vit_base_patch16_224_in21k", num_classes=100)
    fastpeft.inject(model, fastpeft.VPT(num_tokens=50))
    fastpeft.load_official(model, torch.load("vpt_checkpoint.pth")["model"], "vpt")

Name mappings (D = embedding width, i = block index):

adaptformer (ShoufaChen/AdaptFormer `models/vit_image.py`, `custom_modules.py`)
    blocks.i.attn.{q,k,v}_proj.{weight,bias}  ->  blocks.i.attn.qkv.{weight,bias}  (concatenated Q, K, V)
    blocks.i.fc1.* / blocks.i.fc2.*           ->  blocks.i.mlp.fc1.* / blocks.i.mlp.fc2.*
    head.1.*                                  ->  head.*
    head.0.*  (the non-affine BatchNorm1d before the linear head: running statistics)  dropped, with a warning
    everything else (patch_embed, cls_token, pos_embed, norm1/norm2, attn.proj, norm / fc_norm,
    blocks.i.adaptmlp.*) keeps its name.

vpt, vqt (KMnP/vpt, andytu28/VQT: the jeonsworld ViT port inside `enc.`; the leading `enc.` is optional)
    enc.transformer.embeddings.patch_embeddings.*          ->  patch_embed.proj.*   (both Conv2d [D, C, ph, pw])
    enc.transformer.embeddings.position_embeddings         ->  pos_embed
    enc.transformer.embeddings.cls_token                   ->  cls_token
    enc.transformer.encoder.layer.i.attention_norm.*       ->  blocks.i.norm1.*
    enc.transformer.encoder.layer.i.attn.{query,key,value}.*  ->  blocks.i.attn.qkv.*  (concatenated)
    enc.transformer.encoder.layer.i.attn.out.*             ->  blocks.i.attn.proj.*
    enc.transformer.encoder.layer.i.ffn_norm.*             ->  blocks.i.norm2.*
    enc.transformer.encoder.layer.i.ffn.fc1.* / fc2.*      ->  blocks.i.mlp.fc1.* / fc2.*
    enc.transformer.encoder.encoder_norm.*                 ->  norm.*
    enc.transformer.prompt_embeddings / deep_prompt_embeddings  ->  prompt_embeddings / deep_prompt_embeddings
    enc.transformer.encoder.layer.i.adapter_{downsample,upsample}.*  ->  blocks.i.adapter_{downsample,upsample}.*
    enc.transformer.encoder.query_prompt_embeddings        ->  query_prompt_embeddings
    head.last_layer.*                                      ->  head.*
    The jeonsworld layers are torch nn.Linear / nn.Conv2d (its `load_from` already converted the JAX
    kernels), so no tensor is transposed; only q/k/v are concatenated.

conv_adapter (Hhhhhhao/Conv-Adapter; ResNet or FB ConvNeXt names): `conv_adapter_official_keys` in
fastpeft/methods/conv_adapter.py (head.linear -> fc / head.fc, FB ConvNeXt -> timm ConvNeXt names).

st_adapter (linziyi96/st-adapter; OpenAI CLIP visual names): `st_adapter_official_key` in
fastpeft/methods/st_adapter.py (transformer.resblocks.i.adapter_pre_{attn,mlp}.* ->
blocks.i.adapter_pre_*, fc -> head, CLIP backbone names as timm's `_convert_openai_clip`); CLIP's
`proj` is dropped, with a warning.

ssf, noah, fact, convpass: the official code uses timm names already; keys pass through unchanged
(and are validated like the others).

A checkpoint wrapped as {"model": state_dict} or {"state_dict": state_dict} is unwrapped.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Mapping, NamedTuple

import torch
from torch import nn

__all__ = ["load_official", "official_to_fastpeft", "Mapped", "SOURCES"]

SOURCES = ("adaptformer", "ssf", "vpt", "noah", "fact", "convpass", "vqt", "conv_adapter", "st_adapter")

_QKV = {"adaptformer": ("q_proj", "k_proj", "v_proj"), "jeonsworld": ("query", "key", "value")}

# jeonsworld names below `transformer.` -> timm names; {i} is the block index
_JEONSWORLD = [
    (r"embeddings\.patch_embeddings\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.cls_token", "cls_token"),
    (r"encoder\.layer\.(\d+)\.attention_norm\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.attn\.out\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.ffn_norm\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.ffn\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"encoder\.encoder_norm\.(weight|bias)", r"norm.\1"),
    (r"prompt_embeddings", "prompt_embeddings"),
    (r"deep_prompt_embeddings", "deep_prompt_embeddings"),
    (r"encoder\.layer\.(\d+)\.(adapter_downsample|adapter_upsample)\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"encoder\.query_prompt_embeddings", "query_prompt_embeddings"),
]
_JEONSWORLD_QKV = re.compile(r"encoder\.layer\.(\d+)\.attn\.(query|key|value)\.(weight|bias)")
_ADAPTFORMER_QKV = re.compile(r"blocks\.(\d+)\.attn\.(q_proj|k_proj|v_proj)\.(weight|bias)")
_ADAPTFORMER_FC = re.compile(r"blocks\.(\d+)\.(fc1|fc2)\.(weight|bias)")


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    if not any(isinstance(v, torch.Tensor) for v in state_dict.values()):
        for k in ("model", "state_dict"):
            if isinstance(state_dict.get(k), Mapping):
                return state_dict[k]
    return state_dict


class Mapped(NamedTuple):
    state_dict: dict[str, torch.Tensor]  # fastpeft/timm names
    origin: dict[str, list[str]]  # fastpeft name -> the official key(s) it came from
    unmapped: list[str]  # official keys with no mapping
    dropped: list[str]  # official keys deliberately not loaded (AdaptFormer's head.0 BatchNorm)


def official_to_fastpeft(state_dict: Mapping[str, torch.Tensor], source: str) -> Mapped:
    """Rename an official checkpoint's keys to fastpeft/timm names (no model needed); q/k/v
    triplets are concatenated in Q, K, V order along dim 0. Raises ValueError for an unknown
    source, an incomplete q/k/v triplet or two keys mapping to one name."""
    if not isinstance(source, str) or source not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; expected one of {', '.join(SOURCES)}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"the {source} checkpoint must be a mapping of names to tensors (a state dict), "
                        f"got {type(state_dict).__name__}")
    state_dict = _unwrap(state_dict)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, list[str]] = {}
    unmapped: list[str] = []
    qkv_parts: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}  # (block, param) -> {q|k|v: (key, t)}
    dropped: list[str] = []
    if source == "conv_adapter":
        from .methods.conv_adapter import conv_adapter_official_keys

        renamed, _ = conv_adapter_official_keys(state_dict)

    def put(new: str, key: str, t: torch.Tensor) -> None:
        if new in out:
            raise ValueError(f"{source} checkpoint: {key!r} and {origin[new]} both map to {new!r}")
        out[new] = t
        origin[new] = [key]

    for key, t in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"{source} checkpoint: key {key!r} is a {type(key).__name__}, not a string")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{source} checkpoint: {key!r} is a {type(t).__name__}, not a tensor")
        if source == "adaptformer":
            m = _ADAPTFORMER_QKV.fullmatch(key)
            if m:
                qkv_parts.setdefault((m[1], m[3]), {})[m[2]] = (key, t)
                continue
            m = _ADAPTFORMER_FC.fullmatch(key)
            if m:
                put(f"blocks.{m[1]}.mlp.{m[2]}.{m[3]}", key, t)
            elif key.startswith("head.0."):
                dropped.append(key)
            elif key.startswith("head.1."):
                put("head." + key[len("head.1."):], key, t)
            else:
                put(key, key, t)
        elif source in ("vpt", "vqt"):
            k = key[len("enc."):] if key.startswith("enc.") else key
            if k.startswith("head.last_layer."):
                put("head." + k[len("head.last_layer."):], key, t)
                continue
            if not k.startswith("transformer."):
                unmapped.append(key)
                continue
            k = k[len("transformer."):]
            m = _JEONSWORLD_QKV.fullmatch(k)
            if m:
                qkv_parts.setdefault((m[1], m[3]), {})[m[2]] = (key, t)
                continue
            for pat, repl in _JEONSWORLD:
                if re.fullmatch(pat, k):
                    put(re.sub(pat, repl, k), key, t)
                    break
            else:
                unmapped.append(key)
        elif source == "conv_adapter":
            if key in renamed:
                put(renamed[key], key, t)
            else:
                unmapped.append(key)
        elif source == "st_adapter":
            from .methods.st_adapter import ST_ADAPTER_DROPPED, st_adapter_official_key, st_adapter_official_tensor

            new = st_adapter_official_key(key)
            if key in ST_ADAPTER_DROPPED:
                dropped.append(key)
            elif new is None:
                unmapped.append(key)
            else:
                put(new, key, st_adapter_official_tensor(key, t))
        else:  # ssf, noah, fact, convpass: timm names already
            put(key, key, t)

    names = _QKV["adaptformer" if source == "adaptformer" else "jeonsworld"]
    for (blk, param), parts in sorted(qkv_parts.items(), key=lambda kv: (int(kv[0][0]), kv[0][1])):
        missing = [n for n in names if n not in parts]
        if missing:
            have = ", ".join(parts[n][0] for n in names if n in parts)
            raise ValueError(
                f"{source} checkpoint: block {blk} has {have} but no {'/'.join(missing)} {param}; "
                "q, k and v are concatenated into attn.qkv and must all be present"
            )
        shapes = {tuple(parts[n][1].shape) for n in names}
        if len(shapes) != 1:
            raise ValueError(f"{source} checkpoint: block {blk} q/k/v {param} shapes differ: "
                             + ", ".join(f"{parts[n][0]} {tuple(parts[n][1].shape)}" for n in names))
        new = f"blocks.{blk}.attn.qkv.{param}"
        put(new, parts[names[0]][0], torch.cat([parts[n][1] for n in names], dim=0))
        origin[new] = [parts[n][0] for n in names]
    return Mapped(out, origin, unmapped, dropped)


def load_official(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str):
    """Map an official checkpoint of `source` ("adaptformer", "ssf", "vpt", "noah", "fact",
    "convpass", "vqt", "conv_adapter", "st_adapter") onto `model`'s names and load it with `load_state_dict(strict=False)`.

    Inject the matching method first (its parameters must exist to receive the checkpoint's).
    Raises ValueError, before anything is loaded, naming every checkpoint key that maps to no
    model tensor and every shape mismatch. Returns `load_state_dict`'s (missing_keys,
    unexpected_keys) result: missing_keys lists the model tensors the checkpoint did not provide
    (e.g. the whole backbone for a PETL-only checkpoint); unexpected_keys is always empty.
    Warns (UserWarning) when it drops AdaptFormer's `head.0` BatchNorm statistics.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_official: model must be a torch nn.Module, got {type(model).__name__}")
    mapped, origin, unmapped, dropped = official_to_fastpeft(state_dict, source)
    own = model.state_dict(keep_vars=True)
    problems: list[str] = []
    for key in unmapped:
        problems.append(f"{key!r} has no {source} mapping")
    for new, t in mapped.items():
        src = " + ".join(repr(k) for k in origin[new])
        arrow = src if origin[new] == [new] else f"{src} -> {new!r}"
        if new not in own:
            hint = ""
            if any(s in new for s in ("prompt", "adapter", "FacT", "ssf_", "LoRA", "adaptmlp", "tuning_module")):
                hint = " (inject the method first)"
            problems.append(f"{arrow}: no such tensor in the model{hint}")
        elif tuple(own[new].shape) != tuple(t.shape):
            problems.append(f"{arrow}: checkpoint shape {tuple(t.shape)} != model shape {tuple(own[new].shape)}")
    if problems:
        raise ValueError(f"cannot load the {source} checkpoint into this model:\n  " + "\n  ".join(problems))
    if dropped and source == "st_adapter":
        warnings.warn(f"{source} checkpoint: dropping CLIP's text projection ({', '.join(dropped)}); the video "
                      "head is `head` (official `fc`)", stacklevel=2)
    elif dropped:
        warnings.warn(
            f"{source} checkpoint: dropping the BatchNorm1d before the head ({', '.join(dropped)}); "
            "fastpeft's head is the plain linear `head` (the official linear-probe head normalises its "
            "input with these running statistics first)",
            stacklevel=2,
        )
    return model.load_state_dict(mapped, strict=False)
