"""Bottleneck adapters under `fastpeft.patch`: each reference slot function (AdaptFormer parallel /
sequential, NOAH's serial adapter, VPT's Pfeiffer adapter) is swapped in place for one call of the
fused adapter op (ops.adapter.adapter): down-projection, bias, activation, dropout (mask
regenerated from a saved seed, never stored), up-projection, scale and residual in one pass,
saving x and the rank-r pre-activation only. Same parameters, same slot position.

In a mixed multi-task batch (the input is vmapped: fastpeft/block.py `vmapped`) every image has its
task's adapter: on the Triton backend in eager mode the fused modules run the op's per-row form
(ops.adapter.adapter_rows, through fastpeft/ops/_rows.py `rows_call`: one launch for the whole
batch, each row block reading its image's weights); elsewhere (CPU backends, torch.compile) the
reference, which vmap batches."""
from __future__ import annotations

import functools

import torch

from ..methods.adapter import AdapterAfterFFN, _PfeifferOnMLP
from ..methods.adaptformer import _Parallel, _Sequential
from ..methods.base import SlotFn
from ..block import vmapped
from .common import SlotRule, kernel_call, rows_form, rows_kernel_call


@functools.cache
def _ops():
    """fastpeft.ops.adapter, imported on the first fused call (it imports triton), then a cached lookup."""
    from ..ops import adapter
    return adapter


def _adapter(backend, x, w_down, b_down, w_up, b_up, **kw):
    return kernel_call(backend, x.device.type, _ops().adapter, x, w_down, b_down, w_up, b_up, **kw)


def _adapter_rows(backend, x, w_down, b_down, w_up, b_up, add_x: bool, scale, **kw):
    """The per-row adapter on a mixed batch: `rows_call` hands `adapter_rows` the physical tensors
    (x [B, 1, N, D]; each weight and a learnable scale [B, ...] when they are the rows' own, as in
    a multi-task model, else shared); `add_x`: x is also the residual (the serial adapters)."""
    ops = _ops()

    def form(images, x, w_down, b_down, w_up, b_up, scale_t):
        return ops.adapter_rows(images, x, w_down, b_down, w_up, b_up, residual=x if add_x else None,
                                scale=scale if scale_t is None else scale_t, **kw)

    scale_t = scale if isinstance(scale, torch.Tensor) else None
    return rows_kernel_call(backend, form, x, w_down, b_down, w_up, b_up, scale_t)


class FusedAdaptFormer(SlotFn):
    """AdaptFormer's AdaptMLP (ReLU, dropout, scale s on the up-projection incl. its bias)."""

    class_row_local = True  # row-local; seeded dropout (fused/common.py)

    def __init__(self, original: _Parallel | _Sequential, backend: str):
        self.original = original
        self.backend = backend
        self.reads_norm = original.reads_norm

    def _run(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        ad = self.original.adapter
        return _adapter(self.backend, x, ad.down_proj.weight, ad.down_proj.bias, ad.up_proj.weight, ad.up_proj.bias,
                        residual=residual, scale=ad.scale, act="relu", dropout_p=ad.dropout, training=ad.training)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if vmapped(args[0]):  # a mixed multi-task batch (fastpeft/block.py vmapped)
            if not rows_form(self.backend):
                return self.original(*args)
            ad = self.original.adapter
            x = args[0]
            # parallel: the adapter branch alone; sequential: f + the branch (x = f)
            return _adapter_rows(self.backend, x, ad.down_proj.weight, ad.down_proj.bias, ad.up_proj.weight,
                                 ad.up_proj.bias, not isinstance(self.original, _Parallel), ad.scale,
                                 act="relu", dropout_p=ad.dropout, training=ad.training)
        if isinstance(self.original, _Parallel):
            y, _ = args
            return self._run(y, None)
        (f,) = args
        return self._run(f, f)


class FusedSerialAdapter(SlotFn):
    """NOAH's adapter after the drop-pathed FFN: f + ln2(dropout(QuickGELU(ln1(f)))) (leading
    `active_dim` units of a supernet-sized adapter)."""

    class_row_local = True  # row-local; seeded dropout (fused/common.py)

    def __init__(self, original: AdapterAfterFFN, backend: str):
        self.original = original
        self.backend = backend

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        rows = vmapped(f)
        if rows and not rows_form(self.backend):
            return self.original(f)
        ad = self.original.adapter
        a = ad.active_dim
        if a == 0:
            return f
        w1, b1, w2 = ad.ln1.weight, ad.ln1.bias, ad.ln2.weight
        if a != ad.super_dim:
            w1, b1, w2 = w1[:a], b1[:a], w2[:, :a].contiguous()
        if rows:
            return _adapter_rows(self.backend, f, w1, b1, w2, ad.ln2.bias, True, 1.0, act=ad.act,
                                 dropout_p=ad.dropout, training=ad.training)
        return _adapter(self.backend, f, w1, b1, w2, ad.ln2.bias, residual=f, scale=1.0, act=ad.act,
                        dropout_p=ad.dropout, training=ad.training)


class FusedPfeiffer(SlotFn):
    """VPT's adapter on the raw MLP output: m + up(act(down(m)))."""

    class_row_local = True  # row-local; seeded dropout (fused/common.py)

    def __init__(self, original: _PfeifferOnMLP, backend: str):
        self.original = original
        self.backend = backend

    def __call__(self, m: torch.Tensor) -> torch.Tensor:
        o = self.original
        if vmapped(m):
            if not rows_form(self.backend):
                return o(m)
            return _adapter_rows(self.backend, m, o.down.weight, o.down.bias, o.up.weight, o.up.bias, True, 1.0,
                                 act=o.act, dropout_p=o.p, training=o.down.training)
        return _adapter(self.backend, m, o.down.weight, o.down.bias, o.up.weight, o.up.bias, residual=m,
                        scale=1.0, act=o.act, dropout_p=o.p, training=o.down.training)


_FUSED = {_Parallel: FusedAdaptFormer, _Sequential: FusedAdaptFormer, AdapterAfterFFN: FusedSerialAdapter,
          _PfeifferOnMLP: FusedPfeiffer}


class AdapterRule(SlotRule):
    name = "adapter"
    fused = _FUSED
    what = "fused bottleneck adapter"
    # the op's torch path is slower than eager's chain on a CPU for a few percent fewer saved
    # bytes (`pytest bench -k ops`, bench/test_ops.py, measures both)
    cpu_reason = "CPU path: the eager reference is faster and saves within 3% as much (fused on the Triton backend)"

    def skip(self, fn):
        if isinstance(fn, (_Parallel, _Sequential)) and fn.adapter.layernorm_option != "none":
            return "AdaptFormer's adapter LayerNorm option: kept as reference"
        return None
