"""The clients of a console qmpvm serves: its terminal (``stdio``), its
listening sockets and their connections.

Descriptors parked in the engine (``qmpvm.host.parking``) come back from
QEMU's ``getfd`` blocking: O_NONBLOCK belongs to the open file, which the
engine shares, and QEMU clears it on every descriptor it receives.  So a
listener accepts one connection per readiness, and a connection holds its
output while it is being parked; both are made non-blocking again after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import socket
import termios
import threading
import tty
import typing
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qmpvm.host.consoles import Console
    from qmpvm.host.hmp import Keyboard
    from qmpvm.host.parking import Parking

log = logging.getLogger(__name__)

CLIENT_LAG = 1024 * 1024
"""A client with this much output unread is dropped, so one that does not
read can neither hold the guest back nor grow qmpvm's memory."""


class Terminal:
    """qmpvm's own standard I/O as a console (``stdio``): output written by a
    thread, so that a stdout nobody reads holds back neither qmpvm nor the
    guest (beyond ``CLIENT_LAG`` waiting, output is dropped); input read from
    stdin, a terminal put in raw mode (Ctrl-C still signals qmpvm unless
    ``signal`` is off, as in QEMU) and restored on close."""

    def __init__(self, console: Console, *, signals: bool) -> None:
        self._console = console
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._waiting = 0  # bytes queued, not yet written
        self._lock = threading.Lock()
        self._keyboard = console.keyboard(self.send)
        self._saved: list[Any] | None = None
        self._reading = False
        self._writer = threading.Thread(target=self._write, name="stdio-console", daemon=True)
        self._writer.start()
        if os.isatty(0):
            self._saved = termios.tcgetattr(0)
            tty.setraw(0, termios.TCSANOW)
            if signals:
                raw = termios.tcgetattr(0)
                raw[3] |= termios.ISIG
                termios.tcsetattr(0, termios.TCSANOW, raw)
        self.resume()

    def resume(self) -> None:
        """Read stdin (again): the guest took the input that waited."""
        if not self._reading:
            with contextlib.suppress(OSError):  # /dev/null and files cannot be waited on
                asyncio.get_running_loop().add_reader(0, self._read)
                self._reading = True

    def _pause(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(0)
            self._reading = False

    def _read(self) -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._pause()  # for good: stdin ended
            return
        if self._keyboard is not None:
            self._keyboard.feed(data)
        else:
            self._console.write_input(data)
        if self._console.input_full:
            self._pause()  # until the guest takes it (``Console._flush_input``)

    def send(self, chunk: bytes) -> None:
        with self._lock:
            if self._waiting + len(chunk) > CLIENT_LAG:
                return  # stdout is not being read: the guest goes on, this output is lost
            self._waiting += len(chunk)
        self._queue.put(chunk)

    def _write(self) -> None:
        while (chunk := self._queue.get()) is not None:
            try:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(1, view) :]
            except OSError:
                pass
            with self._lock:
                self._waiting -= len(chunk)

    def close(self) -> None:
        self._pause()
        if self._keyboard is not None:
            self._keyboard.close()
        self._queue.put(None)
        self._writer.join(timeout=1.0)  # what is still queued, before qmpvm exits
        if self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(0, termios.TCSADRAIN, self._saved)


class Listener:
    """One listening socket of a console; ``parked``: its name in the engine."""

    def __init__(self, console: Console, sock: socket.socket, parked: str | None = None) -> None:
        self.console = console
        self.sock = sock
        self.parked = parked
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _address = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as err:  # out of descriptors, say: the client waits in the backlog
            log.warning("console %s: cannot accept a client: %s", self.console.id, err)
            return
        self.console.adopt(conn)

    async def park(self, parking: Parking) -> None:
        """Park it; no connection is accepted while its descriptor is blocking."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        try:
            self.parked = await parking.park(
                self.sock.fileno(), f"chardev '{self.console.id}' listener"
            )
        finally:
            if self.sock.fileno() >= 0:
                self.sock.setblocking(False)
                loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


class Peer(asyncio.Protocol):
    """One client of a console's listening socket; ``parked``: the name of
    the engine's copy."""

    def __init__(self, console: Console, parked: str | None = None) -> None:
        self.console = console
        self.transport: asyncio.Transport = typing.cast(asyncio.Transport, None)
        self.name = ""
        self.parked = parked
        self._keyboard: Keyboard | None = None
        self._held: bytearray | None = None  # output while being parked

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.name = f"{peer[0]}:{peer[1]}"
            sock = transport.get_extra_info("socket")
            if self.console.data.get("nodelay") and sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.console.peers.append(self)
        if self.console.input_full:
            self.transport.pause_reading()
        self._keyboard = self.console.keyboard(self.send)
        if self.console.parking is not None and self.parked is None:
            self.console.spawn(self.park(self.console.parking))

    async def park(self, parking: Parking) -> None:
        """Park it, holding its output meanwhile (none may be waiting: a
        write to a blocking socket that is full would stall qmpvm)."""
        sock = self.transport.get_extra_info("socket")
        if sock is None or self.transport.is_closing() or self.transport.get_write_buffer_size():
            return
        fd = sock.fileno()
        self._held = bytearray()
        try:
            self.parked = await parking.park(fd, f"a client of chardev '{self.console.id}'")
        finally:
            held, self._held = self._held, None
            if not self.transport.is_closing():
                os.set_blocking(fd, False)
                self.send(bytes(held))
        if self.parked is not None and self.transport.is_closing():
            await parking.unpark(self.parked)  # it went while being parked
            self.parked = None

    def data_received(self, data: bytes) -> None:
        if self._keyboard is not None:
            self._keyboard.feed(data)
        else:
            self.console.write_input(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._keyboard is not None:
            self._keyboard.close()
        parking = self.console.parking  # None: qmpvm is going, the engine keeps it
        if parking is not None and self.parked is not None:
            self.console.spawn(parking.unpark(self.parked))
            self.parked = None
        with contextlib.suppress(ValueError):
            self.console.peers.remove(self)

    def send(self, chunk: bytes) -> None:
        waiting = self.transport.get_write_buffer_size() + len(self._held or b"")
        if waiting > CLIENT_LAG:
            log.warning("console %s: dropped a client with %d bytes unread",
                        self.console.id, waiting)  # fmt: skip
            sock = self.transport.get_extra_info("socket")
            with contextlib.suppress(OSError):  # the engine's parked copy must not keep it
                sock.shutdown(socket.SHUT_RDWR)
            self.transport.abort()
        elif self._held is not None:
            self._held += chunk
        elif chunk:
            self.transport.write(chunk)
