"""Network backends (``netdev_add``): QEMU 7.2's Netdev, user and tap."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from dataclasses import dataclass

from qmpvm.config.resource import Kind, Resource
from qmpvm.schema import Union, to_json


@dataclass(frozen=True, slots=True, kw_only=True)
class StringValue:
    str: builtins.str


@dataclass(frozen=True, slots=True, kw_only=True)
class NetdevBase:
    id: str
    type: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NetdevUser(NetdevBase):
    hostname: str | None = None
    restrict: bool | None = None
    ipv4: bool | None = None
    ipv6: bool | None = None
    net: str | None = None
    host: str | None = None
    dhcpstart: str | None = None
    dns: str | None = None
    hostfwd: list[StringValue] | None = None
    guestfwd: list[StringValue] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NetdevTap(NetdevBase):
    ifname: str | None = None
    fd: str | None = None
    fds: str | None = None
    script: str | None = None
    downscript: str | None = None
    br: str | None = None
    helper: str | None = None
    sndbuf: int | None = None
    vnet_hdr: bool | None = None
    vhost: bool | None = None
    vhostfd: str | None = None
    vhostfds: str | None = None
    vhostforce: bool | None = None
    queues: int | None = None
    poll_us: int | None = None


Netdev = Union("Netdev", "type", {"user": NetdevUser, "tap": NetdevTap})

FD_MEMBERS = ("fd", "vhostfd", "fds", "vhostfds")
"""Members naming descriptors passed with getfd (``fds``/``vhostfds``: several,
colon-separated)."""


def fd_names(args: Mapping[str, object]) -> list[str]:
    """The getfd names a netdev document uses; a bare number names nothing."""
    names: list[str] = []
    for member in FD_MEMBERS:
        value = args.get(member)
        if isinstance(value, str):
            names.extend(name for name in value.split(":") if not name.isdigit())
    return names


def make(args: NetdevBase, seq: int) -> Resource:
    return Resource(kind=Kind.NETDEV, key=args.id, args=to_json(args), seq=seq)


@dataclass(frozen=True, slots=True, kw_only=True)
class NetdevDel:
    id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetLink:
    name: str
    up: bool
