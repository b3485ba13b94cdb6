"""Deterministic program mutations, spliced into the source text at AST node positions.

A mutation replaces one span of the original text and leaves every other character alone:
the mutant keeps the original's formatting, comments and length up to the edit, so a critic
trained on (correct, mutant) pairs cannot tell them apart by style, only by the code. (Running
``ast.unparse`` over the whole body would normalise quotes, spacing and parentheses.)

Kinds, each applied to nodes that start at or after ``first_line``:
- ``compare``: ``<``↔``<=``, ``>``↔``>=``, ``==``↔``!=``, ``in``↔``not in``, ``is``↔``is not``
- ``arith``: ``+``↔``-``, ``*``→``//``, ``//``→``*``, ``/``→``*``, ``%``→``//``, ``**``→``*``
  (also in augmented assignments: ``+=``↔``-=`` ...)
- ``boolop``: ``and``↔``or``
- ``constant``: an integer literal ``n`` → ``n + 1``, and → ``n - 1`` when ``n >= 1``; a plain
  float literal ``x`` → ``x + 1``
- ``string``: ``''``↔``' '`` (a join or split separator)
- ``not``: ``not x`` → ``x``
- ``drop``: delete a statement of at most two lines that fills whole lines, when its block
  keeps another statement (definitions, imports, ``pass``, ``global``/``nonlocal`` are never
  dropped)
- ``return``: ``return True``↔``return False``; ``return <comparison or and/or>`` →
  ``return not (<...>)``; ``return name`` → ``return other_name`` (another argument or local
  of the function); ``return len(...)`` (and other integer calls) → ``... + 1`` / ``... - 1``
- ``call``: a sibling function or method: ``min``↔``max``, ``any``↔``all``, ``lower``↔``upper``,
  ``startswith``↔``endswith``, ``isdigit``↔``isalpha``, ``floor``↔``ceil``, ...
- ``unwrap``: ``f(x)`` → ``x`` (a forgotten ``sorted``, ``set``, ``abs``, ...)
- ``filter``: drop an ``if`` clause of a comprehension
- ``args``: swap the two positional arguments of a call
- ``name``: a variable read replaced by another argument/local of the same function

Positions: ``ast`` columns are UTF-8 byte offsets; they are converted to character offsets,
and operator tokens (which have no AST position) are located with ``tokenize`` between the
operands. Every candidate is checked against the text it replaces before it is offered.

Selection (``select_mutants``) is deterministic for a seed: candidates are shuffled within
each kind with ``random.Random(seed)`` (string seeds are hashed with SHA-512, not ``hash()``),
the kinds are put in a seeded order and interleaved round-robin, so the first few mutants are
of different kinds. Mutants that do not parse, equal the original or repeat an earlier mutant
are left out.
"""

from __future__ import annotations

import ast
import bisect
import io
import random
import tokenize
from dataclasses import dataclass

KINDS = (
    "compare", "arith", "boolop", "constant", "string", "not", "drop", "return", "call",
    "unwrap", "filter", "args", "name",
)

_COMPARE = {
    ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
    ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.In: ("in", "not in"),
    ast.NotIn: ("not in", "in"), ast.Is: ("is", "is not"), ast.IsNot: ("is not", "is"),
}
_ARITH = {
    ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "//"), ast.FloorDiv: ("//", "*"),
    ast.Div: ("/", "*"), ast.Mod: ("%", "//"), ast.Pow: ("**", "*"),
}
_BOOL = {ast.And: ("and", "or"), ast.Or: ("or", "and")}
_MAX_DROP_LINES = 2
_NEVER_DROP = (
    ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom,
    ast.Pass, ast.Global, ast.Nonlocal,
)


@dataclass(frozen=True)
class Mutation:
    """Replace ``source[start:end]`` (character offsets) with ``replacement``."""

    kind: str
    start: int
    end: int
    replacement: str
    line: int
    description: str


