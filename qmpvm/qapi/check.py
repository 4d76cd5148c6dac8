"""Checking and typing QMP arguments with QEMU's introspected QAPI schema.

The engine describes every command it takes in its ``query-qmp-schema``
answer: a list of SchemaInfo entries (QEMU qapi/introspect.json; meta-types
builtin, enum, array, object, alternate, command, event; type names masked
as numbers).  ``Schema`` indexes that list and checks a command's arguments
the way QEMU's QObject input visitor does (qapi/qobject-input-visitor.c),
refusing with QEMU's words, so qmpvm can refuse a bad command before it
reaches the engine.  ``Schema.from_keyval`` types the strings of
``key=value`` option text the way QEMU's keyval input visitor does.

``declare`` writes qmpvm's own commands in the same SchemaInfo form, and
``merge`` adds them to the engine's, so one schema checks and introspects
both.

Pure: no I/O.  Building a ``Schema`` is one pass over the entries; each
type is compiled on first use only.  Checking recurses only as deep as the
schema and the value both go, and refuses values nested more than
``MAX_DEPTH`` containers deep, so a hostile client cannot exhaust the stack.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from qmpvm.errors import ArgumentError, CommandNotFoundError

MAX_DEPTH: Final = 64
"""Most objects/arrays nested in one another that a checked value may have."""

_INT_RANGES: Final[Mapping[str, tuple[int, int]]] = {
    "int8": (-(1 << 7), (1 << 7) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1),
    "uint64": (0, (1 << 64) - 1),
    "size": (0, (1 << 64) - 1),
}
_MASKED_INT: Final = (-(1 << 63), (1 << 64) - 1)
"""Range of 'int': introspection reports every integer type (int8 to uint64,
size) as 'int', and QEMU's JSON parser takes both int64 and uint64 values."""

BUILTINS: Final[Mapping[str, str]] = {
    "str": "string",
    "any": "value",
    "bool": "boolean",
    "int": "int",
    "null": "null",
    "number": "number",
    **{name: "int" for name in _INT_RANGES},
}
"""Builtin type names and their json-type.  QEMU introspects only the first
six; the sized integers are known too, for qmpvm's own declarations."""

_READABLE: Final[Mapping[str, str]] = {
    "string": "string",
    "int": "integer",
    "number": "number",
    "boolean": "boolean",
    "null": "null",
    "value": "value",
}

_TRUE: Final = frozenset({"on", "yes", "true", "y"})
_FALSE: Final = frozenset({"off", "no", "false", "n"})
"""What QEMU's qapi_bool_parse takes (util/qapi-util.c)."""

_MISSING: Final = object()


@dataclass(frozen=True, slots=True)
class Member:
    """One member of an object type."""

    name: str
    type: str
    optional: bool


# Compiled types, each made from its SchemaInfo entry on first use.  Plain
# slotted classes rather than dataclasses: they are private and never
# compared, and a dataclass costs about a millisecond of import time.


class _Scalar:
    __slots__ = ("high", "json", "low", "name", "sized")

    def __init__(
        self, name: str, json: str, low: int = 0, high: int = 0, sized: bool = False
    ) -> None:
        self.name = name
        self.json = json  # the builtin's json-type: string, int, number, boolean, null, value
        self.low = low
        self.high = high
        self.sized = sized  # a named fixed-size integer: range errors name it


class _Enum:
    __slots__ = ("allowed", "values")

    def __init__(self, values: tuple[str, ...]) -> None:
        self.values = values
        self.allowed = frozenset(values)


class _Array:
    __slots__ = ("element",)

    def __init__(self, element: str) -> None:
        self.element = element


class _Layout:
    """The members a value of an object type may have, in QEMU's visiting order."""

    __slots__ = ("members", "names", "types")

    def __init__(self, members: Sequence[Member]) -> None:
        types: dict[str, str] = {}
        for m in members:
            types.setdefault(m.name, m.type)
        self.members = tuple(members)
        self.names = frozenset(types)
        self.types: Mapping[str, str] = types


