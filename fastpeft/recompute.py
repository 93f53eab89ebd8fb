"""Selective recomputation for `fastpeft.patch(model, recompute=True)`.

Where a frozen ViT's training memory goes (performance guide, AdaptFormer on ViT-B/16): per block,
SDPA's saved q/k/v/out (~38%), the GELU input [B, N, 4D] (~38%) and LayerNorm inputs. With a
frozen backbone, the Linear layers save nothing for their (frozen) weights, so everything else
autograd keeps is cheap to rebuild from the block input.

Each block is run as two checkpointed halves (attention half x -> y, MLP half y -> z) under
torch's selective-activation-checkpoint policy:

* kept: each half's input (x and y: 2 x [B, N, D]) and the attention kernel's outputs (out and
  the log-sum-exp, [B, N, D] + small), so the attention forward is never run twice;
* recomputed in backward: LayerNorms, q/k/v (one [D, 3D] GEMM from the saved input), the
  fc1 GEMM and its activation, every method's cheap intermediates (adapters, scale-shifts,
  low-rank products); dropout and DropPath masks are regenerated from the saved RNG state.

That is ~3 [B, N, D] tensors per block instead of ~10 (AdaptFormer) to ~21 (SSF), for the cost
of re-running the qkv and fc1 GEMMs (7 of the 24 D^2-per-token GEMM FLOPs of a frozen block's
forward + input-gradient backward), versus timm's `set_grad_checkpointing()`, which keeps only
x but re-runs the whole block including attention.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

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


def _policy(ctx, op, *args, **kwargs):
    if op in KEEP_OPS or getattr(op, "overloadpacket", None) in KEEP_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_context_fn = functools.partial(create_selective_checkpoint_contexts, _policy)


def recompute_block(block, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """Run a PetlBlock's two halves under selective checkpointing (see module docstring)."""
    # respect_saved_tensors_hooks: what the policy keeps goes through saved-tensor hooks like any
    # other saved tensor, so memory profilers (and offloading hooks) see it.
    opts = dict(use_reentrant=False, context_fn=_context_fn, respect_saved_tensors_hooks=True)
    y = checkpoint(block._attn_half, x, kw, **opts)
    return checkpoint(block._mlp_half, y, **opts)
