"""VPT: Visual Prompt Tuning, shallow and deep, on a timm ViT.

Official code: KMnP/vpt `src/models/vit_prompt/vit.py` (`PromptedTransformer`), head in
`src/models/mlp.py`.

Token sequence (P prefix tokens = CLS + registers, p prompts, M patches)::

    after the embeddings (patch + pos, timm's pos-drop/patch-drop/norm_pre):  [prefix, patches]
    block 0 input  (slot block_in of blocks.0):    [prefix, dropout(prompt_embeddings), patches]
    deep, block i >= 1 (slot block_in of blocks.i): positions P..P+p-1 are replaced by
                                                   dropout(deep_prompt_embeddings[i-1])
    after the last block (slot block_out):         prompts removed -> [prefix, patches]

so timm's final norm (per token) and pooling run unchanged: token pooling reads the CLS output,
exactly what VPT's head reads; avg/max pooling average the patch tokens only (prompts excluded,
prefix excluded as timm always does) -- VPT itself only defines CLS pooling. No positional
embedding is added to prompts. Shallow prompts pass through every block.

Init: uniform(-v, v), v = sqrt(6 / (in_chans * ph * pw + D)) (the official code hard-codes 3 input
channels; 0.0625 for ViT-B/16). Names (model level): `prompt_embeddings [1, p, D]`,
`deep_prompt_embeddings [depth - 1, p, D]`.

Head (``head_init="vpt"``, the default, as the official `MLP` head with `special_bias`):
kaiming_normal(fan_out) weight, bias -log(99) (prior 0.01). ``"keep"`` leaves the head alone.

Dropout on the prompts follows the *model's* train/eval flag. The official `PromptedTransformer.train()`
keeps encoder and embeddings in eval while prompts train; the same regime here is
``model.train(); model.blocks.eval(); model.patch_embed.eval()`` (any backbone dropout then stays off,
the prompt dropout stays on).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import Builder, Method, SlotFn, ViTInfo, check_positive_int, check_prob, dropout

__all__ = ["VPT", "vpt_init_value"]


def vpt_init_value(info: ViTInfo) -> float:
    """v = sqrt(6 / (in_chans * ph * pw + D)), the bound of VPT's uniform prompt init."""
    ph, pw = info.patch_size
    return math.sqrt(6.0 / float(info.in_chans * ph * pw + info.embed_dim))


class _VPTSlot(SlotFn):
    """Holds the model (owner of the prompt parameters and of the train/eval flag)."""

    def __init__(self, model: nn.Module, num_prefix: int, num_tokens: int, p: float):
        self.model = model
        self.P = num_prefix
        self.p = num_tokens
        self.drop = p

    def _prompts(self, e: torch.Tensor, batch: int) -> torch.Tensor:
        return dropout(e.expand(batch, -1, -1), self.drop, self.model)


class _InsertPrompts(_VPTSlot):
    """blocks.0 block_in: [prefix, patches] -> [prefix, prompts, patches]."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        e = self._prompts(self.model.prompt_embeddings, x.shape[0])
        return torch.cat([x[:, : self.P], e.to(x.dtype), x[:, self.P:]], dim=1)


class _ReplacePrompts(_VPTSlot):
    """blocks.i block_in (deep, i >= 1): replace the p prompt outputs with deep_prompt_embeddings[i-1]."""

    def __init__(self, model: nn.Module, num_prefix: int, num_tokens: int, p: float, layer: int):
        super().__init__(model, num_prefix, num_tokens, p)
        self.layer = layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        e = self._prompts(self.model.deep_prompt_embeddings[self.layer - 1: self.layer], x.shape[0])
        return torch.cat([x[:, : self.P], e.to(x.dtype), x[:, self.P + self.p:]], dim=1)


class _RemovePrompts(_VPTSlot):
    """Last block's block_out: drop the prompt positions."""

    #: keeps the prefix rows (the class token's among them) as they are: the class-row pass of
    #: fastpeft/class_row.py skips it
    keeps_class_row = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, : self.P], x[:, self.P + self.p:]], dim=1)


@dataclass
class VPT(Method):
    """VPT-Deep (`deep=True`) or VPT-Shallow with `num_tokens` prompts and prompt dropout `dropout`.
    Parameters: depth * p * D (deep; 9,216 p for ViT-B/16) or p * D (shallow), plus the head."""

    num_tokens: int = 10
    deep: bool = True
    dropout: float = 0.1
    head_init: str = "vpt"

    name: ClassVar[str] = "VPT"
    merge_refusal: ClassVar[str] = (
        "its prompts are extra tokens every attention layer attends to; no change of the frozen "
        "weights reproduces them, and removing them changes the output"
    )
    claims: ClassVar[frozenset[str]] = frozenset({"prompt_tokens", "token_layout"})

    def validate(self, info: ViTInfo) -> None:
        check_positive_int(self.num_tokens, "VPT num_tokens")
        if not isinstance(self.deep, bool):
            raise ValueError(f"VPT deep must be a bool, got {self.deep!r}")
        check_prob(self.dropout, "VPT dropout")
        if self.head_init not in ("vpt", "keep"):
            raise ValueError(f"VPT head_init must be 'vpt' or 'keep', got {self.head_init!r}")

    def apply(self, model: nn.Module, info: ViTInfo, b: Builder) -> str:
        ref = model.blocks[0].norm1.weight
        v = vpt_init_value(info)
        p, D, L, P = self.num_tokens, info.embed_dim, info.depth, info.num_prefix_tokens
        shallow = torch.empty(1, p, D).uniform_(-v, v)
        b.attach("prompt_embeddings", nn.Parameter(shallow.to(device=ref.device, dtype=ref.dtype)))
        b.slot("blocks.0", "block_in", _InsertPrompts(model, P, p, self.dropout))
        if self.deep and L > 1:
            deep = torch.empty(L - 1, p, D).uniform_(-v, v)
            b.attach("deep_prompt_embeddings", nn.Parameter(deep.to(device=ref.device, dtype=ref.dtype)))
            for i in range(1, L):
                b.slot(f"blocks.{i}", "block_in", _ReplacePrompts(model, P, p, self.dropout, i))
        b.slot(f"blocks.{L - 1}", "block_out", _RemovePrompts(model, P, p, self.dropout))
        head = getattr(model, "head", None)
        if self.head_init == "vpt" and isinstance(head, nn.Linear):
            # re-initialised in place (same parameter objects); `remove` restores the originals
            with torch.no_grad():
                nn.init.kaiming_normal_(b.overwrite("head.weight"), a=0, mode="fan_out")
                if head.bias is not None:
                    nn.init.constant_(b.overwrite("head.bias"), -math.log((1 - 0.01) / 0.01))
        kind = "deep" if self.deep else "shallow"
        return f"{p} prompts after the {P} prefix token(s), {kind}; removed after blocks.{L - 1}"
