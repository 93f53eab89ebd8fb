"""Conv-Adapter under `fastpeft.patch` (the ConvNet family: `patch` takes these rules instead of
the ViT ones when the injected method serves ConvNets).

* `ConvAdapterRule`: each adapter's 1x1 up-projection, activation, scale and add to the frozen
  branch run as one fused epilogue after the vendor grouped conv (fastpeft/ops/conv_adapter.py; saves
  the w-wide conv output only). ResNet Bottlenecks get a fused instance `forward`, ConvNeXt's
  parallel-adapter hooks are swapped for fused twins at the same position.
* `ConvRecomputeRule` (`recompute=True`): every adapted block runs under activation checkpointing
  (keeps the block input, recomputes the rest in backward). BatchNorms in train mode update their
  running statistics in the forward only: during the recompute their momentum is 0 and their
  `num_batches_tracked` is put back, so the statistics equal the reference's.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..methods.base import OutputHook
from ..methods.conv_adapter import _AdaptedBottleneck, _ParallelAdapter
from .common import kernel_call, swap_hook


def _fused(backend: str, x: torch.Tensor, base: torch.Tensor, mod) -> torch.Tensor:
    from ..ops import conv_adapter as kc

    c1, c2 = mod.conv1, mod.conv2
    return kernel_call(backend, x.device.type, kc.conv_adapter, x, base, c1.weight, c1.bias, c2.weight, c2.bias,
                       mod.se, stride=c1.stride[0], padding=c1.padding[0], act=mod.act)


class FusedBottleneck(_AdaptedBottleneck):
    """`_AdaptedBottleneck` with the adapter's epilogue fused into the sum after act2."""

    def __init__(self, original: _AdaptedBottleneck, backend: str):
        super().__init__(original.block)
        self.original = original
        self.backend = backend

    def adapted(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _fused(self.backend, h, y, self.block.tuning_module)


class FusedParallel(OutputHook):
    """`_ParallelAdapter` (out + A(x) on a frozen conv) with the epilogue fused."""

    additive = False

    def __init__(self, original: _ParallelAdapter, backend: str):
        self.original = original
        self.adapter = original.adapter
        self.backend = backend

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return _fused(self.backend, x, out, self.adapter)


class ConvAdapterRule:
    name = "ConvAdapter"

    def apply(self, model, info, backend, recompute, report):
        records = []
        for path, mod in model.named_modules():
            fwd = mod.__dict__.get("forward")
            if type(fwd) is _AdaptedBottleneck:
                mod.forward = FusedBottleneck(fwd, backend)
                records.append(("forward", path))
            for fn in list(mod._forward_hooks.values()):
                if type(fn) is _ParallelAdapter:
                    swap_hook(mod, fn, FusedParallel(fn, backend))
                    records.append(("hook", path))
        if records:
            report.patched.append((f"{len(records)} Conv-Adapters", "fused act/1x1 up-projection/scale/add epilogue "
                                   "after the vendor grouped conv (saves the w-wide conv output only)", backend))
        return records

    def undo(self, model, record):
        kind, path = record
        mod = model.get_submodule(path)
        if kind == "forward":
            mod.forward = mod.__dict__["forward"].original
            return
        for fn in list(mod._forward_hooks.values()):
            if isinstance(fn, FusedParallel):
                swap_hook(mod, fn, fn.original)


@contextlib.contextmanager
def _recompute_keeps_bn_stats(block: nn.Module):
    """While `block` is recomputed in backward: train-mode BatchNorms normalise with the batch
    statistics as in the forward but leave running mean / var and num_batches_tracked as they are."""
    bns = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.training and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (mom, nbt) in zip(bns, saved):
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def _contexts(block: nn.Module):
    return contextlib.nullcontext(), _recompute_keeps_bn_stats(block)


class CheckpointedForward:
    """Instance `forward` of a block under `recompute=True`: the block's forward (its fused or
    reference instance forward, else its class's) under non-reentrant checkpointing."""

    def __init__(self, block: nn.Module, inner):
        self.block = block
        self.inner = inner  # None: the class's forward

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.inner is not None:
            return self.inner(x)
        return type(self.block).forward(self.block, x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self._run(x)
        return checkpoint(self._run, x, use_reentrant=False,
                          context_fn=functools.partial(_contexts, self.block))


class ConvRecomputeRule:
    name = "recompute"

    def apply(self, model, info, backend, recompute, report):
        if not recompute:
            return []
        records = []
        for site in info.blocks:
            blk = model.get_submodule(site.path)
            blk.forward = CheckpointedForward(blk, blk.__dict__.get("forward"))
            records.append(site.path)
        if records:
            report.patched.append((f"{len(records)} blocks", "activation checkpointing (keeps each block's input; "
                                   "train-mode BatchNorm statistics updated once)", "torch"))
        return records

    def undo(self, model, path):
        blk = model.get_submodule(path)
        inner = blk.__dict__["forward"].inner
        if inner is None:
            del blk.forward
        else:
            blk.forward = inner


def convnet_rules():
    """The rules `patch` applies to ConvNets, in order (recompute wraps what the fusion installed)."""
    return [ConvAdapterRule(), ConvRecomputeRule()]
