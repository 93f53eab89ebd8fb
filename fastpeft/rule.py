"""What `fastpeft.patch` is made of: `Rule`s (one fusion each: where it applies, how to install
it, how to undo it) and the `PatchReport` they fill. Kept apart from fastpeft/patch.py so the
rules of fastpeft/fused/ import it without importing the engine that runs them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from .methods.base import ViTInfo

__all__ = ["PatchReport", "Rule"]


@dataclass
class PatchReport:
    backend: str
    recompute: bool
    patched: list[tuple[str, str, str]] = field(default_factory=list)  # (where, what, backend)
    left_alone: list[tuple[str, str]] = field(default_factory=list)  # (what, why)

    def __bool__(self) -> bool:
        return bool(self.patched)

    def __str__(self) -> str:
        lines = [f"fastpeft.patch(backend={self.backend!r}, recompute={self.recompute})"]
        if not self.patched:
            lines.append("  nothing to patch: the model is unchanged")
        for where, what, backend in self.patched:
            lines.append(f"  patched  {where}: {what} [{backend}]")
        for what, why in self.left_alone:
            lines.append(f"  left     {what}: {why}")
        return "\n".join(lines)


class Rule:
    """One fusion. `apply` installs it where it fits and returns undo records; `undo` reverses
    one record. Records must address modules by path (they live in a deep-copyable model)."""

    name: ClassVar[str] = "rule"

    def apply(self, model: nn.Module, info: ViTInfo, backend: str, recompute: bool,
              report: PatchReport) -> list[Any]:
        raise NotImplementedError

    def undo(self, model: nn.Module, record: Any) -> None:
        raise NotImplementedError
