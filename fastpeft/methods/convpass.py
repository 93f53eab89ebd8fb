"""Convpass: convolutional bypasses beside the attention and MLP sub-layers.

Official code: JieShibo/PETL-ViT `convpass/vtab/convpass.py` (`Convpass`, `forward_block`,
`forward_block_attn`).

    y = x + DP1(Attn(LN1 x)) + DP1(C_attn(LN1 x)) * s          (slot attn_branch, gets (x, LN1 x))
    z = y + DP2(MLP(LN2 y))  + DP2(C_mlp(LN2 y)) * s           (slot ffn_branch, gets (y, LN2 y))

The bypass uses the block's own DropPath module, called separately (its own random draw), as the
official code calls `self.drop_path` twice. One bypass C(h), h [B, N, D]:

    u = QuickGELU(adapter_down(h))                               [B, N, d]
    patch tokens -> [B, d, Gh, Gw] -> adapter_conv (3x3, pad 1) -> [B, Gh*Gw, d]
    each prefix token (CLS and register tokens) -> a 1x1 image -> the same conv (with padding only
        the centre tap W[:, :, 1, 1] and the bias act) -> [B, P, d]
    C(h) = adapter_up(dropout(QuickGELU(cat[prefix, patches])))  [B, N, D]

Generalised from the official code (which hard-codes width 768, a 14x14 grid, CLS at index 0 and
`torch.eye(8)`): the width, the patch grid (Gh, Gw) and the number of prefix tokens are read from the
model at inject, and the identity init is eye(dim).

Init (xavier_init False): conv weight zero + identity on the centre tap, conv bias zero; xavier_init
True: conv weight xavier_uniform. adapter_down xavier_uniform / zero bias; adapter_up all zero, so the
bypass is exactly 0 at start. Names: `blocks.{i}.adapter_attn.{adapter_down,adapter_conv,adapter_up}.*`,
`blocks.{i}.adapter_mlp.*`. ViT-B/16, dim 8: 13,648 per bypass -> 327,552 (both) / 163,776 (attn only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .adapter import quick_gelu
from .base import Builder, Method, SlotFn, ViTInfo, check_positive_int, check_prob, dropout, in_class_row_pass

__all__ = ["Convpass", "ConvpassModule"]


class ConvpassModule(nn.Module):
    """One convolutional bypass (the official `Convpass` module) for a token sequence laid out as
    [prefix tokens (num_prefix), patch tokens (grid[0] * grid[1], row-major)]."""

    def __init__(self, embed_dim: int, dim: int, grid: tuple[int, int], num_prefix: int,
                 xavier_init: bool = False, dropout: float = 0.1):
        super().__init__()
        self.adapter_conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.adapter_down = nn.Linear(embed_dim, dim)  # a 1x1 conv
        self.adapter_up = nn.Linear(dim, embed_dim)  # a 1x1 conv
        self.dim = dim
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_prefix = int(num_prefix)
        self.dropout = float(dropout)
        self.reset_parameters(xavier_init)

    def reset_parameters(self, xavier_init: bool = False) -> None:
        with torch.no_grad():
            if xavier_init:
                nn.init.xavier_uniform_(self.adapter_conv.weight)
            else:
                nn.init.zeros_(self.adapter_conv.weight)
                self.adapter_conv.weight[:, :, 1, 1] += torch.eye(self.dim, dtype=self.adapter_conv.weight.dtype)
            nn.init.zeros_(self.adapter_conv.bias)
            nn.init.xavier_uniform_(self.adapter_down.weight)
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, N, _ = h.shape
        P, (gh, gw), d = self.num_prefix, self.grid, self.dim
        if N != P + gh * gw:
            raise RuntimeError(
                f"Convpass expects {P} prefix + {gh}x{gw} patch tokens = {P + gh * gw}, got {N}: it was "
                "injected for a fixed patch grid (inject into a model built at this image size)"
            )
        u = quick_gelu(self.adapter_down(h))
        patches = u[:, P:].reshape(B, gh, gw, d).permute(0, 3, 1, 2)
        patches = self.adapter_conv(patches).permute(0, 2, 3, 1).reshape(B, gh * gw, d)
        u = torch.cat([self._prefix_conv(u[:, :P]), patches], dim=1) if P else patches
        return self._out(u)

    def _prefix_conv(self, u: torch.Tensor) -> torch.Tensor:
        """The conv of prefix tokens [B, P, dim]: each token a 1x1 image (the centre tap)."""
        B, P, d = u.shape
        return self.adapter_conv(u.reshape(B * P, 1, 1, d).permute(0, 3, 1, 2)).reshape(B, P, d)

    def _out(self, u: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(dropout(quick_gelu(u), self.dropout, self))

    def class_row(self, h: torch.Tensor) -> torch.Tensor:
        """Row 0 of `forward` (the class token, a prefix token: its conv is the centre tap of a
        1x1 image) from h's row 0 alone: [B, 1, D] -> [B, 1, D]. Its dropout is a torch dropout
        on the [B, 1, dim] row (the class-row pass draws it over every row, fastpeft/class_row.py)."""
        if self.num_prefix < 1 or h.shape[1] != 1:
            raise RuntimeError(f"Convpass class_row needs a class (prefix) token and one row, got {tuple(h.shape)}")
        return self._out(self._prefix_conv(quick_gelu(self.adapter_down(h))))

    def extra_repr(self) -> str:
        return f"grid={self.grid}, num_prefix={self.num_prefix}, dropout={self.dropout}"


class _Bypass(SlotFn):
    """Slots attn_branch (x, LN1 x) and ffn_branch (y, LN2 y): delta = DP(C(normed)) * s."""

    def __init__(self, conv: ConvpassModule, drop_path: nn.Module, scale: float):
        self.conv = conv
        self.drop_path = drop_path
        self.scale = scale

    @property
    def class_row_local(self) -> bool:  # the class token's conv reads its own row (centre tap)
        return self.conv.num_prefix >= 1

    def __call__(self, resid: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        if in_class_row_pass():
            return self.drop_path(self.conv.class_row(normed)) * self.scale
        return self.drop_path(self.conv(normed)) * self.scale


@dataclass
class Convpass(Method):
    """Convpass (`attn` and `mlp` True, official "convpass") or Convpass-attn (`mlp=False`)."""

    dim: int = 8
    scale: float = 10.0
    xavier_init: bool = False
    attn: bool = True
    mlp: bool = True
    dropout: float = 0.1

    name: ClassVar[str] = "Convpass"
    merge_refusal: ClassVar[str] = (
        "its bypass has two QuickGELUs around a spatial 3x3 conv over the patch grid, which no "
        "change of the frozen linear weights can express; it stays a parallel branch at inference"
    )
    # it reads the token sequence as [prefix, patch grid]: methods adding tokens (VPT, NOAH) clash
    claims: ClassVar[frozenset[str]] = frozenset({"convpass", "token_layout"})

    def validate(self, info: ViTInfo) -> None:
        check_positive_int(self.dim, "Convpass dim", info.embed_dim, "the embedding width")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"Convpass scale must be a finite number, got {self.scale!r}")
        for flag in ("xavier_init", "attn", "mlp"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"Convpass {flag} must be a bool, got {getattr(self, flag)!r}")
        if not (self.attn or self.mlp):
            raise ValueError("Convpass needs attn=True and/or mlp=True (both False adds nothing)")
        check_prob(self.dropout, "Convpass dropout")

    def apply(self, model: nn.Module, info: ViTInfo, b: Builder) -> str:
        where = []
        for i, blk in enumerate(model.blocks):
            ref = blk.norm1.weight
            for on, name, slot, dp in (
                (self.attn, "adapter_attn", "attn_branch", blk.drop_path1),
                (self.mlp, "adapter_mlp", "ffn_branch", blk.drop_path2),
            ):
                if not on:
                    continue
                mod = ConvpassModule(info.embed_dim, self.dim, info.grid_size, info.num_prefix_tokens,
                                     self.xavier_init, self.dropout).to(device=ref.device, dtype=ref.dtype)
                b.attach(f"blocks.{i}.{name}", mod)
                b.slot(f"blocks.{i}", slot, _Bypass(mod, dp, float(self.scale)))
        if self.attn:
            where.append("blocks.*.adapter_attn (beside attention, input LN1 x)")
        if self.mlp:
            where.append("blocks.*.adapter_mlp (beside the MLP, input LN2 y)")
        gh, gw = info.grid_size
        return "; ".join(where) + f"; {gh}x{gw} grid, s={self.scale}"
