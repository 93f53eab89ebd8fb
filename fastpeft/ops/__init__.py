"""Custom ops `torch.ops.fastpeft.*` and their public functionals.

Importing this package loads the compiled extension once (fastpeft._ext.load()); if it cannot
be used, the same ops are defined on pure-torch references after one RuntimeWarning. Either
way the ops have fake and autograd registrations, so they work under torch.compile.
"""

from fastpeft import _ext

_ext.load()

from fastpeft.ops.scale_shift import scale_shift, scale_shift_ref  # noqa: E402

__all__ = ["scale_shift", "scale_shift_ref"]
