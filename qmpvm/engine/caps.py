"""What the engine binary supports, learned once and cached on disk.

Rule 5 (validate early) needs to know, before any machine exists, which
machine types, device types (and their properties), accelerators and QAPI
enum values the engine accepts.  We ask the binary itself, the way libvirt
does, and keep the answer keyed by the binary's identity.

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
* **Cache.**  ``caps-<sha256>.json`` in the cache directory, where the hash
  covers the binary's path, size and mtime (and the file format).  Loading
  compares those again and spawns nothing; the version string is recorded
  in the identity but not re-read on load, so a warm start costs one stat
  and one JSON read.  A stale or corrupt file is re-probed and replaced
  (written atomically); files for older builds of the same path are removed.
* **No stray engines.**  Every engine is killed on any exit path, and gets
  ``PR_SET_PDEATHSIG=SIGKILL`` so it dies with qmpvm even on a hard crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from qmpvm.engine.link import EngineLink
from qmpvm.errors import EngineCommandError, EngineError

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

_FORMAT = 1  # bump when the cache layout or the probed content changes
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


class ProbeError(EngineError):
    """The engine binary is missing or unusable, so nothing can be validated."""


# -- the parent-death signal ---------------------------------------------

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()  # resolved in the parent: the child should not load anything


def _die_with_parent() -> None:
    """``preexec_fn`` that makes the child die (SIGKILL) when its parent does.

    Linux delivers the signal when the *thread* that forked exits, so spawn
    from the event loop's thread (asyncio does), not from a short-lived one.
    A no-op where prctl is unavailable.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


die_with_parent = _die_with_parent


# -- the result ----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceType:
    """One device type as the engine describes it."""

    name: str
    bus: str | None  # coarse bus kind: "pci", "isa", "virtio", "sysbus", "usb", ... (_BUS_KINDS)
    properties: Mapping[str, str] | None  # name -> QEMU type; None: probing it failed
    hotpluggable: bool | None = None  # QEMU 7.2 does not expose it over QMP


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities:
    """Everything qmpvm validates against, for one engine binary."""

    binary: str
    identity: Mapping[str, object]  # path, size, mtime_ns, version
    version: tuple[int, int, int]
    package: str
    machines: Mapping[str, Mapping[str, object]]  # names and aliases -> query-machines entry
    default_machine: str | None
    devices: Mapping[str, DeviceType]
    commands: frozenset[str]
    schema_enums: Mapping[str, tuple[str, ...]]
    accelerators: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "format": _FORMAT,
            "binary": self.binary,
            "identity": dict(self.identity),
            "version": list(self.version),
            "package": self.package,
            "machines": {name: dict(entry) for name, entry in self.machines.items()},
            "default_machine": self.default_machine,
            "devices": {
                name: {
                    "bus": dev.bus,
                    "properties": None if dev.properties is None else dict(dev.properties),
                    "hotpluggable": dev.hotpluggable,
                }
                for name, dev in self.devices.items()
            },
            "commands": sorted(self.commands),
            "schema_enums": {name: list(values) for name, values in self.schema_enums.items()},
            "accelerators": list(self.accelerators),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> Capabilities:
        """Rebuild from ``to_json``'s output; ValueError if it does not have that shape."""
        if doc.get("format") != _FORMAT:
            raise ValueError(f"capabilities format {doc.get('format')!r}, expected {_FORMAT}")
        version = _list_of(doc.get("version"), int, "version")
        if len(version) != 3:
            raise ValueError("version must have three numbers")
        devices: dict[str, DeviceType] = {}
        for name, raw in _dict(doc.get("devices"), "devices").items():
            entry = _dict(raw, f"devices.{name}")
            bus = entry.get("bus")
            props = entry.get("properties")
            hot = entry.get("hotpluggable")
            if not (bus is None or isinstance(bus, str)) or not (
                hot is None or isinstance(hot, bool)
            ):
                raise ValueError(f"device {name!r} is malformed")
            devices[name] = DeviceType(
                name=name,
                bus=bus,
                properties=None if props is None else _frozen(_str_map(props, name)),
                hotpluggable=hot,
            )
        default_machine = doc.get("default_machine")
        if not (default_machine is None or isinstance(default_machine, str)):
            raise ValueError("default_machine must be a string or null")
        return cls(
            binary=_str(doc.get("binary"), "binary"),
            identity=_frozen(_dict(doc.get("identity"), "identity")),
            version=(version[0], version[1], version[2]),
            package=_str(doc.get("package"), "package"),
            machines=_frozen(
                {
                    name: _frozen(_dict(entry, f"machines.{name}"))
                    for name, entry in _dict(doc.get("machines"), "machines").items()
                }
            ),
            default_machine=default_machine,
            devices=_frozen(devices),
            commands=frozenset(_list_of(doc.get("commands"), str, "commands")),
            schema_enums=_frozen(
                {
                    name: tuple(_list_of(values, str, f"schema_enums.{name}"))
                    for name, values in _dict(doc.get("schema_enums"), "schema_enums").items()
                }
            ),
            accelerators=tuple(_list_of(doc.get("accelerators"), str, "accelerators")),
        )


_K = TypeVar("_K")
_V = TypeVar("_V")
_T = TypeVar("_T")


def _frozen(mapping: Mapping[_K, _V]) -> Mapping[_K, _V]:
    return MappingProxyType(dict(mapping))


