"""VQT (Visual Query Tuning) ops: query-only attention over frozen keys/values, and the
per-layer L2-normalise-and-concatenate that builds the head's input.

Layers, each doing one job:
  vqt_query_attention_ref / _backward_ref, vqt_aggregate_ref / _backward_ref
        plain-torch references: the spec, the fallback, the test oracles
  torch.ops.fastpeft.vqt_*
        the custom ops: C++ (csrc/cpu/vqt.cpp) / CUDA (csrc/cuda/vqt.cu) kernels from
        fastpeft._C, or the references registered here when the extension is unavailable;
        fake + autograd formulas are registered here in both cases
  _AttentionFunction, _AggregateFunction
        the eager path: one autograd.Function each over the same kernels (called below the
        Autograd key), saving what the registered autograd saves
  vqt_query_attention, vqt_aggregate
        public functionals: validate (ValueError before any kernel), then the autograd.Function
        (eager) or the registered op (under torch.compile)

vqt_query_attention(q, k, v, scale) -> (out, lse)
    q [B, H, Q, d] (Q query rows per head), k, v [B, H, N, d] (the N original tokens' keys and
    values; any strides, e.g. views of a qkv projection, as long as d is unit-stride).
    out = softmax(scale q k^T) v  [B, H, Q, d] in q's dtype; lse [B, H, Q] fp32.
    Gradient for q only: keys/values are frozen activations (VQT) and must not require grad.
    Saved for backward: q, k, v (by reference), out and lse: the B x H x Q x N probabilities
    are recomputed from lse (flash-attention style), never stored.
    The backward op takes delta = rowsum(grad_out * out) [B, H, Q] fp32 instead of out, so the
    same kernel also serves callers that rebuild keys/values in another basis (the fused VQT
    block, fastpeft/fused/vqt.py, runs it on the LayerNorm output with projected queries).

vqt_aggregate(cls, queries, eps) -> (out, norms)
    cls [B, D], queries [L, B, Q, D] -> out [B, D (1 + L Q)] =
    [ cls / max(|cls|, eps), flatten(queries[0]) / max(|.|, eps), ... ] (F.normalize per segment),
    norms [B, 1 + L] fp32 (not differentiable). Saved for backward: out and norms only
    (out is also what the head's Linear saves, so it costs no extra storage).

Dtypes: float32, float16, bfloat16; all arithmetic in fp32 (tolerances in tests/test_vqt_ops.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from fastpeft import _ext
from fastpeft.ops._autograd import once_differentiable

_ATTN = "fastpeft::vqt_query_attention"
_ATTN_BWD = "fastpeft::vqt_query_attention_backward"
_AGG = "fastpeft::vqt_aggregate"
_AGG_BWD = "fastpeft::vqt_aggregate_backward"

# Must match csrc/ops.cpp (tests/test_ext.py and tests/test_vqt_ops.py compare them).
SCHEMAS = {
    _ATTN: "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)",
    _ATTN_BWD: "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor delta, "
               "float scale) -> Tensor",
    _AGG: "(Tensor cls, Tensor queries, float eps) -> (Tensor out, Tensor norms)",
    _AGG_BWD: "(Tensor grad_out, Tensor out, Tensor norms, int num_queries, float eps) "
              "-> (Tensor, Tensor)",
}

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: F.normalize's default eps
DEFAULT_EPS = 1e-12
#: the CUDA kernel keeps one query row's head dim in a warp's registers (4 floats per lane)
CUDA_MAX_HEAD_DIM = 128


# --- references ----------------------------------------------------------------------------

def vqt_query_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): softmax(scale q k^T) v computed in fp32, out rounded once to q.dtype."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = (p @ v.float()).to(q.dtype).contiguous()
    return out, lse.contiguous()


def vqt_query_attention_backward_ref(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                     v: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                                     scale: float) -> torch.Tensor:
    """grad_q = scale * sum_n p_n (dp_n - delta) k_n with p recomputed from lse, dp = dO v^T."""
    kf = k.float()
    p = torch.exp((q.float() @ kf.transpose(-1, -2)) * scale - lse.unsqueeze(-1))
    dp = grad_out.float() @ v.float().transpose(-1, -2)
    ds = p * (dp - delta.unsqueeze(-1))
    return ((ds @ kf) * scale).to(q.dtype).contiguous()


def vqt_aggregate_ref(cls: torch.Tensor, queries: torch.Tensor,
                      eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, norms): concat of F.normalize(cls) and F.normalize(flatten(queries[l])) per layer."""
    pieces = [cls.float()] + [queries[i].flatten(1).float() for i in range(queries.shape[0])]
    norms = torch.stack([p.norm(dim=1) for p in pieces], dim=1)
    out = torch.cat([F.normalize(p, dim=1, eps=eps) for p in pieces], dim=1)
    return out.to(cls.dtype), norms


