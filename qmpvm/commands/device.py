"""Devices: checked against the engine's capabilities when issued; hot-plug
on pc and q35 (on q35 into root ports qmpvm provides), boot-only on microvm."""

from __future__ import annotations

from qmpvm.commands.common import REGISTRY, change
from qmpvm.config import device
from qmpvm.config.resource import Kind
from qmpvm.engine.launch import NO_HOTPLUG_MACHINES, machine_family
from qmpvm.errors import ConfigError, NotFoundError
from qmpvm.monitor.dispatch import Call
from qmpvm.schema import to_json
from qmpvm.vmm import Vmm

GENERIC_PROPERTIES = frozenset({"driver", "id", "bus"})


async def check_driver(vmm: Vmm, args: device.DeviceAdd) -> None:
    caps = await vmm.capabilities()
    if caps is None:
        return
    known = caps.devices.get(args.driver)
    if known is None:
        raise ConfigError(f"'{args.driver}' is not a valid device model name")
    if known.properties is None:
        return
    for name in args.properties:
        if name not in known.properties:
            raise ConfigError(f"Property '{args.driver}.{name}' not found")


def hotplug_bus(vmm: Vmm, args: device.DeviceAdd) -> str | None:
    """Where a hot-plugged device goes when the client named no bus."""
    machine = vmm.engine()
    family = machine_family(vmm.config.machine.type)
    if family in NO_HOTPLUG_MACHINES:
        raise ConfigError(
            f"Device '{args.driver}' cannot be hot-plugged: machine type "
            f"'{vmm.config.machine.type}' has no hot-pluggable bus (devices are boot-only there)"
        )
    if args.bus is not None or family != "q35" or not args.driver.endswith("-pci"):
        return args.bus
    for port in machine.hotplug_ports:
        if port not in machine.port_users:
            return port
    raise ConfigError(
        f"No free hot-plug port: all {len(machine.hotplug_ports)} root ports are in use "
        "(machine-set 'hotplug-ports' sets how many the next machine-init provides)"
    )


@REGISTRY.command("device_add", args=device.DeviceAdd)
async def device_add(call: Call) -> object:
    args: device.DeviceAdd = call.args
    vmm = call.vmm
    await check_driver(vmm, args)

    async def on_engine() -> object:
        bus = hotplug_bus(vmm, args)
        live = to_json(args)
        if bus is not None:
            live["bus"] = bus
        result = await vmm.engine().execute("device_add", live)
        if bus is not None and bus != args.bus:
            # a device without id can never be unplugged: its port stays taken
            vmm.engine().port_users[bus] = args.id or "(no id)"
        return result

    await change(
        vmm,
        lambda c: c.add(device.make(args, c.next_seq)),
        on_engine=on_engine,
        undo=(lambda: vmm.engine().execute("device_del", {"id": args.id})) if args.id else None,
    )
    return {}


@REGISTRY.command("device_del", args=device.DeviceDel)
async def device_del(call: Call) -> object:
    """Asks the guest to let go; the store forgets the device on DEVICE_DELETED."""
    args: device.DeviceDel = call.args
    vmm = call.vmm
    if vmm.config.find(Kind.DEVICE, args.id) is None:
        raise NotFoundError(f"Device '{args.id}' not found")
    if vmm.machine is None:
        await change(vmm, lambda c: c.remove(Kind.DEVICE, args.id))
        return {}
    if machine_family(vmm.config.machine.type) in NO_HOTPLUG_MACHINES:
        raise ConfigError(
            f"Device '{args.id}' cannot be unplugged: machine type "
            f"'{vmm.config.machine.type}' has no hot-pluggable bus"
        )
    await vmm.engine().execute("device_del", {"id": args.id})
    return {}


def on_device_deleted(vmm: Vmm, message: dict[str, object]) -> None:
    data = message.get("data")
    device_id = data.get("device") if isinstance(data, dict) else None
    if not isinstance(device_id, str) or vmm.config.find(Kind.DEVICE, device_id) is None:
        return
    vmm.commit(vmm.config.remove(Kind.DEVICE, device_id))
    if vmm.machine is not None:
        for port, user in list(vmm.machine.port_users.items()):
            if user == device_id:
                del vmm.machine.port_users[port]


REGISTRY.hook("DEVICE_DELETED", on_device_deleted)
