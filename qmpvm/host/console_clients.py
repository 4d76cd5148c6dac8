"""The clients of a console qmpvm serves: its terminal (``stdio``), its
listening sockets and their connections, its pty.

Descriptors parked in the engine (``qmpvm.host.parking``) come back from
QEMU's ``getfd`` blocking: O_NONBLOCK belongs to the open file, which the
engine shares, and QEMU clears it on every descriptor it receives.  So a
listener accepts one connection per readiness, and a connection or a pty
holds its output while it is being parked; all are made non-blocking again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import select
import socket
import sys
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
        self._console.take_keys(self._keyboard, data)
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
            local = transport.get_extra_info("sockname")
            if self.console.dials and isinstance(local, tuple):  # QEMU's: LOCAL <-> REMOTE
                self.name = f"{local[0]}:{local[1]} <-> {self.name}"
            sock = transport.get_extra_info("socket")
            if self.console.data.get("nodelay") and sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif self.console.dials:
            self.name = "connected"
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
        self.console.take_keys(self._keyboard, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._keyboard is not None:
            self._keyboard.close()
        parking = self.console.parking  # None: qmpvm is going, the engine keeps it
        if parking is not None and self.parked is not None:
            self.console.spawn(parking.unpark(self.parked))
            self.parked = None
        self.console.peer_gone(self)

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


class PtyMaster:
    """A ``pty`` console: qmpvm holds the master, a client opens ``path``.

    As in QEMU, output is dropped while no client has the slave open, which
    is noticed by polling once a second (a master has no event for a slave
    opening); output a slow client has not taken waits (``CLIENT_LAG`` at
    most).  ``fd``: a master an engine taken over kept, ``parked`` its name.
    """

    POLL = 1.0

    def __init__(self, console: Console, fd: int | None = None, parked: str | None = None) -> None:
        self.console = console
        if fd is None:
            fd, slave = os.openpty()
            tty.setraw(slave)  # as QEMU: no echo, no line editing, 8 bits
            os.close(slave)
        os.set_blocking(fd, False)
        self.fd = fd
        self.path = pty_path(fd)
        self.parked = parked
        self._keyboard = console.keyboard(self.send)
        self._out = bytearray()
        self._connected = False
        self._holding = False  # being parked: nothing is written
        self._timer: asyncio.TimerHandle | None = None
        self._check()

    def _check(self) -> None:
        """Whether a client has the slave open (no hang-up on the master)."""
        self._timer = None
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        hung_up = any(events & select.POLLHUP for _fd, events in poller.poll(0))
        loop = asyncio.get_running_loop()
        if hung_up:
            self._disconnected()
        elif not self._connected:
            self._connected = True
            loop.add_reader(self.fd, self._read)

    def _disconnected(self) -> None:
        loop = asyncio.get_running_loop()
        if self._connected:
            loop.remove_reader(self.fd)
            loop.remove_writer(self.fd)
        self._connected = False
        self._out.clear()
        if self._timer is None:  # one poll at a time
            self._timer = loop.call_later(self.POLL, self._check)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError:  # EIO: the last client closed the slave
            data = b""
        if not data:
            self._disconnected()
        else:
            self.console.take_keys(self._keyboard, data)

    def send(self, chunk: bytes) -> None:
        if not self._connected:
            return  # nobody there: QEMU drops it too (the history keeps it)
        if len(self._out) + len(chunk) > CLIENT_LAG:
            return  # the client does not read: the guest goes on
        self._out += chunk
        self._flush()

    def _flush(self) -> None:
        if self._holding or not self._out:
            return
        try:
            written = os.write(self.fd, self._out)
        except BlockingIOError:
            written = 0
        except OSError:
            self._disconnected()
            return
        del self._out[:written]
        loop = asyncio.get_running_loop()
        if self._out:
            loop.add_writer(self.fd, self._flush)
        else:
            loop.remove_writer(self.fd)

    async def park(self, parking: Parking) -> None:
        """Park the master, so the pty keeps its name across a restart; it
        is not written while QEMU has made it blocking."""
        self._holding = True
        asyncio.get_running_loop().remove_writer(self.fd)
        try:
            self.parked = await parking.park(self.fd, f"chardev '{self.console.id}' pty")
        finally:
            self._holding = False
            if self.fd >= 0:
                os.set_blocking(self.fd, False)
                self._flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._keyboard is not None:
            self._keyboard.close()
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.fd)
        loop.remove_writer(self.fd)
        os.close(self.fd)
        self.fd = -1


TIOCGPTN = 0x80045430
"""_IOR('T', 0x30, unsigned int): a master's pty number (Python 3.11's
termios lacks it; the value is that of every architecture but the few
with their own ioctl encoding)."""


def pty_path(master: int) -> str:
    """The slave's path of a pty master."""
    number = fcntl.ioctl(master, TIOCGPTN, b"\0" * 4)
    return f"/dev/pts/{int.from_bytes(number, sys.byteorder)}"
