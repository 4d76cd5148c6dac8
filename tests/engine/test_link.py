"""Tests for the private engine link: against a fake peer in-process, then real QEMU.

The fake peer is a plain socketpair end driven by the test, so byte-level
details (greetings cut in odd pieces, events between replies, replies out
of order, fds in the ancillary data) are exact.  The real-QEMU tests run
``-machine none`` and are skipped only when the binary is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from qmpvm.engine import process
from qmpvm.engine.link import EngineLink
from qmpvm.errors import EngineCommandError, EngineError, ErrorClass
from qmpvm.monitor.protocol import JsonSplitter, ParseFailure, decode_value

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
    b'"package": "fake"}, "capabilities": ["oob"]}}\r\n'
)


def line(message: dict[str, object]) -> bytes:
    return json.dumps(message).encode() + b"\r\n"


def event(name: str, n: int) -> bytes:
    return line({"event": name, "data": {"n": n}, "timestamp": {"seconds": 1, "microseconds": n}})


class Peer:
    """The engine's end of the link, played by the test."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.splitter = JsonSplitter()
        self.queue: list[dict[str, object]] = []
        self.fds: list[int] = []

    async def send(self, *pieces: bytes) -> None:
        loop = asyncio.get_running_loop()
        for piece in pieces:
            await loop.sock_sendall(self.sock, piece)
            await asyncio.sleep(0)

    async def command(self) -> dict[str, object]:
        """The next command the link sent (collecting any fds that came along)."""
        while not self.queue:
            data, fds = await self._recv_with_fds()
            if not data:
                raise EOFError
            self.fds += fds
            for raw in self.splitter.feed(data):
                if isinstance(raw, ParseFailure):
                    raise AssertionError(raw.desc)
                value = decode_value(raw)
                if not isinstance(value, dict):
                    raise AssertionError(f"link sent {value!r}")
                self.queue.append(value)
        return self.queue.pop(0)

    async def _recv_with_fds(self) -> tuple[bytes, list[int]]:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 16)
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(self.sock.fileno(), wake, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(self.sock.fileno())
                continue
            return data, list(fds)

    async def negotiate(self, *greeting: bytes) -> None:
        await self.send(*(greeting or (GREETING,)))
        cmd = await self.command()
        assert cmd["execute"] == "qmp_capabilities"
        await self.send(line({"return": {}, "id": cmd["id"]}))


def wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


@dataclass
class Pair:
    link: EngineLink
    peer: Peer
    events: list[dict[str, object]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def fake_pair(
    *greeting: bytes, handler: Callable[[dict[str, object]], None] | None = None
) -> AsyncIterator[Pair]:
    ours, theirs = socket.socketpair()
    peer = Peer(theirs)
    events: list[dict[str, object]] = []
    negotiation = asyncio.create_task(peer.negotiate(*greeting))
    link = await EngineLink.open(ours, on_event=handler or events.append, timeout=5)
    await negotiation
    try:
        yield Pair(link, peer, events)
    finally:
        await link.close()
        theirs.close()
        for fd in peer.fds:
            os.close(fd)


# -- the fake peer ------------------------------------------------------------


async def test_greeting_in_odd_pieces_then_negotiation() -> None:
    pieces = [GREETING[:1], GREETING[1:7], GREETING[7:40], GREETING[40:-1], GREETING[-1:]]
    async with fake_pair(*pieces) as pair:
        version = pair.link.greeting["QMP"]
        assert isinstance(version, dict)
        assert version["capabilities"] == ["oob"]
        assert not pair.link.closed


async def test_replies_out_of_order_and_events_in_exact_order() -> None:
    async with fake_pair() as pair:
        calls = asyncio.gather(
            pair.link.execute("first"),
            pair.link.execute("second", {"x": 1}),
            pair.link.execute("third"),
        )
        cmds = [await pair.peer.command() for _ in range(3)]
        assert [c["execute"] for c in cmds] == ["first", "second", "third"]
        assert cmds[1]["arguments"] == {"x": 1}
        assert len({json.dumps(c["id"]) for c in cmds}) == 3
        stream = (
            event("A", 1)
            + line({"return": "third-result", "id": cmds[2]["id"]})
            + event("B", 2)
            + event("C", 3)
            + line({"return": {"v": "first-result"}, "id": cmds[0]["id"]})
            + line({"return": [2], "id": cmds[1]["id"]})
            + event("D", 4)
        )
        # Cut everywhere: byte by byte for the first part, then in one go.
        await pair.peer.send(*(stream[i : i + 1] for i in range(120)), stream[120:])
        assert list(await calls) == [{"v": "first-result"}, [2], "third-result"]
        await asyncio.sleep(0.01)
        assert [(e["event"], e["data"]) for e in pair.events] == [
            ("A", {"n": 1}),
            ("B", {"n": 2}),
            ("C", {"n": 3}),
            ("D", {"n": 4}),
        ]


async def test_wire_traffic_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="qmpvm.engine.link")
    async with fake_pair() as pair:
        call = asyncio.create_task(pair.link.execute("query-name"))
        cmd = await pair.peer.command()
        await pair.peer.send(line({"return": {}, "id": cmd["id"]}))
        await call
    wire = [r.getMessage() for r in caplog.records if r.name == "qmpvm.engine.link"]
    assert f'--> {{"execute": "query-name", "id": {cmd["id"]}}}' in wire
    assert f'<-- {{"return": {{}}, "id": {cmd["id"]}}}' in wire
    assert wire[0].startswith('<-- {"QMP"')


async def test_error_reply_keeps_the_engines_class_and_words() -> None:
    async with fake_pair() as pair:
        call = asyncio.create_task(pair.link.execute("qom-get", {"path": "/x"}))
        cmd = await pair.peer.command()
        await pair.peer.send(
            line({"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"},
                  "id": cmd["id"]})
        )  # fmt: skip
        with pytest.raises(EngineCommandError) as caught:
            await call
        assert caught.value.error_class is ErrorClass.DEVICE_NOT_FOUND
        assert caught.value.desc == "Device 'x' not found"


