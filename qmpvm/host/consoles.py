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
import functools
import logging
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qmpvm.config.chardev import backend_of
from qmpvm.config.model import Config
from qmpvm.config.resource import Kind
from qmpvm.errors import EngineError
from qmpvm.fds import FdRegistry
from qmpvm.host.console_clients import Listener, Peer, PtyMaster, Terminal, pty_path
from qmpvm.host.console_output import ConsoleLog, History, Ring
from qmpvm.host.console_wiring import (
    filename,
    monitor_specs,
    ring_size,
    served,
    socket_address,
    stem,
)
from qmpvm.host.hmp import Execute, Keyboard, MonitorSpec
from qmpvm.host.parking import Parking, park_name
from qmpvm.monitor.early import bind_unix

log = logging.getLogger(__name__)

PIPE_SIZE = 1024 * 1024
"""The FIFOs' capacity: the guest's output while no qmpvm reads (a restart)."""
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
        self.peers: list[Peer] = []
        self._listeners: list[Listener] = []
        self._bound: tuple[int, int] | None = None  # our socket file's (device, inode)
        self._file: int | None = None
        self._logfile: int | None = None  # the chardev's own ``logfile``
        self._terminal: Terminal | None = None
        self._pty: PtyMaster | None = None
        # a connecting socket (``server=off``), not a listening one
        self.dials = self.backend == "socket" and not self.data.get("server", True)
        self._redial: asyncio.TimerHandle | None = None  # ``reconnect`` after seconds
        self.monitor: MonitorSpec | None = None  # an HMP monitor on it (set before opening)
        self.execute: Execute | None = None  # how that monitor runs commands
        self.parking: Parking | None = None  # while its host side is parked in an engine
        self._tasks: set[asyncio.Task[None]] = set()

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

    def take_keys(self, keyboard: Keyboard | None, data: bytes) -> None:
        """A source's keys: to its ``keyboard`` when a monitor is on the
        console, else to the guest."""
        if keyboard is not None:
            keyboard.feed(data)
        else:
            self.write_input(data)

    def _unread_ring(self) -> bytes:
        """A ringbuf's buffer as the log left it: what was printed since the last read."""
        if self.log is None or self.log.read_to is None:
            return self.history.tail()
        return self.history.tail(max(0, self.history.end - self.log.read_to))

    @property
    def is_open(self) -> bool:
        return self._out is not None

    def filename(self) -> str:
        pty = self._pty.path if self._pty is not None else ""
        return filename(self.args, [peer.name for peer in self.peers], pty)

    def peer_gone(self, peer: Peer) -> None:
        """A client went; a connecting socket with ``reconnect`` dials again
        that many seconds later, as QEMU (without, it stays disconnected)."""
        with contextlib.suppress(ValueError):
            self.peers.remove(peer)
        if self.dials and self.is_open and not self.peers:
            self._dial_later()

    async def _dial(self) -> None:
        """Connect a connecting socket (``server=off``): OSError if it cannot
        and has no ``reconnect``, else it tries again later."""
        self._redial = None
        loop = asyncio.get_running_loop()
        kind, where = socket_address(self.data)
        try:
            if kind == "unix":
                await loop.create_unix_connection(lambda: Peer(self), str(where["path"]))
            else:
                host = str(where.get("host") or "localhost")
                await loop.create_connection(lambda: Peer(self), host, int(str(where["port"])))
        except OSError as err:
            if not self.data.get("reconnect"):
                raise
            log.info("chardev '%s': cannot connect to %s: %s; trying again in %s s",
                     self.id, self.host_path(), _reason(err), self.data["reconnect"])  # fmt: skip
            self._dial_later()

    def _dial_later(self) -> None:
        seconds = self.data.get("reconnect")
        if isinstance(seconds, int) and seconds > 0 and self._redial is None:
            loop = asyncio.get_running_loop()
            self._redial = loop.call_later(seconds, lambda: self.spawn(self._redialled()))

    async def _redialled(self) -> None:
        if self.is_open and not self.peers:
            with contextlib.suppress(OSError):  # no reconnect: stays disconnected
                await self._dial()

    @property
    def pty_path(self) -> str | None:
        """A pty console's slave path, while it is open."""
        return self._pty.path if self._pty is not None else None

    @property
    def input_full(self) -> bool:
        """Input waits for the guest: clients are not read until it drains."""
        return len(self._pending) >= INPUT_PENDING

    # -- opening and closing, per engine ---------------------------------

    async def open(
        self, directory: Path, *, existing: bool = False, parked: Sequence[int] = ()
    ) -> None:
        """Make the FIFOs in ``directory`` (``existing``: find those an engine
        taken over has open, and serve on the descriptors it kept, ``parked``,
        those ``takes`` chose) and start serving.  EngineError, with nothing
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
            await self._serve(existing=existing, parked=parked)
        except (OSError, ValueError) as err:
            if not existing or self._out is None:
                self.close(remove=not existing)
                verb = "Failed to connect to" if self.dials else "cannot open"  # QEMU's words
                raise EngineError(f"chardev '{self.id}': {verb} '{path}': {_reason(err)}") from err
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

    async def _serve(self, *, existing: bool, parked: Sequence[int]) -> None:
        """Open the backend's host side (``existing``: again, for an engine
        taken over: a file console appends, as its engine never stopped; a
        socket serves on the listener and clients it kept, ``parked``, and a
        pty on its master)."""
        logfile = self.data.get("logfile")
        if isinstance(logfile, str):  # QEMU's: everything the guest prints
            appending = bool(self.data.get("logappend")) or existing
            self._logfile = self._open_output(logfile, append=appending)
        if self.backend == "pty":
            name = park_name(parked[0]) if parked else None
            self._pty = PtyMaster(self, parked[0] if parked else None, name)
            if not parked:  # QEMU's words, for tools that read them
                print(f"char device redirected to {self._pty.path} (label {self.id})",
                      file=sys.stderr, flush=True)  # fmt: skip
            if self.log is not None:
                self.log.note_pty(self._pty.path)
            return
        if self.backend == "socket" and parked:  # what an engine taken over kept
            await self._serve_kept([socket.socket(fileno=fd) for fd in parked])
            if self._listeners or (self.dials and self.peers):
                return
        if self.dials:
            await self._dial()
        elif self.backend == "file":
            appending = bool(self.data.get("append")) or existing
            self._file = self._open_output(self.host_path(), append=appending)
        elif self.backend == "stdio":
            self._terminal = Terminal(self, signals=self.data.get("signal", True) is not False)
        elif self.backend == "socket" and socket_address(self.data)[0] == "unix":
            path = self.host_path()
            raw = bind_unix(path)
            listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=raw.detach())
            found = os.stat(path)
            self._bound = (found.st_dev, found.st_ino)
            self._listeners.append(Listener(self, listening))
        elif self.backend == "socket":
            _kind, where = socket_address(self.data)
            listening = _listen_inet(str(where.get("host", "")), int(str(where["port"])))
            self._listeners.append(Listener(self, listening))

    def _open_output(self, path: str, *, append: bool) -> int:
        """A file the console writes (its ``file`` or ``logfile``), never
        waited for; appended to, or truncated."""
        mode = os.O_APPEND if append else os.O_TRUNC
        return self._fds.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | mode)

    async def _serve_kept(self, sockets: Sequence[socket.socket]) -> None:
        """Serve on the listeners and connections an engine taken over kept;
        each connection a peer before the FIFO is read, so it misses nothing."""
        loop = asyncio.get_running_loop()
        for found in sockets:
            name = park_name(found.fileno())
            if found.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                if found.family == socket.AF_UNIX:
                    bound = os.stat(self.host_path())
                    self._bound = (bound.st_dev, bound.st_ino)
                self._listeners.append(Listener(self, found, name))
            else:
                peer = functools.partial(Peer, self, name)
                await _connected(loop.connect_accepted_socket(peer, sock=found))

    def adopt(self, conn: socket.socket) -> None:
        """A client a listener accepted."""
        loop = asyncio.get_running_loop()
        self.spawn(_connected(loop.connect_accepted_socket(lambda: Peer(self), sock=conn)))

    def give_to(self, uid: int, gid: int) -> None:
        """Make the FIFOs the engine's user's, for an engine that is not root."""
        for suffix in (".in", ".out"):
            os.chown(self.fifo_stem + suffix, uid, gid)

    def close(self, *, remove: bool) -> None:
        """Stop serving: clients go, the socket file too (if it is still ours);
        ``remove``: the FIFOs as well (no engine has them any more).  Without
        ``remove`` the engine lives on, and what is parked there stays, for
        the next qmpvm: its clients see no change, its socket file stays."""
        parking, self.parking = self.parking, None
        if parking is not None and remove:  # the engine lives on without this console
            for name in self._parked_names():
                self.spawn(parking.unpark(name))
        loop = asyncio.get_running_loop()
        for fd in (self._out, self._in):
            if fd is not None:
                loop.remove_reader(fd)
                loop.remove_writer(fd)
                os.close(fd)
        self._out = self._in = None
        self._pending.clear()
        if self._redial is not None:
            self._redial.cancel()
            self._redial = None
        for peer in list(self.peers):
            peer.transport.abort()
        self.peers.clear()
        kept = any(listener.parked for listener in self._listeners)
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        if self._bound is not None and (remove or not kept):
            _unlink_if_ours(self.host_path(), self._bound)
        self._bound = None
        for fd in (self._file, self._logfile):
            if fd is not None:
                os.close(fd)
        self._file = self._logfile = None
        if self._pty is not None:
            self._pty.close()
            self._pty = None
        if self._terminal is not None:
            self._terminal.close()
            self._terminal = None
        if self.log is not None:
            self.log.close()
        if remove and self.fifo_stem:
            for suffix in (".in", ".out"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.fifo_stem + suffix)

    # -- parking in the engine -------------------------------------------

    async def park_all(self, parking: Parking) -> None:
        """Park the host side in the engine (``qmpvm.host.parking``): the
        listener and the clients not parked yet; new clients as they come."""
        self.parking = parking
        for holder in self._holders():
            if holder.parked is None:
                await holder.park(parking)

    def _holders(self) -> list[Listener | Peer | PtyMaster]:
        """What of this console can be parked."""
        return [*self._listeners, *self.peers, *([self._pty] if self._pty else [])]

    def _parked_names(self) -> list[str]:
        return [h.parked for h in self._holders() if h.parked is not None]

    def takes(self, fd: int) -> bool:
        """Whether a descriptor an engine taken over kept is this console's:
        its listener or a client of it (a socket bound to this console's
        address), or its pty's master (of the path its log noted)."""
        mode = os.fstat(fd).st_mode
        if self.backend == "pty" and stat.S_ISCHR(mode):
            with contextlib.suppress(OSError):
                return self.log is not None and self.log.pty == pty_path(fd)
            return False
        if self.backend != "socket" or not stat.S_ISSOCK(mode):
            return False
        kind, where = socket_address(self.data)
        found = socket.socket(fileno=fd)
        try:  # a connecting socket's is the server's address, at the other end
            name = found.getpeername() if self.dials else found.getsockname()
            if kind == "unix" and found.family == socket.AF_UNIX:
                path = str(where.get("path"))  # bound as PATH.PID.tmp, then renamed
                return bool(name == path or re.fullmatch(re.escape(path) + r"\.\d+\.tmp", name))
            if kind == "inet" and found.family in (socket.AF_INET, socket.AF_INET6):
                return str(name[1]) == str(where.get("port"))
        except OSError:
            pass
        finally:
            found.detach()
        return False

    def spawn(self, work: typing.Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        if self._pty is not None:
            self._pty.send(chunk)
        if self._logfile is not None:
            with contextlib.suppress(OSError):  # a full disk costs the log, not the guest
                os.write(self._logfile, chunk)
        if self._file is not None:
            try:
                os.write(self._file, chunk)
            except OSError as err:
                log.warning("console %s: writing its file failed: %s", self.id, err)
        for peer in list(self.peers):
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
            for peer in self.peers:
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
            for peer in self.peers:
                peer.transport.resume_reading()
            if self._terminal is not None:
                self._terminal.resume()


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
        self.parking: Parking | None = None  # the engine their host sides are parked in

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
            if resource is not None and served(config, resource.args):
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

    async def open_all(
        self,
        config: Config,
        *,
        taken_over: Path | None = None,
        parked: Sequence[int] = (),
    ) -> list[Console]:
        """Serve every owned chardev of ``config`` for an engine about to start,
        or (``taken_over``: its FIFO directory; ``parked``: copies of its
        sockets, some parked there by an earlier qmpvm) one an earlier qmpvm
        left; the sockets no console takes are closed.  A console
        that cannot be opened fails the start, with the others closed again;
        one an engine taken over has lost is left closed, with a warning."""
        monitors = monitor_specs(config)
        if taken_over is not None:
            self.fifo_dir = taken_over
        owned = [r.args for r in config.of_kind(Kind.CHARDEV) if served(config, r.args)]
        opened: list[Console] = []
        unused = list(parked)
        for args in owned:
            console = self._for(args)
            console.monitor, console.execute = monitors.get(console.id), self.execute
            mine = [fd for fd in unused if console.takes(fd)]
            unused = [fd for fd in unused if fd not in mine]
            try:
                await console.open(self.directory(), existing=taken_over is not None, parked=mine)
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
        for fd in unused:  # the engine's own, or of consoles gone since
            os.close(fd)
        return opened

    async def open_one(self, args: Mapping[str, object]) -> Console:
        """A chardev hot-plugged, served before the engine gets it."""
        console = self._for(args)
        await console.open(self.directory())
        if self.parking is not None:
            await console.park_all(self.parking)
        return console

    async def start_parking(self, parking: Parking) -> None:
        """Park every open console's host side in the engine (with
        ``--state-dir``, where the engine may outlive qmpvm)."""
        self.parking = parking
        for console in self.by_id.values():
            if console.is_open:
                await console.park_all(parking)

    def engine_gone(self) -> None:
        """The engine ended: keep what it printed last, close the rest."""
        for console in self.by_id.values():
            console.parking = None  # gone with the engine: nothing to unpark
            if console.is_open:
                console.drain()
        self.close_all(remove=True)

    def close_all(self, *, remove: bool) -> None:
        self.parking = None
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


def _listen_inet(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host`` (every address when empty, as QEMU)."""
    if not host:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", port))
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _type, _proto, _name, address = found[0]
    return socket.create_server(address[:2], family=family)


async def _connected(connecting: typing.Awaitable[object]) -> None:
    """A client's connection set up; one that went meanwhile is no error."""
    with contextlib.suppress(OSError):
        await connecting
