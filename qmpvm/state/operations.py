"""What machine-snapshot, machine-restore, machine-migrate and machine-receive do.

Loaded on the first of them (``qmpvm.commands.state`` declares them).  Each
holds ``change_lock`` throughout, so the configuration a snapshot or a
migration carries is the one the engine's state belongs to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmpvm.config.machine import as_object
from qmpvm.config.model import Config
from qmpvm.config.resource import Kind
from qmpvm.errors import ConfigError, EngineError, QmpvmError
from qmpvm.state import snapshot as snap
from qmpvm.state import transfer
from qmpvm.state.peer import Peer, parse_uri
from qmpvm.vmm import Vmm

if TYPE_CHECKING:
    from qmpvm.engine.caps import Capabilities

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT = 60.0
"""Seconds a destination waits for the source to open the data channel."""
DESTINATION_TIMEOUT = 120.0
"""Seconds a source waits for the destination's guest to run after the stream."""

# -- snapshot -------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class _SnapshotJob:
    directory: Path
    config: Config
    caps: Capabilities
    live: bool
    disks: list[snap.Disk]
    memory: list[snap.SharedMemory]
    ignore_shared: bool
    written: list[Path] = field(default_factory=list)  # removed again if it fails


async def snapshot(vmm: Vmm, args: Mapping[str, Any]) -> object:
    directory = Path(args["dir"]).absolute()
    stop = bool(args.get("stop", False))
    caps = await vmm.capabilities()
    if caps is None:
        raise ConfigError("snapshot refused: the engine's identity is unknown (no capabilities)")
    async with vmm.change_lock:  # also one snapshot at a time: none writes over another
        snap.check_target(directory)
        snap.refuse_passed_descriptors(vmm.config, "snapshot")
        memory, ignore_shared = snap.shared_memory(vmm.config)
        if vmm.engine().memory_from is not None:  # its RAM is private until it is rebuilt
            memory, ignore_shared = [], False
        job = _SnapshotJob(
            directory=directory, config=vmm.config, caps=caps,
            live=bool(args.get("live", False)), disks=snap.disk_inventory(vmm.config),
            memory=memory, ignore_shared=ignore_shared,
        )  # fmt: skip
        status = await vmm.forward("query-status", {})
        was_running = isinstance(status, dict) and bool(status.get("running"))
        made = _make_dir(directory)
        try:
            figures = await _write_state(vmm, job)
            if was_running and not stop:
                await vmm.forward("cont", {})
            size = await asyncio.to_thread(_finish, job, figures)
        except BaseException:
            for path in job.written:
                with contextlib.suppress(OSError):
                    path.unlink()
            if made:
                with contextlib.suppress(OSError):
                    (directory / snap.MEMORY_DIR).rmdir()
                with contextlib.suppress(OSError):
                    directory.rmdir()
            if was_running and not stop:
                await _resume(vmm)
            raise
    return {"dir": str(directory), "size": size, **transfer.summary(figures)}


def _make_dir(directory: Path) -> bool:
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return False
    except OSError as err:
        raise ConfigError(f"cannot create '{directory}': {err.strerror}") from err
    return True


async def _write_state(vmm: Vmm, job: _SnapshotJob) -> dict[str, object]:
    config_path = job.directory / snap.CONFIG
    job.written.append(config_path)
    _write_private(config_path, json.dumps(job.config.export(diff=False), indent=1) + "\n")
    state_path = job.directory / snap.STATE
    try:
        fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise ConfigError(f"cannot create '{state_path}': {err.strerror}") from err
    job.written.append(state_path)
    try:
        figures = await transfer.send(
            vmm, fd, live=job.live, ignore_shared=job.ignore_shared, unthrottled=True
        )
    finally:
        os.close(fd)
    if job.memory:  # the guest is paused: its RAM files hold the state's moment
        (job.directory / snap.MEMORY_DIR).mkdir(mode=0o700, exist_ok=True)
        pairs = [(m.path, str(job.directory / snap.MEMORY_DIR / m.id)) for m in job.memory]
        job.written.extend(Path(target) for _source, target in pairs)
        await transfer.copy_memory(pairs)
    return figures


