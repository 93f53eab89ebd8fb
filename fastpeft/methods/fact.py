"""FacT: Factor-Tuning (JieShibo/PETL-ViT `FacT/fact_tt.py`, `FacT/fact_tk.py`).

Every block has 12 "slices" of size D x D: W_q, W_k, W_v, W_o, the four D-row chunks of W_fc1 and
the four D-column chunks of W_fc2. Their increments share the model-level factors

    U = FacTu.weight [r, D]  (nn.Linear(D, r, bias=False), default init)
    V = FacTv.weight [D, r]  (nn.Linear(r, D, bias=False), zeros -> delta exactly 0 at start)

and a per-slice r x r core M (delta_slice(x) = s * V dp(M U x), dropout p on the rank-r vector,
right after the core; `attn.dp` / `mlp.dp` are nn.Dropout modules, as in the official code):

* TT: per block `attn.{q,k,v,proj}_FacTs` = nn.Linear(r, r) (M = weight), `mlp.fc1_FacTs` =
  nn.Linear(r, 4r) (weight [4r, r]: chunk p uses rows p*r..), `mlp.fc2_FacTs` = nn.Linear(4r, r)
  (weight [r, 4r]: chunk j uses columns j*r..). Default Linear init.
  Params: 2*D*r + depth*(4 r^2 + 8 r^2) (ViT-B: 1536 r + 144 r^2).
* TK: model-level `FacTp` [r, 12*depth] and `FacTc` [r, r, r] (both xavier_uniform). Block l uses
  C4 = FacTc @ FacTp[:, 12l:12l+4] (q, k, v, proj) and C8 = FacTc @ FacTp[:, 12l+4:12l+12]
  (mlp). Rank vectors are right-multiplied (u -> u @ C), so M_q = C4[:, :, 0].T etc. The MLP cores
  are the official reshapes, copied exactly: fc1 core F1 = C8[:, :, :4].reshape(r, 4r) applied as
  u @ F1 and then viewed (4, r); fc2 core F2 = C8[:, :, 4:].reshape(r, 4r) applied as w @ F2.T to
  the (4, r)-flattened input. Because reshape(r, 4r) puts column b*4+m while the activation uses
  p*r+q, chunk p of fc1 gets core columns p*r..p*r+r-1 of F1 -- an *interleaving* of the (b, m)
  slices. Params: 2*D*r + 12*depth*r + r^3 (ViT-B: 1680 r + r^3).

Hooks (forward hooks on the frozen layers, inputs as the official forward sees them):
attn.qkv (x = norm1 out), attn.proj (x = attention context), mlp.fc1 (x = norm2 out),
mlp.fc2 (x = activation out, viewed (4, D) per token).

Requires mlp_hidden == 4*embed_dim and attention width == embed_dim (the official tensorisation);
any depth and width otherwise. Merge (eval): exact, per slice, respecting the TK interleave.
Official checkpoints (only `FacT*` and `head.*` keys) load with `load_state_dict(strict=False)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import Builder, Method, OutputHook, ViTInfo, check_positive_int, check_prob

__all__ = ["FacT", "fact_cores", "fact_tk_core", "fact_tk_cores"]


def fact_cores(model: nn.Module, kind: str, i: int) -> dict[str, torch.Tensor]:
    """The effective cores of block i as matrices acting on column vectors (delta = s V M U x):

    q, k, v, proj: [r, r]; fc1: [4r, r] (rows p*r.. for output chunk p); fc2: [r, 4r]
    (columns j*r.. for input chunk j).
    """
    blk = model.blocks[i]
    if kind == "tt":
        a, m = blk.attn, blk.mlp
        return {"q": a.q_FacTs.weight, "k": a.k_FacTs.weight, "v": a.v_FacTs.weight,
                "proj": a.proj_FacTs.weight, "fc1": m.fc1_FacTs.weight, "fc2": m.fc2_FacTs.weight}
    return fact_tk_cores(model.FacTc, model.FacTp, i)


def fact_tk_cores(fact_c: torch.Tensor, fact_p: torch.Tensor, i: int) -> dict[str, torch.Tensor]:
    """FacT-TK's cores of block i (as `fact_cores`) from FacTc [r, r, r] and FacTp [r, 12 L]."""
    r = fact_c.shape[0]
    c4 = fact_c @ fact_p[:, 12 * i:12 * i + 4]  # [r, r, 4]
    c8 = fact_c @ fact_p[:, 12 * i + 4:12 * i + 12]  # [r, r, 8]
    f1 = c8[:, :, :4].reshape(r, 4 * r)  # official reshape (column b*4 + m)
    f2 = c8[:, :, 4:].reshape(r, 4 * r)
    return {"q": c4[:, :, 0].t(), "k": c4[:, :, 1].t(), "v": c4[:, :, 2].t(), "proj": c4[:, :, 3].t(),
            "fc1": f1.t(), "fc2": f2}


