"""The QMP server: listeners, one task per client, SCM_RIGHTS, event fan-out.

Each client has a reader task (bytes -> protocol -> dispatcher, one command
at a time, as QEMU does without out-of-band) and a writer task draining a
bounded queue.  Replies wait for room in the queue, which stalls only that
client; an event that finds the queue full means the client stopped
reading, and it is dropped with a logged reason rather than grow memory.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Protocol

from qmpvm.monitor.client import Client
from qmpvm.monitor.early import Listener, bind, unbind
from qmpvm.monitor.protocol import Reply, Request, ServerConnection, encode

log = logging.getLogger(__name__)

READ_SIZE = 65536
MAX_FDS_PER_MESSAGE = 16
OUTPUT_QUEUE = 1024
BACKLOG = 128
_FD_ANCILLARY = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)


class Backend(Protocol):
    """What sessions need from the rest of qmpvm (the dispatcher and state)."""

    async def dispatch(self, request: Request, client: Client) -> dict[str, object]: ...

    def client_gone(self, client: Client) -> None: ...


class Session:
    def __init__(
        self,
        sock: socket.socket,
        server: MonitorServer,
        client: Client,
        peer: str,
        *,
        greeted: bool = False,
    ) -> None:
        self.sock = sock
        self.server = server
        self.client = client
        self.protocol = ServerConnection()
        self.log = log.getChild(f"client{client.id}")
        self._peer = peer
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue(OUTPUT_QUEUE)
        self._unix = sock.family == socket.AF_UNIX
        self._dropped = False
        self._greeted = greeted

    async def run(self) -> None:
        early = " (greeted during start-up)" if self._greeted else ""
        self.log.info("connected from %s%s", self._peer, early)
        writer = asyncio.get_running_loop().create_task(self._write_loop())
        try:
            if not self._greeted:
                await self._out.put(self.server.greeting)
            await self._read_loop()
        except (ConnectionError, OSError) as err:
            self.log.info("connection error: %s", err)
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                self._out.put_nowait(None)
            with contextlib.suppress(asyncio.TimeoutError, OSError, ConnectionError):
                await asyncio.wait_for(writer, 1)
            writer.cancel()
            self.sock.close()
            self.server.backend.client_gone(self.client)
            self.log.info("disconnected")

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._dropped:
            data, fds = await self._receive(loop)
            if fds:
                self.client.receive_fds(fds)
            if not data:
                return
            for item in self.protocol.receive_data(data):
                if isinstance(item, Reply):
                    await self._send(item.message)
                    continue
                self.log.debug("--> %s", item)
                reply = await self.server.backend.dispatch(item, self.client)
                try:
                    await self._send(reply)
                except (TypeError, ValueError):
                    self.log.exception("reply to %s is not JSON", item.name)
                    await self._send(item.fail("GenericError", f"internal error in '{item.name}'"))

    async def _receive(self, loop: asyncio.AbstractEventLoop) -> tuple[bytes, list[int]]:
        if not self._unix:
            return await loop.sock_recv(self.sock, READ_SIZE), []
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(READ_SIZE, _FD_ANCILLARY)
            except BlockingIOError:
                await _readable(loop, self.sock)
                continue
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    numbers = array.array("i")
                    numbers.frombytes(payload[: len(payload) - len(payload) % numbers.itemsize])
                    fds.extend(numbers)
            return data, fds

    async def _send(self, message: dict[str, object]) -> None:
        self.log.debug("<-- %s", message)
        await self._out.put(encode(message))

    def post_event(self, data: bytes) -> None:
        if not self.protocol.wants_events or self._dropped:
            return
        try:
            self._out.put_nowait(data)
        except asyncio.QueueFull:
            self.log.warning(
                "dropped: output queue full (%d messages); client is not reading", OUTPUT_QUEUE
            )
            self._dropped = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await self._out.get()
            if data is None:
                return
            await loop.sock_sendall(self.sock, data)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), ready.set_result, None)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


class MonitorServer:
    def __init__(self, backend: Backend, greeting: bytes) -> None:
        self.backend = backend
        self.greeting = greeting
        self.sessions: set[Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[tuple[socket.socket, Listener]] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._next_client = 1

    def broadcast(self, message: dict[str, object]) -> None:
        data = encode(message)
        for session in list(self.sessions):
            session.post_event(data)

    def listen(self, listener: Listener) -> None:
        self.adopt_listener(socket.socket(fileno=bind(listener).detach()), listener)

    def adopt_listener(self, sock: socket.socket, listener: Listener) -> None:
        """Serve a socket already listening (bound by ``EarlyMonitor``)."""
        sock.setblocking(False)
        self._listeners.append((sock, listener))
        self._accepting.append(asyncio.get_running_loop().create_task(self._accept_loop(sock)))

    def adopt_connection(self, sock: socket.socket, peer: str, *, greeted: bool) -> None:
        sock.setblocking(False)
        client = Client(id=self._next_client)
        self._next_client += 1
        session = Session(sock, self, client, peer, greeted=greeted)
        self.sessions.add(session)
        self._spawn(session.run(), functools.partial(self._session_done, session))

    def _spawn(
        self,
        coro: Coroutine[object, object, None],
        on_done: Callable[[asyncio.Task[None]], None] | None = None,
    ) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if on_done is not None:
            task.add_done_callback(on_done)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as err:
                log.warning("accept failed: %s", err)
                await asyncio.sleep(0.1)
                continue
            self.adopt_connection(sock, str(addr) or "unix", greeted=False)

    def _session_done(self, session: Session, _task: asyncio.Task[None]) -> None:
        self.sessions.discard(session)

    async def close(self, grace: float = 2.0) -> None:
        for sock, listener in self._listeners:
            unbind(sock, listener)
        self._listeners.clear()
        for task in self._accepting:
            task.cancel()
        tasks = list(self._tasks)
        for session in list(self.sessions):
            with contextlib.suppress(OSError):
                session.sock.shutdown(socket.SHUT_RD)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
