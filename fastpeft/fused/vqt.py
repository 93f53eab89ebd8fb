"""Fused VQT: the original tokens run the frozen block without autograd; only the query rows
build a graph, through the query-only attention op (fastpeft/ops/vqt.py).

The reference (fastpeft/methods/vqt.py, as the official code) runs each block on the
concatenation [queries ; tokens] with autograd, so it saves every activation of the whole
backbone (~619 MiB on ViT-B/16, batch 8, Q = 1) although no gradient ever reaches the backbone:
the original tokens never attend to the queries, so their hidden states are constants.

`FusedVQTBlock` (installed by `VQTRule` in place of the method's `block_fn`) does, per block:

  frozen path, under torch.no_grad():  x_next = Block.forward(x) (timm's own forward: bit-identical
      to the frozen model), with a temporary capture on attn.qkv (its instance `forward` for the
      call) that captures its input h = LN1(x) [B, N, D] and output (whose K/V slices,
      [B, H, N, d] strided views, feed the query attention without a copy). torch.compile
      traces that swap, and the query attention is then the registered op, so the trace has no
      graph break; where attn.qkv already has an instance `forward`, a temporary forward hook
      captures instead (a graph break under torch.compile);
  query path, with autograd:  LN1 -> q rows of attn.qkv -> q_norm -> vqt_query_attention(q, K, V)
      -> attn.norm / gate -> proj -> residual -> LN2 -> MLP -> residual, with the block's own modules.

On a plain timm `Block` (`_query_block_plan`: LayerNorms, timm Attention without qk/attention
norm or gate, GELU Mlp, LayerScale or none) both paths run as one autograd node instead
(`_QueryTokenBlock`): the tokens' block forward op for op as timm's, the query rows riding along
in each frozen GEMM ([queries ; tokens] rows, as the reference runs them: one read of each weight),
the query attention over the tokens' K/V, and a hand-written backward for the query rows with
autograd's own formulas per op; it saves the same tensors as the op-by-op graph. The last block
of the class-row pass keeps the capture above, with its queries in one node (`_QueryBlock`).
A forward hook on a block's submodule (registered after patch), autocast, or tracing take the
module-by-module path.

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

import functools
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..block import NO_SLOTS, BlockRun, forward_hooked, plain_layer_norm, vmapped
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


#: below this many multiply-adds the K/V rebuild GEMM ([B*N, D] x [D, 2A]) costs less than the
#: dozen extra small ops of the absorbed backward (projections of q / grad_out, bias shifts): the
#: rebuild then wins on the host side whatever the FLOP ratio
_SMALL_KV_GEMM = 1 << 20


def use_absorbed_backward(device: torch.device, heads: int, queries: int, head_dim: int,
                          dim: int, rows: int | None = None) -> bool:
    """Whether the backward runs on h directly (see the module docstring) instead of rebuilding
    K and V: on CPU when it needs fewer multiply-adds than the K/V GEMM (CUDA kernels take
    d <= 128 and GEMMs are cheap there), and, given the B*N token `rows`, when that GEMM is not
    so small that the absorbed form's extra ops cost more than it (`_SMALL_KV_GEMM`)."""
    if device.type != "cpu":
        return False
    attn_dim = heads * head_dim
    if rows is not None and rows * dim * 2 * attn_dim < _SMALL_KV_GEMM:
        return False
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
        grad_q = _attention_grad_q(grad_out, q, h, out, lse, weight, bias, ctx.scale, backward, ctx.absorbed)
        return grad_q, None, None, None, None, None, None, None, None