async def test_stray_replies_and_a_failing_handler_do_not_break_the_link() -> None:
    def explode(_event: dict[str, object]) -> None:
        raise RuntimeError("handler bug")

    async with fake_pair(handler=explode) as pair:
        call = asyncio.create_task(pair.link.execute("x"))
        cmd = await pair.peer.command()
        await pair.peer.send(
            line({"return": "nobody asked", "id": 999}),
            line({"return": "no id"}),
            event("E", 1),
            b"[1, 2]\r\n",
            line({"return": "ok", "id": cmd["id"]}),
        )
        assert await call == "ok"
        assert not pair.link.closed


async def test_eof_fails_pending_calls_after_delivering_earlier_events() -> None:
    async with fake_pair() as pair:
        calls = [asyncio.create_task(pair.link.execute(f"c{i}")) for i in range(3)]
        cmds = [await pair.peer.command() for _ in range(3)]
        await pair.peer.send(
            line({"return": 1, "id": cmds[1]["id"]}) + event("LAST", 1) + event("LAST", 2)
        )
        pair.peer.sock.close()
        await pair.link.wait_closed()
        assert pair.link.closed
        assert [e["data"] for e in pair.events] == [{"n": 1}, {"n": 2}]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results[1] == 1
        for result in (results[0], results[2]):
            assert isinstance(result, EngineError)
            assert "closed" in result.desc
        with pytest.raises(EngineError, match="closed"):
            await pair.link.execute("later")


async def test_cancelled_caller_does_not_desynchronise_the_stream() -> None:
    async with fake_pair() as pair:
        doomed = asyncio.create_task(pair.link.execute("slow"))
        slow = await pair.peer.command()
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        call = asyncio.create_task(pair.link.execute("fast"))
        fast = await pair.peer.command()
        await pair.peer.send(
            line({"return": "late", "id": slow["id"]}), line({"return": "mine", "id": fast["id"]})
        )
        assert await call == "mine"


