"""SSF under `fastpeft.patch`: the reference applies `x * scale + shift` as a hook after every
site, and autograd keeps a copy of each scaled tensor. Fused:

  LayerNorm -> SSF           one op (ops.ssf.layernorm_ssf): saves x + row mean/rstd, not the
                             normalised tensor                  (norm1, norm2, final norm)
  fc1 -> SSF -> GELU         the GELU module becomes GELU(z * scale + shift) (ops.ssf.ssf_gelu):
                             saves z only instead of z, z*scale+shift and the GELU input
  Linear -> SSF              one scale-shift op (C++ `fastpeft::scale_shift` on the cpp backend,
                             ops.ssf.ssf otherwise)         (qkv, proj, fc2, patch embedding)

On the Triton backend without recompute, a plain nn.Linear whose only forward hook is its SSF
(qkv, proj, fc2, fc1) is re-classed as `FusedLinearSSF`: the frozen GEMM and its scale-shift (for
fc1 with the Mlp's GELU, which becomes an nn.Identity) run as one op (ops.ssf.linear_ssf), one
autograd node instead of two, saving the same tensor (the GEMM's output).

The fused modules read the very same `ssf_scale_*` / `ssf_shift_*` parameters from their official
owners; the reference hooks stay registered (absorbed, or swapped for their fused twin in place),
so `unpatch` restores them exactly.

A mixed multi-task batch (fastpeft/multitask.py: the input is vmapped, each image with its own task's
scale and shift) runs the per-row forms of the same three ops on the eager Triton backend (`rows_form`):
one launch per site for the whole batch, forward and backward.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from timm.layers import LayerNorm as TimmLayerNorm

from ..methods.base import OutputHook
from ..methods.ssf import SSFHook
from ..block import vmapped
from .common import AbsorbedHook, find_hooks, kernel_call, rows_form, rows_kernel_call, swap_hook


@functools.cache
def _ops():
    """fastpeft.ops.ssf, imported on the first fused call (it imports triton), then a cached lookup."""
    from ..ops import ssf
    return ssf


def _ssf_params(hook: SSFHook) -> tuple[torch.Tensor, torch.Tensor]:
    """The hook's (scale, shift): its owner's registered parameters, read from `_parameters` (where
    `getattr` finds them, nn.Module keeping a parameter's name out of the instance dict), anything
    else (not registered as a parameter) by `getattr`."""
    owner = hook.owner
    params = owner._parameters
    scale, shift = params.get(hook.scale_name), params.get(hook.shift_name)
    if scale is None or shift is None:
        return getattr(owner, hook.scale_name), getattr(owner, hook.shift_name)
    return scale, shift


class _LayerNormSSF:
    """A LayerNorm whose output is scaled and shifted in the same op. Installed by re-classing the
    model's own LayerNorm (its weight/bias stay where they were); `_fastpeft_ssf` is the SSF hook whose
    parameters it applies."""

    _fastpeft_ssf: SSFHook
    _fastpeft_backend: str
    class_row_local = True  # (fastpeft/class_row.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if vmapped(x):  # a mixed multi-task batch: per-row LayerNorm + SSF, or the reference (`rows_form`)
            if rows_form(self._fastpeft_backend):
                form = functools.partial(_ops().layernorm_ssf_rows, eps=self.eps)
                return rows_kernel_call(self._fastpeft_backend, form, x, self.weight, self.bias,
                                  *_ssf_params(self._fastpeft_ssf))
            return self._fastpeft_ssf.apply(x, super().forward(x))
        scale, shift = _ssf_params(self._fastpeft_ssf)
        return kernel_call(self._fastpeft_backend, x.device.type, _ops().layernorm_ssf,
                           x, self.weight, self.bias, scale, shift, self.eps)


class FusedLayerNormSSF(_LayerNormSSF, nn.LayerNorm):
    pass


class FusedTimmLayerNormSSF(_LayerNormSSF, TimmLayerNorm):
    pass


#: LayerNorm classes computing plain F.layer_norm (timm's fast_norm path included) -> fused twin
_FUSED_LN = {nn.LayerNorm: FusedLayerNormSSF, TimmLayerNorm: FusedTimmLayerNormSSF}


class SSFGELU(nn.Module):
    """Replaces an Mlp's `act` (exact-erf nn.GELU): GELU(z * scale + shift) with the fc1 SSF's
    parameters, saving only z. Holds no parameters of its own."""

    class_row_local = True  # (fastpeft/class_row.py)

    def __init__(self, ssf_hook: SSFHook, backend: str):
        super().__init__()
        self.__dict__["_fastpeft_ssf"] = ssf_hook  # a plain reference, not a submodule
        self.backend = backend

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if vmapped(z):  # a mixed multi-task batch: per-row SSF + GELU, or the reference (`rows_form`)
            if rows_form(self.backend):
                return rows_kernel_call(self.backend, _ops().ssf_gelu_rows, z, *_ssf_params(self._fastpeft_ssf))
            return nn.functional.gelu(self._fastpeft_ssf.apply(z, z))
        scale, shift = _ssf_params(self._fastpeft_ssf)
        return kernel_call(self.backend, z.device.type, _ops().ssf_gelu, z, scale, shift)

    def lean_backward(self, z: torch.Tensor, grad: torch.Tensor):
        """The gradients of `forward(z)` for its output's gradient `grad`, without a graph:
        (dz, ((scale, dscale), (shift, dshift))), the parameters those are for beside them. What
        fastpeft/recompute.py's lean MLP calls instead of re-running the module with a graph."""
        scale, shift = _ssf_params(self._fastpeft_ssf)
        dz, dscale, dshift = kernel_call(self.backend, z.device.type, _ops().ssf_gelu_grads, grad, z, scale, shift)
        return dz, ((scale, dscale), (shift, dshift))


class FusedLinearSSF(nn.Linear):
    """A plain nn.Linear with its SSF (and, where `_fastpeft_act` is 1, the Mlp's GELU after it)
    in one op: act(linear(x) * scale + shift) (ops.ssf.linear_ssf). Installed by re-classing the
    model's own Linear (its weight and bias stay where they were); `_fastpeft_ssf` is the SSF hook
    whose parameters it applies (its place among the layer's hooks held by an AbsorbedHook)."""

    _fastpeft_ssf: SSFHook
    _fastpeft_backend: str
    _fastpeft_act: int
    class_row_local = True  # (fastpeft/class_row.py) a row-local GEMM, then a per-channel affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hook, backend = self._fastpeft_ssf, self._fastpeft_backend
        if vmapped(x):  # a mixed multi-task batch: the Linear, then the per-row scale-shift (+ GELU)
            z = nn.functional.linear(x, self.weight, self.bias)
            if rows_form(backend):
                form = _ops().ssf_gelu_rows if self._fastpeft_act else _ops().ssf_rows
                return rows_kernel_call(backend, form, z, *_ssf_params(hook))
            y = hook.apply(x, z)
            return nn.functional.gelu(y) if self._fastpeft_act else y
        scale, shift = _ssf_params(hook)
        return kernel_call(backend, x.device.type, _ops().linear_ssf, x, self.weight, self.bias, scale, shift,
                           self._fastpeft_act)


def _fusable_linear(layer: nn.Module, hook: SSFHook, backend: str, recompute: bool) -> bool:
    """Whether the Linear + SSF become one `FusedLinearSSF`: on the Triton backend (the CPU
    backends keep their separate ops) without recompute (fastpeft/recompute.py plans around the
    frozen GEMMs and their hooks), for a plain nn.Linear whose only hook is this SSF."""
    return (backend == "triton" and not recompute and type(layer) is nn.Linear and not layer._forward_pre_hooks
            and list(layer._forward_hooks.values()) == [hook])


class FusedSSFHook(OutputHook):
    """The standalone scale-shift after a Linear (or the patch embedding) as one op."""

    saves_output = True  # the scale gradient is sum(grad * out)
    class_row_local = True  # per-channel scale and shift: row-local, no random draws
    draws = False

    def __init__(self, original: SSFHook, backend: str):
        self.original = original
        self.backend = backend

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if vmapped(out):  # a mixed multi-task batch: per-row scale-shift, or the reference (`rows_form`)
            if rows_form(self.backend):
                return rows_kernel_call(self.backend, _ops().ssf_rows, out, *_ssf_params(self.original))
            return self.original.apply(x, out)
        scale, shift = _ssf_params(self.original)
        if self.backend == "cpp":
            from ..ops import scale_shift

            return scale_shift(out, scale, shift)
        return kernel_call(self.backend, out.device.type, _ops().ssf, out, scale, shift)


class SSFRule:
    name = "ssf"

    def apply(self, model, info, backend, recompute, report):
        records = []
        for path, layer in model.named_modules():
            for hook in find_hooks(layer, SSFHook):
                if hook.channel_dim != -1:
                    report.left_alone.append((f"{path} SSF", "NCHW conv output (patch-embed with a norm): kept as reference"))
                    continue
                fused_ln = _FUSED_LN.get(type(layer))
                if fused_ln is not None and layer.elementwise_affine:
                    swap_hook(layer, hook, AbsorbedHook(hook, by=fused_ln.__name__))
                    records.append(("layernorm", path, type(layer)))
                    layer.__class__ = fused_ln
                    layer._fastpeft_ssf, layer._fastpeft_backend = hook, backend
                    report.patched.append((path, "LayerNorm + SSF (saves x + row statistics)", backend))
                    continue
                mlp = model.get_submodule(path.rpartition(".")[0]) if path.endswith("mlp.fc1") else None
                act = getattr(mlp, "act", None)
                fuse_linear = _fusable_linear(layer, hook, backend, recompute)
                if mlp is not None and type(act) is nn.GELU and act.approximate == "none":
                    if fuse_linear:
                        self._fuse_linear(layer, hook, backend, 1)
                        mlp.act = nn.Identity()
                        records.append(("linear_gelu", path, act))
                        report.patched.append((path, "fc1 -> SSF -> GELU as one op (saves fc1 output only)", backend))
                        continue
                    swap_hook(layer, hook, AbsorbedHook(hook, by="SSFGELU"))
                    mlp.act = SSFGELU(hook, backend)
                    records.append(("gelu", path, act))
                    report.patched.append((path, "fc1 -> SSF -> GELU (saves fc1 output only)", backend))
                    continue
                if fuse_linear:
                    self._fuse_linear(layer, hook, backend, 0)
                    records.append(("linear", path))
                    report.patched.append((path, "Linear -> SSF as one op (saves the Linear's output only)", backend))
                    continue
                swap_hook(layer, hook, FusedSSFHook(hook, backend))
                records.append(("hook", path))
                report.patched.append((path, "scale-shift", backend))
        return records

    @staticmethod
    def _fuse_linear(layer, hook, backend, act):
        swap_hook(layer, hook, AbsorbedHook(hook, by="FusedLinearSSF"))
        layer.__class__ = FusedLinearSSF
        layer._fastpeft_ssf, layer._fastpeft_backend, layer._fastpeft_act = hook, backend, act

    def undo(self, model, record):
        kind, path = record[0], record[1]
        layer = model.get_submodule(path)
        for fn in list(layer._forward_hooks.values()):
            if isinstance(fn, (AbsorbedHook, FusedSSFHook)) and isinstance(fn.original, SSFHook):
                swap_hook(layer, fn, fn.original)
        if kind == "layernorm":
            layer.__class__ = record[2]
            del layer._fastpeft_ssf, layer._fastpeft_backend
        elif kind in ("linear", "linear_gelu"):
            layer.__class__ = nn.Linear
            del layer._fastpeft_ssf, layer._fastpeft_backend, layer._fastpeft_act
        if kind in ("gelu", "linear_gelu"):
            model.get_submodule(path.rpartition(".")[0]).act = record[2]
