"""Serial bottleneck adapters after the FFN (Pfeiffer placement), in the two layouts the ViT PETL
benchmarks use.

``style="noah"`` -- NOAH's "Adapter" baseline (ZhangYuanhan-AI/NOAH `model/module/adapter_super.py`,
`Block.forward` in `model/supernet_vision_transformer_timm.py`)::

    y = x + DP(Attn(LN1 x));  f = DP(MLP(LN2 y))
    z = y + [ f + ln2( dropout( QuickGELU( ln1(f) ) ) ) ]          (slot ffn_out)

    names  blocks.{i}.adapter.ln1.weight [a, D], .ln1.bias [a],
           blocks.{i}.adapter.ln2.weight [D, a], .ln2.bias [D]

  Tensors are allocated at a *super* size and only the leading ``active_dim`` rows of ln1 /
  columns of ln2 act (NOAH's supernet slicing; for `Adapter` super == active == dim).

``style="vpt"`` -- VPT's "Adapter" baseline (KMnP/vpt `src/models/vit_adapter/adapter_block.py`
`Pfeiffer_Block`, the timm-backbone twin of `vit.py` `ADPT_Block`)::

    m = MLP(LN2 y);  z = y + DP( m + up( GELU( down(m) ) ) )         (slot mlp_out)

    names  blocks.{i}.adapter_downsample.{weight [a, D], bias [a]},
           blocks.{i}.adapter_upsample.{weight [D, a], bias [D]}

Inits (``init``):

* ``"official"``: what the official code *effectively* starts from.
  noah: trunc_normal(std .02) weights and zero biases -- the module's own xavier init is overwritten
  by `VisionTransformer.init_weights` (`_init_vit_weights` on every nn.Linear).
  vpt: all four tensors zero. Then GELU(0) = 0 and up.weight = 0, so both weight gradients are zero
  forever and only `adapter_upsample.bias` can learn; reproduced on purpose, with a
  UserWarning at inject.
* ``"xavier"``: NOAH's module-level init, xavier_uniform weights and N(0, 1e-6) biases.
* ``"lora"``: kaiming_uniform(a=sqrt 5) down weight, everything else zero -- the branch is exactly 0 at
  start yet trainable (the usual fix for the vpt quirk).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import Builder, Method, SlotFn, ViTInfo, check_positive_int, check_prob, dropout

__all__ = ["Adapter", "SuperAdapter", "quick_gelu", "ACTIVATIONS", "init_bottleneck_"]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's QuickGELU, x * sigmoid(1.702 x) (NOAH and Convpass use it)."""
    return x * torch.sigmoid(1.702 * x)


#: activation name -> function (looked up by name at call time, so modules stay picklable)
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}

_INITS = ("official", "xavier", "lora")


def init_bottleneck_(down: nn.Linear, up: nn.Linear, init: str) -> None:
    """Initialise a down/up bottleneck pair in place.

    "trunc_normal": NOAH's effective init (trunc_normal std .02 weights, zero biases);
    "xavier": xavier_uniform weights, N(0, 1e-6) biases; "lora": kaiming_uniform(a=sqrt 5) down,
    zeros elsewhere; "zeros": all four tensors zero (VPT's adapter).
    """
    with torch.no_grad():
        if init == "trunc_normal":
            for lin in (down, up):
                nn.init.trunc_normal_(lin.weight, std=0.02)  # timm trunc_normal_: a=-2, b=2 absolute
                nn.init.zeros_(lin.bias)
        elif init == "xavier":
            for lin in (down, up):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.normal_(lin.bias, std=1e-6)
        elif init == "lora":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            for t in (down.bias, up.weight, up.bias):
                nn.init.zeros_(t)
        elif init == "zeros":
            for t in (down.weight, down.bias, up.weight, up.bias):
                nn.init.zeros_(t)
        else:  # pragma: no cover - callers validate
            raise ValueError(f"unknown adapter init {init!r}")


