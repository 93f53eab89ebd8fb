"""Low-rank deltas fused into a frozen projection, as ops: out = x W^T + bias + u B^T.

  lowrank_linear        the generic op (u = drop(x A^T) or drop(x) A^T): custom ops
                        `fastpeft::lowrank_linear` / `lowrank_linear_backward` (fake + autograd, what
                        torch.compile traces) and the eager `_LowRankFunction`
  lowrank_linear_rows   the per-row form for a mixed multi-task batch (each image its own
                        factors; `lora_noah_qkv_rows` / `lora_petl_qkv_rows`, run by
                        fastpeft/fused/lowrank.py through `fastpeft.ops._rows.rows_call`)
  *_ref                 plain-torch references: the test oracles

and each method's functional, which builds its effective down matrix A [R, D] and up matrix
B [N, R] differentiably, in plain torch, from its (tiny) parameters (official code: see each
method's module in fastpeft/methods/):

  lora_noah_qkv         A = LoRA_a[:r], B = s * LoRA_b[:, :r]; dropout on the input x
  lora_petl_qkv         A = [A_q; A_v], B = s * (B_q in the q rows, B_v in the v rows, 0 elsewhere)
  fact_linear           A = M U (qkv: [M_q; M_k; M_v] U, fc1: M_fc1 U, fc2: M_fc2 blockdiag(U x4)),
                        B = s V (qkv: blockdiag(V x3), fc1: blockdiag(V x4)); the cores are passed
                        in (TT: the *_FacTs weights; TK: built from FacTc/FacTp by the method)
  kadaptation_qkv       H = sum_i kron(A_i, B_i) with rank-k factors has rank <= n k1 k2: x H =
                        (x Dn^T) Up with Dn[(i,al,be), a*m+k] = L_i[a,al] WL_i[k,be] and
                        Up[(i,al,be), c*m+p] = R_i[al,c] WR_i[be,p] -- the (A (x) B) vec-trick
                        (X[n, m] -> A^T X B) folded into two [R, D] matrices built once per call,
                        so neither H nor any per-token D x D product is ever formed.
  kadaptation_h         with dropout on H (which breaks that structure): the two dropped H as the
                        reference makes them, as one node keeping no [n, n, n] product (and, with
                        `compact`, the masks as bits); `qv_folded_linear` folds them into the weight

The eager Functions whose output a recompute may need again give it from what they keep
(`output_again`, read through `ops._autograd.remake`).

GEMMs against the frozen weight run on the vendor BLAS; the Triton kernels (kernels/lowrank.py)
regenerate the dropout masks from a seed. Saved for backward: x and u [M, R] plus the int64 seed.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from ._autograd import once_differentiable
from ..kernels._common import (CheckedSignatures, check_features, cast_param, check_dropout, check_p,
                               check_tensor, describe, rows_of, use_triton)
from ..kernels.adapter import dropout_keep_mask, dropout_keep_scale
from ..kernels.lowrank import (MAX_IMAGES, MAX_RANK, launch_bwd, launch_down, launch_fwd, launch_rows_bwd,
                               launch_rows_fwd, lowrank_up)


# ----------------------------------------------------------------------------------------------
# Validation (ValueError before any launch)
# ----------------------------------------------------------------------------------------------
def _validate(x, weight, bias, a, b, p, seed):
    op = "lowrank_linear"
    d = check_features(op, x)
    check_tensor(op, "weight", weight, dim=2, like=x)
    n = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"{op}: weight must be [N, D] = [N, {d}], got weight {describe(weight)} for x {describe(x)}")
    if weight.numel() >= 2**31:
        raise ValueError(f"{op}: weight {describe(weight)} has >= 2^31 elements (32-bit offsets)")
    check_tensor(op, "a", a, dim=2, like=x)
    r = a.shape[0]
    if a.shape[1] != d or r == 0:
        raise ValueError(f"{op}: a (down) must be [R, D] = [R, {d}] with R >= 1, got a {describe(a)} for x {describe(x)}")
    check_tensor(op, "b", b, shape=(n, r), like=x)
    if bias is not None:
        check_tensor(op, "bias", bias, shape=(n,), like=x)
    check_dropout(op, p, seed, x, "x")


def _validate_bwd(grad_out, x, weight, a, b, u, p, seed):
    """The registered backward op's arguments: the forward's, grad_out [..., N] like x, u [M, R]."""
    _validate(x, weight, None, a, b, p, seed)
    op = "lowrank_linear_backward"
    check_tensor(op, "grad_out", grad_out, shape=(*x.shape[:-1], weight.shape[0]), like=x)
    check_tensor(op, "u", u, shape=(x.numel() // x.shape[-1], a.shape[0]), like=x)


def lowrank_linear_bwd(grad_out, x, weight, a, b, u, p: float, seed, drop_input: bool):
    """Triton-backend backward: (dx like x, da [R, D], db [N, R], dbias [N]) in x's dtype."""
    n, r = weight.shape[0], a.shape[0]
    m = x.numel() // x.shape[-1]
    if grad_out.numel() != m * n or grad_out.shape[-1] != n or u.shape != (m, r):
        raise ValueError(f"lowrank_linear_backward: grad_out {describe(grad_out)} / u {describe(u)} do "
                         f"not match x {describe(x)}, weight {describe(weight)}, rank {r}")
    return launch_bwd(grad_out.contiguous(), x, weight, a, b, u, p, seed, drop_input)


def _lowrank_linear_fwd_torch(x, weight, bias, a, b, p, seed, drop_input):
    f32 = torch.float32
    d = x.shape[-1]
    x2 = x.reshape(-1, d).to(f32)
    m = x2.shape[0]
    xin = x2 * dropout_keep_scale(seed, m, d, p) if (p > 0 and drop_input) else x2
    z = xin @ a.to(f32).t()
    if p > 0 and not drop_input:
        z = z * dropout_keep_scale(seed, m, a.shape[0], p)
    u = z.to(x.dtype)
    return _lowrank_up_torch(x, weight, bias, u, b), u


def _lowrank_up_torch(x, weight, bias, u, b):
    """`_lowrank_linear_fwd_torch`'s output given its u."""
    f32 = torch.float32
    out = x.reshape(-1, x.shape[-1]).to(f32) @ weight.to(f32).t() + u.to(f32) @ b.to(f32).t()
    if bias is not None:
        out = out + bias.to(f32)
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def _lowrank_linear_bwd_torch(grad_out, x, weight, a, b, u, p, seed, drop_input):
    f32 = torch.float32
    d, n, r = x.shape[-1], weight.shape[0], a.shape[0]
    g = grad_out.reshape(-1, n).to(f32)
    x2 = x.reshape(-1, d).to(f32)
    m = x2.shape[0]
    dz = g @ b.to(f32)
    if p > 0 and not drop_input:
        dz = dz * dropout_keep_scale(seed, m, r, p)
    dz = dz.to(x.dtype).to(f32)  # the kernel feeds dz to its GEMMs in x's dtype
    lr = dz @ a.to(f32)
    xin = x2
    if p > 0 and drop_input:
        keep = dropout_keep_scale(seed, m, d, p)
        lr = lr * keep
        xin = x2 * keep
    dx = g @ weight.to(f32) + lr
    da = dz.t() @ xin
    db = g.t() @ u.to(f32)
    dt = x.dtype
    return dx.to(dt).view(x.shape), da.to(dt), db.to(dt), g.sum(0).to(dt)


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
def _triton_ok(x, rank: int) -> bool:
    return use_triton(x) and rank <= MAX_RANK


@torch.library.custom_op("fastpeft::lowrank_linear", mutates_args=())
def _lowrank_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                       b: torch.Tensor, p: float, seed: torch.Tensor | None,
                       drop_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(x, weight, bias, a, b, p, seed)
    fn = launch_fwd if _triton_ok(x, a.shape[0]) else _lowrank_linear_fwd_torch
    return fn(x, weight, bias, a, b, p, seed, drop_input)


@_lowrank_linear_op.register_fake
def _lowrank_linear_fake(x, weight, bias, a, b, p, seed, drop_input):
    _validate(x, weight, bias, a, b, p, seed)
    m = x.numel() // x.shape[-1]
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((m, a.shape[0]))


@torch.library.custom_op("fastpeft::lowrank_linear_backward", mutates_args=())
def _lowrank_linear_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                a: torch.Tensor, b: torch.Tensor, u: torch.Tensor, p: float,
                                seed: torch.Tensor | None, drop_input: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _CHECKED.check(False, lambda: _validate_bwd(grad_out, x, weight, a, b, u, p, seed),
                   grad_out, x, weight, a, b, u, seed, extra=("bwd", p))
    grad_out = grad_out.contiguous()
    if _triton_ok(x, a.shape[0]):
        dx, da, db, dbias = lowrank_linear_bwd(grad_out, x, weight, a, b, u, p, seed, drop_input)
        # (contiguous: the registered fake promises contiguous grads, and torch.compile holds us to it)
        return dx.contiguous(), da.contiguous(), db.contiguous(), dbias
    return _lowrank_linear_bwd_torch(grad_out, x, weight, a, b, u, p, seed, drop_input)


@_lowrank_linear_backward_op.register_fake
def _lowrank_linear_backward_fake(grad_out, x, weight, a, b, u, p, seed, drop_input):
    _validate_bwd(grad_out, x, weight, a, b, u, p, seed)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(a),
            torch.empty_like(b), x.new_empty((weight.shape[0],)))


