"""Character devices in two syntaxes: QMP's ``chardev-add`` and QEMU's ``-chardev``.

The store keeps the QMP form (``{"id", "backend": {"type", "data"}}``); QEMU
7.2's ``-chardev`` has no JSON form and other key names, so one table maps
each backend's legacy keys to its QMP members, both ways.  Socket and UDP
addresses are the two shapes that are not a plain rename.

The defaults differ between the syntaxes and are made explicit here: a QMP
socket without ``server`` listens (``server`` defaults to true, ``wait`` to
false), a ``-chardev socket`` without ``server`` connects, and one with
``server=on`` but no ``wait`` waits for its client before the machine starts.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator, Mapping

from qmpvm.errors import ArgumentError
from qmpvm.monitor.early import socket_path_free

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
    "mux": (("chardev", "chardev"),),
    **dict.fromkeys(("pty", "null", "msmouse", "wctablet", "braille", "testdev"), ()),
}  # fmt: skip
"""Backend -> (legacy key, QMP member) pairs, besides ``COMMON`` and addresses."""

ALIASES = {"tty": "serial", "parport": "parallel"}
_UNIX_KEYS = (("path", "path"), ("abstract", "abstract"), ("tight", "tight"))
_INET_KEYS = (("host", "host"), ("port", "port"), ("to", "to"), ("ipv4", "ipv4"),
              ("ipv6", "ipv6"))  # fmt: skip


def legacy_keys(backend: str) -> frozenset[str]:
    """The -chardev keys ``backend`` uses (QEMU ignores the others its option takes)."""
    backend = ALIASES.get(backend, backend)
    keys = {legacy for legacy, _member in (*COMMON, *RENAMES.get(backend, ()))}
    if backend == "socket":
        keys |= {k for k, _m in (*_UNIX_KEYS, *_INET_KEYS)} | {"fd"}
    elif backend == "udp":
        keys |= {"host", "port", "localaddr", "localport", "ipv4", "ipv6"}
    return frozenset(keys | {"backend", "id", "mux"})


def backend_of(args: Mapping[str, object]) -> tuple[str, Mapping[str, object]]:
    """(type, data) of a stored chardev-add."""
    backend = typing.cast(Mapping[str, object], args["backend"])  # checked on the way in
    return str(backend["type"]), typing.cast(Mapping[str, object], backend.get("data", {}))


def from_legacy(tree: Mapping[str, object]) -> list[dict[str, object]]:
    """``-chardev BACKEND,id=ID,key=value...`` (parsed, typed) -> chardev-add arguments:
    one, or with ``mux=on`` two, as QEMU makes them (``ID-base`` and the mux ``ID``)."""
    rest = dict(tree)
    chardev_id = rest.get("id")
    if rest.pop("mux", False) is True and isinstance(chardev_id, str):
        base = from_legacy({**rest, "id": f"{chardev_id}-base"})
        mux_data: dict[str, object] = {"chardev": base[0]["id"]}
        mux: dict[str, object] = {"id": chardev_id, "backend": {"type": "mux", "data": mux_data}}
        return [*base, mux]
    return [_from_legacy(rest)]


def _from_legacy(rest: dict[str, object]) -> dict[str, object]:
    backend = str(rest.pop("backend", ""))
    backend = ALIASES.get(backend, backend)
    chardev_id = rest.pop("id", None)
    if not isinstance(chardev_id, str) or not chardev_id:
        raise ArgumentError("-chardev: 'id' is required")
    if backend not in RENAMES:
        raise ArgumentError(f"-chardev: backend '{backend}' is not known")
    data: dict[str, object] = {}
    for legacy, member in (*COMMON, *RENAMES[backend]):
        if legacy in rest:
            data[member] = rest.pop(legacy)
    if backend == "socket":
        data["addr"] = _socket_address(rest)
        data.setdefault("server", False)
        if data["server"]:
            data.setdefault("wait", True)  # -chardev's default, unlike QMP's
    elif backend == "udp":
        data["remote"] = _inet(rest, "host", "port")
        data["remote"]["data"].update(_take(rest, (("ipv4", "ipv4"), ("ipv6", "ipv6"))))  # type: ignore[index]
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
    where: dict[str, object] = {"host": str(rest.pop(host, "")), "port": str(rest.pop(port, "0"))}
    return {"type": "inet", "data": where}


def check_writable(args: Mapping[str, object]) -> None:
    """Refuse a chardev-add the engine's ``-chardev`` cannot say as it is (a member
    without a legacy spelling, a vsock address): it would change at machine-init."""
    backend, data = backend_of(args)
    if backend not in RENAMES:
        raise ArgumentError(f"chardev backend '{backend}' has no -chardev form in the engine")
    expected = dict(data)
    if backend == "socket":
        addr = data.get("addr")
        if not isinstance(addr, Mapping) or addr.get("type") not in ("unix", "inet", "fd"):
            kind = addr.get("type") if isinstance(addr, Mapping) else addr
            raise ArgumentError(f"chardev socket address of type '{kind}' has no -chardev form")
        expected.setdefault("server", True)  # QMP's defaults, which to_legacy spells out
        if expected["server"]:
            expected.setdefault("wait", False)
            if addr.get("type") == "unix":
                _check_replaceable(typing.cast(Mapping[str, object], addr.get("data", {})))
    again = _from_legacy(dict(to_legacy(args)))["backend"]["data"]  # type: ignore[index]
    for member in sorted(set(expected) | set(again)):
        if expected.get(member) != again.get(member):
            raise ArgumentError(f"chardev {backend}: '{member}' has no -chardev form as given")


def _check_replaceable(where: Mapping[str, object]) -> None:
    """The engine unlinks whatever is at a listening socket's path: only a stale
    socket may be there, never a file a client names by mistake or on purpose."""
    path = where.get("path")
    if isinstance(path, str) and not where.get("abstract") and not socket_path_free(path):
        raise ArgumentError(f"chardev socket path '{path}' exists and is not a socket")


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
                if not prefix:
                    yield from ((k, where[k]) for k in ("ipv4", "ipv6") if k in where)