class _Object:
    __slots__ = ("own", "tag", "variants")

    def __init__(self, own: _Layout, tag: str | None, variants: Mapping[str, str]) -> None:
        self.own = own  # its own members (a flat union's base)
        self.tag = tag
        self.variants = variants  # tag value -> variant type


class _Alternate:
    __slots__ = ("branches", "expected", "order")

    def __init__(self, branches: Mapping[str, str], expected: str, order: tuple[str, ...]) -> None:
        self.branches = branches  # JSON kind of the value -> branch type
        self.expected = expected  # the branches, readably, for the error
        self.order = order  # the branch types as declared


_Node: TypeAlias = _Scalar | _Enum | _Array | _Object | _Alternate


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _shown(path: str) -> str:
    return path or "arguments"


def _type_error(path: str, expected: str) -> ArgumentError:
    return ArgumentError(f"Invalid parameter type for '{_shown(path)}', expected: {expected}")


def _too_deep(path: str) -> ArgumentError:
    return ArgumentError(f"Parameter '{_shown(path)}' is nested too deeply")


def _kind(value: object) -> str:
    """The JSON type of ``value``, as alternates dispatch on it."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return "unknown"


def _text(entry: Mapping[str, object], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str):
        raise ValueError(f"schema entry {entry.get('name')!r} has no string {key!r}")
    return value


def _dicts(entry: Mapping[str, object], key: str) -> list[Mapping[str, object]]:
    value = entry.get(key, [])
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"schema entry {entry.get('name')!r} has a bad {key!r}")
    return [v for v in value if isinstance(v, Mapping)]


def _scalar(name: str, json: str) -> _Scalar:
    if name in _INT_RANGES:
        low, high = _INT_RANGES[name]
        return _Scalar(name, json, low, high, sized=True)
    if json == "int":
        return _Scalar(name, json, *_MASKED_INT)
    return _Scalar(name, json)


class Schema:
    """An introspected schema, indexed for checking commands' arguments."""

    def __init__(self, entries: Sequence[Mapping[str, object]]) -> None:
        self._entries: dict[str, Mapping[str, object]] = {str(e["name"]): e for e in entries}
        self._nodes: dict[str, _Node] = {}
        self._unions: dict[tuple[str, ...], _Layout] = {}
        self._everything: dict[str, Mapping[str, str]] = {}

    # ---- looking things up

    def entry(self, name: str) -> Mapping[str, object] | None:
        """The SchemaInfo entry called ``name`` (type, command or event)."""
        return self._entries.get(name)

    def command(self, name: str) -> Mapping[str, object] | None:
        """The command's SchemaInfo, or None if the schema has no such command."""
        entry = self._entries.get(name)
        if entry is None or entry.get("meta-type") != "command":
            return None
        return entry

    def has_command(self, name: str) -> bool:
        return self.command(name) is not None

    def arg_type(self, command: str) -> str | None:
        """The name of the command's argument type (None: no such command)."""
        entry = self.command(command)
        if entry is None:
            return None
        arg = entry.get("arg-type")
        return arg if isinstance(arg, str) else None

    def enum_values(self, type_name: str) -> tuple[str, ...] | None:
        """The values an enum type accepts, or None if it is not an enum."""
        node = self._find(type_name)
        return node.values if isinstance(node, _Enum) else None

    def members(self, type_name: str) -> tuple[Member, ...] | None:
        """An object type's own members (a flat union's base), or None."""
        node = self._find(type_name)
        return node.own.members if isinstance(node, _Object) else None

    def variant_members(self, type_name: str, tag_value: str) -> tuple[Member, ...] | None:
        """A flat union's members when its tag is ``tag_value``: base, then variant.

        None if the type is not a flat union or its tag does not take the
        value; just the base members for a tag value that has no variant.
        """
        node = self._find(type_name)
        if not isinstance(node, _Object) or node.tag is None:
            return None
        tag_type = node.own.types.get(node.tag)
        values = self.enum_values(tag_type) if tag_type is not None else None
        if tag_value not in node.variants and (values is None or tag_value not in values):
            return None
        return self._layout_for(type_name, node, {node.tag: tag_value}).members

    def member_type(self, type_name: str, path: Sequence[str], value: object = None) -> str | None:
        """The type reached by following member names ``path`` from ``type_name``.

        A flat union's members are those of the variant its tag picks in
        ``value`` (the arguments so far, if given), else its base's and every
        variant's (the first variant declaring a name wins).  A digit string
        steps into an array's element; an alternate is entered through its
        object (or, for a digit, array) branch.
        """
        current = type_name
        for step in path:
            node = self._find(current)
            if isinstance(node, _Alternate):
                branch = node.branches.get("array" if step.isdigit() else "object")
                if branch is None:
                    return None
                current, node = branch, self._find(branch)
            found: str | None = None
            if isinstance(node, _Array) and step.isdigit():
                found = node.element
                items = _as_list(value)
                value = items[int(step)] if items is not None and int(step) < len(items) else None
            elif isinstance(node, _Object):
                if isinstance(value, Mapping) and node.tag is not None:
                    found = self._layout_for(current, node, value).types.get(step)
                if found is None:
                    found = self._all_members(current, node).get(step)
                value = value.get(step) if isinstance(value, Mapping) else None
            if found is None:
                return None
            current = found
        return current

    # ---- checking

    def check_command(self, command: str, arguments: Mapping[str, object]) -> dict[str, object]:
        """``arguments`` as a plain dict if they fit the command, else ArgumentError.

        Values are not converted: QEMU's JSON parser and ours agree on them.
        """
        entry = self.command(command)
        if entry is None:
            raise CommandNotFoundError(f"The command {command} has not been found")
        if not isinstance(arguments, Mapping):
            raise ArgumentError("QMP input member 'arguments' must be an object")
        arg = entry.get("arg-type")
        if isinstance(arg, str):
            self._check(arg, arguments, "", 0)
        else:
            for key in arguments:
                raise ArgumentError(f"Parameter '{key}' is unexpected")
        return dict(arguments)

    def check(self, type_name: str, value: object, path: str = "") -> object:
        """``value`` unchanged if it is a ``type_name``, else ArgumentError.

        ``path`` is the value's name in the messages (members joined with
        '.', list items as ``name[0]``).
        """
        self._check(type_name, value, path, 0)
        return value

    def _check(self, type_name: str, value: object, path: str, depth: int) -> None:
        node = self._nodes.get(type_name) or self._node(type_name)
        if isinstance(node, _Object):
            if not isinstance(value, Mapping):
                raise _type_error(path, "object")
            if depth >= MAX_DEPTH:
                raise _too_deep(path)
            depth += 1
            layout = node.own if node.tag is None else self._layout_for(type_name, node, value)
            for member in layout.members:
                item = value.get(member.name, _MISSING)
                if item is not _MISSING:
                    self._check(member.type, item, _join(path, member.name), depth)
                elif not member.optional:
                    raise ArgumentError(f"Parameter '{_join(path, member.name)}' is missing")
            names = layout.names
            for key in value:
                if key not in names:
                    raise ArgumentError(f"Parameter '{_join(path, key)}' is unexpected")
        elif isinstance(node, _Scalar):
            _check_scalar(node, value, path)
        elif isinstance(node, _Enum):
            if not isinstance(value, str):
                raise _type_error(path, "string")
            if value not in node.allowed:
                raise ArgumentError(f"Parameter '{_shown(path)}' does not accept value '{value}'")
        elif isinstance(node, _Array):
            if not isinstance(value, list | tuple):
                raise _type_error(path, "array")
            if depth >= MAX_DEPTH:
                raise _too_deep(path)
            for index, item in enumerate(value):
                self._check(node.element, item, f"{path}[{index}]", depth + 1)
        else:
            branch = node.branches.get(_kind(value))
            if branch is None:
                raise _type_error(path, node.expected)
            self._check(branch, value, path, depth)

    # ---- keyval typing

    def from_keyval(self, type_name: str, value: object, path: str = "") -> object:
        """``value`` (parsed ``key=value`` text: nested dicts of strings) typed.

        What QEMU's keyval input visitor would make of each string: bools
        from on/off/yes/no/true/false/y/n, integers in C's base 0 (decimal,
        0x hex, leading-0 octal), 'size' with qemu_strtosz's suffixes
        (B/K/M/G/T/P/E, powers of 1024, fractions like 1.5G), 'number' as
        float, lists from dicts keyed "0", "1", ... (or from lists), flat
        unions by their tag.  An alternate takes a dict into its object
        branch (its array branch if the keys are "0", "1", ...); a string
        goes to the first branch, in declaration order, that reads it (an
        enum holding it, or a bool/integer/number branch that parses it),
        else stays a string.  Since introspection reports 'size' as 'int',
        'int' also takes size suffixes.

        Text that fits nowhere stays a string and unknown keys stay as they
        are, so that ``check`` then refuses them in QEMU's words.  Never
        raises ArgumentError; ``path`` is accepted for symmetry with
        ``check`` and not used.
        """
        del path
        return self._keyval(type_name, value, 0)

    def _keyval(self, type_name: str, value: object, depth: int) -> object:
        node = self._nodes.get(type_name) or self._node(type_name)
        if isinstance(node, _Alternate):
            if isinstance(value, str):
                return self._keyval_text(node, value)
            branch = self._keyval_branch(node, value)
            if branch is None:
                return value
            type_name, node = branch, self._node(branch)
        if isinstance(value, str):
            return _typed(node, value) if isinstance(node, _Scalar) else value
        if depth >= MAX_DEPTH:
            return value
        if isinstance(node, _Object) and isinstance(value, Mapping):
            layout = node.own if node.tag is None else self._layout_for(type_name, node, value)
            types = layout.types
            return {
                key: self._keyval(types[key], item, depth + 1) if key in types else item
                for key, item in value.items()
            }
        if isinstance(node, _Array):
            items = _as_list(value)
            if items is not None:
                return [self._keyval(node.element, item, depth + 1) for item in items]
        return value

    def _keyval_text(self, node: _Alternate, text: str) -> object:
        """``text`` typed by the first branch, in declaration order, that takes it."""
        for branch in node.order:
            target = self._node(branch)
            if isinstance(target, _Enum) and text in target.allowed:
                return text
            if isinstance(target, _Scalar) and target.json != "string":
                typed = _typed(target, text)
                if typed is not text:
                    return typed
        return text

    def _keyval_branch(self, node: _Alternate, value: object) -> str | None:
        """The branch a dict or list goes to (a dict keyed "0", "1"... may be a list)."""
        if isinstance(value, list | tuple):
            return node.branches.get("array")
        if isinstance(value, Mapping):
            if "array" in node.branches and (
                "object" not in node.branches or _as_list(value) is not None
            ):
                return node.branches["array"]
            return node.branches.get("object")
        return None

    # ---- compiling types

    def _find(self, name: str) -> _Node | None:
        try:
            return self._node(name)
        except ValueError:
            return None

    def _node(self, name: str) -> _Node:
        node = self._nodes.get(name)
        if node is None:
            node = self._compile(name)
            self._nodes[name] = node
        return node

    def _compile(self, name: str) -> _Node:
        entry = self._entries.get(name)
        if entry is None:
            if name in BUILTINS:
                return _scalar(name, BUILTINS[name])
            if len(name) > 2 and name[0] == "[" and name[-1] == "]":
                return _Array(name[1:-1])
            raise ValueError(f"type {name!r} is not in the schema")
        meta = entry.get("meta-type")
        if meta == "builtin":
            return _scalar(name, _text(entry, "json-type"))
        if meta == "enum":
            raw = entry.get("values")
            if isinstance(raw, (list, tuple)):
                values = tuple(str(v) for v in raw)
            else:
                values = tuple(_text(m, "name") for m in _dicts(entry, "members"))
            return _Enum(values)
        if meta == "array":
            return _Array(_text(entry, "element-type"))
        if meta == "object":
            members = [
                Member(_text(m, "name"), _text(m, "type"), "default" in m)
                for m in _dicts(entry, "members")
            ]
            tag = entry.get("tag")
            variants = {_text(v, "case"): _text(v, "type") for v in _dicts(entry, "variants")}
            return _Object(_Layout(members), tag if isinstance(tag, str) else None, variants)
        if meta == "alternate":
            return self._alternate([_text(m, "type") for m in _dicts(entry, "members")])
        raise ValueError(f"{name!r} is a {meta}, not a type")

    def _alternate(self, branch_types: Sequence[str]) -> _Alternate:
        branches: dict[str, str] = {}
        readable: list[str] = []
        for branch in branch_types:
            node = self._node(branch)
            kinds: tuple[str, ...]
            if isinstance(node, _Scalar):
                kinds = {
                    "string": ("string",),
                    "int": ("number",),
                    "number": ("number",),
                    "boolean": ("boolean",),
                    "null": ("null",),
                }.get(node.json, ("string", "number", "boolean", "null", "object", "array"))
                text = _READABLE.get(node.json, "value")
            elif isinstance(node, _Enum):
                kinds, text = ("string",), "string"
            elif isinstance(node, _Array):
                kinds, text = ("array",), "array"
            elif isinstance(node, _Object):
                kinds, text = ("object",), "object"
            else:
                kinds, text = tuple(node.branches), node.expected
            for kind in kinds:
                branches.setdefault(kind, branch)
            if text not in readable:
                readable.append(text)
        expected = " or ".join(readable)
        if len(readable) > 2:
            expected = ", ".join(readable[:-1]) + " or " + readable[-1]
        return _Alternate(branches, expected, tuple(branch_types))

    def _layout_for(self, type_name: str, node: _Object, value: Mapping[str, object]) -> _Layout:
        """A flat union's layout for ``value``: base members, then its variant's."""
        key: tuple[str, ...] = (type_name,)
        chain = [node]
        current = node
        while current.tag is not None:
            case = value.get(current.tag)
            if not isinstance(case, str):
                break
            variant = current.variants.get(case)
            if variant is None:
                break
            found = self._node(variant)
            if not isinstance(found, _Object):
                raise ValueError(f"variant {variant!r} of {type_name!r} is not an object")
            key += (case,)
            chain.append(found)
            current = found
        if len(chain) == 1:
            return node.own
        layout = self._unions.get(key)
        if layout is None:
            layout = _Layout([m for n in chain for m in n.own.members])
            self._unions[key] = layout
        return layout

    def _all_members(self, type_name: str, node: _Object) -> Mapping[str, str]:
        """Every member name an object may have, in any variant, and its type."""
        found = self._everything.get(type_name)
        if found is None:
            types: dict[str, str] = {}
            pending, seen = [node], {type_name}
            while pending:
                current = pending.pop(0)
                for member in current.own.members:
                    types.setdefault(member.name, member.type)
                for variant in current.variants.values():
                    sub = self._find(variant)
                    if isinstance(sub, _Object) and variant not in seen:
                        seen.add(variant)
                        pending.append(sub)
            found = self._everything[type_name] = types
        return found


