"""The package's import graph has no cycle, between modules or between subpackages.

Read from the source with `ast` (nothing is imported), so a cycle that Python happens to
tolerate today (a late import, an import order that works) is still found.
"""

from __future__ import annotations

import ast
from pathlib import Path

import wmtp_fn

ROOT = Path(wmtp_fn.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, name: str, modules: set[str]) -> set[str]:
    """The `wmtp_fn` modules that `path` (module `name`) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from package `level - 1` above this one
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from a import b` imports the module `a.b` when there is one, else a name of `a`.
            targets = [source] + [f"{source}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: imported(path, name, set(paths)) for name, path in paths.items()}


def subpackage(name: str) -> str:
    """`wmtp_fn.models.llama` → `wmtp_fn.models`; top-level modules stand for themselves."""
    return ".".join(name.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name, targets in graph.items():
        for t in targets:
            a, b = subpackage(name), subpackage(t)
            if a != b:
                out.setdefault(a, set()).add(b)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path `[a, b, …, a]`, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    graph = {"wmtp_fn.adapters.lora": {"wmtp_fn.models.base"}, "wmtp_fn.models.layers": {"wmtp_fn.adapters.slots"}}
    assert find_cycle(graph) is None  # no module cycle,
    assert find_cycle(package_graph(graph)) == ["wmtp_fn.adapters", "wmtp_fn.models", "wmtp_fn.adapters"]  # a package one


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "wmtp_fn.adapters.slots" in graph["wmtp_fn.models.layers"]
    assert "wmtp_fn.adapters.lora" in graph["wmtp_fn.adapters"]  # an __init__'s relative or absolute imports


def test_no_module_imports_itself_through_others():
    assert find_cycle(import_graph()) is None


def test_no_two_subpackages_import_each_other():
    """Layers stay layers: e.g. `models` may use `adapters` (slots), so `adapters` must not use
    `models`; what both need of a base (its record, its fingerprint) lives below both."""
    assert find_cycle(package_graph(import_graph())) is None