def vqt_aggregate_backward_ref(grad_out: torch.Tensor, out: torch.Tensor, norms: torch.Tensor,
                               num_queries: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_cls, grad_queries): dx = (g - y (y . g)) / |x| per segment (g / eps below eps)."""
    B, L = out.shape[0], norms.shape[1] - 1
    D = out.shape[1] // (1 + L * num_queries)
    sizes = [D] + [num_queries * D] * L
    grads = []
    for i, (g, y) in enumerate(zip(grad_out.float().split(sizes, 1), out.float().split(sizes, 1))):
        n = norms[:, i:i + 1]
        yg = (y * g).sum(1, keepdim=True)
        # (a NaN norm takes the first branch: NaN, never the finite g / eps)
        grads.append(torch.where(n < eps, g / eps, (g - y * yg) / n))
    grad_cls = grads[0].to(out.dtype).contiguous()
    if L:
        grad_q = torch.stack([g.view(B, num_queries, D) for g in grads[1:]]).to(out.dtype)
    else:
        grad_q = out.new_empty((0, B, num_queries, D))
    return grad_cls, grad_q.contiguous()


# --- custom op registration ----------------------------------------------------------------

def _op_exists(qualname: str) -> bool:
    namespace, name = qualname.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


_REFS = {
    _ATTN: vqt_query_attention_ref,
    _ATTN_BWD: vqt_query_attention_backward_ref,
    _AGG: vqt_aggregate_ref,
    _AGG_BWD: vqt_aggregate_backward_ref,
}


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def _check_tensor(op: str, name: str, t, dim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D {layout}, got {_describe(t)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: {name} has unsupported dtype {t.dtype}; expected one of "
                         f"{', '.join(map(str, SUPPORTED_DTYPES))}")


def _check_like(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: device mismatch: {ref_name} is on {ref.device} but {name} is on {t.device}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{op}: dtype mismatch: {ref_name} is {ref.dtype} but {name} is {t.dtype}")


def _check_stat(op: str, name: str, t, shape, ref: torch.Tensor) -> None:
    """An fp32 per-row statistic (lse, delta, norms) of `shape` on ref's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32 or t.device != ref.device or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must be float32 {list(shape)} on {ref.device}, got {_describe(t)}")


def check_attention_args(op: str, q, k, v) -> None:
    """q [B, H, Q, d], k, v [B, H, N, d] (N >= 1), one dtype and device (what the kernels check)."""
    _check_tensor(op, "q", q, 4, "[B, H, Q, d]")
    _check_tensor(op, "k", k, 4, "[B, H, N, d]")
    _check_tensor(op, "v", v, 4, "[B, H, N, d]")
    _check_like(op, "k", k, "q", q)
    _check_like(op, "v", v, "q", q)
    if k.shape[3] != q.shape[3] or v.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: head dims differ: q has d={q.shape[3]}, k d={k.shape[3]}, "
                         f"v d={v.shape[3]} (q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{op}: keys and values have different lengths: k has N={k.shape[2]}, "
                         f"v has N={v.shape[2]} (k {tuple(k.shape)}, v {tuple(v.shape)})")
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"{op}: batch/heads differ: q is [B, H] = {list(q.shape[:2])}, "
                         f"k {list(k.shape[:2])}, v {list(v.shape[:2])}")
    if k.shape[2] == 0:
        raise ValueError(f"{op}: need at least one key/value token, got k {tuple(k.shape)}")


