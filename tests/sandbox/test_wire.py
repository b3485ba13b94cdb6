"""The data-only wire between the judge and the candidate: exact round trips of plain values,
base-type data for subclasses, and a decoder that never raises anything but WireError."""

import collections
import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wmtp_fn.sandbox import wire

hashable = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    | st.binary(max_size=8),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=8,
)
values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 200), max_value=1 << 200)
    | st.floats() | st.complex_numbers() | st.text() | st.binary(max_size=16)
    | st.binary(max_size=8).map(bytearray) | hashable,
    lambda inner: (st.lists(inner, max_size=4) | st.lists(inner, max_size=3).map(tuple)
                   | st.dictionaries(hashable, inner, max_size=3) | st.sets(hashable, max_size=3)),
    max_leaves=20,
)


def canon(x):
    """A fully ordered picture of ``x`` with every type in it (NaN equal to NaN, -0.0 not 0.0,
    ``True`` not ``1``, sets in a fixed order)."""
    name = type(x).__name__
    if isinstance(x, float):
        return name, "nan" if math.isnan(x) else repr(x)
    if isinstance(x, complex):
        return name, canon(x.real), canon(x.imag)
    if isinstance(x, (list, tuple)):
        return name, tuple(canon(v) for v in x)
    if isinstance(x, dict):
        return name, tuple((canon(k), canon(v)) for k, v in x.items())
    if isinstance(x, (set, frozenset)):
        return name, tuple(sorted(canon(v) for v in x))
    return name, repr(x)


def same(a, b) -> bool:
    return canon(a) == canon(b)


@settings(max_examples=300, deadline=None)
@given(values)
def test_round_trip_is_exact(value):
    text = wire.dumps(value)
    assert text.isascii()
    assert same(wire.loads(text.encode()), value)


def test_encoding_golden():
    assert wire.dumps([1, 2.5, "é", None, True]) == '[1,2.5,"\\u00e9",null,true]'
    assert wire.dumps((1, {2: b"\x01"})) == '{"tuple":[1,{"dict":[[2,{"bytes":"01"}]]}]}'
    assert wire.dumps([float("-inf"), 1 << 70]) == '[{"float":"-inf"},{"int":"0x400000000000000000"}]'


def test_subclasses_arrive_as_their_base_types():
    class Liar(str):
        def __eq__(self, other):
            return True

        __hash__ = str.__hash__

    class Counts(int):
        def __int__(self):
            return 999

    point = collections.namedtuple("Point", "x y")(1, 2)
    sent = [Liar("no"), Counts(3), point, collections.defaultdict(int, a=1), collections.OrderedDict(b=2)]
    got = wire.loads(wire.dumps(sent))
    assert same(got, ["no", 3, (1, 2), {"a": 1}, {"b": 2}])
    assert got[0] != "yes"  # the lie did not cross


def test_opaque_values():
    generator = (i for i in range(3))
    with pytest.raises(wire.Unencodable, match="generator"):
        wire.dumps([generator])
    (got,) = wire.loads(wire.dumps([generator], opaque=True))
    assert isinstance(got, wire.Opaque) and got.type_name == "generator"
    assert got != [0, 1, 2] and got != got.type_name and got == got
    nested: list = []
    for _ in range(wire.MAX_DEPTH + 5):
        nested = [nested]
    with pytest.raises(wire.Unencodable, match="nested deeper"):
        wire.dumps(nested)
    assert "deeply nested value" in wire.dumps(nested, opaque=True)


@pytest.mark.parametrize("text", [
    b"[" * 100_000, b"[1,", b"", b"{}", b'{"tuple": [1], "set": [2]}', b'{"nope": 1}',
    b'{"dict": [[[1], 2]]}', b'{"set": [[1]]}', b'{"dict": [[1]]}', b'{"int": "zz"}',
    b"1" * 5000, b"NaN", b"[1] [2]", b"\xff\xfe", b'{"float": "1.5"}', b'{"complex": ["a", 1]}',
    b'{"bytes": "xyz"}', b'"\\ud800', b" 1", b'{"opaque": 3}',
])
def test_malformed_text_raises_only_wire_error(text):
    with pytest.raises(wire.WireError):
        wire.loads(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_arbitrary_bytes_decode_to_a_value_or_wire_error(data):
    try:
        value = wire.loads(data)
    except wire.WireError:
        return
    assert same(wire.loads(wire.dumps(value, opaque=True)), value)  # a plain value, re-encodable


def test_frames():
    r, w = os.pipe()
    try:
        wire.write_frame(w, b"hello")
        wire.write_frame(w, b"")
        assert wire.read_frame(r, 10) == b"hello" and wire.read_frame(r, 10) == b""
        wire.write_frame(w, b"x" * 11)
        with pytest.raises(wire.WireError, match="a frame of 11 bytes"):
            wire.read_frame(r, 10)
        os.write(w, b"\0\0\0\x05ab")  # announced 5, then the writer goes away
        os.read(r, 11)  # (drop the refused frame's body)
        os.close(w)
        w = None
        with pytest.raises(EOFError):
            wire.read_frame(r, 10)
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
