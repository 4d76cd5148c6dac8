"""The QMP wire protocol without I/O: bytes in, messages out, and back.

Theory of operation (QMP specification, docs/interop/qmp-spec.rst):

* Input is a stream of JSON values with no framing.  ``JsonSplitter`` finds
  where each top-level value ends by tracking bracket depth and string state,
  so a message may arrive in pieces, several may arrive in one read, and none
  needs a newline.  Strings may be single-quoted, as QEMU's parser allows.
  Whole standard-JSON objects at the start of a read (the usual case) go
  straight to the C decoder instead; anything else takes the splitter.
* ``ServerConnection`` is the one stateful object of a session: it starts in
  ``NEGOTIATING``, where only ``qmp_capabilities`` is accepted, and moves to
  ``COMMANDS``.  It answers framing and negotiation errors itself and hands
  every well-formed command to the caller as a ``Request``.
* Output is one JSON object a line, CRLF-terminated, as QEMU writes it.

Nothing here touches sockets, the event loop or the clock (time is passed in).
"""

from __future__ import annotations

import enum
import json
import math
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from qmpvm.errors import ErrorClass

MAX_MESSAGE_BYTES = 1024 * 1024
"""Far above any real command, and low enough that decoding the largest
message keeps the event loop (every other client) waiting a few ms at most."""
MAX_NESTING = 1024
MAX_TOKENS = 32 * 1024
"""QEMU counts tokens too (json-streamer.c): a message of many tiny values
costs far more to decode than its bytes suggest; it is refused unread."""
MAX_MEMBERS = 4096
"""Members of one JSON object; no QMP command's arguments come near it."""

# Bytes that are invalid anywhere in JSON; like QEMU's lexer, one of them
# abandons the value in progress, so a client can resynchronize (0xFF, per
# the QMP specification).
_INVALID = rb"\x00-\x08\x0b\x0c\x0e-\x1f\xff"
_OUTSIDE = re.compile(rb"[{}\[\]\"'" + _INVALID + rb"]")
_IN_STRING = {
    ord('"'): re.compile(rb'["\\' + _INVALID + rb"]"),
    ord("'"): re.compile(rb"['\\" + _INVALID + rb"]"),
}
_NON_SPACE = re.compile(rb"[^ \t\r\n]")
_BARE_END = re.compile(rb"[ \t\r\n{}\[\]\"'" + _INVALID + rb"]")
_INVALID_BYTES = frozenset(range(0x00, 0x09)) | {0x0B, 0x0C} | frozenset(range(0x0E, 0x20)) | {0xFF}
_OPENERS = frozenset(b"{[")
_CLOSERS = frozenset(b"}]")
_QUOTES = frozenset(b"\"'")
_BACKSLASH = ord("\\")


@dataclass(frozen=True, slots=True, kw_only=True)
class ParseFailure:
    """Input that could not become a JSON value; answered without an id."""

    desc: str


