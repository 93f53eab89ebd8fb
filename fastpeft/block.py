"""The order of a ViT block, written once.

timm's pre-LN `Block.forward`, with the places where PETL methods attach spelled out as named
slots (fastpeft/methods/base.py `PetlBlock`):

    x  <- block_in(x)                                   prompts in
    h  =  norm1(x)
    y  =  x + drop_path1(ls1(attn(h)))  + attn_branch(x, h) ...
    y  <- mlp_in(y)                                     serial adapters before the MLP
    h2 =  norm2(y)
    m  =  mlp_out(mlp(h2))
    z  =  y + ffn_out(drop_path2(ls2(m)))  + ffn_branch(y, h2) ...
    z  <- block_out(z)                                  prompts out

`BlockRun` runs exactly that; every other way fastpeft runs a block is a `BlockRun` that changes
pieces, never the order:

* `patch(recompute=True)` (fastpeft/recompute.py `RecomputeRun`): the attention and MLP pieces,
  and the branches, run as checkpointed regions;
* the class-row pass (fastpeft/class_row.py `ClassRowRun`): everything after the attention's
  keys and values runs on the class token's row only;
* VQT (fastpeft/methods/vqt.py, fastpeft/fused/vqt.py): query tokens through the block's own
  modules with a query-only attention and no slots.

Each piece is a method so a run overrides only what it changes; the slot loops and the residual
sums live in `attn_half` / `mlp_half` alone.
"""
from __future__ import annotations

import functools
from contextvars import ContextVar
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals

_compiling = torch.compiler.is_compiling

__all__ = ["SLOTS", "NO_SLOTS", "BlockRun", "STANDARD", "CLASS_ROW_PASS", "in_class_row_pass", "vmapped",
           "replaced_dataflow", "timm_sdpa_attention", "plain_layer_norm", "forward_hooked"]

#: slot name -> call signature and where it sits in the block (see the module docstring)
SLOTS: dict[str, str] = {
    "block_in": "x -> x                 before norm1 (prompt insertion / replacement)",
    "attn_branch": "(x, h) -> delta     added to the attention residual, h = norm1(x) (Convpass)",
    "mlp_in": "y -> y                   before norm2, on the residual stream (ST-Adapter's pre-MLP adapter)",
    "mlp_out": "(m) -> m                on the raw MLP output, before ls2 and DropPath (VPT adapter)",
    "ffn_out": "(f) -> f                on the drop-pathed FFN output (serial adapters)",
    "ffn_branch": "(y, h2) -> delta     added to the block output; y = residual stream, h2 = norm2(y)",
    "block_out": "x -> x                after the block (prompt removal)",
    "block_fn": "(block, x, attn_mask, is_causal) -> x   replaces the whole block forward (VQT); "
                "when set it is the block's only slot entry",
}

#: the slots of a block run without any method entries (VQT's query rows)
NO_SLOTS: dict[str, tuple] = {name: () for name in SLOTS}

#: set while a token-pooled model's last block computes the class token's row only
#: (fastpeft/class_row.py); slot callables with a class-row path of their own read it
CLASS_ROW_PASS: ContextVar[bool] = ContextVar("fastpeft_class_row_pass", default=False)


def in_class_row_pass() -> bool:
    return CLASS_ROW_PASS.get()


def vmapped(t: torch.Tensor) -> bool:
    """Whether `t` is batched by `torch.func.vmap`: in a mixed multi-task batch (fastpeft/multitask.py
    runs the model once under vmap over its rows, every method tensor being the row's task's) or
    under a user's own vmap. Fused modules then run their per-row form (fastpeft/ops/_rows.py) or
    the reference, which vmap batches as it is (their autograd.Functions have no batching rule)."""
    return torch._C._functorch.is_batchedtensor(t)


def replaced_dataflow(block: Any) -> bool:
    """Whether a method replaced the block's whole forward (a `block_fn` slot entry): then no
    `BlockRun` applies to it."""
    slots = getattr(block, "_fastpeft_slots", None)
    return bool(slots and slots.get("block_fn"))


