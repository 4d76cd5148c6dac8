"""Pure configuration logic: invariants, export, documents round trip."""

from __future__ import annotations

import pytest

from qmpvm.config.block import fdset_ids
from qmpvm.config.boot import BootSet
from qmpvm.config.machine import Accel, MachineConfig, MachineSet
from qmpvm.config.model import Config, make_from_args
from qmpvm.config.netdev import fd_names
from qmpvm.config.resource import Kind
from qmpvm.errors import ArgumentError, ConfigError, NotFoundError
from qmpvm.schema import check

RINGBUF = {"id": "s0", "backend": {"type": "ringbuf", "data": {"size": 4096}}}
DISK = {"driver": "raw", "node-name": "d0", "file": {"driver": "file", "filename": "/tmp/d"}}


def add(config: Config, kind: Kind, args: dict[str, object]) -> Config:
    return config.add(make_from_args(kind, args, config.next_seq))


def sample() -> Config:
    config = Config().set_machine(MachineSet(memory=256 << 20, accel=Accel.TCG))
    config = config.set_boot(BootSet(kernel="/k", append="console=ttyS0"))
    config = add(config, Kind.CHARDEV, RINGBUF)
    config = add(config, Kind.BLOCK, DISK)
    config = add(config, Kind.DEVICE, {"driver": "virtio-blk-pci", "drive": "d0", "id": "vd0"})
    config = add(config, Kind.DEVICE, {"driver": "isa-serial", "chardev": "s0"})
    return config.set_link("vd0", False)


def test_update_returns_new_value_and_leaves_old_alone() -> None:
    old = Config()
    new = old.set_machine(MachineSet(cpus=2))
    assert old.machine.cpus == 1
    assert new.machine.cpus == 2
    assert new.machine.memory == MachineConfig().memory  # absent keys left as they are


@pytest.mark.parametrize(
    ("change", "message"),
    [(MachineSet(memory=1000), "multiple of 1 MiB"), (MachineSet(cpus=0), "between 1 and")],
)
def test_machine_set_refuses_bad_values(change: MachineSet, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config().set_machine(change)


def test_ids_are_unique_per_kind() -> None:
    config = add(Config(), Kind.CHARDEV, RINGBUF)
    with pytest.raises(ConfigError, match="Chardev 's0' already exists"):
        add(config, Kind.CHARDEV, RINGBUF)


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        ({"driver": "virtio-blk-pci", "drive": "nope"}, "Block node 'nope'"),
        ({"driver": "virtio-net-pci", "netdev": "nope"}, "Netdev 'nope'"),
        ({"driver": "isa-serial", "chardev": "nope"}, "Chardev 'nope'"),
    ],
)
def test_device_references_must_resolve(args: dict[str, object], missing: str) -> None:
    with pytest.raises(NotFoundError, match=missing):
        add(Config(), Kind.DEVICE, args)


def test_node_in_use_cannot_be_deleted_until_its_user_is() -> None:
    config = sample()
    with pytest.raises(ConfigError, match="Block node 'd0' is in use by device 'vd0'"):
        config.remove(Kind.BLOCK, "d0")
    config = config.remove(Kind.DEVICE, "vd0").remove(Kind.BLOCK, "d0")
    assert config.find(Kind.BLOCK, "d0") is None
    assert config.links == {}  # the link setting went with its device


def test_block_child_references_resolve() -> None:
    config = add(Config(), Kind.BLOCK, {"driver": "file", "node-name": "f0", "filename": "/tmp/x"})
    config = add(config, Kind.BLOCK, {"driver": "qcow2", "node-name": "q0", "file": "f0"})
    with pytest.raises(ConfigError, match="in use by block node 'q0'"):
        config.remove(Kind.BLOCK, "f0")
    with pytest.raises(NotFoundError):
        add(Config(), Kind.BLOCK, {"driver": "qcow2", "node-name": "q0", "file": "f0"})


def test_export_diff_lists_only_what_differs_from_defaults() -> None:
    export = sample().export(diff=True)
    assert export[0] == {
        "execute": "machine-set",
        "arguments": {"accel": "tcg", "memory": 256 << 20},
    }
    assert [c["execute"] for c in export] == [
        "machine-set",
        "boot-set",
        "chardev-add",
        "blockdev-add",
        "device_add",
        "device_add",
        "set_link",
    ]
    full = sample().export(diff=False)
    assert full[0]["arguments"] == {
        "type": "q35",
        "accel": "tcg",
        "memory": 256 << 20,
        "cpus": 1,
        "hotplug-ports": 4,
    }
    assert Config().export() == []


def test_documents_round_trip_through_the_api_checks() -> None:
    config = sample().remove(Kind.DEVICE, "#4")
    again = Config.from_documents(config.documents())
    assert again == config


def test_schema_errors_use_qemu_wording() -> None:
    with pytest.raises(ArgumentError, match="Parameter 'bogus' is unexpected"):
        check(MachineSet, {"bogus": 1})
    with pytest.raises(
        ArgumentError, match="Invalid parameter type for 'memory', expected: integer"
    ):
        check(MachineSet, {"memory": "1G"})
    with pytest.raises(ArgumentError, match="Invalid parameter type for 'cpus', expected: integer"):
        check(MachineSet, {"cpus": True})
    with pytest.raises(ArgumentError, match="Parameter 'kernel' is missing"):
        check(BootSet, {})
    with pytest.raises(ArgumentError, match="Parameter 'accel' does not accept value 'hvf'"):
        check(MachineSet, {"accel": "hvf"})


def test_fdset_ids_found_in_inline_children() -> None:
    node = {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": "/dev/fdset/3"},
        "backing": {"driver": "raw", "file": {"driver": "file", "filename": "/dev/fdset/10"}},
    }
    assert fdset_ids(node) == {3, 10}
    assert fdset_ids({"driver": "file", "filename": "/dev/fdset/x"}) == set()
    assert fdset_ids({"driver": "file", "filename": "/srv/disk.img"}) == set()


def test_fd_names_of_a_netdev_document() -> None:
    tap = {"type": "tap", "id": "n0", "fd": "tap0", "vhostfds": "v1:v2", "fds": "3:q0"}
    assert fd_names(tap) == ["tap0", "q0", "v1", "v2"]
    assert fd_names({"type": "user", "id": "n1"}) == []
