"""Machine creation: the machine's settings, the boot source, machine-init."""

from __future__ import annotations

import os
import stat
import typing
from collections.abc import Mapping, Sequence

from qmpvm.commands.common import REGISTRY, change
from qmpvm.config.boot import BootSet
from qmpvm.config.machine import SETTINGS, as_object, declaration
from qmpvm.errors import ConfigError
from qmpvm.monitor.dispatch import BEFORE_INIT, ENGINE_ARGS, Call
from qmpvm.vmm import Vmm

if typing.TYPE_CHECKING:
    from qmpvm.engine.caps import Capabilities


def refuse_boot_only(vmm: Vmm, command: str, given: Mapping[str, object]) -> None:
    """Boot-only settings cannot change under a running machine."""
    boot_only = [name for name in given if not (name in SETTINGS and SETTINGS[name].hot)]
    if vmm.machine is not None and boot_only:
        raise ConfigError(
            f"'{boot_only[0]}' is a boot-only setting and the machine exists; "
            f"{command} is only allowed before machine-init"
        )


@REGISTRY.command("machine-set", args=declaration())
async def machine_set(call: Call) -> object:
    given = dict(call.args)
    vmm = call.vmm
    refuse_boot_only(vmm, "machine-set", given)
    caps = await vmm.capabilities()
    if caps is not None:
        check_with_engine(given, caps, str(given.get("type", vmm.config.machine.type)))
    elif given.get("accel") == "kvm":
        check_accel("kvm", None)
    action = given.get("action")

    async def on_engine() -> object:
        return await engine_set_action(vmm, typing.cast(dict[str, object], action))

    return await change(
        vmm, lambda c: c.set_machine(given), on_engine=on_engine if action else None
    )


@REGISTRY.command("set-action", args=ENGINE_ARGS)
async def set_action(call: Call) -> object:
    """QEMU's set-action, kept in the ``action`` setting for the next engine too."""
    vmm = call.vmm
    return await change(
        vmm,
        lambda c: c.set_machine({"action": dict(call.args)}),
        on_engine=lambda: engine_set_action(vmm, call.args),
    )


async def engine_set_action(vmm: Vmm, action: Mapping[str, object]) -> object:
    """set-action on the engine; a shutdown action given is the client's, and
    replaces the pause qmpvm asked for to read the consoles after a power-off."""
    machine = vmm.engine()
    result = await machine.execute("set-action", action)
    if "shutdown" in action:
        machine.holds_on_shutdown = False
    return result


def check_with_engine(given: Mapping[str, object], caps: Capabilities, machine_type: str) -> None:
    """What the engine can tell about a setting before it starts, in its words."""
    if "type" in given and machine_type not in caps.machines:
        raise ConfigError(
            f"Machine type '{machine_type}' is not supported by the engine (see query-machines)"
        )
    accel = given.get("accel")
    if isinstance(accel, str):
        for choice in accel.split(":"):
            check_accel(choice, caps.accelerators, alone=":" not in accel)
    properties = as_object(given.get("properties"))
    real_name = str(caps.machines.get(machine_type, {}).get("name", machine_type))
    known = caps.machine_properties.get(real_name) if properties else None
    legacy = caps.command_line_options.get("machine") or {}  # kernel_irqchip and the like
    for name in properties:
        spellings = {name, name.replace("_", "-"), name.replace("-", "_")}
        if known is not None and not spellings & (set(known) | set(legacy)):
            raise ConfigError(f"Property '{real_name}-machine.{name}' not found")
    model = as_object(given.get("cpu")).get("model")
    known_models = (*caps.cpu_models, "host", "max", "base")
    if isinstance(model, str) and caps.cpu_models and model not in known_models:
        raise ConfigError(f"unable to find CPU model '{model}'")
    for name, value in given.items():
        group = SETTINGS[name].group
        params = caps.command_line_options.get(group) if group else None
        if not params:
            continue
        for item in value if isinstance(value, list) else [value]:
            for key in as_object(item):
                if key not in params and key != "id":  # QEMU's option parser takes ids
                    raise ConfigError(f"Invalid parameter '{key}' for '{name}'")


def check_accel(accel: str, built_in: Sequence[str] | None, *, alone: bool = True) -> None:
    if built_in is not None and accel not in built_in:
        raise ConfigError(f"Accelerator '{accel}' is not built into the engine")
    if accel == "kvm" and alone:
        from qmpvm.engine.host import kvm_state  # only KVM needs a look at the host

        state = kvm_state()
        if not state.present:
            raise ConfigError(f"Accelerator 'kvm' is not available on this host: {state.reason}")


@REGISTRY.command("boot-set", args={"kernel": "str", "*initrd": "str", "*append": "str"})
async def boot_set(call: Call) -> object:
    args = BootSet(**call.args)
    refuse_boot_only(call.vmm, "boot-set", call.args)
    check_boot_files(args.kernel, args.initrd)
    return await change(call.vmm, lambda c: c.set_boot(args))


def check_boot_files(kernel: str | None, initrd: str | None) -> None:
    """Boot files are checked when named, and again at machine-init: each must
    be a readable regular file (not a directory, a device, or empty)."""
    for member, path in (("kernel", kernel), ("initrd", initrd)):
        if path is None:
            continue
        problem = boot_file_problem(path)
        if problem:
            raise ConfigError(f"Parameter '{member}': '{path}' {problem}")


def boot_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be a kernel or initrd, in words; None if it can."""
    if not path:
        return "is empty: name a file"
    try:  # non-blocking: a FIFO must not hang the monitor
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        return f"cannot be opened: {err.strerror}"
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_size == 0:
        return "is an empty file"
    return None


@REGISTRY.command("machine-init", phases=BEFORE_INIT, aliases=("x-exit-preconfig",))
async def machine_init(call: Call) -> object:
    vmm = call.vmm
    async with vmm.change_lock:
        check_boot_files(vmm.config.boot.kernel, vmm.config.boot.initrd)
        await vmm.init_machine()
    return {}
