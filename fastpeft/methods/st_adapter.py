"""ST-Adapter: a temporal depthwise-conv adapter that turns a frozen image ViT into a video model.

Official code: linziyi96/st-adapter `models_adapter.py` (`Adapter`, `ResidualAttentionBlock`,
`VisionTransformer.forward`, `clip_vit_base_patch16_adapter12x384` / `..._adapter24x384`). Paper:
Pan et al., "ST-Adapter: Parameter-Efficient Image-to-Video Transfer Learning", NeurIPS 2022.

Frames run through the ViT as a batch of B*T images (row b*T + t). One adapter on the residual
stream x [B*T, L, D], L = P prefix tokens (the class token) + Gh*Gw patch tokens:

    u = fc1(x[:, P:])                          [B*T, N, C]   (Linear D -> C, bias)
    c = conv(u as [B, C, T, Gh, Gw])           depthwise Conv3d, kernel (k_t, 1, 1), padding
                                               (k_t // 2, 0, 0) (zeros), groups C, bias: a k_t-tap
                                               filter over time per channel and patch position
    v = fc2(c)                                 [B*T, N, D]   (Linear C -> D, bias)
    ST(x) = cat[x[:, :P], x[:, P:] + v]        prefix tokens pass through unchanged

No activation, dropout, norm or scale (the released module has none). Placement (serial, before
the sub-layer's LayerNorm, on the residual stream): `positions=("attn",)` x <- ST(x) before norm1
(slot block_in), `("mlp",)` y <- ST(y) before norm2 (slot mlp_in); both: the released SSv2
model. The released K400 model uses pre-MLP only (the default here). `layers`: adapters only in
the last `layers` blocks (official `adapter_layers`; None: all).

Init: conv weight and bias zero, fc1 / fc2 biases zero, fc1 / fc2 weights PyTorch's default Linear
init; so the adapter is exactly the identity at start (torch.equal to the frozen model).

Video forward: `inject` replaces `model.forward` by `_VideoForward`: clips [B, T, 3, H, W] with T
== frames (ValueError otherwise) -> patch_embed / pos_embed / norm_pre / blocks on the B*T frames
-> class token of each frame (pre-norm) -> mean over T -> `norm` (CLIP's ln_post) -> fc_norm ->
head_drop -> head. Pooling before the final norm is the official order (timm's
forward_features would normalise every frame's tokens first; LN(mean) != mean(LN)).

Names: `blocks.{i}.adapter_pre_attn.{fc1,conv,fc2}.{weight,bias}`, `blocks.{i}.adapter_pre_mlp.*`
(official `transformer.resblocks.{i}.adapter_pre_{attn,mlp}.*`). Trainable: adapters and the
head (official: `fc`); the final norm stays frozen. Per adapter at D=768, C=384, k_t=3: 592,512
parameters; 12 pre-MLP adapters 7,110,144.

With class-token pooling the last block's pre-MLP adapter gets no gradient (it changes only patch
tokens; the block's MLP is per-token and the head reads class tokens): the released 12x384 model's
last adapter never trains either. It is kept, for the official names and counts.

Not reproduced: the official backbone is stored in fp16 (fp32 LayerNorm compute); here it is
whatever dtype the model has. The official head is Dropout(0.5) -> Linear: create the model with
drop_rate=0.5 to match. Use `vit_base_patch16_clip_quickgelu_224.openai` for OpenAI's weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import Builder, Method, SlotFn, ViTInfo, check_positive_int

__all__ = ["STAdapter", "STAdapterModule"]


class STAdapterModule(nn.Module):
    """One ST-Adapter (the official `Adapter` with kernel (k_t, 1, 1)) for a token sequence laid out
    as [B*T frames (b-major), P prefix tokens + Gh*Gw patch tokens (row-major), D]."""

    def __init__(self, embed_dim: int, width: int, frames: int, grid: tuple[int, int], num_prefix: int = 1,
                 temporal_kernel: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, width)
        self.conv = nn.Conv3d(width, width, (temporal_kernel, 1, 1), padding=(temporal_kernel // 2, 0, 0),
                              groups=width)
        self.fc2 = nn.Linear(width, embed_dim)
        self.frames = int(frames)
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_prefix = int(num_prefix)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.fc1.reset_parameters()
            self.fc2.reset_parameters()
            for t in (self.conv.weight, self.conv.bias, self.fc1.bias, self.fc2.bias):
                t.zero_()

    def check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """(B, N) for x [B*T, P + N, D], or ValueError."""
        T, P, (gh, gw) = self.frames, self.num_prefix, self.grid
        if x.dim() != 3 or x.shape[1] != P + gh * gw or x.shape[-1] != self.fc1.in_features:
            raise ValueError(
                f"ST-Adapter expects frame tokens [B*T, {P} + {gh}x{gw}, {self.fc1.in_features}], got "
                f"{tuple(x.shape)}: it was injected for this patch grid (a model built at this image size)"
            )
        if x.shape[0] % T:
            raise ValueError(f"ST-Adapter was injected for {T} frames per clip; {x.shape[0]} frames do not "
                             f"form whole clips (feed clips [B, {T}, C, H, W] to the model)")
        return x.shape[0] // T, gh * gw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N = self.check_input(x)
        T, P, (gh, gw) = self.frames, self.num_prefix, self.grid
        C = self.fc1.out_features
        u = self.fc1(x[:, P:])  # [B*T, N, C]
        u = u.reshape(B, T, gh, gw, C).permute(0, 4, 1, 2, 3)
        c = self.conv(u).permute(0, 2, 3, 4, 1).reshape(B * T, N, C)
        return torch.cat([x[:, :P], x[:, P:] + self.fc2(c)], dim=1)

    def extra_repr(self) -> str:
        return f"frames={self.frames}, grid={self.grid}, num_prefix={self.num_prefix}"


class _Serial(SlotFn):
    """Slots block_in (before norm1) and mlp_in (before norm2): x <- ST(x)."""

    def __init__(self, adapter: STAdapterModule):
        self.adapter = adapter

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x)


class _VideoForward:
    """`model.forward` of an ST-Adapter model: clips [B, T, C, H, W] -> logits (module docstring)."""

    def __init__(self, model: nn.Module, frames: int):
        self.model = model
        self.frames = frames

    def example_input(self, batch: int) -> torch.Tensor:
        """Random clips [batch, T, C, H, W] this forward takes (fastpeft.recompute's probe)."""
        pe = self.model.patch_embed
        p = next(self.model.parameters())
        return torch.randn(batch, self.frames, pe.proj.in_channels, *pe.img_size, device=p.device, dtype=p.dtype)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """Pre-norm tokens of every frame, [B*T, L, D]."""
        m = self.model
        if not isinstance(clips, torch.Tensor) or clips.dim() != 5:
            got = tuple(clips.shape) if isinstance(clips, torch.Tensor) else type(clips).__name__
            raise ValueError(f"an ST-Adapter model takes clips [B, T={self.frames}, C, H, W], got {got}")
        B, T = clips.shape[:2]
        if T != self.frames:
            raise ValueError(f"ST-Adapter was injected for clips of {self.frames} frames, got {T} "
                             f"(clips {tuple(clips.shape)}); inject with frames={T} for such clips")
        x = m.patch_embed(clips.reshape(B * T, *clips.shape[2:]))
        x = m.norm_pre(m.patch_drop(m._pos_embed(x)))
        if getattr(m, "grad_checkpointing", False) and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq

            return checkpoint_seq(m.blocks, x)
        return m.blocks(x)

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = self.features(clips)
        cls = x[:, 0].reshape(clips.shape[0], self.frames, x.shape[-1]).mean(1)
        return m.head(m.head_drop(m.fc_norm(m.norm(cls))))


@dataclass
class STAdapter(Method):
    """ST-Adapter (module docstring). width: adapter channels C (official 384); positions: any of
    "attn", "mlp"; frames: clip length T (fixed at inject); layers: the last `layers` blocks get
    adapters (None: all); temporal_kernel: k_t (official 3, odd)."""

    width: int = 384
    positions: tuple = ("mlp",)
    frames: int = 8
    layers: int | None = None
    temporal_kernel: int = 3

    name: ClassVar[str] = "STAdapter"
    merge_refusal: ClassVar[str] = (
        "its depthwise conv mixes tokens across frames, which no per-token frozen weight can express"
    )
    # it reads the token sequence as [prefix, patch grid] per frame and replaces model.forward
    claims: ClassVar[frozenset[str]] = frozenset({"token_layout", "model_forward"})

    def _positions(self) -> tuple[str, ...]:
        pos = (self.positions,) if isinstance(self.positions, str) else tuple(self.positions)
        return pos

    def validate(self, info: ViTInfo) -> None:
        pos = self._positions()
        if not pos or any(p not in ("attn", "mlp") for p in pos) or len(set(pos)) != len(pos):
            raise ValueError(f"STAdapter positions must be distinct names from ('attn', 'mlp'), got {self.positions!r}")
        check_positive_int(self.width, "STAdapter width")
        check_positive_int(self.frames, "STAdapter frames")
        check_positive_int(self.temporal_kernel, "STAdapter temporal_kernel")
        if self.temporal_kernel % 2 == 0:
            raise ValueError(f"STAdapter temporal_kernel must be odd (padding k // 2 keeps T), got {self.temporal_kernel}")
        if self.layers is not None:
            check_positive_int(self.layers, "STAdapter layers", info.depth, "the model's depth")
        if not info.has_class_token or info.global_pool != "token":
            raise ValueError("STAdapter pools each frame's class token: it needs a ViT with a class token and "
                             f"global_pool='token' (got class token {info.has_class_token}, "
                             f"global_pool={info.global_pool!r})")
        if info.distilled:
            raise ValueError("STAdapter does not support distilled (two-head) ViTs")

    def apply(self, model: nn.Module, info: ViTInfo, b: Builder) -> str:
        pos = self._positions()
        first = info.depth - (self.layers if self.layers is not None else info.depth)
        for i in range(first, info.depth):
            ref = model.blocks[i].norm1.weight
            for p in ("attn", "mlp"):
                if p not in pos:
                    continue
                mod = STAdapterModule(info.embed_dim, self.width, self.frames, info.grid_size,
                                      info.num_prefix_tokens, self.temporal_kernel).to(device=ref.device, dtype=ref.dtype)
                b.attach(f"blocks.{i}.adapter_pre_{p}", mod)
                b.slot(f"blocks.{i}", "block_in" if p == "attn" else "mlp_in", _Serial(mod))
        b.replace("forward", _VideoForward(model, self.frames))
        n = info.depth - first
        return (f"blocks.{first}..{info.depth - 1}.adapter_pre_{{{','.join(pos)}}} ({n * len(pos)} adapters, "
                f"width {self.width}, {self.frames} frames); forward takes clips [B, {self.frames}, C, H, W]")


# ----------------------------------------------------------------------------------------------
# Official checkpoint names (models_adapter.py; OpenAI CLIP visual names as timm's
# `_convert_openai_clip` maps them)
# ----------------------------------------------------------------------------------------------
_CLIP_BLOCK = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight",
               "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1",
               "mlp.c_proj": "mlp.fc2"}
