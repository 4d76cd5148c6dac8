"""Probing: asking an engine binary everything ``Capabilities`` holds.

Theory of operation:

* **Probing** starts the binary with no machine (``-machine none -S
  -nodefaults``) and a private monitor link, asks the introspection commands
  once (version, machines, commands, the QMP schema, command-line options,
  CPU models, QOM type lists), then the properties of every type qmpvm
  validates against: ``device-list-properties`` for every non-abstract
  device type, ``qom-list-properties`` for every machine type
  (``<name>-machine``, ``none`` included) and every non-abstract
  user-creatable object type.  All of these go in one pipeline.
* **Crashes.**  Some types abort QEMU when introspected without a machine
  (QEMU 7.2: ``microvm-machine``, ``colo-compare``, ``x-remote-object``).
  The property requests are pipelined on one engine; if it dies, the
  answers it never sent are "lost".  QEMU answers in order, so the first
  lost request is the suspect: it is asked again alone on a fresh engine and
  recorded as ``None`` (unknown) if that engine dies too; the rest are
  pipelined again.  If the suspect answers alone, the engine died for a
  reason the order does not show, and the rest is halved (bisection), so a
  culprit still costs only a logarithmic number of engine starts.  Every
  round settles at least one request, so the probe ends; a hang is turned
  into a crash by killing the engine after a timeout.  A request the engine
  refuses (an error reply) is recorded as ``None`` too.
* **Bus kind** of a device comes from ``qom-list-types implements=<base>``:
  the first base in ``_BUS_KINDS`` the type implements gives its kind.
* **Schema enums.**  ``query-qmp-schema`` masks type names as numbers but
  keeps command names, so each enum is found structurally: start at a
  command's ``arg-type`` and follow members by name (``_SCHEMA_ENUMS``), e.g.
  ``chardev-add`` -> member ``backend`` -> member ``type`` is the enum of
  chardev backends.  The whole schema is kept as well.
* **No stray engines.**  Every engine is killed on any exit path and reaped
  before that path goes on, cancellation included (``_Engine.stop``), and is
  started by ``qmpvm.engine.process`` so it dies with qmpvm even on a hard
  crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import TypeVar

from qmpvm.engine import process
from qmpvm.engine.caps import (
    Capabilities,
    DeviceType,
    ProbeError,
    Progress,
    Properties,
    QmpSchema,
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
_ROUND_TIMEOUT = 30.0  # one pipelined round of property requests; past it, a hang
_ALONE_TIMEOUT = 10.0  # the same for a single suspect request
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

_DEVICE_PROPERTIES = "device-list-properties"
_QOM_PROPERTIES = "qom-list-properties"

# One property request: (command, typename).
_Request = tuple[str, str]
_Found = dict[_Request, Properties | None]

_T = TypeVar("_T")


async def _to_the_end(awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` to its end even if the caller is cancelled meanwhile;
    then raise that cancellation.  Only for work bounded without the caller
    (reaping a killed process), so that cleanup cannot be cut short."""
    task = asyncio.ensure_future(awaitable)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller gets
        raise asyncio.CancelledError
    return task.result()


def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL ``proc`` unless asyncio has seen it end.

    Not ``proc.kill()``: that polls first (``Popen.send_signal``), and a poll
    that reaps an engine which has just crashed races asyncio's child
    watcher, which then logs "Unknown child process" and reports exit status
    255 instead of the signal.  Signalling an ended, unreaped process is
    harmless.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


# -- identity --------------------------------------------------------


