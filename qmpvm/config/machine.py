"""The machine's own settings: one table row each, one piece of code for all.

A setting is a member of ``machine-set``.  Most stand for one QEMU option
(``boot`` is ``-boot``, ``numa`` is every ``-numa``); the row says the
option, the shape of the value, and whether it may change while a machine
runs (only ``action`` may: ``set-action`` changes it live).  The engine's
option descriptions (``query-command-line-options``) check the keys where
the engine lists them; the engine checks the rest when it starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from qmpvm.errors import ArgumentError, ConfigError

if TYPE_CHECKING:
    from qmpvm.qapi.check import TypeDecl

MiB = 1024 * 1024
MIN_MEMORY = MiB
MAX_CPUS = 288
MAX_HOTPLUG_PORTS = 24
"""q35's root bus has 32 slots; the machine's own devices use a few."""

SCALAR = (str, int, float, bool)


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    name: str
    shape: str  # "str", "int", "bool", "object" (key=value), "objects" (repeated), "strs"
    option: str | None  # the engine option it becomes; None: built with others
    default: object = None
    group: str | None = None  # query-command-line-options group that lists its keys
    implied: str | None = None  # the key an option's first bare value stands for
    hot: bool = False
    doc: str = ""


SETTINGS: Mapping[str, Setting] = {
    s.name: s
    for s in (
        Setting(name="type", shape="str", option=None, default="q35", doc="machine type"),
        Setting(name="accel", shape="str", option=None, doc="kvm, tcg, or a list kvm:tcg"),
        Setting(name="accel-properties", shape="object", option=None,
                doc="-accel A,KEY=V: accelerator name -> its properties"),
        Setting(name="properties", shape="object", option=None, doc="-machine TYPE,KEY=V"),
        Setting(name="name", shape="str", option=None, doc="-name guest=NAME"),
        Setting(name="name-options", shape="object", option=None, group="name",
                doc="-name process=,debug-threads="),
        Setting(name="memory", shape="int", option=None, default=128 * MiB, doc="bytes"),
        Setting(name="maxmem", shape="int", option=None, doc="-m maxmem= (bytes)"),
        Setting(name="memory-slots", shape="int", option=None, doc="-m slots="),
        Setting(name="cpus", shape="int", option=None, default=1, doc="-smp N"),
        Setting(name="smp", shape="object", option=None, group="smp-opts",
                doc="-smp topology: sockets, dies, clusters, cores, threads, maxcpus"),
        Setting(name="hotplug-ports", shape="int", option=None, default=4,
                doc="q35: free PCIe root ports qmpvm adds for device_add at run time"),
        Setting(name="defaults", shape="bool", option=None, default=False,
                doc="QEMU's default devices (a command line without -nodefaults)"),
        Setting(name="cpu", shape="object", option="-cpu", implied="model",
                doc="-cpu MODEL,FEATURE=on|off"),
        Setting(name="boot", shape="object", option="-boot", group="boot-opts", implied="order"),
        Setting(name="rtc", shape="object", option="-rtc", group="rtc"),
        Setting(name="uuid", shape="str", option="-uuid"),
        Setting(name="smbios", shape="objects", option="-smbios"),
        Setting(name="global", shape="objects", option="-global", group="global"),
        Setting(name="numa", shape="objects", option="-numa", implied="type"),
        Setting(name="action", shape="object", option="-action", group="action", hot=True,
                doc="reboot, shutdown, panic, watchdog (set-action changes it live)"),
        Setting(name="display", shape="object", option="-display", implied="type"),
        Setting(name="vnc", shape="object", option="-vnc", group="vnc", implied="vnc"),
        Setting(name="vga", shape="str", option="-vga"),
        Setting(name="spice", shape="object", option="-spice"),
        Setting(name="audiodev", shape="objects", option="-audiodev", implied="driver"),
        Setting(name="fsdev", shape="objects", option="-fsdev", group="fsdev",
                implied="fsdriver"),
        Setting(name="virtfs", shape="objects", option="-virtfs", group="virtfs",
                implied="fsdriver"),
        Setting(name="tpmdev", shape="objects", option="-tpmdev", implied="type"),
        Setting(name="net", shape="objects", option="-net", implied="type",
                doc="legacy -net (hub) networking"),
        Setting(name="nic", shape="objects", option="-nic", implied="type"),
        Setting(name="usbdevice", shape="strs", option="-usbdevice"),
        Setting(name="serial", shape="strs", option="-serial",
                doc="the board's serial ports, each 'chardev:ID' or 'none'"),
        Setting(name="parallel", shape="strs", option="-parallel",
                doc="the board's parallel ports, each 'chardev:ID' or 'none'"),
        Setting(name="msg", shape="object", option="-msg", group="msg"),
        Setting(name="overcommit", shape="object", option="-overcommit", group="overcommit"),
        Setting(name="sandbox", shape="object", option="-sandbox", group="sandbox",
                implied="enable"),
        Setting(name="confine", shape="object", option=None,
                doc='the engine\'s confinement: {"seccomp": false} lifts its syscall filter, '
                    '{"cgroup": false} leaves it in qmpvm\'s cgroup, {"user": false} runs '
                    'it as qmpvm\'s user, {"root": false} lets it see the host\'s files'),
        Setting(name="limits", shape="object", option=None,
                doc="the engine's cgroup limits: memory (bytes), pids, cpu (CPUs)"),
        Setting(name="monitors", shape="objects", option=None,
                doc='HMP monitors qmpvm serves on its consoles: {"chardev": ID, "mux": '
                    'true} shares the console with the guest (-serial mon:stdio)'),
        Setting(name="escape-char", shape="int", option=None, default=1,
                doc="-echr: the key (a character code) that starts a mux command; Ctrl-A"),
        Setting(name="icount", shape="object", option="-icount", group="icount",
                implied="shift"),
        Setting(name="fw-cfg", shape="objects", option="-fw_cfg", group="fw_cfg"),
        Setting(name="option-rom", shape="objects", option="-option-rom", group="option-rom",
                implied="romfile"),
        Setting(name="iscsi", shape="objects", option="-iscsi", group="iscsi"),
        Setting(name="bios", shape="str", option="-bios"),
        Setting(name="firmware-dirs", shape="strs", option="-L"),
        Setting(name="keyboard-layout", shape="str", option="-k"),
        Setting(name="mem-path", shape="str", option="-mem-path"),
        Setting(name="mem-prealloc", shape="bool", option="-mem-prealloc"),
        Setting(name="snapshot", shape="bool", option="-snapshot",
                doc="every disk writes to a temporary overlay"),
        Setting(name="debugcon", shape="strs", option="-debugcon",
                doc="the debug console's chardev, 'chardev:ID'"),
        Setting(name="audio", shape="object", option="-audio", implied="driver"),
        Setting(name="acpitable", shape="objects", option="-acpitable"),
        Setting(name="dtb", shape="str", option="-dtb"),
        Setting(name="seed", shape="str", option="-seed"),
        Setting(name="compat", shape="object", option="-compat"),
        Setting(name="gdb", shape="strs", option="-gdb", doc="the engine's gdb stub"),
        Setting(name="plugin", shape="objects", option="-plugin", implied="file"),
        Setting(name="only-migratable", shape="bool", option="-only-migratable"),
        Setting(name="singlestep", shape="bool", option="-singlestep"),
        Setting(name="win2k-hack", shape="bool", option="-win2k-hack"),
        Setting(name="no-fd-bootchk", shape="bool", option="-no-fd-bootchk"),
        Setting(name="async-teardown", shape="bool", option="-async-teardown"),
        Setting(name="enable-sync-profile", shape="bool", option="-enable-sync-profile"),
        Setting(name="full-screen", shape="bool", option="-full-screen"),
        Setting(name="portrait", shape="bool", option="-portrait"),
        Setting(name="rotate", shape="str", option="-rotate"),
        Setting(name="incoming", shape="str", option="-incoming"),
        Setting(name="loadvm", shape="str", option="-loadvm"),
    )
}  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineConfig:
    """The settings given so far; the rest are the table's defaults."""

    values: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    def get(self, name: str) -> object:
        return self.values.get(name, SETTINGS[name].default)

    @property
    def type(self) -> str:
        return str(self.get("type"))

    @property
    def accel(self) -> str | None:
        value = self.get("accel")
        return value if isinstance(value, str) else None

    @property
    def name(self) -> str | None:
        value = self.get("name")
        return value if isinstance(value, str) else None

    @property
    def memory(self) -> int:
        return int(str(self.get("memory")))

    @property
    def cpus(self) -> int:
        return int(str(self.get("cpus")))

    @property
    def hotplug_ports(self) -> int:
        return int(str(self.get("hotplug-ports")))

    def update(self, change: Mapping[str, object]) -> MachineConfig:
        """A new config with ``change`` applied; the ``action`` members given are
        merged into those set before, as ``set-action`` does."""
        values = dict(self.values)
        for name, given in change.items():
            value = check_setting(name, given)
            if name == "action" and isinstance(value, dict):
                value = {**as_object(values.get(name)), **value}
            values[name] = value
        return MachineConfig(values=MappingProxyType(values))

    def describe(self) -> dict[str, object]:
        """Every setting with a value, defaults included."""
        out = {name: s.default for name, s in SETTINGS.items() if s.default is not None}
        out.update(self.values)
        return out


