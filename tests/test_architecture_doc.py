"""docs/architecture.md stays true: it names every registered gate and every package it maps."""

import importlib
import itertools
import re
from pathlib import Path

from convqa.gates.registry import GATES

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def _expand(pattern: str) -> set[str]:
    """`F-INF-{st,gguf}-cpu` -> {F-INF-st-cpu, F-INF-gguf-cpu} (shell brace expansion)."""
    parts = re.split(r"\{([^}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return {"".join(c) for c in itertools.product(*choices)}


def test_every_registered_gate_is_on_the_page():
    text = DOC.read_text()
    named = set()
    for token in re.findall(r"(?:G0|F)-[\w{},-]*", text):
        named |= _expand(token.rstrip(",-"))
    missing = [g.id for g in GATES if g.id not in named]
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_every_module_the_page_names_exists():
    text = DOC.read_text()
    modules = set(re.findall(r"`(convqa(?:\.\w+)+)`", text))
    assert len(modules) > 15
    for name in sorted(modules):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:  # a module-level name: `convqa.gates.registry.GATES`
            module, _, attribute = name.rpartition(".")
            assert hasattr(importlib.import_module(module), attribute), name
    for path in re.findall(r"`(convqa/[\w/]+\.py)`", text):
        assert (DOC.parent.parent / path).is_file(), path