def check_attention_backward_args(op: str, grad_out, q, k, v, lse, delta) -> None:
    check_attention_args(op, q, k, v)
    _check_tensor(op, "grad_out", grad_out, 4, "[B, H, Q, d]")
    _check_like(op, "grad_out", grad_out, "q", q)
    if grad_out.shape != q.shape:
        raise ValueError(f"{op}: grad_out {tuple(grad_out.shape)} must have q's shape {tuple(q.shape)}")
    _check_stat(op, "lse", lse, q.shape[:3], q)
    _check_stat(op, "delta", delta, q.shape[:3], q)


def _check_eps(op: str, eps) -> None:
    if not eps > 0:  # (NaN too)
        raise ValueError(f"{op}: eps must be positive, got {eps}")


def check_aggregate_args(op: str, cls, queries, eps) -> None:
    """cls [B, D], queries [L, B, Q, D] (Q >= 1), one dtype and device; eps > 0."""
    _check_tensor(op, "cls", cls, 2, "[B, D]")
    _check_tensor(op, "queries", queries, 4, "[L, B, Q, D]")
    _check_like(op, "queries", queries, "cls", cls)
    if queries.shape[1] != cls.shape[0] or queries.shape[3] != cls.shape[1]:
        raise ValueError(f"{op}: queries {tuple(queries.shape)} must be [L, B, Q, D] for cls "
                         f"{tuple(cls.shape)} (B = {cls.shape[0]}, D = {cls.shape[1]})")
    if queries.shape[2] == 0:
        raise ValueError(f"{op}: need at least one query per layer, got queries {tuple(queries.shape)}")
    _check_eps(op, eps)


def check_aggregate_backward_args(op: str, grad_out, out, norms, num_queries, eps) -> None:
    """out [B, D (1 + L Q)], grad_out like out, norms [B, 1 + L] fp32, num_queries Q >= 1; eps > 0."""
    _check_tensor(op, "out", out, 2, "[B, D (1 + L Q)]")
    _check_tensor(op, "grad_out", grad_out, 2, "[B, D (1 + L Q)]")
    _check_like(op, "grad_out", grad_out, "out", out)
    if grad_out.shape != out.shape:
        raise ValueError(f"{op}: grad_out {tuple(grad_out.shape)} must have out's shape {tuple(out.shape)}")
    if not isinstance(norms, torch.Tensor) or norms.dim() != 2 or norms.shape[1] < 1:
        raise ValueError(f"{op}: norms must be a float32 [B, 1 + L] tensor, got "
                         f"{_describe(norms) if isinstance(norms, torch.Tensor) else type(norms).__name__}")
    _check_stat(op, "norms", norms, (out.shape[0], norms.shape[1]), out)
    L = norms.shape[1] - 1
    if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1 \
            or out.shape[1] % (1 + L * num_queries):
        raise ValueError(f"{op}: out width {out.shape[1]} is not D (1 + L Q) for L = {L}, Q = {num_queries!r}")
    _check_eps(op, eps)


_CHECKS = {
    _ATTN: lambda q, k, v, scale: check_attention_args(_ATTN, q, k, v),
    _ATTN_BWD: lambda g, q, k, v, lse, delta, scale: check_attention_backward_args(_ATTN_BWD, g, q, k, v, lse, delta),
    _AGG: lambda cls, queries, eps: check_aggregate_args(_AGG, cls, queries, eps),
    _AGG_BWD: lambda g, out, norms, nq, eps: check_aggregate_backward_args(_AGG_BWD, g, out, norms, nq, eps),
}


def _checked_ref(qualname: str, fn):
    """The reference as the op's kernel: the compiled kernels' argument checks first."""
    check = _CHECKS[qualname]

    def op(*args):
        check(*args)
        return fn(*args)
    op.__name__ = fn.__name__
    return op


def _register_reference_ops(status: _ext.ExtensionStatus) -> None:
    # A build from before these ops existed (the .so loads, but has no vqt_* kernels) is treated
    # like a missing extension for these ops only.
    if not status.available or not _op_exists(_ATTN):
        for qualname, schema in SCHEMAS.items():
            if not _op_exists(qualname):
                torch.library.define(qualname, schema)
        for qualname, fn in _REFS.items():
            torch.library.impl(qualname, "CompositeExplicitAutograd")(_checked_ref(qualname, fn))
    elif not status.has_cuda:
        for qualname, fn in _REFS.items():
            torch.library.register_kernel(qualname, "cuda")(_checked_ref(qualname, fn))