def _check_scalar(node: _Scalar, value: object, path: str) -> None:
    json = node.json
    if json == "string":
        if not isinstance(value, str):
            raise _type_error(path, "string")
    elif json == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, "integer")
        if not node.low <= value <= node.high:
            if node.sized:
                raise ArgumentError(f"Parameter '{_shown(path)}' expects {node.name}")
            raise _type_error(path, "integer")
    elif json == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(path, "number")
    elif json == "boolean":
        if not isinstance(value, bool):
            raise _type_error(path, "boolean")
    elif json == "null" and value is not None:
        raise _type_error(path, "null")


def _as_list(value: object) -> list[object] | None:
    """``value`` as a list: a list, or keyval's dict keyed "0", "1", ..."""
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, Mapping) and value:
        try:
            return [value[str(index)] for index in range(len(value))]
        except KeyError:
            return None
    return None


# ---- keyval scalars (QEMU util/cutils.c, qapi/qobject-input-visitor.c)

_INT_TEXT = r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z"
_SIZE_TEXT = r"(?:(0[xX][0-9a-fA-F]+)|([0-9]+)(?:\.([0-9]*))?([bBkKmMgGtTpPeE])?)\Z"
_FLOAT_TEXT = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z"
_HEX_FLOAT_TEXT = r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?\Z"
_SUFFIXES: Final = {s: 1024**i for i, s in enumerate("BKMGTPE")}
_U64: Final = 1 << 64


