"""ST-Adapter under `fastpeft.patch`: each serial adapter slot (block_in / mlp_in: x <- ST(x)) is
swapped in place for the fused op of fastpeft/ops/st_adapter.py (down-projection GEMM, then the temporal
depthwise conv fused into the up-projection GEMM with the residual; saves the input and the
C-wide down-projection only). The same parameters are read from the reference module."""
from __future__ import annotations

import torch

from ..methods.base import SlotFn
from ..methods.st_adapter import _Serial
from .common import SlotRule, kernel_call


class FusedSerial(SlotFn):
    def __init__(self, original: _Serial, backend: str):
        self.original = original
        self.backend = backend

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from ..ops import st_adapter as ks

        m = self.original.adapter
        m.check_input(x)  # the module's own message for a wrong frame count or grid
        return kernel_call(self.backend, x.device.type, ks.st_adapter, x, m.fc1.weight, m.fc1.bias, m.conv.weight,
                           m.conv.bias, m.fc2.weight, m.fc2.bias, frames=m.frames, num_prefix=m.num_prefix,
                           grid=m.grid)


class STAdapterRule(SlotRule):
    name = "STAdapter"
    fused = {_Serial: FusedSerial}
    what = "fused down GEMM + temporal conv/up GEMM/residual (saves x and the C-wide down-projection)"
