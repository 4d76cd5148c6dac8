"""The command line turns into QMP commands (no process started).

Text is typed with QEMU 7.2's own schema and option descriptions, kept as
test data, so these tests need no engine.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qmpvm.cli import OPTIONS, InheritedFd, Listener, Start, UsageError, parse_argv
from qmpvm.cli.typer import EngineTyper
from qmpvm.config.kinds import BY_COMMAND, KINDS
from qmpvm.config.resource import Kind
from qmpvm.qapi.check import Schema

DATA = Path(__file__).parent.parent / "data"
SCHEMA = json.loads((Path(__file__).parent.parent / "qapi" / "qemu-7.2-schema.json").read_text())
GROUPS = json.loads((DATA / "qemu-7.2-cmdline.json").read_text())
TYPER = EngineTyper(lambda: Schema(SCHEMA), GROUPS)


def commands(*argv: str) -> list[dict[str, object]]:
    return parse_argv(list(argv), TYPER).machine_commands()


def by_name(cmds: list[dict[str, object]], name: str) -> list[dict[str, object]]:
    return [c["arguments"] for c in cmds if c["execute"] == name]  # type: ignore[misc]


def test_each_option_is_a_qmp_command() -> None:
    cmds = commands(
        "-nodefaults", "-M", "q35,accel=tcg", "-m", "1G", "-smp", "2", "-name", "vm1",
        "-kernel", "/k", "-append", "console=ttyS0",
        "-chardev", "socket,id=c0,path=/tmp/c0,server=on,wait=off", "-serial", "chardev:c0",
        "-drive", "file=/tmp/d.img,if=virtio,format=raw,readonly=on",
        "-netdev", "user,id=n0,hostfwd=tcp::2222-:22", "-device", "virtio-net-pci,netdev=n0",
    )  # fmt: skip
    assert cmds == [
        {
            "execute": "machine-set",
            "arguments": {
                "type": "q35",
                "accel": "tcg",
                "memory": 1 << 30,
                "cpus": 2,
                "name": "vm1",
                "serial": ["chardev:c0"],
                "hotplug-ports": 0,
            },
        },
        {"execute": "boot-set", "arguments": {"kernel": "/k", "append": "console=ttyS0"}},
        {
            "execute": "chardev-add",
            "arguments": {
                "id": "c0",
                "backend": {
                    "type": "socket",
                    "data": {
                        "server": True,
                        "wait": False,
                        "addr": {"type": "unix", "data": {"path": "/tmp/c0"}},
                    },
                },
            },
        },
        {
            "execute": "drive-add",
            "arguments": {
                "file": "/tmp/d.img",
                "format": "raw",
                "readonly": "on",
                "id": "virtio0",
                "if": "none",
            },
        },
        {
            "execute": "netdev_add",
            "arguments": {"type": "user", "id": "n0", "hostfwd": [{"str": "tcp::2222-:22"}]},
        },
        {"execute": "device_add", "arguments": {"driver": "virtio-net-pci", "netdev": "n0"}},
        # -drive if=virtio's device, where QEMU creates it: after the key=value devices
        {"execute": "device_add", "arguments": {"driver": "virtio-blk-pci", "drive": "virtio0"}},
        {"execute": "machine-init"},
        {"execute": "cont"},
    ]


def test_nothing_of_the_reported_mistranslations_is_lost() -> None:
    cmds = commands(
        "-M", "q35", "-smp", "2,sockets=2,cores=1,threads=1", "-m", "size=1G,slots=16,maxmem=4G",
        "-drive", "file=/d,cache=none,media=cdrom,index=1",
        "-netdev", '{"type":"user","id":"n0"}',
        "-chardev", "socket,id=c1,host=localhost,port=1234,reconnect=10", "--preconfig",
    )  # fmt: skip
    (machine,) = by_name(cmds, "machine-set")
    assert machine["cpus"] == 2
    assert machine["smp"] == {"sockets": 2, "cores": 1, "threads": 1}
    assert (machine["memory"], machine["memory-slots"], machine["maxmem"]) == (1 << 30, 16, 4 << 30)
    assert by_name(cmds, "drive-add") == [
        {"file": "/d", "cache": "none", "media": "cdrom", "index": 1, "id": "ide1-cd0"}
    ]
    assert by_name(cmds, "netdev_add") == [{"type": "user", "id": "n0"}]
    (client,) = by_name(cmds, "chardev-add")
    data = client["backend"]["data"]  # type: ignore[index]
    assert data["server"] is False
    assert data["reconnect"] == 10
    assert data["addr"] == {"type": "inet", "data": {"host": "localhost", "port": "1234"}}


def test_text_is_typed_by_the_engine_schema() -> None:
    cmds = commands(
        "-object", "memory-backend-ram,id=m0,size=64M,share=on",
        "-blockdev", "driver=qcow2,node-name=q,file.driver=file,file.filename=/x,"
                     "lazy-refcounts=on",
        "-boot", "order=c,menu=on,splash-time=500", "--preconfig",
    )  # fmt: skip
    assert by_name(cmds, "object-add") == [
        {"qom-type": "memory-backend-ram", "id": "m0", "size": 64 << 20, "share": True}
    ]
    assert by_name(cmds, "blockdev-add") == [
        {
            "driver": "qcow2",
            "node-name": "q",
            "file": {"driver": "file", "filename": "/x"},
            "lazy-refcounts": True,
        }
    ]
    assert by_name(cmds, "machine-set")[0]["boot"] == {
        "order": "c", "menu": True, "splash-time": 500,
    }  # fmt: skip


def test_qemu_drive_names() -> None:
    cmds = commands(
        "-drive", "file=/a,if=virtio", "-drive", "file=/b,if=virtio", "-hda", "/c",
        "-cdrom", "/d", "-drive", "file=/e,if=scsi", "-drive", "file=/f,if=none",
        "-fda", "/g", "--preconfig",
    )  # fmt: skip
    ids = [args["id"] for args in by_name(cmds, "drive-add")]
    assert ids == ["virtio0", "virtio1", "ide0-hd0", "ide1-cd0", "scsi0-hd0", "none0", "floppy0"]
    q35 = commands("-M", "q35", "-hda", "/a", "-hdb", "/b", "-cdrom", "/c", "--preconfig")
    assert [a["id"] for a in by_name(q35, "drive-add")] == ["ide0-hd0", "ide1-hd0", "ide2-cd0"]


def test_resources_are_created_in_qemus_order() -> None:
    """A device may name a chardev given after it, as QEMU allows."""
    cmds = commands(
        "-device", "isa-serial,chardev=late", "-object", "rng-egd,id=rng0,chardev=egd",
        "-chardev", "null,id=late", "-chardev", "null,id=egd", "--preconfig",
    )  # fmt: skip
    order = [(c["execute"], c["arguments"].get("id")) for c in cmds]  # type: ignore[union-attr]
    assert order == [
        ("machine-set", None),
        ("chardev-add", "late"),
        ("chardev-add", "egd"),
        ("object-add", "rng0"),
        ("device_add", None),
    ]


def test_defaults_are_qemus_when_the_line_describes_a_machine() -> None:
    assert by_name(commands("-m", "256", "-S"), "machine-set") == [
        {"memory": 256 << 20, "type": "pc", "hotplug-ports": 0, "defaults": True}
    ]
    assert by_name(commands("-m", "256", "-nodefaults", "-S"), "machine-set") == [
        {"memory": 256 << 20, "type": "pc", "hotplug-ports": 0}  # QEMU adds no spare ports
    ]
    assert by_name(commands("-M", "q35", "-hotplug-ports", "2"), "machine-set") == [
        {"type": "q35", "hotplug-ports": 2, "defaults": True}
    ]
    assert by_name(commands("-S"), "machine-set") == [], "no machine described: none changed"


def test_start_modes() -> None:
    assert parse_argv([]).start is Start.RUN
    assert commands("-S", "-nodefaults")[-1] == {"execute": "machine-init"}
    assert commands("--preconfig", "-nodefaults") == []
    assert by_name(commands("-enable-kvm"), "machine-set")[0]["accel"] == "kvm"
    assert by_name(commands("-accel", "kvm", "-accel", "tcg"), "machine-set")[0]["accel"] == (
        "kvm:tcg"
    )


def test_listeners_and_monitors() -> None:
    options = parse_argv(
        [
            "-qmp", "unix:/tmp/a,server=on,wait=off", "-qmp", "tcp:127.0.0.1:4444,server,nowait",
            "-chardev", "socket,id=charmonitor,fd=7,server=on,wait=off",
            "-mon", "chardev=charmonitor,id=monitor,mode=control",
            "-chardev", "socket,id=m2,path=/tmp/m2,server=on,wait=off",
            "-mon", "chardev=m2,mode=control", "-add-fd", "fd=5,set=2,opaque=log",
        ],
        TYPER,
    )  # fmt: skip
    assert options.listeners == [
        Listener(kind="unix", path="/tmp/a"),
        Listener(kind="tcp", host="127.0.0.1", port=4444),
        Listener(kind="fd", path="7"),
        Listener(kind="unix", path="/tmp/m2"),
    ]
    assert options.inherited_fds == [InheritedFd(fd=5, set=2, opaque="log")]
    assert by_name(options.commands, "chardev-add") == []  # monitors are qmpvm's, not the guest's


def machine_set(cmds: list[dict[str, object]]) -> dict[str, object]:
    return by_name(cmds, "machine-set")[0]


def chardevs(cmds: list[dict[str, object]]) -> dict[str, object]:
    """Each chardev-add's id -> its backend's type."""
    return {str(a["id"]): a["backend"]["type"] for a in by_name(cmds, "chardev-add")}  # type: ignore[index]


@pytest.mark.parametrize(
    ("argv", "serial", "monitors", "backends"),
    [
        # QEMU: the serial port on stdio, the monitor multiplexed on it
        ([], ["chardev:serial0"], [{"chardev": "serial0", "mux": True}],
         {"serial0": "stdio", "parallel0": "null"}),
        # a monitor given (-qmp, -mon, -monitor): the serial port alone on stdio
        (["-qmp", "unix:/tmp/q,server=on,wait=off"], ["chardev:serial0"], None,
         {"serial0": "stdio", "parallel0": "null"}),
        # the serial port elsewhere: the monitor alone on stdio
        (["-serial", "unix:/tmp/s,server=on,wait=off"], ["chardev:serial0"],
         [{"chardev": "compat_monitor0"}],
         {"serial0": "socket", "compat_monitor0": "stdio", "parallel0": "null"}),
        # no defaults: nothing added
        (["-nodefaults"], None, None, {}),
    ],
)  # fmt: skip
def test_nographic_puts_the_serial_port_and_monitor_on_stdio(
    argv: list[str], serial: object, monitors: object, backends: dict[str, object]
) -> None:
    cmds = commands("-nographic", *argv, "--preconfig")
    settings = machine_set(cmds)
    assert settings["display"] == {"type": "none"}
    assert settings.get("serial") == serial
    assert settings.get("monitors") == monitors
    assert chardevs(cmds) == backends


def test_hmp_monitors_are_served_on_consoles() -> None:
    cmds = commands(
        "-serial", "mon:unix:/tmp/s,server=on,wait=off", "-monitor", "stdio", "-echr", "0x14",
        "-chardev", "socket,id=h,path=/tmp/h,server=on,wait=off", "-mon", "chardev=h",
        "--preconfig",
    )  # fmt: skip
    settings = machine_set(cmds)
    assert settings["monitors"] == [
        {"chardev": "serial0", "mux": True},
        {"chardev": "compat_monitor0"},
        {"chardev": "h"},
    ]
    assert settings["escape-char"] == 0x14
    assert chardevs(cmds) == {"serial0": "socket", "compat_monitor0": "stdio", "h": "socket"}


def test_a_readline_monitor_on_a_mux_chardev_shares_one_console() -> None:
    """QEMU's pair (``c-base`` on stdio, the mux ``c``) becomes one console
    ``c`` that qmpvm multiplexes; a mux with no monitor stays the engine's."""
    shared = commands(
        "-chardev", "stdio,mux=on,id=c", "-serial", "chardev:c", "-mon", "chardev=c,mode=readline",
        "--preconfig",
    )  # fmt: skip
    assert chardevs(shared) == {"c": "stdio"}
    assert machine_set(shared)["monitors"] == [{"chardev": "c", "mux": True}]
    alone = commands("-chardev", "null,mux=on,id=c", "-serial", "chardev:c", "--preconfig")
    assert chardevs(alone) == {"c-base": "null", "c": "mux"}


