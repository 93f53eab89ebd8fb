"""AdaptFormer (AdaptMLP): a bottleneck adapter beside the frozen MLP.

Official code: ShoufaChen/AdaptFormer `models/adapter.py` (Adapter), `models/custom_modules.py`
(Block).

    y = x + DP(Attn(LN1 x))
    a = s * up(dropout(ReLU(down(y))))              (s scales the up-projection *and* its bias)
    parallel:   z = y + DP(ls2(MLP(LN2 y))) + a      adapter input is y, not LN2(y); outside DP
    sequential: z = y + (f + s * up(...(f)))         f = DP(ls2(MLP(LN2 y)))

Init ("lora" in the official code): down.weight kaiming_uniform(a=sqrt 5), up.weight and both
biases zero, so the branch is exactly 0 at start. Names: `blocks.{i}.adaptmlp.down_proj.{weight,bias}`,
`blocks.{i}.adaptmlp.up_proj.{weight,bias}` (+ `blocks.{i}.adaptmlp.scale` if learnable).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import Builder, Method, SlotFn, ViTInfo, check_positive_int, check_prob, dropout


class AdaptMLP(nn.Module):
    """The official `Adapter` module (named `adaptmlp` in the block)."""

    def __init__(self, d_model: int, bottleneck: int, dropout: float = 0.1, scale: float = 0.1,
                 learnable_scale: bool = False, layernorm_option: str = "none"):
        super().__init__()
        self.n_embd = d_model
        self.down_size = bottleneck
        self.dropout = dropout
        self.layernorm_option = layernorm_option
        if layernorm_option in ("in", "out"):
            self.adapter_layer_norm_before = nn.LayerNorm(d_model)
        if learnable_scale:
            self.scale = nn.Parameter(torch.ones(1))
        else:
            self.scale = float(scale)
        self.down_proj = nn.Linear(d_model, bottleneck)
        self.non_linear_func = nn.ReLU()
        self.up_proj = nn.Linear(bottleneck, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up_proj.weight)
            nn.init.zeros_(self.down_proj.bias)
            nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: torch.Tensor, add_residual: bool = True, residual: torch.Tensor | None = None):
        residual = x if residual is None else residual
        if self.layernorm_option == "in":
            x = self.adapter_layer_norm_before(x)
        down = self.non_linear_func(self.down_proj(x))
        down = dropout(down, self.dropout, self)
        up = self.up_proj(down) * self.scale
        if self.layernorm_option == "out":
            up = self.adapter_layer_norm_before(up)
        return up + residual if add_residual else up


class _Parallel(SlotFn):
    reads_norm = False  # the official adapter reads the residual stream y, not norm2(y)
    class_row_local = True  # AdaptMLP: down, ReLU, dropout on [..., N, r], up, scale (LayerNorm): per token

    def __init__(self, adapter: AdaptMLP):
        self.adapter = adapter

    def __call__(self, y: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        return self.adapter(y, add_residual=False)


class _Sequential(SlotFn):
    class_row_local = True

    def __init__(self, adapter: AdaptMLP):
        self.adapter = adapter

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        return self.adapter(f)


@dataclass
class AdaptFormer(Method):
    """AdaptFormer: `dim` bottleneck, scale `scale` (or a learnable scalar), dropout after ReLU."""

    dim: int = 64
    scale: float = 0.1
    dropout: float = 0.1
    mode: str = "parallel"
    learnable_scale: bool = False
    layernorm_option: str = "none"

    name: ClassVar[str] = "AdaptFormer"
    merge_refusal: ClassVar[str] = "its ReLU bottleneck is nonlinear; it stays a separate branch at inference"
    claims: ClassVar[frozenset[str]] = frozenset({"ffn_adapter"})

    def validate(self, info: ViTInfo) -> None:
        check_positive_int(self.dim, "AdaptFormer dim", info.embed_dim, "the embedding width")
        check_prob(self.dropout, "AdaptFormer dropout")
        if self.mode not in ("parallel", "sequential"):
            raise ValueError(f"AdaptFormer mode must be 'parallel' or 'sequential', got {self.mode!r}")
        if self.layernorm_option not in ("none", "in", "out"):
            raise ValueError(f"AdaptFormer layernorm_option must be 'none', 'in' or 'out', got {self.layernorm_option!r}")
        if not isinstance(self.scale, (int, float)):
            raise ValueError(f"AdaptFormer scale must be a number, got {self.scale!r}")

    def apply(self, model: nn.Module, info: ViTInfo, b: Builder) -> str:
        for i, blk in enumerate(model.blocks):
            ref = blk.norm2.weight  # build on the backbone's device and dtype
            ad = AdaptMLP(info.embed_dim, self.dim, self.dropout, self.scale, self.learnable_scale,
                          self.layernorm_option).to(device=ref.device, dtype=ref.dtype)
            b.attach(f"blocks.{i}.adaptmlp", ad)
            if self.mode == "parallel":
                b.slot(f"blocks.{i}", "ffn_branch", _Parallel(ad))
            else:
                b.slot(f"blocks.{i}", "ffn_out", _Sequential(ad))
        where = "input = residual stream after attention" if self.mode == "parallel" else "after the drop-pathed FFN"
        return f"blocks.*.adaptmlp ({self.mode}; {where})"