def _attention_grad_q(grad_out, q, h, out, lse, weight, bias, scale, backward, absorbed):
    """q's gradient of the query attention (see `_QueryAttention`): grad_out, q, out [B, H, Q, d],
    lse [B, H, Q] fp32, h [B, N, D] the LN1 output K/V were projected from, weight/bias attn.qkv's;
    `backward` the attention backward kernel; `absorbed`: see `use_absorbed_backward`."""
    B, H, Q, d = q.shape
    N, D = h.shape[1], h.shape[2]
    A = H * d
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1)
    if absorbed:
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
        return torch.matmul(dq_abs.view(B, H, Q, D), w_k.transpose(1, 2)).to(q.dtype)
    dt = q.dtype
    kv = F.linear(h.to(dt), weight[A:].to(dt), None if bias is None else bias[A:].to(dt)).view(B, N, 2, H, d)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return backward(grad_out, q, k, v, lse, delta, scale)


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
    if torch.compiler.is_compiling():  # (Dynamo traces no attrgetter call)
        return x.requires_grad or any(p.requires_grad for p in params)
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
            params = self.bind(block)
        if attn_mask is not None or is_causal or vmapped(x) or _needs_reference(block, x, params[1]):
            return ref(block, x, attn_mask, is_causal)
        if ref.layer == 0:
            ref.outputs.items = []
        elif ref.outputs.items is None or len(ref.outputs.items) != ref.layer:
            raise RuntimeError("VQT blocks must run in order from block 0 within one forward")
        model = ref.model
        q = model.query_prompt_embeddings[ref.layer].to(dtype=x.dtype)
        q = dropout(q.expand(x.shape[0], -1, -1), ref.p, model)

        plan = params[2]
        fast = (plan is not None and q.requires_grad and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled(x.device.type) and not plan.hooked())
        if fast and not self.class_row and block.attn.fused_attn:
            # queries and tokens in one node, the queries riding along in the frozen GEMMs
            attn = block.attn
            B, N, D = x.shape
            absorbed = use_absorbed_backward(x.device, attn.num_heads, q.shape[1], attn.head_dim, D, B * N)
            out, x_next = _QueryTokenBlock.apply(q, x, block, plan, self._impls, absorbed)
            ref.outputs.items.append(out)
            return x_next

        capture = _CaptureQKV()
        with torch.no_grad():
            if self.class_row:
                # keys/values of every token, then the class token through the block exactly like
                # a query row (it attends over all N keys, its own included)
                capture.h = block.norm1(x)
                capture.qkv = block.attn.qkv(capture.h)
                x_next = self._query_path(block, x[:, :1], capture.h, capture.qkv)
            elif "forward" not in (qkv := block.attn.qkv).__dict__:  # (Dynamo traces the swap too)
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
        if fast:
            h = capture.h
            B, N, D = h.shape
            attn = block.attn
            absorbed = use_absorbed_backward(q.device, attn.num_heads, q.shape[1], attn.head_dim, D, B * N)
            out = _QueryBlock.apply(q, h, capture.qkv, block, plan, self._impls, absorbed)
        else:
            out = self._query_path(block, q, capture.h, capture.qkv)
        ref.outputs.items.append(out)
        return x_next

    def bind(self, block: nn.Module) -> tuple:
        """The block's parameter objects, collected once (`block.parameters()` walks every
        submodule; their requires_grad is read on every call, so unfreezing them after patch is
        seen, a parameter object swapped in later is not: patch again), and the one-node plan of
        the query rows where the block is a plain timm Block. Bound when `patch` installs this, so
        that a compiled model's first call does not fill it (a guard that would fail on the
        second call: one more compile)."""
        self._params = (block, tuple(block.parameters()), _query_block_plan(block))
        return self._params

    @property
    def _impls(self):
        impls = self.__dict__.get("_impls_cache")
        if impls is None:
            impls = self.__dict__["_impls_cache"] = _attention_impls(self.impl)
        return impls

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
        if torch.compiler.is_compiling():  # (traced: the registered op, its fake and autograd formulas)
            o, _ = torch.ops.fastpeft.vqt_query_attention(qh, k, v, float(attn.scale))
        else:
            absorbed = use_absorbed_backward(q.device, H, Qn, d, D, B * N)
            o = _QueryAttention.apply(qh, k, v, h, weight, bias, float(attn.scale), self.impl, absorbed)
        o = attn.norm(o.transpose(1, 2).reshape(B, Qn, A))
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(hq).sigmoid()
        return attn.proj_drop(attn.proj(o))