_register_reference_ops(_ext.load())


def _attention_fake(q, k, v, scale):
    check_attention_args(_ATTN, q, k, v)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(q.shape[:3], dtype=torch.float32)


def _attention_backward_fake(grad_out, q, k, v, lse, delta, scale):
    check_attention_backward_args(_ATTN_BWD, grad_out, q, k, v, lse, delta)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _aggregate_fake(cls, queries, eps):
    check_aggregate_args(_AGG, cls, queries, eps)
    L, B, Q, D = queries.shape
    return cls.new_empty((B, D * (1 + L * Q))), cls.new_empty((B, 1 + L), dtype=torch.float32)


def _aggregate_backward_fake(grad_out, out, norms, num_queries, eps):
    check_aggregate_backward_args(_AGG_BWD, grad_out, out, norms, num_queries, eps)
    B, L = out.shape[0], norms.shape[1] - 1
    D = out.shape[1] // (1 + L * num_queries)
    return out.new_empty((B, D)), out.new_empty((L, B, num_queries, D))


# Registered from this module: csrc/ops.cpp's VQT fragment names it in set_python_module.
torch.library.register_fake(_ATTN)(_attention_fake)
torch.library.register_fake(_ATTN_BWD)(_attention_backward_fake)
torch.library.register_fake(_AGG)(_aggregate_fake)
torch.library.register_fake(_AGG_BWD)(_aggregate_backward_fake)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _query_grad_out(ctx, grad_out, out):
    """The attention's backwards give q's gradient only (keys and values are frozen); a missing
    output gradient is zero."""
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError("vqt_query_attention: keys/values are frozen; it gives gradients for q only")
    return torch.zeros_like(out) if grad_out is None else grad_out


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    grad_out = _query_grad_out(ctx, grad_out, out)
    delta = _attention_delta(grad_out, out, grad_lse)
    grad_q = torch.ops.fastpeft.vqt_query_attention_backward(grad_out, q, k, v, lse, delta, ctx.scale)
    return grad_q, None, None, None


torch.library.register_autograd(_ATTN, _attention_backward, setup_context=_attention_setup)


def _aggregate_setup(ctx, inputs, output):
    cls, queries, eps = inputs
    out, norms = output
    ctx.mark_non_differentiable(norms)
    ctx.save_for_backward(out, norms)
    ctx.num_queries = queries.shape[2]
    ctx.eps = eps


def _aggregate_backward(ctx, grad_out, _grad_norms):
    out, norms = ctx.saved_tensors
    grad_cls, grad_queries = torch.ops.fastpeft.vqt_aggregate_backward(
        grad_out, out, norms, ctx.num_queries, ctx.eps)
    need_cls, need_queries, _ = ctx.needs_input_grad
    return (grad_cls if need_cls else None), (grad_queries if need_queries else None), None


torch.library.register_autograd(_AGG, _aggregate_backward, setup_context=_aggregate_setup)


# --- eager path: the kernels without the registered autograd's dispatch ---------------------
# Eager calls run these autograd.Functions (one Python node each, as the Triton ops do); the ops
# themselves are called below the Autograd key (their CPU/CUDA kernels, or the references when the
# extension is absent). torch.compile traces the registered ops with their fake + autograd
# formulas above instead (`torch.compiler.is_compiling()`).

def _below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def attention_forward(q, k, v, scale):
    """(out, lse) of the query attention op on validated arguments, no autograd recorded."""
    return _below_autograd(torch.ops.fastpeft.vqt_query_attention.default, q, k, v, scale)


def attention_backward(grad_out, q, k, v, lse, delta, scale):
    """grad_q of the query attention op (see the module docstring), no autograd recorded."""
    return _below_autograd(torch.ops.fastpeft.vqt_query_attention_backward.default, grad_out, q, k, v, lse, delta,
                           scale)


