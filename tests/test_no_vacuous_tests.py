"""Every test must be able to fail: a static check that each test function asserts something.

A test "asserts" if its body (nested functions and `with` blocks included) has an `assert`
statement, uses `pytest.raises` / `pytest.warns` / `pytest.fail`, calls anything whose name
starts with `assert` (`torch.testing.assert_close`, a local `assert_rel`, …), or calls a helper —
defined in the same file or imported from another test module — that does, transitively.
A test that only runs code ("does not raise") fails this check.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PYTEST_CHECKS = {"raises", "warns", "fail", "deprecated_call"}


def _called_name(call: ast.Call) -> tuple[str | None, str | None]:
    """(base, attr) of `base.attr(...)`, or (name, None) of `name(...)`."""
    f = call.func
    if isinstance(f, ast.Name):
        return f.id, None
    if isinstance(f, ast.Attribute):
        base = f.value.id if isinstance(f.value, ast.Name) else None
        return base, f.attr
    return None, None


def _direct_checks_and_calls(fn: ast.AST) -> tuple[bool, set[str]]:
    """Whether `fn` asserts by itself, and the bare names it calls (candidate helpers)."""
    calls: set[str] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            return True, calls
        if isinstance(node, ast.Call):
            base, attr = _called_name(node)
            name = attr or base or ""
            if name.startswith("assert") or name.startswith("_assert"):
                return True, calls
            if base == "pytest" and attr in PYTEST_CHECKS:
                return True, calls
            if attr is None and base is not None:
                calls.add(base)
            elif attr is not None and base is not None:
                calls.add(f"{base}.{attr}")
    return False, calls


def _module_functions(tree: ast.Module) -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{node.name}.{item.name}"] = item
    return out


def _imported_test_helpers(tree: ast.Module) -> dict[str, Path]:
    """`from tests.x.y import name` → name → tests/x/y.py (only helpers inside tests/)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tests":
            path = TESTS.parent.joinpath(*node.module.split(".")).with_suffix(".py")
            for alias in node.names:
                out[alias.asname or alias.name] = path
    return out


def asserting_functions(path: Path, _cache: dict[Path, set[str]] = {}) -> set[str]:  # noqa: B006
    """Names of the functions in `path` that assert, directly or through helpers (fixpoint)."""
    if path in _cache:
        return _cache[path]
    _cache[path] = set()  # cycles between helper modules terminate
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = _module_functions(tree)
    imported = _imported_test_helpers(tree)
    asserting = {n for n, p in imported.items() if p.is_file() and n in asserting_functions(p)}
    info = {name: _direct_checks_and_calls(fn) for name, fn in functions.items()}
    done = {name for name, (direct, _) in info.items() if direct}
    changed = True
    while changed:
        changed = False
        for name, (_, calls) in info.items():
            if name not in done and calls & (done | asserting):
                done.add(name)
                changed = True
    _cache[path] = done | asserting
    return _cache[path]


def vacuous_tests() -> list[str]:
    out = []
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        good = asserting_functions(path)
        for name in _module_functions(tree):
            if name.rpartition(".")[2].startswith("test") and name not in good:
                out.append(f"{path.relative_to(TESTS.parent)}::{name}")
    return out


def test_every_test_asserts_something():
    assert vacuous_tests() == []


def test_the_check_sees_a_vacuous_test(tmp_path):
    """The detector itself: a test that only calls code is flagged, one that asserts through a
    local helper or pytest.raises is not."""
    src = tmp_path / "test_sample.py"
    src.write_text(
        "import pytest\n"
        "def helper(x):\n    assert x\n"
        "def indirect(x):\n    helper(x)\n"
        "def test_runs_only():\n    sum([1, 2])\n"
        "def test_via_helper():\n    indirect(1)\n"
        "def test_raises():\n    with pytest.raises(ValueError):\n        int('x')\n"
        "def test_assert_call():\n    torch.testing.assert_close(1, 1)\n"
        "class TestX:\n    def test_method_vacuous(self):\n        pass\n"
    )
    good = asserting_functions(src)
    tree = ast.parse(src.read_text())
    tests = [n for n in _module_functions(tree) if n.rpartition(".")[2].startswith("test")]
    assert sorted(n for n in tests if n not in good) == ["TestX.test_method_vacuous", "test_runs_only"]
