"""Fused Conv-Adapter epilogue (fastpeft.methods.conv_adapter.ConvAdapterModule; official code
Hhhhhhao/Conv-Adapter `models/tuning_modules/conv_adapter.py`, "Design 2 v4"):

    out = base + se * (W2 act(h) + b2),   h = conv1(x) (the grouped k x k conv, with its bias)

x, base, out are NCHW; h [B, w, Ho, Wo] is the adapter's w = C_in / reduction wide intermediate;
W2 [C, w] is the 1x1 up-projection (`conv2`), se [C] the per-channel scale, act ReLU (ResNet) or
exact GELU (ConvNeXt); base is the frozen branch the adapter is added to (act2's output in a
ResNet Bottleneck, conv_dw's or a downsample conv's output in ConvNeXt).

The grouped conv stays the vendor's (cuDNN / ATen: its backward over the grid and groups is what
they provide); the Triton kernel `_ca_up_fwd_kernel` (kernels/conv_adapter.py) fuses everything
after it: act, the 1x1 GEMM per image ([C, w] x [w, Ho*Wo]), its bias, the scale and the add to
base, so neither act(h) nor the C-wide conv2 output is written or saved. Saved for backward: h
only (w-wide). Under torch.compile off CUDA the op runs `_up_torch`, the same math in torch.

CPU eager (and backend "torch"): `_AdapterFunction` runs the whole adapter in torch. The grouped
conv (w groups of C_in / w channels, one output channel each) is computed as the depthwise conv
of the same taps in channels_last followed by the sum over each group's channels (ATen's grouped
NCHW conv with one output channel per group is several times slower on CPU, in both directions);
the epilogue is batched GEMMs with the scale folded into W2 and the bias into a column of ones.
It saves what the Triton path saves (x and h); channels_last x is made again in backward.

Backward (vendor GEMMs on w-wide operands; deterministic):
  a = act(h) (recomputed), gs = se * g
  dh = (W2^T gs) * act'(h)              (then through the vendor conv1 by autograd)
  M = sum_b g_b a_b^T  [C, w]           dW2 = se * M,  db2 = se * sum(g),
  dse = rowsum(W2 * M) + b2 * sum(g)    (no C-wide recompute: se multiplies W2 a + b2)
  dbase = g
"""
from __future__ import annotations

import torch

from fastpeft.kernels._common import CheckedSignatures, check_tensor, describe, use_triton
from fastpeft.kernels.conv_adapter import ACTS, launch_up

__all__ = ["conv_adapter", "conv_adapter_ref"]


# ----------------------------------------------------------------------------------------------
# Validation and the torch twin of the kernel
# ----------------------------------------------------------------------------------------------
def _validate(h, w2, b2, se, base, act):
    op = "conv_adapter_up"
    check_tensor(op, "h", h, dim=4)
    B, K, Ho, Wo = h.shape
    check_tensor(op, "w2", w2, dim=2, like=h)
    C = w2.shape[0]
    if w2.shape[1] != K:
        raise ValueError(f"{op}: w2 must be [C, w] = [C, {K}] (the 1x1 conv weight [C, w, 1, 1]), got "
                         f"{describe(w2)} for h {describe(h)}")
    check_tensor(op, "b2", b2, shape=(C,), like=h)
    check_tensor(op, "se", se, shape=(C,), like=h)
    check_tensor(op, "base", base, shape=(B, C, Ho, Wo), like=h)
    if act not in ACTS:
        raise ValueError(f"{op}: act must be one of {sorted(ACTS)}, got {act!r}")


def _act_torch(h, act):
    return torch.relu(h) if act == "relu" else torch.nn.functional.gelu(h)


def _act_grad_torch(h, act):
    if act == "relu":
        return (h > 0).to(h.dtype)
    cdf = 0.5 * (1.0 + torch.erf(h * 0.7071067811865476))
    return cdf + h * torch.exp(-0.5 * h * h) * 0.3989422804014327


def _up_torch(h, w2, b2, se, base, act: str):
    f32 = torch.float32
    B, K, Ho, Wo = h.shape
    a = _act_torch(h.to(f32), act).to(h.dtype).to(f32).reshape(B, K, -1)
    y = torch.matmul(w2.to(f32), a) + b2.to(f32)[:, None]
    out = base.to(f32).reshape(B, -1, Ho * Wo) + se.to(f32)[:, None] * y
    return out.to(base.dtype).view(base.shape)