def fact_tk_core(fact_c: torch.Tensor, fact_p: torch.Tensor, i: int, layer: str) -> torch.Tensor:
    """The one core matrix of block i's `layer` that a fused FacT-TK call reads, with the same values
    as `fact_tk_cores` (the same products, only the one that layer needs): q, k, v stacked as one
    [3r, r] for "qkv" (rows j*r.. are q, k, v), else the layer's core of `fact_tk_cores`."""
    r = fact_c.shape[0]
    if layer in ("qkv", "proj"):
        c4 = fact_c @ fact_p[:, 12 * i:12 * i + 4]  # [r, r, 4]
        if layer == "proj":
            return c4[:, :, 3].t()
        return c4[:, :, :3].permute(2, 1, 0).reshape(3 * r, r)  # cat(c4[:, :, j].t() for j < 3)
    c8 = fact_c @ fact_p[:, 12 * i + 4:12 * i + 12]  # [r, r, 8]
    if layer == "fc1":
        return c8[:, :, :4].reshape(r, 4 * r).t()
    return c8[:, :, 4:].reshape(r, 4 * r)


class _FacTHook(OutputHook):
    """One hook per frozen layer; `root` is the VisionTransformer owning FacTu/FacTv (and FacTp/c)."""

    def __init__(self, root: nn.Module, block: nn.Module, i: int, layer: str, kind: str, scale: float):
        self.root = root
        self.block = block
        self.i = i
        self.layer = layer  # "qkv" | "proj" | "fc1" | "fc2"
        self.kind = kind
        self.scale = scale

    def _core(self, name: str) -> torch.Tensor:
        if self.kind == "tt":
            owner = self.block.mlp if name in ("fc1", "fc2") else self.block.attn
            return getattr(owner, f"{name}_FacTs").weight
        return fact_cores(self.root, "tk", self.i)[name]

    additive = True
    #: U, the core and V act on each token's row; `attn.dp` / `mlp.dp` are nn.Dropout on [..., N, r]
    class_row_local = True

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + self.delta(x)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        U, V, s = self.root.FacTu, self.root.FacTv, self.scale
        if self.layer == "qkv":
            if self.kind == "tt":
                cores = [self.block.attn.q_FacTs.weight, self.block.attn.k_FacTs.weight, self.block.attn.v_FacTs.weight]
            else:
                c = fact_cores(self.root, "tk", self.i)
                cores = [c["q"], c["k"], c["v"]]
            t = self.block.attn.dp(nn.functional.linear(U(x), torch.cat(cores, 0)))  # [..., 3r]
            d = V(t.unflatten(-1, (3, -1))).flatten(-2)  # [q | k | v], each D
            return d * s
        if self.layer == "proj":
            t = self.block.attn.dp(nn.functional.linear(U(x), self._core("proj")))
            return V(t) * s
        if self.layer == "fc1":
            t = self.block.mlp.dp(nn.functional.linear(U(x), self._core("fc1")))  # [..., 4r]
            return V(t.unflatten(-1, (4, -1))).flatten(-2) * s  # chunk p -> outputs p*D..
        # fc2: input chunks of D -> U each -> flattened 4r (index j*r + a) -> core -> V
        w = U(x.unflatten(-1, (4, -1))).flatten(-2)
        t = self.block.mlp.dp(nn.functional.linear(w, self._core("fc2")))
        return V(t) * s


