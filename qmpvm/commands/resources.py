"""Every resource kind through one add and one delete handler.

The kinds table (``qmpvm.config.kinds``) says what differs between kinds;
what is the same is here: check, record in the store and make on the live
machine together or not at all, refuse a boot-only kind once the machine
exists, hand the engine the descriptors an item names, and put a device
that is hot-plugged on q35 into a free root port.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from qmpvm.commands.common import REGISTRY, change
from qmpvm.config import chardev, kinds
from qmpvm.config.descriptors import fd_names, fdset_ids
from qmpvm.config.kinds import BY_COMMAND, KINDS
from qmpvm.config.resource import Kind
from qmpvm.engine.launch import NO_HOTPLUG_MACHINES, machine_family
from qmpvm.errors import ArgumentError, ConfigError, NotFoundError
from qmpvm.host import console_wiring
from qmpvm.host.opening import hand_over
from qmpvm.keyval import coerce_property
from qmpvm.monitor.dispatch import ENGINE_ARGS, Call
from qmpvm.vmm import Vmm

if TYPE_CHECKING:
    from qmpvm.engine.caps import DeviceType

DEVICE_ALIASES: Mapping[str, str] = {
    "ac97": "AC97", "e1000-82540em": "e1000", "es1370": "ES1370", "ahci": "ich9-ahci",
    "lsi": "lsi53c895a",
    **{f"virtio-{name}": f"virtio-{name}-pci" for name in (
        "9p", "balloon", "blk", "gpu", "input-host", "iommu", "keyboard", "mouse", "net",
        "rng", "scsi", "serial", "tablet",
    )},
}  # fmt: skip
"""QEMU's device aliases on x86 (qdev-monitor.c): not in any introspection answer."""


async def add(call: Call) -> object:
    spec = BY_COMMAND[call.name]
    vmm = call.vmm
    args = dict(call.args)
    if spec.kind is Kind.DEVICE:
        args = await _typed_device(vmm, args)
    if spec.kind is Kind.BLOCK and "node-name" not in args:
        raise ArgumentError("'node-name' must be specified for the root node")
    kinds.make(spec.kind, args, 0)  # its name, before anything else is looked at
    served = spec.kind is Kind.CHARDEV and console_wiring.served(vmm.config, args)  # by qmpvm
    if spec.kind is Kind.CHARDEV:
        chardev.check_writable(args)
        console_wiring.check(args)
        others = [r.args for r in vmm.config.of_kind(Kind.CHARDEV)]
        console_wiring.check_stdio_free(args, others)
    if vmm.machine is not None and not spec.hot:
        raise ConfigError(
            f"'{spec.add}' is boot-only and the machine exists; it is only allowed "
            "before machine-init"
        )
    names = fd_names(args) if spec.kind in (Kind.NETDEV, Kind.CHARDEV) else []
    for name in names:
        if name not in vmm.fds.named:
            raise ConfigError(f"File descriptor named '{name}' has not been found")
    key = args.get(spec.key)

    async def on_engine() -> object:
        engine = vmm.engine()
        for name in names:
            await engine.execute("getfd", {"fdname": name}, fds=[vmm.fds.named[name].fd])
        await _share_fdsets(vmm, fdset_ids(args))
        live = dict(args)
        port = await _hotplug_port(vmm, live) if spec.kind is Kind.DEVICE else None
        if port is not None:
            live["bus"] = port
        try:
            console = await vmm.consoles.open_one(args) if served else None
            item = kinds.make(spec.kind, live, 0)
            live = dict(await hand_over(engine, item, console))
            result = await engine.execute(spec.add, live)
        except BaseException:
            if served:
                vmm.consoles.forget(str(key))
            raise
        if port is not None:  # taken once the device is in; without an id, for good
            engine.port_users[port] = str(key or "(no id)")
        if console is not None and console.pty_path is not None:
            return {"pty": console.pty_path}  # QEMU's answer for a pty
        return result

    async def undo() -> object:
        if served:
            vmm.consoles.forget(str(key))
        return await vmm.engine().execute(spec.delete, {spec.delete_key: key})

    result = await change(
        vmm,
        lambda c: c.add(kinds.make(spec.kind, args, c.next_seq)),
        on_engine=on_engine,
        undo=undo if isinstance(key, str) else None,
    )
    return result if spec.kind is Kind.CHARDEV else {}


async def delete(call: Call) -> object:
    spec = BY_COMMAND[call.name]
    vmm = call.vmm
    args = dict(call.args)
    key = str(args[spec.delete_key])
    if vmm.machine is not None and not spec.hot:
        raise ConfigError(f"'{spec.delete}' is boot-only and the machine exists")
    if spec.kind is Kind.DEVICE and vmm.machine is not None:
        return await _unplug(vmm, key)
    await change(
        vmm,
        lambda c: c.remove(spec.kind, key),
        on_engine=lambda: vmm.engine().execute(spec.delete, {spec.delete_key: key}),
    )
    if spec.kind is Kind.CHARDEV:
        vmm.consoles.forget(key)
    return {}


