"""Sessions on socket pairs, in-process: ordering, descriptors, backpressure, close."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from qmpvm.monitor import server as server_module
from qmpvm.monitor.client import Client
from qmpvm.monitor.early import greeting_line
from qmpvm.monitor.protocol import Request
from qmpvm.monitor.server import MonitorServer

BIG = 64 * 1024


class Backend:
    """Echoes each command; ``big`` answers 64 KiB, ``not-json`` cannot be encoded."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gone: list[int] = []
        self.release = asyncio.Event()

    async def dispatch(self, request: Request, client: Client) -> dict[str, object]:
        self.calls.append(request.name)
        if request.name == "block":
            await self.release.wait()
        if request.name == "big":
            return request.reply("x" * BIG)
        if request.name == "not-json":
            return request.reply(object())
        if request.name == "with-fd":
            cloexec = all(
                fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in client.pending_fds
            )
            return request.reply({"fds": len(client.pending_fds), "cloexec": cloexec})
        return request.reply({"command": request.name, "fds": len(client.pending_fds)})

    def client_gone(self, client: Client) -> None:
        self.gone.append(client.id)
        client.close_pending()


class Peer:
    """The client end of a session, read and written without blocking the loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buffer = b""

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def line(self, timeout: float = 5) -> dict[str, object]:
        while b"\r\n" not in self._buffer:
            if not await self._fill(timeout):
                raise EOFError(f"connection closed after {self._buffer[:200]!r}")
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        message: dict[str, object] = json.loads(line)
        return message

    async def until_eof(self, timeout: float = 5) -> bytes:
        while await self._fill(timeout):
            pass
        return self._buffer

    async def _fill(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), timeout)
        self._buffer += chunk
        return bool(chunk)


async def push_until_blocked(sock: socket.socket, chunk: bytes, limit: int = 16 << 20) -> int:
    """Bytes the peer accepted before sends kept blocking (or ``limit``)."""
    sent = blocked = 0
    while sent < limit and blocked < 5:
        try:
            sent += sock.send(chunk)
            blocked = 0
        except BlockingIOError:
            blocked += 1
            await asyncio.sleep(0.02)
    return sent


@pytest.fixture
async def server() -> AsyncIterator[tuple[MonitorServer, Backend]]:
    backend = Backend()
    monitor = MonitorServer(backend, greeting_line())
    yield monitor, backend
    await monitor.close(grace=1)


async def connect(
    monitor: MonitorServer, *, negotiate: bool = True, server_sndbuf: int = 0
) -> Peer:
    ours, theirs = socket.socketpair()
    if server_sndbuf:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_sndbuf)
    monitor.adopt_connection(theirs, "test", greeted=False)
    peer = Peer(ours)
    assert "QMP" in await peer.line()
    if negotiate:
        await peer.send(b'{"execute": "qmp_capabilities"}')
        assert await peer.line() == {"return": {}}
    return peer


async def test_commands_are_answered_in_order_across_reads(
    server: tuple[MonitorServer, Backend],
) -> None:
    monitor, _backend = server
    peer = await connect(monitor)
    await peer.send(b'{"execute": "a", "id": 1}{"execute": "b", "id": 2}{"execu')
    await peer.send(b'te": "c", "id": 3}\n{"execute": "d", "id": 4}')
    ids = [(await peer.line())["id"] for _ in range(4)]
    assert ids == [1, 2, 3, 4]


async def test_descriptors_reach_the_client_with_their_message(
    server: tuple[MonitorServer, Backend],
) -> None:
    monitor, _backend = server
    peer = await connect(monitor)
    with open("/dev/null") as passed:
        socket.send_fds(peer.sock, [b'{"execute": "with-fd"}'], [passed.fileno()])
    reply = await peer.line()
    assert reply["return"] == {"fds": 1, "cloexec": True}, "no engine inherits it by accident"


async def test_reply_that_cannot_be_encoded_is_a_generic_error(
    server: tuple[MonitorServer, Backend],
) -> None:
    monitor, _backend = server
    peer = await connect(monitor)
    await peer.send(b'{"execute": "not-json", "id": 1}{"execute": "after", "id": 2}')
    assert await peer.line() == {
        "error": {"class": "GenericError", "desc": "internal error in 'not-json'"},
        "id": 1,
    }
    assert (await peer.line())["id"] == 2


async def test_a_large_reply_and_a_later_event_arrive_whole_and_in_order(
    server: tuple[MonitorServer, Backend],
) -> None:
    monitor, backend = server
    peer = await connect(monitor, server_sndbuf=4096)
    await peer.send(b'{"execute": "big", "id": 1}{"execute": "after", "id": 2}')
    while len(backend.calls) < 2:  # both replies queued behind the kernel buffer
        await asyncio.sleep(0.01)
    monitor.broadcast({"event": "LATER"})
    first, second, third = await peer.line(), await peer.line(), await peer.line()
    assert first == {"return": "x" * BIG, "id": 1}
    assert second["id"] == 2
    assert third == {"event": "LATER"}


async def test_events_reach_negotiated_clients_only(
    server: tuple[MonitorServer, Backend],
) -> None:
    monitor, _backend = server
    negotiated = await connect(monitor)
    greeted_only = await connect(monitor, negotiate=False)
    monitor.broadcast({"event": "STOP"})
    assert await negotiated.line() == {"event": "STOP"}
    await greeted_only.send(b'{"execute": "qmp_capabilities", "id": 1}')
    assert await greeted_only.line() == {"return": {}, "id": 1}, "no event came first"


async def test_client_that_never_reads_events_is_dropped(
    server: tuple[MonitorServer, Backend],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(server_module, "MAX_OUTPUT", 8)
    monitor, backend = server
    hog = await connect(monitor, server_sndbuf=4096)
    reader = await connect(monitor)
    event = {"event": "BIG", "data": {"pad": "x" * 4096}}
    with caplog.at_level(logging.WARNING):
        for _ in range(100):
            monitor.broadcast(event)
            assert await reader.line() == event
    assert any("it is not reading" in r.getMessage() for r in caplog.records)
    leftover = await hog.until_eof()
    assert 0 < leftover.count(b"\r\n") < 100, "what the kernel held, then EOF"
    while len(monitor.sessions) > 1:
        await asyncio.sleep(0.01)
    assert backend.gone == [1]
    await reader.send(b'{"execute": "still-served", "id": 1}')
    assert (await reader.line())["id"] == 1


async def test_client_that_never_reads_replies_stalls_only_itself(
    server: tuple[MonitorServer, Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "MAX_OUTPUT", 8)
    monitor, backend = server
    hog = await connect(monitor, server_sndbuf=4096)
    await hog.send(b"".join(b'{"execute": "big", "id": %d}' % i for i in range(200)))
    other = await connect(monitor)
    for i in range(50):
        await other.send(b'{"execute": "other", "id": %d}' % i)
        assert (await other.line())["id"] == i
    stalled_at = backend.calls.count("big")
    assert stalled_at < 50, "the hog's commands wait for room for their replies"
    assert await push_until_blocked(hog.sock, b" " * 65536) < 2 << 20, "and its input waits"
    ids = [(await hog.line())["id"] for _ in range(200)]
    assert ids == list(range(200)), "nothing lost once it reads"


async def test_replies_are_bounded_by_bytes_not_only_by_count(
    server: tuple[MonitorServer, Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Few huge replies to a client that does not read must not pile up."""
    monkeypatch.setattr(server_module, "MAX_OUTPUT_BYTES", 3 * BIG)
    monitor, backend = server
    hog = await connect(monitor, server_sndbuf=4096)
    await hog.send(b"".join(b'{"execute": "big", "id": %d}' % i for i in range(20)))
    other = await connect(monitor)
    await other.send(b'{"execute": "other", "id": 0}')
    assert (await other.line())["id"] == 0
    (session,) = [s for s in monitor.sessions if s.client.id == 1]
    assert backend.calls.count("big") <= 5, "replies wait for the backlog to drain"
    assert session._output_bytes <= 4 * BIG + 1024
    ids = [(await hog.line())["id"] for _ in range(20)]
    assert ids == list(range(20)), "nothing lost once it reads"