class JsonSplitter:
    """Cuts a byte stream into top-level JSON values (still as bytes).

    Only structure is tracked here; whether each value is valid JSON is
    ``decode_value``'s business.  A value over ``max_bytes`` is dropped as
    it streams by (memory stays bounded) and reported once it ends.
    """

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES, max_tokens: int = MAX_TOKENS) -> None:
        self._max_bytes = max_bytes
        self._max_tokens = max_tokens
        self._parts: list[bytes] = []
        self._size = 0
        self._depth = 0
        self._quote = 0  # the open quote character, or 0 outside strings
        self._escaped = False  # the previous byte was a backslash in a string
        self._bare = False  # inside an unquoted top-level token (e.g. 42)
        self._in_value = False
        self._too_deep = False
        self._tokens = 0  # counted where it is cheap: structure, and , : between it

    @property
    def idle(self) -> bool:
        """No value is in progress: the next byte starts a new one."""
        return not self._in_value

    @property
    def pending(self) -> int:
        """Bytes held of the value in progress."""
        return sum(len(part) for part in self._parts) if self._in_value else 0

    def feed(self, data: bytes) -> list[bytes | ParseFailure]:
        out: list[bytes | ParseFailure] = []
        pos, end, start = 0, len(data), 0
        while pos < end:
            if not self._in_value:
                found = _NON_SPACE.search(data, pos)
                if found is None:
                    return out
                pos = start = found.start()
                self._in_value = True
                byte = data[pos]
                if byte in _INVALID_BYTES:
                    pos += 1
                    self._abandon(byte, out)
                elif byte in _OPENERS:
                    self._depth, pos = 1, pos + 1
                elif byte in _QUOTES:
                    self._quote, pos = byte, pos + 1
                elif byte in _CLOSERS:
                    pos += 1
                    self._finish(data, start, pos, out)
                else:
                    self._bare = True
                continue
            if self._escaped:
                self._escaped, pos = False, pos + 1
                continue
            if self._bare:
                found = _BARE_END.search(data, pos)
                if found is None:
                    pos = end
                    break
                pos = found.start()
                if data[pos] in _INVALID_BYTES:
                    pos += 1
                    self._abandon(data[pos - 1], out)
                else:
                    self._finish(data, start, pos, out)
                continue
            if self._quote:
                found = _IN_STRING[self._quote].search(data, pos)
                if found is None:
                    pos = end
                    break
                pos = found.end()
                if data[found.start()] in _INVALID_BYTES:
                    self._abandon(data[found.start()], out)
                elif data[found.start()] == _BACKSLASH:
                    self._escaped = True
                else:
                    self._quote = 0
                    if self._depth == 0:
                        self._finish(data, start, pos, out)
                continue
            found = _OUTSIDE.search(data, pos)
            if found is None:
                self._count(data, pos, end)
                pos = end
                break
            self._count(data, pos, found.start())
            pos = found.end()
            byte = data[found.start()]
            if byte in _INVALID_BYTES:
                self._abandon(byte, out)
            elif byte in _QUOTES:
                self._quote = byte
            elif byte in _OPENERS:
                self._depth += 1
                if self._depth > MAX_NESTING:
                    self._too_deep = True
            else:
                self._depth -= 1
                if self._depth == 0:
                    self._finish(data, start, pos, out)
        if self._in_value:
            self._keep(data[start:end])
        return out

    def _count(self, data: bytes, start: int, stop: int) -> None:
        """Tokens: this structural byte, and each , or : before it with its value."""
        self._tokens += 1 + 2 * (data.count(b",", start, stop) + data.count(b":", start, stop))

    def _abandon(self, byte: int, out: list[bytes | ParseFailure]) -> None:
        out.append(ParseFailure(desc=f"JSON parse error, invalid byte 0x{byte:02x}"))
        self._reset()

    def _keep(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._size <= self._max_bytes and self._tokens <= self._max_tokens:
            self._parts.append(piece)
        else:
            self._parts.clear()

    def _finish(self, data: bytes, start: int, stop: int, out: list[bytes | ParseFailure]) -> None:
        self._keep(data[start:stop])
        if self._size > self._max_bytes:
            out.append(
                ParseFailure(desc=f"JSON parse error, message exceeds {self._max_bytes} bytes")
            )
        elif self._too_deep:
            out.append(ParseFailure(desc=f"JSON parse error, nesting deeper than {MAX_NESTING}"))
        elif self._tokens > self._max_tokens:
            out.append(ParseFailure(desc=f"JSON parse error, more than {self._max_tokens} tokens"))
        else:
            out.append(b"".join(self._parts))
        self._reset()

    def _reset(self) -> None:
        self._parts = []
        self._size = self._depth = self._quote = self._tokens = 0
        self._bare = self._in_value = self._escaped = self._too_deep = False


_STRING_TOKEN = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'""", re.DOTALL)


def _requote(match: re.Match[str]) -> str:
    token = match.group(0)
    if token[0] == '"':
        return token
    body = re.sub(
        r"""\\(.)|(")""", lambda m: '\\"' if m.group(2) else _unescape_single(m), token[1:-1]
    )
    return f'"{body}"'


def _unescape_single(match: re.Match[str]) -> str:
    char = match.group(1)
    return "'" if char == "'" else "\\" + char


def _reject_constant(name: str) -> object:
    raise ValueError(f"invalid literal {name}")


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object, refused as QEMU refuses it if a key repeats (the last
    value silently winning would run a command the client did not see)."""
    if len(pairs) > MAX_MEMBERS:
        raise ValueError(f"more than {MAX_MEMBERS} members in an object")
    value = dict(pairs)
    if len(value) != len(pairs):
        raise ValueError("duplicate key")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: object) -> str | None:
    """A UTF-16 half in any string of ``value`` (a pair decodes to one character,
    so any left is alone): JSON grammar allows it, but it is no Unicode text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = _LONE_SURROGATE.search(item)
            if found:
                return found.group()
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_object)
_TEXT_NON_SPACE = re.compile(r"[^ \t\r\n]")


