"""The configuration becomes one engine command line (pure: no process)."""

from __future__ import annotations

import json

import pytest

from qmpvm.config.boot import BootSet
from qmpvm.config.machine import Accel, MachineSet
from qmpvm.config.model import Config, make_from_args
from qmpvm.config.resource import Kind
from qmpvm.engine.launch import LaunchPlan, build_launch, machine_family
from qmpvm.errors import ConfigError

MiB = 1024 * 1024
LINK_FD = 9


def add(config: Config, kind: Kind, args: dict[str, object]) -> Config:
    return config.add(make_from_args(kind, args, config.next_seq))


def launch(
    config: Config,
    named_fds: dict[str, int] | None = None,
    fdsets: dict[int, list[int]] | None = None,
) -> LaunchPlan:
    return build_launch(
        config,
        binary="qemu-system-x86_64",
        accel="tcg",
        link_fd=LINK_FD,
        named_fds=named_fds or {},
        fdsets=fdsets or {},
    )


def values(plan: LaunchPlan, option: str) -> list[str]:
    argv = plan.argv
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def test_machine_boot_and_resources_in_order() -> None:
    config = Config().set_machine(
        MachineSet(type="q35", accel=Accel.TCG, memory=256 * MiB, cpus=2, name="vm,1")
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
    assert values(plan, "-m") == ["256M"] and values(plan, "-smp") == ["2"]
    assert values(plan, "-name") == ["vm,,1"], "commas doubled in key=value options"
    assert values(plan, "-kernel") == ["/k"] and values(plan, "-append") == ["console=ttyS0"]
    assert values(plan, "-chardev") == [
        f"socket,id=qmpvm-link,fd={LINK_FD}",
        "ringbuf,id=s0,size=4096",
    ]
    assert values(plan, "-mon") == ["chardev=qmpvm-link,mode=control"]
    assert [json.loads(v) for v in values(plan, "-blockdev")] == [disk]
    devices = [json.loads(v) for v in values(plan, "-device")]
    assert [d["id"] for d in devices] == [f"qmpvm-hp{i}" for i in range(4)] + ["vda"]
    assert plan.hotplug_ports == ("qmpvm-hp0", "qmpvm-hp1", "qmpvm-hp2", "qmpvm-hp3")
    assert plan.pass_fds == (LINK_FD,)
    assert plan.after_start == (("set_link", {"name": "vda", "up": False}),)


@pytest.mark.parametrize(
    ("machine", "ports", "expected"), [("q35", 0, 0), ("q35", 9, 9), ("pc", 9, 0)]
)
def test_hotplug_ports_only_on_q35_as_many_as_configured(
    machine: str, ports: int, expected: int
) -> None:
    plan = launch(Config().set_machine(MachineSet(type=machine, hotplug_ports=ports)))
    assert len(plan.hotplug_ports) == expected
    roots = [json.loads(v) for v in values(plan, "-device")]
    assert [d["chassis"] for d in roots] == list(range(1, expected + 1))


def test_hotplug_ports_are_bounded() -> None:
    with pytest.raises(ConfigError, match="'hotplug-ports' must be between 0 and"):
        Config().set_machine(MachineSet(hotplug_ports=100))


def test_passed_descriptors_are_inherited_and_named_by_number() -> None:
    config = add(Config(), Kind.NETDEV, {"type": "tap", "id": "n0", "fd": "tap0"})
    file = {"driver": "file", "node-name": "f0", "filename": "/dev/fdset/2"}
    config = add(config, Kind.BLOCK, file)
    plan = launch(config, named_fds={"tap0": 21}, fdsets={2: [22, 23]})
    assert values(plan, "-add-fd") == ["fd=22,set=2", "fd=23,set=2"]
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
