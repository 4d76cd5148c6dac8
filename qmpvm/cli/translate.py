"""QEMU's command line -> the QMP commands it stands for.

``OPTIONS`` is the whole of ``qemu-system-x86_64`` 7.2's option list as one
table: each option is translated (into machine settings, resources, or a
setting of the qmpvm process) or refused with the reason; none is taken and
dropped.  The machine's own options come from the settings table
(``qmpvm.config.machine``), so an option and its ``machine-set`` member are
declared once.

Theory of operation: options are read in order into one set of machine
settings, a boot source, and resources; at the end the resources are put in
the order QEMU creates them (objects, chardevs, block nodes, drives,
netdevs, devices), moving an item after the items it names, so a device may
name a chardev given after it, as QEMU allows.  Text values are typed as
the engine's schema says (``Typer``), which is what QEMU's keyval parsing
does; the parsing itself is pure.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, cast

from qmpvm.config import chardev, kinds
from qmpvm.config.descriptors import NETDEV_FD_MEMBERS, chardev_fd
from qmpvm.config.machine import SETTINGS
from qmpvm.config.resource import Kind
from qmpvm.engine.launch import machine_family
from qmpvm.errors import ArgumentError
from qmpvm.keyval import parse, split
from qmpvm.monitor.early import Listener, parse_qmp_spec

from . import sugar

if TYPE_CHECKING:
    from qmpvm.engine.caps import Capabilities
    from qmpvm.qapi.check import Schema


class Start(StrEnum):
    RUN = "run"  # machine-init + cont
    PAUSED = "paused"  # machine-init only (-S)
    PRECONFIG = "preconfig"  # neither


@dataclass(slots=True, kw_only=True)
class InheritedFd:
    """``-add-fd fd=N,set=S,opaque=O``: a descriptor qmpvm was started with."""

    fd: int
    set: int
    opaque: str | None = None


@dataclass(slots=True, kw_only=True)
class NamedFd:
    """A descriptor qmpvm was started with that a netdev or chardev names by
    number (``fd=29``): it becomes the getfd name ``name``."""

    fd: int
    name: str


@dataclass(slots=True, kw_only=True)
class Options:
    commands: list[dict[str, object]] = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)
    inherited_fds: list[InheritedFd] = field(default_factory=list)
    named_fds: list[NamedFd] = field(default_factory=list)
    open_at_start: frozenset[int] | None = None  # descriptors the process was given
    capabilities: Capabilities | None = None  # the engine's, if typing the options loaded them
    schema: Schema | None = None  # and their schema checker, if typing built it
    start: Start = Start.RUN
    state_dir: str | None = None
    restore: str | None = None  # a snapshot directory the machine is built from
    config_file: str | None = None
    pidfile: str | None = None
    daemonize: bool = False
    ready_fd: int | None = None  # -daemonize: written to once the machine is ready
    print_qmp: bool = False
    allow_host_programs: bool = False
    allow_insecure_tcp: bool = False
    warnings: list[str] = field(default_factory=list)  # for stderr: what QEMU ignores too
    engine: str = "qemu-system-x86_64"
    engine_help: list[str] | None = None  # "-device help": the engine answers it
    verbosity: int = 0

    def machine_commands(self) -> list[dict[str, object]]:
        """The option commands plus creation, as the start mode asks."""
        if self.restore is not None:
            restore = {"dir": self.restore, "paused": self.start is Start.PAUSED}
            return [{"execute": "machine-restore", "arguments": restore}]
        tail: list[dict[str, object]] = []
        if self.start is not Start.PRECONFIG:
            tail.append({"execute": "machine-init"})
        if self.start is Start.RUN:
            tail.append({"execute": "cont"})
        return self.commands + tail


class UsageError(Exception):
    """A bad command line: one line for stderr."""


class Typer(Protocol):
    """Types key=value text as the engine would (strings -> bools, numbers, lists)."""

    def command(self, command: str, tree: dict[str, object]) -> dict[str, object]:
        """``tree`` typed as the arguments of the engine's ``command``."""
        ...

    def group(self, group: str, tree: dict[str, object]) -> dict[str, object]:
        """``tree`` typed by the engine's ``query-command-line-options`` ``group``."""
        ...

    def params(self, group: str) -> frozenset[str]:
        """The keys the engine's option ``group`` takes (empty: not known)."""
        ...


class Untyped:
    """The typer without an engine: text stays text, the engine checks it later."""

    def command(self, command: str, tree: dict[str, object]) -> dict[str, object]:
        return tree

    def group(self, group: str, tree: dict[str, object]) -> dict[str, object]:
        return tree

    def params(self, group: str) -> frozenset[str]:
        return frozenset()


Handler = Callable[["Translator", str, str], None]


@dataclass(frozen=True, slots=True)
class Option:
    handler: Handler | None  # None: refused, with ``doc`` as the reason
    takes_value: bool
    doc: str = ""


