"""What the stress suite and ``benchmarks/stress.py`` share: hostile input, made
from a seed, and the checks every reply must pass.

Hostile input comes in *units*: each is a run of bytes that ends with the
stream resynchronized (two 0xFF bytes, as the QMP specification lets a client
do), so whatever a unit contains, it cannot join the next one into a command
that succeeds.  Every unit is built to be refused (garbage, bad framing,
wrong argument types taken from the server's own ``query-qmp-schema``,
references to nothing, duplicates of what exists) or to be a harmless query:
a hostile client never changes the configuration, which is what lets a
well-behaved client check that ``config-export`` never moves.

Nothing here imports qmpvm: the benchmark drives QEMU with the same units.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SEED = int(os.environ.get("QMPVM_STRESS_SEED", "7207"))
"""The suite's seed; ``QMPVM_STRESS_SEED=N`` reproduces another run."""

RESYNC = b"\xff\xff"
"""Ends every unit: 0xFF abandons any value in progress (the second one covers
a unit that ended on a backslash inside a string, which escapes the first)."""

LINE_LIMIT = 64 << 20
"""Our side's longest reply line (a 4 MiB id comes back in its reply)."""

NEGOTIATE = b'{"execute": "qmp_capabilities"}'

BASELINE: list[tuple[str, dict[str, object]]] = [
    ("machine-set", {"name": "stress-base", "cpus": 2}),
    ("chardev-add", {"id": "base-chr", "backend": {"type": "null", "data": {}}}),
    ("blockdev-add", {"driver": "null-co", "node-name": "base-node"}),
    ("blockdev-add", {"driver": "raw", "node-name": "base-raw", "file": "base-node"}),
    ("object-add", {"qom-type": "secret", "id": "base-obj", "data": "s3cret"}),
]
"""What the hostile units refer to (as duplicates, or as things in use)."""

ENGINE_BASELINE = BASELINE[1:]
"""The same, for QEMU (``machine-set`` is qmpvm's own)."""


