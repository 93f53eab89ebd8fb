"""The kernel layer knows no method: no module of kernels/ imports from fastpeft.methods or
fastpeft.fused, at the top or inside a function (issue: one op layer, no import cycles)."""
from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
FORBIDDEN = ("fastpeft.methods", "fastpeft.fused")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            # kernels/ is installed as fastpeft.kernels: `..methods` is fastpeft.methods
            base = "fastpeft." * (node.level >= 2) + (node.module or "")
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def test_no_kernel_module_imports_a_method_or_a_fused_rule():
    files = sorted(KERNELS.glob("*.py"))
    assert files
    bad = [(p.name, n) for p in files for n in _imports(p) if n.startswith(FORBIDDEN)]
    assert not bad, bad
