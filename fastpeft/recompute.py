"""Selective recomputation for `fastpeft.patch(model, recompute=True)`.

Where a frozen ViT's training memory goes (performance guide, AdaptFormer on ViT-B/16): per block,
SDPA's saved q/k/v/out (~38%), the GELU input [B, N, 4D] (~38%) and LayerNorm inputs. With a
frozen backbone, the Linear layers save nothing for their (frozen) weights, so everything else
autograd keeps is cheap to rebuild from the block input.

Each block runs its frozen paths (norm1 -> attention, norm2 -> MLP, with every method hook and
slot inside them) as checkpointed regions under torch's selective-activation-checkpoint policy:

* kept: each region's input (x and y: 2 x [B, N, D]) and the attention kernel's outputs (out and
  the log-sum-exp, [B, N, D] + small), so the attention forward is never run twice; and the
  output of a D-wide frozen Linear (attn.proj, mlp.fc2) whose hook needs it for its own
  backward anyway (SSF's scale): keeping it costs nothing the eager model does not keep, and
  saves re-running that GEMM;
* recomputed in backward: LayerNorms, q/k/v (one [D, 3D] GEMM from the saved input), the
  fc1 GEMM and its activation, every method's cheap intermediates (adapters, scale-shifts,
  low-rank products); dropout and DropPath masks are regenerated from the saved RNG state.

A region's recompute stops at the last saved tensor it must rebuild (torch's early stop), so the
GEMMs after it (proj, fc2) are not re-run; branches that read the residual stream rather than a
LayerNorm output (AdaptFormer's parallel adapter) are therefore checkpointed on their own instead
of after the MLP inside its region (they keep only the residual stream, which the MLP region
keeps anyway).

That is ~3 [B, N, D] tensors per block instead of ~10 (AdaptFormer) to ~21 (SSF), for the cost
of re-running the qkv and fc1 GEMMs (7 of the 24 D^2-per-token GEMM FLOPs of a frozen block's
forward + input-gradient backward), versus timm's `set_grad_checkpointing()`, which keeps only
x but re-runs the whole block including attention.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .methods.base import active_hooks

aten = torch.ops.aten

#: ops whose outputs are kept rather than recomputed: the attention kernels (expensive to re-run,
#: and their outputs are exactly what their backward needs).
KEEP_OPS = frozenset(
    op
    for op in (
        getattr(aten, name, None)
        for name in (
            "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
        )
    )
    if op is not None
)


_GEMMS = frozenset({aten.addmm.default, aten.mm.default})


def _policy(keep_ptrs: frozenset[int], ctx, op, *args, **kwargs):
    if op in KEEP_OPS or getattr(op, "overloadpacket", None) in KEEP_OPS:
        return CheckpointPolicy.MUST_SAVE
    # a kept Linear: its GEMM's second operand is a view of the kept weight (same data pointer)
    if keep_ptrs and op in _GEMMS:
        try:
            ptr = args[-1].data_ptr()
        except RuntimeError:  # tensors without storage (tracing under torch.compile): recompute
            return CheckpointPolicy.PREFER_RECOMPUTE
        if ptr in keep_ptrs:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_PLAIN_CONTEXT = functools.partial(create_selective_checkpoint_contexts, functools.partial(_policy, frozenset()))


def _kept_weights(block) -> frozenset[int]:
    """Data pointers of the D-wide frozen Linears whose output a hook saves anyway (module docstring)."""
    ptrs = set()
    for layer in (getattr(block.attn, "proj", None), getattr(block.mlp, "fc2", None)):
        if isinstance(layer, nn.Linear) and not layer.weight.requires_grad and any(
            h.saves_output for h in active_hooks(layer)
        ):
            ptrs.add(layer.weight.data_ptr())
    return frozenset(ptrs)


def _attn_core(block, x: torch.Tensor, kw: dict):
    """The frozen attention path: x -> (x', attn(norm1(x'))), x' = block_in(x) (returned only
    when block_in slots change it). LayerScale and DropPath run outside: DropPath's saved mask
    would otherwise make the recompute re-run the proj GEMM to reach it."""
    slots = block._fastpeft_slots
    for fn in slots["block_in"]:
        x = fn(x)
    a = block.attn(block.norm1(x), **kw)
    return (x, a) if slots["block_in"] else a


def _mlp_core(block, y: torch.Tensor) -> torch.Tensor:
    """The MLP path: y -> mlp_out(mlp(norm2(y))), and on through ls2, DropPath and the serial
    adapters (ffn_out) when there are any: those read the fc2 output, which is then recomputed
    rather than kept (one more [B, N, D] per block is more than the 0.4x byte budget leaves)."""
    slots = block._fastpeft_slots
    m = block.mlp(block.norm2(y))
    for fn in slots["mlp_out"]:
        m = fn(m)
    if not slots["ffn_out"]:
        return m
    f = block.drop_path2(block.ls2(m))
    for fn in slots["ffn_out"]:
        f = fn(f)
    return f


def _branch(fn, x: torch.Tensor) -> torch.Tensor:
    return fn(x, None)  # reads_norm is False: the branch does not read its second argument


def recompute_block(block, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """Run a PetlBlock under selective checkpointing (see module docstring).

    Same ops in the same order as `PetlBlock._attn_half` / `_mlp_half` (so the same values and the
    same RNG draws), but only the frozen paths (norm -> attention, norm -> MLP) are checkpointed:
    branches that read the residual stream rather than the LayerNorm output (AdaptFormer's
    parallel adapter) are checkpointed on their own (they keep nothing but the residual stream,
    which the frozen path's region keeps anyway). Each region's recompute stops at the last
    saved tensor it must rebuild, so the MLP's ends at the GELU input instead of re-running the
    fc2 GEMM only to reach the adapter's saved tensors.
    """
    # respect_saved_tensors_hooks: what the policy keeps goes through saved-tensor hooks like any
    # other saved tensor, so memory profilers (and offloading hooks) see it.
    context_fn = _PLAIN_CONTEXT
    if not torch.compiler.is_compiling():  # (traced tensors have no data pointers to match)
        keep = _kept_weights(block)
        if keep:
            context_fn = functools.partial(create_selective_checkpoint_contexts, functools.partial(_policy, keep))
    opts = dict(use_reentrant=False, context_fn=context_fn, respect_saved_tensors_hooks=True)
    slots = block._fastpeft_slots
    if any(fn.reads_norm for fn in slots["attn_branch"]):
        y = checkpoint(block._attn_half, x, kw, **opts)
    else:
        a = checkpoint(_attn_core, block, x, kw, **opts)
        if slots["block_in"]:
            x, a = a
        y = x + block.drop_path1(block.ls1(a))
        for fn in slots["attn_branch"]:
            y = y + checkpoint(_branch, fn, x, **opts)
    if any(fn.reads_norm for fn in slots["ffn_branch"]):
        return checkpoint(block._mlp_half, y, **opts)
    f = checkpoint(_mlp_core, block, y, **opts)
    z = y + (f if slots["ffn_out"] else block.drop_path2(block.ls2(f)))
    for fn in slots["ffn_branch"]:
        z = z + checkpoint(_branch, fn, y, **opts)
    for fn in slots["block_out"]:
        z = fn(z)
    return z
