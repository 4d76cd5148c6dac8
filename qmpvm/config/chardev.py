"""Character devices (``chardev-add``): QEMU 7.2's ChardevBackend, a subset."""

from __future__ import annotations

import builtins
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from qmpvm.config.resource import Kind, Resource
from qmpvm.schema import Union, to_json


@dataclass(frozen=True, slots=True, kw_only=True)
class UnixSocketAddress:
    path: str
    abstract: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class InetSocketAddress:
    host: str
    port: str
    numeric: bool | None = None
    ipv4: bool | None = None
    ipv6: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StrWrapper:
    str: builtins.str


@dataclass(frozen=True, slots=True, kw_only=True)
class UnixAddressWrapper:
    type: str
    data: UnixSocketAddress


@dataclass(frozen=True, slots=True, kw_only=True)
class InetAddressWrapper:
    type: str
    data: InetSocketAddress


@dataclass(frozen=True, slots=True, kw_only=True)
class FdAddressWrapper:
    type: str
    data: StrWrapper


SocketAddressLegacy = Union(
    "SocketAddressLegacy",
    "type",
    {"unix": UnixAddressWrapper, "inet": InetAddressWrapper, "fd": FdAddressWrapper},
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChardevRingbuf:
    size: int | None = None
    logfile: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ChardevSocket:
    addr: Annotated[object, SocketAddressLegacy]
    server: bool | None = None
    wait: bool | None = None
    nodelay: bool | None = None
    telnet: bool | None = None
    reconnect: int | None = None
    logfile: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ChardevFile:
    out: str
    in_: str | None = None
    append: bool | None = None
    logfile: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ChardevCommon:
    logfile: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RingbufWrapper:
    type: str
    data: ChardevRingbuf


@dataclass(frozen=True, slots=True, kw_only=True)
class SocketWrapper:
    type: str
    data: ChardevSocket


@dataclass(frozen=True, slots=True, kw_only=True)
class FileWrapper:
    type: str
    data: ChardevFile


@dataclass(frozen=True, slots=True, kw_only=True)
class CommonWrapper:
    type: str
    data: ChardevCommon


ChardevBackend = Union(
    "ChardevBackend",
    "type",
    {
        "ringbuf": RingbufWrapper,
        "memory": RingbufWrapper,
        "socket": SocketWrapper,
        "file": FileWrapper,
        "pty": CommonWrapper,
        "null": CommonWrapper,
    },
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChardevAdd:
    id: str
    backend: Annotated[object, ChardevBackend]


def make(args: ChardevAdd, seq: int) -> Resource:
    return Resource(kind=Kind.CHARDEV, key=args.id, args=to_json(args), seq=seq)


def backend_of(args: Mapping[str, object]) -> tuple[str, Mapping[str, object]]:
    """(type, data) of a stored chardev-add."""
    backend = args["backend"]
    backend = typing.cast(Mapping[str, object], backend)  # checked on the way in
    return str(backend["type"]), typing.cast(Mapping[str, object], backend.get("data", {}))