_HELP_VALUES = ("help", "?")
DEFAULT_MACHINE = "pc"
"""QEMU's machine when a command line names none (qmpvm's own default, for a
machine configured over QMP, is q35)."""
_DEFAULT_IF = {"q35": "ide", "pc": "ide", "microvm": "virtio", "isapc": "ide"}


class Translator:
    """One command line's translation; ``OPTIONS`` dispatches to its methods."""

    def __init__(self, typer: Typer) -> None:
        self.typer = typer
        self.options = Options()
        self.settings: dict[str, object] = {}
        self.boot: dict[str, object] = {}
        self.resources: list[tuple[Kind, dict[str, object]]] = []
        self.drive_devices: list[tuple[Kind, dict[str, object]]] = []
        self.json_devices: list[tuple[Kind, dict[str, object]]] = []
        self.monitors: list[str] = []  # chardev ids that -mon makes QMP monitors
        self.monitor_given = False  # -qmp, -mon or -monitor: no default monitor
        self.no_graphics = False
        self.drives: list[tuple[str, int, int]] = []
        self.defaults = True
        self.counters: dict[str, int] = {}
        self.line_type: str | None = None

    # -- helpers ---------------------------------------------------------

    def fail(self, message: str) -> NoReturn:
        raise UsageError(message)

    def next_id(self, prefix: str) -> str:
        """QEMU's label for the Nth chardev an option makes: serial0, parallel0, ..."""
        number = self.counters.get(prefix, 0)
        self.counters[prefix] = number + 1
        return f"{prefix}{number}"

    def add(self, kind: Kind, args: dict[str, object]) -> None:
        self.resources.append((kind, args))

    def set(self, name: str, value: object) -> None:
        setting = SETTINGS[name]
        if setting.shape in ("objects", "strs"):
            listed = self.settings.setdefault(name, [])
            assert isinstance(listed, list)
            listed.append(value)
        elif setting.shape == "object" and isinstance(value, dict):
            merged = self.settings.setdefault(name, {})
            assert isinstance(merged, dict)
            merged.update(value)
        else:
            self.settings[name] = value

    def structured(self, text: str, implied: str | None) -> tuple[dict[str, object], bool]:
        """A JSON object or key=value text (parsed, untyped); and whether it was JSON."""
        if text.lstrip().startswith("{"):
            try:
                value = json.loads(text)
            except ValueError as err:
                self.fail(f"invalid JSON: {err}")
            if not isinstance(value, dict):
                self.fail("a JSON option must be an object")
            return value, True
        return parse(text, implied), False

    def machine_type(self) -> str:
        """The type the whole line asks for (-M may come after a -drive that needs it)."""
        return str(self.settings.get("type", self.line_type or DEFAULT_MACHINE))

    # -- the machine -----------------------------------------------------

    def machine(self, option: str, value: str) -> None:
        tree = self.typer.group("machine", parse(value, "type"))
        for key in ("type", "accel"):
            if key in tree:
                self.set(key, str(tree.pop(key)))
        if tree:
            self.set("properties", tree)

    def accel(self, option: str, value: str) -> None:
        tree = parse(value, "accel")
        name = str(tree.pop("accel"))
        old = self.settings.get("accel")
        self.set("accel", f"{old}:{name}" if option == "-accel" and old else name)
        if tree:  # each accelerator's own: only the one chosen gets them
            self.set("accel-properties", {name: tree})

    def enable_kvm(self, option: str, value: str) -> None:
        self.set("accel", "kvm")

    def memory(self, option: str, value: str) -> None:
        tree = parse(value, "size")
        for key, setting, unit in (("size", "memory", "M"), ("maxmem", "maxmem", ""),
                                   ("slots", "memory-slots", None)):  # fmt: skip
            if key in tree:
                text = str(tree.pop(key))
                number = sugar.parse_size(text, unit) if unit is not None else sugar.integer(text)
                self.set(setting, number)
        if tree:
            self.fail(f"-m: unknown parameter '{next(iter(tree))}'")

    def smp(self, option: str, value: str) -> None:
        tree = {k: sugar.integer(v) for k, v in parse(value, "cpus").items()}
        if "cpus" in tree:
            self.set("cpus", tree.pop("cpus"))
        if tree:
            self.set("smp", tree)

    def name(self, option: str, value: str) -> None:
        tree = self.typer.group("name", parse(value, "guest"))
        if "guest" in tree:
            self.set("name", str(tree.pop("guest")))
        if tree:
            self.set("name-options", tree)

    def cpu(self, option: str, value: str) -> None:
        model, *features = split(value)
        tree: dict[str, object] = {"model": model}
        for feature in features:
            if feature[:1] in "+-" and "=" not in feature:
                tree[feature[1:]] = "on" if feature[0] == "+" else "off"
            else:  # a bare feature is feature=on, as QEMU reads it
                key, sep, text = feature.partition("=")
                tree[key] = text if sep else "on"
        self.set("cpu", tree)

    def setting(self, option: str, value: str) -> None:
        """An option that is one machine setting, as the settings table says."""
        setting = _SETTING_OF[option]
        if setting.shape == "bool":
            self.set(setting.name, True)
        elif setting.shape in ("str", "strs"):
            self.set(setting.name, value)
        else:
            repeats = setting.name == "numa"
            if value.lstrip().startswith("{"):
                tree, _ = self.structured(value, setting.implied)
            else:
                tree = parse(value, setting.implied, repeats=repeats)
            if setting.group is not None:
                tree = self.typer.group(setting.group, tree)
            if setting.name in ("net", "nic") and set(tree) & set(NETDEV_FD_MEMBERS):
                self.fail(f"{option}: pass descriptors with -netdev (fd=) and -device instead")
            self.set(setting.name, tree)

    def global_(self, option: str, value: str) -> None:
        """``-global DRIVER.PROPERTY=VALUE`` or ``-global driver=D,property=P,value=V``."""
        head, _, rest = value.partition("=")
        if "." in head and "," not in value and not head.startswith("driver"):
            driver, _, prop = head.partition(".")
            self.set("global", {"driver": driver, "property": prop, "value": rest})
        else:
            self.setting(option, value)

    def machine_property(self, option: str, value: str) -> None:
        prop, on = _PROPERTY_FLAGS[option]
        self.set("properties", {prop: on})

    def action(self, option: str, value: str) -> None:
        actions = {"-no-shutdown": {"shutdown": "pause"}, "-no-reboot": {"reboot": "shutdown"}}
        self.set("action", actions.get(option) or {"watchdog": value})

    def nodefaults(self, option: str, value: str) -> None:
        self.defaults = False

    def implied(self, option: str, value: str) -> None:
        """Options whose meaning is what qmpvm always does (see the table)."""

    def nographic(self, option: str, value: str) -> None:
        """No display; the default serial port on stdio with a monitor
        multiplexed on it (``finish``), as in QEMU."""
        self.set("display", {"type": "none"})
        self.no_graphics = True

    def escape_char(self, option: str, value: str) -> None:
        self.set("escape-char", sugar.integer(value))

    def boot_source(self, option: str, value: str) -> None:
        self.boot[option.lstrip("-")] = value

    # -- resources -------------------------------------------------------

    def object_(self, option: str, value: str) -> None:
        tree, is_json = self.structured(value, "qom-type")
        self.add(Kind.OBJECT, tree if is_json else self.typer.command("object-add", tree))

    def chardev(self, option: str, value: str) -> None:
        tree = self.typer.group("chardev", parse(value, "backend"))
        # -chardev takes one set of keys for every backend, and QEMU ignores those a
        # backend does not use: so does qmpvm, saying so
        unused = set(tree) - chardev.legacy_keys(str(tree.get("backend")))
        for key in sorted(unused & self.typer.params("chardev")):
            del tree[key]
            self.options.warnings.append(
                f"-chardev {tree.get('backend')}: '{key}' is not used by this backend "
                "(QEMU ignores it too)"
            )
        try:
            for args in chardev.from_legacy(tree):
                self.add(Kind.CHARDEV, args)
        except ArgumentError as err:
            self.fail(err.desc)

    def blockdev(self, option: str, value: str) -> None:
        tree, is_json = self.structured(value, None)
        self.add(Kind.BLOCK, tree if is_json else self.typer.command("blockdev-add", tree))

    def netdev(self, option: str, value: str) -> None:
        if value.lstrip().startswith("{"):
            tree, _ = self.structured(value, None)
            self.add(Kind.NETDEV, tree)
            return
        repeated: dict[str, list[dict[str, object]]] = {}
        kept = []
        for item in split(value):
            key, _, text = item.partition("=")
            if key in ("hostfwd", "guestfwd"):
                repeated.setdefault(key, []).append({"str": text})
            else:
                kept.append(item.replace(",", ",,"))
        tree = parse(",".join(kept), "type")
        typed = self.typer.command("netdev_add", tree)
        self.add(Kind.NETDEV, {**typed, **repeated})

    def device(self, option: str, value: str) -> None:
        tree, is_json = self.structured(value, "driver")
        if str(tree.get("driver")) in _HELP_VALUES:
            self.engine_help(option, value)
        if is_json:  # QEMU creates JSON devices after all key=value ones
            self.json_devices.append((Kind.DEVICE, tree))
        else:
            self.add(Kind.DEVICE, tree)

    def drive(self, option: str, value: str) -> None:
        tree = self.typer.group("drive", parse(value, "file"))
        self.add_drive(tree)

    def add_drive(self, tree: dict[str, object]) -> None:
        family = machine_family(self.machine_type())
        default_if = _DEFAULT_IF.get(family, "ide")
        units = 1 if family == "q35" else None  # AHCI: one unit per bus
        name, bus, unit = sugar.drive_id(tree, default_if, self.drives, units)
        tree.setdefault("id", name)
        interface = str(tree.get("if", default_if))
        self.drives.append((interface, bus, unit))
        if interface == "virtio":
            # QEMU adds the device of an if=virtio drive after every -device given
            # as key=value (and before JSON ones): made explicit here, in that place
            device = {"driver": "virtio-blk-pci", "drive": tree["id"]}
            if "addr" in tree:
                device["addr"] = tree.pop("addr")
            for key in ("if", "index", "bus", "unit"):
                tree.pop(key, None)
            tree["if"] = "none"
            self.drive_devices.append((Kind.DEVICE, device))
        self.add(Kind.DRIVE, tree)

    def drive_shorthand(self, option: str, value: str) -> None:
        interface, index, media = _DRIVE_SHORTHANDS[option]
        tree: dict[str, object] = {"file": value}
        if interface is not None:
            tree["if"] = interface
        if index is not None:
            tree["index"] = index
        if media is not None:
            tree["media"] = media
        self.add_drive(tree)

    def serial(self, option: str, value: str) -> None:
        """The board's ports, as QEMU makes them (before any -device); a spec
        other than ``chardev:ID`` becomes a chardev of QEMU's name for it."""
        name = option.lstrip("-")
        number = self.next_id(name)  # QEMU counts every port, chardev:ID ones too
        if value != "none" and not value.startswith("chardev:"):
            monitored = value.startswith("mon:")
            chardev_id = "debugcon" if name == "debugcon" else number
            self.chardev_for(value.removeprefix("mon:"), chardev_id)
            if monitored:
                self.set("monitors", {"chardev": chardev_id, "mux": True})
            value = f"chardev:{chardev_id}"
        self.set(name, value)

    def chardev_for(self, spec: str, chardev_id: str) -> None:
        """The chardev a -serial/-monitor spec (``stdio``, ``unix:P,server=on``...) makes."""
        tree = self.typer.group("chardev", sugar.chardev_spec(spec, chardev_id))
        for args in chardev.from_legacy(tree):
            self.add(Kind.CHARDEV, args)

    def readconfig(self, option: str, value: str) -> None:
        """QEMU's config file: each ``[group "id"]`` section is that group's option."""
        try:
            text = Path(value).read_text(encoding="utf-8")
        except OSError as err:
            self.fail(f"-readconfig {value}: {err.strerror}")
        for group, items in sugar.config_sections(text, value):
            name = _READCONFIG_OPTIONS.get(group, "")
            spec = OPTIONS.get(name)
            if spec is None or spec.handler is None:
                self.fail(f"-readconfig {value}: group [{group}] is not supported")
            spec.handler(self, name, ",".join(f"{k}={v.replace(',', ',,')}" for k, v in items))

    def gdb_default(self, option: str, value: str) -> None:
        self.set("gdb", "tcp::1234")

    # -- the qmpvm process -------------------------------------------------

    def qmp(self, option: str, value: str) -> None:
        self.monitor_given = True
        try:
            self.options.listeners.append(parse_qmp_spec(value))
        except ValueError as err:
            self.fail(str(err))

    def mon(self, option: str, value: str) -> None:
        """``mode=control``: a QMP monitor qmpvm listens on (``finish``);
        ``readline``: an HMP monitor qmpvm serves on the console."""
        self.monitor_given = True
        tree = parse(value, "chardev")
        mode = tree.get("mode", "readline")
        if tree.get("pretty") in ("on", "true", "yes"):
            self.fail("-mon pretty=on: pretty-printed QMP is not offered")
        if mode == "control":
            self.monitors.append(str(tree["chardev"]))
        elif mode == "readline":
            self.set("monitors", {"chardev": str(tree["chardev"])})
        else:
            self.fail(f"-mon mode={mode}: expected 'readline' or 'control'")

    def monitor(self, option: str, value: str) -> None:
        """An HMP monitor on a chardev of QEMU's name for it; ``mon:`` is implied."""
        self.monitor_given = True
        if value != "none":
            chardev_id = self.next_id("compat_monitor")
            self.chardev_for(value.removeprefix("mon:"), chardev_id)
            self.set("monitors", {"chardev": chardev_id})

    def add_fd(self, option: str, value: str) -> None:
        tree = parse(value)
        try:
            opaque = tree.get("opaque")
            inherited = InheritedFd(
                fd=sugar.integer(tree["fd"]),
                set=sugar.integer(tree["set"]),
                opaque=None if opaque is None else str(opaque),
            )
            self.options.inherited_fds.append(inherited)
        except KeyError as err:
            self.fail(f"-add-fd: parameter {err} is required")

    def start_mode(self, option: str, value: str) -> None:
        if option == "-S" and self.options.start is Start.RUN:
            self.options.start = Start.PAUSED
        elif option == "-preconfig":
            self.options.start = Start.PRECONFIG

    def process(self, option: str, value: str) -> None:
        """An option of the qmpvm process: an ``Options`` field, set or counted."""
        field_name = _PROCESS_FIELDS[option]
        current = getattr(self.options, field_name)
        if isinstance(current, bool):
            setattr(self.options, field_name, True)
        elif isinstance(current, int):
            setattr(self.options, field_name, current + 1)
        else:
            setattr(self.options, field_name, value)

    def hotplug_ports(self, option: str, value: str) -> None:
        self.set("hotplug-ports", sugar.integer(value))

    def engine_help(self, option: str, value: str) -> None:
        self.options.engine_help = [option, value] if value else [option]
        raise _HelpRequestedError

    # -- the end ---------------------------------------------------------

    def nographic_defaults(self) -> None:
        """What QEMU adds for -nographic when the line leaves them to it: the
        serial port on stdio, shared with the monitor unless one was given;
        a null parallel port; a monitor on stdio if the serial port is elsewhere."""
        if not self.defaults:
            return
        ports = ("serial", "parallel")
        if self.options.daemonize and not (
            self.monitor_given and all(map(self.settings.get, ports))
        ):
            self.fail("-nographic cannot be used with -daemonize")
        if "serial" not in self.settings:
            self.serial("-serial", "stdio" if self.monitor_given else "mon:stdio")
        elif not self.monitor_given:
            self.monitor("-monitor", "stdio")
        if "parallel" not in self.settings:
            self.serial("-parallel", "null")

    def shared_monitors(self) -> None:
        """A readline -mon on a ``mux=on`` chardev: qmpvm serves the mux, so the
        pair QEMU would make (``ID-base`` and the mux ``ID``) is one console ``ID``."""
        for monitor in cast(list[dict[str, object]], self.settings.get("monitors", [])):
            mux = self.chardev_args(monitor["chardev"])
            if mux is None or chardev.backend_of(mux)[0] != "mux" or "mux" in monitor:
                continue
            base = self.chardev_args(chardev.backend_of(mux)[1].get("chardev"))
            assert base is not None  # from_legacy made the pair
            self.resources.remove((Kind.CHARDEV, mux))
            base["id"] = monitor["chardev"]
            monitor["mux"] = True

    def chardev_args(self, chardev_id: object) -> dict[str, object] | None:
        """The chardev-add arguments of chardev ``chardev_id``, if the line has one."""
        return next(
            (a for k, a in self.resources if k is Kind.CHARDEV and a.get("id") == chardev_id), None
        )

    def finish(self) -> Options:
        opts = self.options
        if self.no_graphics:
            self.nographic_defaults()
        self.shared_monitors()
        if self.options.daemonize and any(
            k is Kind.CHARDEV and chardev.backend_of(a)[0] == "stdio" for k, a in self.resources
        ):
            self.fail("cannot use stdio with -daemonize")
        resources = self.resources + self.drive_devices + self.json_devices
        for chardev_id in self.monitors:
            found = [a for k, a in resources if k is Kind.CHARDEV and a.get("id") == chardev_id]
            if not found:
                self.fail(f"-mon: chardev '{chardev_id}' not found")
            opts.listeners.append(_monitor_listener(found[0]))
            resources = [(k, a) for k, a in resources if a is not found[0]]
        objects = {str(a.get("id")): a for k, a in resources if k is Kind.OBJECT}
        for listener in opts.listeners:
            self.secure(listener, objects)
        if self.settings or resources or self.boot:
            # the line describes a machine: what QEMU would build from it, its
            # defaults (default devices, the pc machine) included, and nothing
            # more (no spare root ports the tool that wrote the line knows not of)
            self.settings.setdefault("type", DEFAULT_MACHINE)
            self.settings.setdefault("hotplug-ports", 0)
            if self.defaults:
                self.settings["defaults"] = True
        if opts.restore is not None:
            if opts.start is Start.PRECONFIG:
                self.fail("--restore builds the machine: it cannot wait for machine-init")
            if self.settings or resources or self.boot:
                self.fail("--restore takes the machine from the snapshot: give no machine options")
            return opts
        if self.settings:
            opts.commands.append(_cmd("machine-set", self.settings))
        if self.boot:
            if "kernel" not in self.boot:
                self.fail("-initrd and -append need -kernel")
            opts.commands.append(_cmd("boot-set", self.boot))
        for kind, args in creation_order(resources):
            opts.commands.append(_cmd(kinds.KINDS[kind].add, self.name_fds(kind, args)))
        return opts

    def secure(self, listener: Listener, objects: Mapping[str, Mapping[str, Any]]) -> None:
        """TLS from the objects a TCP monitor names; other hosts only over TLS."""
        where = f"monitor tcp:{listener.host}:{listener.port}"
        if listener.tls_creds:
            from qmpvm.monitor.tls import tls_server  # ssl costs 20 ms: only when asked

            authz = objects.get(listener.tls_authz) if listener.tls_authz else None
            if listener.tls_authz and authz is None:
                self.fail(f"{where}: tls-authz '{listener.tls_authz}' is not a -object")
            try:
                listener.tls = tls_server(objects.get(listener.tls_creds), authz)
            except ValueError as err:
                self.fail(f"{where}: {err}")
        elif listener.tls_authz:
            self.fail(f"{where}: tls-authz needs tls-creds")
        elif not listener.loopback and not self.options.allow_insecure_tcp:
            self.fail(
                f"{where} would give any host full control without TLS: add tls-creds=ID "
                "(a -object tls-creds-x509), listen on 127.0.0.1, or pass --allow-insecure-tcp"
            )

    def name_fds(self, kind: Kind, args: dict[str, object]) -> dict[str, object]:
        """Descriptor numbers given on the command line become getfd names of
        descriptors qmpvm inherited (QMP names them; the engine gets them)."""
        if kind is Kind.NETDEV:
            for member in NETDEV_FD_MEMBERS:
                value = args.get(member)
                if isinstance(value, str) and value.replace(":", "").isdigit():
                    args[member] = ":".join(self.inherit(int(n)) for n in value.split(":"))
        elif kind is Kind.CHARDEV:
            number = chardev_fd(args)
            if number is not None and number.isdigit():
                data = args["backend"]["data"]  # type: ignore[index]
                data["addr"] = {"type": "fd", "data": {"str": self.inherit(int(number))}}
        return args

    def inherit(self, fd: int) -> str:
        name = f"fd{fd}"
        if all(named.fd != fd for named in self.options.named_fds):
            self.options.named_fds.append(NamedFd(fd=fd, name=name))
        return name


