"""Conv-Adapter under `fastpeft.patch` (the ConvNet family: `patch` takes these rules instead of
the ViT ones when the injected method serves ConvNets).

* `ConvAdapterRule`: each adapter's 1x1 up-projection, activation, scale and add to the frozen
  branch run as one fused epilogue after the grouped conv (fastpeft/ops/conv_adapter.py; saves
  the w-wide conv output only). ResNet Bottlenecks get a fused instance `forward`, ConvNeXt's
  parallel-adapter hooks are swapped for fused twins at the same position.
* `ConvRecomputeRule` (`recompute=True`): every adapted block runs under activation checkpointing
  (keeps the block input, recomputes the rest in backward). BatchNorms in train mode update their
  running statistics in the forward only: during the recompute their momentum is 0 and their
  `num_batches_tracked` is put back, so the statistics equal the reference's. A byte-budget plan
  (`ConvRecomputeRule._plan`, like fastpeft/recompute.py's `plan_keeps` for ViTs) spends what
  BYTE_BUDGET x the reference's saved bytes leaves on keeping frozen conv outputs (torch's
  selective checkpointing), the 3x3 convs of the late stages first: feature maps shrink 4x per
  stage while a ResNet block's multiply-adds stay the same, so those outputs spare the most
  recompute per byte.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..methods.base import OutputHook
from ..methods.conv_adapter import _AdaptedBottleneck, _ParallelAdapter
from ..recompute import SAC_HOOK_OPTS, BYTE_BUDGET
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
                                   "after the grouped conv (saves the w-wide conv output only)", backend))
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


_aten = torch.ops.aten
_GEMMS = frozenset({_aten.addmm.default, _aten.mm.default})


def _keep_policy(keep_ptrs: frozenset[int], ctx, op, *args, **kwargs):
    """Selective checkpointing: keep the outputs of the planned frozen layers (their convolution /
    GEMM recognised by the weight's data pointer), recompute everything else."""
    if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return CheckpointPolicy.PREFER_RECOMPUTE  # nothing to keep for backward (the first block)
    w = args[1] if op is _aten.convolution.default else args[-1] if op in _GEMMS else None
    if isinstance(w, torch.Tensor):
        try:
            if w.data_ptr() in keep_ptrs:
                return CheckpointPolicy.MUST_SAVE
        except RuntimeError:  # tensors without storage (tracing): recompute
            pass
    return CheckpointPolicy.PREFER_RECOMPUTE


def _contexts(block: nn.Module, keep: tuple[nn.Module, ...]):
    """(forward, recompute) contexts of one checkpointed block: BatchNorm statistics updated once;
    with planned layers, torch's selective checkpointing keeps their outputs."""
    if not keep:
        return contextlib.nullcontext(), _recompute_keeps_bn_stats(block)
    fwd, rec = create_selective_checkpoint_contexts(
        functools.partial(_keep_policy, frozenset(m.weight.data_ptr() for m in keep)))

    @contextlib.contextmanager
    def recompute():
        with _recompute_keeps_bn_stats(block), rec:  # (the statistics' copies outside the policy's sight)
            yield

    return fwd, recompute()


class CheckpointedForward:
    """Instance `forward` of a block under `recompute=True`: the block's forward (its fused or
    reference instance forward, else its class's) under non-reentrant checkpointing that keeps the
    block input and the outputs of the layers in `keep` (set by the byte-budget plan)."""

    def __init__(self, block: nn.Module, inner):
        self.block = block
        self.inner = inner  # None: the class's forward
        self.keep: tuple[nn.Module, ...] = ()

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.inner is not None:
            return self.inner(x)
        return type(self.block).forward(self.block, x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self._run(x)
        return checkpoint(self._run, x, use_reentrant=False, **SAC_HOOK_OPTS,
                          context_fn=functools.partial(_contexts, self.block, self.keep))


#: the frozen layers of a block whose outputs a norm or activation saves for backward (so that
#: keeping one spares its re-run): ResNet Bottleneck convs (each feeds a BatchNorm), ConvNeXt's
#: conv_dw (the LayerNorm's input with the adapter's sum) and mlp.fc1 (the GELU's input)
_KEEPABLE = ("conv1", "conv2", "conv3", "downsample.0", "conv_dw", "mlp.fc1")
#: probe images: every ResNet / ConvNeXt feature map is then an exact (64 / size)^2 share of the
#: one at any size that is a multiple of 32, so the plan holds at every such size
PROBE_SIZE = 64


def _keepable(block: nn.Module) -> dict[str, nn.Module]:
    out = {}
    for name in _KEEPABLE:
        try:
            mod = block.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and not mod.weight.requires_grad:
            out[name] = mod
    return out


def _macs_per_output(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return mod.in_features
    return mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]


@contextlib.contextmanager
def _probing(model: nn.Module):
    """Probe forwards in train mode (what a training step saves) that leave no trace: buffers
    (BatchNorm statistics), modes and the random number generators are restored."""
    buffers = [(b, b.clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.train()
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)


def _per_image_bytes(model: nn.Module, on_shapes=None) -> float:
    """Saved activation bytes per image of a training forward (fastpeft.profile), from probes of 2
    and 4 images at PROBE_SIZE: half the difference (parts that do not grow with the batch, such
    as per-channel statistics, must not count)."""
    from ..profile import saved_activation_bytes

    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    p = next(model.parameters())
    sizes = []
    with _probing(model):
        for b in (2, 4):
            x = torch.randn(b, first.in_channels, PROBE_SIZE, PROBE_SIZE, device=p.device, dtype=p.dtype)
            sizes.append(saved_activation_bytes(lambda: model(x), exclude=[model]))
    return (sizes[1] - sizes[0]) / 2


class _OutputRecorder:
    """Forward hook of `ConvRecomputeRule._plan`'s probe: one image's output elements and the
    element size of a layer. Draws nothing."""

    def __init__(self, shapes: dict, key):
        self.shapes, self.key = shapes, key

    def __call__(self, mod, args, out):
        self.shapes[self.key] = (out[0].numel(), out.element_size())


class ReferenceProbe:
    """Runs first when `recompute=True`: the reference's saved bytes per image, measured before
    any rule swaps anything, for the recompute rule's byte budget."""

    name = "recompute probe"

    def __init__(self, target: "ConvRecomputeRule"):
        self.target = target

    def apply(self, model, info, backend, recompute, report):
        if recompute:
            self.target.reference_bytes = _per_image_bytes(model)
        return []

    def undo(self, model, record):  # (records nothing)
        pass


class ConvRecomputeRule:
    """`recompute=True`: every adapted block runs checkpointed (keeps its input), and the bytes the
    budget leaves (BYTE_BUDGET x the reference's, measured by `ReferenceProbe`) keep the outputs
    of frozen convs / Linears whose re-run costs the most per byte kept (`_plan`)."""

    name = "recompute"

    def __init__(self, budget: float = BYTE_BUDGET):
        self.budget = budget
        self.reference_bytes: float | None = None

    def apply(self, model, info, backend, recompute, report):
        if not recompute:
            return []
        records, wrappers = [], {}
        for site in info.blocks:
            blk = model.get_submodule(site.path)
            blk.forward = wrappers[site.path] = CheckpointedForward(blk, blk.__dict__.get("forward"))
            records.append(site.path)
        if not records:
            return records
        try:
            kept = self._plan(model, wrappers)
        except BaseException:
            for path in records:
                self.undo(model, path)
            raise
        what = "activation checkpointing (keeps each block's input; train-mode BatchNorm statistics updated once)"
        if kept:
            what += "; the byte-budget plan also keeps the outputs of " + ", ".join(
                f"{name} in {n} blocks" for name, n in sorted(kept.items()))
        report.patched.append((f"{len(records)} blocks", what, "torch"))
        return records

    def _plan(self, model, wrappers: dict[str, CheckpointedForward]) -> dict[str, int]:
        """Greedy: options (block, layer) by multiply-adds spared per byte kept, later blocks first
        among equals, each taken while the per-image bytes stay within budget x the reference's.
        Returns {layer name: blocks keeping it}."""
        if self.reference_bytes is None:
            return {}
        shapes: dict[tuple[str, str], tuple[int, int]] = {}
        layers: dict[tuple[str, str], nn.Module] = {}
        handles = []
        for path in wrappers:
            for name, mod in _keepable(model.get_submodule(path)).items():
                layers[path, name] = mod
                handles.append(mod.register_forward_hook(_OutputRecorder(shapes, (path, name))))
        try:
            kept = _per_image_bytes(model)
        finally:
            for h in handles:
                h.remove()
        room = self.budget * self.reference_bytes - kept
        order = {path: i for i, path in enumerate(wrappers)}
        options = sorted((-_macs_per_output(layers[key]) / elsize, -order[key[0]], numel * elsize, key)
                         for key, (numel, elsize) in shapes.items())
        plan: dict[str, list[nn.Module]] = {}
        counts: dict[str, int] = {}
        for _, _, cost, (path, name) in options:
            if cost <= room:
                plan.setdefault(path, []).append(layers[path, name])
                counts[name] = counts.get(name, 0) + 1
                room -= cost
        for path, mods in plan.items():
            wrappers[path].keep = tuple(mods)
        return counts

    def undo(self, model, path):
        blk = model.get_submodule(path)
        inner = blk.__dict__["forward"].inner
        if inner is None:
            del blk.forward
        else:
            blk.forward = inner


def convnet_rules():
    """The rules `patch` applies to ConvNets, in order: the reference is measured first, and
    recompute wraps what the fusion installed."""
    recompute = ConvRecomputeRule()
    return [ReferenceProbe(recompute), ConvAdapterRule(), recompute]
