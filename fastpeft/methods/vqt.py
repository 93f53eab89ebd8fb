"""VQT — Visual Query Tuning: learnable query tokens per layer that read the frozen ViT's
intermediate features, and a linear head on the concatenation of their outputs.

Official code: andytu28/VQT `src/models/vit_backbones/h2t_vit.py` (Head2ToeEncoder /
Head2ToeBlock / Head2ToeAttention), `timm_h2t_vit.py` (the timm twin), `src/models/build_h2t_model.py`
(head). 
Per block l, with q_l = Dropout(query_prompt_embeddings[l]) expanded to the batch:

    t   = [q_l ; x_l]                                 queries *prepended*, T = Q + N tokens
    h   = LN1(t)
    Qh, Kh, Vh = split(W_qkv h + b)                   Q for all T tokens ...
    K, V = Kh[:, Q:], Vh[:, Q:]                        ... K and V only from the N original tokens
    a   = proj(norm(softmax(Qh K^T / sqrt(d)) V))     (q_norm/k_norm, attn.norm, gate, dropouts:
    t   = t + DP1(ls1(a))                              the frozen block's own modules)
    t   = t + DP2(ls2(MLP(LN2 t)))
    query_out_l = t[:, :Q];  x_{l+1} = t[:, Q:]

The original tokens never see the queries (no key/value rows for them), so x_{l+1} is the frozen
model's hidden state — bit for bit on CPU, see tests/methods/test_vqt.py. Queries cannot attend to
each other or to themselves. The block runs on the concatenation, as the official code does: this
is the memory-hungry *reference* (autograd saves every activation of the concatenated block and
back-propagates through the whole backbone, ~619 MiB for ViT-B/16 batch 8, Q=1); a fused path
that keeps only K/V and the query rows is measured against it.

Head (`combine_method='concat'`, NORMALIZE_FEATS=True):

    feats = [ L2norm(pooled) , L2norm(flatten(query_out_1)) , ... , L2norm(flatten(query_out_L)) ]
    logits = head(head_drop(feats)),   head = Linear(D * (1 + L*Q), C)

`pooled` is timm's pooled feature: for the default `global_pool='token'` with a CLS token that is
the CLS token after the final norm, exactly the official feature; with `global_pool='avg'` (or no
CLS token, or attention pooling) it is whatever timm pools (`model.pool` then `model.fc_norm`).
Query outputs do not go through the final norm. `head_drop` is timm's (Identity unless the model was
created with drop_rate > 0; the official head has no dropout).

Parameters and names: `query_prompt_embeddings [L, Q, D]` at model level (official:
`enc.transformer.encoder.query_prompt_embeddings`), init uniform(-v, v) with
v = sqrt(6 / (3 * patch_h * patch_w + D)) (0.0625 for ViT-B/16); `head.weight [C, D(1+LQ)]`,
`head.bias [C]` (official `head.last_layer.*`): kaiming_normal(fan_out) and bias -log(99) (VPT's
"special bias", prior 0.01) with head_bias_init="vpt", or 0 with "zero".

Mode: the block's dropout / drop-path modules follow the model's train/eval mode (the official
encoder keeps its blocks in eval during training: create the timm model with the default
drop_path_rate=0 to match). Query dropout follows the model's mode.

How it attaches: every block gets a `block_fn` slot (the whole block forward is replaced by
`vqt_block_ref`, which calls the block's own modules, so output hooks of other methods on
`attn.qkv`, `mlp.fc1`, ... still fire); `model.head` is replaced (the original head object comes
back on `fastpeft.remove`); `model.forward_head` is replaced by an instance attribute that builds
the features above. Query outputs travel from the blocks to `forward_head` in a per-forward buffer
(one forward at a time per model; calling `forward_features` alone leaves them there until the next
forward). Timm's `set_grad_checkpointing` is not supported with VQT (nothing to gain: the queries
never need the backbone's backward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..block import NO_SLOTS, BlockRun
from .base import Builder, Method, SlotFn, ViTInfo, check_positive_int, check_prob, dropout

__all__ = ["VQT", "vqt_attention_ref", "vqt_block_ref", "vqt_features"]


# --------------------------------------------------------------------------------------------
# Reference math (plain torch on the frozen block's own modules)
# --------------------------------------------------------------------------------------------

def vqt_attention_ref(attn: nn.Module, h: torch.Tensor, num_queries: int) -> torch.Tensor:
    """timm `Attention.forward` with keys and values taken only from the last T - Q tokens.

    attn: a timm `Attention`; h: [B, T, D] (already LN1-normalised), the first `num_queries`
    tokens being the query tokens. Returns [B, T, D]. Uses the module's own qkv / q_norm / k_norm /
    attention core (SDPA when `attn.fused_attn`, else the explicit softmax) / norm / gate / proj,
    so the rows of the original tokens are computed exactly as the frozen model computes them.
    """
    B, T, _ = h.shape
    Q = num_queries
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(h).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    k, v = k[:, :, Q:], v[:, :, Q:]  # official: qkv[1][:, :, query_prompt_len:]
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1)
        a = attn.attn_drop(a.softmax(dim=-1))
        o = a @ v
    o = o.transpose(1, 2).reshape(B, T, attn.num_heads * attn.head_dim)
    o = attn.norm(o)
    if gate is not None:
        o = o * gate
    return attn.proj_drop(attn.proj(o))


class _QueryAttentionRun(BlockRun):
    """The block's own order (fastpeft/block.py) with no slots and `vqt_attention_ref` as the
    attention: the official Head2ToeBlock."""

    def __init__(self, num_queries: int):
        self.num_queries = num_queries

    def slots(self, block):
        return NO_SLOTS

    def attention(self, block, x, h, kw):
        return vqt_attention_ref(block.attn, h, self.num_queries)


def vqt_block_ref(block: nn.Module, t: torch.Tensor, num_queries: int) -> torch.Tensor:
    """The official `Head2ToeBlock` on a timm `Block`: t = [queries ; tokens], [B, Q + N, D] ->
    [B, Q + N, D]; queries pass LN1, attention-as-query, residual, LN2, MLP, residual."""
    return _QueryAttentionRun(num_queries).forward(block, t, {})


def vqt_features(pooled: torch.Tensor, query_outputs: list[torch.Tensor]) -> torch.Tensor:
    """concat[L2norm(pooled), L2norm(flatten(q_1)), ..., L2norm(flatten(q_L))]: [B, D(1 + L*Q)]."""
    pieces = [pooled] + [q.flatten(1) for q in query_outputs]
    return torch.cat([F.normalize(p, dim=1) for p in pieces], dim=1)


# --------------------------------------------------------------------------------------------
# Attachment
# --------------------------------------------------------------------------------------------

class _QueryOutputs:
    """Per-forward buffer: the blocks append their query outputs, `forward_head` takes them.
    Never copied or pickled with contents (they are non-leaf tensors of one forward)."""

    def __init__(self) -> None:
        self.items: list[torch.Tensor] | None = None

    def __deepcopy__(self, memo) -> "_QueryOutputs":
        return _QueryOutputs()

    def __getstate__(self) -> dict:
        return {"items": None}


class _VQTBlock(SlotFn):
    """`block_fn` of block `layer`: prepend the queries, run `vqt_block_ref`, keep the query rows."""

    def __init__(self, model: nn.Module, layer: int, num_queries: int, p: float, outputs: _QueryOutputs):
        self.model = model  # owns `query_prompt_embeddings`
        self.layer = layer
        self.num_queries = num_queries
        self.p = p
        self.outputs = outputs

    def __call__(self, block: nn.Module, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("VQT does not support attention masks (the official code has none)")
        if self.layer == 0:
            self.outputs.items = []
        elif self.outputs.items is None or len(self.outputs.items) != self.layer:
            raise RuntimeError("VQT blocks must run in order from block 0 within one forward")
        Q = self.num_queries
        q = self.model.query_prompt_embeddings[self.layer].to(dtype=x.dtype)
        q = dropout(q.expand(x.shape[0], -1, -1), self.p, self.model)
        t = vqt_block_ref(block, torch.cat([q, x], dim=1), Q)
        self.outputs.items.append(t[:, :Q])
        return t[:, Q:]


class _VQTForwardHead:
    """Replaces `model.forward_head(x, pre_logits=False)`; x is `forward_features`' output."""

    def __init__(self, model: nn.Module, outputs: _QueryOutputs, depth: int):
        self.model = model
        self.outputs = outputs
        self.depth = depth
        #: (pooled, query outputs) -> features; the fused head (fastpeft/fused/vqt.py) swaps in its op
        self.features = vqt_features

    def __call__(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        m = self.model
        items, self.outputs.items = self.outputs.items, None
        if items is None or len(items) != self.depth:
            raise RuntimeError(
                "VQT: forward_head needs the query outputs of every block from the same forward; "
                "call the model (or forward_features then forward_head) once per batch"
            )
        feats = self.features(m.fc_norm(m.pool(x)), items)
        feats = m.head_drop(feats)
        return feats if pre_logits else m.head(feats)


@dataclass
class VQT(Method):
    """Visual Query Tuning: `num_queries` query tokens per layer (dropout `dropout`), a linear head
    on [CLS, all query outputs] (head bias -log(99) with head_bias_init="vpt", 0 with "zero")."""

    num_queries: int = 1
    dropout: float = 0.1
    head_bias_init: str = "vpt"

    name: ClassVar[str] = "VQT"
    merge_refusal: ClassVar[str] = (
        "its query tokens add rows to every block and its head reads their outputs; nothing folds "
        "into the frozen weights"
    )
    # VQT replaces every block's forward and the head: it cannot share blocks with token methods
    # (VPT: "prompt_tokens", "token_layout"; Convpass: "token_layout") or FFN adapters (AdaptFormer,
    # Adapter, NOAH: "ffn_adapter"); "block_fn" and "head" for any other method replacing them.
    claims: ClassVar[frozenset[str]] = frozenset({"block_fn", "token_layout", "prompt_tokens", "ffn_adapter", "head"})

    def validate(self, info: ViTInfo) -> None:
        check_positive_int(self.num_queries, "VQT num_queries")
        check_prob(self.dropout, "VQT dropout")
        if self.head_bias_init not in ("vpt", "zero"):
            raise ValueError(f"VQT head_bias_init must be 'vpt' or 'zero', got {self.head_bias_init!r}")
        if info.distilled:
            raise ValueError(
                "VQT replaces the classifier head with one on [CLS, query outputs]; a distilled model's "
                "second head (head_dist, on the distillation token) has no place in it: use a "
                "non-distilled ViT/DeiT for VQT"
            )
        if info.num_classes <= 0:
            raise ValueError(
                "VQT trains a new linear head on the query features: create the model with "
                "num_classes > 0 (got a model without a classifier head)"
            )

    def apply(self, model: nn.Module, info: ViTInfo, b: Builder) -> str:
        ref = model.blocks[0].norm1.weight  # build on the backbone's device and dtype
        dd = {"device": ref.device, "dtype": ref.dtype}
        D, L, Q = info.embed_dim, info.depth, self.num_queries

        queries = nn.Parameter(torch.empty(L, Q, D, **dd))
        val = math.sqrt(6.0 / float(3 * info.patch_size[0] * info.patch_size[1] + D))
        with torch.no_grad():
            nn.init.uniform_(queries, -val, val)
        b.attach("query_prompt_embeddings", queries)

        head = nn.Linear(D * (1 + L * Q), info.num_classes, **dd)
        with torch.no_grad():
            nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
            nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01) if self.head_bias_init == "vpt" else 0.0)
        b.replace("head", head)

        outputs = _QueryOutputs()
        for i in range(L):
            b.slot(f"blocks.{i}", "block_fn", _VQTBlock(model, i, Q, float(self.dropout), outputs))
        b.replace("forward_head", _VQTForwardHead(model, outputs, L))
        return f"{Q} queries before every block (K/V: original tokens); head on {D * (1 + L * Q)} features"

    def official_keys(self, info: ViTInfo) -> dict[str, str]:
        return {
            "enc.transformer.encoder.query_prompt_embeddings": "query_prompt_embeddings",
            "head.last_layer.weight": "head.weight",
            "head.last_layer.bias": "head.bias",
        }
