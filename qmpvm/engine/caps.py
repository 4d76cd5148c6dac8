"""What the engine binary supports, learned once and cached on disk.

Rule 5 (validate early) needs to know, before any machine exists, which
machine types, device types (and their properties), accelerators and QAPI
enum values the engine accepts.  We ask the binary itself, the way libvirt
does (``qmpvm.engine.probe``), and keep the answer keyed by the binary's
identity.  This module is the data model and the cache file; probing lives
in ``qmpvm.engine.probe`` and ``qmpvm.engine.caps_loader.load_or_probe``
joins the two, so imports run one way: caps_loader -> probe -> caps.

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
  imported on a cache miss only, and what a boot rarely reads stays text in
  the cache document until it is first looked up:

  - properties (~62,000 of ~450 device types, of which a machine uses a few,
    plus those of ~60 machine and ~40 object types) are only ~1,350
    distinct items ``name=type[=default[=description]]`` (the default as
    JSON text; '%', ',', '=', '"' and '\\' %-escaped in every field).  The
    document holds them once, as one string split on the first lookup, and
    each type's properties as a string of fixed-width base-64 item numbers
    (2 characters each).  Neither needs a JSON escape, so ``json.loads``
    copies them at memory speed, and there are few of them: the ~1.1 MB that
    one ``name=type,...`` string per type took shrink to ~150 KB;
  - the whole ``query-qmp-schema`` answer (~1,050 entries) is one string,
    the compact JSON text with '"' and "'" swapped: with '"' left as it is,
    the ~40,000 escapes it would need cost ``json.loads`` ~1 ms, swapped
    it copies in ~0.15 ms.  It is decoded on the first ``schema_entries()``.

  A warm load reads ~0.4 MB and takes ~1.5-2 ms here (~3 ms as the first
  thing a fresh process does), against 30-45 ms to decode and check every
  property.  A corrupt
  entry fails only the lookups that need it (the type reads as unknown,
  logged then).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pwd
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from qmpvm.errors import EngineError

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

_FORMAT = 5  # bump when the cache layout or the probed content changes


class ProbeError(EngineError):
    """The engine binary is missing or unusable, so nothing can be validated."""


# -- the result ----------------------------------------------------------


class Properties(Mapping[str, str]):
    """A type's properties as the engine lists them: name -> QEMU type, in the
    engine's order, plus the ``default-value`` and ``description`` of those it
    gives one for (``device-list-properties`` / ``qom-list-properties``)."""

    __slots__ = ("_defaults", "_descriptions", "_types")

    def __init__(
        self,
        types: Mapping[str, str] | None = None,
        *,
        defaults: Mapping[str, object] | None = None,
        descriptions: Mapping[str, str] | None = None,
    ) -> None:
        self._types: dict[str, str] = dict(types or {})
        self._defaults: Mapping[str, object] = MappingProxyType(dict(defaults or {}))
        self._descriptions: Mapping[str, str] = MappingProxyType(dict(descriptions or {}))
        stray = (self._defaults.keys() | self._descriptions.keys()) - self._types.keys()
        if stray:
            raise ValueError(f"default or description for unknown properties {sorted(stray)}")

    @property
    def defaults(self) -> Mapping[str, object]:
        """Property name -> default value, for the properties the engine gives one for."""
        return self._defaults

    @property
    def descriptions(self) -> Mapping[str, str]:
        """Property name -> description, for the properties the engine describes."""
        return self._descriptions

    def to_qmp(self) -> list[dict[str, object]]:
        """As the engine answers: ``[{"name", "type", "description"?, "default-value"?}]``."""
        out: list[dict[str, object]] = []
        for name, kind in self._types.items():
            item: dict[str, object] = {"name": name, "type": kind}
            if name in self._descriptions:
                item["description"] = self._descriptions[name]
            if name in self._defaults:
                item["default-value"] = self._defaults[name]
            out.append(item)
        return out

    def __getitem__(self, name: str) -> str:
        return self._types[name]

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __iter__(self) -> Iterator[str]:
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)

    def __eq__(self, other: object) -> bool:
        """Against another ``Properties`` defaults and descriptions count too;
        against a plain mapping only names and types do."""
        if isinstance(other, Properties):
            return (
                self._types == other._types
                and self._defaults == other._defaults
                and self._descriptions == other._descriptions
            )
        if isinstance(other, Mapping):
            return self._types == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Properties({self._types!r}, defaults={dict(self._defaults)!r}, "
            f"descriptions={dict(self._descriptions)!r})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceType:
    """One device type as the engine describes it."""

    name: str
    bus: str | None  # coarse bus kind: "pci", "isa", "virtio", "sysbus", ... (see probe.py)
    properties: Properties | None  # None: unknown (probing failed)
    hotpluggable: bool | None = None  # QEMU 7.2 does not expose it over QMP


class QmpSchema:
    """The engine's ``query-qmp-schema`` answer, kept as text until first used.

    The text is held as the cache document stores it (compact JSON with '"'
    and "'" swapped, see the module docstring), so a load copies it as is.
    """

    __slots__ = ("_entries", "_stored")

    def __init__(self, stored: str) -> None:
        """``stored``: the text as the cache holds it; ``from_entries`` takes the answer."""
        self._stored = stored
        self._entries: tuple[Mapping[str, object], ...] | None = None

    @classmethod
    def from_entries(cls, entries: Sequence[object]) -> QmpSchema:
        return cls(json.dumps(list(entries), separators=(",", ":")).translate(_QUOTE_SWAP))

    @property
    def stored(self) -> str:
        return self._stored

    def json(self) -> str:
        """The answer as compact JSON text, e.g. to pass on verbatim."""
        return self._stored.translate(_QUOTE_SWAP)

    def entries(self) -> tuple[Mapping[str, object], ...]:
        """The SchemaInfo objects, read-only (lists as tuples); decoded on first use.

        Text that does not decode to a list of objects is logged and reads as ().
        """
        if self._entries is None:
            try:
                value = json.loads(self.json(), object_hook=_frozen_object)
                if not isinstance(value, list) or not all(
                    isinstance(entry, MappingProxyType) for entry in value
                ):
                    raise ValueError("not a list of objects")
            except (ValueError, RecursionError) as err:
                logger.warning("capability cache: the QMP schema is corrupt (%s)", err)
                value = []
            self._entries = tuple(value)
        return self._entries

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QmpSchema):
            return NotImplemented
        return self._stored == other._stored

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"QmpSchema(<{len(self._stored)} characters>)"


_QUOTE_SWAP = str.maketrans({'"': "'", "'": '"'})


def _frozen_object(value: dict[str, object]) -> Mapping[str, object]:
    """``json.loads`` object hook: read-only objects, their list members as tuples."""
    for key, item in value.items():
        if type(item) is list:
            value[key] = tuple(item)
    return MappingProxyType(value)


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
    schema: QmpSchema  # the whole query-qmp-schema answer; see schema_entries()
    command_line_options: Mapping[str, Mapping[str, str]]  # option -> parameter -> type
    cpu_models: Mapping[str, str | None]  # query-cpu-definitions: name -> alias-of or None
    # Machine names and aliases (as in ``machines``) -> the QOM properties of
    # "<name>-machine"; None: unknown (the engine crashed or refused).
    machine_properties: Mapping[str, Properties | None]
    # User-creatable, non-abstract QOM types (object-add) -> QOM properties; None: unknown.
    object_types: Mapping[str, Properties | None]

    def schema_entries(self) -> tuple[Mapping[str, object], ...]:
        """``query-qmp-schema`` as the engine answered it (read-only), decoded on first use."""
        return self.schema.entries()

    def device_list_properties(self, typename: str) -> list[dict[str, object]] | None:
        """As the engine's ``device-list-properties`` answers; None if the type or
        its properties are unknown."""
        device = self.devices.get(typename)
        if device is None or device.properties is None:
            return None
        return device.properties.to_qmp()

    def to_json(self) -> dict[str, object]:
        coder = _Coder()  # every type's properties go in first, so the code width is known
        devices = {name: coder.add(dev.properties) for name, dev in self.devices.items()}
        machines = {name: coder.add(props) for name, props in self.machine_properties.items()}
        objects = {name: coder.add(props) for name, props in self.object_types.items()}
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
                    "properties": coder.codes(devices[name]),
                    "hotpluggable": dev.hotpluggable,
                }
                for name, dev in self.devices.items()
            },
            "commands": sorted(self.commands),
            "schema_enums": {name: list(values) for name, values in self.schema_enums.items()},
            "accelerators": list(self.accelerators),
            "command_line_options": {
                name: dict(params) for name, params in self.command_line_options.items()
            },
            "cpu_models": dict(self.cpu_models),
            "machine_properties": {name: coder.codes(n) for name, n in machines.items()},
            "object_types": {name: coder.codes(n) for name, n in objects.items()},
            "property_items": ",".join(coder.items),
            "property_code_width": coder.width,
            "schema": self.schema.stored,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> Capabilities:
        """Rebuild from ``to_json``'s output; ValueError if it does not have that shape.

        Packed properties and the schema are checked when first looked up, not here.
        """
        if doc.get("format") != _FORMAT:
            raise ValueError(f"capabilities format {doc.get('format')!r}, expected {_FORMAT}")
        version = _list_of(doc.get("version"), int, "version")
        if len(version) != 3:
            raise ValueError("version must have three numbers")
        width = doc.get("property_code_width")
        if type(width) is not int or not 1 <= width <= _MAX_WIDTH:
            raise ValueError("property_code_width must be a small number")
        items = _Items(_str(doc.get("property_items"), "property_items"), width)
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
        options: dict[str, Mapping[str, str]] = {}
        for name, params in _dict(doc.get("command_line_options"), "command_line_options").items():
            options[name] = frozen(_str_values(params, f"command_line_options.{name}"))
        cpu_models: dict[str, str | None] = {}
        for name, alias in _dict(doc.get("cpu_models"), "cpu_models").items():
            if not (alias is None or isinstance(alias, str)):
                raise ValueError(f"cpu_models.{name} must be a string or null")
            cpu_models[name] = alias
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
            devices=_CachedDevices(devices, items),
            commands=frozenset(_list_of(doc.get("commands"), str, "commands")),
            schema_enums=frozen(
                {
                    name: tuple(_list_of(values, str, f"schema_enums.{name}"))
                    for name, values in _dict(doc.get("schema_enums"), "schema_enums").items()
                }
            ),
            accelerators=tuple(_list_of(doc.get("accelerators"), str, "accelerators")),
            schema=QmpSchema(_str(doc.get("schema"), "schema")),
            command_line_options=frozen(options),
            cpu_models=frozen(cpu_models),
            machine_properties=_CachedProperties(
                _codes_or_none(doc.get("machine_properties"), "machine_properties"),
                items,
                "machine type",
            ),
            object_types=_CachedProperties(
                _codes_or_none(doc.get("object_types"), "object_types"), items, "object type"
            ),
        )


# -- packing -------------------------------------------------------------

# A device type as the cache holds it: bus, item codes of its properties, hotpluggable.
_RawDevice = tuple[str | None, str | None, bool | None]

_DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_"
_DIGIT_VALUE = {digit: value for value, digit in enumerate(_DIGITS)}
_MAX_WIDTH = 4

# One property item as decoded: name, type, default value (or _NO_DEFAULT), description.
_Item = tuple[str, str, object, str | None]
_NO_DEFAULT = object()  # a default may be null


class _Coder:
    """Builds the item table while ``to_json`` walks the types: ``add`` the
    properties of each, then (the table complete, so the code width known)
    turn what ``add`` returned into codes."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}

    def add(self, properties: Properties | None) -> list[int] | None:
        if properties is None:
            return None
        return [self._index.setdefault(item, len(self._index)) for item in _items(properties)]

    @property
    def items(self) -> list[str]:
        return list(self._index)

    @property
    def width(self) -> int:
        width = 1
        while len(_DIGITS) ** width < len(self._index):
            width += 1
        return width

    def codes(self, numbers: list[int] | None) -> str | None:
        if numbers is None:
            return None
        width = self.width
        return "".join(_code(number, width) for number in numbers)