def test_json_options_pass_through() -> None:
    cmds = commands("-device", '{"driver": "virtio-rng-pci", "id": "rng0"}', "--preconfig")
    assert by_name(cmds, "device_add") == [{"driver": "virtio-rng-pci", "id": "rng0"}]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-bogus"], "unknown option '-bogus'"),
        (["-m"], "option -m requires an argument"),
        (["-m", "lots"], "invalid size"),
        (["-initrd", "/i"], "need -kernel"),
        (["-qmp", "stdio"], "expected unix:PATH"),
        (["-qmp", "unix:/s,server=on,wait=on"], "never waits"),
        (["-mon", "chardev=x,mode=bogus"], "expected 'readline' or 'control'"),
        (["-nographic", "-daemonize"], "-nographic cannot be used with -daemonize"),
        (["-serial", "stdio", "-daemonize"], "cannot use stdio with -daemonize"),
        (["-mon", "chardev=x,mode=control"], "chardev 'x' not found"),
        (["-runas", "nobody"], "-runas: not supported"),
        (["-chardev", "socket,id=s"], "'path', 'host'/'port' or 'fd' is required"),
        (["-chardev", "null"], "'id' is required"),
    ],
)
def test_bad_options_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_argv(argv, TYPER)


# One value per accepted option, each carrying a marker that must come out the
# other side: an option that swallowed its value would fail here.
SAMPLES: dict[str, str | None] = {
    "-qmp": "unix:/tmp/MARK,server=on,wait=off",
    "-mon": None,  # tested with its chardev in test_listeners_and_monitors
    "-monitor": "unix:/tmp/MARK,server=on,wait=off", "-echr": "17",
    "-S": None, "-preconfig": None, "-print-qmp": None, "-v": None, "-verbose": None,
    "-daemonize": None, "-nodefaults": None, "-no-user-config": None,
    "-allow-host-programs": None, "-allow-insecure-tcp": None,
    "-state-dir": "/tmp/MARK", "-config": "/tmp/MARK", "-engine": "/tmp/MARK",
    "-restore": None,  # takes no --preconfig: test_restore below
    "-pidfile": "/tmp/MARK", "-hotplug-ports": "17", "-add-fd": "fd=17,set=3",
    "-M": "pc,MARK=on", "-machine": "pc,MARK=on", "-accel": "tcg,MARK=1",
    "-enable-kvm": None, "-m": "17M", "-smp": "17", "-name": "MARK", "-cpu": "MARK,+MARK2",
    "-no-shutdown": None, "-no-reboot": None, "-watchdog-action": "MARK", "-no-acpi": None,
    "-no-hpet": None, "-usb": None, "-nographic": None, "-kernel": "/MARK",
    "-initrd": None, "-append": None,  # with -kernel: see test_each_option...
    "-object": "secret,id=MARK,data=x", "-chardev": "null,id=MARK",
    "-blockdev": "driver=null-co,node-name=MARK", "-drive": "file=/MARK",
    "-netdev": "user,id=MARK", "-device": "MARK", "-serial": "file:/MARK",
    "-parallel": "file:/MARK", "-debugcon": "file:/MARK", "-s": None, "-audio-help": None,
    "-audio": "none,model=MARK", "-acpitable": "sig=MARK", "-dtb": "/MARK", "-seed": "17",
    "-compat": "deprecated-input=MARK", "-gdb": "tcp::17", "-plugin": "/MARK",
    "-only-migratable": None, "-singlestep": None, "-win2k-hack": None, "-no-fd-bootchk": None,
    "-async-teardown": None, "-enable-sync-profile": None, "-full-screen": None,
    "-portrait": None, "-rotate": "17",
    "-hda": "/MARK", "-hdb": "/MARK", "-hdc": "/MARK", "-hdd": "/MARK", "-cdrom": "/MARK",
    "-fda": "/MARK", "-fdb": "/MARK", "-mtdblock": "/MARK", "-sd": "/MARK", "-pflash": "/MARK",
    "-boot": "order=MARK", "-rtc": "base=MARK", "-uuid": "MARK", "-smbios": "type=1,MARK=x",
    "-global": "driver=MARK,property=p,value=v", "-numa": "node,MARK=1", "-action": "panic=MARK",
    "-display": "MARK", "-vnc": "MARK", "-vga": "MARK", "-spice": "port=MARK",
    "-audiodev": "none,id=MARK", "-fsdev": "local,id=MARK,path=/x,security_model=none",
    "-virtfs": "local,path=/x,mount_tag=MARK,security_model=none", "-tpmdev": "emulator,id=MARK",
    "-net": "nic,model=MARK", "-nic": "user,model=MARK", "-usbdevice": "MARK",
    "-msg": "timestamp=MARK", "-overcommit": "mem-lock=MARK", "-sandbox": "on,MARK=deny",
    "-icount": "shift=MARK", "-fw_cfg": "name=opt/MARK,string=x", "-option-rom": "/MARK",
    "-iscsi": "initiator-name=MARK", "-bios": "/MARK", "-L": "/MARK", "-k": "MARK",
    "-mem-path": "/MARK", "-mem-prealloc": None, "-snapshot": None, "-incoming": "MARK",
    "-loadvm": "MARK", "-readconfig": None,  # test_readconfig
}  # fmt: skip