def _typed(node: _Scalar, text: str) -> object:
    """``text`` as the builtin ``node`` says, or ``text`` itself if it does not fit."""
    json = node.json
    if json == "boolean":
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        return text
    typed: int | float | None = None
    if json == "int":
        if node.name == "size":
            typed = parse_size(text)
        else:
            typed = parse_int(text)
            if typed is None and not node.sized:
                typed = parse_size(text)
    elif json == "number":
        typed = parse_number(text)
    return text if typed is None else typed


def parse_int(text: str) -> int | None:
    """An integer as qemu_strtoi64(text, NULL, 0, ...) reads it, or None."""
    match = re.match(_INT_TEXT, text)
    if match is None:
        return None
    sign, digits = match.groups()
    if digits[:2] in ("0x", "0X"):
        number = int(digits, 16)
    elif digits[0] == "0":
        number = int(digits, 8)
    else:
        number = int(digits)
    return -number if sign == "-" else number


def parse_size(text: str) -> int | None:
    """A byte count as qemu_strtosz reads it ("1.5G", "64k", "0x1000"), or None."""
    match = re.match(_SIZE_TEXT, text)
    if match is None:
        return None
    hexadecimal, whole, fraction, suffix = match.groups()
    if hexadecimal is not None:
        result = int(hexadecimal, 16)
        return result if result < _U64 else None
    unit = _SUFFIXES[suffix.upper()] if suffix else 1
    fixed = 0  # the fraction in 0.64 fixed point, as QEMU computes it
    if fraction:
        fixed = min(int(float("0." + fraction) * 2.0**64), _U64 - 1)
    if unit == 1:
        if fixed:
            return None
        result = int(whole)
    else:
        scaled = fixed * unit
        result = int(whole) * unit + (scaled >> 64) + ((scaled & (_U64 - 1)) >> 63)
    return result if result < _U64 else None


