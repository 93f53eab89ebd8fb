"""Fused VQT: the original tokens run the frozen block without autograd; only the query rows
build a graph, through the query-only attention op (fastpeft/ops/vqt.py).

The reference (fastpeft/methods/vqt.py, as the official code) runs each block on the
concatenation [queries ; tokens] with autograd, so it saves every activation of the whole
backbone (~619 MiB on ViT-B/16, batch 8, Q = 1) although no gradient ever reaches the backbone:
the original tokens never attend to the queries, so their hidden states are constants.

`FusedVQTBlock` (installed by `VQTRule` in place of the method's `block_fn`) does, per block:

  frozen path, under torch.no_grad():  x_next = Block.forward(x) (timm's own forward: bit-identical
      to the frozen model), with a temporary capture on attn.qkv (its instance `forward` for the
      call; a forward hook while compiling) that captures its input
      h = LN1(x) [B, N, D] and output (whose K/V slices, [B, H, N, d] strided views, feed the
      query attention without a copy);
  query path, with autograd:  LN1 -> q rows of attn.qkv -> q_norm -> vqt_query_attention(q, K, V)
      -> attn.norm / gate -> proj -> residual -> LN2 -> MLP -> residual, with the block's own modules.

What the query attention saves for backward (`_QueryAttention`): q [B, H, Q, d], out [B, H, Q, d],
lse [B, H, Q] fp32 and h [B, N, D] (+ the frozen qkv weight/bias: parameters, resident anyway):
not K and V (2 x [B, N, D]), which share h. The backward rebuilds what it needs from h:

  absorbed (CPU, few queries): keys/values are linear in h, k_n = W_k h_n + b_k, so
      q . k_n = (W_k^T q) . h_n + q . b_k  and  dO . v_n = (W_v^T dO) . h_n + dO . b_v;
      the backward kernel runs once per sample over h itself (one "head" of H*Q rows of
      dimension D) with projected queries/grad_out, lse - scale q.b_k and delta - dO.b_v, and
      dq = W_k dq_abs. Cost 3 H Q N D multiply-adds per sample instead of a [N, D] x [D, 2A]
      GEMM (4 N D A): cheaper while 3 H Q (D - d) < 4 D A (Q < ~90 on ViT-B), i.e. always for
      the official VQT configurations (Q <= 20).
  rebuild (CUDA, or many queries): [K | V] = h W_kv^T + b_kv, then the backward kernel on K, V.

Per block that is B N D + 2 B H Q d + B H Q floats for the attention, plus the query rows'
own LayerNorm/MLP activations (~13 B Q D floats): on ViT-B/16, batch 8, fp32, Q = 1,
12 x (4.84 MB + 0.05 MB + 0.32 MB) ~ 59 MiB, against ~619 MiB for the reference.

Dropout on the queries follows the model's mode as in the reference; blocks with attention
dropout, DropPath > 0 or a dropout of their own (the reference draws one mask for queries and
tokens together), qk-norm on keys, or foreign hooks are left to the reference. If a block's
parameters or its input require grad at call time (e.g. the backbone was unfrozen), that call
runs the reference block_fn, which is then the correct computation.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..block import NO_SLOTS, BlockRun, vmapped
from ..methods.base import PetlBlock, SlotFn, dropout
from ..methods.vqt import _VQTBlock, _VQTForwardHead, vqt_features
from ..rule import PatchReport, Rule

__all__ = ["FusedVQTBlock", "FusedVQTForward", "FusedVQTForwardHead", "VQTRule"]

_ATTN = "fastpeft::vqt_query_attention"

#: head dims the CUDA kernel handles (fastpeft/ops/vqt.py CUDA_MAX_HEAD_DIM)
_CUDA_MAX_HEAD_DIM = 128


def _attention_impls(impl: str):
    """(forward, backward) of the query attention: the registered ops (C++/CUDA kernels) or the
    plain-torch references (same saving scheme, for backend='torch')."""
    from ..ops import vqt as ops

    if impl == "cpp":  # the extension's kernels below the Autograd key (this Function is the autograd)
        return ops.attention_forward, ops.attention_backward
    return ops.vqt_query_attention_ref, ops.vqt_query_attention_backward_ref


def use_absorbed_backward(device: torch.device, heads: int, queries: int, head_dim: int,
                          dim: int) -> bool:
    """Whether the backward runs on h directly (see the module docstring) instead of rebuilding
    K and V: on CPU when it needs fewer multiply-adds than the K/V GEMM (CUDA kernels take
    d <= 128 and GEMMs are cheap there)."""
    if device.type != "cpu":
        return False
    attn_dim = heads * head_dim
    return 3 * heads * queries * (dim - head_dim) < 4 * dim * attn_dim


class _QueryAttention(torch.autograd.Function):
    """out = vqt_query_attention(q, k, v) with gradients for q only, saving h instead of k, v.

    q [B, H, Q, d] (trainable path); k, v [B, H, N, d] frozen views of attn.qkv(h); h [B, N, D]
    the LN1 output they were projected from; weight [3A, D], bias [3A] or None: attn.qkv's.
    """

    @staticmethod
    def forward(ctx, q, k, v, h, weight, bias, scale, impl, absorbed):
        forward, _ = _attention_impls(impl)
        out, lse = forward(q, k, v, scale)
        ctx.save_for_backward(q, h, out, lse, weight, bias)
        ctx.scale, ctx.impl, ctx.absorbed = scale, impl, absorbed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # A backward called inside an autocast block runs under it: its einsums / linear would
        # come out in the autocast dtype next to the float32 tensors cast here. Every dtype below
        # is explicit instead (K/V rebuilt in q's dtype, as forward's autocast qkv made them).
        device_type = grad_out.device.type
        if not torch.is_autocast_enabled(device_type):  # (nothing to switch off)
            return _QueryAttention._backward(ctx, grad_out)
        with torch.autocast(device_type=device_type, enabled=False):
            return _QueryAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        q, h, out, lse, weight, bias = ctx.saved_tensors
        _, backward = _attention_impls(ctx.impl)
        B, H, Q, d = q.shape
        N, D = h.shape[1], h.shape[2]
        A = H * d
        scale = ctx.scale
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1)
        if ctx.absorbed:
            f32 = torch.float32
            qf, gf = q.to(f32), grad_out.to(f32)
            w_k = weight[A:2 * A].view(H, d, D).to(f32)
            w_v = weight[2 * A:].view(H, d, D).to(f32)
            # (batched matmuls over the heads: [B, H, Q, d] @ [H, d, D] -> [B, H, Q, D])
            q_abs = torch.matmul(qf, w_k).reshape(B, 1, H * Q, D)
            g_abs = torch.matmul(gf, w_v).reshape(B, 1, H * Q, D)
            if bias is not None:
                # Constant shifts of every logit / dp of a row: they cancel in p and ds, but lse
                # and delta were computed with them.
                b_k = bias[A:2 * A].view(H, d, 1).to(f32)
                b_v = bias[2 * A:].view(H, d, 1).to(f32)
                lse = lse - scale * torch.matmul(qf, b_k).squeeze(-1)
                delta = delta - torch.matmul(gf, b_v).squeeze(-1)
            hf = h.to(f32).unsqueeze(1)  # [B, 1, N, D]: one "head" shared by all H*Q rows
            dq_abs = backward(g_abs, q_abs, hf, hf, lse.reshape(B, 1, H * Q).contiguous(),
                              delta.reshape(B, 1, H * Q).contiguous(), scale)
            # dq = W_k dq_abs (the b_k term is scale * sum_n ds_n * b_k = 0).
            grad_q = torch.matmul(dq_abs.view(B, H, Q, D), w_k.transpose(1, 2)).to(q.dtype)
        else:
            dt = q.dtype
            kv = F.linear(h.to(dt), weight[A:].to(dt), None if bias is None else bias[A:].to(dt)).view(B, N, 2, H, d)
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
            grad_q = backward(grad_out, q, k, v, lse, delta, scale)
        return grad_q, None, None, None, None, None, None, None, None


class _CaptureQKV:
    """Forward hook on attn.qkv: keeps its input (LN1 output) and output for one call."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.qkv: torch.Tensor | None = None

    def __call__(self, module, args, out):
        self.h, self.qkv = args[0], out


