"""Plain Python values as JSON text, and length-prefixed frames: the only thing that crosses
between the tests (trusted) and the candidate (untrusted) in the proxy mode.

``dumps(value)`` / ``loads(text)`` round-trip exactly: ``None``, ``bool``, ``int`` (any size),
``float`` (incl. ``nan``, ``inf``, ``-0.0``), ``complex``, ``str``, ``bytes``, ``bytearray``,
``list``, ``tuple``, ``dict`` (any hashable keys, in order), ``set``, ``frozenset``. JSON
arrays are lists; every other kind is a one-key object ``{"tuple": [...]}``, ``{"dict":
[[k, v], ...]}``, ... Instances of subclasses (a ``defaultdict``, a ``namedtuple``, a ``str``
subclass with its own ``__eq__``) are sent as their base type's data: what arrives is always
the plain built-in, so an "equal to everything" object cannot cross. ``opaque=True`` (the
candidate's side) sends anything else as ``{"opaque": "<type name>"}``, which arrives as an
:class:`Opaque` that equals nothing but itself (a generator where a list was expected is a
wrong answer, as it would be in-process); ``opaque=False`` (the tests' side) raises
:class:`Unencodable` instead.

``loads`` builds only those built-ins and :class:`Opaque`; whatever the text, it raises
:class:`WireError` or returns such a value: it never runs code and never raises anything
else (deep nesting, huge numbers, bad tags and hash errors included). Standalone: standard
library only.
"""

import _json
import math
import os

MAX_DEPTH = 100
_BIG = 1 << 62  # ints beyond this go as hex strings: no decimal digit limit, no float loss


class WireError(ValueError):
    """Text that is not an encoded value."""


class Unencodable(TypeError):
    """A value that has no encoding (and ``opaque=False``)."""


class Opaque:
    """A value of the candidate's that could not be sent: only its type's name arrived."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __eq__(self, other):
        return self is other

    def __hash__(self):
        return id(self)

    def __repr__(self):
        return f"<unreadable {self.type_name} object of the candidate>"


def _float(x: float) -> str:
    return float.__repr__(x) if math.isfinite(x) else f'{{"float":"{float.__repr__(x)}"}}'


def _emit(x, opaque: bool, depth: int, out: list) -> None:
    """Append the JSON text of ``x`` to ``out``; base types by their own methods, so a
    subclass's overrides are never what is sent."""
    if depth > MAX_DEPTH:
        if not opaque:
            raise Unencodable(f"nested deeper than {MAX_DEPTH}")
        out.append('{"opaque":"deeply nested value"}')
        return
    d = depth + 1
    if x is None or x is True or x is False:  # (bool cannot be subclassed)
        out.append("null" if x is None else "true" if x else "false")
    elif isinstance(x, int):
        x = int.__int__(x)
        out.append(int.__repr__(x) if -_BIG < x < _BIG else f'{{"int":"{hex(x)}"}}')
    elif isinstance(x, float):
        out.append(_float(float.__float__(x)))
    elif isinstance(x, complex):
        re, im = complex.real.__get__(x), complex.imag.__get__(x)
        out.append(f'{{"complex":[{_float(re)},{_float(im)}]}}')
    elif isinstance(x, str):
        out.append(_json.encode_basestring_ascii(str.__str__(x)))
    elif isinstance(x, bytes):
        out.append(f'{{"bytes":"{bytes.hex(x)}"}}')
    elif isinstance(x, bytearray):
        out.append(f'{{"bytearray":"{bytearray.hex(x)}"}}')
    elif isinstance(x, list):
        _emit_items(list.copy(x), opaque, d, out, "[", "]")
    elif isinstance(x, tuple):
        _emit_items(tuple.__getitem__(x, slice(None)), opaque, d, out, '{"tuple":[', "]}")
    elif isinstance(x, dict):
        out.append('{"dict":[')
        for i, (k, v) in enumerate(list(dict.items(x))):
            out.append("[" if i == 0 else ",[")
            _emit(k, opaque, d, out)
            out.append(",")
            _emit(v, opaque, d, out)
            out.append("]")
        out.append("]}")
    elif isinstance(x, frozenset):
        _emit_items(list(frozenset.__iter__(x)), opaque, d, out, '{"frozenset":[', "]}")
    elif isinstance(x, set):
        _emit_items(list(set.__iter__(x)), opaque, d, out, '{"set":[', "]}")
    elif opaque:
        out.append(f'{{"opaque":{_json.encode_basestring_ascii(type(x).__name__[:200])}}}')
    else:
        raise Unencodable(f"a value of type {type(x).__name__} cannot be sent")