def parse_number(text: str) -> float | None:
    """A finite double as qemu_strtod_finite reads it, or None."""
    if re.match(_FLOAT_TEXT, text):
        number = float(text)
    elif re.match(_HEX_FLOAT_TEXT, text):
        number = float.fromhex(text)
    else:
        return None
    return number if math.isfinite(number) else None


# ---- qmpvm's own commands, in SchemaInfo form


@dataclass(frozen=True, slots=True, init=False)
class Enum:
    """An enum type: ``Enum("inet", "unix")``."""

    values: tuple[str, ...]

    def __init__(self, *values: str) -> None:
        object.__setattr__(self, "values", values)


@dataclass(frozen=True, slots=True, init=False)
class Alternate:
    """An alternate: a value of any one of the branches, told apart by JSON type."""

    branches: tuple[TypeDecl, ...]

    def __init__(self, *branches: TypeDecl) -> None:
        object.__setattr__(self, "branches", branches)


@dataclass(frozen=True, slots=True)
class FlatUnion:
    """An object whose ``tag`` member picks further members (QAPI's flat union).

    The tag's enum is made from the variants' keys unless ``base`` declares
    the tag member itself.
    """

    tag: str
    variants: Mapping[str, Mapping[str, TypeDecl]]
    base: Mapping[str, TypeDecl] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CommandDecl:
    """A command: its arguments and what it returns (None: an empty object)."""

    args: Mapping[str, TypeDecl] | FlatUnion | str = field(default_factory=dict)
    ret: TypeDecl | None = None
    features: tuple[str, ...] = ()


