"""Passing file descriptors: getfd/closefd by name, add-fd/remove-fd in sets."""

from __future__ import annotations

from dataclasses import dataclass

from qmpvm.commands.common import REGISTRY
from qmpvm.errors import ConfigError
from qmpvm.monitor.dispatch import Call


@dataclass(frozen=True, slots=True, kw_only=True)
class GetFd:
    fdname: str


@REGISTRY.command("getfd", args=GetFd)
async def getfd(call: Call) -> object:
    args: GetFd = call.args
    if args.fdname[:1].isdigit():
        raise ConfigError("Parameter 'fdname' must not start with a digit")
    names, _sets = call.vmm.fds_in_use()
    if args.fdname in names:
        raise ConfigError(f"File descriptor named '{args.fdname}' is in use by the configuration")
    call.vmm.fds.getfd(args.fdname, call.client.take_fd(), call.client.id)
    return {}


@REGISTRY.command("closefd", args=GetFd)
async def closefd(call: Call) -> object:
    args: GetFd = call.args
    names, _sets = call.vmm.fds_in_use()
    call.vmm.fds.closefd(args.fdname, names)
    return {}


@dataclass(frozen=True, slots=True, kw_only=True)
class AddFd:
    fdset_id: int | None = None
    opaque: str | None = None


@REGISTRY.command("add-fd", args=AddFd, returns=object)
async def add_fd(call: Call) -> object:
    args: AddFd = call.args
    fd = call.client.take_fd()
    fdset_id = call.vmm.fds.add_fd(fd, call.client.id, args.fdset_id, args.opaque)
    return {"fdset-id": fdset_id, "fd": fd}


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveFd:
    fdset_id: int
    fd: int | None = None


@REGISTRY.command("remove-fd", args=RemoveFd)
async def remove_fd(call: Call) -> object:
    args: RemoveFd = call.args
    _names, sets = call.vmm.fds_in_use()
    call.vmm.fds.remove_fd(args.fdset_id, args.fd, sets)
    return {}


@REGISTRY.command("query-fdsets", returns=object)
async def query_fdsets(call: Call) -> object:
    return call.vmm.fds.query_fdsets()