class _HelpRequestedError(Exception):
    """``-device help`` and the like: the engine itself answers."""


def creation_order(
    resources: list[tuple[Kind, dict[str, object]]],
) -> list[tuple[Kind, dict[str, object]]]:
    """By kind as QEMU creates them, each item after the items it names."""
    pending = sorted(resources, key=lambda item: list(Kind).index(item[0]))
    defined = {(kind, str(args.get(kinds.KINDS[kind].key))) for kind, args in pending}
    done: set[tuple[Kind, str]] = set()

    def ready(kind: Kind, args: Mapping[str, object]) -> bool:
        for allowed, name in kinds.references(kind, args):
            named = [(k, name) for k in allowed]
            if any(n in defined for n in named) and not any(n in done for n in named):
                return False
        return True

    out: list[tuple[Kind, dict[str, object]]] = []
    while pending:
        index = next((i for i, (k, a) in enumerate(pending) if ready(k, a)), 0)
        kind, args = pending.pop(index)
        out.append((kind, args))
        done.add((kind, str(args.get(kinds.KINDS[kind].key))))
    return out


def _monitor_listener(args: Mapping[str, object]) -> Listener:
    """The QMP monitor a ``-mon chardev=X,mode=control`` asks for, from chardev X."""
    backend, data = chardev.backend_of(args)
    addr = data.get("addr")
    if backend != "socket" or not isinstance(addr, dict):
        raise UsageError(f"-mon: chardev '{args.get('id')}' must be a socket")
    where = addr.get("data", {})
    assert isinstance(where, dict)
    if addr.get("type") == "fd":  # listening or connected: the server tells which
        return Listener("fd", path=str(where["str"]))
    if not data.get("server"):
        if addr.get("type") == "unix":  # qmpvm dials the client's socket
            return Listener("connect", path=str(where["path"]))
        raise UsageError(f"-mon: chardev '{args.get('id')}': a client socket must be unix")
    if addr.get("type") == "unix":
        return Listener("unix", path=str(where["path"]))
    return Listener(  # no host: every address, as QEMU listens
        "tcp", host=str(where.get("host") or "0.0.0.0"), port=int(where["port"]),
        tls_creds=str(data.get("tls-creds") or ""), tls_authz=str(data.get("tls-authz") or ""),
    )  # fmt: skip


