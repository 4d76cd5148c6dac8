"""The QMP server: listeners, one task per client, SCM_RIGHTS, event fan-out.

Each client has one task that runs its commands one at a time, in order, as
QEMU does without out-of-band.  Per message, the I/O costs one loop callback
and one task wake-up:

* The socket stays registered for reading for the session's lifetime; the
  loop's callback reads whatever arrived into a short inbox, and reading
  pauses while the inbox is full, so a busy session neither spins nor
  buffers without bound.  Descriptors (SCM_RIGHTS) wait in the inbox with
  their bytes and reach the client when the task handles that read, in
  order with the commands, as if it had read them itself.
* Output goes straight to the socket.  Only what the kernel does not take
  yet is kept, in a backlog of at most ``MAX_OUTPUT`` messages and
  ``MAX_OUTPUT_BYTES`` bytes.  A reply
  waits for room there, which stalls only that client; an event that finds
  the backlog full means the client stopped reading, and it is dropped with
  a logged reason rather than grow memory.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import logging
import socket
import time
import typing
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Protocol

from qmpvm.monitor.client import Client
from qmpvm.monitor.early import Listener, bind, unbind
from qmpvm.monitor.protocol import Reply, Request, ServerConnection, encode

if TYPE_CHECKING:
    from qmpvm.monitor.tls import TlsServer

log = logging.getLogger(__name__)

READ_SIZE = 65536
PARSE_SLICE = 2048
"""Input is parsed this much at a time, the loop running other clients in
between: a read of 64 KiB of brackets costs tens of ms to split in Python."""
HEAVY_PARSE = 0.0005
"""Seconds of CPU parsing one slice that make a session a background one."""
BACKGROUND_PATIENCE = 16
"""Loop turns a background slice waits for the light sessions to be idle."""
READ_AHEAD = 4
"""Reads kept before they are handled; then reading pauses until one is."""
MAX_FDS_PER_MESSAGE = 16
MAX_OUTPUT = 1024
"""Messages the kernel has not taken yet, per client."""
MAX_OUTPUT_BYTES = 4 << 20
"""...and their bytes: past either, a reply waits and an event drops the client.
A single reply may exceed it (it is written once the backlog is empty), so a
client holds at most this plus one message."""
MAX_PENDING_INPUT = 8 << 20
"""Bytes of unfinished messages held for all clients together: past it, the
client whose read went over is dropped (each may hold up to 1 MiB alone)."""
MAX_OUTPUT_TOTAL = 16 << 20
"""Output backlog bytes of all clients together: past it, the client with the
largest backlog (the one reading least) is dropped."""
MAX_INBOX_TOTAL = 4 << 20
"""Bytes read and not yet handled, all clients together: past it, reading
pauses (for every client) until the sessions catch up."""
TLS_HANDSHAKE_SECONDS = 10.0
FLUSH_SECONDS = 1.0
"""How long a closing session waits for its client to read what is left."""
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
        self._greeted = greeted
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._recv = self._recv_unix if sock.family == socket.AF_UNIX else self._recv_stream
        self._inbox: deque[tuple[bytes, list[int]]] = deque()
        self._reading = False
        self._eof = False
        self._output: deque[bytes | memoryview] = deque()
        self._output_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closing = False
        self._background = False  # its last slice was costly to parse
        self._blocked = False  # waiting on a command or on its client: no CPU work

    async def run(self) -> None:
        early = " (greeted during start-up)" if self._greeted else ""
        self.log.info("connected from %s%s", self._peer, early)
        try:
            if not self._greeted:
                self._write(self.server.greeting)
            self.resume_reading()
            await self._serve()
            await self._flush()
        finally:
            self._close()
            self.server.backend.client_gone(self.client)
            self.log.info("disconnected")

    async def _serve(self) -> None:
        while True:
            while not self._inbox and not self._closing:
                await self._wait()
            if self._closing:
                return
            data, fds = self._inbox.popleft()
            self.server.inbox_handled(len(data))
            self.resume_reading()
            if fds:
                self.client.receive_fds(fds)
            if not data:
                return
            for start in range(0, len(data), PARSE_SLICE):
                if start and not self._background:
                    await asyncio.sleep(0)  # let other clients run between slices
                if not await self._handle(data[start : start + PARSE_SLICE]):
                    return
            if not self._inbox:
                self.server.foreground_done(self)

    async def _handle(self, data: bytes) -> bool:
        """Run what ``data`` completes; False once the session must end.

        Parsing that costs more than ``HEAVY_PARSE`` (hostile input: millions
        of brackets, escapes) makes the session a background one until a
        slice parses cheaply again: its slices then wait (a few loop turns at
        most) until no light client has work, one background slice at a time.
        """
        if self._background:  # after the clients with light work, one at a time
            async with self.server.background_turn():
                items, heavy = self._parse(data)
        else:
            items, heavy = self._parse(data)
        if heavy != self._background:
            self._background = heavy
            if heavy:
                self.server.foreground_done(self)
        for item in items:
            if self._closing:
                return False
            if isinstance(item, Reply):
                await self._send(item.message)
                continue
            self.log.debug("--> %s", item)
            self._block()  # waiting on the command is no CPU work
            reply = await self.server.backend.dispatch(item, self.client)
            self._unblock()
            try:
                await self._send(reply)
            except (TypeError, ValueError):
                self.log.exception("reply to %s is not JSON", item.name)
                await self._send(item.fail("GenericError", f"internal error in '{item.name}'"))
        if not self.server.hold_input(self, self.protocol.pending):
            self.server.warn_once(
                "input",
                "dropped a client: unfinished input of all clients over %d bytes",
                MAX_PENDING_INPUT,
            )
            return False
        return True

    def _parse(self, data: bytes) -> tuple[list[Request | Reply], bool]:
        """What ``data`` completes, and whether parsing it was costly."""
        started = time.thread_time()
        items = list(self.protocol.receive_data(data))
        return items, time.thread_time() - started > HEAVY_PARSE

    async def _send(self, message: dict[str, object]) -> None:
        self.log.debug("<-- %s", message)
        data = encode(message)
        if self._backlog_full():
            self._block()  # waiting on its client is no CPU work
            while self._backlog_full() and not self._closing:
                await self._wait()
            self._unblock()
        self._write(data)

    def _block(self) -> None:
        self._blocked = True
        self.server.foreground_done(self)

    def _unblock(self) -> None:
        self._blocked = False
        if not (self._background or self._closing):
            self.server.foreground_busy(self)

    def _backlog_full(self) -> bool:
        return len(self._output) >= MAX_OUTPUT or self._output_bytes >= MAX_OUTPUT_BYTES

    def post_event(self, data: bytes) -> None:
        if self._closing or not self.protocol.wants_events:
            return
        if self._backlog_full():
            self.log.info("backlog: %d messages, %d bytes", len(self._output), self._output_bytes)
            self.drop("it is not reading: its output backlog is full")
            return
        self._write(data)

    # -- waiting: the task sleeps on one future, woken by any I/O callback --

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- input --

    def resume_reading(self) -> None:
        if self._reading or self._eof or self._closing or len(self._inbox) >= READ_AHEAD:
            return
        if self.server.inbox_full(self):
            return  # the server resumes it when there is room
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        try:
            data, fds = self._recv()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self.log.info("connection error: %s", err)
            data, fds = b"", []
        self._inbox.append((data, fds))
        self.server.inbox_read(len(data))
        if not (self._background or self._blocked):
            self.server.foreground_busy(self)
        if not data:
            self._eof = True
        if self._eof or len(self._inbox) >= READ_AHEAD or self.server.inbox_full(self):
            self._pause_reading()
        self._wake()

    def _recv_unix(self) -> tuple[bytes, list[int]]:
        # CLOEXEC: a passed descriptor reaches an engine only when handed over.
        data, ancdata, flags, _addr = self.sock.recvmsg(
            READ_SIZE, _FD_ANCILLARY, socket.MSG_CMSG_CLOEXEC
        )
        if flags & socket.MSG_CTRUNC:
            self.log.warning(
                "more than %d descriptors in one message: the rest were closed",
                MAX_FDS_PER_MESSAGE,
            )
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                numbers = array.array("i")
                numbers.frombytes(payload[: len(payload) - len(payload) % numbers.itemsize])
                fds.extend(numbers)
        return data, fds

    def _recv_stream(self) -> tuple[bytes, list[int]]:
        return self.sock.recv(READ_SIZE), []

    # -- output --

    def _write(self, data: bytes) -> None:
        if self._closing:
            return
        if self._output:
            self._output.append(data)
            self._held(len(data))
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as err:
            self._lost(err)
            return
        if sent < len(data):
            self._output.append(memoryview(data)[sent:])
            self._loop.add_writer(self._fd, self._on_writable)
            self._held(len(data) - sent)

    def _held(self, delta: int) -> None:
        """Account for backlog bytes, here and in the server's total."""
        self._output_bytes += delta
        self.server.output_held(self, delta)

    @property
    def output_bytes(self) -> int:
        return self._output_bytes

    def drop(self, reason: str) -> None:
        """End the session now, without flushing: ``reason`` is logged once."""
        self.server.warn_once(reason, "dropped a client: %s", reason)
        self._shut_down()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _on_writable(self) -> None:
        while self._output:
            head = self._output[0]
            try:
                sent = self.sock.send(head)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                self._lost(err)
                return
            self._held(-sent)
            if sent < len(head):
                self._output[0] = memoryview(head)[sent:]
                break
            self._output.popleft()
        if not self._output:
            self._loop.remove_writer(self._fd)
        self._wake()

    async def _flush(self) -> None:
        """Give the client ``FLUSH_SECONDS`` to read what is left."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_SECONDS):
                while self._output and not self._closing:
                    await self._wait()

    # -- ending --

    def _lost(self, err: OSError) -> None:
        self.log.info("connection error: %s", err)
        self._shut_down()

    def _shut_down(self) -> None:
        """Stop all I/O now; the task notices and ends the session."""
        self._closing = True
        self._output.clear()
        self._held(-self._output_bytes)
        self._loop.remove_writer(self._fd)
        self._pause_reading()
        self._wake()

    def _close(self) -> None:
        self._shut_down()
        self.server.foreground_done(self)
        for data, fds in self._inbox:  # descriptors read but never handled
            self.client.receive_fds(fds)
            self.server.inbox_handled(len(data))
        self._inbox.clear()
        self.sock.close()


class MonitorServer:
    def __init__(self, backend: Backend, greeting: bytes) -> None:
        self.backend = backend
        self.greeting = greeting
        self.sessions: set[Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[tuple[socket.socket, Listener]] = []
        self._pending_input: dict[Session, int] = {}  # unfinished message bytes, per client
        self._pending_total = 0  # their sum, kept as they change (not summed at every read)
        self._session_ended = asyncio.Event()
        self._output_total = 0  # backlog bytes of all sessions
        self._inbox_total = 0  # bytes read and not yet handled, all sessions
        self._starved: set[Session] = set()  # waiting for room in the inbox total
        self._foreground: set[Session] = set()  # light sessions with input to handle
        self._background = asyncio.Lock()  # one background slice at a time
        self._warned: set[str] = set()
        self._accepting: list[asyncio.Task[None]] = []
        self._next_client = 1

    def broadcast(self, message: dict[str, object]) -> None:
        data = encode(message)
        for session in list(self.sessions):
            session.post_event(data)

    def listen(self, listener: Listener) -> None:
        """Serve ``listener``; a monitor that is one connection (a socket qmpvm dials,
        or an inherited connected socket, as QEMU's Python harness passes) is served
        as that connection."""
        if listener.kind == "connect":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(listener.path)
            except OSError:
                sock.close()
                raise
            self.adopt_connection(sock, listener.path, greeted=False)
            return
        if listener.kind == "fd":
            sock = socket.socket(fileno=int(listener.path))
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                try:
                    sock.getpeername()
                except OSError:
                    pass  # neither listening nor connected: bind() makes it listen
                else:
                    self.adopt_connection(sock, f"fd {listener.path}", greeted=False)
                    return
            sock.detach()
        self.adopt_listener(socket.socket(fileno=bind(listener).detach()), listener)

    def adopt_listener(self, sock: socket.socket, listener: Listener) -> None:
        """Serve a socket already listening (bound by ``EarlyMonitor``)."""
        sock.setblocking(False)
        self._listeners.append((sock, listener))
        serve = self._accept_loop(sock) if listener.tls is None else self._serve_tls(sock, listener)
        self._accepting.append(asyncio.get_running_loop().create_task(serve))

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
        """Accept for ever; out of descriptors, wait for a client to leave (or a
        second, for descriptors freed otherwise), saying so once, not at every try."""
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as err:
                if not failing:  # a warning the first time, then debug: clients come and go
                    self.warn_once(
                        "accept", "accept failed: %s; waiting for descriptors to be freed", err
                    )
                failing = True
                self._session_ended.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._session_ended.wait(), 1.0)
                continue
            if failing:
                self.warn_once("accepting", "accepting again")
                failing = False
            self.adopt_connection(sock, str(addr) or "unix", greeted=False)

    async def _serve_tls(self, sock: socket.socket, listener: Listener) -> None:
        """A TLS monitor: each connection, once its handshake and ``tls-authz``
        pass, is relayed in clear over a socket pair to an ordinary session."""
        from qmpvm.monitor.tls import TlsServer  # ssl: only for a TLS monitor

        tls = typing.cast(TlsServer, listener.tls)
        server = await asyncio.start_server(
            functools.partial(self._tls_client, tls),
            sock=sock,
            ssl=tls.context(),
            ssl_handshake_timeout=TLS_HANDSHAKE_SECONDS,
        )
        async with server:
            await server.serve_forever()

    async def _tls_client(
        self, tls: TlsServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = str(writer.get_extra_info("peername"))
        refusal = tls.refusal(writer.get_extra_info("peercert"))
        if refusal is not None:
            self.warn_once("tls-authz", "refused a TLS client from %s: %s", peer, refusal)
            writer.close()
            return
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        self.adopt_connection(theirs, f"tls {peer}", greeted=False)
        loop = asyncio.get_running_loop()

        async def inward() -> None:
            try:
                while data := await reader.read(READ_SIZE):
                    await loop.sock_sendall(ours, data)
            finally:  # the client is done (or gone): the session ends as on EOF
                with contextlib.suppress(OSError):
                    ours.shutdown(socket.SHUT_WR)

        inward_task = asyncio.ensure_future(inward())
        try:  # until the session ends, which every way out of inward() brings about
            while data := await loop.sock_recv(ours, READ_SIZE):
                writer.write(data)
                await writer.drain()
        except OSError as err:
            log.info("TLS client %s: %s", peer, err)
        finally:
            inward_task.cancel()
            await asyncio.gather(inward_task, return_exceptions=True)
            ours.close()
            writer.close()

    def _session_done(self, session: Session, _task: asyncio.Task[None]) -> None:
        self.sessions.discard(session)
        self._starved.discard(session)
        self._foreground.discard(session)
        self._pending_total -= self._pending_input.pop(session, 0)
        self._session_ended.set()

    def foreground_busy(self, session: Session) -> None:
        self._foreground.add(session)

    def foreground_done(self, session: Session) -> None:
        self._foreground.discard(session)

    @contextlib.asynccontextmanager
    async def background_turn(self) -> AsyncIterator[None]:
        """Hold a background slice until no light session has work (checked
        once per loop turn, for at most ``BACKGROUND_PATIENCE`` turns: busy
        light sessions slow a heavy one down, never stop it), then run it
        alone."""
        async with self._background:
            for _turn in range(BACKGROUND_PATIENCE):
                await asyncio.sleep(0)  # a reply just sent: let its client's next read in
                if not self._foreground:
                    break
            yield

    def warn_once(self, key: str, message: str, *args: object) -> None:
        """Log a warning the first time ``key`` happens; later ones at debug
        level, so a hostile client cannot flood the log."""
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        log.log(level, message, *args)

    def output_held(self, session: Session, delta: int) -> None:
        self._output_total += delta
        if delta > 0 and self._output_total > MAX_OUTPUT_TOTAL:
            largest = max(self.sessions, key=lambda s: s.output_bytes, default=session)
            largest.drop(f"output backlogs of all clients over {MAX_OUTPUT_TOTAL} bytes")

    def inbox_read(self, size: int) -> None:
        self._inbox_total += size

    def inbox_full(self, session: Session) -> bool:
        """Whether reading must wait; ``session`` is resumed when there is room."""
        if self._inbox_total < MAX_INBOX_TOTAL:
            return False
        self._starved.add(session)
        return True

    def inbox_handled(self, size: int) -> None:
        self._inbox_total -= size
        if self._starved and self._inbox_total < MAX_INBOX_TOTAL:
            starved, self._starved = self._starved, set()
            for waiting in starved:
                waiting.resume_reading()

    def hold_input(self, session: Session, pending: int) -> bool:
        """Record what ``session`` holds of an unfinished message; False if all
        clients together would then hold more than ``MAX_PENDING_INPUT``."""
        self._pending_total += pending - self._pending_input.pop(session, 0)
        if pending:
            self._pending_input[session] = pending
        if self._pending_total <= MAX_PENDING_INPUT:
            return True
        self._pending_total -= self._pending_input.pop(session, 0)
        return False

    async def close(self, grace: float = 2.0) -> None:
        for task in self._accepting:
            task.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        for sock, listener in self._listeners:
            unbind(sock, listener)
        self._listeners.clear()
        tasks = list(self._tasks)
        for session in list(self.sessions):
            with contextlib.suppress(OSError):
                session.sock.shutdown(socket.SHUT_RD)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