@dataclass
class FacT(Method):
    """FacT-TT (`kind="tt"`) or FacT-TK (`kind="tk"`) with rank r, scale s, dropout p on the core output."""

    kind: str = "tt"
    rank: int = 8
    scale: float = 1.0
    dropout: float = 0.1

    name: ClassVar[str] = "FacT"
    mergeable: ClassVar[bool] = True

    def validate(self, info: ViTInfo) -> None:
        if self.kind not in ("tt", "tk"):
            raise ValueError(f"FacT kind must be 'tt' or 'tk', got {self.kind!r}")
        check_positive_int(self.rank, "FacT rank", info.embed_dim, "the embedding width")
        check_prob(self.dropout, "FacT dropout")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"FacT scale must be a number, got {self.scale!r}")
        if info.mlp_hidden != 4 * info.embed_dim:
            raise ValueError(
                f"FacT needs mlp_hidden == 4*embed_dim (its tensorisation cuts fc1/fc2 into 4 DxD slices); "
                f"this model has mlp_hidden={info.mlp_hidden}, embed_dim={info.embed_dim}"
            )
        if info.attn_dim != info.embed_dim:
            raise ValueError(
                f"FacT needs the attention width (num_heads*head_dim={info.attn_dim}) to equal embed_dim={info.embed_dim}"
            )

    def apply(self, model: nn.Module, info: ViTInfo, b: Builder) -> str:
        D, r = info.embed_dim, self.rank
        ref = model.blocks[0].attn.qkv.weight
        dd = {"device": ref.device, "dtype": ref.dtype}
        # creation/initialisation order follows the official set_FacT (same RNG stream)
        u = nn.Linear(D, r, bias=False, **dd)
        v = nn.Linear(r, D, bias=False, **dd)
        if self.kind == "tk":
            p = nn.Parameter(torch.zeros(r, 12 * info.depth, **dd))
            c = nn.Parameter(torch.zeros(r, r, r, **dd))
        with torch.no_grad():
            nn.init.zeros_(v.weight)
            if self.kind == "tk":
                nn.init.xavier_uniform_(c)
                nn.init.xavier_uniform_(p)
        b.attach("FacTu", u)
        b.attach("FacTv", v)
        if self.kind == "tk":
            b.attach("FacTp", p)
            b.attach("FacTc", c)
        for i, blk in enumerate(model.blocks):
            a = f"blocks.{i}.attn"
            m = f"blocks.{i}.mlp"
            if self.kind == "tt":
                for n in ("q", "k", "v", "proj"):
                    b.attach(f"{a}.{n}_FacTs", nn.Linear(r, r, bias=False, **dd))
            b.attach(f"{a}.dp", nn.Dropout(self.dropout))
            if self.kind == "tt":
                b.attach(f"{m}.fc1_FacTs", nn.Linear(r, 4 * r, bias=False, **dd))
                b.attach(f"{m}.fc2_FacTs", nn.Linear(4 * r, r, bias=False, **dd))
            b.attach(f"{m}.dp", nn.Dropout(self.dropout))
            for layer, path in (("qkv", f"{a}.qkv"), ("proj", f"{a}.proj"), ("fc1", f"{m}.fc1"), ("fc2", f"{m}.fc2")):
                b.hook(path, _FacTHook(model, blk, i, layer, self.kind, self.scale))
        return f"FacT-{self.kind.upper()} r={r}: blocks.*.attn.{{qkv,proj}}, blocks.*.mlp.{{fc1,fc2}} outputs"

    def merged_tensors(self, model: nn.Module, info: ViTInfo) -> dict[str, torch.Tensor]:
        U, V, s, D = model.FacTu.weight, model.FacTv.weight, self.scale, info.embed_dim
        new: dict[str, torch.Tensor] = {}
        for i, blk in enumerate(model.blocks):
            c = fact_cores(model, self.kind, i)
            dqkv = torch.cat([V @ c[n] @ U for n in ("q", "k", "v")], 0)
            dproj = V @ c["proj"] @ U
            d1 = (V @ c["fc1"].unflatten(0, (4, -1)) @ U).reshape(4 * D, D)  # row chunk p
            d2 = (V @ c["fc2"]).unflatten(1, (4, -1)).transpose(0, 1) @ U  # [4, D, D]: column chunk j
            d2 = d2.transpose(0, 1).reshape(D, 4 * D)
            for name, w, d in (("attn.qkv", blk.attn.qkv.weight, dqkv), ("attn.proj", blk.attn.proj.weight, dproj),
                               ("mlp.fc1", blk.mlp.fc1.weight, d1), ("mlp.fc2", blk.mlp.fc2.weight, d2)):
                new[f"blocks.{i}.{name}.weight"] = w + (d * s).to(w.dtype)
        return new