def as_object(value: object) -> dict[str, object]:
    """An object-shaped setting (or a member of one) as a dict; {} when unset."""
    return dict(value) if isinstance(value, dict) else {}


def check_setting(name: str, value: object) -> object:
    """``value`` if it has the shape ``name`` takes; refusals name the member."""
    setting = SETTINGS.get(name)
    if setting is None:
        raise ArgumentError(f"Parameter '{name}' is unexpected")
    expected = {
        "str": (str, "string"),
        "int": (int, "integer"),
        "bool": (bool, "boolean"),
        "object": (dict, "object"),
        "objects": (list, "array"),
        "strs": (list, "array"),
    }[setting.shape]
    if not isinstance(value, expected[0]) or (setting.shape == "int" and isinstance(value, bool)):
        raise ArgumentError(f"Invalid parameter type for '{name}', expected: {expected[1]}")
    items: list[object] = value if isinstance(value, list) else []
    for index, item in enumerate(items):
        wanted = dict if setting.shape == "objects" else str
        if not isinstance(item, wanted):
            kind = "object" if wanted is dict else "string"
            raise ArgumentError(f"Invalid parameter type for '{name}[{index}]', expected: {kind}")
    _check_range(name, value)
    if name == "limits":
        _check_limits(as_object(value))
    if name == "monitors":
        _check_monitors(items)
    if name == "escape-char" and isinstance(value, int) and not 0 <= value < 128:
        raise ArgumentError("Parameter 'escape-char' must be a character code below 128")
    if name == "confine":
        for part, on in as_object(value).items():
            if part not in CONFINEMENT_SWITCHES:
                raise ArgumentError(f"Parameter 'confine.{part}' is unexpected")
            if not isinstance(on, bool):
                raise ArgumentError(
                    f"Invalid parameter type for 'confine.{part}', expected: boolean"
                )
    return value


