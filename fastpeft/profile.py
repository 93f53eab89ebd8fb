"""Measurement helpers shared by the tests and the benchmark suite.

`saved_activation_bytes(fn)`: how many bytes of activations autograd keeps for backward while `fn`
runs — the "saved" column of `pytest bench` (bench/report.py). Exact and identical on CPU
and GPU (it counts storages, not allocator blocks).

`custom_op_keyset(func, args, kwargs)`: for a TorchDispatchMode that must see the aten ops a
custom op (`torch.ops.fastpeft.*`) issues inside its implementation, not only the custom op: the
dispatch key set that runs that implementation (see `bench.measure.HostOpCounter`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = ["saved_activation_bytes", "custom_op_keyset"]

_DISPATCH_KEY_OF_DEVICE = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def custom_op_keyset(func, args=(), kwargs=None):
    """The dispatch key set that runs `func`'s backend implementation for these arguments (its
    kernel for the arguments' device, else its CompositeExplicitAutograd one), or None.

    Inside a TorchDispatchMode's handler the mode is popped, so a custom op called there runs its
    implementation unobserved; `with mode: func.redispatch(keyset, *args, **kwargs)` runs it with
    the mode active, so each aten op the implementation issues reaches the mode (re-dispatching
    with the mode active but without the key set would re-enter the handler for the same op)."""
    from torch.utils._pytree import tree_leaves

    dev = next((t.device.type for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)), "cpu")
    for name in (_DISPATCH_KEY_OF_DEVICE.get(dev), "CompositeExplicitAutograd"):
        if name is None:
            continue
        key = getattr(torch._C.DispatchKey, name)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key):
            return torch._C.DispatchKeySet(key)
    return None


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse / nested / tensor subclasses without storage
        return None
    return (st.device.index if st.device.type != "cpu" else -1, st.data_ptr()) if st.nbytes() else None


def _storage_nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return int(t.numel() * t.element_size())


def _is_parameter(t: torch.Tensor) -> bool:
    """A Parameter, or a view of one (nn.Linear saves `weight.t()`, a view whose base is the weight)."""
    while t is not None:
        if isinstance(t, nn.Parameter):
            return True
        t = t._base
    return False


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[nn.Module | torch.Tensor] = ()) -> int:
    """Run `fn()` and return the bytes of the distinct storages autograd saved for backward.

    Every tensor packed by autograd while `fn` runs (`torch.autograd.graph.saved_tensors_hooks`)
    is counted once per underlying storage (deduplicated by `untyped_storage().data_ptr()`, so
    views and tensors saved by several ops count once; a view counts its whole storage). Not
    counted, because they are resident anyway: parameters and views of parameters (always), and
    the parameters and buffers of the modules / the tensors given in `exclude` (pass the model to
    leave out e.g. BatchNorm running statistics saved in eval mode).

    `fn` is typically one training step (forward, or forward + backward + optimizer step): the
    saved tensors are kept alive until `fn` returns so that storage pointers stay unique, and no
    longer: a graph `fn` leaves behind cannot run backward afterwards. Tensors
    saved by a backward with `create_graph=True` count too. Returns an int (bytes).

        >>> saved_activation_bytes(lambda: model(x).sum().backward(), exclude=[model])
    """
    skip: set[tuple[int, int]] = set()
    for obj in exclude:
        tensors = [obj] if isinstance(obj, torch.Tensor) else [*obj.parameters(), *obj.buffers()]
        for t in tensors:
            key = _storage_key(t)
            if key is not None:
                skip.add(key)

    sizes: dict[tuple[int, int], int] = {}
    keep: list[torch.Tensor] = []  # hold storages until fn returns: a freed pointer could be reused
    held: list[_Held] = []

    def pack(t: torch.Tensor) -> _Held:
        if not _is_parameter(t):
            key = _storage_key(t)
            if key is not None and key not in skip and key not in sizes:
                sizes[key] = _storage_nbytes(t)
                keep.append(t)
        h = _Held(t)
        held.append(h)
        return h

    def unpack(h: _Held) -> torch.Tensor:
        return h.tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            fn()
    finally:
        # A packed tensor that is its own node's output (autograd saves those without a reference
        # of its own) is held here by a Python object inside the graph: a reference cycle through
        # C++ that the garbage collector cannot see, which would keep fn's whole graph alive for
        # good. fn's graph is not used after fn (its result is dropped): drop the references.
        for h in held:
            h.tensor = None
        keep.clear()
    return sum(sizes.values())


class _Held:
    """What `saved_activation_bytes`' pack hook hands autograd: the tensor, until fn returns."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