TypeDecl: TypeAlias = "str | Enum | Alternate | FlatUnion | Mapping[str, TypeDecl] | list[TypeDecl]"
"""A type in a declaration: a builtin name ('str', 'int', 'size', ...) or a
name from ``types``; '[T]' or a one-item list [T] for an array; a dict of
members for an object; an Enum, Alternate or FlatUnion."""


class _Declarer:
    """Turns declarations into SchemaInfo entries, each type once."""

    def __init__(self, types: Mapping[str, TypeDecl]) -> None:
        self.types = types
        self.entries: list[dict[str, object]] = []
        self.done: set[str] = set()
        self.counter = 0
        self.empty: str | None = None

    def fresh(self) -> str:
        while str(self.counter) in self.types:
            self.counter += 1
        self.counter += 1
        return str(self.counter - 1)

    def ref(self, decl: TypeDecl, name: str | None = None) -> str:
        if isinstance(decl, str):
            return self.named(decl)
        if isinstance(decl, list):
            if len(decl) != 1:
                raise ValueError(f"an array is declared as [T], not {decl!r}")
            return self.array(self.ref(decl[0]))
        if isinstance(decl, Mapping) and not decl and name is None:
            if self.empty is None:
                self.empty = self.fresh()
                self.entries.append({"name": self.empty, "members": [], "meta-type": "object"})
            return self.empty
        name = name if name is not None else self.fresh()
        self.done.add(name)
        entry: dict[str, object] = {"name": name}
        if isinstance(decl, Enum):
            entry["meta-type"] = "enum"
            entry["members"] = [{"name": v} for v in decl.values]
            entry["values"] = list(decl.values)
        elif isinstance(decl, Alternate):
            entry["meta-type"] = "alternate"
            entry["members"] = [{"type": self.ref(b)} for b in decl.branches]
        elif isinstance(decl, FlatUnion):
            base = dict(decl.base)
            if decl.tag not in base:
                base = {decl.tag: Enum(*decl.variants), **base}
            entry["meta-type"] = "object"
            entry["members"] = self.members(base)
            entry["tag"] = decl.tag
            entry["variants"] = [
                {"case": case, "type": self.ref(members)} for case, members in decl.variants.items()
            ]
        else:
            entry["meta-type"] = "object"
            entry["members"] = self.members(decl)
        self.entries.append(entry)
        return name

    def members(self, decl: Mapping[str, TypeDecl]) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for key, member in decl.items():
            optional = key.startswith("*")
            name = key[1:] if optional else key
            if not name:
                raise ValueError(f"member {key!r} has no name")
            item: dict[str, object] = {"name": name}
            if optional:
                item["default"] = None
            item["type"] = self.ref(member)
            out.append(item)
        return out

    def named(self, name: str) -> str:
        if name.startswith("[") and name.endswith("]"):
            return self.array(self.named(name[1:-1]))
        if name in self.types:
            decl = self.types[name]
            if isinstance(decl, str):
                return self.named(decl)
            if name not in self.done:
                self.ref(decl, name)
            return name
        if name in BUILTINS:
            if name not in self.done:
                self.done.add(name)
                self.entries.append(
                    {"name": name, "json-type": BUILTINS[name], "meta-type": "builtin"}
                )
            return name
        raise ValueError(f"type {name!r} is neither a builtin nor declared")

    def array(self, element: str) -> str:
        name = f"[{element}]"
        if name not in self.done:
            self.done.add(name)
            self.entries.append({"name": name, "element-type": element, "meta-type": "array"})
        return name


