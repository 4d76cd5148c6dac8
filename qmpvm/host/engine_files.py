"""What the engine would open on the host, and what qmpvm opens for it instead.

qmpvm opens the files a configuration names (disk images, the kernel and
initrd) and hands the engine descriptors: an image as ``/dev/fdset/N`` (QEMU
duplicates a descriptor of the set with the access mode it asks for), the
kernel and initrd as ``/proc/self/fd/N`` (QEMU 7.2 opens those by name, and
the name of an inherited descriptor opens the same file).  What is left, the
engine must open itself, and so it keeps qmpvm's user: those items are the
plan's ``blockers``, each saying what and why.  Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from qmpvm.config.chardev import backend_of
from qmpvm.config.machine import as_object
from qmpvm.config.model import Config
from qmpvm.config.resource import Kind, Resource
from qmpvm.host.console_wiring import served, socket_address

FILE_DRIVERS = frozenset({"file", "host_device", "host_cdrom"})
NETWORK_DRIVERS = frozenset(
    {"nbd", "iscsi", "ssh", "http", "https", "ftp", "ftps", "gluster", "rbd", "nfs", "null-co",
     "null-aio", "nvme"}
)  # fmt: skip

SAFE_OBJECTS = frozenset(
    {"memory-backend-ram", "memory-backend-memfd", "iothread", "throttle-group", "rng-builtin",
     "main-loop", "thread-context", "authz-simple", "cryptodev-backend-builtin", "can-bus",
     "secret", "secret_keyring", "rng-random", "input-barrier"}
)  # fmt: skip
"""Object types that open no host path (``secret`` and ``rng-random``: unless
they name a file other than the random devices)."""
RANDOM_DEVICES = ("/dev/urandom", "/dev/random")

ENGINE_CHARDEVS = frozenset(
    {"pty", "null", "vc", "msmouse", "wctablet", "braille", "testdev", "udp", "mux",
     "qemu-vdagent", "memory", "ringbuf"}
)  # fmt: skip
"""Backends the engine serves without opening a host path (and ``socket`` on
an inet address or a passed descriptor)."""

NETDEVS = frozenset({"user", "hubport", "socket", "vhost-user"})
HOST_DEVICES = ("vfio", "usb-host", "vhost-vsock", "vhost-scsi", "u2f-passthru", "loader",
                "vhost-vdpa", "xen", "pci-assign")  # fmt: skip
"""Device drivers that reach host devices or files themselves."""

PATH_SETTINGS: Mapping[str, tuple[str, ...]] = {
    "smbios": ("file",), "acpitable": ("file", "data"), "fw-cfg": ("file",),
    "option-rom": ("romfile",),
}  # fmt: skip
"""Machine settings whose items may name a file (the members that do)."""
HOST_SETTINGS = ("mem-path", "fsdev", "virtfs", "tpmdev", "firmware-dirs", "dtb", "plugin",
                 "iscsi", "net", "nic", "usbdevice", "spice", "gdb")  # fmt: skip
"""Machine settings the engine acts on by opening host paths, devices or ports."""
MACHINE_PATH_PROPERTIES = ("dumpdtb", "dtb", "firmware", "kernel", "initrd")


AUTO_READ_ONLY = (
    "QEMU opens it read-only and reopens it read-write for a writer; an fdset "
    "holding a descriptor for each would keep the first one's image locks"
)


@dataclass(frozen=True, slots=True)
class HostFile:
    """An image file qmpvm opens for the engine: read-write, unless the
    configuration says read-only (or the host refuses)."""

    path: str
    read_only: bool
    what: str  # for errors: "blockdev 'disk0'"
    backing_given: bool = False  # its blockdev-add names a backing node itself


@dataclass(frozen=True, slots=True)
class HostPlan:
    files: tuple[HostFile, ...]
    boot: tuple[str, ...]  # the kernel, the initrd
    blockers: tuple[str, ...]  # what the engine opens itself


def plan(config: Config) -> HostPlan:
    files: list[HostFile] = []
    blockers: list[str] = []
    for resource in config.resources:
        if resource.kind is Kind.BLOCK:
            what = f"blockdev '{resource.key}'"
            found: list[HostFile] = []
            _block_files(resource.args, what, False, found, blockers)
            given = _names_backing(resource.args)
            files += [dataclasses.replace(f, backing_given=given) for f in found]
        elif resource.kind is Kind.DRIVE:
            _drive_file(resource, files, blockers)
        else:
            blocker = _blocker(resource, config)
            if blocker is not None:
                blockers.append(blocker)
    blockers += _setting_blockers(config)
    boot = tuple(path for path in (config.boot.kernel, config.boot.initrd) if path)
    return HostPlan(tuple(files), boot, tuple(blockers))


def _block_files(
    node: Mapping[str, object],
    what: str,
    read_only: bool,
    files: list[HostFile],
    blockers: list[str],
) -> None:
    read_only = read_only or node.get("read-only") is True
    driver = str(node.get("driver", ""))
    filename = node.get("filename")
    if driver in FILE_DRIVERS and isinstance(filename, str):
        if filename.startswith("/dev/fdset/"):
            pass
        elif node.get("auto-read-only") is True and not read_only:
            blockers.append(f"{what}: '{filename}' is auto-read-only ({AUTO_READ_ONLY})")
        else:
            files.append(HostFile(filename, read_only, what))
    elif isinstance(filename, str) and driver not in NETWORK_DRIVERS:
        blockers.append(f"{what}: driver '{driver}' opens '{filename}' itself")
    for child in node.values():
        if isinstance(child, Mapping) and "driver" in child:
            _block_files(child, what, read_only, files, blockers)


def _names_backing(node: Mapping[str, object]) -> bool:
    return "backing" in node or any(
        _names_backing(child) for child in node.values() if isinstance(child, Mapping)
    )


def _drive_file(resource: Resource, files: list[HostFile], blockers: list[str]) -> None:
    """A -drive's ``file``: a plain path (or ``file:PATH``) is opened for it."""
    args = resource.args
    given = args.get("file")
    if not isinstance(given, str) or not given or given.startswith("/dev/fdset/"):
        return
    if any(key.startswith("file.") for key in args):
        blockers.append(f"drive '{resource.key}': its file options ('file.*') open it itself")
        return
    path = given.removeprefix("file:")
    if path == given and _has_protocol(given):
        if given.startswith("json:"):
            blockers.append(f"drive '{resource.key}': a json: file name opens files itself")
        return  # a network protocol
    read_only = any(args.get(k) in (True, "on") for k in ("read-only", "readonly"))
    if not (read_only or args.get("media") == "cdrom"):
        blockers.append(f"drive '{resource.key}': '{path}' is written ({AUTO_READ_ONLY})")
        return
    files.append(HostFile(path, True, f"drive '{resource.key}'"))


