"""fastpeft.kernels: the fused Triton kernels, one file per op family: `@triton.jit` kernels,
their launchers (`launch_*`: reshape, allocate, launch) and configs, and `aot_specs()`. No
method knowledge, no op registration: the `torch.ops.fastpeft.*` ops, their checks, eager
autograd Functions, functionals and plain-torch references are in fastpeft/ops/.

  adapter.py       bottleneck adapter (AdaptFormer, serial adapters, NOAH)
  lowrank.py       rank-R down projection with regenerated dropout, masked GEMM, weight grads
  ssf.py           scale-shift, LayerNorm + scale-shift, scale-shift + GELU
  convpass.py      Convpass's up projection and down backward
  conv_adapter.py  Conv-Adapter; st_adapter.py: ST-Adapter
  aot.py           ahead-of-time compile check for sm_80/sm_90 (`python -m fastpeft.kernels.aot`)

Backend selection: `_common.py` (`set_backend`, `backend`, FASTPEFT_KERNEL_BACKEND).
"""
from ._common import backend, get_backend, set_backend

__all__ = ["backend", "get_backend", "set_backend"]
