"""Configuration -> engine command line, as a pure function.

The engine is always started with ``-nodefaults -no-user-config -S``: it
builds exactly what the store says, paused, and ``cont`` resumes it.  Block
nodes, netdevs and devices use QEMU's JSON option syntax (the same documents
the store keeps); QEMU 7.2's ``-chardev`` has no JSON form, so chardevs are
written in its key=value form with commas doubled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from qmpvm.config import chardev, netdev
from qmpvm.config.machine import MiB
from qmpvm.config.model import Config
from qmpvm.config.resource import Kind, Resource
from qmpvm.errors import ConfigError

LINK_CHARDEV = "qmpvm-link"
HOTPLUG_PORT_PREFIX = "qmpvm-hp"

# Machine types with a PCIe root bus that cannot hot-plug: qmpvm adds root
# ports so that hot-plugged PCI devices have somewhere to go (as libvirt does).
PCIE_MACHINES = ("q35", "pc-q35")
NO_HOTPLUG_MACHINES = ("microvm",)


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchPlan:
    argv: tuple[str, ...]
    pass_fds: tuple[int, ...]
    hotplug_ports: tuple[str, ...]  # ids of the root ports provided for hot-plug
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
) -> LaunchPlan:
    """The engine's argv and the descriptors it inherits."""
    machine = config.machine
    boot = config.boot
    argv = [binary, "-nodefaults", "-no-user-config", "-S", "-display", "none"]
    argv += ["-machine", machine.type, "-accel", accel]
    argv += ["-m", f"{machine.memory // MiB}M", "-smp", str(machine.cpus)]
    if machine.name is not None:
        argv += ["-name", _escape(machine.name)]
    if boot.kernel is not None:
        argv += ["-kernel", boot.kernel]
    if boot.initrd is not None:
        argv += ["-initrd", boot.initrd]
    if boot.append is not None:
        argv += ["-append", boot.append]
    argv += ["-chardev", f"socket,id={LINK_CHARDEV},fd={link_fd}"]
    argv += ["-mon", f"chardev={LINK_CHARDEV},mode=control"]
    pass_fds = [link_fd]
    for fdset_id, fds in sorted(fdsets.items()):
        for fd in fds:
            argv += ["-add-fd", f"fd={fd},set={fdset_id}"]
            pass_fds.append(fd)
    ports: list[str] = []
    if machine_family(machine.type) == "q35":
        for index in range(machine.hotplug_ports):
            port = f"{HOTPLUG_PORT_PREFIX}{index}"
            ports.append(port)
            device = {"driver": "pcie-root-port", "id": port, "bus": "pcie.0", "chassis": index + 1}
            argv += ["-device", _json(device)]
    for resource in config.resources:
        option, value, fds = _option(resource, named_fds)
        argv += [option, value]
        pass_fds.extend(fds)
    after_start = tuple(
        ("set_link", {"name": name, "up": up}) for name, up in sorted(config.links.items())
    )
    return LaunchPlan(
        argv=tuple(argv),
        pass_fds=tuple(dict.fromkeys(pass_fds)),
        hotplug_ports=tuple(ports),
        after_start=after_start,
    )


def _option(resource: Resource, named_fds: Mapping[str, int]) -> tuple[str, str, list[int]]:
    if resource.kind is Kind.CHARDEV:
        return "-chardev", chardev_option(resource.args), []
    if resource.kind is Kind.BLOCK:
        return "-blockdev", _json(resource.args), []
    if resource.kind is Kind.NETDEV:
        args, fds = resolve_fd_names(resource.args, named_fds)
        return "-netdev", _json(args), fds
    return "-device", _json(resource.args), []


def resolve_fd_names(
    args: Mapping[str, object], named_fds: Mapping[str, int]
) -> tuple[dict[str, object], list[int]]:
    """Netdev arguments with getfd names replaced by inherited fd numbers."""
    out = dict(args)
    used: list[int] = []
    for member in netdev.FD_MEMBERS:
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
    backend, data = chardev.backend_of(args)
    parts = [backend if backend != "memory" else "ringbuf", f"id={_escape(str(args['id']))}"]
    parts += [f"{key}={_value(value)}" for key, value in _chardev_options(backend, data)]
    return ",".join(parts)


def _chardev_options(backend: str, data: Mapping[str, object]) -> Iterator[tuple[str, object]]:
    if backend == "socket":
        addr = data["addr"]
        if not isinstance(addr, dict):
            raise ConfigError("chardev socket: 'addr' must be an object")
        kind, where = addr["type"], addr["data"]
        if kind == "unix":
            yield "path", where["path"]
        elif kind == "inet":
            yield "host", where["host"]
            yield "port", where["port"]
        else:
            yield "fd", where["str"]
        for key in ("server", "wait", "nodelay", "telnet", "reconnect", "logfile"):
            if key in data:
                yield key, data[key]
        return
    if backend == "file":
        yield "path", data["out"]
        for key in ("append", "logfile"):
            if key in data:
                yield key, data[key]
        return
    for key in ("size", "logfile"):
        if key in data:
            yield key, data[key]


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return _escape(str(value))


def _escape(text: str) -> str:
    return text.replace(",", ",,")


def _json(value: Mapping[str, object]) -> str:
    return json.dumps(value, separators=(",", ":"))