def test_every_accepted_option_keeps_what_it_was_given() -> None:
    accepted = {name for name, option in OPTIONS.items() if option.handler is not None}
    assert accepted == set(SAMPLES), "every accepted option needs a sample here"
    for option, value in SAMPLES.items():
        if value is None:
            if not OPTIONS[option].takes_value:
                parse_argv([option, "--preconfig"], TYPER)
            continue
        result = parse_argv([option, value, "--preconfig"], TYPER)
        marker = "17" if "17" in value else "MARK"
        seen = json.dumps([result.commands, repr(result)])
        assert marker in seen, f"{option} {value} lost its value: {seen}"


def test_restore_is_one_command_and_takes_no_machine_options() -> None:
    assert parse_argv(["--restore", "/tmp/MARK"]).machine_commands() == [
        {"execute": "machine-restore", "arguments": {"dir": "/tmp/MARK", "paused": False}}
    ]
    paused = parse_argv(["-S", "--restore", "/tmp/MARK", "--state-dir", "/tmp/s"])
    assert paused.machine_commands()[0]["arguments"] == {"dir": "/tmp/MARK", "paused": True}
    with pytest.raises(UsageError, match="cannot wait for machine-init"):
        parse_argv(["--restore", "/tmp/MARK", "--preconfig"])
    with pytest.raises(UsageError, match="give no machine options"):
        parse_argv(["--restore", "/tmp/MARK", "-m", "1G"])


