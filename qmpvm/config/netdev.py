"""Network backends (``netdev_add``): QEMU 7.2's Netdev, user and tap."""

from __future__ import annotations

import builtins
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

FD_MEMBERS = ("fd", "vhostfd")
"""Members naming a descriptor passed with getfd (several, colon-separated,
in ``fds``/``vhostfds``)."""


def fd_names(netdev: NetdevBase) -> list[str]:
    if not isinstance(netdev, NetdevTap):
        return []
    names = [n for n in (netdev.fd, netdev.vhostfd) if n is not None]
    for many in (netdev.fds, netdev.vhostfds):
        if many:
            names.extend(many.split(":"))
    return [n for n in names if not n.isdigit()]


def make(args: NetdevBase, seq: int) -> Resource:
    return Resource(kind=Kind.NETDEV, key=args.id, args=to_json(args), seq=seq)


@dataclass(frozen=True, slots=True, kw_only=True)
class NetdevDel:
    id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetLink:
    name: str
    up: bool