def _code(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, len(_DIGITS))
        digits.append(_DIGITS[digit])
    return "".join(reversed(digits))


def _items(properties: Properties) -> Iterator[str]:
    """``name=type[=default[=description]]`` per property, fields %-escaped.

    The default is the value's JSON text; an empty default field means none
    (no JSON text is empty), and the description field is there only when
    the engine gave one.
    """
    defaults, descriptions = properties.defaults, properties.descriptions
    for name, kind in properties.items():
        item = f"{_escape(name)}={_escape(kind)}"
        description = descriptions.get(name)
        if name in defaults:
            item += "=" + _escape(json.dumps(defaults[name], separators=(",", ":")))
        elif description is not None:
            item += "="
        if description is not None:
            item += "=" + _escape(description)
        yield item


class _Items:
    """The document's item table: split when first needed, each item parsed once."""

    def __init__(self, packed: str, width: int) -> None:
        self._packed = packed
        self._width = width
        self._items: list[str] | None = None
        self._parsed: dict[int, _Item] = {}

    def decode(self, codes: str) -> Properties:
        """The properties ``codes`` stand for; ValueError if anything is corrupt."""
        if self._items is None:
            self._items = self._packed.split(",") if self._packed else []
        width = self._width
        if len(codes) % width:
            raise ValueError(f"{len(codes)} characters of codes, not a multiple of {width}")
        types: dict[str, str] = {}
        defaults: dict[str, object] = {}
        descriptions: dict[str, str] = {}
        for start in range(0, len(codes), width):
            number = 0
            for digit in codes[start : start + width]:
                value = _DIGIT_VALUE.get(digit)
                if value is None:
                    raise ValueError(f"{digit!r} is no code digit")
                number = number * len(_DIGITS) + value
            item = self._parsed.get(number)
            if item is None:
                if number >= len(self._items):
                    raise ValueError(f"no property item {number}")
                item = self._parsed[number] = _parse_item(self._items[number])
            name, kind, default, description = item
            types[name] = kind
            if default is not _NO_DEFAULT:
                defaults[name] = default
            if description is not None:
                descriptions[name] = description
        return Properties(types, defaults=defaults, descriptions=descriptions)


