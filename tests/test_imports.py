"""Imports flow one way (STYLE.md 10): the import graph of ``clip_es`` has no cycle.

Every import counts, also those inside functions: a deferred import is still a dependency.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "clip_es"


def import_graph() -> dict[str, set[str]]:
    """``{module: {clip_es modules it imports}}``, read with :mod:`ast` (no import runs)."""
    mods = {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in mods.items():
        deps = graph[mod] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                pkg = mod.split(".")[:None if path.name == "__init__.py" else -1]
                base = ".".join(pkg[:len(pkg) + 1 - node.level] + [node.module or ""]).strip(".") \
                    if node.level else node.module  # relative imports resolved against the package
                subs = {f"{base}.{a.name}" for a in node.names} & mods.keys()  # from pkg import submodule
                deps.update(subs or {base} & mods.keys())
        deps.discard(mod)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or ``None`` (depth-first search)."""
    done: set[str] = set()

    def visit(path: list[str]) -> list[str] | None:
        for d in sorted(graph.get(path[-1], ())):
            if d in path:
                return path[path.index(d):] + [d]
            if d not in done and (c := visit(path + [d])):
                return c
        done.add(path[-1])
        return None

    return next((c for m in sorted(graph) if m not in done and (c := visit([m]))), None)


def test_import_graph_is_acyclic():
    graph = import_graph()
    assert {"clip_es.evaluate", "clip_es.data.registry", "clip_es.train.loop"} <= graph.keys()
    assert "clip_es.data.base" in graph["clip_es.data.voc"]  # the walk sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_find_cycle_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
