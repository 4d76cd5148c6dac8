"""Character devices in two syntaxes: QMP's ``chardev-add`` and QEMU's ``-chardev``.

The store keeps the QMP form (``{"id", "backend": {"type", "data"}}``); QEMU
7.2's ``-chardev`` has no JSON form and other key names, so one table maps
each backend's legacy keys to its QMP members, both ways.  Socket and UDP
addresses are the two shapes that are not a plain rename.

The defaults differ between the syntaxes and are made explicit here: a QMP
socket without ``server`` listens (``server`` defaults to true, ``wait`` to
false), a ``-chardev socket`` without ``server`` connects.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator, Mapping

from qmpvm.errors import ArgumentError

COMMON = (("logfile", "logfile"), ("logappend", "logappend"))

RENAMES: Mapping[str, tuple[tuple[str, str], ...]] = {
    "file": (("path", "out"), ("input-path", "in"), ("append", "append")),
    "serial": (("path", "device"),),
    "parallel": (("path", "device"),),
    "pipe": (("path", "device"),),
    "stdio": (("signal", "signal"),),
    "vc": (("width", "width"), ("height", "height"), ("cols", "cols"), ("rows", "rows")),
    "ringbuf": (("size", "size"),),
    "memory": (("size", "size"),),
    "spicevmc": (("name", "type"),),
    "spiceport": (("name", "fqdn"),),
    "qemu-vdagent": (("mouse", "mouse"), ("clipboard", "clipboard")),
    "dbus": (("name", "name"),),
    "socket": (
        ("server", "server"), ("wait", "wait"), ("nodelay", "nodelay"), ("telnet", "telnet"),
        ("tn3270", "tn3270"), ("websocket", "websocket"), ("reconnect", "reconnect"),
        ("tls-creds", "tls-creds"), ("tls-authz", "tls-authz"),
    ),
    "udp": (),
    **dict.fromkeys(("pty", "null", "msmouse", "wctablet", "braille", "testdev"), ()),
}  # fmt: skip
"""Backend -> (legacy key, QMP member) pairs, besides ``COMMON`` and addresses."""

ALIASES = {"tty": "serial", "parport": "parallel"}
_UNIX_KEYS = (("path", "path"), ("abstract", "abstract"), ("tight", "tight"))
_INET_KEYS = (("host", "host"), ("port", "port"), ("to", "to"), ("ipv4", "ipv4"),
              ("ipv6", "ipv6"))  # fmt: skip


def backend_of(args: Mapping[str, object]) -> tuple[str, Mapping[str, object]]:
    """(type, data) of a stored chardev-add."""
    backend = typing.cast(Mapping[str, object], args["backend"])  # checked on the way in
    return str(backend["type"]), typing.cast(Mapping[str, object], backend.get("data", {}))


def from_legacy(tree: Mapping[str, object]) -> dict[str, object]:
    """``-chardev BACKEND,id=ID,key=value...`` (parsed, typed) -> chardev-add arguments."""
    rest = dict(tree)
    backend = str(rest.pop("backend", ""))
    backend = ALIASES.get(backend, backend)
    chardev_id = rest.pop("id", None)
    if not isinstance(chardev_id, str) or not chardev_id:
        raise ArgumentError("-chardev: 'id' is required")
    if rest.pop("mux", False) is True:
        raise ArgumentError("-chardev mux=on: create a 'mux' chardev over it instead")
    if backend not in RENAMES:
        raise ArgumentError(f"-chardev: backend '{backend}' is not known")
    data: dict[str, object] = {}
    for legacy, member in (*COMMON, *RENAMES[backend]):
        if legacy in rest:
            data[member] = rest.pop(legacy)
    if backend == "socket":
        data["addr"] = _socket_address(rest)
        data.setdefault("server", False)
    elif backend == "udp":
        data["remote"] = _inet(rest, "host", "port")
        if "localaddr" in rest or "localport" in rest:
            data["local"] = _inet(rest, "localaddr", "localport")
    if rest:
        raise ArgumentError(f"-chardev {backend}: unknown parameter '{next(iter(rest))}'")
    return {"id": chardev_id, "backend": {"type": backend, "data": data}}


def _socket_address(rest: dict[str, object]) -> dict[str, object]:
    if "path" in rest:
        return {"type": "unix", "data": _take(rest, _UNIX_KEYS)}
    if "fd" in rest:
        return {"type": "fd", "data": {"str": str(rest.pop("fd"))}}
    if "port" in rest:
        inet = _take(rest, _INET_KEYS)
        inet.setdefault("host", "")
        inet["port"] = str(inet["port"])
        return {"type": "inet", "data": inet}
    raise ArgumentError("-chardev socket: 'path', 'host'/'port' or 'fd' is required")


def _inet(rest: dict[str, object], host: str, port: str) -> dict[str, object]:
    where = {"host": str(rest.pop(host, "")), "port": str(rest.pop(port, "0"))}
    return {"type": "inet", "data": where}


def _take(rest: dict[str, object], keys: tuple[tuple[str, str], ...]) -> dict[str, object]:
    return {member: rest.pop(legacy) for legacy, member in keys if legacy in rest}


def to_legacy(args: Mapping[str, object]) -> Iterator[tuple[str, object]]:
    """A stored chardev-add as QEMU 7.2's ``-chardev`` (key, value) pairs, backend first."""
    backend, data = backend_of(args)
    yield "backend", "ringbuf" if backend == "memory" else backend
    yield "id", args["id"]
    for legacy, member in (*COMMON, *RENAMES.get(backend, ())):
        if member in data:
            yield legacy, data[member]
    if backend == "socket":
        addr = typing.cast(Mapping[str, object], data["addr"])
        where = typing.cast(Mapping[str, object], addr.get("data", {}))
        kind = addr.get("type")
        if kind == "unix":
            yield from ((legacy, where[m]) for legacy, m in _UNIX_KEYS if m in where)
        elif kind == "inet":
            yield from ((legacy, where[m]) for legacy, m in _INET_KEYS if m in where)
        else:
            yield "fd", where.get("str")
        if "server" not in data:  # QMP's default: listen, without waiting
            yield "server", True
        if data.get("server", True) and "wait" not in data:
            yield "wait", False
    elif backend == "udp":
        for prefix, member in (("", "remote"), ("local", "local")):
            inet = data.get(member)
            if isinstance(inet, dict):
                where = typing.cast(Mapping[str, object], inet.get("data", {}))
                yield (prefix + "addr" if prefix else "host"), where.get("host", "")
                yield (prefix + "port" if prefix else "port"), where.get("port", "")
