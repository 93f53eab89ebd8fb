"""SSF: Scaling & Shifting your Features (dongzelian/SSF `models/vision_transformer.py`).

ssf(x; scale, shift) = x * scale + shift over the channel dim (`ssf_ada`). Placements and names
(all official; D = embed_dim, A = attention width, Hd = mlp hidden):

    patch_embed.ssf_scale_1/ssf_shift_1 [D]   after conv + flatten, before the patch-embed norm
    patch_embed.ssf_scale_2/ssf_shift_2 [D]   after patch_embed.norm (only if it is not Identity)
    blocks.{i}.ssf_scale_1/ssf_shift_1 [D]    after norm1
    blocks.{i}.attn.ssf_scale_1/shift_1 [3A]  after attn.qkv
    blocks.{i}.attn.ssf_scale_2/shift_2 [D]   after attn.proj
    blocks.{i}.ssf_scale_2/ssf_shift_2 [D]    after norm2
    blocks.{i}.mlp.ssf_scale_1/shift_1 [Hd]   after mlp.fc1, before the activation
    blocks.{i}.mlp.ssf_scale_2/shift_2 [D]    after mlp.fc2
    ssf_scale_1/ssf_shift_1 [D]               after the final `norm`

Deviation for models pooled with `fc_norm` (global_pool='avg', where timm's `norm` is Identity):
the official code applies the top-level pair after the Identity `norm` (before pooling and fc_norm);
here it is applied after `fc_norm` instead, which keeps the method mergeable into fc_norm's affine.
If both are Identity the pair is applied after the Identity `norm` (official) and cannot be merged.

Init: scale ~ N(1, .02^2), shift ~ N(0, .02^2), created in the official order (same RNG stream).
ViT-B/16: 205,824 parameters.

Merge (exact): after a Linear / the patch conv, W' = diag(scale) W, b' = scale*b + shift (the
layer needs a bias); after a LayerNorm, weight' = scale*weight, bias' = scale*bias + shift.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import Builder, Method, OutputHook, ViTInfo

__all__ = ["SSF", "ssf_ada", "ssf_sites"]


def ssf_ada(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale + shift, broadcasting over the last (channel) dim. Shapes: x [..., C], scale/shift [C].

    The single entry point of SSF's scale-shift (to be routed to a fused op)."""
    return x * scale + shift


class SSFHook(OutputHook):
    """Forward hook applying `ssf_ada` with `owner.{scale_name}` / `owner.{shift_name}`.

    `channel_dim=1` is for NCHW conv outputs (patch_embed.proj when a patch-embed norm follows).
    """

    saves_output = True  # the scale gradient is sum(grad * out)
    class_row_local = True  # per-channel scale and shift: row-local, no random draws
    draws = False

    def __init__(self, owner: nn.Module, scale_name: str, shift_name: str, channel_dim: int = -1):
        self.owner = owner
        self.scale_name = scale_name
        self.shift_name = shift_name
        self.channel_dim = channel_dim

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        scale = getattr(self.owner, self.scale_name)
        shift = getattr(self.owner, self.shift_name)
        if self.channel_dim == 1:
            return ssf_ada(out.movedim(1, -1), scale, shift).movedim(-1, 1)
        return ssf_ada(out, scale, shift)


def _top_norm(model: nn.Module) -> str:
    if not isinstance(model.norm, nn.Identity):
        return "norm"
    fc = getattr(model, "fc_norm", None)
    if fc is not None and not isinstance(fc, nn.Identity):
        return "fc_norm"
    return "norm"


