"""The op layer: every `torch.ops.fastpeft.*` custom op, its checks, fake and autograd formulas,
its eager path and public functional, and its plain-torch reference; one module per op family.

  scale_shift.py   y = x * scale + shift: the C++/CUDA extension's op (fastpeft._C)
  vqt.py           VQT query attention and aggregation: the extension's ops
  adapter.py       the bottleneck adapter (Triton kernels: kernels/adapter.py)
  lowrank.py       low-rank deltas on frozen projections: LoRA, FacT, KAdaptation (kernels/lowrank.py)
  ssf.py           SSF's fused ops: scale-shift (eager), LayerNorm + scale-shift, scale-shift + GELU
  convpass.py      Convpass (kernels/convpass.py)

Importing this package loads the compiled extension once (fastpeft._ext.load()); if it cannot
be used, the extension's ops are defined on pure-torch references after one RuntimeWarning. The
Triton-backed ops run their torch math wherever Triton cannot run. Every op has fake and
autograd registrations, so they work under torch.compile.

The extension's op families register their fakes in their own module: csrc/ops.cpp names it in
the `set_python_module` of the family's TORCH_LIBRARY fragment.
"""

from fastpeft import _ext

_ext.load()

from fastpeft.ops.scale_shift import scale_shift, scale_shift_ref  # noqa: E402
from fastpeft.ops.vqt import (  # noqa: E402
    vqt_aggregate,
    vqt_aggregate_ref,
    vqt_query_attention,
    vqt_query_attention_ref,
)
# The Triton-backed families register their ops on import. Their functionals share the
# modules' names (adapter, ssf, ...), so they are reached as fastpeft.ops.<family>.<functional>.
from fastpeft.ops import adapter, convpass, lowrank, ssf  # noqa: E402,F401

__all__ = [
    "scale_shift", "scale_shift_ref",
    "vqt_query_attention", "vqt_query_attention_ref", "vqt_aggregate", "vqt_aggregate_ref",
]