def _has_protocol(name: str) -> bool:
    """QEMU's rule: a ``:`` before any ``/`` names a protocol."""
    colon, slash = name.find(":"), name.find("/")
    return colon > 0 and (slash < 0 or colon < slash)


def _blocker(resource: Resource, config: Config) -> str | None:
    args = resource.args
    if resource.kind is Kind.OBJECT:
        qom_type = str(args.get("qom-type"))
        if qom_type not in SAFE_OBJECTS:
            return f"object '{resource.key}' ({qom_type}) may open host files itself"
        named = args.get("filename") or args.get("file")
        if isinstance(named, str) and named not in RANDOM_DEVICES:
            return f"object '{resource.key}' opens '{named}' itself"
    elif resource.kind is Kind.CHARDEV:
        return _chardev_blocker(resource, config)
    elif resource.kind is Kind.NETDEV:
        netdev = str(args.get("type"))
        if netdev == "tap":
            if not args.get("fd") and not args.get("fds"):
                return f"netdev '{resource.key}': a tap the engine opens itself (pass it an fd)"
            if args.get("vhost") and not (args.get("vhostfd") or args.get("vhostfds")):
                return f"netdev '{resource.key}': vhost-net the engine opens itself"
            if args.get("script") not in (None, "no", "") or args.get("downscript") not in (
                None, "no", ""
            ):  # fmt: skip
                return f"netdev '{resource.key}': runs host scripts"
        elif netdev not in NETDEVS:
            return f"netdev '{resource.key}' ({netdev}) opens host resources itself"
        elif netdev == "user" and any(args.get(k) for k in ("tftp", "bootfile", "smb")):
            return f"netdev '{resource.key}' serves host files itself (tftp, bootfile, smb)"
    elif resource.kind is Kind.DEVICE:
        driver = str(args.get("driver"))
        if driver.startswith(HOST_DEVICES):
            return f"device '{resource.key}' ({driver}) reaches host devices itself"
        romfile = args.get("romfile")
        if isinstance(romfile, str) and "/" in romfile:
            return f"device '{resource.key}' opens its romfile '{romfile}' itself"
    return None