def _lowrank_setup_context(ctx, inputs, output):
    x, weight, bias, a, b, p, seed, drop_input = inputs
    _, u = output
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x, weight, a, b, u, seed)
    ctx.p, ctx.drop_input = p, drop_input


def _lowrank_backward(ctx, grad_out, _grad_u):
    x, weight, a, b, u, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, da, db, dbias = torch.ops.fastpeft.lowrank_linear_backward(
        grad_out, x, weight, a, b, u, ctx.p, seed, ctx.drop_input)
    # weight is frozen: never a gradient (the functionals refuse a weight that requires grad)
    return (dx if need[0] else None, None, dbias if need[2] else None, da if need[3] else None,
            db if need[4] else None, None, None, None)


_lowrank_linear_op.register_autograd(_lowrank_backward, setup_context=_lowrank_setup_context)


class _LowRankFunction(torch.autograd.Function):
    """The eager path of `fastpeft::lowrank_linear`: the same launchers (or torch math) and saved
    tensors (x, u) as the registered op, without the custom-op dispatch; arguments validated by
    the caller. `triton_path` is decided once in forward and reused by backward. With `rows`, the
    per-row form `lowrank_linear_rows` (every image its own factors; the bias may be per image):
    the per-row launchers, the same saved tensors (u [B*L, R], no mask).

    `params` are (a, b) themselves when `layout` is None; else the method's parameters, from which
    `layout` makes (a, b) inside the op and onto which it maps their gradients (`_NoahLayout`,
    `_PetlLayout`): the slicing, concatenation, placement and scaling then record no autograd node
    and keep no copy, and backward remakes (a, b) from the kept parameters."""

    @staticmethod
    def forward(ctx, x, weight, bias, p, seed, drop_input, triton_path, rows, layout, *params):
        a, b = _made(layout, params, x.dtype)
        if rows:
            fn = launch_rows_fwd if triton_path else _lowrank_rows_fwd_torch
        else:
            fn = launch_fwd if triton_path else _lowrank_linear_fwd_torch
        out, u = fn(x, weight, bias, a, b, p, seed, drop_input)
        need = ctx.needs_input_grad
        ctx.layout = layout
        ctx.factors = None  # (a, b) once remade (`output_again`), for backward
        if need[0] or need[2] or any(need[9:]):
            # (and the bias for `output_again`, which the per-row form has not)
            ctx.save_for_backward(x, weight, u, seed, None if rows else bias, *params)
        ctx.args = (p, drop_input, triton_path, rows, rows and bias is not None and bias.dim() == 2)
        return out

    @staticmethod
    def _factors(ctx, x, params):
        if ctx.factors is None:
            ctx.factors = _made(ctx.layout, params, x.dtype)
        return ctx.factors

    @staticmethod
    def output_again(ctx):
        """Forward's output again from the saved x and u (`ops._autograd.remake`): the GEMMs alone,
        not u's projection; not the per-row form."""
        p, drop_input, triton_path, rows, _ = ctx.args
        saved = ctx.saved_tensors
        if rows or not saved:
            return None
        x, weight, u, seed, bias, *params = saved
        b = _LowRankFunction._factors(ctx, x, params)[1]
        return (lowrank_up if triton_path else _lowrank_up_torch)(x, weight, bias, u, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, u, seed, _bias, *params = ctx.saved_tensors
        a, b = _LowRankFunction._factors(ctx, x, params)
        p, drop_input, triton_path, rows, bias_rows = ctx.args
        need = ctx.needs_input_grad
        layout = ctx.layout
        need_a, need_b = (need[9], need[10]) if layout is None else layout.needs(need[9:])
        grad_out = grad_out.contiguous()
        which = (need[0], need_a, need_b, need[2])
        if rows and triton_path:
            dx, da, db, dbias = launch_rows_bwd(grad_out, x, weight, a, b, u, p, seed, drop_input, bias_rows, which)
        elif rows:
            dx, da, db, dbias = _lowrank_rows_bwd_torch(grad_out, x, weight, a, b, u, p, seed, drop_input, bias_rows)
        elif triton_path:
            dx, da, db, dbias = launch_bwd(grad_out, x, weight, a, b, u, p, seed, drop_input, which)
        else:
            dx, da, db, dbias = _lowrank_linear_bwd_torch(grad_out, x, weight, a, b, u, p, seed, drop_input)
        if layout is None:
            grads = (da if need_a else None, db if need_b else None)
        else:
            grads = layout.grads(params, da if need_a else None, db if need_b else None, need[9:])
        # (in the activation dtype: autograd casts a gradient to its input's dtype)
        # weight is frozen: never a gradient (the functionals refuse a weight that requires grad)
        return (dx if need[0] else None, None, dbias if need[2] else None, None, None, None, None, None, None,
                *grads)


def _made(layout, params, dtype) -> tuple:
    """(a, b) in the activation dtype from the op's `params` (see `_LowRankFunction`)."""
    a, b = params if layout is None else layout.build(*params)
    return cast_param(a, dtype), cast_param(b, dtype)


class _NoahLayout(tuple):
    """NOAH's (A, B) = (LoRA_a[:r], s * LoRA_b[:, :r]) from (LoRA_a, LoRA_b), as (r, s)."""

    def build(self, lora_a, lora_b):
        return _noah_factors(self[0], self[1], lora_a, lora_b)

    build_differentiable = build

    def rank(self, params):
        return self[0]

    @staticmethod
    def needs(need):
        return need[0], need[1]

    def grads(self, params, da, db, need):
        r, scale = self
        lora_a, lora_b = params
        if db is not None and scale != 1.0:
            db = db * scale
        if r != lora_a.shape[0]:  # the subnet rank: the rows / columns past it get zeros
            da = None if da is None else torch.cat([da, da.new_zeros((lora_a.shape[0] - r, da.shape[1]))], 0)
            db = None if db is None else torch.cat([db, db.new_zeros((db.shape[0], lora_b.shape[1] - r))], 1)
        return da if need[0] else None, db if need[1] else None


class _PetlLayout(tuple):
    """PETL-ViT LoRA's A = [D_t1; D_t2 ...] and B (s_t U_t in the rows of target t, rank columns of
    segment t; zeros elsewhere) from (downs..., ups...), as (width of one of q/k/v,
    ((row start, s_t) per target))."""

    def build(self, *params):
        ad, placed = self
        k = len(placed)
        starts = [start for start, _ in placed]
        if starts != sorted(starts):  # (B is not block-diagonal: placed block by block)
            return _petl_factors(ad, placed, *params)
        downs, ups = params[:k], params[k:]
        a = torch.cat(downs, 0) if k > 1 else downs[0]
        # targets in q, k, v order: B is block-diagonal, with [ad, 0] blocks for the others
        by_start = {start: up * scale if scale != 1.0 else up for (start, scale), up in zip(placed, ups)}
        none = ups[0].new_empty((ad, 0))
        return a, torch.block_diag(*(by_start.get(i * ad, none) for i in range(3)))

    def build_differentiable(self, *params):
        return _petl_factors(*self, *params)

    def rank(self, params):
        return sum(d.shape[0] for d in params[:len(self[1])])

    def needs(self, need):
        k = len(self[1])
        return any(need[:k]), any(need[k:])

    def grads(self, params, da, db, need):
        ad, placed = self
        k = len(placed)
        out, c = [None] * (2 * k), 0
        for i, ((start, scale), up) in enumerate(zip(placed, params[k:])):
            r = up.shape[1]
            if need[i]:
                out[i] = da[c:c + r]
            if need[k + i]:
                g = db[start:start + ad, c:c + r]
                out[k + i] = g * scale if scale != 1.0 else g
            c += r
        return out


def _check_frozen(op, weight):
    if isinstance(weight, torch.Tensor) and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: the frozen projection weight {describe(weight)} requires grad; the fused "
                         "op gives it no gradient (PETL freezes the backbone): call weight.requires_grad_(False)")


def _seed(p, seed, x):
    if p > 0.0 and seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    return seed if p > 0.0 else None


_CHECKED = CheckedSignatures()


def lowrank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                   b: torch.Tensor, *, dropout_p: float = 0.0, drop_input: bool = False,
                   training: bool = False, seed: torch.Tensor | None = None) -> torch.Tensor:
    """out = x W^T + bias + u B^T with u = drop(x A^T) (or drop(x) A^T when `drop_input`).

    x [..., D] float32/float16/bfloat16; weight [N, D] frozen (requires_grad False); bias [N] or
    None (may be trainable); a [R, D], b [N, R] (cast to x.dtype, differentiably). Dropout p only
    when `training`, mask from `seed` (int64, one element; drawn when None). Returns [..., N].

    Eager calls run one autograd.Function over the launchers, with the argument checks run once
    per call signature (`_CHECKED`); under torch.compile the call is the registered
    `torch.ops.fastpeft.lowrank_linear` (fake and autograd formulas, checked when traced), which
    shares the same launchers.
    """
    return _lowrank_call(x, weight, bias, None, (a, b), dropout_p, drop_input, training, seed)


