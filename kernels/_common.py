"""Helpers shared by the Triton op families in `fastpeft.kernels`: backend choice, validation
messages, dtype names for ahead-of-time compilation.

Backend choice (`use_triton(*tensors)`), decided per call inside each custom op:
  * CUDA tensors                                  -> the Triton kernels (unless backend "torch")
  * CPU tensors, TRITON_INTERPRET=1 and backend "triton" requested
                                                  -> the Triton kernels through the interpreter
  * anything else                                 -> the plain-torch math of the op, which saves
                                                     exactly what the fused kernel saves
The backend is "auto" unless `FASTPEFT_KERNEL_BACKEND` (auto | triton | torch) or
`set_backend()` / `backend()` says otherwise.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

try:  # CPU-only torch wheels ship without triton: the ops then run their torch math.
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAVE_TRITON = False

    class _NoTriton:
        """Stands in for `triton` so kernel modules import; kernels are never launched."""

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

    triton = _NoTriton()
    tl = None

BACKENDS = ("auto", "triton", "torch")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Triton pointer type names for ASTSource signatures (kernels/aot.py).
TRITON_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
AOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_backend = os.environ.get("FASTPEFT_KERNEL_BACKEND", "auto").strip().lower() or "auto"
if _backend not in BACKENDS:
    warnings.warn(f"FASTPEFT_KERNEL_BACKEND={_backend!r} is not one of {BACKENDS}; using 'auto'",
                  RuntimeWarning, stacklevel=1)
    _backend = "auto"
_warned: set[str] = set()


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Select "auto" (Triton on CUDA, torch elsewhere), "triton" (also on CPU through
    TRITON_INTERPRET=1) or "torch" (always the torch math)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


@contextlib.contextmanager
def backend(name: str):
    """Context manager form of `set_backend`."""
    old = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (must be set before triton is
    imported; `triton.jit` decides at decoration time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether this call runs the Triton kernels (see the module docstring)."""
    if _backend == "torch":
        return False
    if not HAVE_TRITON:
        _warn_once("no-triton", "fastpeft.kernels: triton is not installed; using the torch "
                   "reference math for the fused ops")
        return False
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if on_cuda:
        return True
    if _backend == "triton":
        if interpreting():
            return True
        _warn_once("no-interpreter", "fastpeft.kernels: backend 'triton' was requested for CPU "
                   "tensors but TRITON_INTERPRET=1 is not set; using the torch reference math")
    return False


def describe(t: torch.Tensor | None) -> str:
    if t is None:
        return "None"
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def check_tensor(op: str, name: str, t, *, dim: int | None = None, shape=None,
                 like: torch.Tensor | None = None, dtype=None) -> None:
    """Raise ValueError/TypeError for a malformed op argument, naming shapes, dtypes, devices."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: {name} has unsupported dtype {t.dtype}; expected one of "
                         f"{', '.join(map(str, SUPPORTED_DTYPES))} ({name} {describe(t)})")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got {name} {describe(t)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {name} {describe(t)}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{op}: device mismatch: {name} is on {t.device} but x is on "
                             f"{like.device} ({name} {describe(t)}, x {describe(like)})")
        if dtype is None and t.dtype != like.dtype:
            raise ValueError(f"{op}: dtype mismatch: {name} is {t.dtype} but x is {like.dtype} "
                             f"({name} {describe(t)}, x {describe(like)})")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{op}: {name} must be {dtype}, got {name} {describe(t)}")


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as a contiguous [M, D] view (a copy only when x is not contiguous)."""
    return x.reshape(-1, x.shape[-1]) if x.is_contiguous() else x.contiguous().view(-1, x.shape[-1])


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
