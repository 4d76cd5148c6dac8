"""Machine creation: the boot-only settings, machine-init, and what the
engine can build (answered from the capability cache, machine or not)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from qmpvm.commands.common import REGISTRY, change
from qmpvm.config.boot import BootSet
from qmpvm.config.machine import Accel, MachineSet
from qmpvm.errors import ConfigError, QmpvmError
from qmpvm.monitor.dispatch import BEFORE_INIT, Call
from qmpvm.schema import to_json
from qmpvm.vmm import Vmm


def refuse_boot_only(vmm: Vmm, command: str, given: dict[str, object]) -> None:
    """Boot-only settings cannot change under a running machine."""
    if vmm.machine is not None and given:
        setting = next(iter(given))
        raise ConfigError(
            f"'{setting}' is a boot-only setting and the machine exists; "
            f"{command} is only allowed before machine-init"
        )


@REGISTRY.command("machine-set", args=MachineSet)
async def machine_set(call: Call) -> object:
    args: MachineSet = call.args
    refuse_boot_only(call.vmm, "machine-set", to_json(args))
    caps = await call.vmm.capabilities() if args.type or args.accel else None
    if caps is not None and args.type is not None and args.type not in caps.machines:
        raise ConfigError(
            f"Machine type '{args.type}' is not supported by the engine (see query-machines)"
        )
    if args.accel is not None:
        check_accel(args.accel, caps.accelerators if caps is not None else None)
    return await change(call.vmm, lambda c: c.set_machine(args))


def check_accel(accel: Accel, built_in: tuple[str, ...] | None) -> None:
    if built_in is not None and accel not in built_in:
        raise ConfigError(f"Accelerator '{accel}' is not built into the engine")
    if accel is Accel.KVM:
        from qmpvm.engine.host import kvm_state  # only KVM needs a look at the host

        state = kvm_state()
        if not state.present:
            raise ConfigError(f"Accelerator 'kvm' is not available on this host: {state.reason}")


@REGISTRY.command("boot-set", args=BootSet)
async def boot_set(call: Call) -> object:
    args: BootSet = call.args
    refuse_boot_only(call.vmm, "boot-set", to_json(args))
    check_boot_files(args.kernel, args.initrd)
    return await change(call.vmm, lambda c: c.set_boot(args))


def check_boot_files(kernel: str | None, initrd: str | None) -> None:
    """Missing boot files are refused when named, and again at machine-init."""
    for member, path in (("kernel", kernel), ("initrd", initrd)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"Parameter '{member}': could not open '{path}': no such file")


@REGISTRY.command("machine-init", phases=BEFORE_INIT, aliases=("x-exit-preconfig",))
async def machine_init(call: Call) -> object:
    vmm = call.vmm
    async with vmm.change_lock:
        check_boot_files(vmm.config.boot.kernel, vmm.config.boot.initrd)
        await vmm.init_machine()
    return {}


@REGISTRY.command("query-machines", returns=object)
async def query_machines(call: Call) -> object:
    caps = await call.vmm.capabilities()
    if caps is None:
        raise QmpvmError("The engine's capabilities are unavailable (is QEMU installed?)")
    seen: dict[str, object] = {}
    for entry in caps.machines.values():
        seen.setdefault(str(entry.get("name")), entry)
    return list(seen.values())


@dataclass(frozen=True, slots=True, kw_only=True)
class QomListTypes:
    implements: str | None = None
    abstract: bool | None = None


@REGISTRY.command("qom-list-types", args=QomListTypes, returns=object)
async def qom_list_types(call: Call) -> object:
    args: QomListTypes = call.args
    caps = await call.vmm.capabilities()
    if caps is None:
        raise QmpvmError("The engine's capabilities are unavailable (is QEMU installed?)")
    if args.implements not in (None, "device"):
        return await call.vmm.forward("qom-list-types", to_json(args))
    return [{"name": name} for name in caps.devices]  # names only: nothing to decode


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceListProperties:
    typename: str


@REGISTRY.command("device-list-properties", args=DeviceListProperties, returns=object)
async def device_list_properties(call: Call) -> object:
    args: DeviceListProperties = call.args
    caps = await call.vmm.capabilities()
    device = caps.devices.get(args.typename) if caps is not None else None
    if device is None or device.properties is None:
        if call.vmm.machine is not None:
            return await call.vmm.forward("device-list-properties", to_json(args))
        raise ConfigError(f"Device '{args.typename}' not found")
    return [{"name": name, "type": kind} for name, kind in device.properties.items()]