def _parse_item(item: str) -> _Item:
    fields = item.split("=")
    if not 2 <= len(fields) <= 4:
        raise ValueError(f"malformed property item {item!r}")
    default = json.loads(_unescape(fields[2])) if len(fields) > 2 and fields[2] else _NO_DEFAULT
    description = _unescape(fields[3]) if len(fields) > 3 else None
    return _unescape(fields[0]), _unescape(fields[1]), default, description


def _codes_or_none(value: object, what: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, codes in _dict(value, what).items():
        if not (codes is None or isinstance(codes, str)):
            raise ValueError(f"{what}.{name} must be a string or null")
        out[name] = codes
    return out


def _decode(what: str, codes: str | None, items: _Items) -> Properties | None:
    """A corrupt entry counts as unknown properties: the engine checks them instead."""
    if codes is None:
        return None
    try:
        return items.decode(codes)
    except (ValueError, RecursionError) as err:
        logger.warning("capability cache: properties of %s are corrupt (%s)", what, err)
        return None


class _CachedDevices(Mapping[str, DeviceType]):
    """Device types from the cache, each decoded when first looked up."""

    def __init__(self, raw: dict[str, _RawDevice], items: _Items) -> None:
        self._raw = raw
        self._items = items
        self._decoded: dict[str, DeviceType] = {}

    def __getitem__(self, name: str) -> DeviceType:
        device = self._decoded.get(name)
        if device is None:
            bus, codes, hot = self._raw[name]
            properties = _decode(name, codes, self._items)
            device = DeviceType(name=name, bus=bus, properties=properties, hotpluggable=hot)
            self._decoded[name] = device
        return device

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


class _CachedProperties(Mapping[str, Properties | None]):
    """Type name -> properties from the cache, decoded when first looked up.

    Types with the same codes (machine types and their aliases share them)
    share one decoded ``Properties``.
    """

    def __init__(self, raw: dict[str, str | None], items: _Items, what: str) -> None:
        self._raw = raw
        self._items = items
        self._what = what
        self._by_codes: dict[str, Properties | None] = {}

    def __getitem__(self, name: str) -> Properties | None:
        codes = self._raw[name]
        if codes is None:
            return None
        if codes not in self._by_codes:
            self._by_codes[codes] = _decode(f"{self._what} {name}", codes, self._items)
        return self._by_codes[codes]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


_ESCAPES = (("%", "%25"), (",", "%2C"), ("=", "%3D"), ('"', "%22"), ("\\", "%5C"))
"""Escaped in this order ('%' first) and unescaped in the reverse ("%25" last):
every '%' then starts an escape, and no replacement makes another."""


def _escape(text: str) -> str:
    for plain, escaped in _ESCAPES:
        text = text.replace(plain, escaped)
    return text


def _unescape(text: str) -> str:
    if "%" not in text:
        return text
    for plain, escaped in reversed(_ESCAPES):
        text = text.replace(escaped, plain)
    return text


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


def _str_values(value: object, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, item in _dict(value, what).items():
        out[key] = _str(item, f"{what}.{key}")
    return out


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


VAR_CACHE = Path("/var/cache/qmpvm")


def default_cache_dir() -> Path:
    """$QMPVM_CACHE_DIR, else $XDG_CACHE_HOME/qmpvm, else ~/.cache/qmpvm."""
    return cache_dirs()[0]


def cache_dirs() -> list[Path]:
    """Where a cache is looked for, in order; the first writable one is written.

    ``$QMPVM_CACHE_DIR`` alone when set; else the environment's cache
    (``$XDG_CACHE_HOME`` or ``$HOME/.cache``), then the account's own home
    (libvirt starts each domain with ``HOME`` in a fresh directory of its
    own, where a cache would be cold at every start), then ``/var/cache``.
    """
    explicit = os.environ.get("QMPVM_CACHE_DIR")
    if explicit:
        return [Path(explicit)]
    xdg = os.environ.get("XDG_CACHE_HOME")
    found = [(Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "qmpvm"]
    with contextlib.suppress(KeyError):  # a uid without an account has no home
        found.append(Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "qmpvm")
    found.append(VAR_CACHE)
    return list(dict.fromkeys(found))


def cache_key(identity: Mapping[str, object]) -> dict[str, object]:
    """What a cache file must match: the format and the binary's path, size and mtime."""
    return {"format": _FORMAT, **{key: identity.get(key) for key in ("path", "size", "mtime_ns")}}


def cache_path(cache_dir: Path, identity: Mapping[str, object]) -> Path:
    """The file that holds (or would hold) the capabilities for ``identity``."""
    text = json.dumps(cache_key(identity), sort_keys=True, separators=(",", ":"))
    return cache_dir / f"caps-{hashlib.sha256(text.encode()).hexdigest()}.json"


def load_cached(file: Path, key: Mapping[str, object]) -> Capabilities | None:
    """The capabilities in ``file`` if it holds them for ``key``; None if it is
    missing, unreadable, corrupt or stale (logged).  Blocking: ~1.5 MB to read."""
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
    if cache_key(caps.identity) != key:
        logger.info("capability cache %s is stale; probing again", file)
        return None
    return caps


def store(cache_dir: Path, caps: Capabilities) -> Path:
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
