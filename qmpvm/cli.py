"""QEMU-style command line -> the QMP commands it stands for.

Every machine option becomes one or more QMP commands, run through the same
dispatcher a remote client uses (``--print-qmp`` shows them).  The rest
(listeners, state directory, config file) is about the qmpvm process itself.
This module only parses; ``qmpvm.app`` runs.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, NoReturn

from qmpvm.errors import ArgumentError
from qmpvm.keyval import parse
from qmpvm.monitor.early import Listener, parse_qmp_spec

if TYPE_CHECKING:
    from qmpvm.monitor.early import EarlyMonitor

MiB = 1024 * 1024

USAGE = """\
usage: qmpvm [options]
       qmpvm image build [DIR]            build the test/demo guest
       qmpvm console SOCKET [--chardev ID] attach a terminal to a socket chardev
       qmpvm qmp SOCKET COMMAND [JSON]    run one QMP command and print the reply
       qmpvm demo                         boot a guest configured over QMP

The monitor comes up first; every machine option is a QMP command.
With neither -S nor --preconfig, the machine is created and started.

Monitor and process:
  -qmp unix:PATH,server=on,wait=off    QMP on a UNIX socket (repeatable)
  -qmp tcp:HOST:PORT,server=on,wait=off
  --preconfig                          do not create the machine until machine-init
  -S                                   create the machine, do not start it
  --state-dir DIR                      keep the configuration in DIR (persistent)
  --config FILE                        replay QMP commands from FILE at start
  --print-qmp                          print the QMP commands of the options; exit
  --engine PATH                        the QEMU binary (default qemu-system-x86_64)
  -v, --verbose                        log more (twice: wire traffic)
  -h, --help / --version

