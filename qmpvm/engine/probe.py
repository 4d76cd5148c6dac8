"""Probing: asking an engine binary everything ``Capabilities`` holds.

Theory of operation:

* **Probing** starts the binary with no machine (``-machine none -S
  -nodefaults``) and a private monitor link, asks the introspection commands
  once, then ``device-list-properties`` for every non-abstract device type.
* **Crashes.**  Some device types may abort QEMU when introspected without a
  machine.  The property requests are pipelined on one engine; if it dies,
  the answers it never sent are "lost".  QEMU answers in order, so the first
  lost type is the suspect: it is asked again alone on a fresh engine and
  recorded with ``properties=None`` if that engine dies too; the rest are
  pipelined again.  If the suspect answers alone, the engine died for a
  reason the order does not show, and the rest is halved (bisection), so a
  culprit still costs only a logarithmic number of engine starts.  Every
  round settles at least one type, so the probe ends; a hang is turned into
  a crash by killing the engine after a timeout.
* **Bus kind** of a device comes from ``qom-list-types implements=<base>``:
  the first base in ``_BUS_KINDS`` the type implements gives its kind.
* **Schema enums.**  ``query-qmp-schema`` masks type names as numbers but
  keeps command names, so each enum is found structurally: start at a
  command's ``arg-type`` and follow members by name (``_SCHEMA_ENUMS``), e.g.
  ``chardev-add`` -> member ``backend`` -> member ``type`` is the enum of
  chardev backends.
* **No stray engines.**  Every engine is killed on any exit path, and is
  started by ``qmpvm.engine.process`` so it dies with qmpvm even on a hard
  crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence

from qmpvm.engine import process
from qmpvm.engine.caps import (
    Capabilities,
    DeviceType,
    ProbeError,
    Progress,
    frozen,
    resolve_binary,
    stat_identity,
)
from qmpvm.engine.link import EngineLink
from qmpvm.errors import EngineCommandError, EngineError

logger = logging.getLogger(__name__)

_LINK_ID = "qmpvm-link"
_PROBE_ARGS = (
    "-machine", "none", "-S", "-nodefaults", "-no-user-config",
    "-display", "none", "-accel", "tcg",
)  # fmt: skip
_GREETING_TIMEOUT = 30.0
_QUERY_TIMEOUT = 60.0
_ROUND_TIMEOUT = 30.0  # one pipelined round of device-list-properties; past it, a hang
_ALONE_TIMEOUT = 10.0  # the same for a single suspect type
_VERSION_TIMEOUT = 30.0
_STDERR_TAIL = 2000

# QOM base type -> coarse kind of bus the device plugs into; first match wins.
_BUS_KINDS: tuple[tuple[str, str], ...] = (
    ("pci-device", "pci"),
    ("isa-device", "isa"),
    ("virtio-device", "virtio"),
    ("sys-bus-device", "sysbus"),
    ("usb-device", "usb"),
    ("scsi-device", "scsi"),
    ("ide-device", "ide"),
    ("virtio-serial-port", "virtio-serial"),
    ("hda-codec", "hda"),
    ("ccid-card", "ccid"),
    ("i2c-slave", "i2c"),
)

# QAPI enum name -> (command, member path from the command's arg-type).
_SCHEMA_ENUMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "NetClientDriver": ("netdev_add", ("type",)),
    "ChardevBackendKind": ("chardev-add", ("backend", "type")),
    "BlockdevDriver": ("blockdev-add", ("driver",)),
    "ObjectType": ("object-add", ("qom-type",)),
}


# -- identity --------------------------------------------------------


async def binary_identity(binary: str) -> dict[str, object]:
    """Who the binary is: where, which build (size, mtime), and what it says it is.

    ``--version`` runs as a child that is killed if the caller is cancelled.
    """
    path = resolve_binary(binary)
    identity = stat_identity(path)
    try:
        proc = await process.start(
            [path, "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except OSError as err:
        raise ProbeError(f"cannot run {path} --version: {err}") from err
    try:
        async with asyncio.timeout(_VERSION_TIMEOUT):
            out, errout = await proc.communicate()
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(exc, TimeoutError):
            raise ProbeError(f"{path} --version did not finish in {_VERSION_TIMEOUT:g} s") from exc
        raise
    identity["version"] = _version_line(path, proc.returncode, out, errout)
    return identity


def _version_line(path: str, returncode: int | None, out: bytes, err: bytes) -> str:
    lines = out.decode("utf-8", "replace").splitlines()
    if returncode != 0 or not lines:
        detail = err.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
        raise ProbeError(f"{path} --version failed (exit {returncode}): {detail}")
    return lines[0].strip()


# -- probing -------------------------------------------------------------


class _Engine:
    """One probe engine: the process, its stderr, and the link."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.link: EngineLink | None = None
        self._stderr = asyncio.create_task(_read_tail(proc.stderr))

    @classmethod
    async def start(cls, path: str) -> _Engine:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await process.start(
                [
                    path,
                    *_PROBE_ARGS,
                    "-chardev", f"socket,id={_LINK_ID},fd={child.fileno()}",
                    "-mon", f"chardev={_LINK_ID},mode=control",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(child.fileno(),),
            )  # fmt: skip
        except BaseException as exc:
            parent.close()
            if isinstance(exc, OSError):
                raise ProbeError(f"cannot start {path}: {exc}") from exc
            raise  # cancelled: asyncio kills a child it had started
        finally:
            child.close()
        engine = cls(proc)
        try:
            engine.link = await EngineLink.open(parent, timeout=_GREETING_TIMEOUT)
        except EngineError as err:
            detail = await engine.stop()
            raise ProbeError(f"{path} gave no QMP greeting ({err}){detail}") from err
        except BaseException:
            await engine.stop()
            raise
        return engine

    @property
    def alive(self) -> bool:
        return self.link is not None and not self.link.closed and self.proc.returncode is None

    async def stop(self) -> str:
        """Kill (first, synchronously, so cancellation cannot skip it) and reap.

        Returns how the engine ended and the tail of its stderr, for messages.
        """
        was_running = self.proc.returncode is None
        if was_running:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        if self.link is not None:
            await self.link.close()
        code = await self.proc.wait()
        stderr = await self._stderr
        how = "" if was_running and code == -signal.SIGKILL else f"; {_exit_text(code)}"
        return how + (f"; stderr: {stderr}" if stderr else "")


async def _read_tail(stream: asyncio.StreamReader | None) -> str:
    if stream is None:
        return ""
    data = await stream.read()
    return data.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class _Prober:
    """One probe run: the current engine, restarted whenever it dies."""

    def __init__(self, path: str, progress: Progress | None) -> None:
        self.path = path
        self.progress = progress
        self.engine: _Engine | None = None
        self.crashed: list[str] = []
        self.starts = 0

    def say(self, message: str) -> None:
        logger.debug("probe: %s", message)
        if self.progress is not None:
            self.progress(message)

    async def link(self) -> EngineLink:
        if self.engine is None or not self.engine.alive:
            await self.discard()
            self.engine = await _Engine.start(self.path)
            self.starts += 1
        link = self.engine.link
        if link is None:  # start() always sets it
            raise ProbeError("engine link missing")
        return link

    async def discard(self) -> str:
        engine, self.engine = self.engine, None
        return await engine.stop() if engine is not None else ""

    async def run(self, identity: dict[str, object]) -> Capabilities:
        self.say(f"starting {self.path}")
        link = await self.link()
        self.say("querying version, machines, commands, schema and QOM types")
        implements = ["device", "accel", *(base for base, _ in _BUS_KINDS)]
        try:
            async with asyncio.timeout(_QUERY_TIMEOUT):
                version, machines, commands, schema, *types = await asyncio.gather(
                    link.execute("query-version"),
                    link.execute("query-machines"),
                    link.execute("query-commands"),
                    link.execute("query-qmp-schema"),
                    *(
                        link.execute("qom-list-types", {"implements": base, "abstract": False})
                        for base in implements
                    ),
                )
        except (EngineError, TimeoutError) as err:
            detail = await self.discard()
            raise ProbeError(
                f"{self.path} failed the introspection queries: {err}{detail}"
            ) from err
        device_names = _type_names(types[0])
        accelerators = tuple(
            sorted(name.removesuffix("-accel") for name in _type_names(types[1])
                   if name.endswith("-accel"))
        )  # fmt: skip
        kinds = [
            (kind, set(_type_names(found)))
            for (_, kind), found in zip(_BUS_KINDS, types[2:], strict=True)
        ]
        self.say(f"listing the properties of {len(device_names)} device types")
        properties = await self.properties(device_names)
        devices = {
            name: DeviceType(
                name=name,
                bus=next((kind for kind, members in kinds if name in members), None),
                properties=properties.get(name),
            )
            for name in sorted(device_names)
        }
        machine_map, default_machine = _machines(machines)
        qemu_version, package = _version(version)
        return Capabilities(
            binary=self.path,
            identity=frozen(identity),
            version=qemu_version,
            package=package,
            machines=machine_map,
            default_machine=default_machine,
            devices=frozen(devices),
            commands=frozenset(_names(commands)),
            schema_enums=frozen(_schema_enums(schema)),
            accelerators=accelerators,
        )

    async def properties(self, names: Sequence[str]) -> dict[str, Mapping[str, str] | None]:
        found: dict[str, Mapping[str, str] | None] = {}
        await self._settle(list(names), found)
        return found

    async def _settle(self, todo: list[str], found: dict[str, Mapping[str, str] | None]) -> None:
        """Get an answer, or a verdict of "crashes", for every name in ``todo``."""
        while todo:
            alone = len(todo) == 1
            lost = await self._round(todo, found)
            if not lost:
                return
            suspect, todo = lost[0], lost[1:]
            if not alone:
                self.say(f"engine died; asking for {suspect} alone ({len(todo)} more to redo)")
            if alone or await self._round([suspect], found, timeout=_ALONE_TIMEOUT):
                found[suspect] = None
                self.crashed.append(suspect)
                self.say(f"{suspect} crashes the engine; its properties are unknown")
                continue
            # The engine died, but not on the type it was answering: halve what is
            # left so any culprit is still found in a logarithmic number of starts.
            half = len(todo) // 2
            await self._settle(todo[:half], found)
            todo = todo[half:]

    async def _round(
        self,
        names: Sequence[str],
        found: dict[str, Mapping[str, str] | None],
        *,
        timeout: float | None = None,
    ) -> list[str]:
        """Ask for all ``names`` at once; return those whose answers died with the engine."""
        link = await self.link()
        tasks = [
            asyncio.create_task(link.execute("device-list-properties", {"typename": name}))
            for name in names
        ]
        try:
            _, pending = await asyncio.wait(tasks, timeout=timeout or _ROUND_TIMEOUT)
            if pending:
                logger.warning("engine hung listing device properties; killing it")
                await self.discard()
                await asyncio.wait(pending)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        lost: list[str] = []
        for name, task in zip(names, tasks, strict=True):
            err = task.exception()
            if err is None:
                found[name] = _properties(task.result())
            elif isinstance(err, EngineCommandError):
                logger.info("device-list-properties %s refused: %s", name, err.desc)
                found[name] = None
            elif isinstance(err, EngineError):
                lost.append(name)
            else:
                raise err
        if lost:
            detail = await self.discard()
            logger.warning(
                "probe engine died with %d answers lost (first %s)%s", len(lost), lost[0], detail
            )
        return lost


async def probe(
    binary: str = "qemu-system-x86_64", *, progress: Progress | None = None
) -> Capabilities:
    """Ask a fresh engine everything ``Capabilities`` holds (no cache involved)."""
    identity = await binary_identity(binary)
    path = str(identity["path"])
    prober = _Prober(path, progress)
    started = time.monotonic()
    try:
        caps = await prober.run(identity)
    finally:
        await prober.discard()
    elapsed = time.monotonic() - started
    prober.say(
        f"probed {len(caps.devices)} device types in {elapsed:.2f} s with {prober.starts} "
        f"engine start(s); {len(prober.crashed)} crashed the engine"
        + (f": {', '.join(prober.crashed)}" if prober.crashed else "")
    )
    logger.info(
        "probed %s in %.2f s: %d device types, %d crashed the engine",
        path, elapsed, len(caps.devices), len(prober.crashed),
    )  # fmt: skip
    return caps


# -- reading the engine's answers (never trusted blindly) ----------------


def _objects(value: object) -> list[dict[str, object]]:
    if not isinstance(value, list):
        raise ProbeError(f"engine answered a list query with {type(value).__name__}")
    return [item for item in value if isinstance(item, dict)]


def _names(value: object) -> list[str]:
    names = (item.get("name") for item in _objects(value))
    return [name for name in names if isinstance(name, str)]


def _type_names(value: object) -> list[str]:
    return _names(value)


def _properties(value: object) -> Mapping[str, str] | None:
    if not isinstance(value, list):
        return None
    out: dict[str, str] = {}
    for item in value:
        if isinstance(item, dict):
            name, kind = item.get("name"), item.get("type")
            if isinstance(name, str) and isinstance(kind, str):
                out[name] = kind
    return frozen(out)


def _version(value: object) -> tuple[tuple[int, int, int], str]:
    qemu = value.get("qemu") if isinstance(value, dict) else None
    package = value.get("package") if isinstance(value, dict) else None
    if not isinstance(qemu, dict):
        raise ProbeError(f"engine gave a malformed query-version answer: {value!r}")
    parts = [qemu.get(key) for key in ("major", "minor", "micro")]
    numbers = [part for part in parts if isinstance(part, int) and not isinstance(part, bool)]
    if len(numbers) != 3:
        raise ProbeError(f"engine gave a malformed query-version answer: {value!r}")
    return (numbers[0], numbers[1], numbers[2]), package.strip() if isinstance(package, str) else ""


def _machines(value: object) -> tuple[Mapping[str, Mapping[str, object]], str | None]:
    machines: dict[str, Mapping[str, object]] = {}
    default: str | None = None
    for entry in _objects(value):
        name = entry.get("name")
        if not isinstance(name, str):
            continue
        machines[name] = frozen(entry)
        if entry.get("is-default") is True:
            default = name
    for entry in _objects(value):  # aliases never shadow a real name
        alias = entry.get("alias")
        name = entry.get("name")
        if isinstance(alias, str) and isinstance(name, str) and alias not in machines:
            machines[alias] = machines[name]
    return frozen(dict(sorted(machines.items()))), default


def _schema_enums(value: object) -> dict[str, tuple[str, ...]]:
    entities = {
        entity["name"]: entity for entity in _objects(value) if isinstance(entity.get("name"), str)
    }
    out: dict[str, tuple[str, ...]] = {}
    for enum_name, (command, path) in _SCHEMA_ENUMS.items():
        values = _follow(entities, command, path)
        if values is None:
            logger.warning(
                "schema: no enum at %s %s; %s left out", command, ".".join(path), enum_name
            )
        else:
            out[enum_name] = values
    return out


def _follow(
    entities: Mapping[object, dict[str, object]], command: str, path: Iterable[str]
) -> tuple[str, ...] | None:
    """Walk from a command's arg-type through members by name to an enum's values."""
    entity = entities.get(command)
    if entity is None or entity.get("meta-type") != "command":
        return None
    entity = entities.get(entity.get("arg-type"))
    for member_name in path:
        if entity is None:
            return None
        members = entity.get("members")
        member = next(
            (m for m in members if isinstance(m, dict) and m.get("name") == member_name),
            None,
        ) if isinstance(members, list) else None  # fmt: skip
        if member is None:
            return None
        entity = entities.get(member.get("type"))
    if entity is None or entity.get("meta-type") != "enum":
        return None
    values = entity.get("values")
    if not isinstance(values, list):
        return None
    return tuple(item for item in values if isinstance(item, str))