def ssf_sites(model: nn.Module) -> list[tuple[str, str, str, int, str]]:
    """(owner path, scale/shift suffix, hooked layer path, size, layer kind) in official creation order.

    kind: "conv" (NCHW conv output), "patch" (patch_embed output, channel-last), "linear", "norm".
    """
    info_blocks = list(model.blocks)
    pe = model.patch_embed
    D = model.embed_dim
    sites = []
    if isinstance(pe.norm, nn.Identity):
        sites.append(("patch_embed", "1", "patch_embed", D, "patch"))
    else:
        sites.append(("patch_embed", "1", "patch_embed.proj", D, "conv"))
        sites.append(("patch_embed", "2", "patch_embed.norm", D, "norm"))
    top = _top_norm(model)
    sites.append(("", "1", top, D, "norm"))
    for i, blk in enumerate(info_blocks):
        p = f"blocks.{i}"
        sites += [
            (f"{p}.attn", "1", f"{p}.attn.qkv", blk.attn.qkv.out_features, "linear"),
            (f"{p}.attn", "2", f"{p}.attn.proj", blk.attn.proj.out_features, "linear"),
            (f"{p}.mlp", "1", f"{p}.mlp.fc1", blk.mlp.fc1.out_features, "linear"),
            (f"{p}.mlp", "2", f"{p}.mlp.fc2", blk.mlp.fc2.out_features, "linear"),
            (p, "1", f"{p}.norm1", D, "norm"),
            (p, "2", f"{p}.norm2", D, "norm"),
        ]
    return sites


def _join(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


@dataclass
class SSF(Method):
    """SSF scale-shift after every official site (see module docstring)."""

    name: ClassVar[str] = "SSF"
    mergeable: ClassVar[bool] = True

    def validate(self, info: ViTInfo) -> None:
        pass  # every supported timm ViT has all the sites

    def apply(self, model: nn.Module, info: ViTInfo, b: Builder) -> str:
        ref = model.patch_embed.proj.weight
        dd = {"device": ref.device, "dtype": ref.dtype}
        for owner, k, layer, size, kind in ssf_sites(model):
            scale = nn.Parameter(torch.empty(size, **dd))
            shift = nn.Parameter(torch.empty(size, **dd))
            with torch.no_grad():
                nn.init.normal_(scale, mean=1.0, std=0.02)
                nn.init.normal_(shift, std=0.02)
            b.attach(_join(owner, f"ssf_scale_{k}"), scale)
            b.attach(_join(owner, f"ssf_shift_{k}"), shift)
            own = model.get_submodule(owner) if owner else model
            b.hook(layer, SSFHook(own, f"ssf_scale_{k}", f"ssf_shift_{k}", 1 if kind == "conv" else -1))
        top = _top_norm(model)
        where = "patch embed, norm1/qkv/proj/norm2/fc1/fc2 of every block, final " + top
        if top == "fc_norm":
            where += " (official: after the Identity `norm`)"
        return where

    def merged_tensors(self, model: nn.Module, info: ViTInfo) -> dict[str, torch.Tensor]:
        new: dict[str, torch.Tensor] = {}
        for owner, k, layer, _size, kind in ssf_sites(model):
            own = model.get_submodule(owner) if owner else model
            g = getattr(own, f"ssf_scale_{k}")
            beta = getattr(own, f"ssf_shift_{k}")
            mod = model.get_submodule(layer)
            if kind == "patch":
                layer, mod = "patch_embed.proj", model.patch_embed.proj
            if kind == "norm":
                if not isinstance(mod, nn.LayerNorm) or mod.weight is None or mod.bias is None:
                    raise ValueError(
                        f"SSF cannot merge into `{layer}` ({type(mod).__name__}): it needs a LayerNorm with "
                        "weight and bias to absorb the scale and shift"
                    )
            elif mod.bias is None:
                raise ValueError(f"SSF cannot merge into `{layer}`: it has no bias to absorb the shift")
            w = mod.weight
            shape = (-1,) + (1,) * (w.dim() - 1)
            new[f"{layer}.weight"] = w * g.view(shape).to(w.dtype)
            new[f"{layer}.bias"] = mod.bias * g.to(w.dtype) + beta.to(w.dtype)
        return new