Machine (QEMU's spelling):
  -name NAME   -M/-machine TYPE[,accel=A]   -accel A   -enable-kvm
  -m SIZE      -smp N    -kernel F  -initrd F  -append S
  -chardev BACKEND,id=ID,...   -serial chardev:ID|file:F|null|none
  -blockdev OPTS|JSON   -drive file=F,if=virtio|none,format=raw|qcow2,readonly=on,id=ID
  -device DRIVER,...|JSON   -netdev user|tap,id=ID,...   -nic user|tap[,model=M][,mac=M]
  -nographic   -display none
"""


class Start(StrEnum):
    RUN = "run"  # machine-init + cont
    PAUSED = "paused"  # machine-init only (-S)
    PRECONFIG = "preconfig"  # neither


@dataclass(slots=True, kw_only=True)
class Options:
    commands: list[dict[str, object]] = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)
    start: Start = Start.RUN
    state_dir: str | None = None
    config_file: str | None = None
    print_qmp: bool = False
    engine: str = "qemu-system-x86_64"
    verbosity: int = 0

    def machine_commands(self) -> list[dict[str, object]]:
        """The option commands plus creation, as the start mode asks."""
        tail: list[dict[str, object]] = []
        if self.start is not Start.PRECONFIG:
            tail.append({"execute": "machine-init"})
        if self.start is Start.RUN:
            tail.append({"execute": "cont"})
        return self.commands + tail


class UsageError(Exception):
    """A bad command line: one line for stderr."""


def _cmd(name: str, arguments: dict[str, object] | None = None) -> dict[str, object]:
    return {"execute": name, "arguments": arguments or {}}


_SIZE = re.compile(r"^(\d+)([kKmMgGtT]?)[bB]?$")
_UNITS = {"": MiB, "k": 1024, "m": MiB, "g": 1024 * MiB, "t": 1024 * 1024 * MiB}


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if match is None:
        raise UsageError(f"-m: invalid size '{text}'")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _structured(text: str, implied: str | None) -> dict[str, object]:
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as err:
            raise UsageError(f"invalid JSON: {err}") from err
        if not isinstance(value, dict):
            raise UsageError("JSON option must be an object")
        return value
    return parse(text, implied)


class _Parser:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.options = Options()
        self._boot: dict[str, object] = {}
        self._machine_type: str | None = None
        self._counter = 0

    def fail(self, message: str) -> NoReturn:
        raise UsageError(message)

    def value(self, args: Iterator[str], option: str) -> str:
        try:
            return next(args)
        except StopIteration:
            self.fail(f"option {option} requires an argument")

    def next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter - 1}"

    def run(self) -> Options:
        self._machine_type = _scan_machine_type(self.argv)
        args = iter(self.argv)
        for raw in args:
            option = "-" + raw.lstrip("-") if raw.startswith("-") else raw
            handler = self.HANDLERS.get(option)
            if handler is None:
                self.fail(f"unknown option '{raw}' (see --help)")
            try:
                handler(self, option, args)
            except ArgumentError as err:
                self.fail(f"{option}: {err.desc}")
        if self._boot:
            if "kernel" not in self._boot:
                self.fail("-initrd and -append need -kernel")
            self.options.commands.append(_cmd("boot-set", self._boot))
        return self.options

    # -- process options -------------------------------------------------

    def _qmp(self, option: str, args: Iterator[str]) -> None:
        try:
            self.options.listeners.append(parse_qmp_spec(self.value(args, option)))
        except ValueError as err:
            self.fail(str(err))

    def _flag(self, option: str, args: Iterator[str]) -> None:
        if option == "-S":
            if self.options.start is Start.RUN:
                self.options.start = Start.PAUSED
        elif option == "-preconfig":
            self.options.start = Start.PRECONFIG
        elif option == "-print-qmp":
            self.options.print_qmp = True
        elif option in ("-v", "-verbose"):
            self.options.verbosity += 1
        elif option in {"-help", "-h"}:
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        elif option == "-version":
            from qmpvm import __version__

            print(f"qmpvm {__version__}")
            raise SystemExit(0)
        elif option == "-nographic":
            pass
        elif option == "-enable-kvm":
            self.options.commands.append(_cmd("machine-set", {"accel": "kvm"}))

    def _process_value(self, option: str, args: Iterator[str]) -> None:
        value = self.value(args, option)
        if option == "-state-dir":
            self.options.state_dir = value
        elif option == "-config":
            self.options.config_file = value
        elif option == "-engine":
            self.options.engine = value
        elif option == "-display" and value.split(",")[0] != "none":
            self.fail(f"-display {value}: only '-display none' is supported (use a serial chardev)")

    # -- machine options -------------------------------------------------

    def _name(self, option: str, args: Iterator[str]) -> None:
        tree = parse(self.value(args, option), "guest")
        self.options.commands.append(_cmd("machine-set", {"name": str(tree["guest"])}))

    def _machine(self, option: str, args: Iterator[str]) -> None:
        tree = parse(self.value(args, option), "type")
        arguments: dict[str, object] = {}
        for key, value in tree.items():
            if key in ("type", "accel"):
                arguments[key] = value
            else:
                self.fail(f"{option}: unsupported machine property '{key}'")
        self.options.commands.append(_cmd("machine-set", arguments))

    def _accel(self, option: str, args: Iterator[str]) -> None:
        tree = parse(self.value(args, option), "accel")
        self.options.commands.append(_cmd("machine-set", {"accel": tree["accel"]}))

    def _memory(self, option: str, args: Iterator[str]) -> None:
        tree = parse(self.value(args, option), "size")
        self.options.commands.append(_cmd("machine-set", {"memory": parse_size(str(tree["size"]))}))

    def _smp(self, option: str, args: Iterator[str]) -> None:
        tree = parse(self.value(args, option), "cpus")
        cpus = str(tree["cpus"])
        if not cpus.isdigit():
            self.fail(f"-smp: invalid number of cpus '{cpus}'")
        self.options.commands.append(_cmd("machine-set", {"cpus": int(cpus)}))

    def _boot_option(self, option: str, args: Iterator[str]) -> None:
        self._boot[option.lstrip("-")] = self.value(args, option)

    def _chardev(self, option: str, args: Iterator[str]) -> None:
        tree = parse(self.value(args, option), "backend")
        self.options.commands.append(_cmd("chardev-add", chardev_arguments(tree)))

    def _serial(self, option: str, args: Iterator[str]) -> None:
        spec = self.value(args, option)
        if spec == "none":
            return
        if spec.startswith("chardev:"):
            chardev_id = spec.removeprefix("chardev:")
        else:
            chardev_id = self.next_id("serial")
            kind, _, rest = spec.partition(":")
            if kind == "null":
                tree: dict[str, object] = {"backend": "null", "id": chardev_id}
            elif kind == "file":
                tree = {"backend": "file", "id": chardev_id, "path": rest}
            elif kind == "unix":
                tree = {"backend": "socket", "id": chardev_id, **parse("path=" + rest)}
            else:
                self.fail(
                    f"-serial {spec}: expected chardev:ID, file:PATH, unix:PATH, null or none"
                )
            self.options.commands.append(_cmd("chardev-add", chardev_arguments(tree)))
        self.options.commands.append(
            _cmd("device_add", {"driver": "isa-serial", "chardev": chardev_id})
        )

    def _blockdev(self, option: str, args: Iterator[str]) -> None:
        tree = _structured(self.value(args, option), None)
        self.options.commands.append(_cmd("blockdev-add", _typed("blockdev", tree)))

    def _drive(self, option: str, args: Iterator[str]) -> None:
        tree = parse(self.value(args, option), "file")
        unknown = set(tree) - {"file", "if", "format", "readonly", "id", "media", "cache", "index"}
        if unknown:
            self.fail(f"-drive: unsupported parameter '{sorted(unknown)[0]}' (use -blockdev)")
        if "file" not in tree:
            self.fail("-drive: file= is required")
        interface = tree.get("if", "virtio")
        if interface not in ("virtio", "none"):
            self.fail(f"-drive: if={interface} is not supported (virtio or none)")
        node = str(tree.get("id") or self.next_id("drive"))
        blockdev: dict[str, object] = {
            "driver": tree.get("format", "raw"),
            "node-name": node,
            "file": {"driver": "file", "filename": tree["file"]},
        }
        if "readonly" in tree:
            blockdev["read-only"] = tree["readonly"]
        self.options.commands.append(_cmd("blockdev-add", _typed("blockdev", blockdev)))
        if interface == "virtio":
            driver = "virtio-blk-device" if self._machine_type == "microvm" else "virtio-blk-pci"
            self.options.commands.append(_cmd("device_add", {"driver": driver, "drive": node}))

    def _device(self, option: str, args: Iterator[str]) -> None:
        tree = _structured(self.value(args, option), "driver")
        self.options.commands.append(_cmd("device_add", tree))

    def _netdev(self, option: str, args: Iterator[str]) -> None:
        text = self.value(args, option)
        self.options.commands.append(_cmd("netdev_add", netdev_arguments(text)))

    def _nic(self, option: str, args: Iterator[str]) -> None:
        text = self.value(args, option)
        tree = parse(text, "type")
        model = str(
            tree.pop(
                "model",
                "virtio-net-device" if self._machine_type == "microvm" else "virtio-net-pci",
            )
        )
        mac = tree.pop("mac", None)
        netdev_id = str(tree.pop("id", None) or self.next_id("nic"))
        rest = ",".join(f"{k}={v}" for k, v in tree.items() if k != "type")
        spec = f"{tree['type']},id={netdev_id}" + (f",{rest}" if rest else "")
        self.options.commands.append(_cmd("netdev_add", netdev_arguments(spec)))
        device: dict[str, object] = {"driver": model, "netdev": netdev_id}
        if mac is not None:
            device["mac"] = mac
        self.options.commands.append(_cmd("device_add", device))

    HANDLERS: dict[str, Callable[[_Parser, str, Iterator[str]], None]] = {
        "-qmp": _qmp,
        "-S": _flag,
        "-preconfig": _flag,
        "-print-qmp": _flag,
        "-v": _flag,
        "-verbose": _flag,
        "-h": _flag,
        "-help": _flag,
        "-version": _flag,
        "-nographic": _flag,
        "-enable-kvm": _flag,
        "-state-dir": _process_value,
        "-config": _process_value,
        "-engine": _process_value,
        "-display": _process_value,
        "-name": _name,
        "-M": _machine,
        "-machine": _machine,
        "-accel": _accel,
        "-m": _memory,
        "-smp": _smp,
        "-kernel": _boot_option,
        "-initrd": _boot_option,
        "-append": _boot_option,
        "-chardev": _chardev,
        "-serial": _serial,
        "-blockdev": _blockdev,
        "-drive": _drive,
        "-device": _device,
        "-netdev": _netdev,
        "-nic": _nic,
    }


def _scan_machine_type(argv: list[str]) -> str | None:
    found = None
    for option, value in itertools.pairwise(argv):
        if option.lstrip("-") in ("M", "machine"):
            found = str(parse(value, "type").get("type"))
    return found


def _typed(spec_name: str, tree: dict[str, object]) -> dict[str, object]:
    """``tree`` with strings typed as the argument schema ``spec_name`` says."""
    from qmpvm.config import block, chardev, netdev
    from qmpvm.keyval import coerce

    specs: dict[str, object] = {
        "blockdev": block.BlockdevOptions,
        "chardev": chardev.ChardevAdd,
        "netdev": netdev.Netdev,
    }
    value = coerce(specs[spec_name], tree)
    return value if isinstance(value, dict) else tree


def chardev_arguments(tree: dict[str, object]) -> dict[str, object]:
    """-chardev key=value -> chardev-add arguments (ChardevBackend)."""
    tree = dict(tree)
    backend = str(tree.pop("backend"))
    if "id" not in tree:
        raise UsageError("-chardev: id= is required")
    chardev_id = str(tree.pop("id"))
    data: dict[str, object]
    if backend == "socket":
        if "path" in tree:
            addr: dict[str, object] = {"type": "unix", "data": {"path": tree.pop("path")}}
        elif "port" in tree:
            addr = {
                "type": "inet",
                "data": {"host": tree.pop("host", "127.0.0.1"), "port": tree.pop("port")},
            }
        else:
            raise UsageError("-chardev socket: path= or host=,port= is required")
        data = {"addr": addr, **tree}
    elif backend == "file":
        data = {"out": tree.pop("path", ""), **tree}
    else:
        data = tree
    arguments: dict[str, object] = {"id": chardev_id, "backend": {"type": backend, "data": data}}
    return _typed("chardev", arguments)


def netdev_arguments(text: str) -> dict[str, object]:
    """-netdev key=value -> netdev_add arguments; hostfwd/guestfwd repeat."""
    repeated: dict[str, list[dict[str, object]]] = {}
    kept = []
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key in ("hostfwd", "guestfwd"):
            repeated.setdefault(key, []).append({"str": value})
        else:
            kept.append(item)
    tree = parse(",".join(kept), "type")
    tree.update(repeated)
    return _typed("netdev", tree)


def parse_argv(argv: list[str]) -> Options:
    return _Parser(argv).run()


SUBCOMMANDS = ("image", "console", "qmp", "demo")


def main(argv: list[str] | None = None, early: EarlyMonitor | None = None) -> int:
    """Run qmpvm; ``early`` is the monitor ``qmpvm.__main__`` opened already, if any."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return _subcommand(argv[0], argv[1:])
    try:
        options = parse_argv(argv)
    except UsageError as err:
        if early is not None:
            early.close()
        print(f"qmpvm: {err}", file=sys.stderr)
        return 1
    from qmpvm.app import run

    return run(options, early)


def _subcommand(name: str, argv: list[str]) -> int:
    if name == "image":
        from qmpvm.images.cli import main as image_main

        return image_main(argv)
    if name == "demo":
        from qmpvm.tools.demo import main as demo_main

        return demo_main(argv)
    from qmpvm.tools.client import console_main, qmp_main

    return console_main(argv) if name == "console" else qmp_main(argv)
