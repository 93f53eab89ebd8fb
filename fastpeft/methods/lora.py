"""LoRA on the fused qkv projection of a timm ViT, in the two official flavours.

**style="noah"** (ZhangYuanhan-AI/NOAH `model/supernet_vision_transformer_timm.py`, `Attention`):

    [dq | dk | dv] = scale * B A dropout(h)          h = input of attn.qkv (= norm1 output)
    A = blocks.{i}.attn.LoRA_a.weight [r, D]         B = blocks.{i}.attn.LoRA_b.weight [3*A_dim, r]

The 3*A_dim delta is added to the whole qkv output (q, k and v), before timm splits heads, i.e.
before the 1/sqrt(d_h) scaling -- exactly where NOAH adds it. NOAH has no alpha/r factor; `scale`
defaults to 1.0 and is skipped entirely when 1.0. Dropout (p=0.1, NOAH's `--drop_rate_LoRA`) is on
the LoRA input and follows the attention module's train/eval mode.
Init: NOAH writes kaiming_uniform(a=sqrt 5) for A and zeros for B, but its VisionTransformer then
re-initialises *every* nn.Linear with trunc_normal(std .02) (its `_init_weights`), so the effective official
init (`init="official"`) is trunc_normal(.02) on both A and B: the branch is NOT zero at start.
`init="lora"` gives the written init (A kaiming_uniform, B zeros: exact identity at start).

**style="petl"** (JieShibo/PETL-ViT `binary_adapter/lora.py`, 32-bit case):

    d_t = scale * up_t(dropout(down_t(h)))  for t in targets, added to that third of qkv
    blocks.{i}.attn.lora_{t}.adapter_down.weight [r, D]   (default nn.Linear init, no bias)
    blocks.{i}.attn.lora_{t}.adapter_up.weight   [A_dim, r] (zeros, no bias)
    blocks.{i}.attn.lora_{t}.dropout  (nn.Dropout(p), no parameters, as in the official Adapter)

**style="auto"**: noah when targets are q, k and v; petl otherwise.

Merge (eval, dropout off): noah W_qkv += scale * B A; petl W_t += scale * up_t down_t on the rows
of target t (q: 0..A-1, k: A..2A-1, v: 2A..3A-1). Biases are untouched.

`NoahLoRAHook` / `make_noah_lora` are the reusable pieces for the NOAH method (leading-slice use
of super-size tensors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import Builder, Method, OutputHook, ViTInfo, check_positive_int, check_prob

__all__ = ["LoRA", "NoahLoRAHook", "PetlLoRAAdapter", "PetlLoRAHook", "make_noah_lora"]

_TARGETS = ("q", "k", "v")


# --------------------------------------------------------------------------------------------
# NOAH flavour
# --------------------------------------------------------------------------------------------

def make_noah_lora(info: ViTInfo, r_super: int, device=None, dtype=None, init: str = "official"):
    """(LoRA_a, LoRA_b): `nn.Linear(D, r_super, bias=False)` and `nn.Linear(r_super, 3*A_dim, bias=False)`.

    init="official": trunc_normal(std .02) on both (NOAH's global re-init of every Linear);
    init="lora": A kaiming_uniform(a=sqrt 5), B zeros (what NOAH's Attention writes before that).
    Created on `device`/`dtype`; A is initialised before B (NOAH's order).
    """
    check_positive_int(r_super, "LoRA rank", info.embed_dim, "the embedding width")
    if init not in ("official", "lora"):
        raise ValueError(f"LoRA init must be 'official' or 'lora', got {init!r}")
    a = nn.Linear(info.embed_dim, r_super, bias=False, device=device, dtype=dtype)
    b = nn.Linear(r_super, 3 * info.attn_dim, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        if init == "official":
            # timm's trunc_normal_(std=.02) uses absolute bounds a=-2, b=2 (i.e. ~100 sigma)
            nn.init.trunc_normal_(a.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.trunc_normal_(b.weight, std=0.02, a=-2.0, b=2.0)
        else:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
    return a, b


class NoahLoRAHook(OutputHook):
    """Forward hook on `attn.qkv`: out + scale * (dropout(x) @ A[:rank].T) @ B[:, :rank].T.

    `attn` is the timm Attention module that owns `LoRA_a` / `LoRA_b` (possibly super-size; only
    the leading `rank` rows of A / columns of B are used). Dropout follows `attn.training`.
    """

    def __init__(self, attn: nn.Module, rank: int, dropout_p: float, scale: float = 1.0):
        self.attn = attn
        self.rank = int(rank)
        self.dropout_p = float(dropout_p)
        self.scale = scale

    class_row_local = True  # dropout on the [..., N, D] input, then two row-local products

    def predrawable_dropout(self) -> float:  # its input dropout is its first (and only) draw
        active = self.rank > 0 and self.attn.training and 0.0 < self.dropout_p < 1.0
        return self.dropout_p if active else 0.0

    def delta_weight(self) -> torch.Tensor:
        """B[:, :r] A[:r] -- the [3*A_dim, D] weight increment (times `scale`)."""
        w = self.attn.LoRA_b.weight[:, : self.rank] @ self.attn.LoRA_a.weight[: self.rank]
        return w * self.scale if self.scale != 1.0 else w

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            return out
        h = self.input_dropout(x, self.dropout_p, self.attn)
        d = nn.functional.linear(h, self.attn.LoRA_a.weight[: self.rank])
        d = nn.functional.linear(d, self.attn.LoRA_b.weight[:, : self.rank])
        if self.scale != 1.0:
            d = d * self.scale
        return out + d


# --------------------------------------------------------------------------------------------
# PETL-ViT flavour
# --------------------------------------------------------------------------------------------

class PetlLoRAAdapter(nn.Module):
    """PETL-ViT's 32-bit `Adapter` used as `attn.lora_q` / `attn.lora_v`: up(dropout(down(x)))."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, p: float, device=None, dtype=None):
        super().__init__()
        self.adapter_down = nn.Linear(in_dim, rank, bias=False, device=device, dtype=dtype)  # default init
        self.adapter_up = nn.Linear(rank, out_dim, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.zeros_(self.adapter_up.weight)
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.dropout(self.adapter_down(x)))


class PetlLoRAHook(OutputHook):
    """Forward hook on `attn.qkv` adding scale * lora_t(x) to the q / k / v third of the output."""

    def __init__(self, attn: nn.Module, targets: tuple[str, ...], scale: float):
        self.attn = attn
        self.targets = tuple(targets)
        self.scale = scale

    class_row_local = True  # lora_t: nn.Dropout on the [..., N, r] down-projection

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        parts = list(out.chunk(3, dim=-1))
        for t in self.targets:
            j = _TARGETS.index(t)
            parts[j] = parts[j] + getattr(self.attn, f"lora_{t}")(x) * self.scale
        return torch.cat(parts, dim=-1)


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------

@dataclass
class LoRA(Method):
    """LoRA on `attn.qkv` (see the module docstring for the two official layouts).

    rank: r (1..embed_dim); targets: subset of ("q", "k", "v"); scale: multiplies the delta
    (NOAH: 1, PETL-ViT: per-task s); dropout: on the LoRA input (noah) / after the down
    projection (petl); style: "auto" | "noah" | "petl"; init: "official" | "lora" (noah only:
    "official" = trunc_normal(.02) on A and B, "lora" = kaiming A, zero B; petl always uses its
    official default-Linear down / zero up init).
    """

    rank: int = 8
    targets: tuple = ("q", "k", "v")
    scale: float = 1.0
    dropout: float = 0.1
    style: str = "auto"
    init: str = "official"

    name: ClassVar[str] = "LoRA"
    mergeable: ClassVar[bool] = True
    #: one LoRA on qkv per model (NOAH's LoRA claims the same)
    claims: ClassVar[frozenset[str]] = frozenset({"qkv_lora"})

    def _targets(self) -> tuple[str, ...]:
        return tuple(self.targets) if not isinstance(self.targets, str) else (self.targets,)

    def resolved_style(self) -> str:
        if self.style != "auto":
            return self.style
        t = self._targets()
        return "noah" if len(t) == 3 and set(t) == set(_TARGETS) else "petl"

    def validate(self, info: ViTInfo) -> None:
        check_positive_int(self.rank, "LoRA rank", info.embed_dim, "the embedding width")
        check_prob(self.dropout, "LoRA dropout")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"LoRA scale must be a number, got {self.scale!r}")
        t = self._targets()
        if not t:
            raise ValueError("LoRA targets must name at least one of 'q', 'k', 'v'")
        bad = [x for x in t if x not in _TARGETS]
        if bad:
            raise ValueError(f"LoRA targets must be among ('q', 'k', 'v'); unknown: {bad}")
        if len(set(t)) != len(t):
            raise ValueError(f"LoRA targets contain duplicates: {t}")
        if self.style not in ("auto", "noah", "petl"):
            raise ValueError(f"LoRA style must be 'auto', 'noah' or 'petl', got {self.style!r}")
        if self.style == "noah" and set(t) != set(_TARGETS):
            raise ValueError(f"LoRA style='noah' adapts q, k and v together (one B of 3*width rows); got targets {t}")
        if self.init not in ("official", "lora"):
            raise ValueError(f"LoRA init must be 'official' or 'lora', got {self.init!r}")

    def apply(self, model: nn.Module, info: ViTInfo, b: Builder) -> str:
        style = self.resolved_style()
        for i, blk in enumerate(model.blocks):
            ref = blk.attn.qkv.weight
            dd = {"device": ref.device, "dtype": ref.dtype}
            if style == "noah":
                la, lb = make_noah_lora(info, self.rank, init=self.init, **dd)
                b.attach(f"blocks.{i}.attn.LoRA_a", la)
                b.attach(f"blocks.{i}.attn.LoRA_b", lb)
                b.hook(f"blocks.{i}.attn.qkv", NoahLoRAHook(blk.attn, self.rank, self.dropout, self.scale))
            else:
                for t in self._targets():
                    ad = PetlLoRAAdapter(info.embed_dim, info.attn_dim, self.rank, self.dropout, **dd)
                    b.attach(f"blocks.{i}.attn.lora_{t}", ad)
                b.hook(f"blocks.{i}.attn.qkv", PetlLoRAHook(blk.attn, self._targets(), self.scale))
        if style == "noah":
            return f"blocks.*.attn.qkv output (q, k, v), NOAH layout LoRA_a/LoRA_b, r={self.rank}"
        return f"blocks.*.attn.qkv output ({', '.join(self._targets())}), PETL-ViT layout lora_*, r={self.rank}"

    def merged_tensors(self, model: nn.Module, info: ViTInfo) -> dict[str, torch.Tensor]:
        style = self.resolved_style()
        new: dict[str, torch.Tensor] = {}
        A = info.attn_dim
        for i, blk in enumerate(model.blocks):
            w = blk.attn.qkv.weight
            if style == "noah":
                delta = blk.attn.LoRA_b.weight[:, : self.rank] @ blk.attn.LoRA_a.weight[: self.rank]
                if self.scale != 1.0:
                    delta = delta * self.scale
            else:
                delta = torch.zeros_like(w)
                for t in self._targets():
                    ad = getattr(blk.attn, f"lora_{t}")
                    j = _TARGETS.index(t)
                    delta[j * A:(j + 1) * A] = (ad.adapter_up.weight @ ad.adapter_down.weight) * self.scale
            new[f"blocks.{i}.attn.qkv.weight"] = w + delta.to(w.dtype)
        return new
