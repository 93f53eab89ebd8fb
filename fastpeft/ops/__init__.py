"""Custom ops `torch.ops.fastpeft.*` and their public functionals.

Importing this package loads the compiled extension once (fastpeft._ext.load()); if it cannot
be used, the same ops are defined on pure-torch references after one RuntimeWarning. Either
way the ops have fake and autograd registrations, so they work under torch.compile.

Each op module registers its own fakes: csrc/ops.cpp names it in the `set_python_module` of the
op family's TORCH_LIBRARY fragment (FakeTensor tracing imports it on demand).
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

__all__ = [
    "scale_shift", "scale_shift_ref",
    "vqt_query_attention", "vqt_query_attention_ref", "vqt_aggregate", "vqt_aggregate_ref",
]