def _cmd(name: str, arguments: dict[str, object]) -> dict[str, object]:
    return {"execute": name, "arguments": arguments}


_READCONFIG_OPTIONS = {
    "drive": "-drive", "device": "-device", "chardev": "-chardev", "netdev": "-netdev",
    "object": "-object", "machine": "-machine", "memory": "-m", "smp-opts": "-smp",
    "name": "-name", "rtc": "-rtc", "boot-opts": "-boot", "global": "-global",
    "numa": "-numa", "mon": "-mon", "accel": "-accel", "fsdev": "-fsdev",
    "action": "-action", "msg": "-msg", "overcommit": "-overcommit", "sandbox": "-sandbox",
    "icount": "-icount", "fw_cfg": "-fw_cfg", "option-rom": "-option-rom",
    "iscsi": "-iscsi", "tpmdev": "-tpmdev", "spice": "-spice", "vnc": "-vnc",
}  # fmt: skip
"""``-readconfig`` groups -> the option each section stands for (QEMU's names)."""
_PROCESS_FIELDS = {
    "-state-dir": "state_dir", "-restore": "restore", "-config": "config_file", "-engine": "engine",
    "-pidfile": "pidfile", "-daemonize": "daemonize", "-print-qmp": "print_qmp",
    "-v": "verbosity", "-verbose": "verbosity", "-allow-host-programs": "allow_host_programs",
    "-allow-insecure-tcp": "allow_insecure_tcp",
}  # fmt: skip
_PROPERTY_FLAGS = {"-no-acpi": ("acpi", "off"), "-no-hpet": ("hpet", "off"), "-usb": ("usb", "on")}
_DRIVE_SHORTHANDS: Mapping[str, tuple[str | None, int | None, str | None]] = {
    "-hda": (None, 0, None), "-hdb": (None, 1, None), "-hdc": (None, 2, None),
    "-hdd": (None, 3, None), "-cdrom": (None, 2, "cdrom"), "-fda": ("floppy", 0, None),
    "-fdb": ("floppy", 1, None), "-mtdblock": ("mtd", None, None), "-sd": ("sd", None, None),
    "-pflash": ("pflash", None, None),
}  # fmt: skip
_SETTING_OF = {s.option: s for s in SETTINGS.values() if s.option is not None}