def declare(
    commands: Mapping[str, CommandDecl], types: Mapping[str, TypeDecl] | None = None
) -> list[dict[str, object]]:
    """SchemaInfo entries for qmpvm's own commands, ready for ``merge``.

    Types are written compactly (QAPI's own conventions)::

        declare({
            "vm-set-memory": CommandDecl(
                args={"size": "size", "*slots": "int", "*tags": "[str]",
                      "policy": Enum("bind", "interleave"),
                      "source": {"path": "str", "*readonly": "bool"}},
                ret={"size": "size"},
            ),
        })

    A member name with a leading '*' is optional.  A type is a builtin name
    (str, int, bool, any, null, number, size, int8 .. uint64), a name
    declared in ``types`` (which may refer to one another, recursively),
    '[T]' or [T] for an array, a dict of members for an object, or an
    ``Enum``, ``Alternate`` or ``FlatUnion``.  ``args`` may also be a
    FlatUnion or a name from ``types``.  Anonymous types get masked numbers
    as names, as QEMU's do; ``merge`` renumbers them anyway.
    """
    declarer = _Declarer(types or {})
    for name, command in commands.items():
        entry: dict[str, object] = {"name": name, "meta-type": "command"}
        entry["arg-type"] = declarer.ref(command.args)
        entry["ret-type"] = declarer.ref({} if command.ret is None else command.ret)
        if command.features:
            entry["features"] = list(command.features)
        declarer.entries.append(entry)
    return declarer.entries


