"""Pure configuration logic: invariants, export, documents round trip."""

from __future__ import annotations

import pytest

from qmpvm.config import kinds
from qmpvm.config.boot import BootSet
from qmpvm.config.descriptors import fd_names, fdset_ids
from qmpvm.config.machine import MachineConfig
from qmpvm.config.model import Config
from qmpvm.config.resource import Kind
from qmpvm.errors import ArgumentError, ConfigError, NotFoundError

RINGBUF = {"id": "s0", "backend": {"type": "ringbuf", "data": {"size": 4096}}}
DISK = {"driver": "raw", "node-name": "d0", "file": {"driver": "file", "filename": "/tmp/d"}}


def add(config: Config, kind: Kind, args: dict[str, object]) -> Config:
    return config.add(kinds.make(kind, args, config.next_seq))


def sample() -> Config:
    config = Config().set_machine({"memory": 256 << 20, "accel": "tcg"})
    config = config.set_boot(BootSet(kernel="/k", append="console=ttyS0"))
    config = add(config, Kind.CHARDEV, RINGBUF)
    config = add(config, Kind.BLOCK, DISK)
    config = add(config, Kind.DEVICE, {"driver": "virtio-blk-pci", "drive": "d0", "id": "vd0"})
    config = add(config, Kind.DEVICE, {"driver": "isa-serial", "chardev": "s0"})
    return config.set_link("vd0", False)


def test_update_returns_new_value_and_leaves_old_alone() -> None:
    old = Config()
    new = old.set_machine({"cpus": 2})
    assert old.machine.cpus == 1
    assert new.machine.cpus == 2
    assert new.machine.memory == MachineConfig().memory  # absent keys left as they are


@pytest.mark.parametrize(
    ("change", "message"),
    [({"memory": 1000}, "multiple of 1 MiB"), ({"cpus": 0}, "between 1 and")],
)
def test_machine_set_refuses_bad_values(change: dict[str, object], message: str) -> None:
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
        "escape-char": 1,
        "defaults": False,
    }
    assert Config().export() == []


def test_documents_round_trip_through_the_api_checks() -> None:
    config = sample().remove(Kind.DEVICE, "#4")
    again = Config.from_documents(config.documents())
    assert again == config


def test_schema_errors_use_qemu_wording() -> None:
    from qmpvm.commands import REGISTRY

    check = REGISTRY.checker().check_command
    with pytest.raises(ArgumentError, match="Parameter 'bogus' is unexpected"):
        check("machine-set", {"bogus": 1})
    with pytest.raises(
        ArgumentError, match="Invalid parameter type for 'memory', expected: integer"
    ):
        check("machine-set", {"memory": "1G"})
    with pytest.raises(ArgumentError, match="Invalid parameter type for 'cpus', expected: integer"):
        check("machine-set", {"cpus": True})
    with pytest.raises(ArgumentError, match="Parameter 'kernel' is missing"):
        check("boot-set", {})
    with pytest.raises(ArgumentError, match="Invalid parameter type for 'smp', expected: object"):
        Config().set_machine({"smp": 2})


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


@pytest.mark.parametrize("kind", list(Kind))
def test_an_empty_id_is_refused(kind: Kind) -> None:
    key = kinds.KINDS[kind].key
    with pytest.raises(ArgumentError, match=f"Parameter '{key}' must not be empty"):
        kinds.make(kind, {key: "", "driver": "x"}, 1)


def test_a_stored_row_that_no_longer_loads_is_set_aside() -> None:
    docs = sample().documents()
    docs["device/bad"] = '{"seq": 2, "args": {"driver": "isa-serial", "id": "bad", "chardev": ""}}'
    docs["device/worse"] = '{"seq": 3, "args": {"driver": "isa-serial", "chardev": "gone"}}'
    docs["chardev/broken"] = "not json"
    loaded = Config.from_documents(docs)
    assert loaded.find(Kind.BLOCK, "d0") is not None  # the rest comes back
    assert sorted(loaded.set_aside) == ["chardev/broken", "device/worse"]
    assert loaded.find(Kind.DEVICE, "bad") is not None  # an empty reference names nothing
    assert loaded.describe()["set-aside"] == ["chardev/broken", "device/worse"]
    assert loaded.documents()["device/worse"] == docs["device/worse"]  # kept, not lost


def test_references_of_every_kind() -> None:
    config = add(Config(), Kind.OBJECT, {"qom-type": "secret", "id": "sec0", "data": "x"})
    config = add(config, Kind.CHARDEV, {"id": "c0", "backend": {"type": "null", "data": {}}})
    config = add(config, Kind.OBJECT, {"qom-type": "rng-egd", "id": "rng0", "chardev": "c0"})
    config = add(config, Kind.DRIVE, {"id": "virtio0", "file": "/d", "if": "none"})
    luks = {"driver": "luks", "node-name": "l0", "key-secret": "sec0",
            "file": {"driver": "file", "filename": "/l"}}  # fmt: skip
    config = add(config, Kind.BLOCK, luks)
    config = add(config, Kind.DEVICE, {"driver": "virtio-blk-pci", "drive": "virtio0"})
    config = add(config, Kind.DEVICE, {"driver": "virtio-rng-pci", "rng": "rng0", "id": "r"})
    with pytest.raises(ConfigError, match="Object 'sec0' is in use by block node 'l0'"):
        config.remove(Kind.OBJECT, "sec0")
    with pytest.raises(ConfigError, match="Chardev 'c0' is in use by object 'rng0'"):
        config.remove(Kind.CHARDEV, "c0")
    with pytest.raises(ConfigError, match="Drive 'virtio0' is in use by device '#6'"):
        config.remove(Kind.DRIVE, "virtio0")
    with pytest.raises(NotFoundError, match="Object 'nope' not found"):
        add(config, Kind.DEVICE, {"driver": "virtio-rng-pci", "rng": "nope"})


def test_what_the_machine_settings_name_cannot_be_deleted() -> None:
    config = add(Config(), Kind.CHARDEV, {"id": "c0", "backend": {"type": "null", "data": {}}})
    config = add(config, Kind.OBJECT, {"qom-type": "memory-backend-ram", "id": "ram0", "size": 1})
    config = config.set_machine(
        {"serial": ["chardev:c0", "none"], "properties": {"memory-backend": "ram0"}}
    )
    with pytest.raises(ConfigError, match="Chardev 'c0' is in use by the machine's settings"):
        config.remove(Kind.CHARDEV, "c0")
    with pytest.raises(ConfigError, match="Object 'ram0' is in use by the machine's settings"):
        config.remove(Kind.OBJECT, "ram0")
    config = config.set_machine({"serial": ["none"], "properties": {}})
    assert config.remove(Kind.CHARDEV, "c0").find(Kind.CHARDEV, "c0") is None


def test_a_drive_names_its_throttle_group() -> None:
    config = add(Config(), Kind.OBJECT, {"qom-type": "throttle-group", "id": "tg"})
    config = add(config, Kind.DRIVE, {"id": "d", "file": "/d", "throttling": {"group": "tg"}})
    with pytest.raises(ConfigError, match="Object 'tg' is in use by drive 'd'"):
        config.remove(Kind.OBJECT, "tg")
