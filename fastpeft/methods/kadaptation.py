"""KAdaptation (eric-ai-lab/PEViT, `vision_benchmark/evaluation/model.py`, `MultiheadAttention`),
adapted from CLIP's separate in-projection to a timm ViT's fused `attn.qkv`.

Official math (per layer, x = attention input = norm1 output, n = phm_dim = 32, D = n * m):

    A_i = phm_rule{1,2}_left[i] @ phm_rule{1,2}_right[i]       [n, n], rank 1, shared by all layers
    B_i = {q,v}_proj_adapter1_left[i] @ ..._right[i]            [m, m], rank `rank` (1), per layer
    H   = sum_i kron(A_i, B_i)                                  [D, D]   (used as x @ H)
    dq  = dropout_p(H_q) applied to x:  x @ drop(H_q) * scale + b,   scale = lora_alpha / lora_dim * 5
    dv  = x @ drop(H_v) * scale + b                                  (the same bias b for q and v)

Dropout (p=0.5) is on the *matrix* H (one fresh mask per branch and forward), following the owning
attention module's train/eval mode via `attn.kdropout` (an nn.Dropout, official name).

Name mapping (official -> here): `<transformer>.phm_rule{1,2}_{left,right}` -> top-level
`phm_rule{1,2}_{left,right}` ([n, n, 1] / [n, 1, n]); `<transformer>.resblocks.{i}.attn.{q,v}_proj_adapter1_{left,right}`
-> `blocks.{i}.attn.{q,v}_proj_adapter1_{left,right}` ([n, m, rank] / [n, rank, m]);
`...resblocks.{i}.attn.b` -> `blocks.{i}.attn.b` [D]. See `official_keys`.

Official quirks, reproduced behind flags:

* `init="official"`: the default `w_init="glorot-uniform"` branch *zeros* both per-layer factors, so
  H = 0, and the gradients of both factors and of the phm rules are zero forever: only `b` learns.
  A warning says so at inject. `init="trainable"` instead gives the left factors the
  glorot-uniform init (xavier_uniform, gain sqrt 2, per slice) and the right factors zeros, so H = 0
  at start but every factor receives gradient. phm rules: uniform(-0.01, 0.01) either way.
* `v_uses_q_factors=True`: the v branch builds H_v from phm_rule2 and the *q* factors (as in the
  revision the spec reads, be6fb43f, and 8c9ab983); the `v_proj_adapter1_*` tensors then exist but
  are unused. A later revision of the same file (285803cb) uses the v factors: `False`.
* `q_delta_after_scaling=True`: the official code adds dq to q *after* q was multiplied by
  1/sqrt(d_h); on the fused qkv output (before timm's scaling) that is dq * sqrt(d_h), which is
  what is added. (With qk_norm the delta then also passes through q_norm; CLIP has none.)

Not reproduced (deviation): the official code reshapes the (N, B, C) delta to (B*h, N, C/h) without
the transpose it uses for q, which mixes tokens, heads and batch items depending on the batch size;
here the delta is added in the correct (token, channel) layout. K is untouched, as in the official code.

Mergeable (eval, dropout off): W_qkv[q rows] += c * scale * H_q^T, b_qkv[q] += c * b,
W_qkv[v rows] += scale * H_v^T, b_qkv[v] += b (c = sqrt(d_h) or 1); needs a qkv bias.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import Builder, Method, OutputHook, ViTInfo, check_positive_int, check_prob

__all__ = ["KAdaptation", "kron_sum"]


def kron_sum(rule_left, rule_right, w_left, w_right) -> torch.Tensor:
    """H = sum_i kron(rule_left[i] @ rule_right[i], w_left[i] @ w_right[i]) -> [n*m, n*m]."""
    a = torch.bmm(rule_left, rule_right)  # [n, n, n]
    w = torch.bmm(w_left, w_right)  # [n, m, m]
    n, m = a.shape[1], w.shape[1]
    # kron(A, B)[a*m + k, c*m + p] = A[a, c] B[k, p], summed over the batch index
    return torch.einsum("iac,ikp->akcp", a, w).reshape(n * m, a.shape[2] * w.shape[2])


class _KAdaptHook(OutputHook):
    def __init__(self, root: nn.Module, attn: nn.Module, scale: float, q_mult: float, v_uses_q: bool):
        self.root = root
        self.attn = attn
        self.scale = scale
        self.q_mult = q_mult
        self.v_uses_q = v_uses_q

    def h(self, which: str) -> torch.Tensor:
        a, r = self.attn, self.root
        wl, wr = (a.q_proj_adapter1_left, a.q_proj_adapter1_right)
        if which == "v" and not self.v_uses_q:
            wl, wr = a.v_proj_adapter1_left, a.v_proj_adapter1_right
        if which == "q":
            return kron_sum(r.phm_rule1_left, r.phm_rule1_right, wl, wr)
        return kron_sum(r.phm_rule2_left, r.phm_rule2_right, wl, wr)

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        q, k, v = out.chunk(3, dim=-1)
        dq = torch.matmul(x, self.attn.kdropout(self.h("q"))) * self.scale + self.attn.b
        dv = torch.matmul(x, self.attn.kdropout(self.h("v"))) * self.scale + self.attn.b
        if self.q_mult != 1.0:
            dq = dq * self.q_mult
        return torch.cat([q + dq, k, v + dv], dim=-1)


@dataclass
class KAdaptation(Method):
    """Kronecker adaptation of q and v (see module docstring). Defaults are the official ones."""

    phm_dim: int = 32
    rank: int = 1
    lora_alpha: float = 128.0
    lora_dim: int = 4
    dropout: float = 0.5
    init: str = "official"
    v_uses_q_factors: bool = True
    q_delta_after_scaling: bool = True

    name: ClassVar[str] = "KAdaptation"
    mergeable: ClassVar[bool] = True

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.lora_dim * 5

    def validate(self, info: ViTInfo) -> None:
        check_positive_int(self.phm_dim, "KAdaptation phm_dim", info.embed_dim, "the embedding width")
        if info.embed_dim % self.phm_dim:
            raise ValueError(f"KAdaptation phm_dim={self.phm_dim} must divide embed_dim={info.embed_dim}")
        if info.attn_dim != info.embed_dim:
            raise ValueError(
                f"KAdaptation needs the attention width (num_heads*head_dim={info.attn_dim}) to equal embed_dim={info.embed_dim}"
            )
        check_positive_int(self.rank, "KAdaptation rank", info.embed_dim // self.phm_dim, "embed_dim // phm_dim")
        check_positive_int(self.lora_dim, "KAdaptation lora_dim")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise ValueError(f"KAdaptation lora_alpha must be a number, got {self.lora_alpha!r}")
        check_prob(self.dropout, "KAdaptation dropout")
        if self.init not in ("official", "trainable"):
            raise ValueError(f"KAdaptation init must be 'official' or 'trainable', got {self.init!r}")
        for f in ("v_uses_q_factors", "q_delta_after_scaling"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"KAdaptation {f} must be a bool, got {getattr(self, f)!r}")

    def _q_mult(self, info: ViTInfo) -> float:
        return math.sqrt(info.head_dim) if self.q_delta_after_scaling else 1.0

    def apply(self, model: nn.Module, info: ViTInfo, b: Builder) -> str:
        n, D, r = self.phm_dim, info.embed_dim, self.rank
        m = D // n
        ref = model.blocks[0].attn.qkv.weight
        dd = {"device": ref.device, "dtype": ref.dtype}
        # official order: the shared phm rules are created (in Transformer.__init__) before the layers
        for k in (1, 2):
            left = nn.Parameter(torch.empty(n, n, 1, **dd))
            right = nn.Parameter(torch.empty(n, 1, n, **dd))
            with torch.no_grad():
                left.uniform_(-0.01, 0.01)
                right.uniform_(-0.01, 0.01)
            b.attach(f"phm_rule{k}_left", left)
            b.attach(f"phm_rule{k}_right", right)
        for i, blk in enumerate(model.blocks):
            a = f"blocks.{i}.attn"
            tensors = {}
            for t in ("q", "v"):
                tensors[f"{t}_proj_adapter1_left"] = torch.zeros(n, m, r, **dd)
                tensors[f"{t}_proj_adapter1_right"] = torch.zeros(n, r, m, **dd)
            if self.init == "trainable":
                with torch.no_grad():
                    for t in ("q", "v"):
                        for j in range(n):  # glorot-uniform per slice (official glorot_uniform: gain sqrt 2)
                            nn.init.xavier_uniform_(tensors[f"{t}_proj_adapter1_left"][j], gain=math.sqrt(2))
            for name, t in tensors.items():
                b.attach(f"{a}.{name}", nn.Parameter(t))
            b.attach(f"{a}.b", nn.Parameter(torch.zeros(D, **dd)))
            b.attach(f"{a}.kdropout", nn.Dropout(self.dropout))
            b.hook(f"{a}.qkv", _KAdaptHook(model, blk.attn, self.scale, self._q_mult(info), self.v_uses_q_factors))
        if self.init == "official":
            warnings.warn(
                "KAdaptation(init='official') reproduces the official zero init of both per-layer Kronecker "
                "factors: H stays exactly 0 and the factors and phm rules never receive gradient, so only the "
                "bias `blocks.*.attn.b` can learn. Use init='trainable' for a Kronecker update that trains.",
                UserWarning,
                stacklevel=3,
            )
        return f"blocks.*.attn.qkv output (q, v): sum_i kron(A_i, B_i), phm_dim={n}, scale={self.scale:g}"

    def merged_tensors(self, model: nn.Module, info: ViTInfo) -> dict[str, torch.Tensor]:
        A = info.attn_dim
        c = self._q_mult(info)
        new: dict[str, torch.Tensor] = {}
        for i, blk in enumerate(model.blocks):
            qkv = blk.attn.qkv
            if qkv.bias is None:
                raise ValueError(
                    f"KAdaptation cannot merge into blocks.{i}.attn.qkv: it has no bias to absorb `blocks.{i}.attn.b`"
                )
            hook = _KAdaptHook(model, blk.attn, self.scale, c, self.v_uses_q_factors)
            w, bias = qkv.weight.clone(), qkv.bias.clone()
            bb = blk.attn.b
            w[:A] += (hook.h("q").t() * (self.scale * c)).to(w.dtype)
            bias[:A] += (bb * c).to(w.dtype)
            w[2 * A:] += (hook.h("v").t() * self.scale).to(w.dtype)
            bias[2 * A:] += bb.to(w.dtype)
            new[f"blocks.{i}.attn.qkv.weight"] = w
            new[f"blocks.{i}.attn.qkv.bias"] = bias
        return new

    def official_keys(self, info: ViTInfo) -> dict[str, str]:
        """Official CLIP-visual names (`visual.transformer...`) -> names in the timm model."""
        keys = {f"visual.transformer.phm_rule{k}_{s}": f"phm_rule{k}_{s}" for k in (1, 2) for s in ("left", "right")}
        for i in range(info.depth):
            for n in ("q_proj_adapter1_left", "q_proj_adapter1_right", "v_proj_adapter1_left",
                      "v_proj_adapter1_right", "b"):
                keys[f"visual.transformer.resblocks.{i}.attn.{n}"] = f"blocks.{i}.attn.{n}"
        return keys
