"""BitFit and linear probing (KMnP/vpt `src/models/vit_models.py`, transfer types `tinytl-bias` and `linear`).

BitFit (VPT's `tinytl-bias` transfer type): train every existing parameter whose name contains
"bias" in the encoder -- patch_embed, blocks (qkv, proj, fc1, fc2, norm1, norm2, ...), the final
`norm` / `fc_norm` -- plus the classifier head. Nothing is added, so the trained model *is* the
merged model. ViT-B/16: 12*(3*768+768+3072+768+2*768) + 768 + 768 = 102,912 parameters.

LinearProbe: only the classifier head trains (VPT `linear`, SSF `--tuning-mode linear_probe`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import Builder, Method, ViTInfo

__all__ = ["BitFit", "LinearProbe", "bitfit_names"]

_ENCODER = ("patch_embed.", "blocks.", "norm.", "fc_norm.")


def bitfit_names(model: nn.Module) -> list[str]:
    """Names of the encoder bias parameters BitFit trains (the head is trained separately)."""
    return [n for n, _ in model.named_parameters() if "bias" in n and n.startswith(_ENCODER)]


@dataclass
class BitFit(Method):
    """Train the encoder's bias terms (and the head)."""

    name: ClassVar[str] = "BitFit"
    mergeable: ClassVar[bool] = True
    claims: ClassVar[frozenset[str]] = frozenset({"backbone_biases"})

    def apply(self, model: nn.Module, info: ViTInfo, b: Builder) -> str:
        b.train_existing(bitfit_names(model))
        return "existing bias terms of patch_embed, blocks.*, norm/fc_norm"

    def merged_tensors(self, model: nn.Module, info: ViTInfo) -> dict[str, torch.Tensor]:
        return {}  # the trained biases are the backbone's own tensors


@dataclass
class LinearProbe(Method):
    """Only the classifier head trains; the encoder is frozen."""

    name: ClassVar[str] = "LinearProbe"
    mergeable: ClassVar[bool] = True

    def apply(self, model: nn.Module, info: ViTInfo, b: Builder) -> str:
        return "head only"

    def merged_tensors(self, model: nn.Module, info: ViTInfo) -> dict[str, torch.Tensor]:
        return {}