_ENTITIES: Final = frozenset({"command", "event"})


def merge(
    engine: Sequence[Mapping[str, object]], own: Sequence[Mapping[str, object]]
) -> list[dict[str, object]]:
    """The engine's entries, then qmpvm's, as one schema.

    qmpvm's type names are renumbered above the engine's highest masked
    number and every reference rewritten; builtins and builtin arrays the
    engine already has are not repeated; a qmpvm command or event replaces
    the engine's of the same name.
    """
    replaced = {str(e["name"]) for e in own if e.get("meta-type") in _ENTITIES}
    out = [
        dict(e)
        for e in engine
        if not (e.get("meta-type") in _ENTITIES and str(e["name"]) in replaced)
    ]
    present = {str(e["name"]) for e in out}
    number = 1 + max((int(n) for n in (str(e["name"]) for e in engine) if n.isdigit()), default=-1)
    renamed: dict[str, str] = {}
    for e in own:
        if e.get("meta-type") not in {"builtin", "array", *_ENTITIES}:
            renamed[str(e["name"])] = str(number)
            number += 1

    def ref(name: object) -> str:
        text = str(name)
        if text in renamed:
            return renamed[text]
        if len(text) > 2 and text[0] == "[" and text[-1] == "]":
            return f"[{ref(text[1:-1])}]"
        return text

    for e in own:
        meta = e.get("meta-type")
        entry = dict(e)
        entry["name"] = ref(e["name"]) if meta not in _ENTITIES else str(e["name"])
        if meta == "array":
            entry["element-type"] = ref(e["element-type"])
        elif meta in _ENTITIES:
            for key in ("arg-type", "ret-type"):
                if key in e:
                    entry[key] = ref(e[key])
        elif meta in ("object", "alternate"):
            entry["members"] = [{**m, "type": ref(m["type"])} for m in _dicts(e, "members")]
            if "variants" in e:
                entry["variants"] = [{**v, "type": ref(v["type"])} for v in _dicts(e, "variants")]
        if meta in ("builtin", "array") and entry["name"] in present:
            continue
        present.add(str(entry["name"]))
        out.append(entry)
    return out