T = Translator
_REFUSED = {
    "-runas": "the engine's confinement is qmpvm's to set up",
    "-chroot": "the engine's confinement is qmpvm's to set up",
    "-set": "change the option itself instead",
    "-D": "engine debugging options are not offered",
    "-d": "engine debugging options are not offered",
    "-dfilter": "engine debugging options are not offered",
    "-trace": "engine debugging options are not offered",
    "-dump-vmstate": "engine debugging options are not offered",
    "-xen-domid": "Xen is not an engine qmpvm drives",
    "-qmp-pretty": "pretty-printed QMP is not offered; use -qmp",
    "-xen-attach": "Xen is not an engine qmpvm drives",
    "-xen-domid-restrict": "Xen is not an engine qmpvm drives",
}
_REFUSED_FLAGS = ("-xen-attach", "-xen-domid-restrict")

OPTIONS: dict[str, Option] = {
    # the machine settings that are one option each (more specific handlers below)
    **{
        s.option: Option(T.setting, s.shape != "bool", f"machine-set '{s.name}'")
        for s in SETTINGS.values()
        if s.option is not None
    },
    # the qmpvm process
    "-qmp": Option(
        T.qmp, True, "unix:PATH,server=on,wait=off | tcp:HOST:PORT[,tls-creds=ID[,tls-authz=ID]]"
    ),
    "-mon": Option(
        T.mon, True, "chardev=ID[,mode=control|readline]: a QMP or HMP monitor on chardev ID"
    ),
    "-monitor": Option(T.monitor, True, "stdio|unix:P,server=on|...|none: an HMP monitor"),
    "-S": Option(T.start_mode, False, "create the machine, do not start it"),
    "-preconfig": Option(T.start_mode, False, "do not create the machine until machine-init"),
    "-state-dir": Option(
        T.process, True, "DIR: keep the configuration, and a machine that outlives qmpvm, in DIR"
    ),
    "-restore": Option(T.process, True, "DIR: build the machine from a machine-snapshot"),
    "-config": Option(T.process, True, "FILE: replay QMP commands from FILE"),
    "-engine": Option(T.process, True, "PATH: the QEMU binary"),
    "-pidfile": Option(T.process, True, "FILE: write qmpvm's pid to FILE"),
    "-daemonize": Option(T.process, False, "detach once the monitor and machine are ready"),
    "-print-qmp": Option(T.process, False, "print the QMP commands of the options; exit"),
    "-allow-insecure-tcp": Option(
        T.process, False, "serve -qmp tcp: to other hosts without TLS (tls-creds=ID)"
    ),
    "-allow-host-programs": Option(
        T.process, False, "let commands run host programs: exec: URIs, tap scripts, smbd"
    ),
    "-v": Option(T.process, False, "log more (twice: wire traffic)"),
    "-verbose": Option(T.process, False, "log more"),
    "-hotplug-ports": Option(T.hotplug_ports, True, "N: q35 root ports for hot-plug"),
    "-add-fd": Option(T.add_fd, True, "fd=N,set=S[,opaque=O]: an inherited descriptor"),
    "-nodefaults": Option(T.nodefaults, False, "no default devices"),
    "-no-user-config": Option(T.implied, False, "always so: the engine reads no user config"),
    # the machine
    "-M": Option(T.machine, True, "TYPE[,accel=A][,PROPERTY=V...]"),
    "-machine": Option(T.machine, True, "TYPE[,accel=A][,PROPERTY=V...]"),
    "-accel": Option(T.accel, True, "A[,PROPERTY=V...]; repeat for a fallback list"),
    "-enable-kvm": Option(T.enable_kvm, False, "-accel kvm"),
    "-m": Option(T.memory, True, "[size=]SIZE[,slots=N,maxmem=SIZE]"),
    "-smp": Option(T.smp, True, "[cpus=]N[,sockets=,dies=,clusters=,cores=,threads=,maxcpus=]"),
    "-name": Option(T.name, True, "[guest=]NAME[,process=P][,debug-threads=on]"),
    "-cpu": Option(T.cpu, True, "MODEL[,+FEATURE|-FEATURE|FEATURE=V...]"),
    "-no-shutdown": Option(T.action, False, "-action shutdown=pause"),
    "-no-reboot": Option(T.action, False, "-action reboot=shutdown"),
    "-watchdog-action": Option(T.action, True, "-action watchdog=ACTION"),
    "-no-acpi": Option(T.machine_property, False, "-machine acpi=off"),
    "-no-hpet": Option(T.machine_property, False, "-machine hpet=off"),
    "-usb": Option(T.machine_property, False, "-machine usb=on"),
    "-nographic": Option(T.nographic, False, "-display none; -serial mon:stdio by default"),
    "-echr": Option(T.escape_char, True, "N: the mux's escape key (default 1, Ctrl-A)"),
    "-kernel": Option(T.boot_source, True, "FILE"),
    "-initrd": Option(T.boot_source, True, "FILE"),
    "-append": Option(T.boot_source, True, "CMDLINE"),
    # resources
    "-object": Option(T.object_, True, "TYPE,id=ID,...|JSON: object-add"),
    "-chardev": Option(T.chardev, True, "BACKEND,id=ID,...: chardev-add"),
    "-blockdev": Option(T.blockdev, True, "OPTIONS|JSON: blockdev-add"),
    "-drive": Option(T.drive, True, "OPTIONS: drive-add"),
    "-netdev": Option(T.netdev, True, "TYPE,id=ID,...|JSON: netdev_add"),
    "-device": Option(T.device, True, "DRIVER,...|JSON: device_add"),
    "-serial": Option(T.serial, True, "chardev:ID|file:F|unix:P|tcp:H:P|pty|null|none..."),
    "-parallel": Option(T.serial, True, "as -serial"),
    "-debugcon": Option(T.serial, True, "as -serial: the ISA debug console"),
    "-s": Option(T.gdb_default, False, "-gdb tcp::1234"),
    "-readconfig": Option(T.readconfig, True, "FILE: QEMU's config file, each section an option"),
    "-audio-help": Option(T.engine_help, False, "the engine prints it"),
    **{name: Option(T.drive_shorthand, True, "FILE: -drive") for name in _DRIVE_SHORTHANDS},
    **{name: Option(None, True, reason) for name, reason in _REFUSED.items()},
}
OPTIONS["-global"] = Option(T.global_, True, "DRIVER.PROPERTY=VALUE: machine-set 'global'")
for _flag in _REFUSED_FLAGS:
    OPTIONS[_flag] = Option(None, False, _REFUSED[_flag])

