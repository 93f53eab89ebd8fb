"""fastpeft.kernels: fused Triton kernels (one file per op family), their launchers, the
`torch.ops.fastpeft.*` custom ops that dispatch to them, and plain-torch references.

  adapter.py  bottleneck adapter (AdaptFormer parallel/sequential, NOAH/Pfeiffer serial)
  ssf.py      SSF family: scale-shift, LayerNorm + scale-shift, fc1 -> scale-shift -> GELU
  aot.py      ahead-of-time compile check for sm_80/sm_90 (`python -m fastpeft.kernels.aot`)

Backend selection: see `_common.py` (`set_backend`, `backend`, FASTPEFT_KERNEL_BACKEND).
Functionals live in their modules (`fastpeft.kernels.adapter.adapter`, ...); importing this
package registers every op. Module names are not shadowed by functions of the same name.
"""
from . import adapter, ssf  # noqa: F401  (registers the fastpeft:: ops)
from ._common import backend, get_backend, set_backend

__all__ = ["adapter", "ssf", "backend", "get_backend", "set_backend"]
