"""Consoles qmpvm owns: the engine's FIFOs on one side, on the other the
backend the user asked for (socket clients, a ringbuf, a file, nothing).

A ``Console`` lives as long as its chardev is configured; its I/O is opened
for each engine (``open``) and closed when that engine is gone (``close``),
so its history carries over the guest's power-off, the engine's death and a
rebuilt machine.  Listening sockets follow the engine, as in QEMU: they are
bound when a machine starts and removed when it is gone; while it runs, any
number of clients may attach, each reading the output and writing input.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import shutil
import socket
import tempfile
import termios
import threading
import tty
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qmpvm.config.chardev import backend_of
from qmpvm.config.model import Config
from qmpvm.config.resource import Kind
from qmpvm.errors import EngineError
from qmpvm.fds import FdRegistry
from qmpvm.host.console_output import ConsoleLog, History, Ring
from qmpvm.host.console_wiring import (
    filename,
    monitor_specs,
    owns,
    ring_size,
    socket_address,
    stem,
)
from qmpvm.host.hmp import Execute, Keyboard, MonitorSpec
from qmpvm.monitor.early import bind_unix

log = logging.getLogger(__name__)

PIPE_SIZE = 1024 * 1024
"""The FIFOs' capacity: the guest's output while no qmpvm reads (a restart)."""
CLIENT_LAG = 1024 * 1024
"""A client with this much output unread is dropped, so one that does not
read can neither hold the guest back nor grow qmpvm's memory."""
INPUT_PENDING = 64 * 1024
"""Input the guest has not taken yet; beyond this, clients' input waits."""
READ_CHUNK = 65536