def _skip_space(text: str, pos: int) -> int:
    found = _TEXT_NON_SPACE.search(text, pos)
    return len(text) if found is None else found.start()


def leading_objects(data: bytes, max_bytes: int) -> tuple[list[object], int]:
    """The whole JSON objects ``data`` starts with, and the offset after them.

    Only ASCII standard JSON within the splitter's limits is taken here: an
    object the C decoder accepts is exactly the value the splitter would cut
    and ``decode_value`` would give, so the splitter sees only the rest (a
    partial value, single quotes, non-ASCII, garbage, anything too big).
    """
    if not data.isascii():
        return [], 0
    text = data.decode("ascii")
    if _SURROGATE_ESCAPE.search(text):
        return [], 0  # for decode_value to check
    values: list[object] = []
    pos = _skip_space(text, 0)
    while text.startswith("{", pos):
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError):
            break
        openers = text.count("{", pos, end) + text.count("[", pos, end)  # >= the depth
        if end - pos > max_bytes or openers > MAX_NESTING:
            break  # for the splitter to report
        values.append(value)
        pos = _skip_space(text, end)
    return values, pos


def decode_value(raw: bytes) -> object:
    """One JSON value from the splitter, or ``ParseFailure``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ParseFailure(desc="JSON parse error, invalid UTF-8 sequence")
    if "'" in text:
        text = _STRING_TOKEN.sub(_requote, text)
    try:
        value = _DECODER.decode(text)
    except (ValueError, RecursionError) as err:
        return ParseFailure(desc=f"JSON parse error, {err}")
    if _SURROGATE_ESCAPE.search(text):
        lone = _lone_surrogate(value)
        if lone is not None:
            return ParseFailure(
                desc=f"JSON parse error, \\u{ord(lone):04x} is not a valid Unicode character"
            )
    return value


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple | frozenset | set):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_ENCODER = json.JSONEncoder(separators=(", ", ": "), default=_plain, allow_nan=False)


def _finite(value: object) -> object:
    """``value`` with inf and nan (``1e999`` in a request's id) made JSON: the
    largest double of that sign, and null; JSON has no infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else math.copysign(sys.float_info.max, value)
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _encode(value: object) -> str:
    try:
        return _ENCODER.encode(value)
    except ValueError:  # a non-finite number: rare, so checked only when it happens
        return _ENCODER.encode(_finite(value))


class Encoded:
    """A return value already encoded as JSON text: for large answers that do not
    change (the schema), so each reply copies text instead of encoding again."""

    __slots__ = ("text",)

    def __init__(self, value: object) -> None:
        self.text = _encode(value)


def encode(message: Mapping[str, object]) -> bytes:
    """One line of output, as QEMU writes it."""
    value = message.get("return")
    if isinstance(value, Encoded):
        rest = _encode({k: v for k, v in message.items() if k != "return"})
        return f'{{"return": {value.text}{", " if len(rest) > 2 else ""}{rest[1:]}'.encode() + (
            b"\r\n"
        )
    return _encode(message).encode() + b"\r\n"


def event(name: str, data: Mapping[str, object] | None, now: float) -> dict[str, object]:
    seconds = int(now)
    message: dict[str, object] = {"event": name}
    if data is not None:
        message["data"] = data
    message["timestamp"] = {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}
    return message


def error(
    error_class: str, desc: str, msg_id: object = None, *, has_id: bool = False
) -> dict[str, object]:
    reply: dict[str, object] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        reply["id"] = msg_id
    return reply


def success(value: object, msg_id: object = None, *, has_id: bool = False) -> dict[str, object]:
    reply: dict[str, object] = {"return": value}
    if has_id:
        reply["id"] = msg_id
    return reply


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """A well-formed command for the dispatcher."""

    name: str
    arguments: Mapping[str, object]
    msg_id: object = None
    has_id: bool = False

    def reply(self, value: object) -> dict[str, object]:
        return success(value, self.msg_id, has_id=self.has_id)

    def fail(self, error_class: str, desc: str) -> dict[str, object]:
        return error(error_class, desc, self.msg_id, has_id=self.has_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """An answer the protocol layer produced by itself."""

    message: dict[str, object]


_ALLOWED_MEMBERS = frozenset({"execute", "arguments", "id"})


def parse_request(value: object) -> Request | Reply:
    """Check a decoded value's shape as QEMU's dispatcher does (qmp-dispatch.c)."""
    if not isinstance(value, dict):
        return Reply(message=error(ErrorClass.GENERIC, "QMP input must be a JSON object"))
    has_id = "id" in value
    msg_id = value.get("id")
    name = value.get("execute")
    arguments = value.get("arguments", {})
    if isinstance(name, str) and isinstance(arguments, dict) and value.keys() <= _ALLOWED_MEMBERS:
        return Request(name=name, arguments=arguments, msg_id=msg_id, has_id=has_id)
    return Reply(message=error(ErrorClass.GENERIC, _refusal(value), msg_id, has_id=has_id))


def _refusal(value: dict[str, object]) -> str:
    """Why ``value`` is not a command, in the order QEMU checks."""
    for key in value:
        if key == "exec-oob":
            return "QMP input member 'exec-oob' is unexpected: out-of-band is not enabled"
        if key not in _ALLOWED_MEMBERS:
            return f"QMP input member '{key}' is unexpected"
    name = value.get("execute")
    if name is None:
        return "QMP input lacks member 'execute'"
    if not isinstance(name, str):
        return "QMP input member 'execute' must be a string"
    return "QMP input member 'arguments' must be an object"


class SessionState(enum.Enum):
    NEGOTIATING = "negotiating"
    COMMANDS = "commands"


class ServerConnection:
    """One client's protocol state: framing, negotiation, then requests."""

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._splitter = JsonSplitter(max_bytes)
        self._max_bytes = max_bytes
        self.state = SessionState.NEGOTIATING

    @property
    def wants_events(self) -> bool:
        return self.state is SessionState.COMMANDS

    @property
    def pending(self) -> int:
        """Bytes held of a message not yet complete."""
        return self._splitter.pending

    def receive_data(self, data: bytes) -> Iterator[Request | Reply]:
        """Everything ``data`` completes, in order."""
        for value in self._values(data):
            if isinstance(value, ParseFailure):
                yield Reply(message=error(ErrorClass.GENERIC, value.desc))
                continue
            request = parse_request(value)
            if isinstance(request, Reply) or self.state is SessionState.COMMANDS:
                yield request
            else:
                yield self._negotiate(request)

    def _values(self, data: bytes) -> list[object]:
        values: list[object] = []
        if self._splitter.idle:
            values, start = leading_objects(data, self._max_bytes)
            data = data[start:]
        for raw in self._splitter.feed(data) if data else ():
            values.append(raw if isinstance(raw, ParseFailure) else decode_value(raw))
        return values

    def _negotiate(self, request: Request) -> Reply:
        if request.name != "qmp_capabilities":
            return Reply(
                message=request.fail(
                    ErrorClass.COMMAND_NOT_FOUND,
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                )
            )
        for key, value in request.arguments.items():
            if key != "enable":
                return Reply(
                    message=request.fail(ErrorClass.GENERIC, f"Parameter '{key}' is unexpected")
                )
            if not isinstance(value, list):
                return Reply(
                    message=request.fail(
                        ErrorClass.GENERIC, "Invalid parameter type for 'enable', expected: array"
                    )
                )
            for capability in value:
                if capability == "oob":
                    return Reply(
                        message=request.fail(ErrorClass.GENERIC, "Capability 'oob' not available")
                    )
                return Reply(
                    message=request.fail(
                        ErrorClass.GENERIC,
                        f"Parameter 'enable' does not accept value '{capability}'",
                    )
                )
        self.state = SessionState.COMMANDS
        return Reply(message=request.reply({}))