def _up_bwd(g, h, w2, b2, se, act: str):
    """(dh, dw2 [C, w], db2, dse) in h's dtype; dbase is g itself."""
    f32, dt = torch.float32, h.dtype
    B, K, Ho, Wo = h.shape
    hf = h.to(f32).reshape(B, K, -1)
    a = _act_torch(hf, act).to(dt).to(f32)
    g3 = g.to(f32).reshape(B, w2.shape[0], -1)
    gsum = g3.sum((0, 2))
    M = torch.einsum("bcs,bks->ck", g3, a)
    sef = se.to(f32)
    da = torch.matmul(w2.to(f32).t(), sef[:, None] * g3)
    dh = (da * _act_grad_torch(hf, act)).to(dt).view(h.shape)
    dw2 = (sef[:, None] * M).to(dt)
    db2 = (sef * gsum).to(dt)
    dse = ((w2.to(f32) * M).sum(1) + b2.to(f32) * gsum).to(dt)
    return dh, dw2, db2, dse


def _triton_ok(h) -> bool:
    return use_triton(h)


# ----------------------------------------------------------------------------------------------
# Custom op (what torch.compile traces) and the eager autograd.Function
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastpeft::conv_adapter_up", mutates_args=())
def _ca_up_op(h: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, se: torch.Tensor, base: torch.Tensor,
              act: str) -> torch.Tensor:
    _validate(h, w2, b2, se, base, act)
    return (launch_up if _triton_ok(h) else _up_torch)(h, w2, b2, se, base, act)