class Console:
    """One owned chardev: its output history, and its I/O while an engine runs."""

    def __init__(
        self, args: Mapping[str, object], log_dir: Path | None, fds: FdRegistry | None = None
    ) -> None:
        self.args = args
        self._fds = fds or FdRegistry()  # what a /dev/fdset/N path opens
        self.id = str(args["id"])
        self.backend, self.data = backend_of(args)
        self.fifo_stem = ""  # set when it opens, in the FIFO directory of that engine
        self.log = ConsoleLog(log_dir, stem(self.id)) if log_dir is not None else None
        self.history = History()
        if self.log is not None:
            self.log.restore(self.history)
        self.ring: Ring | None = None
        if self.backend in ("ringbuf", "memory"):
            self.ring = Ring(ring_size(args), self._unread_ring())
        self._out: int | None = None
        self._in: int | None = None
        self._pending = bytearray()
        self._peers: list[_Peer] = []
        self._server: asyncio.AbstractServer | None = None
        self._bound: tuple[int, int] | None = None  # our socket file's (device, inode)
        self._file: int | None = None
        self._terminal: _Terminal | None = None
        self.monitor: MonitorSpec | None = None  # an HMP monitor on it (set before opening)
        self.execute: Execute | None = None  # how that monitor runs commands

    def keyboard(self, show: typing.Callable[[bytes], None]) -> Keyboard | None:
        """A source's keys, when a monitor is on the console (``show``: that
        source's output); None: they all go to the guest."""
        if self.monitor is None or self.execute is None:
            return None
        keyboard = Keyboard(
            self.monitor, chardev=self.id, to_guest=self.write_input, show=show,
            execute=self.execute,
        )  # fmt: skip
        keyboard.start()
        return keyboard

    def _unread_ring(self) -> bytes:
        """A ringbuf's buffer as the log left it: what was printed since the last read."""
        if self.log is None or self.log.read_to is None:
            return self.history.tail()
        return self.history.tail(max(0, self.history.end - self.log.read_to))

    @property
    def is_open(self) -> bool:
        return self._out is not None

    def filename(self) -> str:
        return filename(self.args, [peer.name for peer in self._peers])

    # -- opening and closing, per engine ---------------------------------

    async def open(self, directory: Path, *, existing: bool = False) -> None:
        """Make the FIFOs in ``directory`` (``existing``: find those an engine
        taken over has open) and start serving.  EngineError, with nothing
        left open, if the host refuses a path."""
        self.fifo_stem = path = str(directory / stem(self.id))
        try:
            if not existing:
                for suffix in (".in", ".out"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path + suffix)
                    os.mkfifo(path + suffix, 0o600)
            flags = os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
            path = self.fifo_stem + ".out"
            self._out = os.open(path, flags)
            path = self.fifo_stem + ".in"
            self._in = os.open(path, flags)
            for fd in (self._out, self._in):
                with contextlib.suppress(OSError):  # a smaller pipe only holds less
                    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            path = self.host_path()
            await self._serve(existing=existing)
        except (OSError, ValueError) as err:
            if not existing or self._out is None:
                self.close(remove=not existing)
                raise EngineError(
                    f"chardev '{self.id}': cannot open '{path}': {_reason(err)}"
                ) from err
            # taken over: the guest's output is still read (and kept), or it
            # would fill the FIFO and hold the guest's UART; only the backend is lost
            log.warning("chardev '%s': cannot open '%s' again: %s; its output is kept "
                        "in the history only", self.id, path, _reason(err))  # fmt: skip
        asyncio.get_running_loop().add_reader(self._out, self._on_output)

    def host_path(self) -> str:
        """What the backend opens on the host: a file, a socket path or
        HOST:PORT; the FIFOs' stem for a backend that opens nothing."""
        if self.backend == "file":
            return str(self.data["out"])
        if self.backend != "socket":
            return self.fifo_stem
        _kind, where = socket_address(self.data)
        if "path" in where:
            return str(where["path"])
        return f"{where.get('host', '')}:{where.get('port')}"

    async def _serve(self, *, existing: bool) -> None:
        """Open the backend's host side (``existing``: again, for an engine
        taken over: a file console appends, as its engine never stopped)."""
        loop = asyncio.get_running_loop()
        if self.backend == "file":
            mode = os.O_APPEND if self.data.get("append") or existing else os.O_TRUNC
            flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | mode
            self._file = self._fds.open(self.host_path(), flags)
        elif self.backend == "stdio":
            self._terminal = _Terminal(self, signals=self.data.get("signal", True) is not False)
        elif self.backend == "socket" and socket_address(self.data)[0] == "unix":
            path = self.host_path()
            raw = bind_unix(path)
            listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=raw.detach())
            found = os.stat(path)
            self._bound = (found.st_dev, found.st_ino)
            self._server = await loop.create_unix_server(lambda: _Peer(self), sock=listening)
        elif self.backend == "socket":
            _kind, where = socket_address(self.data)
            host, port = str(where.get("host", "")) or None, int(str(where["port"]))
            self._server = await loop.create_server(lambda: _Peer(self), host, port)

    def give_to(self, uid: int, gid: int) -> None:
        """Make the FIFOs the engine's user's, for an engine that is not root."""
        for suffix in (".in", ".out"):
            os.chown(self.fifo_stem + suffix, uid, gid)

    def close(self, *, remove: bool) -> None:
        """Stop serving: clients go, the socket file too (if it is still ours);
        ``remove``: the FIFOs as well (no engine has them any more)."""
        loop = asyncio.get_running_loop()
        for fd in (self._out, self._in):
            if fd is not None:
                loop.remove_reader(fd)
                loop.remove_writer(fd)
                os.close(fd)
        self._out = self._in = None
        self._pending.clear()
        for peer in list(self._peers):
            peer.transport.abort()
        self._peers.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._bound is not None:
            _unlink_if_ours(self.host_path(), self._bound)
            self._bound = None
        if self._file is not None:
            os.close(self._file)
            self._file = None
        if self._terminal is not None:
            self._terminal.close()
            self._terminal = None
        if self.log is not None:
            self.log.close()
        if remove and self.fifo_stem:
            for suffix in (".in", ".out"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.fifo_stem + suffix)

    def drain(self) -> None:
        """Take what the engine wrote and nobody read yet (it is gone now)."""
        while self._out is not None and self._read_once():
            pass

    # -- output and input ------------------------------------------------

    def _on_output(self) -> None:
        self._read_once()

    def _read_once(self) -> bool:
        assert self._out is not None
        try:
            chunk = os.read(self._out, READ_CHUNK)
        except BlockingIOError:
            return False
        except OSError as err:
            log.warning("console %s: reading the engine's output failed: %s", self.id, err)
            asyncio.get_running_loop().remove_reader(self._out)
            return False
        if chunk:
            self.deliver(chunk)
        return bool(chunk)

    def deliver(self, chunk: bytes) -> None:
        """Output from the guest: into the history, the log and the backend."""
        self.history.append(chunk)
        if self.log is not None:
            self.log.append(chunk)
        if self.ring is not None:
            self.ring.write(chunk)
        if self._terminal is not None:
            self._terminal.send(chunk)
        if self._file is not None:
            try:
                os.write(self._file, chunk)
            except OSError as err:
                log.warning("console %s: writing its file failed: %s", self.id, err)
        for peer in list(self._peers):
            peer.send(chunk)

    def read_ring(self, size: int) -> bytes:
        """``ringbuf-read``: consumed, and noted in the log for the next qmpvm."""
        assert self.ring is not None
        taken = self.ring.read(size)
        if self.log is not None:
            self.log.note_read(max(0, self.history.end - len(self.ring.data)))
        return taken

    def write_input(self, data: bytes) -> None:
        """Input for the guest; dropped with no engine, as a chardev with no
        frontend drops it."""
        if self._in is None:
            return
        if not self._pending:
            try:
                written = os.write(self._in, data)
            except BlockingIOError:
                written = 0
            except OSError as err:
                log.warning("console %s: writing input failed: %s", self.id, err)
                return
            data = data[written:]
            if not data:
                return
            asyncio.get_running_loop().add_writer(self._in, self._flush_input)
        self._pending += data
        if len(self._pending) >= INPUT_PENDING:
            for peer in self._peers:
                peer.transport.pause_reading()

    def _flush_input(self) -> None:
        assert self._in is not None
        try:
            written = os.write(self._in, self._pending)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._pending)
        del self._pending[:written]
        if not self._pending:
            asyncio.get_running_loop().remove_writer(self._in)
            for peer in self._peers:
                peer.transport.resume_reading()
            if self._terminal is not None:
                self._terminal.resume()


