"""The README's Python snippets run as shown (in order, one namespace, as a reader would paste them)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_snippets():
    assert len(_snippets()) >= 2


def test_readme_snippets_run(capsys):
    ns: dict = {}
    for code in _snippets():
        exec(compile(code, str(README), "exec"), ns)  # noqa: S102
    model = ns["model"]
    import fastpeft

    # after the life-cycle snippet: LoRA alone, unmerged and unpatched, AdaptFormer removed
    assert [type(i.method).__name__ for i in fastpeft.injections(model)] == ["LoRA"]
    assert "fastpeft.patch" in capsys.readouterr().out  # the PatchReport was printed


def test_readme_mentions_only_existing_files():
    root = README.parent
    for target in re.findall(r"\]\(([^)#]+)\)", README.read_text()):
        if not target.startswith("http"):
            assert (root / target).exists(), target