@_ca_up_op.register_fake
def _ca_up_fake(h, w2, b2, se, base, act):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastpeft::conv_adapter_up_backward", mutates_args=())
def _ca_up_backward_op(g: torch.Tensor, h: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, se: torch.Tensor,
                       act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _up_bwd(g, h, w2, b2, se, act)


@_ca_up_backward_op.register_fake
def _ca_up_backward_fake(g, h, w2, b2, se, act):
    return (torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(w2), torch.empty_like(b2),
            torch.empty_like(se))


def _setup(ctx, inputs, output):
    h, w2, b2, se, base, act = inputs
    ctx.save_for_backward(h, w2, b2, se)
    ctx.act = act


def _backward(ctx, g):
    h, w2, b2, se = ctx.saved_tensors
    dh, dw2, db2, dse = torch.ops.fastpeft.conv_adapter_up_backward(g, h, w2, b2, se, ctx.act)
    need = ctx.needs_input_grad
    return (dh if need[0] else None, dw2 if need[1] else None, db2 if need[2] else None, dse if need[3] else None,
            g if need[4] else None, None)


_ca_up_op.register_autograd(_backward, setup_context=_setup)


class _UpFunction(torch.autograd.Function):
    """The eager Triton path of `fastpeft::conv_adapter_up` (saves h): the same launcher."""

    @staticmethod
    def forward(ctx, h, w2, b2, se, base, act):
        out = launch_up(h, w2, b2, se, base, act)
        ctx.save_for_backward(h, w2, b2, se)
        ctx.act = act
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        h, w2, b2, se = ctx.saved_tensors
        dh, dw2, db2, dse = _up_bwd(g, h, w2, b2, se, ctx.act)
        need = ctx.needs_input_grad
        return (dh if need[0] else None, dw2 if need[1] else None, db2 if need[2] else None,
                dse if need[3] else None, g if need[4] else None, None)


# ----------------------------------------------------------------------------------------------
# The whole adapter as torch math (CPU, or backend "torch"): the grouped conv as a depthwise conv
# in channels_last plus a sum over each group's channels
# ----------------------------------------------------------------------------------------------
def _f32(t):
    return t if t.dtype == torch.float32 else t.float()


def _act_backward(da, h, act):
    """da * act'(h) in one pass (the aten backward kernels of relu / exact gelu)."""
    if act == "relu":
        return torch.ops.aten.threshold_backward(da, h, 0)
    return torch.ops.aten.gelu_backward(da, h)


def _memory_format(t):
    return torch.channels_last if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


class _AdapterFunction(torch.autograd.Function):
    """base + A(x) in torch, x's grouped conv (w groups of g = C_in / w channels, one output
    channel each) computed as the depthwise conv of the same taps (weight [C_in, 1, k, k], channels
    last) followed by a sum over each group's g channels: the vendor's depthwise kernels in
    channels_last are far faster on CPU than its grouped NCHW conv with one output channel per
    group, and give the same sums. The epilogue is two batched GEMMs per direction with the scale
    folded into the [C, w] weight and the bias into an extra column of ones.

    Saved: x (which the frozen block saves anyway) and h [B, w, Ho, Wo] (the w-wide conv output,
    channels-last strides), as the Triton path; channels_last x and the C_in-wide depthwise
    output are recomputed / transient."""

    @staticmethod
    def forward(ctx, x, base, w1, b1, w2, b2, se, stride, padding, act):
        B, Cin = x.shape[:2]
        K, g, k = w1.shape[0], w1.shape[1], w1.shape[-1]
        C = w2.shape[0]
        wd = w1.reshape(Cin, 1, k, k)
        y = torch.nn.functional.conv2d(x.contiguous(memory_format=torch.channels_last), wd, None, stride, padding,
                                       1, Cin)
        Ho, Wo = y.shape[-2:]
        N, S = B * Ho * Wo, Ho * Wo
        y = y.permute(0, 2, 3, 1).reshape(N, K, g)
        h = (y.sum(-1) if g > 1 else y.view(N, K)) + b1  # [N, K] rows (b, ho, wo): channels last
        hf = _f32(h)
        a = torch.relu(hf) if act == "relu" else torch.nn.functional.gelu(hf)
        if h.dtype != torch.float32:
            a = a.to(h.dtype).float()  # act(h) rounded to x's dtype, as the kernel's GEMM operand
        sef = _f32(se)
        w2e = torch.cat([sef[:, None] * _f32(w2), (sef * _f32(b2))[:, None]], 1)  # [C, K + 1]
        ae = torch.cat([a, a.new_ones(N, 1)], 1).view(B, S, K + 1)
        out = torch.baddbmm(_f32(base).reshape(B, C, S), w2e.expand(B, C, K + 1), ae.transpose(1, 2))
        ctx.save_for_backward(x, h.view(B, Ho, Wo, K).permute(0, 3, 1, 2), w1, w2, b2, se)
        ctx.geom = (stride, padding, act)
        return out.to(base.dtype).view(base.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        x, h, w1, w2, b2, se = ctx.saved_tensors
        stride, padding, act = ctx.geom
        need = ctx.needs_input_grad
        B, Cin = x.shape[:2]
        K, g, k = w1.shape[0], w1.shape[1], w1.shape[-1]
        Ho, Wo = h.shape[-2:]
        C, N, S = w2.shape[0], B * Ho * Wo, Ho * Wo
        h = h.permute(0, 2, 3, 1).reshape(N, K)
        dt = x.dtype
        g3 = _f32(gout).contiguous().view(B, C, S)
        hf = _f32(h)
        a = torch.relu(hf) if act == "relu" else torch.nn.functional.gelu(hf)
        if dt != torch.float32:
            a = a.to(dt).float()
        sef, w2f, b2f = _f32(se), _f32(w2), _f32(b2)
        dw2 = db2 = dse = None
        if need[4] or need[5] or need[6]:
            me = torch.bmm(g3, torch.cat([a, a.new_ones(N, 1)], 1).view(B, S, K + 1)).sum(0)  # [C, K + 1]
            M, gsum = me[:, :K], me[:, K]
            dw2 = (sef[:, None] * M).to(dt).view(w2.shape)
            db2 = (sef * gsum).to(dt)
            dse = ((w2f * M).sum(1) + b2f * gsum).to(dt)
        dx = dw1 = db1 = None
        if need[0] or need[2] or need[3]:
            da = torch.bmm(g3.transpose(1, 2), (sef[:, None] * w2f).expand(B, C, K)).view(N, K)
            dh = _act_backward(da, hf, act)
            db1 = dh.sum(0).to(dt)
            if need[0] or need[2]:
                dy = dh.to(dt)
                if g > 1:
                    dy = dy[:, :, None].expand(N, K, g)
                dy = dy.reshape(B, Ho, Wo, Cin).permute(0, 3, 1, 2)  # channels_last [B, C_in, Ho, Wo]
                dx, dwd, _ = torch.ops.aten.convolution_backward(
                    dy, x.contiguous(memory_format=torch.channels_last), w1.reshape(Cin, 1, k, k), None,
                    [stride, stride], [padding, padding], [1, 1], False, [0, 0], Cin, [need[0], need[2], False])
                dw1 = dwd.view(w1.shape) if dwd is not None else None
                if dx is not None:  # x's own layout: a channels_last gradient slows the frozen block's backward
                    dx = dx.contiguous(memory_format=_memory_format(x))
        return (dx, gout if need[1] else None, dw1, db1 if need[3] else None, dw2 if need[4] else None,
                db2 if need[5] else None, dse if need[6] else None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Functional and reference
# ----------------------------------------------------------------------------------------------
_CHECKED = CheckedSignatures()


def _cast(t, dtype):
    return t.to(dtype) if t.dtype != dtype else t


def conv_adapter(x: torch.Tensor, base: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                 b2: torch.Tensor, se: torch.Tensor, *, stride: int = 1, padding: int = 0, act: str = "relu"
                 ) -> torch.Tensor:
    """base + A(x), A the Conv-Adapter (module docstring).

    x [B, C_in, H, W] float32/float16/bfloat16; base [B, C, Ho, Wo] (the output of the frozen conv
    or block the adapter runs beside); w1 [w, C_in / w, k, k], b1 [w] (the grouped conv, groups =
    w); w2 [C, w, 1, 1] or [C, w], b2 [C]; se [1, C, 1, 1] or [C] (cast to x.dtype, differentiably).

    Triton (CUDA, or the interpreter): the vendor grouped conv, then the fused epilogue kernel;
    torch.compile traces the same through `fastpeft::conv_adapter_up`; otherwise (CPU eager)
    `_AdapterFunction`. All save x and the w-wide conv output only.
    """
    check_tensor("conv_adapter", "x", x, dim=4)
    check_tensor("conv_adapter", "w1", w1, dim=4, like=x)
    if w1.shape[0] < 1 or x.shape[1] % w1.shape[0] or x.shape[1] // w1.shape[0] != w1.shape[1] \
            or w1.shape[2] != w1.shape[3]:
        raise ValueError(f"conv_adapter: w1 must be the grouped conv weight [w, C_in / w, k, k] for C_in = "
                         f"{x.shape[1]}, got {describe(w1)}")
    w2 = w2.reshape(w2.shape[0], -1) if w2.dim() == 4 else w2
    se = se.reshape(-1)
    w1, b1, w2, b2, se = (_cast(t, x.dtype) for t in (w1, b1, w2, b2, se))
    compiling = torch.compiler.is_compiling()
    if compiling or _triton_ok(x):
        h = torch.nn.functional.conv2d(x, w1, b1, stride=stride, padding=padding, groups=w1.shape[0])
        _CHECKED.check(compiling, lambda: _validate(h, w2, b2, se, base, act), h, w2, b2, se, base, extra=(act,))
        if compiling:
            return torch.ops.fastpeft.conv_adapter_up(h, w2, b2, se, base, act)
        return _UpFunction.apply(h, w2, b2, se, base, act)
    B, _, H, W = x.shape
    k = w1.shape[-1]
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv_adapter: x {describe(x)} is smaller than the {k}x{k} kernel at padding {padding}")
    h_like = x.new_empty(()).expand(B, w1.shape[0], Ho, Wo)  # h's shape, dtype and device (no storage)
    _CHECKED.check(False, lambda: _validate(h_like, w2, b2, se, base, act), h_like, w2, b2, se, base,
                   extra=(act, stride, padding))
    return _AdapterFunction.apply(x, base, w1, b1, w2, b2, se, stride, padding, act)


def conv_adapter_ref(x, base, w1, b1, w2, b2, se, *, stride=1, padding=0, act="relu"):
    """`base + ConvAdapterModule.forward(x)` in fp32 with plain torch ops, cast back to base's dtype."""
    F = torch.nn.functional
    f = (lambda t: t.to(torch.float32))
    h = F.conv2d(f(x), f(w1), f(b1), stride=stride, padding=padding, groups=w1.shape[0])
    a = F.relu(h) if act == "relu" else F.gelu(h)
    w2 = w2 if w2.dim() == 4 else w2[:, :, None, None]
    y = F.conv2d(a, f(w2), f(b2))
    return (f(base) + f(se).reshape(1, -1, 1, 1) * y).to(base.dtype)
