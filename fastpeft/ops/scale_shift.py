"""scale_shift: y = x * scale + shift over the last dim (the SSF per-channel affine).

Layers, each doing one job:
  scale_shift_ref                   plain-torch reference: the spec, the fallback, the test oracle
  torch.ops.fastpeft.scale_shift    the custom op: C++/CUDA kernels from fastpeft._C, or the
                                    reference registered here when the extension is unavailable;
                                    fake + autograd formulas are registered here in both cases
  scale_shift                       public functional: validates (ValueError), casts params, calls the op

Shapes: x [..., C] (any leading shape, including 0 rows; any strides), scale [C], shift [C].
Dtypes: float32, float16, bfloat16; arithmetic is fp32 for every dtype.
"""

from __future__ import annotations

import torch

from fastpeft import _ext
from ..kernels._common import use_triton
from ..kernels.ssf import launch_ssf_bwd, launch_ssf_fwd

_OP = "fastpeft::scale_shift"
_BWD_OP = "fastpeft::scale_shift_backward"

# Must match csrc/ops.cpp (tests/test_ext.py checks that both define the same schemas).
SCHEMAS = {
    _OP: "(Tensor x, Tensor scale, Tensor shift) -> Tensor",
    _BWD_OP: "(Tensor grad_out, Tensor x, Tensor scale) -> (Tensor, Tensor, Tensor)",
}

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def scale_shift_ref(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Reference forward: computed in fp32, rounded once to x.dtype, returned contiguous."""
    y = x.float() * scale.float() + shift.float()
    return y.to(x.dtype).contiguous()


def scale_shift_backward_ref(
    grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference backward: (grad_x, grad_scale, grad_shift), reductions accumulated in fp32."""
    g = grad_out.float()
    leading = tuple(range(x.dim() - 1))
    grad_x = (g * scale.float()).to(x.dtype).contiguous()
    grad_scale = (g * x.float()).sum(dim=leading).to(x.dtype)
    grad_shift = g.sum(dim=leading).to(x.dtype)
    return grad_x, grad_scale, grad_shift


# --- custom op registration --------------------------------------------------------------

def _checked_forward_ref(x, scale, shift):
    """The reference as the op's kernel, after the compiled kernels' argument checks."""
    _validate(x, scale, shift, op=_OP)
    return scale_shift_ref(x, scale, shift)


def _checked_backward_ref(grad_out, x, scale):
    _validate_backward(grad_out, x, scale)
    return scale_shift_backward_ref(grad_out, x, scale)


def _op_exists(qualname: str) -> bool:
    namespace, name = qualname.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def _register_reference_ops(status: _ext.ExtensionStatus) -> None:
    if not status.available:
        # The C++ library is absent: define the same schemas here, once per process.
        for qualname, schema in SCHEMAS.items():
            if not _op_exists(qualname):
                torch.library.define(qualname, schema)
        torch.library.impl(_OP, "CompositeExplicitAutograd")(_checked_forward_ref)
        torch.library.impl(_BWD_OP, "CompositeExplicitAutograd")(_checked_backward_ref)
    elif not status.has_cuda:
        # A CPU-only build: CUDA tensors run the Triton scale-shift kernels (or the reference
        # where Triton cannot run), so there is one scale-shift op on every device.
        torch.library.register_kernel(_OP, "cuda")(_cuda_forward)
        torch.library.register_kernel(_BWD_OP, "cuda")(_cuda_backward)


def _cuda_forward(x, scale, shift):
    if not use_triton(x):
        return scale_shift_ref(x, scale, shift)
    return launch_ssf_fwd(x, scale, shift, 0)


def _cuda_backward(grad_out, x, scale):
    if not use_triton(x):
        return scale_shift_backward_ref(grad_out, x, scale)
    return launch_ssf_bwd(grad_out.contiguous(), x, scale, scale, 0)  # (the shift is unused at act 0)


_register_reference_ops(_ext.load())


# Fake (meta) impls describe output metadata for torch.compile / FakeTensor tracing. Outputs
# are always contiguous, whatever the input strides (both kernels and the reference agree).
@torch.library.register_fake(_OP)
def _scale_shift_fake(x, scale, shift):
    _validate(x, scale, shift, op=_OP)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake(_BWD_OP)
def _scale_shift_backward_fake(grad_out, x, scale):
    _validate_backward(grad_out, x, scale)
    c = x.shape[-1]
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        x.new_empty((c,)),
        x.new_empty((c,)),
    )


