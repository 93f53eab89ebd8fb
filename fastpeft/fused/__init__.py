"""Modules and patch rules that put the fused ops (fastpeft.kernels, fastpeft.ops) in place of the
reference methods' op sequences. `fastpeft.patch` imports the rules from here; each file covers
one method family and registers its `Rule`s in `RULES` order."""
from __future__ import annotations

from .common import AbsorbedHook, kernel_call, swap_hook  # noqa: F401


def rules():
    """The fusion rules, in the order `patch` tries them (imported lazily: they import Triton)."""
    from .adapter import AdapterRule
    from .convpass import ConvpassRule
    from .lowrank import LowRankRule
    from .ssf import SSFRule
    from .st_adapter import STAdapterRule

    return [SSFRule(), LowRankRule(), AdapterRule(), ConvpassRule(), STAdapterRule()]
