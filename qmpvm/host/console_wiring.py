"""Which chardevs qmpvm serves itself, and what the engine is given instead.

A console qmpvm owns reaches the engine as a ``pipe`` chardev on two FIFOs,
``STEM.in`` and ``STEM.out``, that the engine opens read-write (QEMU 7.2's
``-chardev file`` cannot take an input file, or the engine would get them as
fdsets).  The engine never sees their other end close, so while qmpvm
restarts under a running guest the output waits in the pipe (1 MiB; beyond
that the guest's UART waits) rather than being dropped, and the next qmpvm
reads on.  The chardev keeps its id, so the devices that name it need no
change.

Owned: ``ringbuf``/``memory``, ``null``, ``stdio`` (qmpvm's own standard
I/O), ``pty``, ``file`` without an input file, and ``socket``s listening on
or connecting to a path or a TCP port without telnet, websocket, TLS or
``wait``.  qmpvm writes their ``logfile`` too.  The rest (``fd=`` sockets,
``udp``, ...) keep QEMU's own semantics in the engine.
Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
import typing
from collections.abc import Iterable, Mapping, Sequence

from qmpvm.config.chardev import backend_of
from qmpvm.config.machine import as_object
from qmpvm.config.resource import Kind
from qmpvm.errors import ArgumentError, ConfigError
from qmpvm.host.hmp import ESCAPE_DEFAULT, MonitorSpec

if typing.TYPE_CHECKING:
    from qmpvm.config.model import Config

RING_DEFAULT = 65536
_ENGINE_ONLY_SOCKET = ("telnet", "tn3270", "websocket", "tls-creds", "tls-authz")
_SAFE_STEM = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")


def owns(args: Mapping[str, object]) -> bool:
    """Whether qmpvm serves this stored chardev-add itself."""
    backend, data = backend_of(args)
    if backend in ("ringbuf", "memory", "null", "stdio", "pty"):
        return True
    if backend == "file":
        return "in" not in data
    if backend != "socket" or data.get("wait", False):
        return False
    if any(data.get(option) for option in _ENGINE_ONLY_SOCKET):
        return False
    if data.get("server", True) and data.get("reconnect"):
        return False  # QEMU refuses it: the engine says so
    kind, where = socket_address(data)
    if kind == "unix":
        return not where.get("abstract")
    return kind == "inet" and not any(k in where for k in ("to", "ipv4", "ipv6"))


CONNECTION_AWARE = frozenset({"virtserialport", "virtconsole", "usb-serial", "usb-braille"})
"""Frontends that show the guest whether a client is at the host end (a
virtio-serial port's ``host_connected``, a usb-serial plugging in): on a
socket or a pty they stay the engine's, as qmpvm's pipe to the engine is
always connected."""


def served(config: Config, args: Mapping[str, object]) -> bool:
    """``owns``, in ``config``: not a socket or pty a connection-aware
    frontend uses."""
    if not owns(args):
        return False
    if backend_of(args)[0] not in ("socket", "pty"):
        return True
    return not any(
        d.args.get("chardev") == args.get("id") and d.args.get("driver") in CONNECTION_AWARE
        for d in config.of_kind(Kind.DEVICE)
    )


def monitor_specs(config: Config) -> dict[str, MonitorSpec]:
    """The HMP monitors the machine setting ``monitors`` puts on consoles, by
    chardev id; ConfigError for one on a chardev that is missing, that qmpvm
    does not serve, or that takes no input."""
    escape = config.machine.get("escape-char")
    specs: dict[str, MonitorSpec] = {}
    for item in typing.cast(list[object], config.machine.get("monitors") or []):
        monitor = as_object(item)
        chardev_id = str(monitor.get("chardev"))
        resource = config.find(Kind.CHARDEV, chardev_id)
        if resource is None:
            raise ConfigError(f"HMP monitor: chardev '{chardev_id}' not found")
        backend, _data = backend_of(resource.args)
        if not served(config, resource.args) or backend not in ("stdio", "socket", "pty"):
            raise ConfigError(
                f"HMP monitor on chardev '{chardev_id}': qmpvm serves HMP monitors on its "
                f"own stdio, ptys and listening sockets, not on '{filename(resource.args, [])}'"
            )
        specs[chardev_id] = MonitorSpec(
            mux=monitor.get("mux") is True,
            escape=escape if isinstance(escape, int) else ESCAPE_DEFAULT,
        )
    return specs


def host_port(where: Mapping[str, object]) -> str:
    return f"{where.get('host', '')}:{where.get('port')}"


def socket_address(data: Mapping[str, object]) -> tuple[object, Mapping[str, object]]:
    """A socket chardev's address: its type ("unix", "inet", "fd", ...) and members."""
    addr = typing.cast(Mapping[str, object], data.get("addr", {}))
    return addr.get("type"), typing.cast(Mapping[str, object], addr.get("data", {}))


def check(args: Mapping[str, object]) -> None:
    """What QEMU checks when it creates the backend, checked by qmpvm for the
    backends it serves (the engine sees a pipe)."""
    backend, _data = backend_of(args)
    if backend in ("ringbuf", "memory"):
        size = ring_size(args)
        if size <= 0 or size & (size - 1):
            raise ArgumentError("size of ringbuf chardev must be power of two")


def check_stdio_free(args: Mapping[str, object], others: Iterable[Mapping[str, object]]) -> None:
    """QEMU's rule: one stdio chardev at most (qmpvm's standard I/O, here)."""
    if backend_of(args)[0] == "stdio" and any(backend_of(o)[0] == "stdio" for o in others):
        raise ArgumentError("cannot use stdio by multiple character devices")


def ring_size(args: Mapping[str, object]) -> int:
    _backend, data = backend_of(args)
    return int(str(data.get("size", RING_DEFAULT)))


def stem(chardev_id: str) -> str:
    """The FIFOs' and the log's file name stem for a chardev: its id when that
    is a plain name, else a digest of it."""
    if _SAFE_STEM.fullmatch(chardev_id):
        return chardev_id
    return "x-" + hashlib.sha256(chardev_id.encode()).hexdigest()[:24]


def engine_chardev(args: Mapping[str, object], fifo_stem: str) -> dict[str, object]:
    """The chardev-add the engine gets for an owned chardev: a pipe on the
    FIFOs at ``fifo_stem`` (qmpvm writes the ``logfile``, if any)."""
    return {"id": args["id"], "backend": {"type": "pipe", "data": {"device": fifo_stem}}}


def filename(args: Mapping[str, object], peers: Sequence[str], pty: str = "") -> str:
    """``query-chardev``'s ``filename`` as QEMU gives it for this backend,
    ``peers``: the clients attached to a listening socket (their addresses),
    or a connecting socket's connection (``LOCAL <-> REMOTE``); ``pty``: a
    pty's slave path."""
    backend, data = backend_of(args)
    if backend == "memory":
        return "ringbuf"
    if backend == "pty":
        return f"pty:{pty}"
    if backend != "socket":
        return backend
    kind, where = socket_address(data)
    if not data.get("server", True):  # connected, QEMU names the local end: none for unix
        if kind == "unix":
            return "unix:" if peers else f"disconnected:unix:{where.get('path')}"
        return f"tcp:{peers[0]}" if peers else f"disconnected:tcp:{host_port(where)}"
    if kind == "unix":
        text = f"unix:{where.get('path')},server=on"
    else:
        text = f"tcp:{host_port(where)},server=on"
        if peers:
            text += f" <-> {peers[0]}"
    return text if peers else f"disconnected:{text}"
