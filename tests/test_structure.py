"""The package's structure: no import circles in compeff/, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "compeff"


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the compeff modules it imports anywhere in its file (top level or inside functions)."""
    modules: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compeff"):
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("compeff"))
        modules[name] = found
    return {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (each is an import circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_circle(tmp_path):
    pkg = tmp_path / "compeff"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from compeff.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from compeff.a import x\n")
    (pkg / "c.py").write_text("import compeff.a\n")
    assert circles(import_graph(pkg)) == [["compeff.a", "compeff.sub.b"]]


def test_compeff_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 40
    assert circles(graph) == []


LOWER_THAN_TRAINING = ("compeff.select", "compeff.evaluate", "compeff.teachers", "compeff.synth",
                       "compeff.loading", "compeff.models", "compeff.llm_models")  # fmt: skip


def test_layers_below_training_do_not_import_it():
    """Data flows generate -> score -> sample -> sft: selection, evaluation, teachers and model loading
    sit below training and never import it (model loading lives in compeff.loading)."""
    graph = import_graph()
    upward = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m.startswith(LOWER_THAN_TRAINING)
        for d in deps
        if d.startswith("compeff.train")
    )
    assert upward == []