for _spec in KINDS.values():
    if _spec.kind is Kind.DRIVE:  # qmpvm's own: QEMU's drive options, any of them
        REGISTRY.command(_spec.add, args={"id": "str"}, extra_members=True)(add)
        REGISTRY.command(_spec.delete, args={"id": "str"})(delete)
    else:  # device_add is 'gen': false in QEMU: properties beyond driver/id/bus pass
        REGISTRY.command(_spec.add, args=ENGINE_ARGS, extra_members=_spec.kind is Kind.DEVICE)(add)
        REGISTRY.command(_spec.delete, args=ENGINE_ARGS)(delete)


async def _typed_device(vmm: Vmm, args: dict[str, object]) -> dict[str, object]:
    """The driver checked against the engine's device types; text values typed
    from the engine's property types (QMP's device_add takes text for any
    property, the engine's JSON ``-device`` does not)."""
    driver = str(args["driver"])
    if await vmm.capabilities() is None:
        return args
    known = await _device_type(vmm, driver)
    if known is None:
        raise ConfigError(f"'{driver}' is not a valid device model name")
    if known.properties is None:
        return args
    out = dict(args)
    for name, value in args.items():
        if name in ("driver", "id", "bus"):
            continue
        kind = known.properties.get(name)
        if kind is None:
            raise ConfigError(f"Property '{driver}.{name}' not found")
        if name != "addr":  # a PCI address in text is slot.function, not a number
            out[name] = coerce_property(kind, value)
    return out


async def _device_type(vmm: Vmm, driver: str) -> DeviceType | None:
    """The engine's device type ``driver`` names, QEMU's aliases included."""
    caps = await vmm.capabilities()
    if caps is None:
        return None
    return caps.devices.get(driver) or caps.devices.get(DEVICE_ALIASES.get(driver, ""))


async def _hotplug_port(vmm: Vmm, args: Mapping[str, object]) -> str | None:
    """The root port a device hot-plugged on q35 goes into when the client named no bus."""
    machine = vmm.engine()
    machine_type = vmm.config.machine.type
    family = machine_family(machine_type)
    driver = str(args.get("driver"))
    if family in NO_HOTPLUG_MACHINES:
        raise ConfigError(
            f"Device '{driver}' cannot be hot-plugged: machine type "
            f"'{machine_type}' has no hot-pluggable bus (devices are boot-only there)"
        )
    if "bus" in args or family != "q35":
        return None
    caps = await vmm.capabilities()
    known = (
        caps.devices.get(driver) or caps.devices.get(DEVICE_ALIASES.get(driver, ""))
        if caps
        else None
    )
    if (known.bus if known is not None else ("pci" if driver.endswith("-pci") else None)) != "pci":
        return None
    for port in machine.hotplug_ports:
        if port not in machine.port_users:
            return port
    raise ConfigError(
        f"No free hot-plug port: all {len(machine.hotplug_ports)} root ports are in use "
        "(machine-set 'hotplug-ports' sets how many the next machine-init provides)"
    )


async def _unplug(vmm: Vmm, device_id: str) -> object:
    """Asks the guest to let go; the store forgets the device on DEVICE_DELETED."""
    if vmm.config.find(Kind.DEVICE, device_id) is None:
        raise NotFoundError(f"Device '{device_id}' not found")
    if machine_family(vmm.config.machine.type) in NO_HOTPLUG_MACHINES:
        raise ConfigError(
            f"Device '{device_id}' cannot be unplugged: machine type "
            f"'{vmm.config.machine.type}' has no hot-pluggable bus"
        )
    await vmm.engine().execute("device_del", {"id": device_id})
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


async def _share_fdsets(vmm: Vmm, wanted: set[int]) -> None:
    """Give the running engine the fdsets a hot-plugged node opens.

    At machine-init every fdset goes over with ``-add-fd``; one added
    later must be passed on the private link before the engine can open it.
    """
    if not wanted:
        return
    engine = vmm.engine()
    known = await engine.execute("query-fdsets", {})
    have = {entry["fdset-id"] for entry in known} if isinstance(known, list) else set()
    for fdset_id in sorted(wanted - have):
        entries = vmm.fds.fdsets.get(fdset_id)
        if not entries:
            raise NotFoundError(f"File descriptor named 'fdset-id={fdset_id}' not found")
        for entry in entries:
            arguments: dict[str, object] = {"fdset-id": fdset_id}
            if entry.opaque is not None:
                arguments["opaque"] = entry.opaque
            await engine.execute("add-fd", arguments, fds=[entry.fd])


@REGISTRY.command("set_link", args=ENGINE_ARGS)
async def set_link(call: Call) -> object:
    name, up = str(call.args["name"]), bool(call.args["up"])
    vmm = call.vmm
    await change(
        vmm,
        lambda c: c.set_link(name, up),
        on_engine=lambda: vmm.engine().execute("set_link", {"name": name, "up": up}),
        undo=lambda: vmm.engine().execute("set_link", {"name": name, "up": not up}),
    )
    return {}