_CLIP_TOP = {"conv1.weight": "patch_embed.proj.weight", "class_embedding": "cls_token",
             "positional_embedding": "pos_embed", "ln_pre.weight": "norm_pre.weight", "ln_pre.bias": "norm_pre.bias",
             "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias", "fc.weight": "head.weight",
             "fc.bias": "head.bias"}
#: official keys not loaded: CLIP's text-projection `proj` (the video head is `fc`)
ST_ADAPTER_DROPPED = ("proj",)


def st_adapter_official_key(key: str) -> str | None:
    """timm/fastpeft name of an official ST-Adapter checkpoint key (None: no mapping). The class
    and positional embeddings gain timm's leading singleton dims (`st_adapter_official_tensor`)."""
    import re

    if key in _CLIP_TOP:
        return _CLIP_TOP[key]
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
    if not m:
        return None
    rest = m[2]
    if re.fullmatch(r"adapter_pre_(attn|mlp)\.(fc1|conv|fc2)\.(weight|bias)", rest):
        return f"blocks.{m[1]}.{rest}"
    for old, new in _CLIP_BLOCK.items():
        if rest == old or rest.startswith(old + "."):
            return f"blocks.{m[1]}.{new}{rest[len(old):]}"
    return None


def st_adapter_official_tensor(key: str, t: torch.Tensor) -> torch.Tensor:
    if key == "class_embedding" and t.dim() == 1:
        return t.view(1, 1, -1)
    if key == "positional_embedding" and t.dim() == 2:
        return t.unsqueeze(0)
    return t
