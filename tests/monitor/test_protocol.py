"""The sans-I/O protocol core, without an event loop."""

from __future__ import annotations

import json
import sys
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpvm.monitor import protocol
from qmpvm.monitor.protocol import (
    MAX_MEMBERS,
    MAX_TOKENS,
    JsonSplitter,
    ParseFailure,
    Reply,
    Request,
    ServerConnection,
    SessionState,
    decode_value,
    encode,
    event,
)

STREAM_CASES = [
    (b'{"execute": "a"}', [b'{"execute": "a"}']),
    (b'{"a": 1}{"b": 2}\n{"c": 3}', [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}']),
    (b'{"a": "}{"}', [b'{"a": "}{"}']),
    (b'{"a": "\\"}"}', [b'{"a": "\\"}"}']),
    (b"{'a': '}\\''}", [b"{'a': '}\\''}"]),
    (b'[1, [2, {"x": []}]] 42 "s" ', [b'[1, [2, {"x": []}]]', b"42", b'"s"']),
    (b"  \r\n\t ", []),
    (b"} {}", [b"}", b"{}"]),
]


@pytest.mark.parametrize(("data", "expected"), STREAM_CASES)
def test_splitter_finds_message_boundaries(data: bytes, expected: list[bytes]) -> None:
    assert JsonSplitter().feed(data) == expected


def test_splitter_keeps_partial_message_across_reads() -> None:
    splitter = JsonSplitter()
    assert splitter.feed(b'{"execute": "qu') == []
    assert splitter.feed(b'ery-status", "id": "\\') == []
    assert splitter.feed(b'""}{') == [b'{"execute": "query-status", "id": "\\""}']
    assert splitter.feed(b"}") == [b"{}"]


def test_splitter_reports_oversized_message_and_recovers() -> None:
    splitter = JsonSplitter(max_bytes=64)
    out = splitter.feed(b'{"a": "' + b"x" * 100)
    out += splitter.feed(b'"} {"b": 1}')
    assert isinstance(out[0], ParseFailure)
    assert "exceeds 64 bytes" in out[0].desc
    assert out[1] == b'{"b": 1}'


def test_splitter_reports_excessive_nesting() -> None:
    out = JsonSplitter().feed(b"[" * 2000 + b"]" * 2000)
    assert len(out) == 1
    assert isinstance(out[0], ParseFailure)
    assert "nesting" in out[0].desc


def test_decode_accepts_single_quoted_strings_like_qemu() -> None:
    assert decode_value(b"{'execute': 'x', 'arguments': {'s': 'it\\'s \"q\"'}}") == {
        "execute": "x",
        "arguments": {"s": 'it\'s "q"'},
    }


@pytest.mark.parametrize("raw", [b"{", b"{'a'}", b"nul", b"\xff\xfe", b"NaN", b'{"a": Infinity}'])
def test_decode_rejects_invalid_json(raw: bytes) -> None:
    result = decode_value(raw)
    assert isinstance(result, ParseFailure)
    assert result.desc.startswith("JSON parse error")


def test_encode_is_one_crlf_terminated_line() -> None:
    data = encode({"return": {"a": "line\nbreak"}, "id": 1})
    assert data.endswith(b"\r\n")
    assert data.count(b"\n") == 1
    assert json.loads(data) == {"return": {"a": "line\nbreak"}, "id": 1}


def test_event_has_timestamp_split_in_seconds_and_microseconds() -> None:
    message = event("STOP", None, 1700000000.25)
    assert message == {
        "event": "STOP",
        "timestamp": {"seconds": 1700000000, "microseconds": 250000},
    }


def _replies(conn: ServerConnection, data: bytes) -> list[Request | Reply]:
    return list(conn.receive_data(data))


def test_negotiation_sequence() -> None:
    conn = ServerConnection()
    assert conn.state is SessionState.NEGOTIATING
    (early,) = _replies(conn, b'{"execute": "query-status", "id": 7}')
    assert isinstance(early, Reply)
    assert early.message == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
        "id": 7,
    }
    assert not conn.wants_events
    (ok,) = _replies(conn, b'{"execute": "qmp_capabilities", "id": [1, {"x": null}]}')
    assert isinstance(ok, Reply)
    assert ok.message == {"return": {}, "id": [1, {"x": None}]}
    assert conn.state is SessionState.COMMANDS
    assert conn.wants_events
    (request,) = _replies(conn, b'{"execute": "qmp_capabilities"}')
    assert isinstance(request, Request)  # the dispatcher refuses a second one


@pytest.mark.parametrize(
    ("data", "desc", "has_id"),
    [
        (b"[1]", "QMP input must be a JSON object", False),
        (b"{oops}", "JSON parse error", False),
        (b'{"id": 3}', "QMP input lacks member 'execute'", True),
        (b'{"execute": 1, "id": 3}', "QMP input member 'execute' must be a string", True),
        (
            b'{"execute": "x", "arguments": [], "id": 3}',
            "QMP input member 'arguments' must be an object",
            True,
        ),
        (b'{"execute": "x", "bogus": 1, "id": 3}', "QMP input member 'bogus' is unexpected", True),
    ],
)
def test_malformed_input_gets_generic_error(data: bytes, desc: str, has_id: bool) -> None:
    conn = ServerConnection()
    list(conn.receive_data(b'{"execute": "qmp_capabilities"}'))
    (reply,) = _replies(conn, data)
    assert isinstance(reply, Reply)
    error = reply.message["error"]
    assert isinstance(error, dict)
    assert error["class"] == "GenericError"
    assert str(error["desc"]).startswith(desc)
    assert ("id" in reply.message) is has_id