def _query_block_plan(block: nn.Module) -> "_QueryBlockPlan | None":
    """The `_QueryBlock` plan of a block that is timm's pre-LN `Block` with plain pieces, where the
    query rows' dataflow is known op by op (else None: the generic `_QueryRun`). Only modules whose
    forward is exactly the op used here are accepted (no qk/attention/MLP norm, no gate, GELU MLP,
    LayerNorms without timm's fast-norm path, LayerScale or none; dropouts and DropPath are
    already refused by `_why_not`)."""
    from timm.layers import Attention, LayerScale, Mlp
    from timm.models.vision_transformer import Block

    if getattr(block, "_fastpeft_orig_class", type(block)) is not Block:
        return None
    attn, mlp = block.attn, block.mlp
    if type(attn) is not Attention or getattr(attn, "gate", None) is not None:
        return None
    if not all(type(m) is nn.Identity for m in (attn.q_norm, attn.k_norm, attn.norm)):
        return None
    if type(mlp) is not Mlp or type(mlp.act) is not nn.GELU or type(mlp.norm) is not nn.Identity:
        return None
    if not all(type(m) is nn.Linear for m in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)):
        return None
    for norm in (block.norm1, block.norm2):
        if not plain_layer_norm(norm) or len(norm.normalized_shape) != 1:
            return None
    if not all(type(m) in (nn.Identity, LayerScale) for m in (block.ls1, block.ls2)):
        return None
    if any(type(m) is LayerScale and m.inplace for m in (block.ls1, block.ls2)):
        return None
    for dp in (block.drop_path1, block.drop_path2):
        if type(dp) is not nn.Identity and getattr(dp, "drop_prob", 1.0) != 0.0:
            return None
    return _QueryBlockPlan(block)


class _QueryBlockPlan:
    """What `_QueryBlock` needs to know of one block, found once: its modules (for the hook check)
    and which LayerScales it has. Parameters are read from the modules at each call."""

    def __init__(self, block: nn.Module):
        # (the block's own hooks see its input and output, which every path gives them: only
        # the submodules' would miss calls)
        self.modules = tuple(m for m in block.modules() if m is not block)
        self.ls1 = type(block.ls1) is not nn.Identity
        self.ls2 = type(block.ls2) is not nn.Identity

    def hooked(self) -> bool:
        """Whether a forward hook would see the block's submodules run (a user's, registered after
        patch, or a global one): then the generic path runs, which calls the modules."""
        return forward_hooked(self.modules)