async def binary_identity(binary: str) -> dict[str, object]:
    """Who the binary is: where, which build (size, mtime), and what it says it is.

    ``--version`` runs as a child that is killed (and reaped) if the caller is
    cancelled.
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
        _kill(proc)
        await _to_the_end(proc.wait())
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
        self._stopping: asyncio.Task[str] | None = None

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
            raise  # cancelled: asyncio kills (and reaps) a child it had started
        finally:
            child.close()
        engine = cls(proc)
        try:
            engine.link = await EngineLink.open(parent, timeout=_GREETING_TIMEOUT)
        except BaseException as exc:
            parent.close()  # open closed it already unless it failed before taking it
            detail = await engine.stop()
            if isinstance(exc, EngineError):
                raise ProbeError(f"{path} gave no QMP greeting ({exc}){detail}") from exc
            raise
        return engine

    @property
    def alive(self) -> bool:
        return self.link is not None and not self.link.closed and self.proc.returncode is None

    async def stop(self) -> str:
        """Kill (synchronously, so no cancellation can come first), reap, close the link.

        Runs to its end even if the caller is cancelled meanwhile (and then
        raises the cancellation): everything after the kill is bounded, and
        an engine left unreaped would outlive the probe.  Idempotent.
        Returns how the engine ended and the tail of its stderr, for messages.
        """
        if self._stopping is None:
            was_running = self.proc.returncode is None
            _kill(self.proc)
            self._stopping = asyncio.create_task(self._reap(was_running))
        return await _to_the_end(self._stopping)

    async def _reap(self, was_running: bool) -> str:
        try:
            code = await self.proc.wait()
        finally:
            if self.link is not None:
                await self.link.close()  # the engine is gone: the reader is at EOF
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
        self.say(
            "querying version, machines, commands, schema, command-line options, "
            "CPU models and QOM types"
        )
        implements = ["device", "accel", "user-creatable", *(base for base, _ in _BUS_KINDS)]
        try:
            async with asyncio.timeout(_QUERY_TIMEOUT):
                # QOM types first: listing them loads the engine's modules, and
                # only then do their options (-spice) appear, as libvirt sees them
                types = await asyncio.gather(
                    *(
                        link.execute("qom-list-types", {"implements": base, "abstract": False})
                        for base in implements
                    ),
                )
                version, machines, commands, schema, options, cpus = await asyncio.gather(
                    link.execute("query-version"),
                    link.execute("query-machines"),
                    link.execute("query-commands"),
                    link.execute("query-qmp-schema"),
                    _optional(link.execute("query-command-line-options")),
                    _optional(link.execute("query-cpu-definitions")),
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
        object_names = sorted(_type_names(types[2]))
        kinds = [
            (kind, set(_type_names(found)))
            for (_, kind), found in zip(_BUS_KINDS, types[3:], strict=True)
        ]
        machine_map, default_machine = _machines(machines)
        machine_names = sorted({str(entry["name"]) for entry in machine_map.values()})
        self.say(
            f"listing the properties of {len(device_names)} device types, "
            f"{len(machine_names)} machine types and {len(object_names)} object types"
        )
        found = await self.properties(
            [
                *((_DEVICE_PROPERTIES, name) for name in device_names),
                *((_QOM_PROPERTIES, f"{name}-machine") for name in machine_names),
                *((_QOM_PROPERTIES, name) for name in object_names),
            ]
        )
        devices = {
            name: DeviceType(
                name=name,
                bus=next((kind for kind, members in kinds if name in members), None),
                properties=found.get((_DEVICE_PROPERTIES, name)),
            )
            for name in sorted(device_names)
        }
        machine_properties = {
            name: found.get((_QOM_PROPERTIES, f"{entry['name']}-machine"))
            for name, entry in machine_map.items()
        }
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
            schema=QmpSchema.from_entries(_objects(schema)),
            command_line_options=frozen(_command_line_options(options)),
            cpu_models=frozen(_cpu_models(cpus)),
            machine_properties=frozen(machine_properties),
            object_types=frozen(
                {name: found.get((_QOM_PROPERTIES, name)) for name in object_names}
            ),
        )

    async def properties(self, requests: Sequence[_Request]) -> _Found:
        """The answer to every request, or None where the engine refused or crashed on it."""
        found: _Found = {}
        await self._settle(list(requests), found)
        return found

    async def _settle(self, todo: list[_Request], found: _Found) -> None:
        """Get an answer, or a verdict of "crashes", for every request in ``todo``."""
        while todo:
            alone = len(todo) == 1
            lost = await self._round(todo, found)
            if not lost:
                return
            suspect, todo = lost[0], lost[1:]
            typename = suspect[1]
            if not alone:
                self.say(f"engine died; asking for {typename} alone ({len(todo)} more to redo)")
            if alone or await self._round([suspect], found, timeout=_ALONE_TIMEOUT):
                found[suspect] = None
                self.crashed.append(typename)
                self.say(f"{typename} crashes the engine; its properties are unknown")
                continue
            # The engine died, but not on the request it was answering: halve what
            # is left so any culprit is still found in a logarithmic number of starts.
            half = len(todo) // 2
            await self._settle(todo[:half], found)
            todo = todo[half:]

    async def _round(
        self, requests: Sequence[_Request], found: _Found, *, timeout: float | None = None
    ) -> list[_Request]:
        """Send all ``requests`` at once; return those whose answers died with the engine."""
        link = await self.link()
        tasks = [
            asyncio.create_task(link.execute(command, {"typename": typename}))
            for command, typename in requests
        ]
        try:
            pending = await self._answers(requests, tasks, timeout or _ROUND_TIMEOUT)
            if pending:
                logger.warning("engine hung listing properties; killing it")
                await self.discard()
                await asyncio.wait(pending)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        lost: list[_Request] = []
        for request, task in zip(requests, tasks, strict=True):
            err = task.exception()
            if err is None:
                found[request] = _properties(task.result())
            elif isinstance(err, EngineCommandError):
                logger.info("%s %s refused: %s", request[0], request[1], err.desc)
                found[request] = None
            elif isinstance(err, EngineError):
                lost.append(request)
            else:
                raise err
        if lost:
            detail = await self.discard()
            logger.info(  # some types crash QEMU when listed; they are set aside and retried
                "probe engine died with %d answers lost (first %s)%s", len(lost), lost[0][1], detail
            )
        return lost

    async def _answers(
        self, requests: Sequence[_Request], tasks: Sequence[asyncio.Task[object]], timeout: float
    ) -> set[asyncio.Task[object]]:
        """Wait for the answers to one round's ``requests`` (``tasks``, in the same
        order); return the tasks still pending after ``timeout``: a hang."""
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return pending


async def _optional(request: Awaitable[object]) -> object:
    """The answer, or None if the engine refuses the command (it may not have it)."""
    try:
        return await request
    except EngineCommandError as err:
        logger.info("engine refused an optional query: %s", err.desc)
        return None


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
    counts = (
        f"{len(caps.devices)} device types, {len(caps.machine_properties)} machine types "
        f"and aliases, {len(caps.object_types)} object types"
    )
    prober.say(
        f"probed {counts} in {elapsed:.2f} s with {prober.starts} engine start(s); "
        f"{len(prober.crashed)} crashed the engine"
        + (f": {', '.join(prober.crashed)}" if prober.crashed else "")
    )
    logger.info(
        "probed %s in %.2f s: %s; %d crashed the engine",
        path, elapsed, counts, len(prober.crashed),
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


def _properties(value: object) -> Properties | None:
    """ObjectPropertyInfo / DevicePropertyInfo list -> Properties (description and
    ``default-value`` kept where given)."""
    if not isinstance(value, list):
        return None
    types: dict[str, str] = {}
    defaults: dict[str, object] = {}
    descriptions: dict[str, str] = {}
    for item in value:
        if not isinstance(item, dict):
            continue
        name, kind = item.get("name"), item.get("type")
        if not (isinstance(name, str) and isinstance(kind, str)):
            continue
        types[name] = kind
        if "default-value" in item:
            defaults[name] = item["default-value"]
        description = item.get("description")
        if isinstance(description, str):
            descriptions[name] = description
    return Properties(types, defaults=defaults, descriptions=descriptions)


def _command_line_options(value: object) -> dict[str, Mapping[str, str]]:
    """query-command-line-options -> option -> parameter -> type ("string", ...)."""
    if value is None:
        return {}
    out: dict[str, Mapping[str, str]] = {}
    for entry in _objects(value):
        option, parameters = entry.get("option"), entry.get("parameters")
        if not isinstance(option, str) or not isinstance(parameters, list):
            continue
        params = {
            item["name"]: item["type"]
            for item in parameters
            if isinstance(item, dict)
            and isinstance(item.get("name"), str)
            and isinstance(item.get("type"), str)
        }
        out[option] = frozen({**out.get(option, {}), **params})
    return dict(sorted(out.items()))


def _cpu_models(value: object) -> dict[str, str | None]:
    """query-cpu-definitions -> model name -> the model it is an alias of, or None."""
    if value is None:
        return {}
    out: dict[str, str | None] = {}
    for entry in _objects(value):
        name, alias = entry.get("name"), entry.get("alias-of")
        if isinstance(name, str):
            out[name] = alias if isinstance(alias, str) else None
    return dict(sorted(out.items()))


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