def test_refused_options_say_why() -> None:
    for name, option in OPTIONS.items():
        if option.handler is None:
            argv = [name, "x"] if option.takes_value else [name]
            with pytest.raises(UsageError, match=re.escape(f"{name}: not supported: {option.doc}")):
                parse_argv(argv, TYPER)


def sample_lines() -> list[Path]:
    return sorted((DATA / "cli-sample").glob("*.args"))


def qemu_argv(path: Path) -> list[str]:
    """A libvirt test line: environment assignments, the binary, then the options."""
    words = shlex.split(path.read_text().replace("\\\n", " "))
    start = next(i for i, word in enumerate(words) if word.startswith("/usr/bin/qemu"))
    return words[start + 1 :]


def test_real_command_lines_translate_whole() -> None:
    """Every line management tools generated in the sample translates; the one
    refused is refused by QEMU too (libvirt's test of passing an option through)."""
    refused = {}
    for path in sample_lines():
        try:
            parse_argv(qemu_argv(path), TYPER)
        except UsageError as err:
            refused[path.name] = str(err)
    assert refused == {"qemu-ns-no-env.args": "unknown option '-unknown' (see --help)"}


def test_every_kind_has_its_commands() -> None:
    for kind, spec in KINDS.items():
        assert BY_COMMAND[spec.add].kind is kind
        assert BY_COMMAND[spec.delete].kind is kind
    assert list(KINDS) == list(Kind)


