"""Shared plumbing for the fused modules: swapping a reference hook for its fused twin in place
(same position among the layer's hooks, so the order of effects is unchanged) and running a kernel
call under the backend `patch` resolved for the model.

A fused kernel's dropout is its own Philox stream: keyed by one seed drawn from torch's generator
per call (whatever the shape) and numbered by element, regenerated in backward, never eager's
masks. On the class token's row alone (fastpeft/class_row.py) it draws that row a fresh mask,
distributed as the full block's would be, and leaves torch's generator where the full block
would: so the fused slots and projections are `class_row_local` with dropout on as well."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import nn

from ..methods.base import OutputHook, PetlBlock, SlotFn

T = TypeVar("T")


class AbsorbedHook(OutputHook):
    """Stands in, at the same position, for a reference hook whose effect a fused neighbour now
    computes (e.g. SSF after a LayerNorm, absorbed by the fused LayerNorm+SSF). Leaves the output
    unchanged; keeps the original for `unpatch`."""

    class_row_local = True  # it does nothing (the fused neighbour says for itself)

    def __init__(self, original: OutputHook, by: str):
        self.original = original
        self.by = by
        self.key = original.key

    @property
    def draws(self) -> bool:  # (the fused neighbour draws what the original drew)
        return self.original.draws

    def __call__(self, module, inputs, out):
        return None  # forward hooks returning None leave the output as it is


def swap_hook(layer: nn.Module, old: OutputHook, new: OutputHook) -> None:
    """Replace `old` by `new` in `layer`'s forward hooks, keeping its position and key."""
    hooks = layer._forward_hooks
    for hid, fn in hooks.items():
        if fn is old:
            new.key = old.key
            hooks[hid] = new
            return
    raise ValueError(f"hook {old!r} is not registered on {type(layer).__name__}")


def find_hooks(layer: nn.Module, cls: type) -> list[OutputHook]:
    return [fn for fn in layer._forward_hooks.values() if type(fn) is cls]


_KCOMMON = None


def _kernels_common():
    """fastpeft.kernels._common (lazy: importing triton waits for a kernel call), imported on the first fused call (importing it imports triton) and kept: an import
    statement per call costs a module lookup every time."""
    global _KCOMMON
    if _KCOMMON is None:
        from ..kernels import _common as mod
        _KCOMMON = mod
    return _KCOMMON


def kernel_call(backend: str, device_type: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """Call a fastpeft.kernels functional under the model's patch backend.

    Triton on CUDA and the torch math on CPU are what the kernels pick by themselves (no global
    state touched, so torch.compile traces straight through); only the explicit cross-overs
    (Triton interpreter on CPU tensors, torch math on CUDA tensors) switch the kernels' backend.

    A torch-function mode of fastpeft's own that says `fused_calls_exempt` (the class-row pass's
    dropout redirection, fastpeft/class_row.py) is popped for the call: a fused op draws no torch
    dropout, so there is nothing for it to redirect, and every tensor call inside the op would
    otherwise go through the mode's Python handler.
    """
    if not _is_compiling() and torch._C._is_torch_function_mode_enabled():
        mode = torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1)
        if getattr(mode, "fused_calls_exempt", False):
            torch._C._pop_torch_function_stack()
            try:
                return _kernel_call(backend, device_type, fn, *args, **kwargs)
            finally:
                torch._C._push_on_torch_function_stack(mode)
    return _kernel_call(backend, device_type, fn, *args, **kwargs)


_is_compiling = torch.compiler.is_compiling


def _kernel_call(backend: str, device_type: str, fn: Callable[..., T], *args, **kwargs) -> T:
    if backend == "triton" and device_type != "cuda":
        want = "triton"
    elif backend in ("torch", "cpp") and device_type == "cuda":
        want = "torch"
    else:
        return fn(*args, **kwargs)
    _kcommon = _kernels_common()
    if _kcommon.get_backend() == want:  # already in force (e.g. a whole step run under it)
        return fn(*args, **kwargs)
    with _kcommon.backend(want):
        return fn(*args, **kwargs)


def rows_form(backend: str) -> bool:
    """Whether a fused module that sees a vmapped input (a mixed multi-task batch, fastpeft/block.py
    `vmapped`) runs its family's per-row form: the Triton backend in eager mode. The CPU backends
    keep the reference, which vmap batches (on a CPU that is what the batched torch math is anyway),
    and so does torch.compile (`ops._rows.rows_call` is eager-only; the compiler fuses the reference)."""
    return backend not in ("torch", "cpp") and not torch.compiler.is_compiling()


def rows_kernel_call(backend: str, form: Callable[..., T], *tensors) -> T:
    """`ops._rows.rows_call(form, *tensors)` (tensors[0]: the vmapped activation) under the model's
    patch backend, as `kernel_call`."""
    from ..ops._rows import rows_call

    return kernel_call(backend, tensors[0].device.type, rows_call, form, *tensors)


class SlotRule:
    """A patch rule that swaps reference slot functions (by exact type, see `fused`) for fused
    twins at the same position in their block slot. A fused twin is built as `cls(original,
    backend)` and keeps `.original` for `unpatch`. `skip(fn)` may return a reason to leave one."""

    name = "slots"
    fused: dict[type, type] = {}
    what = "fused slot"
    #: on the CPU backends the fused op runs as torch math; a rule whose fusion saves no memory
    #: there (it is a launch/traffic win for GPUs) leaves the reference in place, saying why
    cpu_reason: str | None = None

    def skip(self, fn: SlotFn) -> str | None:
        return None

    def apply(self, model, info, backend, recompute, report):
        records = []
        for i, blk in enumerate(model.blocks):
            if not isinstance(blk, PetlBlock):
                continue
            for slot, fns in blk._fastpeft_slots.items():
                for j, fn in enumerate(fns):
                    cls = self.fused.get(type(fn))
                    if cls is None:
                        continue
                    why = self.cpu_reason if backend in ("torch", "cpp") else self.skip(fn)
                    if why:
                        report.left_alone.append((f"blocks.{i} {slot}", why))
                        continue
                    fns[j] = cls(fn, backend)
                    fns[j].key = fn.key
                    records.append((f"blocks.{i}", slot, j))
        if records:
            kinds = sorted({type(model.get_submodule(p)._fastpeft_slots[s][j]).__name__ for p, s, j in records})
            report.patched.append((f"{len(records)} {self.name} slots", f"{self.what} ({', '.join(kinds)})", backend))
        return records

    def undo(self, model, record):
        path, slot, j = record
        fns = model.get_submodule(path)._fastpeft_slots[slot]
        fns[j] = fns[j].original
