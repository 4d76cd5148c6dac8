"""The configuration becomes one engine command line (pure: no process)."""

from __future__ import annotations

import json

import pytest

from qmpvm.config import kinds
from qmpvm.config.boot import BootSet
from qmpvm.config.model import Config
from qmpvm.config.resource import Kind
from qmpvm.engine.launch import LaunchPlan, build_launch, machine_family
from qmpvm.errors import ConfigError
from qmpvm.keyval import parse

MiB = 1024 * 1024
LINK_FD = 9


def add(config: Config, kind: Kind, args: dict[str, object]) -> Config:
    return config.add(kinds.make(kind, args, config.next_seq))


def launch(
    config: Config,
    named_fds: dict[str, int] | None = None,
    fdsets: dict[int, list[int]] | None = None,
    opaques: dict[int, str] | None = None,
) -> LaunchPlan:
    return build_launch(
        config,
        binary="qemu-system-x86_64",
        accel="tcg",
        link_fd=LINK_FD,
        named_fds=named_fds or {},
        fdsets=fdsets or {},
        opaques=opaques,
    )


def values(plan: LaunchPlan, option: str) -> list[str]:
    argv = plan.argv
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def device(text: str) -> dict[str, object]:
    """A -device value: JSON, or key=value (which the engine keeps in order)."""
    return json.loads(text) if text.startswith("{") else parse(text, "driver")


def test_machine_boot_and_resources_in_order() -> None:
    config = Config().set_machine(
        {"type": "q35", "accel": "tcg", "memory": 256 * MiB, "cpus": 2, "name": "vm,1"}
    )
    config = config.set_boot(BootSet(kernel="/k", initrd="/i", append="console=ttyS0"))
    ringbuf = {"id": "s0", "backend": {"type": "ringbuf", "data": {"size": 4096}}}
    disk = {"driver": "raw", "node-name": "d0", "file": {"driver": "file", "filename": "/d"}}
    config = add(config, Kind.CHARDEV, ringbuf)
    config = add(config, Kind.BLOCK, disk)
    config = add(config, Kind.DEVICE, {"driver": "virtio-blk-pci", "drive": "d0", "id": "vda"})
    plan = launch(config.set_link("vda", False))

    assert plan.argv[:6] == (
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-S", "-display", "none"
    )  # fmt: skip
    assert values(plan, "-machine") == ["q35"] and values(plan, "-accel") == ["tcg"]
    assert values(plan, "-m") == ["size=256M"] and values(plan, "-smp") == ["cpus=2"]
    assert values(plan, "-name") == ["guest=vm,,1"], "commas doubled in key=value options"
    assert values(plan, "-kernel") == ["/k"] and values(plan, "-append") == ["console=ttyS0"]
    assert values(plan, "-chardev") == [
        f"socket,id=qmpvm-link,fd={LINK_FD}",
        "ringbuf,id=s0,size=4096",
    ]
    assert values(plan, "-mon") == ["chardev=qmpvm-link,mode=control"]
    assert [json.loads(v) for v in values(plan, "-blockdev")] == [disk]
    devices = [device(v) for v in values(plan, "-device")]
    # the user's devices first: they get the PCI slots QEMU would give them
    assert [d["id"] for d in devices] == ["vda"] + [f"qmpvm-hp{i}" for i in range(4)]
    assert plan.hotplug_ports == ("qmpvm-hp0", "qmpvm-hp1", "qmpvm-hp2", "qmpvm-hp3")
    assert plan.pass_fds == (LINK_FD,)
    assert plan.after_start == (("set_link", {"name": "vda", "up": False}),)


@pytest.mark.parametrize(
    ("machine", "ports", "expected"), [("q35", 0, 0), ("q35", 9, 9), ("pc", 9, 0)]
)
def test_hotplug_ports_only_on_q35_as_many_as_configured(
    machine: str, ports: int, expected: int
) -> None:
    plan = launch(Config().set_machine({"type": machine, "hotplug-ports": ports}))
    assert len(plan.hotplug_ports) == expected
    roots = [json.loads(v) for v in values(plan, "-device")]
    assert [d["chassis"] for d in roots] == list(range(0x40, 0x40 + expected))


def test_hotplug_ports_are_bounded() -> None:
    with pytest.raises(ConfigError, match="'hotplug-ports' must be between 0 and"):
        Config().set_machine({"hotplug-ports": 100})


def test_passed_descriptors_are_inherited_and_named_by_number() -> None:
    config = add(Config(), Kind.NETDEV, {"type": "tap", "id": "n0", "fd": "tap0"})
    file = {"driver": "file", "node-name": "f0", "filename": "/dev/fdset/2"}
    config = add(config, Kind.BLOCK, file)
    plan = launch(config, named_fds={"tap0": 21}, fdsets={2: [22, 23]}, opaques={23: "a,b"})
    assert values(plan, "-add-fd") == ["fd=22,set=2", "fd=23,set=2,opaque=a,,b"]
    assert json.loads(values(plan, "-netdev")[0])["fd"] == "21"
    assert set(plan.pass_fds) == {LINK_FD, 21, 22, 23}


