"""Convpass under `fastpeft.patch`: each bypass slot (s * DP(C(h))) is swapped in place for the
fused bypass of kernels.convpass (down + QuickGELU in one kernel, the 3x3 token-grid conv, then
QuickGELU + dropout + up + scale in one kernel; saves h and the dim-wide intermediates only).
DropPath stays outside (DP(s C) = s DP(C): it is a per-sample scale)."""
from __future__ import annotations

import functools

import torch

from ..block import vmapped
from ..methods.base import SlotFn, in_class_row_pass
from ..methods.convpass import _Bypass
from .common import SlotRule, kernel_call


@functools.cache
def _ops():
    """fastpeft.ops.convpass, imported on the first fused call (it imports triton), then a cached lookup."""
    from ..ops import convpass
    return convpass


class FusedBypass(SlotFn):
    def __init__(self, original: _Bypass, backend: str):
        self.original = original
        self.backend = backend
        #: (signature, whether the fast entry applies) of the last call's arguments: checked once
        #: per signature (`ops.convpass.check_bypass`), compared on every call
        self._checked: tuple | None = None

    @property
    def class_row_local(self) -> bool:  # via the reference's class-row path (one row: nothing to fuse;
        # its torch dropout draws eager's mask for that row, so more of torch's generator than the kernel's seed)
        return self.original.class_row_local

    def _params(self) -> tuple:
        """(w_down, b_down, conv_w, conv_b, w_up, b_up) as the conv's modules hold them now."""
        m = self.original.conv._modules
        down, conv, up = m["adapter_down"]._parameters, m["adapter_conv"]._parameters, m["adapter_up"]._parameters
        return down["weight"], down["bias"], conv["weight"], conv["bias"], up["weight"], up["bias"]

    def __call__(self, resid: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        if in_class_row_pass() or vmapped(normed):  # (or a mixed multi-task batch: fastpeft/block.py vmapped)
            return self.original(resid, normed)
        o = self.original
        c = o.conv
        params = self._params()
        if not torch.compiler.is_compiling():
            # eager: the checks once per signature, then the bypass's autograd.Function directly
            ops = _ops()
            training = c.training
            p = c.dropout if training else 0.0
            sig = ops.bypass_signature(normed, params, training, p)
            checked = self._checked
            if checked is None or checked[0] != sig:
                checked = self._checked = (sig, ops.check_bypass(normed, params, grid=c.grid, num_prefix=c.num_prefix,
                                                                 scale=o.scale, p=c.dropout))
            if checked[1]:
                return o.drop_path(kernel_call(self.backend, normed.device.type, ops.convpass_checked, normed, params,
                                               grid=c.grid, num_prefix=c.num_prefix, scale=float(o.scale), p=p))
        out = kernel_call(
            self.backend, normed.device.type, _ops().convpass, normed, *params, grid=c.grid,
            num_prefix=c.num_prefix, scale=o.scale, dropout_p=c.dropout, training=c.training,
        )
        return o.drop_path(out)


class ConvpassRule(SlotRule):
    name = "Convpass"
    fused = {_Bypass: FusedBypass}
    what = "fused down/act and act/dropout/up/scale around the grid conv"
    cpu_reason = "CPU path: the eager reference saves within 1% as much and is not slower (fused on the Triton backend)"