def _dict(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ValueError(f"{what} must be an object")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    return value


def _list_of(value: object, kind: type[_T], what: str) -> list[_T]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list")
    out: list[_T] = []
    for item in value:
        if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
            raise ValueError(f"{what} must hold only {kind.__name__} values")
        out.append(item)
    return out


def _str_map(value: object, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, item in _dict(value, what).items():
        out[key] = _str(item, f"{what}.{key}")
    return out


# -- identity and cache --------------------------------------------------


def _resolve(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        raise ProbeError(f"engine binary {binary!r} not found (not in PATH or not executable)")
    return os.path.abspath(found)


def _stat_identity(path: str) -> dict[str, object]:
    """The part of the identity that needs no process: what the cache key covers."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise ProbeError(f"engine binary {path!r}: {err.strerror}") from err
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def binary_identity(binary: str) -> dict[str, object]:
    """Who the binary is: where, which build (size, mtime), and what it says it is."""
    path = _resolve(binary)
    identity = _stat_identity(path)
    try:
        done = subprocess.run(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ProbeError(f"cannot run {path} --version: {err}") from err
    identity["version"] = _version_line(path, done.returncode, done.stdout, done.stderr)
    return identity


async def _binary_identity_async(binary: str) -> dict[str, object]:
    """``binary_identity`` whose child is killed if the caller is cancelled."""
    path = _resolve(binary)
    identity = _stat_identity(path)
    try:
        proc = await asyncio.create_subprocess_exec(
            path,
            "--version",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
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


def default_cache_dir() -> Path:
    """$QMPVM_CACHE_DIR, else $XDG_CACHE_HOME/qmpvm, else ~/.cache/qmpvm."""
    explicit = os.environ.get("QMPVM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "qmpvm"


def _cache_key(identity: Mapping[str, object]) -> dict[str, object]:
    return {"format": _FORMAT, **{key: identity.get(key) for key in ("path", "size", "mtime_ns")}}


def cache_path(cache_dir: Path, identity: Mapping[str, object]) -> Path:
    """The file that holds (or would hold) the capabilities for ``identity``."""
    text = json.dumps(_cache_key(identity), sort_keys=True, separators=(",", ":"))
    return cache_dir / f"caps-{hashlib.sha256(text.encode()).hexdigest()}.json"


def _load_cached(file: Path, key: Mapping[str, object]) -> Capabilities | None:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        logger.warning("cannot read capability cache %s: %s", file, err)
        return None
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        caps = Capabilities.from_json(doc)
    except (ValueError, RecursionError) as err:
        logger.warning("capability cache %s is corrupt (%s); probing again", file, err)
        return None
    if _cache_key(caps.identity) != key:
        logger.info("capability cache %s is stale; probing again", file)
        return None
    return caps


def _store(cache_dir: Path, caps: Capabilities) -> Path:
    """Write atomically (rename), then drop files left by older builds of the same path."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_path(cache_dir, caps.identity)
    fd, temp = tempfile.mkstemp(prefix=".caps-", suffix=".tmp", dir=cache_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(caps.to_json(), out, separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    for other in cache_dir.glob("caps-*.json"):
        if other != target and _cached_path(other) == caps.identity.get("path"):
            with contextlib.suppress(OSError):
                other.unlink()
    return target


def _cached_path(file: Path) -> object:
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    identity = doc.get("identity") if isinstance(doc, dict) else None
    return identity.get("path") if isinstance(identity, dict) else None


async def load_or_probe(
    binary: str = "qemu-system-x86_64",
    cache_dir: Path | None = None,
    *,
    progress: Progress | None = None,
) -> Capabilities:
    """Capabilities from the cache when the binary is unchanged, else from a fresh probe.

    A cache that cannot be written is logged and skipped: the probe result
    is still returned.
    """
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    key = _cache_key(_stat_identity(_resolve(binary)))
    file = cache_path(directory, key)
    # Parsing ~1 MB of cache takes tens of ms: keep it off the event loop.
    cached = await asyncio.to_thread(_load_cached, file, key)
    if cached is not None:
        logger.debug("engine capabilities from %s", file)
        return cached
    caps = await probe(binary, progress=progress)
    try:
        written = await asyncio.to_thread(_store, directory, caps)
    except OSError as err:
        logger.warning("cannot write capability cache in %s: %s", directory, err)
    else:
        logger.info("engine capabilities cached in %s", written)
    return caps


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
            proc = await asyncio.create_subprocess_exec(
                path,
                *_PROBE_ARGS,
                "-chardev", f"socket,id={_LINK_ID},fd={child.fileno()}",
                "-mon", f"chardev={_LINK_ID},mode=control",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(child.fileno(),),
                preexec_fn=_die_with_parent,
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
            identity=_frozen(identity),
            version=qemu_version,
            package=package,
            machines=machine_map,
            default_machine=default_machine,
            devices=_frozen(devices),
            commands=frozenset(_names(commands)),
            schema_enums=_frozen(_schema_enums(schema)),
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
    identity = await _binary_identity_async(binary)
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
    return _frozen(out)


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
        frozen = _frozen(entry)
        machines[name] = frozen
        if entry.get("is-default") is True:
            default = name
    for entry in _objects(value):  # aliases never shadow a real name
        alias = entry.get("alias")
        name = entry.get("name")
        if isinstance(alias, str) and isinstance(name, str) and alias not in machines:
            machines[alias] = machines[name]
    return _frozen(dict(sorted(machines.items()))), default


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
