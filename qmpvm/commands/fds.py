"""Passing file descriptors: getfd/closefd by name, add-fd/remove-fd in sets.

The arguments are the engine's (its schema checks them); the descriptors are
qmpvm's to keep (``qmpvm.fds``) until a machine needs them.
"""

from __future__ import annotations

from qmpvm.commands.common import REGISTRY
from qmpvm.errors import ConfigError
from qmpvm.monitor.dispatch import ENGINE_ARGS, Call


@REGISTRY.command("getfd", args=ENGINE_ARGS)
async def getfd(call: Call) -> object:
    name = str(call.args["fdname"])
    if name[:1].isdigit():
        raise ConfigError("Parameter 'fdname' must not start with a digit")
    names, _sets = call.vmm.fds_in_use()
    if name in names:
        raise ConfigError(f"File descriptor named '{name}' is in use by the configuration")
    call.vmm.fds.getfd(name, call.client.take_fd(), call.client.id)
    return {}


@REGISTRY.command("closefd", args=ENGINE_ARGS)
async def closefd(call: Call) -> object:
    names, _sets = call.vmm.fds_in_use()
    call.vmm.fds.closefd(str(call.args["fdname"]), names, call.client.id)
    return {}


@REGISTRY.command("add-fd", args=ENGINE_ARGS)
async def add_fd(call: Call) -> object:
    fdset_id, opaque = call.args.get("fdset-id"), call.args.get("opaque")
    fd = call.client.take_fd()
    fdset_id = call.vmm.fds.add_fd(fd, call.client.id, fdset_id, opaque)
    return {"fdset-id": fdset_id, "fd": fd}


@REGISTRY.command("remove-fd", args=ENGINE_ARGS)
async def remove_fd(call: Call) -> object:
    _names, sets = call.vmm.fds_in_use()
    call.vmm.fds.remove_fd(int(call.args["fdset-id"]), call.args.get("fd"), sets, call.client.id)
    return {}


@REGISTRY.command("query-fdsets")
async def query_fdsets(call: Call) -> object:
    _names, sets = call.vmm.fds_in_use()
    return call.vmm.fds.query_fdsets(call.client.id, sets)