class _Terminal:
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
        if len(self._console._pending) >= INPUT_PENDING:
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


class _Peer(asyncio.Protocol):
    """One client of a console's listening socket."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.transport: asyncio.Transport = typing.cast(asyncio.Transport, None)
        self.name = ""
        self._keyboard: Keyboard | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.name = f"{peer[0]}:{peer[1]}"
            sock = transport.get_extra_info("socket")
            if self.console.data.get("nodelay") and sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.console._peers.append(self)
        if len(self.console._pending) >= INPUT_PENDING:
            self.transport.pause_reading()
        self._keyboard = self.console.keyboard(self.send)

    def data_received(self, data: bytes) -> None:
        if self._keyboard is not None:
            self._keyboard.feed(data)
        else:
            self.console.write_input(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._keyboard is not None:
            self._keyboard.close()
        with contextlib.suppress(ValueError):
            self.console._peers.remove(self)

    def send(self, chunk: bytes) -> None:
        if self.transport.get_write_buffer_size() > CLIENT_LAG:
            log.warning("console %s: dropped a client with %d bytes unread",
                        self.console.id, self.transport.get_write_buffer_size())  # fmt: skip
            self.transport.abort()
            return
        self.transport.write(chunk)


class Consoles:
    """Every owned console, by chardev id.  The FIFOs are in a directory of
    their own (``fifo_dir``, in the temporary directory, mode 0711 so that an
    unprivileged engine reaches them; an outliving engine's record names it);
    the logs, with ``--state-dir``, in ``STATE/consoles``."""

    def __init__(self, state_dir: Path | None, fds: FdRegistry | None = None) -> None:
        self._log_dir = state_dir / "consoles" if state_dir is not None else None
        self._fds = fds
        self.fifo_dir: Path | None = None
        self.by_id: dict[str, Console] = {}
        self.execute: Execute | None = None  # how their HMP monitors run commands

    def directory(self) -> Path:
        """The FIFO directory, made on first use."""
        if self.fifo_dir is None:
            try:
                # TMPDIR named, not probed (probing needs descriptors to spare)
                where = os.environ.get("TMPDIR") or "/tmp"
                made = Path(tempfile.mkdtemp(prefix="qmpvm-consoles-", dir=where))
                made.chmod(0o711)
            except OSError as err:
                raise EngineError(f"cannot start the engine: consoles' directory: {err}") from err
            self.fifo_dir = made
        return self.fifo_dir

    def console(self, chardev_id: str, config: Config | None = None) -> Console | None:
        """The console of a chardev qmpvm serves; with ``config``, also one
        no machine has used yet (its history comes from the log, if any)."""
        found = self.by_id.get(chardev_id)
        if found is None and config is not None:
            resource = config.find(Kind.CHARDEV, chardev_id)
            if resource is not None and owns(resource.args):
                found = self._for(resource.args)
        return found

    def _for(self, args: Mapping[str, object]) -> Console:
        """The console of this chardev, kept if its definition is the same
        (a changed one starts afresh from the log: the log goes only with
        the chardev, ``forget``)."""
        chardev_id = str(args["id"])
        found = self.by_id.get(chardev_id)
        if found is None or found.args != args:
            if found is not None:
                found.close(remove=True)
            if self._log_dir is not None:
                self._log_dir.mkdir(mode=0o700, exist_ok=True)
            found = self.by_id[chardev_id] = Console(args, self._log_dir, self._fds)
        return found

    async def open_all(self, config: Config, *, taken_over: Path | None = None) -> list[Console]:
        """Serve every owned chardev of ``config`` for an engine about to start,
        or (``taken_over``: its FIFO directory) one an earlier qmpvm left.  A
        console that cannot be opened fails the start, with the others closed
        again; one an engine taken over has lost is left closed, with a warning."""
        monitors = monitor_specs(config)
        if taken_over is not None:
            self.fifo_dir = taken_over
        owned = [r.args for r in config.of_kind(Kind.CHARDEV) if owns(r.args)]
        opened: list[Console] = []
        for args in owned:
            console = self._for(args)
            console.monitor, console.execute = monitors.get(console.id), self.execute
            try:
                await console.open(self.directory(), existing=taken_over is not None)
            except EngineError as err:
                if taken_over is not None:  # its FIFOs are gone: nothing reads the guest's
                    log.warning("%s: the guest's output there is not read", err)
                    continue
                self.close_all(remove=True)
                raise
            except BaseException:
                self.close_all(remove=taken_over is None)
                raise
            opened.append(console)
        return opened

    async def open_one(self, args: Mapping[str, object]) -> Console:
        """A chardev hot-plugged, served before the engine gets it."""
        console = self._for(args)
        await console.open(self.directory())
        return console

    def engine_gone(self) -> None:
        """The engine ended: keep what it printed last, close the rest."""
        for console in self.by_id.values():
            if console.is_open:
                console.drain()
        self.close_all(remove=True)

    def close_all(self, *, remove: bool) -> None:
        for console in self.by_id.values():
            console.close(remove=remove)

    def forget(self, chardev_id: str) -> None:
        """The chardev left the configuration: its console and log go too."""
        console = self.by_id.pop(chardev_id, None)
        if console is not None:
            console.close(remove=True)
        if self._log_dir is not None:
            ConsoleLog(self._log_dir, stem(chardev_id)).remove()

    def remove_fifo_dir(self) -> None:
        """At exit with no engine left running: the FIFO directory."""
        if self.fifo_dir is not None:
            shutil.rmtree(self.fifo_dir, ignore_errors=True)
            self.fifo_dir = None


def _reason(err: Exception) -> str:
    return (err.strerror if isinstance(err, OSError) else None) or str(err)


def _unlink_if_ours(path: str, bound: tuple[int, int]) -> None:
    """Remove our socket file, not one another process bound there since
    (a migration's destination on this host takes the same path)."""
    with contextlib.suppress(OSError):
        found = os.lstat(path)
        if (found.st_dev, found.st_ino) == bound:
            os.unlink(path)
