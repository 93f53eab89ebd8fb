"""Autograd helpers shared by the op families' eager `torch.autograd.Function`s."""
from __future__ import annotations

import functools

import torch


def once_differentiable(backward):
    """`torch.autograd.function.once_differentiable` without its cost on the common path.

    A backward runs with grad mode off unless the caller asked for a graph of the gradients
    (`backward(create_graph=True)`, `autograd.grad(..., create_graph=True)`). Only then does
    torch's decorator do anything (outputs routed through a node that raises when differentiated
    again), so that case keeps it unchanged; otherwise the backward is called directly, without
    torch's `no_grad` context and output inspection around it (grad mode is already off)."""
    guarded = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            return guarded(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper


def remaker(t: torch.Tensor):
    """The autograd node that made `t`, where its op can make `t`'s value again from what it keeps
    for its own backward (its Function's `output_again(ctx)`), else None. What
    fastpeft/recompute.py's lean halves hold instead of re-running the layers that made `t`."""
    node = t.grad_fn
    cls = getattr(type(node), "_forward_cls", None)
    return node if cls is not None and hasattr(cls, "output_again") else None


def remake(node) -> torch.Tensor | None:
    """The output of `remaker`'s node again, bit for bit (before that node's backward has run),
    or None where it did not keep what that takes."""
    return type(node)._forward_cls.output_again(node)