def _attention_delta(grad_out, out, grad_lse):
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        # d lse / d logit_n = p_n: folds into ds_n = p_n (dp_n - (delta - grad_lse)).
        delta = delta - grad_lse
    return delta


class _AttentionFunction(torch.autograd.Function):
    """Eager `vqt_query_attention`: same kernels and saved tensors as the registered autograd."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = _query_grad_out(ctx, grad_out, out).contiguous()
        grad_q = attention_backward(grad_out, q, k, v, lse, _attention_delta(grad_out, out, grad_lse), ctx.scale)
        return grad_q, None, None, None


class _AggregateFunction(torch.autograd.Function):
    """Eager `vqt_aggregate`: same kernels and saved tensors (out, norms) as the registered autograd."""

    @staticmethod
    def forward(ctx, cls, queries, eps):
        out, norms = _below_autograd(torch.ops.fastpeft.vqt_aggregate.default, cls, queries, eps)
        ctx.mark_non_differentiable(norms)
        ctx.save_for_backward(out, norms)
        ctx.num_queries, ctx.eps = queries.shape[2], eps
        return out, norms

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_norms):
        out, norms = ctx.saved_tensors
        grad_cls, grad_queries = _below_autograd(torch.ops.fastpeft.vqt_aggregate_backward.default,
                                                 grad_out.contiguous(), out, norms, ctx.num_queries, ctx.eps)
        need_cls, need_queries, _ = ctx.needs_input_grad
        return (grad_cls if need_cls else None), (grad_queries if need_queries else None), None


# --- public functionals --------------------------------------------------------------------

def validate_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """ValueError (TypeError for non-tensors) naming the shapes, before any kernel runs."""
    op = "vqt_query_attention"
    check_attention_args(op, q, k, v)
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        raise ValueError(f"{op}: keys/values are frozen (gradients flow to q only) but k/v "
                         "require grad; pass k.detach(), v.detach()")
    if q.is_cuda and q.shape[3] > CUDA_MAX_HEAD_DIM and _ext.load().has_cuda:
        raise ValueError(f"{op}: the CUDA kernel supports head dims up to {CUDA_MAX_HEAD_DIM}, got "
                         f"d={q.shape[3]}")


def vqt_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows attending over frozen keys/values: (out [B, H, Q, d], lse [B, H, Q] fp32).

    q [B, H, Q, d] (gradients flow to it), k, v [B, H, N, d] frozen (no grad), same dtype and
    device; scale defaults to d ** -0.5 (timm / SDPA). See the module docstring.
    """
    validate_query_attention(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"vqt_query_attention: scale must be finite, got {scale}")
    if torch.compiler.is_compiling():
        return torch.ops.fastpeft.vqt_query_attention(q, k, v, scale)
    return _AttentionFunction.apply(q, k, v, scale)


def _stack_queries(queries) -> torch.Tensor:
    if isinstance(queries, torch.Tensor):
        return queries
    if not isinstance(queries, (list, tuple)) or not queries:
        raise TypeError("vqt_aggregate: queries must be a [L, B, Q, D] tensor or a non-empty list "
                        f"of [B, Q, D] tensors, got {type(queries).__name__}")
    shapes = {tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in queries}
    if len(shapes) != 1 or None in shapes:
        raise ValueError(f"vqt_aggregate: the per-layer query outputs must be tensors of one shape "
                         f"[B, Q, D], got {sorted(map(str, shapes))}")
    return torch.stack(list(queries))


def vqt_aggregate(cls: torch.Tensor, queries: torch.Tensor | Sequence[torch.Tensor],
                  eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The VQT head input [B, D (1 + L Q)]: F.normalize(cls) and each layer's F.normalize of its
    flattened query outputs, concatenated. cls [B, D]; queries [L, B, Q, D] or L tensors
    [B, Q, D]; same dtype and device. Differentiable in both."""
    queries = _stack_queries(queries)
    check_aggregate_args("vqt_aggregate", cls, queries, eps)
    if torch.compiler.is_compiling():
        out, _norms = torch.ops.fastpeft.vqt_aggregate(cls, queries, float(eps))
    else:
        out, _norms = _AggregateFunction.apply(cls, queries, float(eps))
    return out