def test_a_missing_descriptor_is_named() -> None:
    config = add(Config(), Kind.NETDEV, {"type": "tap", "id": "n0", "fd": "tap0"})
    with pytest.raises(ConfigError, match="needs file descriptor 'tap0': pass it with getfd"):
        launch(config)


@pytest.mark.parametrize(
    ("machine", "family"),
    [("q35", "q35"), ("pc-q35-7.2", "q35"), ("pc-i440fx-7.2", "pc"), ("microvm", "microvm")],
)
def test_machine_family(machine: str, family: str) -> None:
    assert machine_family(machine) == family


def test_every_machine_setting_becomes_its_engine_option() -> None:
    config = Config().set_machine(
        {
            "type": "pc",
            "properties": {"usb": False, "dump-guest-core": False},
            "accel": "kvm:tcg",
            "accel-properties": {"tcg": {"tb-size": 64}, "kvm": {"kernel-irqchip": "split"}},
            "cpus": 4,
            "smp": {"sockets": 2, "cores": 2},
            "maxmem": 4 << 30,
            "memory-slots": 8,
            "name-options": {"debug-threads": True},
            "cpu": {"model": "qemu64", "vmx": "off"},
            "defaults": True,
            "boot": {"strict": True},
            "numa": [{"type": "node", "nodeid": 0, "cpus": ["0-1", "3"]}],
            "global": [{"driver": "cfi.pflash01", "property": "secure", "value": "on"}],
            "action": {"shutdown": "pause"},
            "uuid": "c7a5fdbd-edaf-9455-926a-d65c16db1809",
            "snapshot": True,
        }
    )
    argv = launch(config).argv
    assert "-nodefaults" not in argv
    assert values(launch(config), "-machine") == ["pc,usb=off,dump-guest-core=off"]
    assert values(launch(config), "-accel") == ["tcg,tb-size=64"]  # launch() picks tcg
    assert values(launch(config), "-smp") == ["cpus=4,sockets=2,cores=2"]
    assert values(launch(config), "-m") == ["size=128M,slots=8,maxmem=4294967296"]
    assert values(launch(config), "-cpu") == ["qemu64,vmx=off"]
    assert values(launch(config), "-numa") == ["node,nodeid=0,cpus=0-1,cpus=3"]
    assert values(launch(config), "-global") == ["driver=cfi.pflash01,property=secure,value=on"]
    assert values(launch(config), "-action") == ["shutdown=pause"]
    assert values(launch(config), "-boot") == ["strict=on"]
    assert "-snapshot" in argv


def test_drives_and_chardevs_in_qemus_key_value_form() -> None:
    config = add(Config(), Kind.DRIVE, {"id": "virtio0", "file": "/a,b", "if": "virtio"})
    listen = {"id": "c0", "backend": {"type": "socket", "data": {
        "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "4444"}}}}}  # fmt: skip
    connect = {"id": "c1", "backend": {"type": "socket", "data": {"server": False,
        "addr": {"type": "unix", "data": {"path": "/s"}}, "reconnect": 10}}}  # fmt: skip
    config = add(add(config, Kind.CHARDEV, listen), Kind.CHARDEV, connect)
    plan = launch(config)
    assert values(plan, "-drive") == ["id=virtio0,file=/a,,b,if=virtio"]
    assert values(plan, "-chardev")[1:] == [
        "socket,id=c0,host=127.0.0.1,port=4444,server=on,wait=off",  # QMP's defaults, made explicit
        "socket,id=c1,server=off,reconnect=10,path=/s",
    ]


def test_an_implied_value_with_an_equals_sign_keeps_its_key() -> None:
    config = Config().set_machine({"vnc": {"vnc": "unix:/tmp/foo=bar.sock", "audiodev": "a"}})
    assert values(launch(config), "-vnc") == ["vnc=unix:/tmp/foo=bar.sock,audiodev=a"]


def test_the_engine_gets_a_syscall_filter_unless_told_otherwise() -> None:
    config = Config()
    assert values(launch(config), "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    ]
    host_programs = build_launch(
        config, binary="q", accel="tcg", link_fd=LINK_FD, named_fds={}, fdsets={}, spawn=True
    )
    assert "spawn=allow" in values(host_programs, "-sandbox")[0]
    lifted = config.set_machine({"confine": {"seccomp": False}})
    assert values(launch(lifted), "-sandbox") == []
    own = config.set_machine({"sandbox": {"enable": "on", "spawn": "allow"}})
    assert values(launch(own), "-sandbox") == ["on,spawn=allow"]


def test_a_machine_that_outlives_qmpvm_listens_for_its_monitor() -> None:
    plan = build_launch(
        Config(), binary="q", accel="tcg", link_fd=LINK_FD, named_fds={}, fdsets={},
        link_listens=True,
    )  # fmt: skip
    assert f"socket,id=qmpvm-link,fd={LINK_FD},server=on,wait=off" in values(plan, "-chardev")
    restoring = build_launch(
        Config().set_machine({"incoming": "tcp:0:4444", "loadvm": "t1"}), binary="q",
        accel="tcg", link_fd=LINK_FD, named_fds={}, fdsets={}, incoming=True,
    )  # fmt: skip
    assert values(restoring, "-incoming") == ["defer"] and values(restoring, "-loadvm") == []