async def test_unfinished_input_is_bounded_across_all_clients(
    server: tuple[MonitorServer, Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many clients each holding most of a maximal message must not add up."""
    monkeypatch.setattr(server_module, "MAX_PENDING_INPUT", 200_000)
    monitor, _backend = server
    first = await connect(monitor)
    await first.send(b'{"execute": "x", "pad": "' + b"a" * 150_000)
    await first.send(b'"}{"execute": "probe", "id": 1}')  # first's message ends: nothing held
    assert "id" not in await first.line()  # the answer to "x"
    assert (await first.line())["id"] == 1
    await first.send(b'{"execute": "x", "pad": "' + b"a" * 150_000)  # held again
    while monitor._pending_total < 150_000:  # all of it read and held
        await asyncio.sleep(0.01)
    second = await connect(monitor)
    await second.send(b'{"execute": "y", "pad": "' + b"b" * 150_000)  # over, together
    with contextlib.suppress(ConnectionResetError):  # dropped with its input unread
        assert await second.until_eof() == b""
    while len(monitor.sessions) > 1:  # the client that went over is gone
        await asyncio.sleep(0.01)
    await first.send(b'"}{"execute": "still-served", "id": 2}')
    assert "id" not in await first.line()
    assert (await first.line())["id"] == 2


async def test_output_is_bounded_across_all_clients(
    server: tuple[MonitorServer, Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients that do not read cannot add up: the one holding most goes."""
    monkeypatch.setattr(server_module, "MAX_OUTPUT_TOTAL", 5 * BIG)
    monitor, _backend = server
    hog = await connect(monitor, server_sndbuf=4096)
    modest = await connect(monitor, server_sndbuf=4096)
    await hog.send(b"".join(b'{"execute": "big", "id": %d}' % i for i in range(4)))
    while sum(s.output_bytes for s in monitor.sessions) < 3 * BIG:
        await asyncio.sleep(0.01)
    await modest.send(b'{"execute": "big", "id": "m"}{"execute": "big", "id": "n"}')
    with contextlib.suppress(ConnectionResetError):
        await hog.until_eof()
    assert [s.client.id for s in monitor.sessions] == [2]
    assert (await modest.line())["id"] == "m"
    assert (await modest.line())["id"] == "n"


async def test_input_read_ahead_is_bounded_across_all_clients(
    server: tuple[MonitorServer, Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the total, reading waits for every client, then resumes for all."""
    monkeypatch.setattr(server_module, "MAX_INBOX_TOTAL", 2000)
    monitor, backend = server
    busy = await connect(monitor)
    await busy.send(b'{"execute": "block", "id": 0}')
    while "block" not in backend.calls:
        await asyncio.sleep(0.01)
    for i in range(1, 4):  # read while "block" runs, and not handled
        await busy.send(b'{"execute": "later", "id": %d, "pad": "%s"}' % (i, b"p" * 1000))
        while not any(s._inbox for s in monitor.sessions) and i == 1:
            await asyncio.sleep(0.01)
    other = await connect(monitor, negotiate=False)
    await other.send(b'{"execute": "qmp_capabilities", "id": "o"}')
    while not any(s.client.id == 2 for s in monitor._starved):  # not read: no room
        await asyncio.sleep(0.01)
    assert sum(len(d) for s in monitor.sessions for d, _ in s._inbox) <= 2000 + 65536
    backend.release.set()
    assert (await other.line())["id"] == "o"
    assert [(await busy.line())["id"] for _ in range(4)] == [0, 1, 2, 3]


async def test_close_answers_what_was_asked_then_ends_sessions(
    server: tuple[MonitorServer, Backend],
) -> None:
    monitor, backend = server
    peer = await connect(monitor)
    await peer.send(b'{"execute": "last", "id": 9}')
    while not backend.calls:
        await asyncio.sleep(0.01)
    await monitor.close()
    rest = await peer.until_eof()
    assert json.loads(rest.split(b"\r\n")[0])["id"] == 9
    assert backend.gone == [1]
    assert not monitor.sessions
