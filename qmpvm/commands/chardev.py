"""Character devices: hot on every machine."""

from __future__ import annotations

from dataclasses import dataclass

from qmpvm.commands.common import REGISTRY, change
from qmpvm.config import chardev
from qmpvm.config.resource import Kind
from qmpvm.monitor.dispatch import Call
from qmpvm.schema import to_json


@REGISTRY.command("chardev-add", args=chardev.ChardevAdd, returns=object)
async def chardev_add(call: Call) -> object:
    args: chardev.ChardevAdd = call.args
    vmm = call.vmm
    return await change(
        vmm,
        lambda c: c.add(chardev.make(args, c.next_seq)),
        on_engine=lambda: vmm.engine().execute("chardev-add", to_json(args)),
        undo=lambda: vmm.engine().execute("chardev-remove", {"id": args.id}),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ChardevRemove:
    id: str


@REGISTRY.command("chardev-remove", args=ChardevRemove)
async def chardev_remove(call: Call) -> object:
    args: ChardevRemove = call.args
    vmm = call.vmm
    await change(
        vmm,
        lambda c: c.remove(Kind.CHARDEV, args.id),
        on_engine=lambda: vmm.engine().execute("chardev-remove", {"id": args.id}),
    )
    return {}


@REGISTRY.command("query-chardev", returns=object)
async def query_chardev(call: Call) -> object:
    vmm = call.vmm
    if vmm.machine is not None:
        return await vmm.forward("query-chardev", {})
    out = []
    for resource in vmm.config.of_kind(Kind.CHARDEV):
        backend, _data = chardev.backend_of(resource.args)
        out.append({"label": resource.key, "filename": backend, "frontend-open": False})
    return out