CONFINEMENT_SWITCHES = frozenset({"seccomp", "cgroup", "user", "root"})
"""The parts of the engine's confinement ``machine-set {"confine": ...}`` turns off."""
LIMITS = {"memory": "integer", "pids": "integer", "cpu": "number"}
"""The engine's cgroup limits: bytes, tasks, CPUs (``qmpvm.engine.cgroup`` writes them)."""


def _check_monitors(monitors: list[object]) -> None:
    for index, monitor in enumerate(monitors):
        where = f"monitors[{index}]"
        members = as_object(monitor)
        if not isinstance(members.get("chardev"), str):
            raise ArgumentError(f"Parameter '{where}.chardev' is missing or not a string")
        if not isinstance(members.get("mux", False), bool):
            raise ArgumentError(f"Invalid parameter type for '{where}.mux', expected: boolean")
        unknown = set(members) - {"chardev", "mux"}
        if unknown:
            raise ArgumentError(f"Parameter '{where}.{min(unknown)}' is unexpected")


def _check_limits(limits: Mapping[str, object]) -> None:
    for name, value in limits.items():
        kind = LIMITS.get(name)
        if kind is None:
            raise ArgumentError(f"Parameter 'limits.{name}' is unexpected")
        wanted = (int, float) if kind == "number" else (int,)
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise ArgumentError(f"Invalid parameter type for 'limits.{name}', expected: {kind}")
        if value <= 0:
            raise ArgumentError(f"Parameter 'limits.{name}' must be greater than zero")


def _check_range(name: str, value: object) -> None:
    if name == "memory" and isinstance(value, int) and (value < MIN_MEMORY or value % MiB):
        raise ConfigError(
            f"Parameter 'memory' must be a multiple of 1 MiB and at least {MIN_MEMORY} bytes"
        )
    if name == "cpus" and isinstance(value, int) and not 1 <= value <= MAX_CPUS:
        raise ConfigError(f"Parameter 'cpus' must be between 1 and {MAX_CPUS}")
    if name == "hotplug-ports" and isinstance(value, int) and not 0 <= value <= MAX_HOTPLUG_PORTS:
        raise ConfigError(f"Parameter 'hotplug-ports' must be between 0 and {MAX_HOTPLUG_PORTS}")
    if name in ("type", "uuid", "name") and value == "":
        raise ConfigError(f"Parameter '{name}' must not be empty")


def declaration() -> dict[str, TypeDecl]:
    """``machine-set``'s arguments, one optional member per setting: made from the
    table, so the checker and ``query-qmp-schema`` see exactly the table."""
    types: dict[str, TypeDecl] = {
        "str": "str", "int": "int", "bool": "bool", "object": "any", "objects": "[any]",
        "strs": "[str]",
    }  # fmt: skip
    return {f"*{name}": types[s.shape] for name, s in SETTINGS.items()}