def _finish(job: _SnapshotJob, figures: dict[str, object]) -> int:
    """Checksums, durability, and the manifest last: its presence means complete.
    Returns the snapshot's size in bytes."""
    files = {}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the disk flushes while we hash
        synced = [pool.submit(_fsync, path) for path in job.written]
        for path in job.written:
            files[str(path.relative_to(job.directory))] = snap.file_entry(path)
        for each in synced:
            each.result()
    caps, config = job.caps, job.config
    engine = {"binary": caps.binary, "version": version_text(caps.version), "package": caps.package}
    manifest = snap.build_manifest(
        engine=engine,
        config=config,
        resolved_type=str(
            caps.machines.get(config.machine.type, {}).get("name", config.machine.type)
        ),
        files=files,
        disks=job.disks,
        ignore_shared=job.ignore_shared,
        live=job.live,
        figures=transfer.summary(figures),
    )
    path = job.directory / snap.MANIFEST
    tmp = path.with_suffix(".tmp")
    _write_private(tmp, json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    job.written.append(path)
    dir_fd = os.open(job.directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return sum(int(str(entry["size"])) for entry in files.values())


def _fsync(path: Path) -> None:
    with path.open("rb") as stream:
        os.fsync(stream.fileno())


def _write_private(path: Path, text: str) -> None:
    """A file only qmpvm's user reads (a configuration may hold secrets), on disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())


def version_text(version: tuple[int, int, int]) -> str:
    return ".".join(str(part) for part in version)


async def _resume(vmm: Vmm) -> None:
    """Back to running after a failed snapshot, if the engine is still there."""
    with contextlib.suppress(QmpvmError):
        status = await vmm.forward("query-status", {})
        if isinstance(status, dict) and not status.get("running"):
            await vmm.forward("cont", {})


# -- restore --------------------------------------------------------------------


async def restore(vmm: Vmm, args: Mapping[str, Any]) -> object:
    directory = Path(args["dir"]).absolute()
    loaded = await asyncio.to_thread(snap.load, directory)
    caps = await vmm.capabilities()
    if caps is None:
        raise ConfigError("restore refused: the engine is unavailable (no capabilities)")
    snap.check_engine(loaded, version_text(caps.version), caps.machines)
    try:
        config = Config.from_commands(loaded.commands)
    except ConfigError as err:
        raise ConfigError(f"snapshot '{directory}' is corrupt: {err.desc}") from err
    snap.check_disks(loaded)
    async with vmm.change_lock:
        if vmm.machine is not None:
            raise ConfigError("restore refused: a machine exists")
        await _load_state(vmm, config, loaded)
        vmm.commit(config)
        if not args.get("paused", False):
            await vmm.forward("cont", {})
    return {}


def _mapped(config: Config, loaded: snap.Snapshot) -> Config:
    """The configuration the engine starts with: each RAM backend whose pages
    the snapshot holds in a file maps that file copy-on-write (no copy, and
    the snapshot stays as it is), not its own file.  The store keeps ``config``."""
    if not loaded.ignore_shared:
        return config
    backends, _ = snap.shared_memory(config)
    missing = [b.id for b in backends if b.id not in loaded.memory]
    if missing or not backends:
        raise ConfigError(f"snapshot '{loaded.dir}' is corrupt: no memory file for its RAM")
    resources = tuple(
        dataclasses.replace(r, args={**r.args, "mem-path": loaded.memory[r.key], "share": False})
        if r.kind is Kind.OBJECT and r.key in loaded.memory
        else r
        for r in config.resources
    )
    return dataclasses.replace(config, resources=resources)


async def _load_state(vmm: Vmm, config: Config, loaded: snap.Snapshot) -> None:
    """The machine built from the state, its checksum verified while the engine
    reads it; on any failure the engine is gone and qmpvm is as it was."""
    state = loaded.dir / snap.STATE
    fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
    checksum = asyncio.create_task(asyncio.to_thread(snap.file_sha256, state))
    status, last_exit = vmm.status, vmm.last_exit
    try:
        await vmm.init_machine(_mapped(config, loaded), incoming=True)
        if loaded.ignore_shared:
            vmm.engine().memory_from = str(loaded.dir)
            vmm.engine().save_record()
        await transfer.receive(vmm, fd, ignore_shared=loaded.ignore_shared)
        if await checksum != loaded.state_sha256:
            raise ConfigError(f"snapshot '{loaded.dir}' is corrupt: its state fails its checksum")
    except BaseException:
        await _abandon(vmm, status)
        vmm.status, vmm.last_exit = status, last_exit
        raise
    finally:
        os.close(fd)
        checksum.cancel()


async def _abandon(vmm: Vmm, status: str) -> None:
    machine = vmm.machine
    if machine is not None:
        machine.final_status = status
        await vmm.stop_engine()


# -- migration: the source ------------------------------------------------------


async def migrate(vmm: Vmm, args: Mapping[str, Any]) -> object:
    uri = args["uri"]
    parse_uri(uri)
    snap.refuse_passed_descriptors(vmm.config, "migration")
    async with vmm.change_lock:
        ours = vmm.config.export()
        peer = await Peer.connect(uri)
        try:
            await _configure_destination(peer, ours)
            with peer.watching(("RESUME", "ENGINE_EXIT", "MACHINE_MIGRATION")) as destination:
                channel = await peer.execute("machine-receive", peer.receive_arguments())
                figures = await _stream(vmm, str(_member(channel, "uri")))
                await _await_destination(vmm, destination)
        finally:
            await peer.close()
        machine = vmm.machine
        if machine is not None:
            machine.final_status = "postmigrate"
            await vmm.stop_engine(kill=True)
    result = {"status": "completed", **transfer.summary(figures)}
    vmm.last_migration = figures
    vmm.emit("MACHINE_MIGRATION", {"role": "source", **_defined(result)})
    return result


async def _configure_destination(peer: Peer, ours: list[dict[str, object]]) -> None:
    status = await peer.execute("query-status")
    if _member(status, "phase") != "no-machine":
        raise ConfigError(
            "migration refused: the destination has a machine (start it with --preconfig)"
        )
    theirs = await peer.execute("config-export")
    if theirs == ours:
        return
    if theirs:
        raise ConfigError(
            "migration refused: the destination has a different configuration "
            "(start it with an empty state directory)"
        )
    for command in ours:
        try:
            arguments = command.get("arguments")
            await peer.execute(str(command["execute"]), as_object(arguments))
        except QmpvmError as err:
            raise ConfigError(f"migration refused by the destination: {err.desc}") from err


async def _stream(vmm: Vmm, channel: str) -> dict[str, object]:
    family, address = parse_uri(channel)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
        sock.setblocking(True)
        return await transfer.send(vmm, sock.fileno(), live=True, ignore_shared=False)
    except OSError as err:
        raise EngineError(f"cannot open the data channel {channel}: {err.strerror}") from err
    finally:
        sock.close()


async def _await_destination(vmm: Vmm, destination: asyncio.Future[dict[str, object]]) -> None:
    """The source stays paused until the destination's guest runs: if it does
    not, the source's guest runs on, and nothing is lost."""
    try:
        async with asyncio.timeout(DESTINATION_TIMEOUT):
            event = await destination
    except (TimeoutError, EOFError, ConnectionError):
        event = {"event": "ENGINE_EXIT"}
    if event.get("event") != "RESUME":
        await _resume(vmm)
        raise EngineError("migration failed: the destination did not start the guest; "
                          "it runs on here")  # fmt: skip


# -- migration: the destination -------------------------------------------------


async def receive(vmm: Vmm, args: Mapping[str, Any]) -> object:
    """Prepare an incoming machine and open its data channel; the state and the
    guest's start follow in the background (machine-migrate's other half)."""
    listener, uri, cleanup = _listen(args.get("listen"))
    try:
        async with vmm.change_lock:
            if vmm.machine is not None:
                raise ConfigError("a machine exists")
            status, last_exit = vmm.status, vmm.last_exit
            await vmm.init_machine(incoming=True)
    except BaseException:
        listener.close()
        cleanup()
        raise
    started = time.monotonic()
    task = asyncio.create_task(
        _receive_state(
            vmm,
            listener=listener,
            cleanup=cleanup,
            status=status,
            last_exit=last_exit,
            started=started,
        )
    )
    vmm.background.add(task)
    task.add_done_callback(vmm.background.discard)
    return {"uri": uri}


def _listen(wanted: object) -> tuple[socket.socket, str, Callable[[], None]]:
    """The data channel's listening socket, bound as a monitor's is (a UNIX one
    mode 0600, never over a file), its URI, and what removes its traces."""
    from qmpvm.monitor.early import Listener, bind

    directory = None
    if wanted is None:
        try:
            directory = tempfile.mkdtemp(prefix="qmpvm-migration-")
        except OSError as err:
            raise ConfigError(f"cannot make the data channel: {err.strerror}") from err
        listener = Listener("unix", path=os.path.join(directory, "data.sock"))
    else:
        _family, address = parse_uri(str(wanted))
        if isinstance(address, tuple):
            listener = Listener("tcp", host=address[0], port=address[1])
        else:
            listener = Listener("unix", path=address)

    def cleanup() -> None:
        if listener.kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(listener.path)
        if directory is not None:
            with contextlib.suppress(OSError):
                os.rmdir(directory)

    try:
        raw = bind(listener)
    except OSError as err:
        if directory is not None:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise ConfigError(
            f"cannot listen on {wanted or listener.path}: {err.strerror or err}"
        ) from err
    sock = socket.socket(fileno=raw.detach())  # bind() gives the C-level socket
    if listener.kind == "unix":
        return sock, f"unix:{listener.path}", cleanup
    host, port = sock.getsockname()[:2]
    return sock, f"tcp:{'[' + host + ']' if ':' in host else host}:{port}", cleanup


async def _receive_state(
    vmm: Vmm,
    *,
    listener: socket.socket,
    cleanup: Callable[[], None],
    status: str,
    last_exit: dict[str, object] | None,
    started: float,
) -> None:
    """Accept the source's data channel, load the state, start the guest; on
    any failure the machine goes and the replayed configuration stays."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    conn: socket.socket | None = None
    try:
        async with asyncio.timeout(ACCEPT_TIMEOUT):
            conn, _peer = await loop.sock_accept(listener)
        listener.close()
        cleanup()  # the socket file goes now: nothing is left if qmpvm dies meanwhile
        conn.setblocking(True)
        await transfer.receive(vmm, conn.fileno(), ignore_shared=False)
        await vmm.forward("cont", {})
    except (QmpvmError, OSError, TimeoutError) as err:
        why = "the source did not connect" if isinstance(err, TimeoutError) else str(err)
        log.warning("incoming migration failed: %s", why)
        exited = vmm.last_exit
        await _abandon(vmm, status)
        vmm.status, vmm.last_exit = status, exited or last_exit
        vmm.emit("MACHINE_MIGRATION", {"role": "destination", "status": "failed", "error": why})
        return
    finally:
        if conn is not None:
            conn.close()
        listener.close()
        cleanup()
    took = round((time.monotonic() - started) * 1000)
    done = {"role": "destination", "status": "completed", "total-time": took}
    vmm.emit("MACHINE_MIGRATION", done)


def _member(value: object, name: str) -> object:
    return value.get(name) if isinstance(value, dict) else None


def _defined(values: dict[str, object]) -> dict[str, object]:
    return {key: value for key, value in values.items() if value is not None}
