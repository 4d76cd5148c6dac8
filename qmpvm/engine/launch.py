"""Configuration -> engine command line, as a pure function.

The engine is started paused (``-S``) with ``-no-user-config`` and, unless
the configuration asks for QEMU's default devices, ``-nodefaults``: it
builds exactly what the store says, and ``cont`` resumes it.  Every machine
setting with an engine option is written from the settings table; block
nodes, netdevs, objects and devices use QEMU's JSON option syntax (the
same documents the store keeps); QEMU 7.2's ``-chardev`` and ``-drive``
have no JSON form, so they are written as key=value with commas doubled.
The hot-plug root ports qmpvm adds on q35 come after the user's devices,
so those get the PCI addresses QEMU would give them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qmpvm.config import chardev
from qmpvm.config.descriptors import NETDEV_FD_MEMBERS, chardev_fd
from qmpvm.config.kinds import KINDS
from qmpvm.config.machine import SETTINGS, MachineConfig, MiB, as_object
from qmpvm.config.model import Config
from qmpvm.config.resource import Kind, Resource
from qmpvm.errors import ConfigError
from qmpvm.keyval import encode

LINK_CHARDEV = "qmpvm-link"
HOTPLUG_PORT_PREFIX = "qmpvm-hp"

# Machine types with a PCIe root bus that cannot hot-plug: qmpvm adds root
# ports so that hot-plugged PCI devices have somewhere to go (as libvirt does).
PCIE_MACHINES = ("q35", "pc-q35")
NO_HOTPLUG_MACHINES = ("microvm",)
STATE_SOURCES = ("incoming", "loadvm")
"""Settings that say where the machine's state comes from: a restore says it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchPlan:
    argv: tuple[str, ...]
    pass_fds: tuple[int, ...]
    hotplug_ports: tuple[str, ...]  # ids of the root ports provided for hot-plug
    holds_on_shutdown: bool  # the guest's power-off pauses it; qmpvm ends it
    after_start: tuple[tuple[str, Mapping[str, object]], ...]  # commands before cont


def machine_family(machine_type: str) -> str:
    """'q35', 'pc', 'microvm' or the type itself, for versioned names too."""
    if machine_type.startswith(PCIE_MACHINES):
        return "q35"
    if machine_type == "microvm":
        return "microvm"
    if machine_type.startswith("pc"):
        return "pc"
    return machine_type


def build_launch(
    config: Config,
    *,
    binary: str,
    accel: str,
    link_fd: int,
    named_fds: Mapping[str, int],
    fdsets: Mapping[int, list[int]],
    incoming: bool = False,
    link_listens: bool = False,
    spawn: bool = False,
    consoles: bool = False,
    inherited: Sequence[int] = (),
    opaques: Mapping[int, str] | None = None,
) -> LaunchPlan:
    """The engine's argv and the descriptors it inherits; ``config`` is as
    the engine is given it (``qmpvm.host.opening``), ``consoles``: qmpvm
    serves some of its chardevs, ``inherited``: descriptors it names by
    ``/proc/self/fd/N``; ``opaques``: fdset members' opaque strings, by
    descriptor; ``incoming``: it
    waits for its state (``migrate-incoming``) instead of booting, whatever
    ``incoming``/``loadvm`` the configuration names; ``link_listens``: the
    link descriptor is a listening socket, not a connected one; ``spawn``:
    the engine may start host programs (``--allow-host-programs``)."""
    machine = config.machine
    argv = [binary, *machine_options(machine, accel, incoming=incoming)]
    argv += sandbox_options(machine, spawn=spawn)
    # An engine that outlives qmpvm holds a powered-off guest until a qmpvm has
    # read the consoles' last output from their FIFOs (they go with the engine).
    holds = link_listens and consoles and "shutdown" not in as_object(machine.get("action"))
    if holds:
        argv += ["-action", "shutdown=pause"]
    boot = config.boot
    for option, value in (("-kernel", boot.kernel), ("-initrd", boot.initrd),
                          ("-append", boot.append)):  # fmt: skip
        if value is not None:
            argv += [option, value]
    # a connected socket; or one listening, which a later qmpvm can connect to again
    link = f"socket,id={LINK_CHARDEV},fd={link_fd}"
    argv += ["-chardev", f"{link},server=on,wait=off" if link_listens else link]
    argv += ["-mon", f"chardev={LINK_CHARDEV},mode=control"]
    pass_fds = [link_fd, *inherited]
    for fdset_id, fds in sorted(fdsets.items()):
        for fd in fds:
            member: dict[str, object] = {"fd": fd, "set": fdset_id}
            if fd in (opaques or {}):
                member["opaque"] = (opaques or {})[fd]
            argv += ["-add-fd", encode(member)]
            pass_fds.append(fd)
    for kind in KINDS:
        for resource in config.of_kind(kind):
            value, fds = _option_value(resource, named_fds)
            argv += [KINDS[kind].option, value]
            pass_fds.extend(fds)
    ports: list[str] = []
    if machine_family(machine.type) == "q35":
        for index in range(machine.hotplug_ports):
            port = f"{HOTPLUG_PORT_PREFIX}{index}"
            ports.append(port)
            device = {"driver": "pcie-root-port", "id": port, "bus": "pcie.0",
                      "chassis": 0x40 + index}  # fmt: skip
            argv += ["-device", _json(device)]
    after_start = tuple(
        ("set_link", {"name": name, "up": up}) for name, up in sorted(config.links.items())
    )
    return LaunchPlan(
        argv=tuple(argv),
        pass_fds=tuple(dict.fromkeys(pass_fds)),
        hotplug_ports=tuple(ports),
        holds_on_shutdown=holds,
        after_start=after_start,
    )


SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn={spawn},resourcecontrol=deny"
"""QEMU's seccomp filter, as libvirt sets it; spawn is allowed only when qmpvm
lets the engine run host programs (tap scripts, exec: migration, smbd)."""


def sandbox_options(machine: MachineConfig, *, spawn: bool) -> list[str]:
    """The engine's syscall filter, unless the configuration sets its own
    (``sandbox``, a libvirt command line's) or lifts it (``confine``)."""
    if machine.get("sandbox") is not None:
        return []
    if as_object(machine.get("confine")).get("seccomp", True) is False:
        return []
    return ["-sandbox", SANDBOX.format(spawn="allow" if spawn else "deny")]


def machine_options(machine: MachineConfig, accel: str, *, incoming: bool = False) -> list[str]:
    """The options for the machine's own settings, in the settings table's order."""
    argv = [] if machine.get("defaults") else ["-nodefaults"]
    if incoming:
        argv += ["-incoming", "defer"]
    argv += ["-no-user-config", "-S"]
    if machine.get("display") is None:
        argv += ["-display", "none"]
    properties = as_object(machine.get("properties"))
    argv += ["-machine", encode({"type": machine.type, **properties}, "type")]
    accel_properties = as_object(as_object(machine.get("accel-properties")).get(accel))
    argv += ["-accel", encode({"accel": accel, **accel_properties}, "accel")]
    memory: dict[str, object] = {"size": f"{machine.memory // MiB}M"}
    for member, key in (("memory-slots", "slots"), ("maxmem", "maxmem")):
        if machine.get(member) is not None:
            memory[key] = machine.get(member)
    argv += ["-m", encode(memory)]
    smp = as_object(machine.get("smp"))
    if "cpus" in machine.values or not smp:  # a topology alone: QEMU counts the cpus
        smp = {"cpus": machine.cpus, **smp}
    argv += ["-smp", encode(smp)]
    name = as_object(machine.get("name-options"))
    if machine.name is not None:
        name = {"guest": machine.name, **name}
    if name:
        argv += ["-name", encode(name)]
    for setting in SETTINGS.values():
        value = machine.get(setting.name)
        if setting.option is None or value is None or value is False:
            continue
        if incoming and setting.name in STATE_SOURCES:
            continue
        if setting.shape == "bool":
            argv.append(setting.option)
        elif setting.shape == "object":
            argv += [setting.option, encode(as_object(value), setting.implied)]
        elif setting.shape in ("objects", "strs"):
            for item in value if isinstance(value, list) else ():
                text = encode(item, setting.implied) if isinstance(item, dict) else str(item)
                argv += [setting.option, text]
        else:
            argv += [setting.option, str(value)]
    return argv


def _option_value(resource: Resource, named_fds: Mapping[str, int]) -> tuple[str, list[int]]:
    if resource.kind is Kind.CHARDEV:
        args, fds = _chardev_fd_number(resource.args, named_fds)
        return chardev_option(args), fds
    if resource.kind is Kind.DRIVE:
        return encode(dict(resource.args)), []
    if resource.kind is Kind.OBJECT:
        return _json(resource.args), []
    if resource.kind is Kind.NETDEV:
        args, fds = resolve_fd_names(resource.args, named_fds)
        return _json(args), fds
    return _json(resource.args), []


def _chardev_fd_number(
    args: Mapping[str, object], named_fds: Mapping[str, int]
) -> tuple[Mapping[str, object], list[int]]:
    """A socket chardev on a passed descriptor, its getfd name made the inherited number."""
    name = chardev_fd(args)
    if name is None:
        return args, []
    if name not in named_fds:
        raise ConfigError(
            f"chardev '{args.get('id')}' needs file descriptor '{name}': pass it with getfd"
        )
    backend = dict(args["backend"])  # type: ignore[call-overload]
    data = dict(backend["data"])
    data["addr"] = {"type": "fd", "data": {"str": str(named_fds[name])}}
    backend["data"] = data
    return {**args, "backend": backend}, [named_fds[name]]


def resolve_fd_names(
    args: Mapping[str, object], named_fds: Mapping[str, int]
) -> tuple[dict[str, object], list[int]]:
    """Netdev arguments with getfd names replaced by inherited fd numbers."""
    out = dict(args)
    used: list[int] = []
    for member in NETDEV_FD_MEMBERS:
        value = out.get(member)
        if not isinstance(value, str):
            continue
        numbers = []
        for name in value.split(":"):
            if name.isdigit():
                raise ConfigError(
                    f"netdev '{args.get('id')}': pass descriptors with getfd and name them "
                    f"(a bare number such as '{name}' means nothing to the engine)"
                )
            if name not in named_fds:
                raise ConfigError(
                    f"netdev '{args.get('id')}' needs file descriptor '{name}': pass it with getfd"
                )
            numbers.append(str(named_fds[name]))
            used.append(named_fds[name])
        out[member] = ":".join(numbers)
    return out, used


def chardev_option(args: Mapping[str, object]) -> str:
    """A stored chardev-add as QEMU 7.2's -chardev key=value string."""
    pairs = dict(chardev.to_legacy(args))
    return encode(pairs, "backend")


def _json(value: Mapping[str, object]) -> str:
    return json.dumps(value, separators=(",", ":"))