def _lowrank_call(x, weight, bias, layout, params, dropout_p, drop_input, training, seed):
    """`lowrank_linear` on (a, b) made from `params` by `layout` (None: params = (a, b)): in the
    eager op, without autograd nodes for the making (`_LowRankFunction`); under torch.compile
    differentiably, outside the registered op."""
    op = "lowrank_linear"
    check_tensor(op, "x", x)
    _check_frozen(op, weight)
    dt = x.dtype
    weight, bias = cast_param(weight, dt), cast_param(bias, dt)
    p = check_p(op, dropout_p)  # (in range even when not training, as F.dropout)
    p = p if training else 0.0
    seed = _seed(p, seed, x)
    if torch.compiler.is_compiling():
        a, b = params if layout is None else layout.build_differentiable(*params)
        a, b = cast_param(a, dt), cast_param(b, dt)
        _validate(x, weight, bias, a, b, p, seed)
        out, _ = torch.ops.fastpeft.lowrank_linear(x, weight, bias, a, b, p, seed, bool(drop_input))
        return out
    _CHECKED.check(False, lambda: _validate_made(x, weight, bias, layout, params, p, seed),
                   x, weight, bias, *params, seed, extra=(p, layout))
    return _apply(x, weight, bias, p, seed, drop_input, layout, params)


def _apply(x, weight, bias, p, seed, drop_input, layout, params):
    """`_LowRankFunction` on checked arguments, on the Triton path where the rank allows."""
    triton_path = _triton_ok(x, params[0].shape[0] if layout is None else layout.rank(params))
    return _LowRankFunction.apply(x, weight, bias, p, seed, bool(drop_input), triton_path, False, layout, *params)


def lowrank_bound(x, weight, bias, layout, params, dropout_p: float, drop_input: bool, training: bool, checks):
    """`_lowrank_call` for a caller that made `layout` once (the fused layers, fastpeft/fused/lowrank.py;
    eager only): every argument check, the functional's own (`checks()`, e.g. `petl_layout`) and
    `_lowrank_call`'s, runs on the first call of each signature only (`_CHECKED`: every tensor's
    shape, dtype and device, the layout, dropout p, the mode), so a changed dtype, device or
    shape is checked again before anything launches; other calls go straight to the op."""
    key = _CHECKED.key(x, weight, bias, *params, extra=(layout, dropout_p, training, drop_input))
    if not _CHECKED.seen(key):
        checks()
        out = _lowrank_call(x, weight, bias, layout, params, dropout_p, drop_input, training, None)
        _CHECKED.add(key)
        return out
    _check_frozen("lowrank_linear", weight)  # (grad mode is not in the key)
    dt = x.dtype
    weight, bias = cast_param(weight, dt), cast_param(bias, dt)
    p = dropout_p if training else 0.0
    return _apply(x, weight, bias, p, _seed(p, None, x), drop_input, layout, params)


def _validate_made(x, weight, bias, layout, params, p, seed):
    """`_validate` on the (a, b) that `layout` makes from `params` (made under no grad)."""
    with torch.no_grad():
        a, b = _made(layout, params, x.dtype)
    _validate(x, weight, bias, a, b, p, seed)


