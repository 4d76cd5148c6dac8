"""The snapshot directory and what a snapshot or migration needs of a machine:
pure logic, on files in a temporary directory, no engine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qmpvm.config import kinds
from qmpvm.config.boot import BootSet
from qmpvm.config.model import Config
from qmpvm.config.resource import Kind
from qmpvm.errors import ConfigError
from qmpvm.state import snapshot as snap
from qmpvm.state.peer import parse_uri
from qmpvm.state.transfer import copy_sparse


def add(config: Config, kind: Kind, args: dict[str, object]) -> Config:
    return config.add(kinds.make(kind, args, config.next_seq))


def machine(tmp: Path) -> Config:
    (tmp / "disk.raw").write_bytes(b"\0" * 8192)
    config = Config().set_machine({"type": "q35", "memory": 256 << 20})
    config = config.set_boot(BootSet(kernel="/k", append="console=ttyS0"))
    config = add(config, Kind.CHARDEV, {"id": "s0", "backend": {"type": "null", "data": {}}})
    disk = {"driver": "raw", "node-name": "d0",
            "file": {"driver": "file", "filename": str(tmp / "disk.raw")}}  # fmt: skip
    config = add(config, Kind.BLOCK, disk)
    config = add(config, Kind.DEVICE, {"driver": "virtio-blk-pci", "drive": "d0", "id": "vd0"})
    return config.set_link("vd0", False)


# -- a configuration rebuilt from its export -------------------------------------


@pytest.mark.parametrize("diff", [True, False])
def test_a_configuration_is_rebuilt_from_its_export(tmp_path: Path, diff: bool) -> None:
    config = machine(tmp_path)
    rebuilt = Config.from_commands(config.export(diff=diff))
    assert rebuilt.export(diff=False) == config.export(diff=False)
    assert [r.key for r in rebuilt.resources] == [r.key for r in config.resources]


@pytest.mark.parametrize(
    ("commands", "message"),
    [
        ([{"execute": "quit"}], r"command 1 \(quit\) does not apply: it is not a configuration"),
        (["x"], "command 1 is not a QMP command"),
        ([{"execute": "device_add", "arguments": {"driver": "virtio-blk-pci", "drive": "nope",
                                                  "id": "v"}}], "Block node 'nope' not found"),
        ([{"execute": "machine-set", "arguments": {"memory": "lots"}}], "memory"),
        ([{"execute": "boot-set", "arguments": {"colonel": "/k"}}], "command 1 .boot-set."),
        ([{"execute": "set_link", "arguments": {"name": "x"}}], "command 1 .set_link."),
        ([{"execute": "chardev-add", "arguments": []}], "not an object"),
    ],
)  # fmt: skip
def test_a_command_that_does_not_apply_is_named(commands: list[object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_commands(commands)


# -- what a snapshot needs of a machine ------------------------------------------


def test_disks_are_identified_by_file_and_size(tmp_path: Path) -> None:
    config = machine(tmp_path)
    reader = {"driver": "qcow2", "node-name": "ro", "read-only": True,
              "file": {"driver": "nbd", "server": {"type": "unix", "path": "/nbd"}}}  # fmt: skip
    config = add(config, Kind.BLOCK, reader)
    config = add(config, Kind.BLOCK, {"driver": "null-co", "node-name": "nothing"})
    disks = snap.disk_inventory(config)
    assert [d.describe() for d in disks] == [
        {"node": "d0", "filename": str(tmp_path / "disk.raw"), "size": 8192, "read-only": False}
    ]


@pytest.mark.parametrize(
    ("kind", "args", "message"),
    [
        (Kind.BLOCK, {"driver": "raw", "node-name": "n", "file": {"driver": "nbd",
         "server": {"type": "unix", "path": "/nbd"}}}, "written through 'nbd'"),
        (Kind.BLOCK, {"driver": "file", "node-name": "f", "filename": "/dev/fdset/3"},
         "/dev/fdset/3"),
        (Kind.BLOCK, {"driver": "file", "node-name": "g", "filename": "/no/such/image"},
         "No such file"),
        (Kind.DRIVE, {"id": "hd", "file": "/tmp/x", "snapshot": "on"}, "snapshot=on"),
        (Kind.DRIVE, {"id": "hd", "file": "nbd:unix:/nbd"}, "written through '\\?'"),
    ],
)  # fmt: skip
def test_a_disk_qmpvm_cannot_identify_refuses(
    tmp_path: Path, kind: Kind, args: dict[str, object], message: str
) -> None:
    config = add(machine(tmp_path), kind, args)
    with pytest.raises(ConfigError, match=message):
        snap.disk_inventory(config)


def test_temporary_overlays_refuse(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="-snapshot"):
        snap.disk_inventory(machine(tmp_path).set_machine({"snapshot": True}))


def test_passed_descriptors_refuse(tmp_path: Path) -> None:
    config = add(machine(tmp_path), Kind.NETDEV, {"id": "n0", "type": "tap", "fd": "tapfd"})
    with pytest.raises(ConfigError, match="netdev 'n0' uses passed descriptor 'tapfd'"):
        snap.refuse_passed_descriptors(config, "migration")
    snap.refuse_passed_descriptors(machine(tmp_path), "migration")


def test_shared_memory_is_left_out_only_when_qmpvm_can_copy_it(tmp_path: Path) -> None:
    base = machine(tmp_path)
    ram = {"qom-type": "memory-backend-file", "id": "ram", "size": 1 << 20,
           "mem-path": str(tmp_path / "ram"), "share": True}  # fmt: skip
    found, ignore = snap.shared_memory(add(base, Kind.OBJECT, ram))
    assert (found, ignore) == ([snap.SharedMemory("ram", str(tmp_path / "ram"))], True)
    private = add(base, Kind.OBJECT, {**ram, "share": False})
    assert snap.shared_memory(private) == ([], False)
    memfd = {"qom-type": "memory-backend-memfd", "id": "m", "size": 1 << 20}
    assert snap.shared_memory(add(add(base, Kind.OBJECT, ram), Kind.OBJECT, memfd)) == ([], False)
    in_dir = add(base, Kind.OBJECT, {**ram, "mem-path": str(tmp_path)})
    assert snap.shared_memory(in_dir) == ([], False)


# -- the directory ---------------------------------------------------------------


def write_snapshot(directory: Path, config: Config) -> None:
    directory.mkdir()
    (directory / snap.CONFIG).write_text(json.dumps(config.export(diff=False)))
    (directory / snap.STATE).write_bytes(snap.STATE_MAGIC + b"\0\0\0\3" + os.urandom(1000))
    files = {name: snap.file_entry(directory / name) for name in (snap.CONFIG, snap.STATE)}
    manifest = snap.build_manifest(
        engine={"binary": "/usr/bin/qemu-system-x86_64", "version": "7.2.22"},
        config=config, resolved_type="pc-q35-7.2", files=files,
        disks=snap.disk_inventory(config), ignore_shared=False, live=False, figures={},
    )  # fmt: skip
    (directory / snap.MANIFEST).write_text(json.dumps(manifest))


def test_a_complete_snapshot_loads(tmp_path: Path) -> None:
    config = machine(tmp_path)
    write_snapshot(tmp_path / "s", config)
    loaded = snap.load(tmp_path / "s")
    assert Config.from_commands(loaded.commands).export(diff=False) == config.export(diff=False)
    assert loaded.engine_version == "7.2.22" and not loaded.ignore_shared
    assert loaded.state_sha256 == snap.file_sha256(tmp_path / "s" / snap.STATE)
    snap.check_engine(loaded, "7.2.22", {"pc-q35-7.2": {}})
    snap.check_disks(loaded)
    with pytest.raises(ConfigError, match=r"this engine is 8\.0\.0, which cannot load it"):
        snap.check_engine(loaded, "8.0.0", {"pc-q35-7.2": {}})
    with pytest.raises(ConfigError, match=r"needs machine type .pc-q35-7\.2."):
        snap.check_engine(loaded, "7.2.22", {"pc-q35-8.0": {}})
    (tmp_path / "disk.raw").write_bytes(b"\0" * 4096)
    with pytest.raises(ConfigError, match="of 8192 bytes; it has 4096"):
        snap.check_disks(loaded)
    (tmp_path / "disk.raw").unlink()
    with pytest.raises(ConfigError, match="No such file"):
        snap.check_disks(loaded)


def _manifest(directory: Path) -> dict[str, object]:
    value = json.loads((directory / snap.MANIFEST).read_text())
    assert isinstance(value, dict)
    return value


def _edit_manifest(directory: Path, **changes: object) -> None:
    (directory / snap.MANIFEST).write_text(json.dumps({**_manifest(directory), **changes}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / snap.MANIFEST).unlink(), "is incomplete: it has no manifest.json"),
        (lambda d: (d / snap.MANIFEST).write_text("{"), "manifest.json is corrupt"),
        (lambda d: (d / snap.MANIFEST).write_bytes(b"\xff"), "not UTF-8"),
        (lambda d: (d / snap.MANIFEST).write_text("[]"), "not a qmpvm snapshot manifest"),
        (lambda d: _edit_manifest(d, version=2), "has format version 2"),
        (lambda d: _edit_manifest(d, files={}), "does not list config.json and state"),
        (lambda d: (d / snap.STATE).unlink(), "is incomplete: state is missing"),
        (lambda d: (d / snap.STATE).write_bytes(b"QEVM"), "state has 4 bytes"),
        (lambda d: (d / snap.CONFIG).write_text((d / snap.CONFIG).read_text().upper()),
         "config.json does not match its checksum"),
        (lambda d: (d / snap.STATE).write_bytes(b"XXXX" + (d / snap.STATE).read_bytes()[4:]),
         "state is not an engine state stream"),
        (lambda d: _edit_manifest(d, files={**_manifest(d)["files"],  # type: ignore[dict-item]
                                            "../escape": {"size": 1}}), "outside the snapshot"),
    ],
)  # fmt: skip
def test_a_damaged_snapshot_is_refused_with_the_reason(
    tmp_path: Path, damage: object, message: str
) -> None:
    directory = tmp_path / "s"
    write_snapshot(directory, machine(tmp_path))
    damage(directory)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message):
        snap.load(directory)


def test_a_snapshot_never_goes_over_another(tmp_path: Path) -> None:
    snap.check_target(tmp_path / "new")
    snap.check_target(tmp_path)  # empty
    write_snapshot(tmp_path / "s", machine(tmp_path))
    with pytest.raises(ConfigError, match="already holds a snapshot"):
        snap.check_target(tmp_path / "s")
    with pytest.raises(ConfigError, match="already holds files"):
        snap.check_target(tmp_path)
    with pytest.raises(ConfigError, match="is not a directory"):
        snap.check_target(tmp_path / "disk.raw")


# -- helpers ----------------------------------------------------------------------


def test_ram_files_are_copied_with_their_holes(tmp_path: Path) -> None:
    source = tmp_path / "ram"
    with source.open("wb") as stream:
        stream.truncate(64 << 20)
        stream.seek(8 << 20)
        stream.write(b"a" * 4096)
        stream.seek(40 << 20)
        stream.write(b"b" * 10000)
    target = tmp_path / "copy"
    copied = copy_sparse(str(source), str(target))
    assert target.read_bytes() == source.read_bytes()
    assert copied < 1 << 20, "only the data was copied"
    assert target.stat().st_blocks * 512 < 1 << 20, "the holes stay holes"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("unix:/run/q.sock", ("AF_UNIX", "/run/q.sock")),
        ("tcp:127.0.0.1:4444", ("AF_INET", ("127.0.0.1", 4444))),
        ("tcp:[::1]:4444", ("AF_INET6", ("::1", 4444))),
    ],
)
def test_monitor_uris(uri: str, expected: tuple[str, object]) -> None:
    family, address = parse_uri(uri)
    assert (family.name, address) == expected


@pytest.mark.parametrize("uri", ["exec:true", "unix:", "tcp:host", "tcp::1", "tcp:h:99999", "fd:3"])
def test_other_uris_are_refused(uri: str) -> None:
    with pytest.raises(ConfigError, match="is not a monitor address"):
        parse_uri(uri)