def _setup_context(ctx, inputs, output):
    x, scale, _shift = inputs
    ctx.save_for_backward(x, scale)


def _backward(ctx, grad_out):
    x, scale = ctx.saved_tensors
    grad_x, grad_scale, grad_shift = torch.ops.fastpeft.scale_shift_backward(grad_out, x, scale)
    need_x, need_scale, need_shift = ctx.needs_input_grad
    return (
        grad_x if need_x else None,
        grad_scale if need_scale else None,
        grad_shift if need_shift else None,
    )


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


# Double backward (e.g. gradient penalties) of the linear backward op, in plain torch ops:
#   grad_x = g * s,  grad_scale = sum(g * x),  grad_shift = sum(g)
def _setup_backward_context(ctx, inputs, output):
    grad_out, x, scale = inputs
    ctx.save_for_backward(grad_out, x, scale)


def _backward_backward(ctx, gg_x, gg_scale, gg_shift):
    grad_out, x, scale = ctx.saved_tensors
    need_g, need_x, need_scale = ctx.needs_input_grad
    leading = tuple(range(x.dim() - 1))
    d_g = d_x = d_scale = None
    if need_g:
        d_g = gg_x * scale + gg_scale * x + gg_shift
    if need_x:
        d_x = grad_out * gg_scale
    if need_scale:
        d_scale = (grad_out.float() * gg_x.float()).sum(dim=leading).to(scale.dtype)
    return d_g, d_x, d_scale


torch.library.register_autograd(_BWD_OP, _backward_backward, setup_context=_setup_backward_context)


# --- public functional -------------------------------------------------------------------

def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def _validate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, op: str = "scale_shift") -> None:
    """The functional's checks; `op` the registered op's name: the op (C++ kernels, its fake) also
    needs scale and shift in x's dtype (the functional casts them)."""
    for name, t in (("x", x), ("scale", scale), ("shift", shift)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scale_shift: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"scale_shift: x has unsupported dtype {x.dtype}; expected one of "
                         f"{', '.join(map(str, SUPPORTED_DTYPES))}")
    if x.dim() == 0:
        raise ValueError("scale_shift: x must have at least one dimension [..., C], got a scalar")
    width = x.shape[-1]
    for name, t in (("scale", scale), ("shift", shift)):
        if t.dim() != 1:
            raise ValueError(f"scale_shift: {name} must be 1-D of shape ({width},) to match x's last "
                             f"dim; got {name} {_describe(t)} for x {_describe(x)}")
        if t.shape[0] != width:
            raise ValueError(f"scale_shift: width mismatch: x's last dim is {width} but {name} has "
                             f"{t.shape[0]} elements (x {_describe(x)}, {name} {_describe(t)})")
        if t.device != x.device:
            raise ValueError(f"scale_shift: device mismatch: x is on {x.device} but {name} is on "
                             f"{t.device}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"scale_shift: {name} has unsupported dtype {t.dtype}; expected one "
                             f"of {', '.join(map(str, SUPPORTED_DTYPES))}")
        if op != "scale_shift" and t.dtype != x.dtype:
            raise ValueError(f"{op}: dtype mismatch: x is {x.dtype} but {name} is {t.dtype}")


def _validate_backward(grad_out, x, scale) -> None:
    op = _BWD_OP
    _validate(x, scale, scale, op=op)
    if not isinstance(grad_out, torch.Tensor):
        raise TypeError(f"{op}: grad_out must be a torch.Tensor, got {type(grad_out).__name__}")
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise ValueError(f"{op}: grad_out ({_describe(grad_out)}) must match x ({_describe(x)})")


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """y = x * scale + shift over the last dim.

    x: [..., C] float32/float16/bfloat16, any strides. scale, shift: [C], on x's device; a
    different float dtype (fp32 params with bf16 activations under autocast) is cast to
    x.dtype, differentiably. Returns a contiguous tensor of x's shape and dtype. Gradients
    flow to all three; the reductions for scale/shift accumulate in fp32.
    """
    _validate(x, scale, shift)
    if scale.dtype != x.dtype:
        scale = scale.to(x.dtype)
    if shift.dtype != x.dtype:
        shift = shift.to(x.dtype)
    return torch.ops.fastpeft.scale_shift(x, scale, shift)
