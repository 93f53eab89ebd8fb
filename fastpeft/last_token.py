"""`fastpeft.patch`: the last block computes the class token's row only, where that is all the
head reads (global_pool='token').

In a token-pooled ViT, `model(x)` reads one row of the last block's output. That row needs every
token's key and value (the class token attends over all of them), so the last block still runs
norm1 and qkv (with every method hook on them) over all tokens. But its attention is one query
row per head, and proj, the MLP and every method slot after the attention run on B rows
instead of B * N: ~10/12 of the last block's frozen GEMM FLOPs in forward and backward, ~6% of a
ViT-B/16 train step. The other rows' outputs have zero gradient in the reference, so the
gradients are the same sums without those zero terms; values match to fp32 rounding (a GEMM over B
rows may round differently from one over B * N), not bit for bit.

It applies only where the result cannot change otherwise: no random draws on the rows it drops
(dropout masks are drawn over every row; DropPath's per-sample mask is not), no method slot that
reads other rows after the attention (a block_out slot may only drop rows and keep the class
token's: `keeps_class_row`, VPT's prompt removal), and `model.forward` not already replaced (VQT does its own
class-token pass). `forward_features` is untouched: it still returns every token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .recompute import _draws_rng, timm_sdpa_attention


def cls_only_why_not(model: nn.Module) -> str | None:
    """None where the last block may run on the class token only; else why not."""
    from timm.layers import Mlp

    if getattr(model, "global_pool", None) != "token" or getattr(model, "attn_pool", None) is not None:
        return f"global_pool={getattr(model, 'global_pool', None)!r} reads every token"
    if "forward" in model.__dict__:
        return "model.forward is already replaced"
    blocks = getattr(model, "blocks", None)
    last = blocks[-1] if isinstance(blocks, nn.Sequential) and len(blocks) else None
    slots = getattr(last, "_fastpeft_slots", None)
    if slots is None or slots.get("block_fn"):
        return "the last block is not a fastpeft block with the standard dataflow"
    attn = last.attn
    if not timm_sdpa_attention(attn):
        return "the last block's attention is not timm's fused Attention"
    if type(last.mlp) is not Mlp:
        return "the last block's MLP is not timm's Mlp"
    if any(slots[s] for s in ("mlp_out", "ffn_out", "ffn_branch")) or not all(
        getattr(fn, "keeps_class_row", False) for fn in slots["block_out"]
    ):
        return "a method slot after the last block's attention (its draws / reads cover every token)"
    if any(fn.reads_norm for fn in slots["attn_branch"]):
        return "a method branch reads the last block's LayerNorm output over every token"
    if attn.attn_drop.p > 0 or any(_draws_rng(m) for m in (attn.proj, attn.proj_drop, attn.norm, last.norm2, last.mlp)):
        return "the last block draws random numbers (or runs method hooks) after its attention"
    return None


def cls_only_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block's class-token row: [B, N, D] -> [B, 1, D]. Same ops as the block's own
    forward, on fewer rows after the attention (see the module docstring)."""
    slots = block._fastpeft_slots
    for fn in slots["block_in"]:
        x = fn(x)
    attn = block.attn
    h = block.norm1(x)
    B, N, _ = h.shape
    H, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(h).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q[:, :, :1]), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v)
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, 1, H * d))))
    y = x[:, :1] + block.drop_path1(block.ls1(o))
    for fn in slots["attn_branch"]:  # (residual-stream branches: every row in, as drawn in the reference)
        y = y + fn(x, h)[:, :1]
    z = y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))
    for fn in slots["block_out"]:  # (only those that keep the class row: VPT's prompt removal)
        z = fn(z)
    return z


class ClsOnlyForward:
    """`model.forward` of a patched token-pooled model: the model's own forward, with its last
    block computing the class token's row only. Attention masks and torch.compile tracing take the
    full forward."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        model = self.model
        if attn_mask is not None or is_causal:
            return type(model).forward(model, x, attn_mask=attn_mask, is_causal=is_causal)
        if torch.compiler.is_compiling():
            return type(model).forward(model, x)
        last = model.blocks[-1]
        last.__dict__["_fastpeft_cls_only"] = True
        try:
            return type(model).forward(model, x)
        finally:
            last.__dict__.pop("_fastpeft_cls_only", None)
