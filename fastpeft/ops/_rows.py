"""Per-row forms of the fused ops, for a mixed multi-task batch (fastpeft/multitask.py).

A mixed batch runs the model once under `torch.func.vmap` over its rows, each row's method
tensors being its own task's (stacked over the tasks, gathered by the rows' task ids). Inside,
an op sees one row; a per-row form sees the whole batch at once: the activations with the row
dimension first ([B, 1, ...]: one image per vmapped row) and each task tensor either gathered
per row ([B, ...], the row's own task's) or shared ([...], not batched: the frozen weights).
`rows_call` is the bridge: called inside the vmapped forward, it hands the form the physical
tensors (row dimension moved to the front, unbatched ones as they are) and gives vmap back a
tensor batched on dim 0. The form runs at the physical level, so autograd records exactly
what it runs (its own autograd.Function, or torch ops) and the backward needs no vmap.

Eager only: under torch.compile the fused modules run the reference instead (torch's
compiler fuses it), since Dynamo inlines an autograd.Function's forward rather than calling
its vmap rule.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["rows_call", "batched"]


class _Rows(torch.autograd.Function):
    """Only its vmap rule runs (`rows_call` is called inside a vmapped forward)."""

    @staticmethod
    def forward(form, *tensors):  # pragma: no cover - never called outside vmap
        raise RuntimeError("fastpeft per-row op called outside a mixed multi-task batch")

    @staticmethod
    def setup_context(ctx, inputs, output):  # pragma: no cover - see forward
        pass

    @staticmethod
    def vmap(info, in_dims, form, *tensors):
        args = [t if d is None or t is None else t.movedim(d, 0) for t, d in zip(tensors, in_dims[1:])]
        out = form(info.batch_size, *args)
        if isinstance(out, tuple):
            return out, (0,) * len(out)
        return out, 0


def batched(t: torch.Tensor | None) -> bool:
    """Whether `t` is batched by the current vmap (one value per row)."""
    return t is not None and torch._C._functorch.is_batchedtensor(t)


def rows_call(form: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
    """Inside the vmapped mixed-batch forward: `form(B, *tensors)` on the physical tensors (the
    batched ones with their row dimension first; None and unbatched ones as they are), its
    result [B, ...] returned to vmap as one row's value. `form` must only use its arguments."""
    return _Rows.apply(form, *tensors)