def test_print_qmp_and_errors_from_the_real_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qmpvm", "--print-qmp", "-m", "256", "-nodefaults", "-S"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [json.loads(line) for line in out.stdout.splitlines()] == [
        {
            "execute": "machine-set",
            "arguments": {"memory": 256 << 20, "type": "pc", "hotplug-ports": 0},
        },
        {"execute": "machine-init"},
    ]
    bad = subprocess.run(
        [sys.executable, "-m", "qmpvm", "-frobnicate"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1
    assert bad.stderr.strip() == "qmpvm: unknown option '-frobnicate' (see --help)"


def test_every_option_of_the_engine_is_translated_or_refused_by_name() -> None:
    """The whole command line: every option the engine's own --help lists."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    text = subprocess.run([qemu, "-help"], capture_output=True, text=True, check=True).stdout
    listed = {
        name
        for line in text.splitlines()
        if line.startswith("-")
        for name in line.split()[0].split("/")  # "-fda/-fdb file"
    }
    listed -= {"-h", "-version", "--preconfig"}  # qmpvm's own entry point answers these
    assert listed - set(OPTIONS) == set()


def test_numbered_descriptors_become_inherited_names() -> None:
    options = parse_argv(
        ["-netdev", "tap,id=n0,fds=20:21,vhost=on,vhostfds=22:23",
         "-chardev", "socket,id=c0,fd=30,server=on,wait=off", "--preconfig"],
        TYPER,
    )  # fmt: skip
    (netdev,) = by_name(options.commands, "netdev_add")
    assert (netdev["fds"], netdev["vhostfds"]) == ("fd20:fd21", "fd22:fd23")
    (char,) = by_name(options.commands, "chardev-add")
    assert char["backend"]["data"]["addr"] == {"type": "fd", "data": {"str": "fd30"}}  # type: ignore[index]
    assert [(n.fd, n.name) for n in options.named_fds] == [
        (30, "fd30"), (20, "fd20"), (21, "fd21"), (22, "fd22"), (23, "fd23"),
    ]  # fmt: skip


def test_readconfig(tmp_path: Path) -> None:
    config = tmp_path / "vm.cfg"
    config.write_text(
        '# written by -writeconfig\n[machine]\n  type = "q35"\n[memory]\n  size = "512M"\n'
        '[drive "disk0"]\n  file = "/d,1"\n  if = "none"\n'
        '[device "vd0"]\n  driver = "virtio-blk-pci"\n  drive = "disk0"\n'
    )
    cmds = commands("-readconfig", str(config), "--preconfig")
    assert by_name(cmds, "machine-set")[0]["type"] == "q35"
    assert by_name(cmds, "machine-set")[0]["memory"] == 512 << 20
    assert by_name(cmds, "drive-add") == [{"id": "disk0", "file": "/d,1", "if": "none"}]
    assert by_name(cmds, "device_add") == [{"id": "vd0", "driver": "virtio-blk-pci",
                                           "drive": "disk0"}]  # fmt: skip
    config.write_text('[frobnicate]\n  x = "1"\n')
    with pytest.raises(UsageError, match=r"group \[frobnicate\] is not supported"):
        parse_argv(["-readconfig", str(config)], TYPER)


def test_review_cases() -> None:
    """Cases a review found: each accelerator keeps its own properties, chardev:
    ports count towards QEMU's serialN labels, descriptors in -nic are refused."""
    (machine,) = by_name(
        commands("-accel", "kvm,kernel-irqchip=split", "-accel", "tcg,thread=single", "-S"),
        "machine-set",
    )
    assert machine["accel"] == "kvm:tcg"
    assert machine["accel-properties"] == {
        "kvm": {"kernel-irqchip": "split"}, "tcg": {"thread": "single"},
    }  # fmt: skip
    cmds = commands("-chardev", "null,id=c", "-serial", "chardev:c", "-serial", "null", "-S")
    assert [a["id"] for a in by_name(cmds, "chardev-add")] == ["c", "serial1"]
    with pytest.raises(UsageError, match="-nic: pass descriptors with -netdev"):
        parse_argv(["-nic", "tap,fd=3"], TYPER)


def test_short_form_booleans_as_qemu_7_2_takes_them() -> None:
    (char,) = by_name(commands("-chardev", "socket,id=c,path=/s,server,nowait", "-S"),
                      "chardev-add")  # fmt: skip
    assert char["backend"]["data"]["server"] is True  # type: ignore[index]
    assert char["backend"]["data"]["wait"] is False  # type: ignore[index]


def test_chardev_keys_a_backend_does_not_use_are_ignored_as_qemu_ignores_them() -> None:
    options = parse_argv(
        ["-chardev", "qemu-vdagent,id=ch0,name=vdagent,clipboard=on,mouse=on", "-S"], TYPER
    )
    (char,) = by_name(options.commands, "chardev-add")
    assert char["backend"] == {"type": "qemu-vdagent", "data": {"clipboard": True, "mouse": True}}
    assert options.warnings == [
        "-chardev qemu-vdagent: 'name' is not used by this backend (QEMU ignores it too)"
    ]
    with pytest.raises(UsageError, match="unknown parameter 'bogus'"):
        parse_argv(["-chardev", "null,id=c,bogus=1"], TYPER)


def test_a_word_that_is_no_option_is_the_first_disk_as_in_qemu() -> None:
    cmds = commands("-M", "pc", "disk.img", "-S")
    assert by_name(cmds, "drive-add") == [{"file": "disk.img", "index": 0, "id": "ide0-hd0"}]


def test_end_to_end_review_cases() -> None:
    """From running libvirt's own lines through QEMU and qmpvm side by side."""
    (machine,) = by_name(
        commands("-cpu", "qemu64,hv-crash,-vmx", "-m", "8",
                 "-fsdev", "local,id=f0,path=/x,security_model=none", "-S"),
        "machine-set",
    )  # fmt: skip
    assert machine["cpu"] == {"model": "qemu64", "hv-crash": "on", "vmx": "off"}
    assert machine["memory"] == 8 << 20
    assert machine["fsdev"] == [
        {"fsdriver": "local", "id": "f0", "path": "/x", "security_model": "none"}
    ]