class _QueryBlock(torch.autograd.Function):
    """The query rows [B, Q, D] through a plain timm `Block` (`_query_block_plan`) as one autograd
    node: the ops of `_QueryRun` in the same order, computed without autograd recording,

        h1 = LN1(q);  qh = heads(h1 W_q^T + b_q);  o = attention(qh, K, V)       (`_QueryAttention`)
        y  = q + ls1(o W_p^T + b_p);  z = y + ls2(fc2(GELU(fc1(LN2(y)))))

    given h = LN1(tokens) and qkv = attn.qkv(h) (`forward`), or together with the tokens' own
    block forward (`_QueryTokenBlock`). Backward is that chain's gradient for q alone (the block
    is frozen: `FusedVQTBlock` runs the reference when a parameter requires grad) with the
    formulas autograd uses for each op (native LayerNorm / GELU backward, grad @ W for a Linear,
    the query attention backward). Saves what the op-by-op graph saves: q, LN1's row statistics,
    qh, h, the attention output and lse, y, LN2's statistics and fc1's output (all query-row
    sized except h, [B, N, D] as in `_QueryAttention`)."""

    @staticmethod
    def forward(ctx, q, h, qkv, block, plan, impls, absorbed):
        attn = block.attn
        B, Qn, _ = q.shape
        H, d = attn.num_heads, attn.head_dim
        A, N = H * d, h.shape[1]
        n1 = block.norm1
        weight, bias = attn.qkv.weight, attn.qkv.bias
        h1, mean1, rstd1 = torch.native_layer_norm(q, n1.normalized_shape, n1.weight, n1.bias, n1.eps)
        qh = F.linear(h1, weight[:A], None if bias is None else bias[:A]).view(B, Qn, H, d).transpose(1, 2)
        kv = qkv.view(B, N, 3, H, d)
        out, lse = impls[0](qh, kv[:, :, 1].transpose(1, 2), kv[:, :, 2].transpose(1, 2), float(attn.scale))
        a = F.linear(out.transpose(1, 2).reshape(B, Qn, A), attn.proj.weight, attn.proj.bias)
        y = q + (a * block.ls1.gamma if plan.ls1 else a)
        n2, mlp = block.norm2, block.mlp
        h2, mean2, rstd2 = torch.native_layer_norm(y, n2.normalized_shape, n2.weight, n2.bias, n2.eps)
        f1 = F.linear(h2, mlp.fc1.weight, mlp.fc1.bias)
        m = F.linear(F.gelu(f1, approximate=mlp.act.approximate), mlp.fc2.weight, mlp.fc2.bias)
        z = y + (m * block.ls2.gamma if plan.ls2 else m)
        _QueryBlock._save(ctx, block, plan, impls, absorbed, q, mean1, rstd1, qh, h, out, lse, y, mean2, rstd2, f1)
        return z

    @staticmethod
    def _save(ctx, block, plan, impls, absorbed, *tensors):
        ctx.save_for_backward(*tensors)
        ctx.block, ctx.plan, ctx.backward_impl, ctx.absorbed = block, plan, impls[1], absorbed

    @staticmethod
    @once_differentiable
    def backward(ctx, gz, *_):
        return (_QueryBlock._grad_q(ctx, gz),) + (None,) * 6

    @staticmethod
    def _grad_q(ctx, gz):
        q, mean1, rstd1, qh, h, out, lse, y, mean2, rstd2, f1 = ctx.saved_tensors
        block, plan = ctx.block, ctx.plan
        attn, mlp, n1, n2 = block.attn, block.mlp, block.norm1, block.norm2
        B, Qn, _ = q.shape
        H, d = attn.num_heads, attn.head_dim
        A = H * d
        aten = torch.ops.aten
        gm = gz * block.ls2.gamma if plan.ls2 else gz
        gf1 = aten.gelu_backward(gm.matmul(mlp.fc2.weight), f1, approximate=mlp.act.approximate)
        gy = gz + aten.native_layer_norm_backward(gf1.matmul(mlp.fc1.weight), y, n2.normalized_shape, mean2, rstd2,
                                                  n2.weight, n2.bias, [True, False, False])[0]
        ga = gy * block.ls1.gamma if plan.ls1 else gy
        gout = ga.matmul(attn.proj.weight).view(B, Qn, H, d).transpose(1, 2)
        gqh = _attention_grad_q(gout, qh, h, out, lse, attn.qkv.weight, attn.qkv.bias, float(attn.scale),
                                ctx.backward_impl, ctx.absorbed)
        gh1 = gqh.transpose(1, 2).reshape(B, Qn, A).matmul(attn.qkv.weight[:A])
        return gy + aten.native_layer_norm_backward(gh1, q, n1.normalized_shape, mean1, rstd1, n1.weight, n1.bias,
                                                    [True, False, False])[0]


