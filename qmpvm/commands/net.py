"""Network backends and link state: hot on every machine."""

from __future__ import annotations

from qmpvm.commands.common import REGISTRY, change
from qmpvm.config import netdev
from qmpvm.config.resource import Kind
from qmpvm.errors import ConfigError
from qmpvm.monitor.dispatch import Call
from qmpvm.schema import to_json
from qmpvm.vmm import Vmm


@REGISTRY.command("netdev_add", args=netdev.Netdev)
async def netdev_add(call: Call) -> object:
    args: netdev.NetdevBase = call.args
    vmm = call.vmm
    names = netdev.fd_names(to_json(args))
    for name in names:
        if name not in vmm.fds.named:
            raise ConfigError(f"File descriptor named '{name}' has not been found")

    async def on_engine() -> object:
        for name in names:
            await vmm.engine().execute("getfd", {"fdname": name}, fds=[vmm.fds.named[name].fd])
        return await vmm.engine().execute("netdev_add", to_json(args))

    await change(
        vmm,
        lambda c: c.add(netdev.make(args, c.next_seq)),
        on_engine=on_engine,
        undo=lambda: vmm.engine().execute("netdev_del", {"id": args.id}),
    )
    return {}


@REGISTRY.command("netdev_del", args=netdev.NetdevDel)
async def netdev_del(call: Call) -> object:
    args: netdev.NetdevDel = call.args
    vmm = call.vmm
    await change(
        vmm,
        lambda c: c.remove(Kind.NETDEV, args.id),
        on_engine=lambda: vmm.engine().execute("netdev_del", {"id": args.id}),
    )
    return {}


@REGISTRY.command("set_link", args=netdev.SetLink)
async def set_link(call: Call) -> object:
    args: netdev.SetLink = call.args
    vmm: Vmm = call.vmm
    await change(
        vmm,
        lambda c: c.set_link(args.name, args.up),
        on_engine=lambda: vmm.engine().execute("set_link", {"name": args.name, "up": args.up}),
        undo=lambda: vmm.engine().execute("set_link", {"name": args.name, "up": not args.up}),
    )
    return {}