class _CapturingForward:
    """The same capture as `_CaptureQKV`, installed as attn.qkv's instance `forward` for one call
    instead of as a hook: the Linear's own class forward runs, and the module call stays on
    nn.Module's no-hook path (a hook also costs registering and removing a handle per call)."""

    def __init__(self, module: nn.Module, capture: _CaptureQKV):
        self.module, self.capture, self.forward = module, capture, type(module).forward

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        out = self.forward(self.module, h)
        self.capture.h, self.capture.qkv = h, out
        return out


_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _needs_reference(block: nn.Module, x: torch.Tensor, params: tuple) -> bool:
    # The fused path assumes a frozen block on a constant input (always the case after inject):
    # anything else needs the backbone's backward, which only the reference computes.
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(map(_REQUIRES_GRAD, params))


class FusedVQTBlock(SlotFn):
    """Stands in for the method's `_VQTBlock` (kept in `ref` for unpatch) in a block's `block_fn`
    slot; same contract: prepends nothing, returns the original tokens' block output and pushes
    the query rows' block output to the method's per-forward buffer."""

    def __init__(self, ref: _VQTBlock, impl: str):
        self.ref = ref
        self.impl = impl
        self.key = ref.key
        self._params: tuple | None = None  # (block, its parameters): see __call__
        #: set by `FusedVQTForward` around `model(x)` on the last block: the class-row pass (only
        #: the class token's row of the original tokens, the only one VQT's head reads)
        self.class_row = False

    def __call__(self, block: nn.Module, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        ref = self.ref
        params = self._params
        if params is None or params[0] is not block:
            # the block's parameter objects, collected once (`block.parameters()` walks every
            # submodule); their requires_grad is read on every call, so unfreezing them after
            # patch is seen (a parameter object swapped in later is not: patch again)
            params = self._params = (block, tuple(block.parameters()))
        if attn_mask is not None or is_causal or vmapped(x) or _needs_reference(block, x, params[1]):
            return ref(block, x, attn_mask, is_causal)
        if ref.layer == 0:
            ref.outputs.items = []
        elif ref.outputs.items is None or len(ref.outputs.items) != ref.layer:
            raise RuntimeError("VQT blocks must run in order from block 0 within one forward")
        model = ref.model
        q = model.query_prompt_embeddings[ref.layer].to(dtype=x.dtype)
        q = dropout(q.expand(x.shape[0], -1, -1), ref.p, model)

        capture = _CaptureQKV()
        with torch.no_grad():
            if self.class_row:
                # keys/values of every token, then the class token through the block exactly like
                # a query row (it attends over all N keys, its own included)
                capture.h = block.norm1(x)
                capture.qkv = block.attn.qkv(capture.h)
                x_next = self._query_path(block, x[:, :1], capture.h, capture.qkv)
            elif "forward" not in (qkv := block.attn.qkv).__dict__ and not torch.compiler.is_compiling():
                qkv.__dict__["forward"] = _CapturingForward(qkv, capture)
                try:
                    x_next = block._fastpeft_orig_class.forward(block, x)
                finally:
                    del qkv.__dict__["forward"]
            else:
                handle = qkv.register_forward_hook(capture)
                try:
                    x_next = block._fastpeft_orig_class.forward(block, x)
                finally:
                    handle.remove()
        ref.outputs.items.append(self._query_path(block, q, capture.h, capture.qkv))
        return x_next

    def _query_path(self, block: nn.Module, q: torch.Tensor, h: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        return _QueryRun(h, qkv, self.impl).forward(block, q, {})


class _QueryRun(BlockRun):
    """Query rows [B, Q, D] through the block in its own order (fastpeft/block.py), no slots, with
    the query-only attention over the original tokens' keys and values: `h` = LN1 of the tokens
    [B, N, D], `qkv` = attn.qkv(h) (its K/V slices are read as strided views, not copied)."""

    def __init__(self, h: torch.Tensor, qkv: torch.Tensor, impl: str):
        self.h, self.qkv, self.impl = h, qkv, impl

    def slots(self, block):
        return NO_SLOTS

    def attention(self, block, q, hq, kw):
        attn = block.attn
        h = self.h
        B, Qn, _ = hq.shape
        H, d = attn.num_heads, attn.head_dim
        A, N, D = H * d, h.shape[1], h.shape[2]
        weight, bias = attn.qkv.weight, attn.qkv.bias
        qq = F.linear(hq, weight[:A], None if bias is None else bias[:A])
        qh = attn.q_norm(qq.view(B, Qn, H, d).transpose(1, 2))
        kv = self.qkv.view(B, N, 3, H, d)
        k, v = kv[:, :, 1].transpose(1, 2), kv[:, :, 2].transpose(1, 2)
        absorbed = use_absorbed_backward(q.device, H, Qn, d, D)
        o = _QueryAttention.apply(qh, k, v, h, weight, bias, float(attn.scale), self.impl, absorbed)
        o = attn.norm(o.transpose(1, 2).reshape(B, Qn, A))
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(hq).sigmoid()
        return attn.proj_drop(attn.proj(o))


class FusedVQTForward:
    """`model.forward` of a patched VQT model whose head reads the class token only
    (global_pool='token'): runs the model's own forward with the last block computing just the
    class token's row. The rest of the last block's token rows (proj, MLP and their attention
    rows for N - 1 tokens, ~6% of the frozen forward on ViT-B/16) feed nothing VQT reads.

    Every hidden state the queries read (each block's input, hence every key/value) stays
    bit-identical to the frozen model; the final class-token feature is the same math computed
    on one row instead of N, so it matches to fp32 rounding (a GEMM over B rows rounds
    differently from one over B * N), not bit for bit. `forward_features` is not affected.
    """

    def __init__(self, model: nn.Module, last: FusedVQTBlock):
        self.model = model
        self.last = last

    def __call__(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        model = self.model
        if attn_mask is not None or is_causal:
            return type(model).forward(model, x, attn_mask=attn_mask, is_causal=is_causal)
        from ..class_row import has_user_hooks

        if has_user_hooks(model):  # a user's hook there is shown every row, as by the unpatched model
            return type(model).forward(model, x)
        self.last.class_row = True
        try:
            return type(model).forward(model, x)
        finally:
            self.last.class_row = False


def _class_row_why_not(model: nn.Module, last: nn.Module) -> str | None:
    if getattr(model, "global_pool", None) != "token" or getattr(model, "attn_pool", None) is not None:
        return f"global_pool={getattr(model, 'global_pool', None)!r} reads every token"
    if "forward" in model.__dict__:
        return "model.forward is already replaced"
    drops = [last.attn.proj_drop] + [m for m in last.mlp.modules() if isinstance(m, nn.Dropout)]
    if any(m.p > 0 for m in drops):
        return "the last block has dropout (its draws cover every token row)"
    return None


class FusedVQTForwardHead(_VQTForwardHead):
    """Stands in for the method's `_VQTForwardHead` (kept in `ref`): the same head, with the
    features from the fused L2-normalise-and-concatenate op (impl 'cpp') or the method's own
    `vqt_features` (impl 'torch')."""

    def __init__(self, ref: _VQTForwardHead, impl: str):
        super().__init__(ref.model, ref.outputs, ref.depth)
        self.ref = ref
        self.impl = impl
        if impl == "cpp":
            self.features = _aggregate


def _aggregate(pooled: torch.Tensor, query_outputs: list[torch.Tensor]) -> torch.Tensor:
    """The fused L2-normalise-and-concatenate op, or the method's `vqt_features` in a mixed
    multi-task batch (fastpeft/block.py vmapped: the op has no per-row form)."""
    from ..ops.vqt import vqt_aggregate

    return (vqt_features if vmapped(pooled) else vqt_aggregate)(pooled, query_outputs)


def _has_kernel(device: torch.device) -> bool:
    from .. import _ext
    from ..ops import vqt  # noqa: F401  (defines the ops when the extension lacks them)

    if not _ext.load().available:
        return False
    key = "CUDA" if device.type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(_ATTN, key)


def _why_not(block: nn.Module, device: torch.device) -> str | None:
    attn = block.attn
    if not isinstance(attn.k_norm, nn.Identity):
        return "qk-norm on the keys (the fused backward rebuilds keys linearly from LN1's output)"
    if attn.attn_drop.p > 0:
        return f"attention dropout p={attn.attn_drop.p} (the query attention op has none)"
    for name in ("drop_path1", "drop_path2"):
        if getattr(getattr(block, name), "drop_prob", 0.0) > 0:
            return f"{name} > 0 (the reference draws one per-sample mask for queries and tokens together)"
    drops = [n for n, m in block.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if drops:  # (the fused block runs the tokens and the queries separately: other numbers)
        return f"dropout in {drops[0]} (the reference draws its mask over the tokens and queries together)"
    if device.type == "cuda" and attn.head_dim > _CUDA_MAX_HEAD_DIM:
        return f"head dim {attn.head_dim} > {_CUDA_MAX_HEAD_DIM} (the CUDA kernel's limit)"
    for name, mod in block.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks:
            return f"{name or 'the block'} has forward hooks of another method"
    return None


class VQTRule(Rule):
    """Installs `FusedVQTBlock` in every VQT block and `FusedVQTForwardHead` as forward_head."""

    name = "vqt"

    def apply(self, model: nn.Module, info, backend: str, recompute: bool, report: PatchReport) -> list[Any]:
        found = []
        for i, blk in enumerate(model.blocks):
            if isinstance(blk, PetlBlock):
                fns = blk._fastpeft_slots.get("block_fn", [])
                if fns and type(fns[0]) is _VQTBlock:
                    found.append((i, blk))
        if not found:
            return []
        device = next(model.parameters()).device
        if backend == "torch" or not _has_kernel(device):
            impl = "torch"
        else:  # cpp, or triton (no Triton VQT kernel: the extension's kernel for this device)
            impl = "cpp"
        records, done = [], []
        for i, blk in found:
            why = _why_not(blk, device)
            if why:
                report.left_alone.append((f"blocks.{i} VQT", why))
                continue
            fns = blk._fastpeft_slots["block_fn"]
            fns[0] = FusedVQTBlock(fns[0], impl)
            records.append(("block", f"blocks.{i}"))
            done.append(i)
        if done:
            where = f"blocks.{done[0]}..{done[-1]}" if len(done) > 1 else f"blocks.{done[0]}"
            report.patched.append((where, "VQT block: frozen tokens without autograd, query-only attention "
                                          "(saves LN1 output, not K/V)", impl))
        if done and done[-1] == len(model.blocks) - 1:
            last = model.blocks[done[-1]]._fastpeft_slots["block_fn"][0]
            why = _class_row_why_not(model, model.blocks[done[-1]])
            if why:
                report.left_alone.append(("model.forward (class-row pass)", why))
            else:
                model.__dict__["forward"] = FusedVQTForward(model, last)
                records.append(("forward", "forward"))
                report.patched.append(("forward", "VQT: last block computes the class token row only "
                                                  "(class-row pass: the only token row the head reads)", "torch"))
        head = model.__dict__.get("forward_head")
        if type(head) is _VQTForwardHead:
            model.__dict__["forward_head"] = FusedVQTForwardHead(head, impl)
            records.append(("head", "forward_head"))
            report.patched.append(("forward_head", "VQT features: fused L2-normalise + concatenate", impl))
        return records

    def undo(self, model: nn.Module, record: Any) -> None:
        kind, path = record
        if kind == "block":
            fns = model.get_submodule(path)._fastpeft_slots["block_fn"]
            if fns and isinstance(fns[0], FusedVQTBlock):
                fns[0] = fns[0].ref
        elif kind == "forward":
            if isinstance(model.__dict__.get(path), FusedVQTForward):
                del model.__dict__[path]
        else:
            head = model.__dict__.get(path)
            if isinstance(head, FusedVQTForwardHead):
                model.__dict__[path] = head.ref