def _chardev_blocker(resource: Resource, config: Config) -> str | None:
    if served(config, resource.args):  # qmpvm opens what it needs, its logfile too
        return None
    backend, data = backend_of(resource.args)
    logfile = data.get("logfile")
    if isinstance(logfile, str) and not logfile.startswith("/dev/fdset/"):
        return f"chardev '{resource.key}' writes its log file '{logfile}' itself"
    if backend in ENGINE_CHARDEVS:
        return None
    if backend == "socket" and socket_address(data)[0] in ("inet", "fd"):
        return None
    return f"chardev '{resource.key}' ({backend}) opens host paths itself"


def _setting_blockers(config: Config) -> list[str]:
    machine = config.machine
    found: list[str] = []
    for name in HOST_SETTINGS:
        if machine.get(name) not in (None, False, [], {}):
            found.append(f"machine setting '{name}' has the engine open host resources itself")
    for name, members in PATH_SETTINGS.items():
        value = machine.get(name)
        for item in value if isinstance(value, list) else []:
            if isinstance(item, Mapping) and any(member in item for member in members):
                found.append(f"machine setting '{name}' names files the engine opens itself")
                break
    for name in ("bios",):
        value = machine.get(name)
        if isinstance(value, str) and "/" in value:
            found.append(f"machine setting '{name}' names '{value}', which the engine opens")
    display = as_object(machine.get("display"))
    if machine.get("display") is not None and display.get("type") not in ("none", None):
        found.append("a display opens the host's display server")
    if machine.get("vnc") is not None:
        found.append("machine setting 'vnc': the engine listens itself")
    properties = as_object(machine.get("properties"))
    for name in MACHINE_PATH_PROPERTIES:
        if name in properties:
            found.append(f"machine property '{name}' names a file the engine opens itself")
    incoming = machine.get("incoming")
    if isinstance(incoming, str) and incoming.split(":", 1)[0] not in ("defer", "tcp", "fd"):
        found.append(f"incoming '{incoming}': the engine opens it itself")
    return found


def engine_config(
    config: Config,
    paths: Mapping[str, str],
    consoles: Mapping[str, Mapping[str, object]],
) -> Config:
    """``config`` as the engine is given it: the paths qmpvm opened replaced by
    the names of its descriptors (``paths``: path -> engine name), and each
    console qmpvm serves replaced by the chardev that reaches it (``consoles``:
    id -> chardev-add arguments)."""
    resources = []
    for resource in config.resources:
        args: Mapping[str, object] = resource.args
        if resource.kind is Kind.BLOCK:
            args = _renamed_files(args, paths)
        elif resource.kind is Kind.DRIVE and isinstance(args.get("file"), str):
            given = str(args["file"])
            name = paths.get(given.removeprefix("file:"))
            if name is not None:
                args = {**args, "file": name}
        elif resource.kind is Kind.CHARDEV and resource.key in consoles:
            args = consoles[resource.key]
        resources.append(dataclasses.replace(resource, args=args))
    boot = config.boot
    boot = dataclasses.replace(
        boot,
        kernel=paths.get(boot.kernel or "", boot.kernel),
        initrd=paths.get(boot.initrd or "", boot.initrd),
    )
    return dataclasses.replace(config, resources=tuple(resources), boot=boot)


def _renamed_files(node: Mapping[str, object], paths: Mapping[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, Mapping) and "driver" in value:
            out[key] = _renamed_files(value, paths)
        elif key == "filename" and str(node.get("driver")) in FILE_DRIVERS:
            out[key] = paths.get(str(value), value)
        else:
            out[key] = value
    return out
