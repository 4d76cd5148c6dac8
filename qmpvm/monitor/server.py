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
import os
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Protocol

from qmpvm.monitor.client import Client
from qmpvm.monitor.protocol import Reply, Request, ServerConnection, encode, greeting

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
        self, sock: socket.socket, server: MonitorServer, client: Client, peer: str
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

    async def run(self) -> None:
        self.log.info("connected from %s", self._peer)
        writer = asyncio.get_running_loop().create_task(self._write_loop())
        try:
            await self._send(self.server.greeting)
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
    def __init__(self, backend: Backend, greeting_message: dict[str, object]) -> None:
        self.backend = backend
        self.greeting = greeting_message
        self.sessions: set[Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[tuple[socket.socket, str | None]] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._next_client = 1

    def broadcast(self, message: dict[str, object]) -> None:
        data = encode(message)
        for session in list(self.sessions):
            session.post_event(data)

    def listen_unix(self, path: str) -> None:
        """Mode 0600; the path appears only once it accepts connections."""
        if os.path.exists(path) and not Path(path).is_socket():
            raise OSError(f"{path} exists and is not a socket")
        staging = f"{path}.{os.getpid()}.tmp"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(staging)
        finally:
            os.umask(old)
        sock.listen(BACKLOG)
        os.replace(staging, path)
        self._start(sock, path)

    def listen_tcp(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        self._start(sock, None)

    def _start(self, sock: socket.socket, path: str | None) -> None:
        sock.setblocking(False)
        self._listeners.append((sock, path))
        self._accepting.append(asyncio.get_running_loop().create_task(self._accept_loop(sock)))

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
            sock.setblocking(False)
            client = Client(id=self._next_client)
            self._next_client += 1
            session = Session(sock, self, client, str(addr) or "unix")
            self.sessions.add(session)
            self._spawn(session.run(), functools.partial(self._session_done, session))

    def _session_done(self, session: Session, _task: asyncio.Task[None]) -> None:
        self.sessions.discard(session)

    async def close(self, grace: float = 2.0) -> None:
        for sock, path in self._listeners:
            sock.close()
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
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


def default_greeting() -> dict[str, object]:
    from qmpvm import QEMU_VERSION, __version__

    return greeting(*QEMU_VERSION, package=f"qmpvm {__version__}")