# -- reading replies -------------------------------------------------------------


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _has_lone_surrogate(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def check_line(line: bytes) -> tuple[dict[str, object] | None, str | None]:
    """One line from a server, and what is wrong with it (None if nothing).

    Valid means: ends CRLF, UTF-8, JSON without Infinity/NaN (``1e999`` too:
    it decodes to inf), no unpaired surrogate escape (no UTF-8 text can carry
    one), one object that is a greeting, a reply or an event, and no
    "internal error" in an error's description.
    """
    if not line.endswith(b"\r\n"):
        return None, f"not CRLF-terminated: {line[-40:]!r}"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 ({err.reason}): {line[:120]!r}"
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        return None, f"not JSON ({err}): {line[:120]!r}"
    if not isinstance(value, dict) or not ({"QMP", "return", "error", "event"} & value.keys()):
        return None, f"not a QMP message: {line[:120]!r}"
    if _has_inf(value):
        return value, f"a number out of range (JSON has no infinity): {line[:120]!r}"
    if _has_lone_surrogate(value):
        return value, f"an unpaired surrogate escape (not Unicode text): {line[:120]!r}"
    error = value.get("error")
    if error is not None:
        if not isinstance(error, dict) or not isinstance(error.get("desc"), str):
            return value, f"malformed error: {line[:160]!r}"
        if "internal error" in error["desc"]:
            return value, f"internal error: {line[:160]!r}"
    return value, None


def _has_inf(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and item in (float("inf"), float("-inf")):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


@dataclass
class Findings:
    """Violations, grouped by kind, with the first few examples of each."""

    seed: int
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < 3:
            shown.append(example[:300])

    def line(self, where: str, line: bytes) -> dict[str, object] | None:
        value, problem = check_line(line)
        if problem is not None:
            self.add(problem.split(":", 1)[0].split(" (", 1)[0], f"{where}: {problem}")
        return value

    def __bool__(self) -> bool:
        return bool(self.counts)

    def report(self) -> str:
        out = [f"seed {self.seed} (QMPVM_STRESS_SEED={self.seed} reproduces):"]
        for kind, count in sorted(self.counts.items()):
            out.append(f"  {count} x {kind}")
            out.extend(f"      {example}" for example in self.examples[kind])
        return "\n".join(out)


# -- /proc -------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and the other Vm* lines of /proc/PID/status, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Vm"):
            name, value = line.split(":", 1)
            out[name] = int(value.split()[0])
    return out


def fd_targets(pid: int) -> list[str]:
    """What each open descriptor of ``pid`` points at."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:
            continue  # closed while we looked
    return sorted(out)


def server_side_connections(pid: int) -> int:
    """Connections ``pid`` accepted on a UNIX listener and has not closed yet:
    its descriptors that are sockets with a name (an accepted socket carries
    its listener's) and are not listening themselves (__SO_ACCEPTCON)."""
    inodes = {int(target[8:-1]) for target in fd_targets(pid) if target.startswith("socket:[")}
    count = 0
    with open("/proc/net/unix") as table:
        next(table)
        for row in table:
            fields = row.split()
            if len(fields) >= 8 and int(fields[6]) in inodes and not int(fields[3], 16) & 0x10000:
                count += 1
    return count


# -- wrong argument types, from the server's own schema ----------------------------


def wrong_type_cases(schema: Sequence[Mapping[str, object]]) -> list[tuple[str, dict[str, object]]]:
    """(command, arguments) pairs the schema says are refused: one member of
    the command's arguments given a value of a type it does not accept, or,
    for a command without arguments, an argument it does not have."""
    by_name = {str(entry["name"]): entry for entry in schema}
    cases: list[tuple[str, dict[str, object]]] = []
    for entry in schema:
        if entry.get("meta-type") != "command":
            continue
        name = str(entry["name"])
        arg_type = by_name.get(str(entry.get("arg-type", "")))
        members = arg_type.get("members") if arg_type else None
        if not isinstance(members, list) or not members:
            cases.append((name, {"stress-no-such-member": 17}))
            continue
        for member in members:
            wrong = _wrong_value(by_name.get(str(member.get("type"))))
            if wrong is not _SKIP:
                cases.append((name, {str(member["name"]): wrong}))
    return cases


_SKIP = object()


def _wrong_value(member_type: Mapping[str, object] | None) -> object:
    if member_type is None:
        return _SKIP
    meta = member_type.get("meta-type")
    if meta == "builtin":
        return {
            "string": 17,
            "int": "seventeen",
            "number": "seventeen",
            "boolean": "yes",
            "null": 0,
        }.get(str(member_type.get("json-type")), _SKIP)
    if meta == "enum":
        return 17
    if meta == "array":
        return {"not": "an array"}
    if meta == "object":
        return "not an object"
    return _SKIP  # alternates and 'any' accept several types


# -- hostile units -----------------------------------------------------------------


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


class Hostile:
    """A seeded source of hostile units; the same seed gives the same bytes.

    ``big`` scales the large units (strings, nesting): 1 in the test suite,
    more in the benchmark.
    """

    KINDS = (
        "garbage", "truncated", "nested", "numbers", "huge-string", "utf8", "surrogates",
        "duplicate-keys", "wrong-type", "refused", "shape", "query",
    )  # fmt: skip

    def __init__(
        self,
        rng: random.Random,
        cases: Sequence[tuple[str, dict[str, object]]],
        *,
        big: int = 1,
        tag: str = "h",
    ) -> None:
        self.rng = rng
        self.cases = cases
        self.big = big
        self.tag = tag
        self._n = 0

    def units(self, count: int) -> list[bytes]:
        return [self.unit() for _ in range(count)]

    def unit(self) -> bytes:
        kind = self.rng.choice(self.KINDS)
        make: Callable[[], bytes] = getattr(self, "_" + kind.replace("-", "_"))
        return make() + RESYNC

    # ids: any JSON value, echoed back verbatim (or as near as JSON allows)

    def _id(self) -> str:
        self._n += 1
        rng = self.rng
        choice = rng.randrange(14)
        if choice == 0:
            return rng.choice(["1e999", "-1e999", "1E400", "-0", "1e-999", "0.1e+310"])
        if choice == 1:
            return str(rng.randrange(10**29, 10**30))
        if choice == 2:
            return _dumps({"n": self._n, "nested": [[[{"x": None}]]], "t": True})
        if choice == 3:
            return _dumps(f"{self.tag}-☃-日本-\u0000-\x1f-{self._n}")
        if choice == 4:
            return rng.choice(["null", "true", "false", "[]", "{}", '""'])
        return _dumps(f"{self.tag}-{self._n}")

    def _command(self, name: str, arguments: Mapping[str, object] | None = None) -> bytes:
        parts = [f'"execute": {_dumps(name)}']
        if arguments is not None:
            parts.append(f'"arguments": {_dumps(arguments)}')
        if self.rng.random() < 0.8:
            parts.append(f'"id": {self._id()}')
        self.rng.shuffle(parts)
        return ("{" + ", ".join(parts) + "}").encode()

    # the kinds

    def _garbage(self) -> bytes:
        rng = self.rng
        size = rng.choice([1, 7, 64, 512, 4096])
        alphabet = rng.choice([None, b"{}[]\"':,\\ 0123456789eE+-.tfnul\x00\x1f\xfe"])
        if alphabet is None:
            return rng.randbytes(size)
        return bytes(rng.choice(alphabet) for _ in range(size))

    def _truncated(self) -> bytes:
        whole = self._refused() if self.rng.random() < 0.5 else self._wrong_type()
        return whole[: self.rng.randrange(1, len(whole))]

    def _nested(self) -> bytes:
        rng = self.rng
        depth = rng.choice([64, 900, 1023, 1025, 4096, 20_000 * self.big])
        opener, closer = rng.choice([("[", "]"), ('{"a": ', "}")])
        inner = "1" if opener == "[" else "null"
        value = opener * depth + inner + closer * depth
        if rng.random() < 0.2:
            value = opener * depth  # never closed: the resync ends it
        where = rng.randrange(3)
        if where == 0:
            return value.encode()
        if where == 1:
            return f'{{"execute": "query-name", "id": {value}}}'.encode()
        return f'{{"execute": "chardev-remove", "arguments": {{"id": {value}}}}}'.encode()

    def _numbers(self) -> bytes:
        rng = self.rng
        number = rng.choice([
            "1e999", "-1e999", "1e-999", "-0", "1E400", "123456789012345678901234567890",
            "-123456789012345678901234567890", "9" * 4000, "9" * 5000, "1.5", "1e9", "0x10",
            "01", ".5", "1.", "+1", "NaN", "Infinity", "-Infinity",
        ])  # fmt: skip
        member = rng.choice(["memory", "cpus", "name"])
        if member == "name" and rng.random() < 0.5:
            return f'{{"execute": "query-name", "id": {number}}}'.encode()
        # a number for a string; for an integer, a float, one out of range or
        # under the minimum (-0 is 0), or text that is not a JSON number
        return f'{{"execute": "machine-set", "arguments": {{"{member}": {number}}}}}'.encode()

    def _huge_string(self) -> bytes:
        rng = self.rng
        size = rng.choice([64 << 10, 256 << 10, 1 << 20]) * (self.big if rng.random() < 0.3 else 1)
        text = rng.choice(["x", "☃", "\\u00e9", "\\\\", '\\"']) * (size // 6 + 1)
        where = rng.randrange(3)
        if where == 0:
            return f'{{"execute": "query-name", "id": "{text}"}}'.encode()
        if where == 1:  # a string where a bool is wanted
            return f'{{"execute": "config-export", "arguments": {{"diff": "{text}"}}}}'.encode()
        return f'{{"execute": "chardev-remove", "arguments": {{"id": "{text}"}}}}'.encode()

    def _utf8(self) -> bytes:
        bad = self.rng.choice([
            b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xe2\x82\x28", b"\xf0\x28\x8c\xbc",
            b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf8\x88\x80\x80\x80",
            b"\xfe", b"\xf4\x90\x80\x80", b"\x80", b"\xc3",
        ])  # fmt: skip
        where = self.rng.randrange(3)
        if where == 0:
            return b'{"execute": "query-name", "id": "a' + bad + b'b"}'
        if where == 1:
            return (
                b'{"execute": "chardev-add", "arguments": {"id": "u'
                + bad
                + (b'", "backend": {"type": "null", "data": {}}}}')
            )
        return b'{"exec' + bad + b'ute": "query-name"}'

    def _surrogates(self) -> bytes:
        """Escapes of unpaired UTF-16 surrogates: JSON's grammar allows them, but
        they are not Unicode text (QEMU: "... is not a valid Unicode character")."""
        escape = self.rng.choice(["\\ud800", "\\udfff", "x\\udc00y", "\\ud800\\ud800", "\\udbff"])
        where = self.rng.randrange(3)
        if where == 0:
            return f'{{"execute": "query-name", "id": "{escape}"}}'.encode()
        if where == 1:
            return f'{{"execute": "chardev-remove", "arguments": {{"id": "{escape}"}}}}'.encode()
        return f'{{"execute": "query-name", "id": {{"{escape}": 1}}}}'.encode()

    def _duplicate_keys(self) -> bytes:
        """Duplicates that are harmless whichever value would win."""
        return self.rng.choice([
            b'{"execute": "query-name", "id": 1, "id": 2}',
            b'{"execute": "quit", "execute": "query-name"}',
            b'{"execute": "query-name", "execute": "quit"}',
            b'{"execute": "machine-set", "arguments": {"cpus": "a", "cpus": "b"}}',
            b'{"execute": "chardev-remove", "arguments": {"id": 1}, "arguments": {"id": 2}}',
            b'{"execute": "query-status", "id": {"a": 1, "a": 1}}',
        ])  # fmt: skip

    def _wrong_type(self) -> bytes:
        name, arguments = self.rng.choice(self.cases)
        return self._command(name, arguments)

    def _refused(self) -> bytes:
        n = self._n
        refused: list[tuple[str, dict[str, object] | None]] = [
            ("chardev-add", {"id": "base-chr", "backend": {"type": "null", "data": {}}}),
            ("blockdev-add", {"driver": "null-co", "node-name": "base-node"}),
            ("blockdev-add", {"driver": "raw", "node-name": f"h-raw{n}", "file": "ghost-node"}),
            ("blockdev-del", {"node-name": "base-node"}),
            ("blockdev-del", {"node-name": "ghost-node"}),
            ("object-add", {"qom-type": "secret", "id": "base-obj", "data": "x"}),
            ("object-del", {"id": "ghost-obj"}),
            ("chardev-remove", {"id": "ghost-chr"}),
            ("device_add", {"driver": "stress-no-such-device", "id": f"d{n}"}),
            ("machine-set", {"cpus": 0}),
            ("machine-set", {"memory": -1}),
            ("machine-set", {"type": "stress-no-such-machine"}),
            ("set_link", {"name": "ghost-net", "up": False}),
            ("getfd", {"fdname": f"fd{n}"}),
            ("add-fd", {}),
            ("closefd", {"fdname": "ghost-fd"}),
            ("remove-fd", {"fdset-id": 4242}),
            ("boot-set", {"kernel": "/nonexistent/stress-vmlinuz"}),
            ("ringbuf-read", {"device": "ghost-chr", "size": 1}),
            ("qmp_capabilities", {"enable": ["oob"]}),
            ("stress-no-such-command", None),
        ]  # fmt: skip
        return self._command(*self.rng.choice(refused))

    def _shape(self) -> bytes:
        return self.rng.choice([
            b"[]", b'"just a string"', b"42 ", b"null ", b"true ", b"{}", b'{"execute": 5}',
            b'{"arguments": {}}', b'{"execute": "query-name", "arguments": []}',
            b'{"execute": "query-name", "stress": 1}', b'{"exec-oob": "query-name"}',
            b"{'execute': 'query-name', 'id': 'single \"quoted\"'}", b"}", b"]]]",
            b'{"execute": "query-name"', b"{,}", b'{"a" 1}', b'{"a": 1,}', b"[1,]",
        ])  # fmt: skip

    def _query(self) -> bytes:
        return self._command(self.rng.choice([
            "query-status", "query-version", "query-name", "query-commands", "query-qmp-schema",
            "config-export", "query-machine", "query-chardev", "query-named-block-nodes",
            "query-fdsets", "query-kvm",
        ]))  # fmt: skip


# -- a hostile client over asyncio ---------------------------------------------------


@dataclass
class FloodResult:
    units: int = 0
    bytes_sent: int = 0
    lines: int = 0
    finished: bool = False  # the end marker was answered: the session is still served


async def hostile_client(
    path: str,
    units: Iterable[bytes],
    findings: Findings,
    *,
    tag: str,
    negotiate: bool = True,
    split: random.Random | None = None,
    pace: float | None = None,
) -> FloodResult:
    """Send ``units`` on a new connection while reading and checking every line;
    then a marker command, and wait for its reply: the connection must still
    be served after all of it.  ``split`` cuts some units over two writes;
    ``pace`` sends at most that many units a second (else as fast as the
    server takes them)."""
    result = FloodResult()
    started = time.monotonic()
    reader, writer = await asyncio.open_unix_connection(path, limit=LINE_LIMIT)
    marker = f"end-{tag}"

    async def read_all() -> None:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as err:
                findings.add(
                    "connection closed", f"{tag}: before the marker, after {err.partial[:80]!r}"
                )
                return
            except asyncio.LimitOverrunError:
                findings.add("reply too long", f"{tag}: a line over {LINE_LIMIT} bytes")
                return
            result.lines += 1
            value = findings.line(tag, line)
            if value is None:
                continue
            if not negotiate and ("return" in value or "event" in value):
                findings.add("answered before qmp_capabilities", f"{tag}: {line[:160]!r}")
            if value.get("id") == marker:
                result.finished = True
                return

    reading = asyncio.create_task(read_all())
    try:
        if negotiate:
            writer.write(NEGOTIATE)
        for unit in units:
            if pace is not None:
                await asyncio.sleep(started + result.units / pace - time.monotonic())
            cut = 0
            if split is not None and len(unit) > 2 and split.random() < 0.2:
                cut = split.randrange(1, len(unit))
                writer.write(unit[:cut])
                await writer.drain()
            writer.write(unit[cut:])
            await writer.drain()
            result.units += 1
            result.bytes_sent += len(unit)
            if reading.done():
                break
        writer.write(RESYNC + f'{{"execute": "query-name", "id": "{marker}"}}'.encode())
        await writer.drain()
        await reading
    except (ConnectionError, BrokenPipeError) as err:
        findings.add("connection closed", f"{tag}: while sending: {err}")
    finally:
        reading.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError, BrokenPipeError):
            await writer.wait_closed()
    return result


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# -- a plain blocking client, for what qemu.qmp does not do ------------------------


class RawClient:
    """One QMP connection on a blocking socket: whole lines, checked."""

    def __init__(self, path: str | Path, findings: Findings | None = None, timeout: float = 60):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.findings = findings if findings is not None else Findings(SEED)
        self._pending = bytearray()
        self._sync = 0
        self.greeting = self.message()

    def line(self) -> bytes:
        while (end := self._pending.find(b"\n")) < 0:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError(f"closed after {bytes(self._pending[:200])!r}")
            self._pending += chunk
        line = bytes(self._pending[: end + 1])
        del self._pending[: end + 1]
        return line

    def message(self) -> dict[str, object]:
        line = self.line()
        value = self.findings.line("raw", line)
        if value is None or not isinstance(value, dict):
            raise AssertionError(f"invalid line {line[:200]!r}\n{self.findings.report()}")
        return value

    def negotiate(self) -> None:
        self.sock.sendall(NEGOTIATE)
        reply = self.replies_until_sync()
        assert reply == [{"return": {}}], reply

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def replies_until_sync(
        self, data: bytes = b"", fds: Sequence[int] = ()
    ) -> list[dict[str, object]]:
        """Send ``data`` and a marker command; every reply before the marker's
        (events skipped)."""
        self._sync += 1
        marker = f"sync-{self._sync}"
        self.send(data + f'{{"execute": "query-name", "id": "{marker}"}}'.encode(), fds)
        out: list[dict[str, object]] = []
        while True:
            message = self.message()
            if message.get("id") == marker:
                return out
            if "event" not in message:
                out.append(message)

    def call(self, command: str, arguments: Mapping[str, object] | None = None,
             fds: Sequence[int] = ()) -> dict[str, object]:  # fmt: skip
        request: dict[str, object] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        (reply,) = self.replies_until_sync(json.dumps(request).encode(), fds)
        return reply

    def close(self) -> None:
        self.sock.close()


def log_count(stderr_path: Path, text: str) -> int:
    return stderr_path.read_text(errors="replace").count(text)


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll a state (not a duration): ``timeout`` only bounds a failure."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not reached in {timeout} s: {what}") from None


def wait_until_sync(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        time.sleep(0.01)