FLAGS = frozenset(name for name, option in OPTIONS.items() if not option.takes_value) | {
    "-h", "-help", "-version",
}  # fmt: skip
"""Options that take no value (``qmpvm.monitor.early`` keeps a copy)."""


def translate(argv: list[str], typer: Typer | None = None) -> Options:
    """``argv`` as ``Options``; UsageError names the option that is refused."""
    translator = Translator(typer or Untyped())
    for option, value in itertools.pairwise(argv):
        if option.lstrip("-") in ("M", "machine") and not value.startswith("{"):
            translator.line_type = str(parse(value, "type").get("type", "")) or None
    args = iter(argv)
    for raw in args:
        if not raw.startswith("-"):  # QEMU: a word that is no option is the first disk
            translator.drive_shorthand("-hda", raw)
            continue
        option = "-" + raw.lstrip("-")
        spec = OPTIONS.get(option)
        if spec is None:
            translator.fail(f"unknown option '{raw}' (see --help)")
        value = ""
        if spec.takes_value:
            value = next(args, None)  # type: ignore[assignment]
            if value is None:
                translator.fail(f"option {option} requires an argument")
        if spec.handler is None:
            translator.fail(f"{option}: not supported: {spec.doc}")
        if value in _HELP_VALUES and option not in ("-append", "-name", "-kernel"):
            try:
                translator.engine_help(option, value)
            except _HelpRequestedError:
                return translator.options
        try:
            spec.handler(translator, option, value)
        except _HelpRequestedError:
            return translator.options
        except ArgumentError as err:
            translator.fail(f"{option}: {err.desc}")
    return translator.finish()


def options_given(argv: list[str]) -> list[str]:
    """The options of ``argv`` in option position (a value such as ``-name help``
    is not an option), spelt with one dash."""
    found = []
    args = iter(argv)
    for raw in args:
        option = "-" + raw.lstrip("-") if raw.startswith("-") else raw
        found.append(option)
        spec = OPTIONS.get(option)
        if spec is not None and spec.takes_value:
            next(args, None)
    return found


def option_lines() -> Iterator[str]:
    """``--help``'s list of options, from the table: those taken, then those refused."""
    for name, spec in sorted(OPTIONS.items()):
        if spec.handler is not None and spec.doc:
            usage = f"{name} ARG" if spec.takes_value else name
            yield f"  {usage:<22} {spec.doc}"
    yield ""
    yield "Refused, with the reason:"
    for name, spec in sorted(OPTIONS.items()):
        if spec.handler is None:
            yield f"  {name:<22} {spec.doc}"
