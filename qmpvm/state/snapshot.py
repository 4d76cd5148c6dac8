"""The snapshot directory: what a machine-snapshot writes and a restore checks.

A snapshot directory holds ``config.json`` (``config-export`` with ``diff:
false``), ``state`` (the engine's migration stream), ``memory/ID`` for each
shared, file-backed RAM backend whose pages the stream leaves out, and
``manifest.json``, written last: a directory without a readable manifest is
an incomplete snapshot.  The manifest names the engine that wrote the state
(a restore needs the same version: QEMU's stream format follows its machine
types and device versions), the machine, each file's size and SHA-256, and
the disk images the machine had open, which a restore needs unchanged.

Pure but for reading and hashing files; the engine is driven elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qmpvm.config.descriptors import FDSET_PREFIX, fd_names, fdset_ids
from qmpvm.config.kinds import BLOCK_CHILDREN
from qmpvm.config.machine import as_object
from qmpvm.config.model import Config
from qmpvm.config.resource import Kind
from qmpvm.errors import ConfigError

FORMAT = "qmpvm-snapshot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
STATE = "state"
MEMORY_DIR = "memory"

IDENTIFIED_PROTOCOLS = frozenset({"file", "host_device", "host_cdrom"})
"""Block drivers whose data is a host file qmpvm can name and measure."""
NO_DATA_PROTOCOLS = frozenset({"null-co", "null-aio"})

STATE_MAGIC = b"QEVM"
"""The first bytes of every QEMU migration stream (QEMU_VM_FILE_MAGIC)."""


@dataclass(frozen=True, slots=True)
class Disk:
    node: str
    filename: str
    size: int
    read_only: bool

    def describe(self) -> dict[str, object]:
        return {"node": self.node, "filename": self.filename, "size": self.size,
                "read-only": self.read_only}  # fmt: skip


@dataclass(frozen=True, slots=True)
class SharedMemory:
    """A RAM backend mapped shared from a file: the stream can leave its pages
    out (``x-ignore-shared``) and the snapshot copies the file instead."""

    id: str
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """A snapshot directory that passed every check but the state's checksum,
    which is verified while the engine loads it."""

    dir: Path
    manifest: Mapping[str, object]
    commands: list[object]
    state_sha256: str
    memory: Mapping[str, str]  # backend id -> file in the snapshot

    @property
    def engine_version(self) -> str:
        return str(as_object(self.manifest.get("engine")).get("version"))

    @property
    def ignore_shared(self) -> bool:
        return bool(self.manifest.get("ignore-shared"))


# -- what a machine must be to be snapshotted or moved ------------------------


def refuse_passed_descriptors(config: Config, what: str) -> None:
    """Descriptors a client passed stay on this host: a configuration that
    uses them cannot be rebuilt from a snapshot or on another qmpvm."""
    for resource in config.resources:
        names = fd_names(resource.args) if resource.kind in (Kind.NETDEV, Kind.CHARDEV) else []
        sets = fdset_ids(resource.args)
        if names or sets:
            used = f"descriptor '{names[0]}'" if names else f"fdset {min(sets)}"
            raise ConfigError(
                f"{what} refused: {resource.kind} '{resource.key}' uses passed {used}, "
                "which cannot be reopened elsewhere"
            )


def disk_inventory(config: Config) -> list[Disk]:
    """Every host file behind the machine's block nodes and drives.  A disk
    written through something qmpvm cannot name (a network protocol, a
    temporary ``-snapshot`` overlay) refuses: its state could not be restored."""
    if config.machine.get("snapshot"):
        raise ConfigError("snapshot refused: -snapshot writes to temporary overlays")
    disks: list[Disk] = []
    for resource in config.of_kind(Kind.BLOCK):
        stack: list[tuple[Mapping[str, object], bool, str]] = [(resource.args, False, resource.key)]
        while stack:
            node, parent_read_only, name = stack.pop()
            read_only = parent_read_only or node.get("read-only") is True
            node_name = str(node.get("node-name", name))
            children = [
                value for member, value in node.items()
                if member in BLOCK_CHILDREN
                for value in (value if isinstance(value, list) else [value])
            ]  # fmt: skip
            for child in children:
                if isinstance(child, Mapping):
                    stack.append((child, read_only, node_name))
            if any(member in BLOCK_CHILDREN for member in node):
                continue  # a format or filter: its data is in its children
            driver = str(node.get("driver"))
            disk = _identified(node_name, driver, node.get("filename"), read_only)
            if disk is not None:
                disks.append(disk)
    for resource in config.of_kind(Kind.DRIVE):
        args = resource.args
        if args.get("snapshot") in (True, "on"):
            raise ConfigError(f"snapshot refused: drive '{resource.key}' has snapshot=on")
        filename = args.get("file")
        if filename is None:
            continue  # an empty drive (a CD-ROM without medium)
        read_only = args.get("readonly") in (True, "on") or args.get("media") == "cdrom"
        driver = "file" if isinstance(filename, str) and ":" not in filename else "?"
        disk = _identified(resource.key, driver, filename, read_only)
        if disk is not None:
            disks.append(disk)
    return disks


def _identified(node: str, driver: str, filename: object, read_only: bool) -> Disk | None:
    if driver in NO_DATA_PROTOCOLS:
        return None
    known = (
        driver in IDENTIFIED_PROTOCOLS
        and isinstance(filename, str)
        and not filename.startswith(FDSET_PREFIX)
    )
    if not known:
        if read_only:
            return None
        raise ConfigError(
            f"snapshot refused: block node '{node}' is written through '{driver}' "
            f"({filename or 'no file name'}), which qmpvm cannot identify for a restore"
        )
    assert isinstance(filename, str)
    try:
        size = _size(filename)
    except OSError as err:
        raise ConfigError(f"snapshot refused: disk '{filename}' ({node}): {err.strerror}") from err
    return Disk(node, filename, size, read_only)


def _size(path: str) -> int:
    info = os.stat(path)
    if stat.S_ISBLK(info.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    return info.st_size


def shared_memory(config: Config) -> tuple[list[SharedMemory], bool]:
    """The file-backed shared RAM backends, and whether the stream may leave
    out every shared backend's pages: only if qmpvm can copy each of them."""
    found: list[SharedMemory] = []
    copyable = True
    for resource in config.of_kind(Kind.OBJECT):
        args = resource.args
        if not str(args.get("qom-type", "")).startswith("memory-backend-"):
            continue
        shared = args.get("share") is True or (
            args.get("qom-type") == "memory-backend-memfd" and args.get("share") is not False
        )
        if not shared:
            continue
        path = args.get("mem-path")
        if args.get("qom-type") == "memory-backend-file" and isinstance(path, str):
            if os.path.isdir(path):  # a directory: QEMU makes (and unlinks) a file in it
                copyable = False
            found.append(SharedMemory(resource.key, path))
        else:
            copyable = False
    return (found if copyable else []), copyable and bool(found)