messages = st.lists(
    st.fixed_dictionaries(
        {
            "execute": st.text(min_size=1, max_size=12),
            "arguments": st.dictionaries(
                st.text(max_size=5),
                st.recursive(
                    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: (
                        st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
                    ),
                    max_leaves=6,
                ),
                max_size=4,
            ),
            "id": st.integers() | st.text(max_size=6),
        }
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(messages=messages, data=st.data())
def test_random_splits_give_the_same_messages(
    messages: list[dict[str, object]], data: st.DataObject
) -> None:
    stream = b"".join(
        json.dumps(m).encode() + (b"\n" if i % 2 else b"") for i, m in enumerate(messages)
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    splitter = JsonSplitter()
    out: list[bytes | ParseFailure] = []
    for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += splitter.feed(stream[start:stop])
    assert [decode_value(raw) for raw in out if isinstance(raw, bytes)] == messages


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=8))
def test_random_bytes_never_raise(chunks: list[bytes]) -> None:
    conn = ServerConnection()
    for chunk in chunks:
        for item in conn.receive_data(chunk):
            assert isinstance(item, Request | Reply)


def test_invalid_byte_abandons_the_value_in_progress() -> None:
    splitter = JsonSplitter()
    out = splitter.feed(b'{"a": "unterminated \x00 {"b": 1}')
    assert isinstance(out[0], ParseFailure)
    assert "0x00" in out[0].desc
    assert out[1:] == [b'{"b": 1}']
    out = splitter.feed(b'["open \xff{"c": 2}')
    assert isinstance(out[0], ParseFailure)
    assert out[1:] == [b'{"c": 2}']


pieces = st.one_of(
    messages.map(lambda ms: b"".join(json.dumps(m).encode() for m in ms)),
    st.sampled_from(
        [
            b" \r\n",
            b"{'execute': 'single', 'id': 'q'}",
            b'{"execute": "caf\xc3\xa9"}',
            b'{"a": NaN}',
            b'{"a": 1',
            b"[1, 2]",
            b"42 ",
            b"}",
            b"\xff",
            b"\x00",
            b'{"s": "tab\tinside"}',
            b'{"deep": ' + b"[" * 1100 + b"]" * 1100 + b"}",
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    stream=st.lists(pieces, max_size=8).map(b"".join),
    max_bytes=st.sampled_from([16, 200, 1 << 20]),
    data=st.data(),
)
def test_whole_objects_fast_path_matches_the_splitter(
    stream: bytes, max_bytes: int, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    def run() -> list[Request | Reply]:
        conn = ServerConnection(max_bytes)
        list(conn.receive_data(b'{"execute": "qmp_capabilities"}'))
        return [item for chunk in chunks for item in conn.receive_data(chunk)]

    fast = run()
    with mock.patch.object(protocol, "leading_objects", lambda _data, _max: ([], 0)):
        assert run() == fast


def test_nesting_limit_holds_whatever_the_recursion_limit() -> None:
    conn = ServerConnection()
    list(conn.receive_data(b'{"execute": "qmp_capabilities"}'))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # the C decoder alone would then accept 1,100 levels
    try:
        (reply,) = _replies(conn, b'{"a": ' + b"[" * 1100 + b"]" * 1100 + b"}")
    finally:
        sys.setrecursionlimit(limit)
    assert isinstance(reply, Reply)
    assert reply.message["error"] == {
        "class": "GenericError",
        "desc": "JSON parse error, nesting deeper than 1024",
    }


def test_a_message_of_too_many_tokens_is_refused_unread() -> None:
    """Many tiny values cost far more to decode than their bytes suggest."""
    splitter = JsonSplitter()
    many = b"[" + b"[]," * (MAX_TOKENS // 2 + 1) + b"[]]"  # more brackets than tokens allowed
    pieces = [many[i : i + 4096] for i in range(0, len(many), 4096)]
    out = [item for piece in pieces for item in splitter.feed(piece)]
    assert out == [ParseFailure(desc=f"JSON parse error, more than {MAX_TOKENS} tokens")]
    assert splitter.idle
    fewer = b"[" + b"1," * (MAX_TOKENS // 2 - 1000) + b"1]"  # a value and a comma each: under
    (value,) = splitter.feed(fewer)
    assert value == fewer


@pytest.mark.parametrize(
    ("text", "desc"),
    [
        (b'{"execute": "quit", "execute": "query-name"}', "JSON parse error, duplicate key"),
        (b'{"execute": "x", "arguments": {"a": 1, "b": {"c": 1, "c": 2}}}',
         "JSON parse error, duplicate key"),
        (b"{'execute': 'quit', 'execute': 'query-name'}", "JSON parse error, duplicate key"),
        (b'{"execute": "x", "arguments": {' + b", ".join(b'"k%d": 1' % i for i in range(5000))
         + b"}}", f"JSON parse error, more than {MAX_MEMBERS} members in an object"),
    ],
)  # fmt: skip
def test_objects_with_a_repeated_key_or_too_many_members_are_refused(
    text: bytes, desc: str
) -> None:
    """As QEMU 7.2: the last value silently winning would run another command."""
    conn = ServerConnection()
    (reply,) = _replies(conn, text)
    assert isinstance(reply, Reply)
    assert reply.message["error"] == {"class": "GenericError", "desc": desc}