class _QueryTokenBlock(torch.autograd.Function):
    """`_QueryBlock` with the original tokens x [B, N, D] run through the same block in the same
    call (timm's `Block.forward`, op for op: LayerNorm, qkv, SDPA, proj, residual, LayerNorm, MLP,
    residual), the query rows riding along in each frozen GEMM ([queries ; tokens] rows, as the
    reference runs them: one read of each weight instead of two). Returns (query rows' output,
    tokens' output); only the first is differentiable, with `_QueryBlock`'s backward and saved
    tensors (the query-row ones copied out of the concatenated GEMM outputs, so that no saved
    tensor keeps the token rows alive). The tokens' rows equal the frozen block's wherever the
    GEMMs give the same rows on [Q + N] rows as on [N] (the reference's own premise,
    tests/methods/test_vqt.py)."""

    @staticmethod
    def forward(ctx, q, x, block, plan, impls, absorbed):
        ctx.set_materialize_grads(False)
        attn, mlp, n1, n2 = block.attn, block.mlp, block.norm1, block.norm2
        B, Qn, D = q.shape
        N = x.shape[1]
        H, d = attn.num_heads, attn.head_dim
        A = H * d
        ln = torch.native_layer_norm
        h1, mean1, rstd1 = ln(q, n1.normalized_shape, n1.weight, n1.bias, n1.eps)
        h = F.layer_norm(x, n1.normalized_shape, n1.weight, n1.bias, n1.eps)
        qkv = F.linear(torch.cat((h1, h), 1), attn.qkv.weight, attn.qkv.bias)  # [B, Q + N, 3A]
        t = qkv[:, Qn:].reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
        qt, k, v = t.unbind(0)
        ot = F.scaled_dot_product_attention(qt, k, v, dropout_p=0.0)
        # (a copy: a view would keep the whole [B, Q + N, 3A] output alive as a saved tensor)
        qh = qkv[:, :Qn, :A].reshape(B, Qn, H, d).transpose(1, 2).clone(memory_format=torch.contiguous_format)
        out, lse = impls[0](qh, k, v, float(attn.scale))
        o = torch.cat((out.transpose(1, 2).reshape(B, Qn, A), ot.transpose(1, 2).reshape(B, N, A)), 1)
        a = F.linear(o, attn.proj.weight, attn.proj.bias)
        if plan.ls1:
            a = a * block.ls1.gamma
        y = q + a[:, :Qn]
        x = x + a[:, Qn:]
        h2, mean2, rstd2 = ln(y, n2.normalized_shape, n2.weight, n2.bias, n2.eps)
        f1 = F.linear(torch.cat((h2, F.layer_norm(x, n2.normalized_shape, n2.weight, n2.bias, n2.eps)), 1),
                      mlp.fc1.weight, mlp.fc1.bias)
        m = F.linear(F.gelu(f1, approximate=mlp.act.approximate), mlp.fc2.weight, mlp.fc2.bias)
        if plan.ls2:
            m = m * block.ls2.gamma
        z = y + m[:, :Qn]
        x = x + m[:, Qn:]
        ctx.mark_non_differentiable(x)
        _QueryBlock._save(ctx, block, plan, impls, absorbed, q, mean1, rstd1, qh, h, out, lse, y, mean2, rstd2,
                          f1[:, :Qn].clone())
        return z, x

    @staticmethod
    @once_differentiable
    def backward(ctx, gz, _gx):
        if gz is None:
            return (None,) * 6
        return (_QueryBlock._grad_q(ctx, gz),) + (None,) * 5


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
            from ..ops.vqt import vqt_aggregate

            self.features = functools.partial(_aggregate, vqt_aggregate)


def _aggregate(op, pooled: torch.Tensor, query_outputs: list[torch.Tensor]) -> torch.Tensor:
    """The fused L2-normalise-and-concatenate `op`, or the method's `vqt_features` in a mixed
    multi-task batch (fastpeft/block.py vmapped: the op has no per-row form)."""
    return (vqt_features if vmapped(pooled) else op)(pooled, query_outputs)


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
            fns[0].bind(blk)
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