# -- the manifest --------------------------------------------------------------


def file_entry(path: Path) -> dict[str, object]:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(
    *,
    engine: Mapping[str, object],
    config: Config,
    resolved_type: str,
    files: Mapping[str, Mapping[str, object]],
    disks: Sequence[Disk],
    ignore_shared: bool,
    live: bool,
    figures: Mapping[str, object],
) -> dict[str, object]:
    machine = config.machine
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": dict(engine),
        "machine": {
            "type": machine.type,
            "resolved-type": resolved_type,
            "memory": machine.memory,
            "cpus": machine.cpus,
        },
        "live": live,
        "ignore-shared": ignore_shared,
        "files": {name: dict(entry) for name, entry in files.items()},
        "disks": [disk.describe() for disk in disks],
        "figures": dict(figures),
    }


def check_target(directory: Path) -> None:
    """A snapshot goes into a new or empty directory, never over another."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"'{directory}' exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()):
        held = "a snapshot" if (directory / MANIFEST).exists() else "files"
        raise ConfigError(f"'{directory}' already holds {held}: name a new or empty directory")


def load(directory: Path) -> Snapshot:
    """The snapshot in ``directory``, every part checked but the state's SHA-256;
    a ConfigError says what is missing or wrong."""
    where = f"snapshot '{directory}'"
    try:
        text = (directory / MANIFEST).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{where} is incomplete: it has no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: {MANIFEST}: {_reason(err)}") from err
    try:
        manifest = json.loads(text)
    except ValueError:
        raise ConfigError(f"{where}: {MANIFEST} is corrupt (not JSON)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{where}: {MANIFEST} is not a qmpvm snapshot manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"{where} has format version {manifest.get('version')}; "
            f"this qmpvm reads version {FORMAT_VERSION}"
        )
    files = as_object(manifest.get("files"))
    if CONFIG not in files or STATE not in files:
        raise ConfigError(f"{where}: {MANIFEST} does not list {CONFIG} and {STATE}")
    for name, entry in files.items():
        _check_file(directory, name, as_object(entry), where)
    config_entry = as_object(files[CONFIG])
    if file_sha256(directory / CONFIG) != config_entry.get("sha256"):
        raise ConfigError(f"{where} is corrupt: {CONFIG} does not match its checksum")
    with (directory / STATE).open("rb") as stream:
        if stream.read(len(STATE_MAGIC)) != STATE_MAGIC:
            raise ConfigError(f"{where} is corrupt: {STATE} is not an engine state stream")
    try:
        commands = json.loads((directory / CONFIG).read_text())
    except ValueError:
        raise ConfigError(f"{where} is corrupt: {CONFIG} is not JSON") from None
    if not isinstance(commands, list):
        raise ConfigError(f"{where} is corrupt: {CONFIG} is not a list of commands")
    memory = {
        name.removeprefix(MEMORY_DIR + "/"): str(directory / name)
        for name in files
        if name.startswith(MEMORY_DIR + "/")
    }
    return Snapshot(
        dir=directory,
        manifest=manifest,
        commands=commands,
        state_sha256=str(as_object(files[STATE]).get("sha256")),
        memory=memory,
    )


def _check_file(directory: Path, name: str, entry: Mapping[str, object], where: str) -> None:
    path = directory / name
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ConfigError(f"{where}: {MANIFEST} names a file outside the snapshot: '{name}'")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigError(f"{where} is incomplete: {name} is missing") from None
    except OSError as err:
        raise ConfigError(f"{where}: {name}: {err.strerror}") from err
    if size != entry.get("size"):
        raise ConfigError(
            f"{where} is corrupt: {name} has {size} bytes, the manifest says {entry.get('size')}"
        )


def check_engine(snapshot: Snapshot, version: str, machine_types: Mapping[str, object]) -> None:
    """The engine must be able to load the state: the same version, and the
    machine type the state was written for."""
    if snapshot.engine_version != version:
        raise ConfigError(
            f"snapshot '{snapshot.dir}' was written by engine version "
            f"{snapshot.engine_version}; this engine is {version}, which cannot load it"
        )
    resolved = str(as_object(snapshot.manifest.get("machine")).get("resolved-type"))
    if resolved not in machine_types:
        raise ConfigError(
            f"snapshot '{snapshot.dir}' needs machine type '{resolved}', "
            "which this engine does not have"
        )


def check_disks(snapshot: Snapshot) -> None:
    """Each disk the machine had open is there, with the size it had."""
    disks = snapshot.manifest.get("disks")
    for entry in disks if isinstance(disks, list) else []:
        disk = as_object(entry)
        filename = str(disk.get("filename"))
        try:
            size = _size(filename)
        except OSError as err:
            raise ConfigError(
                f"snapshot '{snapshot.dir}' needs disk '{filename}': {err.strerror}"
            ) from err
        if size != disk.get("size"):
            raise ConfigError(
                f"snapshot '{snapshot.dir}' needs disk '{filename}' of {disk.get('size')} "
                f"bytes; it has {size}: a restore needs the images the snapshot was taken with"
            )


def _reason(err: Exception) -> str:
    return err.strerror or str(err) if isinstance(err, OSError) else "not UTF-8 text"