async def test_fds_travel_with_the_first_bytes_of_their_command() -> None:
    async with fake_pair() as pair:
        r, w = os.pipe()
        try:
            call = asyncio.create_task(pair.link.execute("getfd", {"fdname": "p"}, fds=[w]))
            cmd = await pair.peer.command()
            assert cmd["execute"] == "getfd"
            assert len(pair.peer.fds) == 1
            os.write(pair.peer.fds[0], b"via the passed fd")
            assert os.read(r, 100) == b"via the passed fd"
            await pair.peer.send(line({"return": {}, "id": cmd["id"]}))
            assert await call == {}
        finally:
            os.close(r)
            os.close(w)


async def test_close_fails_pending_calls_and_is_idempotent() -> None:
    async with fake_pair() as pair:
        call = asyncio.create_task(pair.link.execute("never-answered"))
        await pair.peer.command()
        await pair.link.close()
        with pytest.raises(EngineError, match="closed by qmpvm"):
            await call
        await pair.link.close()
        await pair.link.wait_closed()
        assert pair.link.closed


async def test_close_unblocks_a_writer_stuck_on_a_full_socket() -> None:
    async with fake_pair() as pair:
        big = asyncio.create_task(pair.link.execute("x", {"blob": "y" * 4_000_000}))
        small = asyncio.create_task(pair.link.execute("z", fds=[0]))
        await asyncio.sleep(0.05)
        assert not big.done()  # the peer reads nothing, so the write cannot finish
        await asyncio.wait_for(pair.link.close(), 2)
        for call in (big, small):
            with pytest.raises(EngineError):
                await call


async def test_open_refuses_eof_bad_greeting_and_silence() -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    with pytest.raises(EngineError, match="before the QMP greeting"):
        await EngineLink.open(ours, timeout=5)

    ours, theirs = socket.socketpair()
    theirs.sendall(b'{"hello": 1}\r\n')
    with pytest.raises(EngineError, match="bad QMP greeting"):
        await EngineLink.open(ours, timeout=5)
    theirs.close()

    ours, theirs = socket.socketpair()
    with pytest.raises(EngineError, match=r"within 0\.1 s"):
        await EngineLink.open(ours, timeout=0.1)
    theirs.close()


# -- real QEMU ----------------------------------------------------------------


@dataclass
class Qemu:
    proc: asyncio.subprocess.Process
    link: EngineLink
    events: list[dict[str, object]]