class _Text:
    """Offsets in one source text: AST (line, byte col) and token (line, char col) → char offset."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines = source.split("\n")
        self.starts = [0]
        for line in self.lines[:-1]:
            self.starts.append(self.starts[-1] + len(line) + 1)
        self.tokens = [
            (self.char(*t.start), self.char(*t.end), t.type, t.string)
            for t in tokenize.generate_tokens(io.StringIO(source).readline)
        ]
        self.token_starts = [t[0] for t in self.tokens]

    def char(self, line: int, col: int) -> int:
        return self.starts[line - 1] + col

    def ast_char(self, line: int, byte_col: int) -> int:
        text = self.lines[line - 1]
        return self.starts[line - 1] + len(text.encode("utf-8")[:byte_col].decode("utf-8"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return (
            self.ast_char(node.lineno, node.col_offset),
            self.ast_char(node.end_lineno, node.end_col_offset),
        )

    def tokens_between(self, start: int, end: int) -> list[tuple[int, int, int, str]]:
        i = bisect.bisect_left(self.token_starts, start)
        out = []
        while i < len(self.tokens) and self.tokens[i][0] < end:
            tok = self.tokens[i]
            if tok[1] <= end and tok[3] not in ("(", ")") and tok[2] not in (
                tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT,
            ):
                out.append(tok)
            i += 1
        return out


def _operator(text: _Text, left: ast.AST, right: ast.AST, symbol: str) -> tuple[int, int] | None:
    """The span of the operator token(s) ``symbol`` between two operand nodes."""
    toks = text.tokens_between(text.span(left)[1], text.span(right)[0])
    if not toks:
        return None
    start, end = toks[0][0], toks[-1][1]
    if " ".join(t[3] for t in toks) != symbol:
        return None
    return start, end


def _in_fstring(tree: ast.AST) -> set[int]:
    # Before Python 3.12 nodes inside f-strings can carry unreliable positions: never touch them.
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            inside.update(id(n) for n in ast.walk(node))
    return inside


def _whole_lines(text: _Text, node: ast.stmt) -> tuple[int, int] | None:
    """The span of the full lines ``node`` fills (with the newline), or None if it shares one."""
    start, end = text.span(node)
    line_start = text.starts[node.lineno - 1]
    line_end = text.starts[node.end_lineno - 1] + len(text.lines[node.end_lineno - 1])
    rest = text.source[end:line_end].strip()
    if text.source[line_start:start].strip() or (rest and not rest.startswith("#")):
        return None
    return line_start, min(line_end + 1, len(text.source))


def _function_names(func: ast.AST) -> list[str]:
    """Arguments and assigned names of a function (or module), sorted."""
    names = {a.arg for a in ast.walk(func) if isinstance(a, ast.arg)}
    names |= {n.id for n in ast.walk(func) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return sorted(names)


class _Context:
    """What the per-kind finders share: the text, parent links, names in scope."""

    def __init__(self, source: str, tree: ast.AST, first_line: int) -> None:
        self.source = source
        self.first_line = first_line
        self.text = _Text(source)
        self.parents: dict[int, ast.AST] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                self.parents[id(child)] = node
        self._names: dict[int, list[str]] = {}

    def segment(self, node: ast.AST) -> str:
        start, end = self.text.span(node)
        return self.source[start:end]

    def scope_names(self, node: ast.AST) -> list[str]:
        func = node
        while id(func) in self.parents and not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = self.parents[id(func)]
        if id(func) not in self._names:
            self._names[id(func)] = _function_names(func)
        return self._names[id(func)]

    def mutation(self, kind: str, start: int, end: int, new: str, line: int) -> Mutation:
        return Mutation(kind, start, end, new, line, f"{self.source[start:end]!r} -> {new!r}")


def _compare(c: _Context, node: ast.AST) -> list[Mutation]:
    if not isinstance(node, ast.Compare):
        return []
    out, left = [], node.left
    for op, right in zip(node.ops, node.comparators):
        old, new = _COMPARE[type(op)]
        span = _operator(c.text, left, right, old)
        if span:
            out.append(c.mutation("compare", *span, new, node.lineno))
        left = right
    return out


def _arith(c: _Context, node: ast.AST) -> list[Mutation]:
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        old, new = _ARITH[type(node.op)]
        span = _operator(c.text, node.left, node.right, old)
    elif isinstance(node, ast.AugAssign) and type(node.op) in _ARITH:
        old, new = (s + "=" for s in _ARITH[type(node.op)])
        span = _operator(c.text, node.target, node.value, old)
    else:
        return []
    return [c.mutation("arith", *span, new, node.lineno)] if span else []


def _boolop(c: _Context, node: ast.AST) -> list[Mutation]:
    if not isinstance(node, ast.BoolOp):
        return []
    old, new = _BOOL[type(node.op)]
    spans = [_operator(c.text, a, b, old) for a, b in zip(node.values, node.values[1:])]
    return [c.mutation("boolop", *span, new, node.lineno) for span in spans if span]


def _constant(c: _Context, node: ast.AST) -> list[Mutation]:
    if not isinstance(node, ast.Constant) or type(node.value) not in (int, float):
        return []
    start, end = c.text.span(node)
    text = c.source[start:end]
    if type(node.value) is float:
        # only plainly written floats (2.0, 0.5), so the edit reads like a human's
        if text != repr(node.value) or not node.value.is_integer() and len(text) > 6:
            return []
        return [c.mutation("constant", start, end, repr(node.value + 1), node.lineno)]
    try:
        if ast.literal_eval(text) != node.value:
            return []
    except (ValueError, SyntaxError):
        return []
    out = [c.mutation("constant", start, end, str(node.value + 1), node.lineno)]
    if node.value >= 1:
        out.append(c.mutation("constant", start, end, str(node.value - 1), node.lineno))
    return out


def _string(c: _Context, node: ast.AST) -> list[Mutation]:
    swaps = {"''": "' '", "' '": "''", '""': '" "', '" "': '""'}
    if not isinstance(node, ast.Constant) or type(node.value) is not str:
        return []
    start, end = c.text.span(node)
    new = swaps.get(c.source[start:end])
    return [c.mutation("string", start, end, new, node.lineno)] if new else []


def _not(c: _Context, node: ast.AST) -> list[Mutation]:
    if not (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)):
        return []
    start, _ = c.text.span(node)
    toks = c.text.tokens_between(start, c.text.span(node.operand)[1])
    if toks and toks[0][3] == "not" and toks[0][0] == start and len(toks) > 1:
        return [c.mutation("not", start, toks[1][0], "", node.lineno)]
    return []


_INT_CALLS = {"len", "sum", "max", "min", "abs", "int", "round", "ord", "count", "index", "find"}


def _return(c: _Context, node: ast.AST) -> list[Mutation]:
    if not isinstance(node, ast.Return) or node.value is None:
        return []
    value = node.value
    start, end = c.text.span(value)
    text = c.source[start:end]
    if isinstance(value, ast.Constant) and type(value.value) is bool:
        return [c.mutation("return", start, end, str(not value.value), node.lineno)]
    if isinstance(value, (ast.Compare, ast.BoolOp)):
        return [c.mutation("return", start, end, f"not ({text})", node.lineno)]
    if isinstance(value, ast.Name):
        return [
            c.mutation("return", start, end, name, node.lineno)
            for name in c.scope_names(node) if name != value.id
        ]
    if isinstance(value, ast.Call):
        func = value.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if name in _INT_CALLS:
            return [c.mutation("return", start, end, f"{text} {op} 1", node.lineno) for op in "+-"]
    return []


_METHOD_SWAPS = {
    "lower": "upper", "upper": "lower", "startswith": "endswith", "endswith": "startswith",
    "isupper": "islower", "islower": "isupper", "isdigit": "isalpha", "isalpha": "isdigit",
    "swapcase": "lower", "lstrip": "rstrip", "rstrip": "lstrip", "ljust": "rjust",
    "rjust": "ljust", "keys": "values", "values": "keys", "floor": "ceil", "ceil": "floor",
    "title": "capitalize", "capitalize": "title", "find": "rfind", "rfind": "find",
}
_FUNCTION_SWAPS = {"min": "max", "max": "min", "any": "all", "all": "any"}


def _call(c: _Context, node: ast.AST) -> list[Mutation]:
    """A wrong function or method of the same family (min/max, lower/upper, ...)."""
    if not isinstance(node, ast.Call):
        return []
    func = node.func
    if isinstance(func, ast.Name) and func.id in _FUNCTION_SWAPS:
        start, end = c.text.span(func)
        return [c.mutation("call", start, end, _FUNCTION_SWAPS[func.id], node.lineno)]
    if isinstance(func, ast.Attribute) and func.attr in _METHOD_SWAPS:
        _, end = c.text.span(func)
        start = end - len(func.attr)
        if c.source[start:end] == func.attr:
            return [c.mutation("call", start, end, _METHOD_SWAPS[func.attr], node.lineno)]
    return []


def _unwrap(c: _Context, node: ast.AST) -> list[Mutation]:
    """``f(x)`` → ``x``: a forgotten conversion or step (``sorted``, ``set``, ``len``, ...)."""
    if not (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and len(node.args) == 1 and not node.keywords
        and not isinstance(node.args[0], (ast.Starred, ast.GeneratorExp))
    ):
        return []
    start, end = c.text.span(node)
    return [c.mutation("unwrap", start, end, c.segment(node.args[0]), node.lineno)]


def _filter(c: _Context, node: ast.AST) -> list[Mutation]:
    """Drop an ``if`` clause of a comprehension."""
    if not isinstance(node, ast.comprehension):
        return []
    out, previous = [], node.iter
    for cond in node.ifs:
        if cond.lineno < c.first_line:
            continue  # comprehension nodes have no line of their own: check each clause
        start, end = c.text.span(previous)[1], c.text.span(cond)[1]
        out.append(c.mutation("filter", start, end, "", cond.lineno))
        previous = cond
    return out


def _args(c: _Context, node: ast.AST) -> list[Mutation]:
    """Swap the two positional arguments of a call."""
    if not (isinstance(node, ast.Call) and len(node.args) == 2 and not node.keywords):
        return []
    a, b = node.args
    if isinstance(a, ast.Starred) or isinstance(b, ast.Starred):
        return []
    (a0, a1), (b0, b1) = c.text.span(a), c.text.span(b)
    if c.source[a0:a1] == c.source[b0:b1]:
        return []
    new = c.source[b0:b1] + c.source[a1:b0] + c.source[a0:a1]
    return [c.mutation("args", a0, b1, new, node.lineno)]


def _name(c: _Context, node: ast.AST) -> list[Mutation]:
    """A variable read replaced by another local of the same function (the next two by name)."""
    if not (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)):
        return []
    names = c.scope_names(node)
    if node.id not in names or len(names) < 2:
        return []
    i = names.index(node.id)
    others = sorted({names[(i + 1) % len(names)], names[(i + 2) % len(names)]} - {node.id})
    start, end = c.text.span(node)
    return [c.mutation("name", start, end, other, node.lineno) for other in others]


def _drops(c: _Context, node: ast.AST, first_line: int, skip: set[int]) -> list[Mutation]:
    out = []
    for field in ("body", "orelse", "finalbody"):
        block = getattr(node, field, None)
        if not isinstance(block, list) or len(block) < 2:
            continue
        for stmt in block:
            if isinstance(stmt, _NEVER_DROP) or stmt.lineno < first_line or id(stmt) in skip:
                continue
            if stmt.end_lineno - stmt.lineno + 1 > _MAX_DROP_LINES:
                continue  # a big deletion makes a mutant recognisable by its length alone
            span = _whole_lines(c.text, stmt)
            if span:
                lines = str(stmt.lineno)
                if stmt.end_lineno > stmt.lineno:
                    lines += f"-{stmt.end_lineno}"
                out.append(Mutation("drop", *span, "", stmt.lineno, f"drop line {lines}"))
    return out


_FINDERS = (_compare, _arith, _boolop, _constant, _string, _not, _return, _call, _unwrap,
            _filter, _args, _name)


def find_mutations(source: str, *, first_line: int = 1) -> list[Mutation]:
    """All candidate mutations of nodes starting at line >= ``first_line``, in source order."""
    tree = ast.parse(source)
    c = _Context(source, tree, first_line)
    skip = _in_fstring(tree)
    out: list[Mutation] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if getattr(node, "lineno", first_line) >= first_line:
            for finder in _FINDERS:
                out.extend(finder(c, node))
        out.extend(_drops(c, node, first_line, skip))
    out.sort(key=lambda m: (m.start, m.end, KINDS.index(m.kind), m.replacement))
    return out


def apply_mutation(source: str, mutation: Mutation) -> str:
    """The source with the mutation's span replaced."""
    return source[: mutation.start] + mutation.replacement + source[mutation.end:]


def rank(mutations: list[Mutation], seed: int | str) -> list[Mutation]:
    """Seeded order: shuffled within each kind, kinds in a seeded order, interleaved."""
    rng = random.Random(seed)
    groups = {k: [m for m in mutations if m.kind == k] for k in KINDS}
    for k in KINDS:
        rng.shuffle(groups[k])
    kinds = [k for k in KINDS if groups[k]]
    rng.shuffle(kinds)
    out = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        out.extend(groups[k][i] for k in kinds if i < len(groups[k]))
    return out


def select_mutants(source: str, *, seed: int | str, first_line: int = 1) -> list[tuple[Mutation, str]]:
    """``(mutation, mutated_source)`` in the seeded order; each parses, all texts distinct."""
    seen = {source}
    out = []
    for m in rank(find_mutations(source, first_line=first_line), seed):
        mutated = apply_mutation(source, m)
        if mutated in seen:
            continue
        try:
            ast.parse(mutated)
        except SyntaxError:
            continue
        seen.add(mutated)
        out.append((m, mutated))
    return out
