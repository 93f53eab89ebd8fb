"""NOAH (Neural prOmpt seArcH): a searched subnet of per-layer VPT prompts + LoRA + adapter.

Official code: ZhangYuanhan-AI/NOAH `model/supernet_vision_transformer_timm.py` (`Block`, `Attention`,
`VisionTransformer.set_sample_config`), `model/module/adapter_super.py`.

Each layer l uses (p_l, r_l, a_l) = (prompt_lens[l], lora_ranks[l], adapter_dims[l]); 0 disables that
module in that layer. All tensors are allocated at the *super* size in every block (the official
layout, so supernet checkpoints load) and only leading slices act:

    blocks.{i}.visual_prompt_token [1, P_super, D]   uses [:, :p_l]        (xavier_uniform)
    blocks.{i}.attn.LoRA_a.weight  [r_super, D]      uses [:r_l]           (fastpeft.methods.lora)
    blocks.{i}.attn.LoRA_b.weight  [3D, r_super]     uses [:, :r_l]
    blocks.{i}.adapter.ln1.{weight [a_super, D], bias}, .ln2.{weight [D, a_super], bias}
                                                     uses ln1[:a_l], ln2[:, :a_l] (SuperAdapter)

Block l (official `Block.forward`)::

    if p_l > 0: x = cat[ x without its last p_{l-1} tokens , dropout(prompt[:, :p_l]) ]   (APPENDED)
                (p_{-1} := 0; if p_l = 0 the sequence passes through unchanged)
    x = x + DP(Attn(LN1 x))            attention with the LoRA delta on qkv (q, k and v)
    x = x + adapter(DP(MLP(LN2 x)))    adapter(f) = f + ln2(dropout(QuickGELU(ln1 f)))

Only p_{l-1} tokens are dropped, so with p = [5, 0, 3] block 2 sees 8 prompt tokens (the official
rule). After the last block the appended tokens are removed (slot block_out) so timm's final
norm and pooling see [prefix, patches]; the official head reads token 0, which is unchanged.

Init ("official", the effective one): LoRA A and B and the adapter Linears trunc_normal(std .02),
zero biases (NOAH's global `_init_vit_weights` re-init); prompts xavier_uniform. "written": the
modules' own inits (LoRA kaiming/zero, adapter xavier_uniform + N(0, 1e-6) biases).

Not created: the model-level `visual_prompt_token` / `visual_prompt_token_pos_embed` of the official
model. Block 0 drops them before any computation (`sample_last_prompt_tuning_dim = p_0`), so they are
dead parameters; filter them out of an official state dict before `load_state_dict`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import nn

from .adapter import Adapter, AdapterAfterFFN, SuperAdapter
from .base import Builder, Method, SlotFn, ViTInfo, check_prob, dropout
from .lora import LoRA, NoahLoRAHook, make_noah_lora
from .vpt import VPT

__all__ = ["NOAH"]


class _AppendPrompts(SlotFn):
    """block_in of a block with p > 0: drop the last `prev` tokens, append dropout(prompt[:, :p])."""

    def __init__(self, block: nn.Module, p: int, prev: int, drop: float):
        self.block = block
        self.p = p
        self.prev = prev
        self.drop = drop

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        e = self.block.visual_prompt_token[:, : self.p].expand(x.shape[0], -1, -1)
        e = dropout(e, self.drop, self.block)
        return torch.cat([x[:, : x.shape[1] - self.prev], e.to(x.dtype)], dim=1)


class _DropLastTokens(SlotFn):
    """block_out of the last block: remove the `n` appended prompt tokens."""

    keeps_class_row = True  # the prompts are appended after every image token

    def __init__(self, n: int):
        self.n = n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : x.shape[1] - self.n]


def _as_int_list(value, what: str, depth: int) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"NOAH {what} must be a list of {depth} ints (one per block), got {value!r}")
    vals = list(value)
    if len(vals) != depth:
        raise ValueError(f"NOAH {what} has {len(vals)} entries; the model has {depth} blocks (one entry per block)")
    for i, v in enumerate(vals):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"NOAH {what}[{i}] must be an int, got {v!r}")
        if v < 0:
            raise ValueError(f"NOAH {what}[{i}] = {v} is negative (0 disables the module in that block)")
    return vals


@dataclass
class NOAH(Method):
    """A NOAH subnet: per-block `adapter_dims`, `lora_ranks`, `prompt_lens` (each a list of length
    depth; None = all zero). `super_*` default to each list's max; pass the supernet size (100 in
    the official yamls) to load official supernet-sized checkpoints. `dropout` is on prompts and
    adapter (NOAH's drop_rate_prompt / drop_rate_adapter), `lora_dropout` on the LoRA input.

    `summary` counts the allocated (super-size) tensors; `live_param_count(info)` counts the leading
    slices that act (what the NOAH paper reports, without the dead model-level prompts).
    """

    adapter_dims: Sequence[int] | None = None
    lora_ranks: Sequence[int] | None = None
    prompt_lens: Sequence[int] | None = None
    super_adapter_dim: int | None = None
    super_lora_rank: int | None = None
    super_prompt_len: int | None = None
    dropout: float = 0.1
    lora_dropout: float = 0.1
    init: str = "official"

    name: ClassVar[str] = "NOAH"
    merge_refusal: ClassVar[str] = (
        "its adapter (QuickGELU bottleneck) and prompt tokens cannot be folded into the frozen "
        "weights (only its LoRA part could be)"
    )
    # NOAH contains an FFN adapter, a qkv LoRA and prompt tokens: it excludes Adapter/AdaptFormer,
    # LoRA, VPT (and Convpass/VQT, which need the plain token layout)
    claims: ClassVar[frozenset[str]] = frozenset({"noah"}) | Adapter.claims | LoRA.claims | VPT.claims

    # ---------------------------------------------------------------------------------------
    def _lists(self, depth: int) -> tuple[list[int], list[int], list[int]]:
        out = []
        for what in ("adapter_dims", "lora_ranks", "prompt_lens"):
            v = getattr(self, what)
            out.append([0] * depth if v is None else _as_int_list(v, what, depth))
        return tuple(out)  # type: ignore[return-value]

    def _supers(self, depth: int) -> tuple[int, int, int]:
        lists = self._lists(depth)
        sup = []
        for vals, what in zip(lists, ("super_adapter_dim", "super_lora_rank", "super_prompt_len")):
            s = getattr(self, what)
            sup.append(max(vals) if s is None else s)
        return tuple(sup)  # type: ignore[return-value]

    def validate(self, info: ViTInfo) -> None:
        lists = self._lists(info.depth)
        if not any(any(v) for v in lists):
            raise ValueError("NOAH: every adapter_dims / lora_ranks / prompt_lens entry is 0; nothing to inject")
        names = (("adapter_dims", "super_adapter_dim"), ("lora_ranks", "super_lora_rank"),
                 ("prompt_lens", "super_prompt_len"))
        for vals, (lname, sname) in zip(lists, names):
            s = getattr(self, sname)
            if s is None:
                continue
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"NOAH {sname} must be a non-negative int, got {s!r}")
            if max(vals) > s:
                i = max(range(len(vals)), key=vals.__getitem__)
                raise ValueError(f"NOAH {lname}[{i}] = {vals[i]} exceeds {sname} = {s}")
        sa, sr, _ = self._supers(info.depth)
        if sa > info.embed_dim:
            raise ValueError(f"NOAH adapter size {sa} is larger than the embedding width ({info.embed_dim})")
        if sr > info.embed_dim:
            raise ValueError(f"NOAH LoRA rank {sr} is larger than the embedding width ({info.embed_dim})")
        check_prob(self.dropout, "NOAH dropout")
        check_prob(self.lora_dropout, "NOAH lora_dropout")
        if self.init not in ("official", "written"):
            raise ValueError(f"NOAH init must be 'official' or 'written', got {self.init!r}")

    def live_param_count(self, info: ViTInfo) -> int:
        """Parameters in the slices that act: sum_l p_l D + r_l (D + 3 A) + [a_l > 0] (2 a_l D + a_l + D)."""
        ad, lr, pl = self._lists(info.depth)
        D, A = info.embed_dim, info.attn_dim
        return sum(p * D + r * (D + 3 * A) + ((2 * a * D + a + D) if a else 0) for a, r, p in zip(ad, lr, pl))

    # ---------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, info: ViTInfo, b: Builder) -> str:
        ad, lr, pl = self._lists(info.depth)
        sa, sr, sp = self._supers(info.depth)
        D = info.embed_dim
        extra = 0  # appended prompt tokens currently in the sequence
        for i, blk in enumerate(model.blocks):
            ref = blk.norm1.weight
            dd = {"device": ref.device, "dtype": ref.dtype}
            if sr > 0:
                la, lb = make_noah_lora(info, sr, init="official" if self.init == "official" else "lora")
                b.attach(f"blocks.{i}.attn.LoRA_a", la.to(**dd))
                b.attach(f"blocks.{i}.attn.LoRA_b", lb.to(**dd))
                if lr[i] > 0:
                    b.hook(f"blocks.{i}.attn.qkv", NoahLoRAHook(blk.attn, lr[i], self.lora_dropout))
            if sa > 0:
                init = "trunc_normal" if self.init == "official" else "xavier"
                adapter = SuperAdapter(D, sa, ad[i], self.dropout, "quick_gelu", init).to(**dd)
                b.attach(f"blocks.{i}.adapter", adapter)
                if ad[i] > 0:
                    b.slot(f"blocks.{i}", "ffn_out", AdapterAfterFFN(adapter))
            if sp > 0:
                tok = torch.empty(1, sp, D)
                nn.init.xavier_uniform_(tok)
                b.attach(f"blocks.{i}.visual_prompt_token", nn.Parameter(tok.to(**dd)))
                if pl[i] > 0:
                    prev = pl[i - 1] if i > 0 else 0
                    b.slot(f"blocks.{i}", "block_in", _AppendPrompts(blk, pl[i], prev, self.dropout))
                    extra += pl[i] - prev
        if extra:
            b.slot(f"blocks.{info.depth - 1}", "block_out", _DropLastTokens(extra))
        return (f"per block: prompts {list(pl)} (appended, super {sp}), LoRA ranks {list(lr)} on attn.qkv "
                f"(super {sr}), adapter dims {list(ad)} after the FFN (super {sa})")