def timm_sdpa_attention(attn: nn.Module) -> bool:
    """Whether `attn` is timm's Attention on its fused (SDPA) path without an output gate, with the
    forward fastpeft's copies of it were written from (`copied_forward`): the dataflow the patched
    run's `attention_forward`, recompute's lean attention and `_plain_half` and the class-row pass
    (fastpeft/class_row.py) rely on."""
    return (type(attn) is _timm_classes()[0] and getattr(attn, "fused_attn", False) and getattr(attn, "gate", None) is None
            and copied_forward(type(attn)))


def timm_mlp(mlp: nn.Module) -> bool:
    """Whether `mlp` is timm's Mlp with the forward fastpeft's copies of it were written from
    (`copied_forward`): fc1, act, drop1, norm, fc2, drop2 in that order."""
    return type(mlp) is _timm_classes()[1] and copied_forward(type(mlp))


@functools.cache
def _plain_norms() -> tuple[type, ...]:
    from timm.layers import LayerNorm

    return (nn.LayerNorm, LayerNorm)


def plain_layer_norm(norm: nn.Module) -> bool:
    """Whether `norm`'s forward is exactly F.layer_norm(x, normalized_shape, weight, bias, eps):
    torch's LayerNorm, or timm's off its fast-norm path."""
    return type(norm) in _plain_norms() and not getattr(norm, "_fast_norm", False)


@functools.cache
def _timm_classes() -> tuple[type, type, type]:
    """(Attention, Mlp, DropPath), imported from timm on first use."""
    from timm.layers import Attention, DropPath, Mlp

    return Attention, Mlp, DropPath


#: sha256 of the sources of the timm forwards that `attention_forward` and `mlp_forward` copy
#: (timm 1.0.31's Attention.forward, Mlp.forward); another timm's modules are called instead
COPIED_FORWARDS = frozenset({
    "37a80e0fdf45af9ca19ee07f1a176731d56a5f2028f2b19991578f58d0a3698a",
    "6dade48223cfc2483a5a49541d8769c213e393681753faabaa8bbc89f953add0",
})


@torch.compiler.assume_constant_result
def copied_forward(cls: type) -> bool:
    """Whether `cls.forward` is the timm source that fastpeft's inline copy of it was written from
    (`COPIED_FORWARDS`): checked once per class (a constant to torch.compile's tracing, which
    cannot read sources)."""
    return _copied_forward(cls)


@functools.cache
def _copied_forward(cls: type) -> bool:
    import hashlib
    import inspect

    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return hashlib.sha256(src.encode()).hexdigest() in COPIED_FORWARDS


def called_for_more(m: nn.Module) -> bool:
    """Whether calling `m` runs more than its class's forward: a hook of its own (forward or
    backward, pre or post), a global module hook, or a `forward` replaced on the instance."""
    g = _module_globals
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__ or g._global_forward_hooks or g._global_forward_pre_hooks
                or g._global_backward_hooks or g._global_backward_pre_hooks)


