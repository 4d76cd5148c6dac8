"""qmpvm's own commands' arguments: one declaration gives checking and introspection.

Only the commands the engine does not have are declared here (``machine-set``,
``boot-set``, ``config-export``, ``drive-add``, ...): the engine's commands are
checked against the engine's own schema (``qmpvm.qapi.check``).  A command's
arguments are a frozen dataclass (field ``node_name`` is QMP's
``node-name``); ``check`` turns a JSON object into an instance, refusing
unknown members, wrong types and missing members with QEMU's wording
(qapi/qobject-input-visitor.c).  ``Introspector`` emits the declarations as
``query-qmp-schema`` SchemaInfo entries (qapi/introspect.json), which are
merged into the engine's.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any
from typing import Union as TypingUnion

from qmpvm.errors import ArgumentError

EXTRA_FIELD = "extra_members"
"""A field of this name (Mapping[str, object]) collects members the class
does not declare, for commands QEMU marks 'gen': false (device_add)."""


def qmp_name(field_name: str) -> str:
    return field_name.rstrip("_").replace("_", "-")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, str, object, bool], ...]:
    """(python name, QMP name, annotation, required) for each field of ``cls``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append((f.name, qmp_name(f.name), hints[f.name], required))
    return tuple(out)


def strip_optional(annotation: object) -> object:
    origin = typing.get_origin(annotation)
    if origin in (TypingUnion, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def check(spec: type, value: object, path: str = "") -> Any:
    """``value`` as an instance of ``spec``, or ArgumentError in QEMU's words."""
    return _check_object(spec, value, path)


@functools.cache
def _layout(cls: type) -> tuple[tuple[tuple[str, str, object, bool], ...], frozenset[str], bool]:
    """``_fields`` of ``cls`` but EXTRA_FIELD, their QMP names, and whether it has EXTRA_FIELD."""
    fields = tuple(f for f in _fields(cls) if f[0] != EXTRA_FIELD)
    return fields, frozenset(f[1] for f in fields), len(fields) < len(_fields(cls))


def _check_object(cls: type, value: object, path: str) -> object:
    if not isinstance(value, dict):
        raise ArgumentError(f"Invalid parameter type for '{path}', expected: object")
    fields, known, takes_extra = _layout(cls)
    kwargs: dict[str, object] = {}
    for py_name, name, annotation, required in fields:
        if name in value:
            kwargs[py_name] = _check_value(annotation, value[name], _join(path, name))
        elif required:
            raise ArgumentError(f"Parameter '{_join(path, name)}' is missing")
    extra = {} if value.keys() <= known else {k: v for k, v in value.items() if k not in known}
    if takes_extra:
        kwargs[EXTRA_FIELD] = extra
    elif extra:
        raise ArgumentError(f"Parameter '{_join(path, next(iter(extra)))}' is unexpected")
    return cls(**kwargs)


_JSON_TYPE_NAMES: dict[type, str] = {
    str: "string",
    int: "integer",
    bool: "boolean",
    float: "number",
}


@functools.cache
def _expected(annotation: object) -> tuple[object, object]:
    """What ``_check_value`` tests for ``annotation``, and its generic origin.

    ``X | None`` is X.  Cached: annotations are few and checked at every command.
    """
    annotation = strip_optional(annotation)
    return annotation, typing.get_origin(annotation)


def _check_value(annotation: object, value: object, path: str) -> object:
    annotation, origin = _expected(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is object:
        return value
    elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if not isinstance(value, str):
            raise ArgumentError(f"Invalid parameter type for '{path}', expected: string")
        try:
            return annotation(value)
        except ValueError:
            raise ArgumentError(f"Parameter '{path}' does not accept value '{value}'") from None
    elif origin is list:
        if not isinstance(value, list):
            raise ArgumentError(f"Invalid parameter type for '{path}', expected: array")
        (element,) = typing.get_args(annotation)
        return [_check_value(element, item, f"{path}[{i}]") for i, item in enumerate(value)]
    elif origin in (Mapping, dict):
        if isinstance(value, dict):
            return value
        raise ArgumentError(f"Invalid parameter type for '{path}', expected: object")
    elif dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return _check_object(annotation, value, path)
    else:
        raise TypeError(f"schema: unsupported annotation {annotation!r} at {path}")
    expected = (
        _JSON_TYPE_NAMES.get(annotation, "value") if isinstance(annotation, type) else "value"
    )
    raise ArgumentError(f"Invalid parameter type for '{path}', expected: {expected}")


def to_json(instance: object) -> dict[str, object]:
    """The QMP object for a checked instance; unset (None) members are omitted."""
    out: dict[str, object] = {}
    for py_name, name, _annotation, _required in _fields(typing.cast(type, type(instance))):
        value = getattr(instance, py_name)
        if py_name == EXTRA_FIELD:
            out.update(typing.cast(Mapping[str, object], value))
        elif value is not None:
            out[name] = _plain(value)
    return out


def _plain(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json(value)
    return value


_BUILTINS: dict[type, tuple[str, str]] = {
    str: ("str", "string"),
    int: ("int", "int"),
    bool: ("bool", "boolean"),
    float: ("number", "number"),
    object: ("any", "value"),
}


class Introspector:
    """Collects SchemaInfo entries (query-qmp-schema), each type once."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, object]] = {}

    def command(self, name: str, args: type | None, returns: object) -> None:
        entry: dict[str, object] = {"name": name, "meta-type": "command"}
        entry["arg-type"] = self.type_name(args) if args is not None else self._empty()
        entry["ret-type"] = self.type_name(returns)
        entry["allow-oob"] = False
        self.entries[name] = entry

    def event(self, name: str, data: type | None) -> None:
        arg = self.type_name(data) if data is not None else self._empty()
        self.entries[name] = {"name": name, "meta-type": "event", "arg-type": arg}

    def _empty(self) -> str:
        self.entries.setdefault(
            "q_empty", {"name": "q_empty", "meta-type": "object", "members": []}
        )
        return "q_empty"

    def type_name(self, annotation: object) -> str:
        annotation = strip_optional(annotation)
        if annotation is None:
            return self._empty()
        if annotation in _BUILTINS:
            name, json_type = _BUILTINS[annotation]
            self.entries.setdefault(
                name, {"name": name, "meta-type": "builtin", "json-type": json_type}
            )
            return name
        if typing.get_origin(annotation) is list:
            element = self.type_name(typing.get_args(annotation)[0])
            name = f"[{element}]"
            self.entries.setdefault(
                name, {"name": name, "meta-type": "array", "element-type": element}
            )
            return name
        if typing.get_origin(annotation) in (Mapping, dict):
            return self.type_name(object)
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            values = [m.value for m in annotation]
            self.entries.setdefault(
                annotation.__name__,
                {
                    "name": annotation.__name__,
                    "meta-type": "enum",
                    "values": values,
                    "members": [{"name": v} for v in values],
                },
            )
            return annotation.__name__
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            return self._object(annotation)
        raise TypeError(f"schema: cannot introspect {annotation!r}")

    def _object(self, cls: type) -> str:
        name = cls.__name__
        if name in self.entries:
            return name
        self.entries[name] = {"name": name, "meta-type": "object", "members": []}
        self.entries[name]["members"] = self._members(cls)
        return name

    def _members(self, cls: type) -> list[dict[str, object]]:
        members: list[dict[str, object]] = []
        for py_name, qname, annotation, required in _fields(cls):
            if py_name == EXTRA_FIELD:
                continue
            member: dict[str, object] = {"name": qname, "type": self.type_name(annotation)}
            if not required:
                member["default"] = None
            members.append(member)
        return members
