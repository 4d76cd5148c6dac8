"""The monitor's first milliseconds: listen and greet before the rest loads.

QEMU greets a client about 30 ms after it starts; importing asyncio and the
command modules takes Python three times that.  So the process entry point
binds the ``-qmp`` listeners and greets every connection from a thread,
using only built-in modules (``_socket``, ``_thread``: ``socket`` and
``threading`` alone would cost 10-15 ms here), while the main thread
imports the rest.  Once the asyncio server runs, it takes over the
listeners and the connections already greeted (``EarlyMonitor.handoff``);
their first commands simply wait in the socket until then.

This module must stay cheap to import: no json, typing, dataclasses or
asyncio (``tests/monitor/test_early.py`` checks).
"""

from __future__ import annotations

import _socket
import _thread
import os
import select
import stat
import sys

from qmpvm import QEMU_VERSION, __version__

TYPE_CHECKING = False  # typing itself costs 3 ms to import
if TYPE_CHECKING:
    import socket

BACKLOG = 128

_NO_EARLY_MONITOR = frozenset({"-h", "-help", "-version", "-print-qmp", "-daemonize"})
_PROCESS_FLAGS = frozenset({"-allow-host-programs", "-allow-insecure-tcp"})
"""Options after which nothing is served early: qmpvm exits, or forks first."""

FLAGS = _NO_EARLY_MONITOR | _PROCESS_FLAGS | {
    "-S", "-preconfig", "-v", "-verbose", "-nographic", "-enable-kvm", "-nodefaults",
    "-no-user-config", "-no-shutdown", "-no-reboot", "-no-acpi", "-no-hpet", "-usb",
    "-snapshot", "-mem-prealloc", "-s", "-audio-help", "-only-migratable", "-singlestep",
    "-win2k-hack", "-no-fd-bootchk", "-async-teardown", "-enable-sync-profile",
    "-full-screen", "-portrait", "-xen-attach", "-xen-domid-restrict",
}  # fmt: skip
"""The command-line options that take no value (``cli`` handles each)."""


class Listener:
    """Where one monitor is served: a UNIX path or a TCP host and port to listen
    on, an inherited socket (kind ``fd``, its number in ``path``: listening, or
    one connection), or a UNIX path to dial (kind ``connect``).  A TCP monitor
    may name QEMU's TLS objects (``tls-creds``, ``tls-authz`` ids); ``tls``
    then holds what they say (``qmpvm.monitor.tls.TlsServer``)."""

    __slots__ = ("host", "kind", "path", "port", "tls", "tls_authz", "tls_creds")

    def __init__(
        self,
        kind: str,
        *,
        path: str = "",
        host: str = "",
        port: int = 0,
        tls_creds: str = "",
        tls_authz: str = "",
    ) -> None:
        self.kind, self.path, self.host, self.port = kind, path, host, port
        self.tls_creds, self.tls_authz = tls_creds, tls_authz
        self.tls: object = None

    @property
    def loopback(self) -> bool:
        """Only this host can connect (a UNIX socket, or TCP on a loopback address)."""
        if self.kind != "tcp":
            return True
        return self.host in {"localhost", "::1"} or self.host.startswith("127.")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Listener) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self.kind == "tcp" else self.path
        return f"Listener({self.kind}:{where})"

    def _key(self) -> tuple[str, str, str, int, str, str]:
        return (self.kind, self.path, self.host, self.port, self.tls_creds, self.tls_authz)


def parse_qmp_spec(spec: str) -> Listener:
    """``unix:PATH[,server=on][,wait=off]`` or ``tcp:HOST:PORT[,...]``; ValueError says why."""
    kind, _, rest = spec.partition(":")
    where, *params = rest.split(",")
    tls = {"tls-creds": "", "tls-authz": ""}
    for param in params:
        key, _, value = param.partition("=")
        if key == "server" and value not in ("on", ""):
            raise ValueError(f"-qmp {spec}: only server=on is supported")
        if key == "wait" and value in ("on", "yes", "true"):
            raise ValueError(f"-qmp {spec}: qmpvm serves at once and never waits; use wait=off")
        if key in tls and kind == "tcp" and value:
            tls[key] = value
        elif key not in ("server", "wait", "nowait"):
            raise ValueError(f"-qmp {spec}: unknown parameter '{key}'")
    if kind == "unix" and where:
        return Listener("unix", path=where)
    if kind == "tcp":
        host, _, port = where.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"-qmp {spec}: expected tcp:HOST:PORT")
        return Listener(  # no host: every address, as QEMU listens
            "tcp", host=host.strip("[]") or "0.0.0.0", port=int(port),
            tls_creds=tls["tls-creds"], tls_authz=tls["tls-authz"],
        )  # fmt: skip
    raise ValueError(f"-qmp {spec}: expected unix:PATH or tcp:HOST:PORT")


def scan_listeners(argv: list[str]) -> list[Listener]:
    """The ``-qmp`` listeners of a command line that serves, else none.

    A quick pass that only trusts what it fully understands: anything odd
    (a subcommand, --help, an option missing its value, a bad -qmp) gives
    an empty list, and the full parse in ``cli`` reports it as usual.
    """
    listeners = []
    args = iter(argv)
    for raw in args:
        if not raw.startswith("-"):
            return []
        option = "-" + raw.lstrip("-")
        if option in _NO_EARLY_MONITOR:
            return []
        if option in FLAGS:
            continue
        value = next(args, None)
        if value is None:
            return []
        if option == "-qmp":
            try:
                listener = parse_qmp_spec(value)
            except ValueError:
                return []
            if listener.tls_creds or not listener.loopback:
                return []  # TLS and the policy for other hosts are cli's to apply
            listeners.append(listener)
    return listeners