def _emit_items(items, opaque: bool, depth: int, out: list, start: str, end: str) -> None:
    out.append(start)
    for i, item in enumerate(items):
        if i:
            out.append(",")
        _emit(item, opaque, depth, out)
    out.append(end)


def dumps(value, *, opaque: bool = False) -> str:
    """``value`` as JSON text (see the module docstring); Unencodable when it has none."""
    out: list = []
    try:
        _emit(value, opaque, 0, out)
    except Unencodable:
        raise
    except Exception as e:  # a hostile __int__/__iter__, a container mutated meanwhile, ...
        raise Unencodable(f"cannot encode the value: {type(e).__name__}") from None
    return "".join(out)


def _tagged(pairs: list):
    if len(pairs) != 1:
        raise WireError("an object must have exactly one key")
    ((tag, body),) = pairs
    if tag == "tuple" and type(body) is list:
        return tuple(body)
    if tag == "dict" and type(body) is list:
        if not all(type(p) is list and len(p) == 2 for p in body):
            raise WireError("dict entries must be [key, value] pairs")
        return {k: v for k, v in body}
    if tag == "set" and type(body) is list:
        return set(body)
    if tag == "frozenset" and type(body) is list:
        return frozenset(body)
    if tag == "int" and type(body) is str and len(body) <= 1 << 20:
        return int(body, 16)
    if tag == "float" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "complex" and type(body) is list and len(body) == 2 and all(
            type(v) in (int, float) for v in body):
        return complex(*body)
    if tag in ("bytes", "bytearray") and type(body) is str:
        return (bytes if tag == "bytes" else bytearray).fromhex(body)
    if tag == "opaque" and type(body) is str:
        return Opaque(body[:200])
    raise WireError(f"unknown or malformed tag {str(tag)[:50]!r}")


def _refuse_constant(name: str):
    raise WireError(f"{name} is not a JSON value here")


class _Options:
    """What ``_json``'s scanner (the C decoder the ``json`` package wraps) reads its options
    from; used directly, it spares every process the ``json`` package's import."""

    strict = True
    object_hook = None
    object_pairs_hook = staticmethod(_tagged)
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_refuse_constant)
    memo: dict = {}


_scan = _json.make_scanner(_Options())


def loads(text: bytes | str):
    """The value ``text`` (UTF-8 bytes or str) encodes; WireError (and nothing else) when it
    encodes none."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value, end = _scan(text, 0)
        if end != len(text):
            raise WireError("extra data after the value")
        return value
    except WireError:
        raise
    except BaseException as e:  # StopIteration (bad text), RecursionError, MemoryError, bad keys
        raise WireError(f"not an encoded value: {type(e).__name__}: {str(e)[:200]}") from None


# ---------------------------------------------------------------- frames


def write_frame(fd: int, data: bytes) -> None:
    """``data`` with a 4-byte big-endian length in front (OSError when the reader is gone)."""
    view = memoryview(len(data).to_bytes(4, "big") + data)
    while view:
        view = view[os.write(fd, view):]


def read_frame(fd: int, max_bytes: int) -> bytes:
    """One frame; EOFError when the writer is gone before it is complete, WireError when it
    announces more than ``max_bytes``."""
    size = int.from_bytes(_read_exactly(fd, 4), "big")
    if size > max_bytes:
        raise WireError(f"a frame of {size} bytes (at most {max_bytes})")
    return _read_exactly(fd, size)


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other end closed the channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