@contextlib.asynccontextmanager
async def real_qemu() -> AsyncIterator[Qemu]:
    assert QEMU is not None
    ours, theirs = socket.socketpair()
    proc = await process.start(
        [
            QEMU, "-machine", "none", "-S", "-nodefaults", "-no-user-config", "-display", "none",
            "-accel", "tcg",
            "-chardev", f"socket,id=qmpvm-link,fd={theirs.fileno()}",
            "-mon", "chardev=qmpvm-link,mode=control",
        ],
        pass_fds=(theirs.fileno(),),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    theirs.close()
    events: list[dict[str, object]] = []
    try:
        link = await EngineLink.open(ours, on_event=events.append, timeout=10)
        try:
            yield Qemu(proc, link, events)
        finally:
            await link.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        await proc.wait()


@needs_qemu
async def test_qemu_negotiates_and_answers() -> None:
    async with real_qemu() as qemu:
        version = qemu.link.greeting["QMP"]
        assert isinstance(version, dict)
        assert version["version"]["qemu"]["major"] >= 7
        status = await qemu.link.execute("query-status")
        assert isinstance(status, dict)
        assert status["running"] is False


@needs_qemu
async def test_qemu_concurrent_executes_are_matched_by_id() -> None:
    async with real_qemu() as qemu:
        types = await qemu.link.execute(
            "qom-list-types", {"implements": "device", "abstract": False}
        )
        assert isinstance(types, list)
        names = sorted(t["name"] for t in types if not t["name"].endswith("-cpu"))
        expected = {n: await qemu.link.execute("device-list-properties", {"typename": n})
                    for n in names[:67]}  # fmt: skip
        machine = await qemu.link.execute("qom-list", {"path": "/machine"})

        calls = []
        for i in range(200):
            if i % 3 == 0:
                calls.append(qemu.link.execute("query-status"))
            elif i % 3 == 1:
                calls.append(qemu.link.execute("qom-list", {"path": "/machine"}))
            else:
                calls.append(
                    qemu.link.execute("device-list-properties", {"typename": names[i // 3]})
                )
        results = await asyncio.gather(*calls)
        for i, result in enumerate(results):
            if i % 3 == 0:
                assert isinstance(result, dict)
                assert "status" in result
            elif i % 3 == 1:
                assert result == machine
            else:
                assert result == expected[names[i // 3]]


@needs_qemu
async def test_qemu_error_becomes_engine_command_error() -> None:
    async with real_qemu() as qemu:
        with pytest.raises(EngineCommandError) as caught:
            await qemu.link.execute("device_add", {"driver": "nonexistent"})
        assert caught.value.error_class is ErrorClass.GENERIC
        assert "nonexistent" in caught.value.desc
        with pytest.raises(EngineCommandError) as caught:
            await qemu.link.execute("no-such-command")
        assert caught.value.error_class is ErrorClass.COMMAND_NOT_FOUND
        assert await qemu.link.execute("query-name") == {}


@needs_qemu
async def test_qemu_fd_passing_getfd_closefd_add_fd() -> None:
    async with real_qemu() as qemu:
        with pytest.raises(EngineCommandError, match="SCM_RIGHTS"):
            await qemu.link.execute("getfd", {"fdname": "nofd"})
        r, w = os.pipe()
        os.set_blocking(r, False)
        try:
            await qemu.link.execute("getfd", {"fdname": "pipe-w"}, fds=[w])
            os.close(w)
            w = -1
            with pytest.raises(BlockingIOError):  # QEMU holds the write end now
                os.read(r, 1)
            await qemu.link.execute("closefd", {"fdname": "pipe-w"})
            assert os.read(r, 1) == b""  # ... and no longer
            with pytest.raises(EngineCommandError, match="not found"):
                await qemu.link.execute("closefd", {"fdname": "pipe-w"})
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        r, w = os.pipe()
        try:
            added = await qemu.link.execute("add-fd", {"opaque": "qmpvm-test"}, fds=[r])
            assert isinstance(added, dict)
            fdsets = await qemu.link.execute("query-fdsets")
            assert isinstance(fdsets, list)
            assert [s["fdset-id"] for s in fdsets] == [added["fdset-id"]]
        finally:
            os.close(r)
            os.close(w)


@needs_qemu
async def test_qemu_killed_fails_pending_execute_and_closes() -> None:
    async with real_qemu() as qemu:
        qemu.proc.send_signal(signal.SIGSTOP)
        pending = asyncio.create_task(qemu.link.execute("query-status"))
        await asyncio.sleep(0.05)
        assert not pending.done()
        qemu.proc.kill()
        with pytest.raises(EngineError, match="closed"):
            await asyncio.wait_for(pending, 5)
        await asyncio.wait_for(qemu.link.wait_closed(), 5)
        assert qemu.link.closed
        with pytest.raises(EngineError):
            await qemu.link.execute("query-status")


@needs_qemu
async def test_qemu_events_arrive_through_on_event() -> None:
    async with real_qemu() as qemu:
        await qemu.link.execute("stop")
        await qemu.link.execute("cont")
        await asyncio.sleep(0.05)
        assert "RESUME" in [e["event"] for e in qemu.events]
