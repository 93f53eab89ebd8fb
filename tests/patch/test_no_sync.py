"""No host synchronisation in a patched train step (forward + backward), for every method of
`fastpeft.demo.demo_configs` (dropout on where the method has it), default `patch` and
`recompute=True`, on the torch, cpp and Triton (interpreter) backends.

A step is CUDA-graph safe only if nothing in it waits for the device: no `.item()` / `float()` /
`int()` / `bool()` of a tensor (`aten._local_scalar_dense`, `aten.is_nonzero`), no data-dependent
shapes (`aten.nonzero`, and with it masked indexing), no copy from a device to the host. On CPU
every tensor is already on the host, so these are caught at the op level by a TorchDispatchMode
that raises on them. The mode looks through custom ops (`fastpeft.profile.custom_op_keyset`), so
it also sees what a fused op's implementation does inside. Limits: Python code that reads a CPU
tensor's memory without dispatching an op (`.tolist()`, `.numpy()`) is invisible to it, and so is
the Triton interpreter's own work (the launch is stubbed here: on a GPU it is asynchronous).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastpeft
from fastpeft.demo import demo_configs
from fastpeft.profile import custom_op_keyset
from tests.methods.conftest import images, make_vit, randomize_

DEPTH = 2
LABELS = [label for label, _ in demo_configs(DEPTH)]
#: ops that read a value on the host or whose output shape depends on the data
SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "item", "masked_select", "unique", "_unique",
            "_unique2", "unique_dim", "unique_consecutive"}
#: indexing with a boolean mask is a nonzero inside the kernel (not dispatched on its own)
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put"}


class HostSyncError(RuntimeError):
    pass


class NoSyncMode(TorchDispatchMode):
    """Raises HostSyncError on an op that would make the host wait for the device; counts the ops
    it saw (`.ops`) so a test can check it was active."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = func.overloadpacket.__name__
        if func.namespace == "aten" and name in SYNC_OPS:
            raise HostSyncError(f"host synchronisation: {func} (a tensor's value read on the host)")
        if func.namespace == "aten" and name in INDEX_OPS and len(args) > 1:
            idx = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            if any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in idx):
                raise HostSyncError(f"host synchronisation: {func} with a boolean mask (data-dependent shape)")
        if func.namespace == "aten" and name in ("_to_copy", "copy_", "to", "_copy_from", "_copy_from_and_resize"):
            src = args[1] if name == "copy_" else args[0]
            if name == "copy_":
                dst_dev = args[0].device
            else:
                dst_dev = torch.device(kwargs["device"]) if kwargs.get("device") is not None else src.device
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_dev.type == "cpu":
                raise HostSyncError(f"device-to-host copy: {func} from {src.device}")
        if func.namespace not in ("aten", "prims"):
            keyset = custom_op_keyset(func, args, kwargs)
            if keyset is not None:
                with self:  # see what the fused op does inside
                    return func.redispatch(keyset, *args, **kwargs)
        return func(*args, **kwargs)


def _method(label: str):
    return next(m for name, m in demo_configs(DEPTH) if name == label)


def _stubbed_triton():
    from bench.measure import triton_launches_stubbed

    return triton_launches_stubbed()


def _backend_ready(backend: str) -> str | None:
    if backend == "cpp":
        from fastpeft import _ext

        st = _ext.load()
        return None if st.available else f"C++ extension not loaded: {st.reason}"
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton not installed"
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU tensors take Triton only under TRITON_INTERPRET=1 (tests/conftest.py sets it)"
    return None


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("recompute", [False, True], ids=["default", "recompute"])
@pytest.mark.parametrize("label", LABELS)
def test_patched_train_step_never_syncs(label, recompute, backend):
    why = _backend_ready(backend)
    if why:
        pytest.skip(why)
    m = make_vit(depth=DEPTH, img_size=32, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KAdaptation's official-init notice
        fastpeft.inject(m, _method(label))
    randomize_([p for _, p in fastpeft.trainable_parameters(m)])
    report = fastpeft.patch(m, backend=backend, recompute=recompute)
    m.train()
    x = images(batch=2, img_size=32)
    y = torch.tensor([1, 7])

    import contextlib

    from fastpeft.kernels import _common

    # backend "triton": the backward too (it runs outside the forward's kernel_call context)
    kctx = _common.backend("triton") if backend == "triton" else contextlib.nullcontext()
    stub = _stubbed_triton() if backend == "triton" else contextlib.nullcontext()
    with kctx, stub:
        m(x)  # first call (lazy set-up may legitimately read values once, e.g. shapes), then the step
        m.zero_grad(set_to_none=True)
        mode = NoSyncMode()
        with mode:
            loss = torch.nn.functional.cross_entropy(m(x), y)
            fwd_ops = mode.ops
            loss.backward()
    assert fwd_ops > 0 and mode.ops > fwd_ops, (fwd_ops, mode.ops)  # the mode saw forward and backward
    assert any(p.grad is not None for _, p in fastpeft.trainable_parameters(m)), str(report)


def _item_inside(x: torch.Tensor) -> torch.Tensor:
    return x * x.sum().item()


_lib_op = None


def _custom_op_calling_item():
    global _lib_op
    if _lib_op is None:
        @torch.library.custom_op("fastpeft_test::scale_by_sum", mutates_args=())
        def scale_by_sum(x: torch.Tensor) -> torch.Tensor:
            return _item_inside(x)

        _lib_op = scale_by_sum
    return _lib_op


@pytest.mark.parametrize("how", ["item", "float", "bool", "nonzero", "mask_index", "mask_assign",
                                 "masked_select", "custom_op"])
def test_no_sync_mode_catches_syncs(how):
    """The mode can fail: each way of reading a tensor's value on the host raises, including one
    hidden inside a custom op's implementation."""
    x = torch.randn(4, requires_grad=True)
    fns = {
        "item": lambda: x.sum().item(),
        "float": lambda: float(x.sum()),
        "bool": lambda: bool(x.sum() > 0),
        "nonzero": lambda: torch.nonzero(x),
        "mask_index": lambda: x[x > 0],
        "mask_assign": lambda: x.detach().clone().__setitem__(x.detach() > 0, 0.0),
        "masked_select": lambda: torch.masked_select(x, x > 0),
        "custom_op": lambda: _custom_op_calling_item()(x.detach()),
    }
    with pytest.raises(HostSyncError):
        with NoSyncMode():
            fns[how]()
    with NoSyncMode() as mode:  # and sync-free code passes, with its ops seen
        (x * 2).sum().backward()
    assert mode.ops >= 3
