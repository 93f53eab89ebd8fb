"""The package's layering, read from the source (imports inside functions included): no import
cycle among fastpeft/ and kernels/ modules, kernels know no method, the engines (patch, recompute,
the class-row pass, the block order) know methods only through their base contract, and no
`_fp_*` attribute is stamped on anything."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: modules that run every method the same way: they may import fastpeft.methods.base only
ENGINES = ("fastpeft.patch", "fastpeft.recompute", "fastpeft.class_row", "fastpeft.block", "fastpeft.rule")


def _modules() -> dict[str, Path]:
    mods = {}
    for top in ("fastpeft", "kernels"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[:2] == ["fastpeft", "kernels"]:
                continue  # a development symlink to kernels/
            if parts[0] == "kernels":  # installed as fastpeft.kernels
                parts.insert(0, "fastpeft")
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of the package `name` imports anywhere in its source. `from pkg import sub` counts
    as importing `pkg.sub` (and `pkg` only for names that are not submodules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.startswith("kernels"):
                base = "fastpeft." + base
            subs = [f"{base}.{a.name}" for a in node.names]
            targets = [s for s in subs if s in mods]
            if len(targets) < len(subs):
                targets.append(base)
        else:
            continue
        for t in targets:
            t = "fastpeft." + t if t.startswith("kernels") else t
            while t and t not in mods:  # `import fastpeft.ops.vqt as x` -> the module itself
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_graph_sees_the_package(graph):
    # (guards the reader above: it must find the modules and their relative imports)
    assert {"fastpeft.patch", "fastpeft.kernels.adapter", "fastpeft.methods.base", "fastpeft.block"} <= set(graph)
    assert "fastpeft.methods.base" in graph["fastpeft.patch"]
    assert "fastpeft.block" in graph["fastpeft.methods.base"]


def test_no_import_cycle(graph):
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_kernels_know_no_method(graph):
    bad = {(k, v) for k, deps in graph.items() if k.startswith("fastpeft.kernels")
           for v in deps if v.startswith(("fastpeft.methods", "fastpeft.fused"))}
    assert not bad, sorted(bad)


def test_ops_know_no_method_and_no_engine(graph):
    # the op layer sits below the methods, the fused rules and the engines
    bad = {(k, v) for k, deps in graph.items() if k.startswith("fastpeft.ops")
           for v in deps if v.startswith(("fastpeft.methods", "fastpeft.fused")) or v in ENGINES}
    assert not bad, sorted(bad)


def test_kernels_define_no_op():
    # kernels/ holds @triton.jit kernels, launchers and configs; the custom ops, their fakes and
    # autograd, the eager autograd.Functions and the functionals live in fastpeft/ops/
    pattern = re.compile(r"torch\.library|register_fake|register_autograd|custom_op|autograd\.Function")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "kernels").glob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_engines_know_methods_only_through_their_base(graph):
    bad = {(k, v) for k in ENGINES for v in graph[k]
           if v.startswith("fastpeft.methods") and v != "fastpeft.methods.base"}
    assert not bad, sorted(bad)


def test_no_fp_attributes():
    hits = [f"{p.relative_to(ROOT)}:{i}" for top in ("fastpeft", "kernels") for p in (ROOT / top).rglob("*.py")
            if "fastpeft/kernels" not in p.as_posix()
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\b_fp_\w", line)]
    assert not hits, hits