class SuperAdapter(nn.Module):
    """NOAH's `AdapterSuper`: ln1 = Linear(D, super_dim), ln2 = Linear(super_dim, D), of which the
    leading `active_dim` hidden units act. forward(f) = f + ln2(dropout(act(ln1(f)))), or f when
    `active_dim` is 0. Shapes: f [..., D] -> [..., D]."""

    def __init__(self, embed_dim: int, super_dim: int, active_dim: int | None = None, dropout: float = 0.1,
                 act: str = "quick_gelu", init: str = "trunc_normal"):
        super().__init__()
        self.embed_dim = embed_dim
        self.super_dim = super_dim
        self.active_dim = super_dim if active_dim is None else active_dim
        self.dropout = float(dropout)
        self.act = act
        self.ln1 = nn.Linear(embed_dim, super_dim)
        self.ln2 = nn.Linear(super_dim, embed_dim)
        init_bottleneck_(self.ln1, self.ln2, init)

    def delta(self, f: torch.Tensor) -> torch.Tensor:
        a = self.active_dim
        w1, b1, w2 = self.ln1.weight, self.ln1.bias, self.ln2.weight
        if a != self.super_dim:
            w1, b1, w2 = w1[:a], b1[:a], w2[:, :a]
        out = ACTIVATIONS[self.act](F.linear(f, w1, b1))
        out = dropout(out, self.dropout, self)
        return F.linear(out, w2, self.ln2.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.active_dim == 0:
            return f
        return f + self.delta(f)

    def extra_repr(self) -> str:
        return f"active_dim={self.active_dim}, act={self.act}, dropout={self.dropout}"


class AdapterAfterFFN(SlotFn):
    """Slot `ffn_out`: f -> adapter(f) (adapter returns f + delta)."""

    class_row_local = True  # ln1, activation, dropout on [..., N, dim], ln2: per token

    def __init__(self, adapter: SuperAdapter):
        self.adapter = adapter

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        return self.adapter(f)


class _PfeifferOnMLP(SlotFn):
    """Slot `mlp_out` (VPT layout): m -> m + up(dropout(act(down(m)))), before the block's DropPath."""

    class_row_local = True

    def __init__(self, down: nn.Linear, up: nn.Linear, act: str, p: float):
        self.down = down
        self.up = up
        self.act = act
        self.p = p

    def __call__(self, m: torch.Tensor) -> torch.Tensor:
        a = ACTIVATIONS[self.act](self.down(m))
        a = dropout(a, self.p, self.down)
        return self.up(a) + m  # official order: `x = adpt + x`


_STYLE_DEFAULTS = {"noah": ("quick_gelu", 0.1), "vpt": ("gelu", 0.0)}


@dataclass
class Adapter(Method):
    """Serial bottleneck adapter after the FFN, `style` "noah" (default) or "vpt" (see module doc).

    `act` / `dropout` left at None take the style's official choice (noah: QuickGELU, dropout 0.1;
    vpt: GELU, no dropout). `dim` is the bottleneck width (VPT's reduction factor r gives D // r).
    ViT-B/16, noah, dim 8: 12 * (8*768 + 8 + 768*8 + 768) = 156,768 parameters (+ head).
    """

    dim: int = 8
    act: str | None = None
    dropout: float | None = None
    style: str = "noah"
    init: str = "official"

    name: ClassVar[str] = "Adapter"
    merge_refusal: ClassVar[str] = (
        "its bottleneck has a nonlinearity (QuickGELU/GELU) between two projections, so it cannot be "
        "folded into the frozen weights; it stays a serial module after the FFN at inference"
    )
    claims: ClassVar[frozenset[str]] = frozenset({"ffn_adapter"})

    @property
    def resolved(self) -> tuple[str, float]:
        act, p = _STYLE_DEFAULTS.get(self.style, ("quick_gelu", 0.1))
        return (self.act if self.act is not None else act, self.dropout if self.dropout is not None else p)

    def validate(self, info: ViTInfo) -> None:
        if self.style not in _STYLE_DEFAULTS:
            raise ValueError(f"Adapter style must be 'noah' or 'vpt', got {self.style!r}")
        check_positive_int(self.dim, "Adapter dim", info.embed_dim, "the embedding width")
        if self.act is not None and self.act not in ACTIVATIONS:
            raise ValueError(f"Adapter act must be one of {sorted(ACTIVATIONS)} (or None), got {self.act!r}")
        if self.dropout is not None:
            check_prob(self.dropout, "Adapter dropout")
        if self.init not in _INITS:
            raise ValueError(f"Adapter init must be one of {_INITS}, got {self.init!r}")

    def apply(self, model: nn.Module, info: ViTInfo, b: Builder) -> str:
        act, p = self.resolved
        D = info.embed_dim
        if self.style == "vpt" and self.init == "official":
            warnings.warn(
                "Adapter(style='vpt', init='official') reproduces VPT's all-zero adapter init: with "
                "down/up weights and biases all zero, GELU(0)=0 keeps both weight gradients at exactly "
                "zero, so only blocks.*.adapter_upsample.bias can ever train (a learned per-layer bias "
                "after the FFN). Use init='lora' for a trainable zero-output adapter.",
                UserWarning,
                stacklevel=3,
            )
        for i, blk in enumerate(model.blocks):
            ref = blk.norm2.weight  # the backbone's device and dtype
            if self.style == "noah":
                init = {"official": "trunc_normal"}.get(self.init, self.init)
                ad = SuperAdapter(D, self.dim, self.dim, p, act, init).to(device=ref.device, dtype=ref.dtype)
                b.attach(f"blocks.{i}.adapter", ad)
                b.slot(f"blocks.{i}", "ffn_out", AdapterAfterFFN(ad))
            else:
                init = {"official": "zeros"}.get(self.init, self.init)
                down, up = nn.Linear(D, self.dim), nn.Linear(self.dim, D)
                init_bottleneck_(down, up, init)
                down = b.attach(f"blocks.{i}.adapter_downsample", down.to(device=ref.device, dtype=ref.dtype))
                up = b.attach(f"blocks.{i}.adapter_upsample", up.to(device=ref.device, dtype=ref.dtype))
                b.slot(f"blocks.{i}", "mlp_out", _PfeifferOnMLP(down, up, act, p))
        if self.style == "noah":
            return f"blocks.*.adapter (serial after the drop-pathed FFN; {act}, dropout {p})"
        return f"blocks.*.adapter_{{down,up}}sample (on the raw MLP output, inside DropPath; {act})"