def through(mod: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """`mod.<name>(t)`, where that submodule passes t through and nothing else sees the call
    (`called_for_more`): t itself, without the module call. The pass-through modules: nn.Identity,
    and nn.Dropout and timm's DropPath at rate 0 or out of training (F.dropout and drop_path
    return their input then, drawing nothing). What a patched block's run does with timm's no-op
    slots. Under torch.compile the module is called (the trace sees the reference's calls; it
    drops the no-ops itself)."""
    m = mod._modules[name]
    cls = type(m)
    if cls is nn.Identity:
        noop = True
    elif cls is nn.Dropout:
        noop = not (m.training and m.p)
    else:
        noop = cls is _timm_classes()[2] and not (m.training and m.drop_prob)
    if not noop or _compiling() or called_for_more(m):
        return m(t)
    return t


def split_heads(attn: nn.Module, qkv: torch.Tensor):
    """q, k, v [B, H, N, d] each from timm Attention's qkv output [B, N, 3 H d]: the views its
    forward makes (same shapes and strides). Where autograd records them, they are split on the
    qkv axis before the head axis moves, so that backward stacks the three gradients straight
    into the qkv layout [B, N, 3, H, d] (one op), where timm's permute-then-unbind stacks them
    [3, B, H, N, d] and then copies that into the qkv layout; without a graph, timm's order (two
    view ops fewer)."""
    B, N, _ = qkv.shape
    qkv = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim)
    if not (qkv.requires_grad and torch.is_grad_enabled()):
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k, v = qkv.unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def forward_hooked(modules) -> bool:
    """Whether a forward hook would see any of `modules` run: a hook of its own (a user's,
    registered after patch) or a global one. Fused paths that compute the modules' ops without
    calling them check this per call."""
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class BlockRun:
    """Runs one block in the order of the module docstring. Subclasses override pieces:

    `slots(block)`            the slot entries to run (NO_SLOTS: none);
    `mlp_in(block, y)`        the mlp_in slots;
    `norm(block, i, x)`       norm1 / norm2 (i = 1, 2); None when the next piece normalises itself;
    `branches_first(block, half)`  compute the branch deltas before the frozen path (same sum order);
    `attention(block, x, h, kw)`   the attention output [B, rows, D] (h may be None: norm1(x));
    `rows(t)`                 the token rows that continue after the attention (all, or the class row);
    `mlp(block, y, h2)`       mlp_out(mlp(h2)) (h2 may be None: norm2(y));
    `branch(fn, x, h)`        one branch delta;
    `block_out(block, z)`     the block_out slots.
    """

    def __call__(self, block, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 is_causal: bool = False) -> torch.Tensor:
        kw = {"attn_mask": attn_mask, "is_causal": is_causal} if attn_mask is not None or is_causal else {}
        return self.forward(block, x, kw)

    def forward(self, block, x: torch.Tensor, kw: dict) -> torch.Tensor:
        return self.mlp_half(block, self.attn_half(block, x, kw))

    # ---- the order -----------------------------------------------------------------------

    def attn_half(self, block, x: torch.Tensor, kw: dict) -> torch.Tensor:
        slots = self.slots(block)
        for fn in slots["block_in"]:
            x = fn(x)
        h = self.norm(block, 1, x)
        branches = slots["attn_branch"]
        deltas = [self.branch(fn, x, h) for fn in branches] if branches and self.branches_first(block, "attn") else None
        a = self.attention(block, x, h, kw)
        x = self.rows(x)
        if deltas is None and branches:  # (h is read after the attention by the branches alone)
            h = self.rows(h)
        call = self.call
        y = x + call(block, "drop_path1", call(block, "ls1", a))
        for d in deltas if deltas is not None else (self.branch(fn, x, h) for fn in branches):
            y = y + d
        return y

    def mlp_half(self, block, y: torch.Tensor) -> torch.Tensor:
        slots = self.slots(block)
        y = self.mlp_in(block, y)
        h2 = self.norm(block, 2, y)
        branches = slots["ffn_branch"]
        deltas = [self.branch(fn, y, h2) for fn in branches] if branches and self.branches_first(block, "mlp") else None
        m = self.mlp(block, y, h2)
        call = self.call
        f = call(block, "drop_path2", call(block, "ls2", m))
        for fn in slots["ffn_out"]:
            f = fn(f)
        z = y + f
        for d in deltas if deltas is not None else (self.branch(fn, y, h2) for fn in branches):
            z = z + d
        return self.block_out(block, z)

    # ---- the pieces (the reference's) -------------------------------------------------------

    #: whether every module of the block is called, as timm's Block.forward calls them (the
    #: reference's run); a patched block's run leaves out the calls of pass-through modules
    #: (`through`) and runs timm's Attention / Mlp forward itself (`attention_forward`, `mlp_forward`)
    calls_all = True

    def call(self, mod: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
        """`mod.<name>(t)`, or `through` it in a patched run."""
        return mod._modules[name](t) if self.calls_all else through(mod, name, t)

    def slots(self, block) -> dict:
        return block._fastpeft_slots

    def mlp_in(self, block, y: torch.Tensor) -> torch.Tensor:
        for fn in self.slots(block)["mlp_in"]:
            y = fn(y)
        return y

    def norm(self, block, i: int, x: torch.Tensor) -> torch.Tensor | None:
        return block._modules["norm1" if i == 1 else "norm2"](x)

    def branches_first(self, block, half: str) -> bool:
        return False

    def attention(self, block, x: torch.Tensor, h: torch.Tensor | None, kw: dict) -> torch.Tensor:
        attn = block._modules["attn"]
        h = block._modules["norm1"](x) if h is None else h
        return attn(h, **kw) if self.calls_all else attention_forward(attn, h, kw)

    def rows(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return t

    def mlp(self, block, y: torch.Tensor, h2: torch.Tensor | None) -> torch.Tensor:
        mlp = block._modules["mlp"]
        h2 = block._modules["norm2"](y) if h2 is None else h2
        m = mlp(h2) if self.calls_all else mlp_forward(mlp, h2)
        for fn in self.slots(block)["mlp_out"]:
            m = fn(m)
        return m

    def branch(self, fn: Callable, x: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        return fn(x, h)

    def block_out(self, block, z: torch.Tensor) -> torch.Tensor:
        for fn in self.slots(block)["block_out"]:
            z = fn(z)
        return z


def attention_forward(attn: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    """attn(h, **kw), for timm's SDPA Attention without an output gate: its forward's ops in its
    order, with its no-op submodules passed `through`, where that forward is the one copied here
    (`copied_forward`), unless the call would run more (`called_for_more`), and outside
    torch.compile's tracing."""
    if _compiling() or not timm_sdpa_attention(attn) or called_for_more(attn):
        return attn(h, **kw)
    B, N, _ = h.shape
    q, k, v = split_heads(attn, attn._modules["qkv"](h))
    q, k = through(attn, "q_norm", q), through(attn, "k_norm", k)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=kw.get("attn_mask"),
                                       dropout_p=attn._modules["attn_drop"].p if attn.training else 0.0,
                                       is_causal=kw.get("is_causal", False))
    o = through(attn, "norm", o.transpose(1, 2).reshape(B, N, -1))
    return through(attn, "proj_drop", attn._modules["proj"](o))


def mlp_forward(mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """mlp(h), for timm's Mlp: its forward's ops with its no-op submodules passed `through`, where
    that forward is the one copied here (`copied_forward`), unless the call would run more
    (`called_for_more`), and outside torch.compile's tracing."""
    if _compiling() or not timm_mlp(mlp) or called_for_more(mlp):
        return mlp(h)
    mods = mlp._modules
    a = through(mlp, "drop1", mods["act"](mods["fc1"](h)))
    return through(mlp, "drop2", mods["fc2"](through(mlp, "norm", a)))


class PatchedRun(BlockRun):
    """A patched block's run (`patch` sets it where no other run is set): the reference order,
    without the calls of the block's pass-through modules."""

    calls_all = False


class _BranchesFirst(PatchedRun):
    """The MLP half of recompute's whole-half regions (fastpeft/recompute.py): the reference
    order with each half's branch deltas computed before its frozen path where `first` says so
    (the same values where that path draws no random numbers: recompute decides), and the
    mlp_in slots left out (recompute runs them before the region, on the stream it keeps)."""

    def __init__(self, attn: bool, mlp: bool):
        self.first = {"attn": attn, "mlp": mlp}

    def branches_first(self, block, half: str) -> bool:
        return self.first[half]

    def mlp_in(self, block, y):
        return y


#: the reference run of a block (what `PetlBlock.forward` runs unless `patch` set another)
STANDARD = BlockRun()
PATCHED = PatchedRun()
BRANCHES_FIRST = {(a, m): _BranchesFirst(a, m) for a in (False, True) for m in (False, True)}
