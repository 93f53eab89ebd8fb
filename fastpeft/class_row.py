"""`fastpeft.patch`: the last block computes the class token's row only, where that is all the
head reads (global_pool='token').

In a token-pooled ViT, `model(x)` reads one row of the last block's output. That row needs every
token's key and value (the class token attends over all of them), so the last block still runs
norm1 and qkv (with every method hook on them) over all tokens. But its attention is one query
row per head, and proj, the MLP and every method slot and branch run on B rows instead of B * N:
~10/12 of the last block's frozen GEMM FLOPs in forward and backward, ~6% of a ViT-B/16 train
step. The other rows' outputs have zero gradient in the reference, so the
gradients are the same sums without those zero terms; values match to fp32 rounding (a GEMM over B
rows may round differently from one over B * N), not bit for bit.

It applies only where the result cannot change otherwise. What runs on the class row must give
that row of what it gives on every row: timm's Mlp and LayerNorms, and method hooks and slots that
say so (`class_row_local`): row-local ones, and Convpass, whose class token's conv is the centre
tap of a 1x1 image (its class-row path runs under `in_class_row_pass()`). Its random numbers must
be the reference's: DropPath's per-sample mask is the same on one row; a torch dropout call
(nn.Dropout, F.dropout: every method's dropout) on the class row draws its mask over the
[B, N, ...] tensor the reference drew it over -- the same op on the same shape, so the same
numbers in the same order -- and keeps the class row's slice (`_ClassRowDraws`). A fused kernel's
dropout is seeded per call and never eager's masks: on the class row it draws a fresh mask for
that row, as the full block would in distribution (fastpeft/fused/common.py). Attention dropout
(a [1, N] row of an [N, N] map) is refused. A block_out slot may only drop rows and keep the class
token's (`keeps_class_row`: VPT's and NOAH's prompt removal; the pass skips it), and
`model.forward` must not be replaced already (VQT does its own class-token pass).
`forward_features` is untouched: it still returns every token.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .block import CLASS_ROW_PASS, PatchedRun, split_heads, through, timm_mlp, timm_sdpa_attention
from .methods.base import OutputHook


def _not_row_local(path: str, mod: nn.Module) -> str | None:
    """None where every module and hook inside `mod` (at `path` in the block) is row-local with
    torch-drawn randomness only (see the module docstring); else the first that is not, named."""
    for name, m in mod.named_modules(prefix=path):
        if m._forward_pre_hooks:
            return f"a forward pre-hook on {name}"
        for fn in m._forward_hooks.values():
            if not (isinstance(fn, OutputHook) and fn.class_row_local):
                return f"{getattr(fn, '__name__', type(fn).__name__)} hook on {name}"
        said = getattr(m, "class_row_local", None)
        if said is False or (said is None and not type(m).__module__.startswith(("torch.nn.", "timm.layers."))):
            return f"{type(m).__name__} ({name})"
    return None


def class_row_why_not(model: nn.Module) -> str | None:
    """None where the last block may run on the class token only; else why not."""
    if getattr(model, "global_pool", None) != "token" or getattr(model, "attn_pool", None) is not None:
        return f"global_pool={getattr(model, 'global_pool', None)!r} reads every token"
    if "forward" in model.__dict__:
        return "model.forward is already replaced"
    blocks = getattr(model, "blocks", None)
    last = blocks[-1] if isinstance(blocks, nn.Sequential) and len(blocks) else None
    slots = getattr(last, "_fastpeft_slots", None)
    if slots is None or slots.get("block_fn"):
        return "the last block is not a fastpeft block with the standard dataflow"
    from timm.models.vision_transformer import VisionTransformer

    if "forward_head" in model.__dict__ or type(model).forward_head is not VisionTransformer.forward_head:
        # e.g. DeiT's distilled models: their head also reads the distillation token's row
        return f"{type(model).__name__}.forward_head is not timm's (it may read more than the class token's row)"
    attn = last.attn
    if not timm_sdpa_attention(attn):
        return "the last block's attention is not timm's fused Attention (with the forward fastpeft copies)"
    if not timm_mlp(last.mlp):
        return "the last block's MLP is not timm's Mlp (with the forward fastpeft copies)"
    not_local = list(dict.fromkeys(type(fn).__name__ for s in ("attn_branch", "mlp_in", "mlp_out", "ffn_out", "ffn_branch")
                                   for fn in slots[s] if not fn.class_row_local))
    if not_local:
        return f"{', '.join(not_local)} in the last block reads other rows or draws its own randomness"
    if not all(fn.keeps_class_row for fn in slots["block_out"]):
        return "a block_out slot of the last block changes the class token's row"
    if attn.attn_drop.p > 0:
        return "the last block has attention dropout (drawn over every row of the attention map)"
    for path in ("attn.proj", "attn.proj_drop", "attn.norm", "norm2", "mlp"):
        why = _not_row_local(path, last.get_submodule(path))
        if why:
            return f"after the last block's attention, {why} is not row-local with torch-drawn randomness"
    return None


#: the other torch dropouts (their masks are not redrawn here: refused) -> their default `training`
_OTHER_DROPOUTS = {F.dropout1d: True, F.dropout2d: True, F.dropout3d: True, F.alpha_dropout: False,
                   F.feature_alpha_dropout: False}


class _ClassRowDraws(TorchFunctionMode):
    """While the last block's class-token row runs: a torch dropout on a [B, 1, ...] tensor draws
    its mask over [B, rows, ...], the tensor the reference drew it over (the same op on the same
    shape and dtype: the same numbers, in the same order), and applies the class row's slice."""

    #: fastpeft's fused ops run with this mode popped (fastpeft/fused/common.py `kernel_call`):
    #: they draw no torch dropout (their dropout is their own seeded stream), so there is nothing
    #: here to redirect, and their tensor calls skip this handler
    fused_calls_exempt = True

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows

    def __enter__(self):
        self._token = CLASS_ROW_PASS.set(True)
        return super().__enter__()

    def __exit__(self, *exc):
        CLASS_ROW_PASS.reset(self._token)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            return self._dropout(*args, **kwargs)
        if func in _OTHER_DROPOUTS and kwargs.get("training", args[2] if len(args) > 2 else _OTHER_DROPOUTS[func]):
            raise RuntimeError(f"fastpeft class-row pass: {func.__name__} in the class-row pass (only "
                               "F.dropout / nn.Dropout masks are redrawn over every row)")
        return func(*args, **kwargs)

    def _dropout(self, x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
        if not training or p == 0:
            return F.dropout(x, p, training, inplace)
        if x.dim() < 2 or x.shape[1] != 1:
            raise RuntimeError(f"fastpeft class-row pass: dropout on a {tuple(x.shape)} tensor is not "
                               "a class-token row; a hook or slot marked class_row_local does not keep token rows on dim 1")
        keep = F.dropout(x.new_ones((x.shape[0], self.rows, *x.shape[2:])), p, True)[:, :1].clone()
        return x.mul_(keep) if inplace else x * keep


class ClassRowRun(PatchedRun):
    """The last block's class-token row: [B, N, D] -> [B, 1, D]. The block's own order
    (fastpeft/block.py) on the class row after the attention's keys and values (see the module
    docstring); its block_out slots keep the class row as it is, so they are skipped."""

    def __init__(self):
        self._draws: contextlib.ExitStack | None = None

    def forward(self, block, x: torch.Tensor, kw: dict) -> torch.Tensor:
        with contextlib.ExitStack() as self._draws:
            return super().forward(block, x, kw)

    def attention(self, block, x, h, kw):
        attn = block.attn
        B, N, _ = h.shape
        H, d = attn.num_heads, attn.head_dim
        q, k, v = split_heads(attn, attn.qkv(h))
        q, k = through(attn, "q_norm", q[:, :, :1]), through(attn, "k_norm", k)
        o = F.scaled_dot_product_attention(q, k, v)
        # from here on every op sees the class row only; torch dropouts draw over every row
        self._draws.enter_context(_ClassRowDraws(N))
        o = through(attn, "norm", o.transpose(1, 2).reshape(B, 1, H * d))
        return through(attn, "proj_drop", attn.proj(o))

    def rows(self, t):
        return t[:, :1]

    def block_out(self, block, z):
        return z


_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _foreign(mod: nn.Module, tables: tuple[str, ...]) -> bool:
    for table in tables:
        hooks = mod.__dict__.get(table)
        if hooks and any(not type(fn).__module__.startswith("fastpeft.") for fn in hooks.values()):
            return True
    return False


def has_user_hooks(model: nn.Module) -> bool:
    """Whether a hook not installed by fastpeft (a user's, registered before or after `patch`)
    would see the class-row pass: any hook on the last block, on a module inside it or on the final
    norm, or a global module hook. Such a hook is promised what the unpatched model shows it, the
    full [B, N, ...] rows, so the forward keeps every row while it is there. Checked per forward: a
    few dict lookups."""
    from torch.nn.modules import module as _m

    if (_m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks
            or _m._global_backward_pre_hooks):
        return True
    last = model.blocks[-1]
    norm = getattr(model, "norm", None)
    if isinstance(norm, nn.Module) and any(_foreign(m, _HOOK_TABLES) for m in norm.modules()):
        return True
    return any(_foreign(m, _HOOK_TABLES) for m in last.modules())


class ClassRowForward:
    """`model.forward` of a patched token-pooled model: the model's own forward, with its last
    block computing the class token's row only. Attention masks and torch.compile tracing take the
    full forward."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        model = self.model
        if attn_mask is not None or is_causal:
            return type(model).forward(model, x, attn_mask=attn_mask, is_causal=is_causal)
        if torch.compiler.is_compiling() or has_user_hooks(model):
            return type(model).forward(model, x)
        last = model.blocks[-1].__dict__
        run = last.get("_fastpeft_run")
        last["_fastpeft_run"] = ClassRowRun()
        try:
            return type(model).forward(model, x)
        finally:
            if run is None:
                del last["_fastpeft_run"]
            else:
                last["_fastpeft_run"] = run