def greeting_line() -> bytes:
    """QMP's greeting, byte for byte as ``protocol.encode`` would write it."""
    major, minor, micro = QEMU_VERSION
    return (
        f'{{"QMP": {{"version": {{"qemu": {{"major": {major}, "minor": {minor}, '
        f'"micro": {micro}}}, "package": "qmpvm {__version__}"}}, "capabilities": []}}}}\r\n'
    ).encode()


def bind(listener: Listener) -> _socket.socket:
    """A listening socket; a UNIX one is mode 0600 and appears only once it listens."""
    if listener.kind == "unix":
        return bind_unix(listener.path)
    if listener.kind == "fd":
        sock = _socket.socket(fileno=int(listener.path))
        sock.listen(BACKLOG)  # libvirt passes it listening; listening again is harmless
        return sock
    family = _socket.AF_INET6 if ":" in listener.host else _socket.AF_INET
    sock = _socket.socket(family, _socket.SOCK_STREAM)
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        sock.bind((listener.host, listener.port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def socket_path_free(path: str) -> bool:
    """Whether a listening socket may take ``path``: nothing is there, or a
    (stale) socket is; binding replaces it, and must never replace a file."""
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return True  # nothing there (or nothing to see: binding says why)


def bind_unix(path: str) -> _socket.socket:
    """A listening socket at ``path`` (mode 0600), replacing a stale socket
    there in one step, never another kind of file."""
    if not socket_path_free(path):
        raise OSError(f"{path} exists and is not a socket")
    staging = f"{path}.{os.getpid()}.tmp"
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(staging)
        sock.listen(BACKLOG)
        os.replace(staging, path)
    except OSError:
        sock.close()
        _unlink(staging)
        raise
    finally:
        os.umask(old)
    return sock


def unbind(sock: _socket.socket, listener: Listener) -> None:
    sock.close()
    if listener.kind == "unix":
        _unlink(listener.path)


def _unlink(path: str) -> None:
    try:  # noqa: SIM105 (contextlib costs 5 ms to import)
        os.unlink(path)
    except OSError:
        pass


class EarlyMonitor:
    """Bound listeners and a thread greeting whoever connects, until handoff."""

    #: While importing, the main thread holds the GIL for up to this long
    #: before the greeter may run; the default (5 ms) would show.
    SWITCH_INTERVAL = 0.0005

    def __init__(self, listeners: list[Listener]) -> None:
        """Bind every listener, or none: an OSError leaves nothing behind."""
        self.listeners: list[tuple[_socket.socket, Listener]] = []
        try:
            for listener in listeners:
                self.listeners.append((bind(listener), listener))
        except OSError:
            for sock, bound in self.listeners:
                unbind(sock, bound)
            raise
        for sock, _listener in self.listeners:
            sock.setblocking(False)  # a client gone before accept must not block the greeter
        self.greeted: list[tuple[int, str]] = []
        self._greeting = greeting_line()
        self._wake_read, self._wake_write = os.pipe()
        self._running = _thread.allocate_lock()
        self._running.acquire()
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(self.SWITCH_INTERVAL)
        _thread.start_new_thread(self._greet_loop, ())

    def _greet_loop(self) -> None:
        try:
            poller = select.poll()
            by_fd = {sock.fileno(): sock for sock, _ in self.listeners}
            for fd in (*by_fd, self._wake_read):
                poller.register(fd, select.POLLIN)
            while True:
                ready = [fd for fd, _events in poller.poll()]
                if self._wake_read in ready:
                    return
                for fd in ready:
                    self._greet(by_fd[fd])
        finally:
            self._running.release()

    def _greet(self, listener: _socket.socket) -> None:
        try:
            fd, addr = listener._accept()  # type: ignore[attr-defined]  # no stub
        except OSError:
            return  # the client left already
        try:
            data = self._greeting
            while data:
                data = data[os.write(fd, data) :]
        except OSError:
            os.close(fd)
            return
        self.greeted.append((fd, str(addr) or "unix"))

    def handoff(
        self,
    ) -> tuple[list[tuple[socket.socket, Listener]], list[tuple[socket.socket, str]]]:
        """Stop greeting; the listeners, and the connections already greeted."""
        import socket

        self._stop()
        listeners = [(socket.socket(fileno=s.detach()), where) for s, where in self.listeners]
        greeted = [(socket.socket(fileno=fd), peer) for fd, peer in self.greeted]
        self.listeners, self.greeted = [], []
        return listeners, greeted

    def close(self) -> None:
        """For an exit before the server took over: nothing is left behind."""
        self._stop()
        for sock, listener in self.listeners:
            unbind(sock, listener)
        for fd, _peer in self.greeted:
            os.close(fd)
        self.listeners, self.greeted = [], []

    def _stop(self) -> None:
        if self._wake_write < 0:
            return
        os.write(self._wake_write, b"x")
        with self._running:
            pass
        os.close(self._wake_read)
        os.close(self._wake_write)
        self._wake_write = -1
        sys.setswitchinterval(self._switch_interval)
