"""What the engine binary supports, learned once and cached on disk.

Rule 5 (validate early) needs to know, before any machine exists, which
machine types, device types (and their properties), accelerators and QAPI
enum values the engine accepts.  We ask the binary itself, the way libvirt
does (``qmpvm.engine.probe``), and keep the answer keyed by the binary's
identity.

Theory of operation:

* **Cache.**  ``caps-<sha256>.json`` in the cache directory, where the hash
  covers the binary's path, size and mtime (and the file format).  Loading
  compares those again and spawns nothing; the version string is recorded
  in the identity but not re-read on load, so a warm start costs one stat
  and one JSON read.  A stale or corrupt file is re-probed and replaced
  (written atomically); files for older builds of the same path are removed.
* **A warm start is on the path to the first command.**  Every command that
  validates waits for the load, and qmpvm's start is bound by CPU, so the
  load does only what a boot needs: the probing code is a module of its own,
  imported on a cache miss only, and each device type's properties (~62,000
  in all, for ~450 types of which a machine uses a few) stay one packed
  string in the cache document until that type is first looked up.  Packed
  as ``name=type,...`` rather than as nested JSON, the strings need no JSON
  escapes, so ``json.loads`` copies them at memory speed: a warm load takes
  2-3 ms here, against 30-45 ms to decode and check every property.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from qmpvm.errors import EngineError

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

_FORMAT = 3  # bump when the cache layout or the probed content changes


class ProbeError(EngineError):
    """The engine binary is missing or unusable, so nothing can be validated."""


# -- the result ----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceType:
    """One device type as the engine describes it."""

    name: str
    bus: str | None  # coarse bus kind: "pci", "isa", "virtio", "sysbus", ... (see probe.py)
    properties: Mapping[str, str] | None  # name -> QEMU type; None: unknown (probing failed)
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
                    "properties": None if dev.properties is None else _pack(dev.properties),
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
        devices: dict[str, _RawDevice] = {}
        for name, raw in _dict(doc.get("devices"), "devices").items():
            entry = _dict(raw, f"devices.{name}")
            bus = entry.get("bus")
            props = entry.get("properties")
            hot = entry.get("hotpluggable")
            if (
                not (bus is None or isinstance(bus, str))
                or not (props is None or isinstance(props, str))
                or not (hot is None or isinstance(hot, bool))
            ):
                raise ValueError(f"device {name!r} is malformed")
            devices[name] = (bus, props, hot)
        default_machine = doc.get("default_machine")
        if not (default_machine is None or isinstance(default_machine, str)):
            raise ValueError("default_machine must be a string or null")
        return cls(
            binary=_str(doc.get("binary"), "binary"),
            identity=frozen(_dict(doc.get("identity"), "identity")),
            version=(version[0], version[1], version[2]),
            package=_str(doc.get("package"), "package"),
            machines=frozen(
                {
                    name: frozen(_dict(entry, f"machines.{name}"))
                    for name, entry in _dict(doc.get("machines"), "machines").items()
                }
            ),
            default_machine=default_machine,
            devices=_CachedDevices(devices),
            commands=frozenset(_list_of(doc.get("commands"), str, "commands")),
            schema_enums=frozen(
                {
                    name: tuple(_list_of(values, str, f"schema_enums.{name}"))
                    for name, values in _dict(doc.get("schema_enums"), "schema_enums").items()
                }
            ),
            accelerators=tuple(_list_of(doc.get("accelerators"), str, "accelerators")),
        )


# A device type as the cache holds it: bus, packed properties, hotpluggable.
_RawDevice = tuple[str | None, str | None, bool | None]


class _CachedDevices(Mapping[str, DeviceType]):
    """Device types from the cache, each decoded when first looked up."""

    def __init__(self, raw: dict[str, _RawDevice]) -> None:
        self._raw = raw
        self._decoded: dict[str, DeviceType] = {}

    def __getitem__(self, name: str) -> DeviceType:
        device = self._decoded.get(name)
        if device is None:
            bus, packed, hot = self._raw[name]
            device = DeviceType(
                name=name, bus=bus, properties=_decode_properties(name, packed), hotpluggable=hot
            )
            self._decoded[name] = device
        return device

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


def _decode_properties(name: str, packed: str | None) -> Mapping[str, str] | None:
    """A corrupt entry counts as unknown properties: the engine checks them instead."""
    if packed is None:
        return None
    try:
        return frozen(_unpack(packed))
    except ValueError as err:
        logger.warning("capability cache: properties of %s are corrupt (%s)", name, err)
        return None


def _pack(properties: Mapping[str, str]) -> str:
    """``name=type,...``; QOM names are free text, so '%', ',' and '=' are %-escaped."""
    return ",".join(f"{_escape(name)}={_escape(kind)}" for name, kind in properties.items())


def _unpack(packed: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in packed.split(",") if packed else ():
        name, sep, kind = item.partition("=")
        if not sep:
            raise ValueError(f"no '=' in {item!r}")
        out[_unescape(name)] = _unescape(kind)
    return out


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace(",", "%2C").replace("=", "%3D")


def _unescape(text: str) -> str:
    if "%" not in text:
        return text
    # Every '%' starts an escape, and the two below add none: so "%25" goes last.
    return text.replace("%2C", ",").replace("%3D", "=").replace("%25", "%")


_K = TypeVar("_K")
_V = TypeVar("_V")
_T = TypeVar("_T")


def frozen(mapping: Mapping[_K, _V]) -> Mapping[_K, _V]:
    """A read-only copy: capabilities are shared by every command."""
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


# -- identity and cache --------------------------------------------------


def resolve_binary(binary: str) -> str:
    """The absolute path the binary's name stands for, as the cache key needs."""
    found = shutil.which(binary)
    if found is None:
        raise ProbeError(f"engine binary {binary!r} not found (not in PATH or not executable)")
    return os.path.abspath(found)


def stat_identity(path: str) -> dict[str, object]:
    """The part of the identity that needs no process: what the cache key covers."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise ProbeError(f"engine binary {path!r}: {err.strerror}") from err
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


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
    import tempfile  # only after a probe: not worth importing at every start

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
    key = _cache_key(stat_identity(resolve_binary(binary)))
    file = cache_path(directory, key)
    # Reading ~1 MB may wait for the disk: keep it off the event loop.
    cached = await asyncio.to_thread(_load_cached, file, key)
    if cached is not None:
        logger.debug("engine capabilities from %s", file)
        return cached
    from qmpvm.engine.probe import probe  # compiled only when the cache misses

    caps = await probe(binary, progress=progress)
    try:
        written = await asyncio.to_thread(_store, directory, caps)
    except OSError as err:
        logger.warning("cannot write capability cache in %s: %s", directory, err)
    else:
        logger.info("engine capabilities cached in %s", written)
    return caps
