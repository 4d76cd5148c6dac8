"""The private monitor link from qmpvm to its engine.

The engine (QEMU) gets one end of a socketpair as a QMP monitor
(``-chardev socket,id=qmpvm-link,fd=N -mon chardev=qmpvm-link,mode=control``);
``EngineLink`` is the client on the other end.  Only qmpvm talks on this
link, so it is a small client: no reconnection, no out-of-band commands.

Theory of operation:

* One reader task owns the receiving side.  It cuts the byte stream with the
  monitor's own ``JsonSplitter`` (QMP is a stream of JSON values, not of
  lines), hands events to ``on_event`` synchronously and in arrival order,
  and resolves the request whose ``id`` a reply carries.  Every request gets
  a fresh integer id and replies are matched by id alone, so any number of
  callers may have commands in flight at once.
* Every write holds one lock and runs in its own task shielded from the
  caller's cancellation, so a message always goes out whole and messages
  never interleave.  File descriptors ride in the ``sendmsg`` that carries
  the first bytes of their command, which is where QEMU looks for them
  (``getfd``, ``add-fd``).
* When the engine side reaches EOF, or ``close`` is called, every request
  still waiting fails with ``EngineError``.  ``wait_closed`` returns once the
  reader has finished, so after it returns no event is delivered any more.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import json
import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

from qmpvm.errors import EngineCommandError, EngineError
from qmpvm.monitor.protocol import JsonSplitter, ParseFailure, encode

ENGINE_MAX_MESSAGE = 256 << 20
"""Bytes (and tokens) of one message from the engine: a bound, not a policy."""

logger = logging.getLogger(__name__)

EventHandler = Callable[[dict[str, object]], None]

_RECV_SIZE = 256 * 1024
_LOG_LIMIT = 4096

# A reply, or None when the link closed before it came.
_Reply = dict[str, object] | None


def _for_log(data: bytes) -> str:
    """Wire bytes as one log line; huge replies (the QMP schema) are cut short."""
    text = data.decode("utf-8", "replace").rstrip("\r\n")
    if len(text) > _LOG_LIMIT:
        return f"{text[:_LOG_LIMIT]}... ({len(data)} bytes)"
    return text


class EngineLink:
    """An asyncio QMP client on an already-connected stream socket.

    The socket is a socketpair end whose other end QEMU got via
    ``-chardev socket,id=qmpvm-link,fd=N -mon chardev=qmpvm-link,mode=control``.
    The link owns the socket from ``open`` on and closes it in ``close``.
    """

    greeting: dict[str, object]

    def __init__(self, sock: socket.socket, on_event: EventHandler | None) -> None:
        """Only sets up state: use ``open``, which also negotiates."""
        self._sock = sock
        self._on_event = on_event
        self._loop = asyncio.get_running_loop()
        # the engine is trusted, and its answers are large (query-qmp-schema:
        # 200 KB, tens of thousands of tokens): the clients' limits are not its
        self._splitter = JsonSplitter(max_bytes=ENGINE_MAX_MESSAGE, max_tokens=ENGINE_MAX_MESSAGE)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[_Reply]] = {}
        self._greeting: asyncio.Future[_Reply] = self._loop.create_future()
        self._write_lock = asyncio.Lock()
        self._writes: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._closed_reason: str | None = None
        self._sock_closed = False
        self.greeting = {}

    @classmethod
    async def open(
        cls,
        sock: socket.socket,
        *,
        on_event: EventHandler | None = None,
        timeout: float = 30.0,
    ) -> EngineLink:
        """Read the greeting and negotiate; the link is closed again on any failure."""
        sock.setblocking(False)
        link = cls(sock, on_event)
        link._reader = asyncio.create_task(link._read_loop(), name="qmpvm-engine-link-reader")
        try:
            async with asyncio.timeout(timeout):
                greeting = await link._greeting
                if greeting is None:
                    raise EngineError(
                        f"engine link closed before the QMP greeting ({link._closed_reason})"
                    )
                if not isinstance(greeting.get("QMP"), dict):
                    raise EngineError(f"engine sent a bad QMP greeting: {str(greeting)[:200]}")
                link.greeting = greeting
                await link.execute("qmp_capabilities")
        except TimeoutError:
            await link.close()
            raise EngineError(
                f"engine did not complete QMP negotiation within {timeout:g} s"
            ) from None
        except BaseException:
            await link.close()
            raise
        return link

    @property
    def closed(self) -> bool:
        """True once the engine side hit EOF or ``close`` was called."""
        return self._closed_reason is not None

    async def execute(
        self,
        name: str,
        arguments: Mapping[str, object] | None = None,
        *,
        fds: Sequence[int] = (),
    ) -> object:
        """Run one engine command and return its ``return`` value.

        ``fds`` stay the caller's: they are sent (SCM_RIGHTS) but not closed.
        """
        if self._closed_reason is not None:
            raise EngineError(f"engine link closed ({self._closed_reason}); cannot send {name!r}")
        msg_id = next(self._ids)
        message: dict[str, object] = {"execute": name}
        if arguments is not None:
            message["arguments"] = dict(arguments)
        message["id"] = msg_id
        data = encode(message)
        future: asyncio.Future[_Reply] = self._loop.create_future()
        self._pending[msg_id] = future
        try:
            await self._write(data, fds, name)
            reply = await future
        finally:
            self._pending.pop(msg_id, None)
        if reply is None:
            raise EngineError(
                f"engine link closed before the reply to {name!r} ({self._closed_reason})"
            )
        return _unpack(name, reply)

    async def wait_closed(self) -> None:
        """Return once the reader has finished: EOF seen, every event before it delivered."""
        if self._reader is not None:
            await asyncio.wait({self._reader})

    async def close(self) -> None:
        """Stop the link, fail what is pending, and release the socket (idempotent)."""
        self._mark_closed("closed by qmpvm")
        # Shutting down wakes the reader (EOF) and any blocked writer (EPIPE)
        # without cancelling anything half-way through a message.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        waiting: set[asyncio.Task[None]] = set(self._writes)
        if self._reader is not None:
            waiting.add(self._reader)
        if waiting:
            await asyncio.wait(waiting)
        if not self._sock_closed:
            self._sock_closed = True
            self._sock.close()

    async def __aenter__(self) -> EngineLink:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- writing ---------------------------------------------------------

    async def _write(self, data: bytes, fds: Sequence[int], name: str) -> None:
        """Write in a task of its own, so a cancelled caller never leaves half a message."""
        task = self._loop.create_task(self._send(data, fds))
        self._writes.add(task)
        task.add_done_callback(self._write_done)
        try:
            await asyncio.shield(task)
        except OSError as err:
            raise EngineError(f"cannot send {name!r} to the engine: {err}") from err

    def _write_done(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled():
            task.exception()  # reported to the caller, if it still waits

    async def _send(self, data: bytes, fds: Sequence[int]) -> None:
        async with self._write_lock:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("--> %s%s", _for_log(data), f" [fds {list(fds)}]" if fds else "")
            if fds:
                sent = await self._send_with_fds(data, fds)
                data = data[sent:]
            if data:
                await self._loop.sock_sendall(self._sock, data)

    async def _send_with_fds(self, data: bytes, fds: Sequence[int]) -> int:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        while True:
            try:
                return self._sock.sendmsg([data], ancillary)
            except (BlockingIOError, InterruptedError):
                await self._writable()

    async def _writable(self) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        fd = self._sock.fileno()
        self._loop.add_writer(fd, wake)
        try:
            await ready
        finally:
            self._loop.remove_writer(fd)

    # -- reading ---------------------------------------------------------

    async def _read_loop(self) -> None:
        reason = "EOF from the engine"
        try:
            while True:
                try:
                    data = await self._loop.sock_recv(self._sock, _RECV_SIZE)
                except OSError as err:
                    reason = f"read failed: {err}"
                    break
                if not data:
                    break
                for raw in self._splitter.feed(data):
                    self._receive(raw)
        except asyncio.CancelledError:
            reason = "reader cancelled"
            raise
        except Exception:
            logger.exception("engine link reader failed")
            reason = "reader failed"
        finally:
            self._mark_closed(reason)

    def _receive(self, raw: bytes | ParseFailure) -> None:
        if isinstance(raw, ParseFailure):
            logger.warning("engine sent unparsable output: %s", raw.desc)
            return
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("<-- %s", _for_log(raw))
        try:  # the engine writes standard JSON: none of the clients' limits or quirks
            value = json.loads(raw)
        except (ValueError, RecursionError) as err:
            logger.warning("engine sent unparsable output: %s", err)
            return
        if not isinstance(value, dict):
            logger.warning("engine sent a non-object: %s", _for_log(raw))
            return
        if not self._greeting.done():
            self._greeting.set_result(value)
            return
        if "event" in value:
            self._deliver_event(value)
            return
        msg_id = value.get("id")
        future = self._pending.pop(msg_id, None) if type(msg_id) is int else None
        if future is None:
            # A caller that gave up (cancelled) leaves its reply behind.
            level = logging.DEBUG if type(msg_id) is int else logging.WARNING
            logger.log(level, "engine reply matches no request: %s", _for_log(raw))
        elif not future.done():
            future.set_result(value)

    def _deliver_event(self, event: dict[str, object]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            logger.exception("engine event handler failed on %s", event.get("event"))

    def _mark_closed(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        if not self._greeting.done():
            self._greeting.set_result(None)
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_result(None)


def _unpack(name: str, reply: dict[str, object]) -> object:
    if "return" in reply:
        return reply["return"]
    error = reply.get("error")
    if isinstance(error, dict):
        desc, error_class = error.get("desc"), error.get("class")
        if isinstance(desc, str):
            raise EngineCommandError(
                desc, error_class if isinstance(error_class, str) else "GenericError"
            )
    raise EngineError(f"engine sent a malformed reply to {name!r}: {str(reply)[:200]}")