def _place_rows(block: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """[..., n, c] with `block` [..., n_t, c] at rows start.. and zeros elsewhere (differentiable)."""
    lead, c = block.shape[:-2], block.shape[-1]
    pieces = []
    if start:
        pieces.append(block.new_zeros((*lead, start, c)))
    pieces.append(block)
    rest = n - start - block.shape[-2]
    if rest:
        pieces.append(block.new_zeros((*lead, rest, c)))
    return torch.cat(pieces, -2) if len(pieces) > 1 else block


def segmented_up(n: int, segments) -> torch.Tensor:
    """B [..., n, sum r_t] from segments (row_start, B_t [..., n_t, r_t], s_t): output rows
    row_start.. get s_t * B_t on rank columns of segment t, zeros elsewhere (leading dims: one B
    per row of a mixed multi-task batch)."""
    cols = [_place_rows(bt * s if s != 1.0 else bt, start, n) for start, bt, s in segments]
    return torch.cat(cols, -1) if len(cols) > 1 else cols[0]


def _check_scale(op: str, scale, name: str = "scale") -> None:
    """A finite real number (a NaN or inf scale would turn every output into NaN)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: {name} must be a finite number, got {scale!r}")



def _noah_rank(op: str, lora_a, lora_b, a_rows: int, b_cols: int, rank, scale) -> int:
    """NOAH's LoRA factors agree (lora_b's columns = lora_a's rows, the supernet rank), the subnet
    `rank` is within it and the scale is valid: the rank in effect."""
    if b_cols != a_rows:
        raise ValueError(f"{op}: lora_b {describe(lora_b)} must have as many columns as lora_a "
                         f"{describe(lora_a)} has rows (the supernet rank)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= a_rows):
        raise ValueError(f"{op}: rank must be an int in [0, {a_rows}] (lora_a's rows), got {rank!r}")
    _check_scale(op, scale)
    return a_rows if rank is None else rank


def lora_noah_qkv(x, weight, bias, lora_a, lora_b, *, rank: int | None = None, scale: float = 1.0,
                  dropout_p: float = 0.1, training: bool = False, seed=None):
    """NOAH LoRA (ZhangYuanhan-AI/NOAH `Attention`): qkv = x W^T + b + s * B[:, :r] A[:r] drop(x) (dropout on the input)."""
    return _lowrank_call(x, weight, bias, noah_layout(lora_a, lora_b, rank, scale), (lora_a, lora_b), dropout_p, True,
                         training, seed)


def noah_layout(lora_a, lora_b, rank: int | None, scale: float) -> _NoahLayout:
    """`lora_noah_qkv`'s own argument checks; the layout its op makes (A, B) with."""
    op = "lora_noah_qkv"
    check_tensor(op, "lora_a", lora_a, dim=2)
    check_tensor(op, "lora_b", lora_b, dim=2)
    r = _noah_rank(op, lora_a, lora_b, lora_a.shape[0], lora_b.shape[1], rank, scale)
    return _NoahLayout((r, float(scale)))


def _noah_factors(r: int, scale: float, lora_a, lora_b):
    """NOAH's (A, B) = (LoRA_a[:r], s * LoRA_b[:, :r]); at the supernet rank the factors themselves
    (no slice views, nor their autograd nodes)."""
    a, b = (lora_a, lora_b) if r == lora_a.shape[0] else (lora_a[:r], lora_b[:, :r])
    return a, b * scale if scale != 1.0 else b


_QKV = ("q", "k", "v")


def _petl_targets(op: str, weight, downs: dict, ups: dict, scale) -> tuple[int, list, dict]:
    """PETL-ViT LoRA's targets checked against the fused qkv weight: (the width of one of q, k, v,
    the targets in the order of `downs`, each target's scale)."""
    check_tensor(op, "weight", weight, dim=2)
    n = weight.shape[0]
    if n % 3:
        raise ValueError(f"{op}: weight {describe(weight)} is not a fused qkv projection (rows % 3 != 0)")
    targets = list(downs)
    if not targets or any(t not in _QKV for t in targets) or set(targets) != set(ups):
        raise ValueError(f"{op}: downs/ups must name the same targets among {_QKV}, got {list(downs)} / {list(ups)}")
    if isinstance(scale, dict) and set(scale) != set(targets):
        raise ValueError(f"{op}: a scale dict must name exactly the targets {targets}, got {sorted(scale)}")
    return n // 3, targets, scale if isinstance(scale, dict) else {t: scale for t in targets}


def lora_petl_qkv(x, weight, bias, downs: dict, ups: dict, *, scale: float = 1.0, dropout_p: float = 0.1,
                  training: bool = False, seed=None):
    """PETL-ViT LoRA (JieShibo/PETL-ViT `lora/vtab/lora.py`): qkv[t] += s * U_t drop(D_t x) for t in downs (subset of q, k, v).

    downs[t] = lora_t.adapter_down.weight [r, D]; ups[t] = lora_t.adapter_up.weight [N/3, r];
    `scale` is one float or a dict t -> s_t. Dropout masks: u = [u_t1 | u_t2 ...] [M, sum r] in
    the order of `downs`.
    """
    layout = petl_layout(weight, downs, ups, scale)
    return _lowrank_call(x, weight, bias, layout, (*downs.values(), *(ups[t] for t in downs)), dropout_p, False,
                         training, seed)


def petl_layout(weight, downs: dict, ups: dict, scale) -> _PetlLayout:
    """`lora_petl_qkv`'s own argument checks; the layout its op makes (A, B) with, from the
    parameters (downs in their order, then ups in the same order)."""
    ad, targets, sc = _petl_targets("lora_petl_qkv", weight, downs, ups, scale)
    for t in targets:
        check_tensor("lora_petl_qkv", f"downs[{t!r}]", downs[t], dim=2)
        check_tensor("lora_petl_qkv", f"ups[{t!r}]", ups[t], dim=2,
                     shape=(ad, downs[t].shape[0]) if downs[t].dim() == 2 else None)
        _check_scale("lora_petl_qkv", sc[t], f"scale[{t!r}]")
    return _PetlLayout((ad, tuple((_QKV.index(t) * ad, float(sc[t])) for t in targets)))


def _petl_factors(ad: int, placed: tuple, *factors):
    """PETL-ViT LoRA's (A, B) from the targets' downs then ups, `placed` = (row start, scale) per target."""
    downs, ups = factors[:len(placed)], factors[len(placed):]
    a = torch.cat(downs, 0) if len(downs) > 1 else downs[0]
    return a, segmented_up(3 * ad, [(start, up, s) for (start, s), up in zip(placed, ups)])


FACT_LAYERS = ("qkv", "proj", "fc1", "fc2")


def fact_effective(layer: str, u_w: torch.Tensor, v_w: torch.Tensor, core, scale: float):
    """(A [R, D_in], B [D_out, R]) of FacT's delta on `layer` (JieShibo/PETL-ViT `FacT/fact_tt.py`, `fact_tk.py`); `core`: qkv: a
    [3r, r] tensor or a (M_q, M_k, M_v) sequence; proj [r, r]; fc1 [4r, r]; fc2 [r, 4r]."""
    if layer not in FACT_LAYERS:
        raise ValueError(f"fact: layer must be one of {FACT_LAYERS}, got {layer!r}")
    if layer == "qkv" and not isinstance(core, torch.Tensor):
        core = torch.cat(list(core), 0)
    bv = v_w * scale if scale != 1.0 else v_w
    if layer == "qkv":
        return core @ u_w, torch.block_diag(bv, bv, bv)
    if layer == "proj":
        return core @ u_w, bv
    if layer == "fc1":
        return core @ u_w, torch.block_diag(bv, bv, bv, bv)
    return core @ torch.block_diag(u_w, u_w, u_w, u_w), bv  # fc2: U per D-chunk of the 4D input


#: output chunks of FacT's delta on each layer: qkv's q/k/v, fc1's four D-wide chunks, each one
#: s V [D, r] applied to its own r-wide slice of the rank vector
_FACT_CHUNKS = {"qkv": 3, "proj": 1, "fc1": 4, "fc2": 1}


def _fact_down(layer: str, u_w: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """A [R, D_in] = core @ U (qkv, proj, fc1) or core @ blockdiag(U x4) (fc2), in the parameters'
    dtype; fc2's as one GEMM: A[:, jD:(j+1)D] = core[:, jr:(j+1)r] @ U."""
    if layer != "fc2":
        return core @ u_w
    r = core.shape[0]
    return (core.reshape(4 * r, r) @ u_w).view(r, 4 * u_w.shape[1])


def _fact_up(x, weight, bias, u, v_w, k: int, scale: float):
    """`_FacTFunction`'s output given its u [M, k r]: x W^T + bias, then the k chunks of s V u."""
    x2 = rows_of(x)
    m, n, r = x2.shape[0], weight.shape[0], v_w.shape[1]
    out = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
    out.view(m * k, n // k).addmm_(u.view(m * k, r), (v_w if v_w.dtype == x.dtype else v_w.to(x.dtype)).t(),
                                   alpha=scale)
    return out.view(*x.shape[:-1], n)


class _FacTFunction(torch.autograd.Function):
    """out = x W^T + bias + s * blockdiag(V x k) drop(A x), A = `_fact_down(core, U)`, as one node
    over addmm chains: no block-diagonal matrix is formed, the k chunks of the rank vector are
    rows of one [M k, r] view (`out.view(M k, D).addmm_(u.view(M k, r), V^T, alpha=s)`); Triton
    only for the rank-R projection whose dropout mask is regenerated (forward u, backward dz),
    with the same mask numbering ([M, k r] offsets) as `lowrank_linear`. Saves x and u [M, R]
    besides the parameters; A, their small product, is rebuilt in backward. Gradients for x,
    bias, U, V and the core(s)."""

    @staticmethod
    def forward(ctx, x, weight, bias, u_w, v_w, layer, scale, p, seed, triton_path, rebuild, *cores):
        core = cores[0] if len(cores) == 1 else torch.cat(cores, 0)
        dt = x.dtype
        k = _FACT_CHUNKS[layer]
        x2 = rows_of(x)
        m = x2.shape[0]
        a = _fact_down(layer, u_w, core)
        if a.dtype != dt:
            a = a.to(dt)
        big_r = a.shape[0]
        if p > 0.0 and triton_path:
            u, _ = launch_down(x2, a, a.shape[1], 1, big_r, p=p, seed=seed, out_drop=True)
        elif p > 0.0:
            u = ((x2.float() @ a.float().t()) * dropout_keep_scale(seed, m, big_r, p)).to(dt)
        else:
            u = torch.mm(x2, a.t())
        out = _fact_up(x, weight, bias, u, v_w, k, scale)
        # (not A: backward rebuilds it from U and the core, one [R, r] x [r, D] product, rather
        # than keep a weight-sized copy per layer alive until then; nor the core where it is made
        # from parameters: the parts it is made of, `rebuild` or the cores qkv's is cat from)
        ctx.rebuild = rebuild and rebuild[0]
        ctx.save_for_backward(x, weight, bias, u_w, v_w, u, seed, *(rebuild[1] if rebuild else cores))
        ctx.args = (layer, scale, p, triton_path, len(cores))
        return out

    @staticmethod
    def output_again(ctx):
        """Forward's output again from the saved x and u (`ops._autograd.remake`): its GEMMs alone."""
        x, weight, bias, u_w, v_w, u, *_ = ctx.saved_tensors
        layer, scale = ctx.args[:2]
        return _fact_up(x, weight, bias, u, v_w, _FACT_CHUNKS[layer], scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, _bias, u_w, v_w, u, seed, *parts = ctx.saved_tensors
        layer, scale, p, triton_path, n_cores = ctx.args
        if ctx.rebuild is not None:
            core = ctx.rebuild(*parts)
        else:
            core = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        need = ctx.needs_input_grad
        dt = x.dtype
        k = _FACT_CHUNKS[layer]
        r = u_w.shape[0]
        x2 = rows_of(x)
        g2 = rows_of(grad_out.contiguous())
        m = g2.shape[0]
        gk = g2.view(m * k, g2.shape[1] // k)
        v_dt = v_w.to(dt)
        if p > 0.0 and triton_path:  # dz = drop'(s g_chunk V): V read as P(c, d) = V[d, c]
            v_c = v_dt.contiguous()
            dz, _ = launch_down(gk, v_c, 1, r, r, p=p, seed=seed, out_drop=True, scale=scale)
        else:
            dz = torch.mm(gk, v_dt)
            if p > 0.0:
                dz = (dz.float() * dropout_keep_scale(seed, m, k * r, p).view(m * k, r) * scale).to(dt)
            elif scale != 1.0:
                dz.mul_(scale)
        dz = dz.view(m, k * r)
        dx = dbias = du = dv = None
        if need[0]:
            a = _fact_down(layer, u_w, core)
            dx = torch.mm(g2, weight)
            dx.addmm_(dz, a if a.dtype == dt else a.to(dt))
            dx = dx.view(x.shape)
        if need[2]:
            dbias = g2.sum(0)
        if need[4]:
            dv = torch.mm(gk.t(), u.view(m * k, r))
            if scale != 1.0:
                dv.mul_(scale)
            dv = dv.to(v_w.dtype)
        dcores = [None] * n_cores
        if need[3] or any(need[10:]):
            da = torch.mm(dz.t(), x2).to(u_w.dtype)  # [R, D_in]
            if layer == "fc2":  # A = core2 @ U per chunk (core2 = core viewed [4r, r])
                c2 = core.reshape(4 * r, r)
                da2 = da.view(r, 4, u_w.shape[1]).reshape(4 * r, u_w.shape[1])
                if need[3]:
                    du = c2.t() @ da2
                dcore = (da2 @ u_w.t()).view(r, 4 * r)
            else:
                if need[3]:
                    du = core.t() @ da
                dcore = da @ u_w.t()
            dcores = list(dcore.split(r, 0)) if n_cores > 1 else [dcore]
        return (dx, None, dbias, du, dv, None, None, None, None, None, None, *dcores)


def _validate_fact(op, layer, x, weight, bias, fact_u, fact_v, cores, p, seed):
    check_features(op, x)
    # (the factors keep their own dtype, cast to x's inside; one dtype and x's device for all)
    check_tensor(op, "fact_u", fact_u, dim=2, like=x, dtype=fact_u.dtype if isinstance(fact_u, torch.Tensor) else None)
    check_tensor(op, "fact_v", fact_v, dim=2, like=x, dtype=fact_u.dtype)
    r, d = fact_u.shape
    k = _FACT_CHUNKS[layer]
    d_in = 4 * d if layer == "fc2" else d
    if fact_v.shape != (d, r) or r == 0:
        raise ValueError(f"{op}: fact_u must be [r, D] and fact_v [D, r] with r >= 1, got fact_u "
                         f"{describe(fact_u)}, fact_v {describe(fact_v)}")
    if len(cores) not in (1, 3) or (len(cores) == 3 and layer != "qkv"):
        raise ValueError(f"{op}: core must be one tensor (or, for qkv, three [r, r] tensors), got {len(cores)}")
    want = {"qkv": (r, r), "proj": (r, r), "fc1": (4 * r, r), "fc2": (r, 4 * r)}[layer]
    if layer == "qkv" and len(cores) == 1:
        want = (3 * r, r)
    for i, c in enumerate(cores):
        check_tensor(op, f"core[{i}]", c, shape=want, like=x, dtype=fact_u.dtype)
    if x.shape[-1] != d_in:
        raise ValueError(f"{op}({layer}): x must be [..., {d_in}] for FacT on {layer} with D = {d}, got x {describe(x)}")
    check_tensor(op, "weight", weight, shape=(k * d if layer != "fc2" else d, d_in), like=x)
    if bias is not None:
        check_tensor(op, "bias", bias, shape=(weight.shape[0],), like=x)
    check_dropout(op, p, seed, x, "x")


def fact_linear(x, weight, bias, fact_u, fact_v, core, *, layer: str, scale: float = 1.0,
                dropout_p: float = 0.1, training: bool = False, seed=None, rebuild_core: tuple | None = None):
    """FacT delta fused into a frozen qkv / proj / fc1 / fc2 (JieShibo/PETL-ViT `FacT/`): out = x W^T + b + s V dp(M U x)
    per slice. fact_u = FacTu.weight [r, D], fact_v = FacTv.weight [D, r]; core as in
    `fact_effective` (TT: the `*_FacTs.weight`s; TK: `fastpeft.methods.fact.fact_tk_cores(FacTc, FacTp, i)`).
    Dropout on the rank vector right after the core (mask [M, 3r | r | 4r | r]). `rebuild_core`
    = (fn, tensors) with fn(*tensors) == core, where the core is made from parameters (TK:
    `fact_tk_core` of FacTc and FacTp): the eager backward keeps those and remakes the core.

    Eager calls run one autograd.Function (`_FacTFunction`: addmm chains, no block-diagonal
    matrices; checks once per call signature); under torch.compile the registered
    `fastpeft::lowrank_linear` op with the effective matrices of `fact_effective`."""
    op = "fact_linear"
    if layer not in FACT_LAYERS:
        raise ValueError(f"fact: layer must be one of {FACT_LAYERS}, got {layer!r}")
    if torch.compiler.is_compiling():
        a, b = fact_effective(layer, fact_u, fact_v, core, scale)
        return lowrank_linear(x, weight, bias, a, b, dropout_p=dropout_p, drop_input=False, training=training,
                              seed=seed)
    if not isinstance(x, torch.Tensor):
        check_tensor(op, "x", x)  # TypeError
    _check_frozen(op, weight)
    _check_scale(op, scale)
    cores = tuple(core) if not isinstance(core, torch.Tensor) else (core,)
    dt = x.dtype
    weight, bias = cast_param(weight, dt), cast_param(bias, dt)
    p = check_p(op, dropout_p)  # (in range even when not training, as F.dropout)
    p = p if training else 0.0
    seed = _seed(p, seed, x)
    _CHECKED.check(False, lambda: _validate_fact(op, layer, x, weight, bias, fact_u, fact_v, cores, p, seed),
                   x, weight, bias, fact_u, fact_v, seed, *cores, extra=(op, layer, p))
    k = _FACT_CHUNKS[layer]
    big_r = fact_u.shape[0] * (k if layer != "fc2" else 1)
    return _FacTFunction.apply(x, weight, bias, fact_u, fact_v, layer, float(scale), p, seed,
                               use_triton(x) and big_r <= MAX_RANK, rebuild_core, *cores)


def kron_factors(rule_left, rule_right, w_left, w_right):
    """(Dn [R, n*m], Up [R, n*m]) with x @ sum_i kron(A_i, B_i) = (x Dn^T) Up, R = n*k1*k2,
    A_i = rule_left[i] @ rule_right[i] ([n, k1] @ [k1, n]), B_i = w_left[i] @ w_right[i]."""
    n, m = rule_left.shape[1], w_left.shape[1]
    dn = torch.einsum("iaA,ikB->iABak", rule_left, w_left).reshape(-1, n * m)
    up = torch.einsum("iAc,iBp->iABcp", rule_right, w_right).reshape(-1, n * m)
    return dn, up


def _fold_qv(weight, h_q, h_v, c_q: float, c_v: float):
    """weight [3D, D] + [c_q H_q^T; 0; c_v H_v^T] in weight's dtype."""
    d = weight.shape[1]
    return torch.cat([torch.add(weight[:d], h_q.t().to(weight.dtype), alpha=c_q), weight[d:2 * d],
                      torch.add(weight[2 * d:], h_v.t().to(weight.dtype), alpha=c_v)])


class _QVFoldedLinear(torch.autograd.Function):
    """x W_eff^T + bias with W_eff = `_fold_qv(weight, h_q, h_v, c_q, c_v)`: one GEMM, like folding
    the delta into the weight by hand, but saving only x and the two [D, D] matrices (what the
    eager reference keeps), not the [3D, D] W_eff, which backward rebuilds (one elementwise pass
    over the frozen weight). The frozen weight gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, h_q, h_v, c_q: float, c_v: float):
        # only what the needed grads read: x for dH, H (and the resident weight) for dx
        need_dx, need_dh = ctx.needs_input_grad[0], ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        ctx.save_for_backward(x if need_dh else None, weight, bias, *((h_q, h_v) if need_dx else (None, None)))
        ctx.c = (c_q, c_v)
        ctx.h_dtypes = (h_q.dtype, h_v.dtype)  # (the H themselves are not saved when x needs no grad)
        ctx.folded = None  # (W_eff once `output_again` made it, for backward)
        return torch.nn.functional.linear(x, _fold_qv(weight, h_q, h_v, c_q, c_v), bias)

    @staticmethod
    def output_again(ctx):
        """Forward's output again (`ops._autograd.remake`), where x and the two H were kept."""
        x, weight, bias, h_q, h_v = ctx.saved_tensors
        if x is None or h_q is None:
            return None
        ctx.folded = _fold_qv(weight, h_q, h_v, *ctx.c)
        return torch.nn.functional.linear(x, ctx.folded, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, _bias, h_q, h_v = ctx.saved_tensors
        c_q, c_v = ctx.c
        d = weight.shape[1]
        g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), None if x is None else x.reshape(-1, d)
        gx = gb = gh_q = gh_v = None
        if ctx.needs_input_grad[0]:
            gx = grad_out @ (ctx.folded if ctx.folded is not None else _fold_qv(weight, h_q, h_v, c_q, c_v))
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        # d out / d W_eff = g^T x; W_eff[:D] = c_q H_q^T -> dH_q = c_q x^T g[:, :D] (v alike)
        if ctx.needs_input_grad[3]:
            gh_q = (c_q * (x2.t() @ g2[:, :d])).to(ctx.h_dtypes[0])
        if ctx.needs_input_grad[4]:
            gh_v = (c_v * (x2.t() @ g2[:, 2 * d:])).to(ctx.h_dtypes[1])
        return gx, None, gb, gh_q, gh_v, None, None


def qv_folded_linear(x, weight, bias, h_q, h_v, c_q: float, c_v: float):
    """x (W + [c_q H_q^T; 0; c_v H_v^T])^T + bias: KAdaptation's q / v deltas folded into the frozen
    qkv weight [3D, D] (one GEMM), saving x and the two [D, D] H only (`_QVFoldedLinear`)."""
    return _QVFoldedLinear.apply(x, weight, bias, h_q, h_v, c_q, c_v)


def _kron(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_i kron(a[i], w[i]) -> [n m, n m], by the op `fastpeft.methods.kadaptation.kron_sum`
    runs on its products a = rule_left @ rule_right, w = w_left @ w_right (bit for bit)."""
    n, m = a.shape[1], w.shape[1]
    return torch.einsum("iac,ikp->akcp", a, w).reshape(n * m, a.shape[2] * w.shape[2])


def _kron_grads(grad: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, dw) of `_kron(a, w)` for its output's gradient `grad`: with G[(a c), (k p)] the
    gradient regrouped (one copy), da[i] = w[i] . G over (k, p) and dw[i] = a[i] . G over (a, c):
    two GEMMs."""
    n, m = a.shape[0], w.shape[1]
    g = grad.reshape(a.shape[1], m, a.shape[2], m).transpose(1, 2).reshape(-1, m * m)
    da = (w.reshape(n, m * m) @ g.t()).view(a.shape)
    dw = (a.reshape(n, -1) @ g).view(w.shape)
    return da, dw


def _bmm_grads(grad, left, right, needs) -> tuple:
    """The gradients of bmm(left, right)'s inputs, None where `needs` says not."""
    return (torch.bmm(grad, right.mT).to(left.dtype) if needs[0] else None,
            torch.bmm(left.mT, grad).to(right.dtype) if needs[1] else None)


@functools.cache
def _bit_values(device: torch.device) -> torch.Tensor:
    """Bit i's value in a packed mask byte (`_pack_bits`), made once per device."""
    return 2 ** torch.arange(8, dtype=torch.uint8, device=device)


def _pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bits, 8 to a byte, in its logical order (`_unpack_bits` reverses it)."""
    flat = keep.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    return (flat.view(-1, 8) * _bit_values(flat.device)).sum(-1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """`_pack_bits`' input back, as a contiguous bool tensor of `shape`."""
    bits = (packed.unsqueeze(-1) & _bit_values(packed.device)) != 0
    return bits.reshape(-1)[: math.prod(shape)].view(shape)


def _dropout_mask(h: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.dropout(h, p, training=True), what its backward multiplies by): the same draws and
    values as torch's dropout. CPU: torch multiplies by bernoulli_ noise divided by 1 - p, the
    float noise is returned; elsewhere: the fused native_dropout, its bool mask."""
    if h.device.type == "cpu":
        noise = torch.empty_like(h).bernoulli_(1.0 - p)
        noise.div_(1.0 - p)
        return h * noise, noise
    return torch.native_dropout(h, p, True)


def _dropout_grad(grad: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """The gradient through `_dropout_mask` given its mask, as torch's backward makes it."""
    if grad.device.type != "cpu":
        return torch.ops.aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - p))
    return grad * mask


class _KronPairFunction(torch.autograd.Function):
    """(drop(H_q), drop(H_v)): `kadaptation_h`. Keeps the (parameter) factors, the two [n, m, m]
    products of the per-layer factors (one where q's serve v) and, where dropout draws, its two
    masks: as torch keeps them, or with `compact`, the kept entries as bits (D^2 / 8 bytes each).
    Backward rebuilds the two [n, n, n] rule products (a bmm each)."""

    @staticmethod
    def forward(ctx, p: float, training: bool, compact: bool, *factors):
        r1l, r1r, r2l, r2r, ql, qr, vl, vr = factors
        dev = r1l.device
        ctx.p, ctx.shared = p, vl is ql and vr is qr
        ctx.autocast = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        # (the reference's ops on the same inputs: the same values; its draw order, q's then v's)
        w_q = torch.bmm(ql, qr)
        w_v = w_q if ctx.shared else torch.bmm(vl, vr)
        h_q, h_v = _kron(torch.bmm(r1l, r1r), w_q), _kron(torch.bmm(r2l, r2r), w_v)
        ctx.like = h_q.shape
        masks = ()
        if training and p > 0.0:
            h_q, m_q = _dropout_mask(h_q, p)
            h_v, m_v = _dropout_mask(h_v, p)
            masks = (_pack_bits(torch.stack((m_q, m_v)) != 0),) if compact else (m_q, m_v)
        ctx.save_for_backward(*factors, w_q, None if ctx.shared else w_v, *masks)
        return h_q, h_v

    @staticmethod
    @once_differentiable
    def backward(ctx, g_q, g_v):
        r1l, r1r, r2l, r2r, ql, qr, vl, vr, w_q, w_v, *masks = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        if len(masks) == 1:  # (compact: both masks' bits; on CPU made into torch's noise at once)
            masks = _unpack_bits(masks[0], (2, *ctx.like))
            if g_q.device.type == "cpu":
                masks = masks.to(g_q.dtype).div_(1.0 - ctx.p)
        if len(masks):
            g_q, g_v = _dropout_grad(g_q, masks[0], ctx.p), _dropout_grad(g_v, masks[1], ctx.p)
        w_v = w_q if ctx.shared else w_v
        dev = r1l.device
        with torch.autocast(dev.type, dtype=ctx.autocast) if ctx.autocast is not None else contextlib.nullcontext():
            da_q, dw_q = _kron_grads(g_q, torch.bmm(r1l, r1r), w_q)
            da_v, dw_v = _kron_grads(g_v, torch.bmm(r2l, r2r), w_v)
            if ctx.shared:  # (v read q's factors: their gradients add, one product's backward)
                dw_q, dw_v = dw_q + dw_v, None
            out = [*_bmm_grads(da_q, r1l, r1r, needs[0:2]), *_bmm_grads(da_v, r2l, r2r, needs[2:4]),
                   *_bmm_grads(dw_q, ql, qr, needs[4:6])]
            out += [None, None] if ctx.shared else _bmm_grads(dw_v, vl, vr, needs[6:8])
        return None, None, None, *out


def kadaptation_h(rule1, rule2, q_factors, v_factors, *, dropout_p: float, training: bool, compact: bool = False):
    """KAdaptation's two dropped Kronecker sums (drop(H_q), drop(H_v)), H = sum_i kron(A_i, B_i)
    (`fastpeft.methods.kadaptation._KAdaptHook.h` then its `kdropout`): the same values and the
    same dropout draws as the reference, from the generator's stream. Of what the reference's
    autograd keeps for them, the two [n, n, n] rule products are not kept (backward rebuilds
    them), and with `compact` the two [D, D] dropout masks (D = n m) are kept as bits.
    rule1 / rule2 / q_factors / v_factors: (left, right) pairs as in `kadaptation_qkv` (pass q's
    for v to reproduce the official v_uses_q_factors: their gradients add)."""
    return _KronPairFunction.apply(float(dropout_p), bool(training), bool(compact), *rule1, *rule2, *q_factors,
                                   *v_factors)


def _validate_kadaptation(x, weight, rule1, rule2, q_factors, v_factors, b_shared, scale, q_mult):
    """ValueError / TypeError for KAdaptation's factors before they are combined: each rule a pair
    (left [n, n, k1], right [n, k1, n]), each factor pair (left [n, m, k2], right [n, k2, m]) with
    n m = D (x's width), b_shared [D], on x's device; finite scale and q_mult."""
    op = "kadaptation_qkv"
    check_tensor(op, "x", x)
    check_tensor(op, "weight", weight, dim=2)
    d = x.shape[-1] if x.dim() else 0
    pairs = {"rule1": rule1, "rule2": rule2, "q_factors": q_factors, "v_factors": v_factors}
    for name, pair in pairs.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{op}: {name} must be a pair of tensors (left, right), got {type(pair).__name__}")
        for side, t in zip(("left", "right"), pair):
            check_tensor(op, f"{name}[{side}]", t, dim=3, like=x, dtype=t.dtype if isinstance(t, torch.Tensor) else None)
    n, m = rule1[0].shape[0], q_factors[0].shape[1]
    for name, width, want in (("rule1", n, "[n, n, k1], [n, k1, n]"), ("rule2", n, "[n, n, k1], [n, k1, n]"),
                              ("q_factors", m, "[n, m, k2], [n, k2, m]"), ("v_factors", m, "[n, m, k2], [n, k2, m]")):
        left, right = pairs[name]
        k = left.shape[2]
        if left.shape != (n, width, k) or right.shape != (n, k, width):
            sizes = f"n = {n}" if width is n else f"n = {n}, m = {m}"
            raise ValueError(f"{op}: {name} must be ({want}) with {sizes}, got {describe(left)} / {describe(right)}")
    if n * m != d:
        raise ValueError(f"{op}: the Kronecker factors build an {n * m}-wide H (n = {n}, m = {m}) but x is {describe(x)}")
    check_tensor(op, "b_shared", b_shared, shape=(d,), like=x, dtype=b_shared.dtype if isinstance(b_shared, torch.Tensor) else None)
    _check_scale(op, scale)
    _check_scale(op, q_mult, "q_mult")


def kadaptation_qkv(x, weight, bias, rule1, rule2, q_factors, v_factors, b_shared, *, scale: float,
                    q_mult: float = 1.0, dropout_p: float = 0.5, training: bool = False, seed=None):
    """KAdaptation on a fused qkv (eric-ai-lab/PEViT; `fastpeft.methods.kadaptation` semantics):
    q += q_mult * (x drop(H_q) * scale + b), v += x drop(H_v) * scale + b, H = sum_i A_i (x) B_i.

    rule1/rule2 = (phm_rule_left [n, n, k1], phm_rule_right [n, k1, n]); q_factors/v_factors =
    (adapter1_left [n, m, k2], adapter1_right [n, k2, m]) (pass q's for v to reproduce the
    official v_uses_q_factors); b_shared [D]. Without dropout (eval, or p = 0) the delta is the
    rank-2R fused kernel (R = n k1 k2). With dropout in training the official semantics drop
    entries of the D x D matrix H itself, which destroys the Kronecker/low-rank structure: then H
    is materialised once per call (not per token), masked (Philox, q offsets [0, D^2), v [D^2,
    2 D^2)) and folded into the frozen weight in plain torch, as the official code does.
    """
    factors = [t for pair in (rule1, rule2, q_factors, v_factors)
               for t in (pair if isinstance(pair, (tuple, list)) else (pair, None, None))]
    _CHECKED.check(torch.compiler.is_compiling(),
                   lambda: _validate_kadaptation(x, weight, rule1, rule2, q_factors, v_factors, b_shared, scale, q_mult),
                   x, weight, *factors, b_shared, extra=("kadaptation", len(factors), repr(scale), repr(q_mult)))
    _check_frozen("kadaptation_qkv", weight)
    d = x.shape[-1]
    n_out = weight.shape[0]
    if n_out != 3 * d:
        raise ValueError(f"kadaptation_qkv: weight {describe(weight)} must be a fused qkv [3D, D] for x {describe(x)}")
    dn_q, up_q = kron_factors(rule1[0], rule1[1], q_factors[0], q_factors[1])
    dn_v, up_v = kron_factors(rule2[0], rule2[1], v_factors[0], v_factors[1])
    if dn_q.shape[1] != d:
        raise ValueError(f"kadaptation_qkv: the Kronecker factors build a {dn_q.shape[1]}-wide H but x is {describe(x)}")
    zeros = b_shared.new_zeros(d)
    b_eff = torch.cat([b_shared * q_mult, zeros, b_shared])
    bias_eff = b_eff if bias is None else bias + b_eff
    p = check_p("kadaptation_qkv", dropout_p)
    p = p if training else 0.0
    if p > 0.0:
        seed = _seed(p, seed, x)
        drop = ~dropout_keep_mask(seed, 2 * d, d, p)  # bool: autograd keeps 1 byte per entry
        h_q = (dn_q.t() @ up_q).masked_fill(drop[:d], 0.0)
        h_v = (dn_v.t() @ up_v).masked_fill(drop[d:], 0.0)
        c = scale / (1.0 - p)
        return _QVFoldedLinear.apply(x, weight, cast_param(bias_eff, x.dtype), h_q, h_v, c * q_mult, c)
    a = torch.cat([dn_q, dn_v], 0)
    b = segmented_up(n_out, [(0, up_q.t(), scale * q_mult), (2 * d, up_v.t(), scale)])
    return lowrank_linear(x, weight, bias_eff, a, b)


# ----------------------------------------------------------------------------------------------
# Per-row forms (a mixed multi-task batch, fastpeft/ops/_rows.py): x [B, ..., D] holds B images,
# image b with its own task's factors a[b] [R, D], b[b] [N, R] (and bias [N] shared or [B, N]).
# The frozen GEMM runs once over the whole batch; the rank-R products per image as batched GEMMs
# or, when a dropout mask is regenerated from the seed, the per-image Triton kernels
# (kernels/lowrank.py `launch_rows_fwd` / `launch_rows_bwd`). The masks are the single-task op's
# over the batch's B*L rows (same seed, same offsets). Only LoRA (NOAH, PETL-ViT) has per-row
# forms; FacT and KAdaptation keep the reference under vmap (fastpeft/fused/lowrank.py).
# ----------------------------------------------------------------------------------------------
def _validate_rows(x, weight, bias, a, b, p, seed, triton_path):
    op = "lowrank_linear_rows"
    d = check_features(op, x)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be [B, ..., D] (one image per leading row), got x {describe(x)}")
    images = x.shape[0]
    check_tensor(op, "weight", weight, dim=2, like=x)
    n = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"{op}: weight must be [N, D] = [N, {d}], got weight {describe(weight)} for x {describe(x)}")
    check_tensor(op, "a", a, dim=3, like=x)
    r = a.shape[1]
    if a.shape[0] != images or a.shape[2] != d or r == 0:
        raise ValueError(f"{op}: a (down) must be [B, R, D] = [{images}, R, {d}] with R >= 1 (one per image of x), "
                         f"got a {describe(a)} for x {describe(x)}")
    check_tensor(op, "b", b, shape=(images, n, r), like=x)
    if bias is not None:
        check_tensor(op, "bias", bias, like=x)
        if tuple(bias.shape) not in ((n,), (images, n)):
            raise ValueError(f"{op}: bias must be [N] = [{n}] or [B, N] = [{images}, {n}], got bias {describe(bias)}")
    check_dropout(op, p, seed, x, "x")
    if triton_path and images > MAX_IMAGES:
        raise ValueError(f"{op}: {images} images exceed the kernels' grid limit ({MAX_IMAGES})")


def _lowrank_rows_fwd_torch(x, weight, bias, a, b, p, seed, drop_input):
    """`launch_rows_fwd` as torch math (no Triton): the same masks, fp32 sums, cast to x's dtype."""
    f32 = torch.float32
    images, d, n, r = a.shape[0], x.shape[-1], weight.shape[0], a.shape[1]
    x3 = x.reshape(images, -1, d).to(f32)
    rows = x3.shape[1]
    xin = x3 * dropout_keep_scale(seed, images * rows, d, p).view(x3.shape) if (p > 0 and drop_input) else x3
    z = torch.bmm(xin, a.to(f32).transpose(1, 2))
    if p > 0 and not drop_input:
        z = z * dropout_keep_scale(seed, images * rows, r, p).view(z.shape)
    u = z.to(x.dtype)
    out = x3 @ weight.to(f32).t() + torch.bmm(u.to(f32), b.to(f32).transpose(1, 2))
    if bias is not None:
        out = out + (bias.to(f32) if bias.dim() == 1 else bias.to(f32).unsqueeze(1))
    return out.to(x.dtype).view(*x.shape[:-1], n), u.view(-1, r)


def _lowrank_rows_bwd_torch(grad_out, x, weight, a, b, u, p, seed, drop_input, bias_rows):
    f32 = torch.float32
    images, d, n, r = a.shape[0], x.shape[-1], weight.shape[0], a.shape[1]
    g = grad_out.reshape(images, -1, n).to(f32)
    x3 = x.reshape(images, -1, d).to(f32)
    m = x3.shape[0] * x3.shape[1]
    dz = torch.bmm(g, b.to(f32))
    if p > 0 and not drop_input:
        dz = dz * dropout_keep_scale(seed, m, r, p).view(dz.shape)
    dz = dz.to(x.dtype).to(f32)  # (as the kernels: dz enters the GEMMs in x's dtype)
    lr = torch.bmm(dz, a.to(f32))
    xin = x3
    if p > 0 and drop_input:
        keep = dropout_keep_scale(seed, m, d, p).view(x3.shape)
        lr, xin = lr * keep, x3 * keep
    dx = g @ weight.to(f32) + lr
    da = torch.bmm(dz.transpose(1, 2), xin)
    db = torch.bmm(g.transpose(1, 2), u.view(images, -1, r).to(f32))
    dt = x.dtype
    return dx.to(dt).view(x.shape), da.to(dt), db.to(dt), (g.sum(1) if bias_rows else g.sum((0, 1))).to(dt)


def lowrank_linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                        b: torch.Tensor, *, dropout_p: float = 0.0, drop_input: bool = False,
                        training: bool = False, seed: torch.Tensor | None = None) -> torch.Tensor:
    """`lowrank_linear` with every image its own factors: out[i] = x[i] W^T + bias + u[i] B[i]^T,
    u[i] = drop(x[i] A[i]^T) (or drop(x[i]) A[i]^T when `drop_input`).

    x [B, ..., D]; weight [N, D] frozen; bias None, [N] or [B, N] (may be trainable); a [B, R, D],
    b [B, N, R] (any strides; cast to x.dtype). Dropout masks as `lowrank_linear` on x's B*L rows
    for `seed` (drawn when None). Eager only (the mixed multi-task batch's per-row form)."""
    op = "lowrank_linear_rows"
    check_tensor(op, "x", x)
    _check_frozen(op, weight)
    dt = x.dtype
    weight, bias, a, b = (cast_param(t, dt) for t in (weight, bias, a, b))
    p = check_p(op, dropout_p)
    p = p if training else 0.0
    seed = _seed(p, seed, x)
    triton_path = isinstance(a, torch.Tensor) and a.dim() == 3 and a.shape[1] <= MAX_RANK and use_triton(x)
    _CHECKED.check(False, lambda: _validate_rows(x, weight, bias, a, b, p, seed, triton_path),
                   x, weight, bias, a, b, seed, extra=("rows", p, triton_path))
    return _LowRankFunction.apply(x, weight, bias, p, seed, bool(drop_input), triton_path, True, None, a, b)


def _per_row(op: str, name: str, t, images: int, dim: int = 2) -> torch.Tensor:
    """A factor as [B, ...]: per row (a [B, ...] tensor, the rows' own) or shared (expanded, no copy)."""
    check_tensor(op, name, t)
    if t.dim() == dim:
        return t.expand(images, *t.shape)
    if t.dim() != dim + 1 or t.shape[0] != images:
        raise ValueError(f"{op}: {name} must be [{', '.join('.' * dim)}] (shared) or [B = {images}, ...] (one per "
                         f"image), got {name} {describe(t)}")
    return t


def _frozen_only(x, weight, bias):
    """x W^T + bias, bias [N] or [B, N] (a zero-rank delta)."""
    out = torch.nn.functional.linear(x, weight.to(x.dtype))
    if bias is not None:
        b = bias.to(x.dtype)
        out = out + (b if b.dim() == 1 else b.view(b.shape[0], *([1] * (x.dim() - 2)), b.shape[1]))
    return out


def lora_noah_qkv_rows(images: int, x, weight, bias, lora_a, lora_b, *, rank: int | None = None, scale: float = 1.0,
                       dropout_p: float = 0.1, training: bool = False, seed=None):
    """`lora_noah_qkv` on a mixed multi-task batch: x [B, ..., D], lora_a [B, r_super, D] and lora_b
    [B, 3 A, r_super] each image's own (or shared 2-D), bias None / [N] / [B, N]."""
    op = "lora_noah_qkv_rows"
    check_tensor(op, "x", x)
    if x.dim() < 2 or x.shape[0] != images:
        raise ValueError(f"{op}: x must be [B = {images}, ..., D], got x {describe(x)}")
    lora_a, lora_b = _per_row(op, "lora_a", lora_a, images), _per_row(op, "lora_b", lora_b, images)
    r = _noah_rank(op, lora_a, lora_b, lora_a.shape[1], lora_b.shape[2], rank, scale)
    if r == 0:
        check_p(op, dropout_p)
        return _frozen_only(x, weight, bias)
    a = lora_a[:, :r]
    b = lora_b[:, :, :r]
    if scale != 1.0:
        b = b * scale
    return lowrank_linear_rows(x, weight, bias, a, b, dropout_p=dropout_p, drop_input=True, training=training,
                               seed=seed)


def lora_petl_qkv_rows(images: int, x, weight, bias, downs: dict, ups: dict, *, scale: float = 1.0,
                       dropout_p: float = 0.1, training: bool = False, seed=None):
    """`lora_petl_qkv` on a mixed multi-task batch: downs[t] [B, r, D], ups[t] [B, N/3, r] each image's
    own (or shared 2-D), placed into the qkv output columns of t as the single-task op does
    (`segmented_up` per image); dropout masks on u = [u_t1 | u_t2 ...] [B*L, sum r]."""
    op = "lora_petl_qkv_rows"
    check_tensor(op, "x", x)
    if x.dim() < 2 or x.shape[0] != images:
        raise ValueError(f"{op}: x must be [B = {images}, ..., D], got x {describe(x)}")
    ad, targets, sc = _petl_targets(op, weight, downs, ups, scale)
    dn, up = {}, {}
    for t in targets:
        dn[t] = _per_row(op, f"downs[{t!r}]", downs[t], images)
        up[t] = _per_row(op, f"ups[{t!r}]", ups[t], images)
        if up[t].shape[1:] != (ad, dn[t].shape[1]):
            raise ValueError(f"{op}: ups[{t!r}] must be [B, {ad}, {dn[t].shape[1]}] for downs[{t!r}] "
                             f"{describe(dn[t])}, got {describe(up[t])}")
        _check_scale(op, sc[t], f"scale[{t!r}]")
    dt = x.dtype
    a = torch.cat([dn[t].to(dt) for t in targets], 1) if len(targets) > 1 else dn[targets[0]]
    b = segmented_up(3 * ad, [(_QKV.index(t) * ad, up[t].to(dt), float(sc[t])) for t in targets])
    return lowrank_linear_rows(x, weight, bias, a, b, dropout_p=dropout_p, drop_input=False, training=training,
                               seed=seed)


# ----------------------------------------------------------------------------------------------
# References (clarity first; autograd-differentiable; the test oracles). Computed in fp32, cast
# to x's dtype. Dropout uses the kernels' Philox masks (`dropout_keep_mask`) for `seed`.
# ----------------------------------------------------------------------------------------------
def _f(t):
    return t.to(torch.float32) if isinstance(t, torch.Tensor) else t


def _drop_ref(t, p, seed):
    if p <= 0.0:
        return t
    rows = t.numel() // t.shape[-1]
    keep = dropout_keep_mask(seed, rows, t.shape[-1], p).view(t.shape)
    return t * keep / (1.0 - p)


def lowrank_linear_ref(x, weight, bias, a, b, *, dropout_p=0.0, drop_input=False, seed=None):
    F = torch.nn.functional
    x32 = _f(x)
    base = F.linear(x32, _f(weight), _f(bias))
    if drop_input:
        u = F.linear(_drop_ref(x32, dropout_p, seed), _f(a))
    else:
        u = _drop_ref(F.linear(x32, _f(a)), dropout_p, seed)
    return (base + F.linear(u, _f(b))).to(x.dtype)


def lora_noah_qkv_ref(x, weight, bias, lora_a, lora_b, *, rank=None, scale=1.0, dropout_p=0.0, seed=None):
    """NOAH: out + s * (drop(x) @ A[:r].T) @ B[:, :r].T (as NoahLoRAHook)."""
    F = torch.nn.functional
    r = lora_a.shape[0] if rank is None else rank
    x32 = _f(x)
    d = F.linear(F.linear(_drop_ref(x32, dropout_p, seed), _f(lora_a)[:r]), _f(lora_b)[:, :r])
    return (F.linear(x32, _f(weight), _f(bias)) + scale * d).to(x.dtype)


def lora_petl_qkv_ref(x, weight, bias, downs, ups, *, scale=1.0, dropout_p=0.0, seed=None):
    """PETL-ViT: qkv chunk t += s_t * up_t(drop(down_t(x))) (as PetlLoRAHook); the masks are the
    column blocks of one [M, sum r] mask in the order of `downs`."""
    F = torch.nn.functional
    x32 = _f(x)
    out = F.linear(x32, _f(weight), _f(bias))
    parts = list(out.chunk(3, dim=-1))
    z = torch.cat([F.linear(x32, _f(downs[t])) for t in downs], -1)
    z = _drop_ref(z, dropout_p, seed)
    c = 0
    for t in downs:
        r = downs[t].shape[0]
        s = scale[t] if isinstance(scale, dict) else scale
        j = _QKV.index(t)
        parts[j] = parts[j] + F.linear(z[..., c:c + r], _f(ups[t])) * s
        c += r
    return torch.cat(parts, -1).to(x.dtype)


def lowrank_linear_rows_ref(x, weight, bias, a, b, *, dropout_p=0.0, drop_input=False, seed=None):
    """`lowrank_linear_ref` per image: x [B, ..., D], a [B, R, D], b [B, N, R], bias None / [N] /
    [B, N]; the masks over the batch's rows as the single-task op's."""
    images, d = x.shape[0], x.shape[-1]
    x3 = _f(x).reshape(images, -1, d)
    base = x3 @ _f(weight).t()
    if bias is not None:
        base = base + (_f(bias) if bias.dim() == 1 else _f(bias).unsqueeze(1))
    if drop_input:
        u = _drop_ref(x3.reshape(-1, d), dropout_p, seed).view(x3.shape) @ _f(a).transpose(1, 2)
    else:
        z = x3 @ _f(a).transpose(1, 2)
        u = _drop_ref(z.reshape(-1, z.shape[-1]), dropout_p, seed).view(z.shape)
    out = base + u @ _f(b).transpose(1, 2)
    return out.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def _rows_of_factor(t, images):
    return t if t.dim() == 3 else t.expand(images, *t.shape)


def lora_noah_qkv_rows_ref(x, weight, bias, lora_a, lora_b, *, rank=None, scale=1.0, dropout_p=0.0, seed=None):
    """NOAH per image (as NoahLoRAHook with image i's own LoRA_a / LoRA_b)."""
    images = x.shape[0]
    la, lb = _rows_of_factor(_f(lora_a), images), _rows_of_factor(_f(lora_b), images)
    r = la.shape[1] if rank is None else rank
    return lowrank_linear_rows_ref(x, weight, bias, la[:, :r], lb[:, :, :r] * scale, dropout_p=dropout_p,
                                   drop_input=True, seed=seed)


def lora_petl_qkv_rows_ref(x, weight, bias, downs, ups, *, scale=1.0, dropout_p=0.0, seed=None):
    """PETL-ViT per image (as PetlLoRAHook with image i's own lora_t): qkv chunk t +=
    s_t * up_t[i](drop(down_t[i](x[i]))), masks the column blocks of one [B*L, sum r] mask."""
    images, d = x.shape[0], x.shape[-1]
    x3 = _f(x).reshape(images, -1, d)
    out = x3 @ _f(weight).t()
    if bias is not None:
        out = out + (_f(bias) if bias.dim() == 1 else _f(bias).unsqueeze(1))
    parts = list(out.chunk(3, dim=-1))
    z = torch.cat([x3 @ _rows_of_factor(_f(downs[t]), images).transpose(1, 2) for t in downs], -1)
    z = _drop_ref(z.reshape(-1, z.shape[-1]), dropout_p, seed).view(z.shape)
    c = 0
    for t in downs:
        up = _rows_of_factor(_f(ups[t]), images)
        r = up.shape[-1]
        s = scale[t] if isinstance(scale, dict) else scale
        j = _QKV.index(t)
        parts[j] = parts[j] + (z[..., c:c + r] @ up.transpose(1, 2)) * s
        c += r
    return torch.cat(parts, -1).reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def fact_linear_ref(x, weight, bias, fact_u, fact_v, core, *, layer, scale=1.0, dropout_p=0.0, seed=None):
    """FacT as the official forward computes it (`fastpeft.methods.fact._FacTHook.apply`)."""
    F = torch.nn.functional
    x32 = _f(x)
    U, V = _f(fact_u), _f(fact_v)
    out = F.linear(x32, _f(weight), _f(bias))
    if layer == "qkv":
        cores = torch.cat([_f(c) for c in core], 0) if not isinstance(core, torch.Tensor) else _f(core)
        t = _drop_ref(F.linear(F.linear(x32, U), cores), dropout_p, seed)  # [..., 3r]
        d = F.linear(t.unflatten(-1, (3, -1)), V).flatten(-2)
    elif layer == "proj":
        d = F.linear(_drop_ref(F.linear(F.linear(x32, U), _f(core)), dropout_p, seed), V)
    elif layer == "fc1":
        t = _drop_ref(F.linear(F.linear(x32, U), _f(core)), dropout_p, seed)  # [..., 4r]
        d = F.linear(t.unflatten(-1, (4, -1)), V).flatten(-2)
    else:
        w = F.linear(x32.unflatten(-1, (4, -1)), U).flatten(-2)  # [..., 4r], index j*r + a
        d = F.linear(_drop_ref(F.linear(w, _f(core)), dropout_p, seed), V)
    return (out + d * scale).to(x.dtype)


def kron_sum_ref(rule_left, rule_right, w_left, w_right):
    """H = sum_i kron(rule_left[i] @ rule_right[i], w_left[i] @ w_right[i]) (explicit torch.kron)."""
    return sum(torch.kron(rule_left[i] @ rule_right[i], w_left[i] @ w_right[i]) for i in range(rule_left.shape[0]))


def kadaptation_qkv_ref(x, weight, bias, rule1, rule2, q_factors, v_factors, b_shared, *, scale, q_mult=1.0,
                        dropout_p=0.0, seed=None):
    """As `fastpeft.methods.kadaptation._KAdaptHook.apply` (dense H), dropout mask from `seed`."""
    F = torch.nn.functional
    x32 = _f(x)
    d = x.shape[-1]
    out = F.linear(x32, _f(weight), _f(bias))
    h_q = kron_sum_ref(*(_f(t) for t in (*rule1, *q_factors)))
    h_v = kron_sum_ref(*(_f(t) for t in (*rule2, *v_factors)))
    if dropout_p > 0.0:
        keep = dropout_keep_mask(seed, 2 * d, d, dropout_p).to(torch.float32) / (1.0 - dropout_p)
        h_q, h_v = h_q * keep[:d], h_v * keep[d:]
    q, k, v = out.chunk(3, dim=-1)
    bb = _f(b_shared)
    dq = (x32 @ h_q * scale + bb) * q_mult
    dv = x32 @ h_v * scale + bb
    return torch.cat([q + dq, k, v + dv], -1).to(x.dtype)
