"""QEMU's ``key=value,...`` option syntax, typed by our argument schema.

``parse`` gives the nested dict (``file.filename=x`` -> {"file":
{"filename": "x"}}; ``,,`` is a literal comma; the first item may omit its
key).  ``coerce`` then turns strings into the bools and integers the schema
expects, which is what QEMU's keyval input visitor does.
"""

from __future__ import annotations

import dataclasses
import enum

from qmpvm.errors import ArgumentError

TRUE = frozenset({"on", "yes", "true", "y"})
FALSE = frozenset({"off", "no", "false", "n"})


def split(text: str) -> list[str]:
    items, current, i = [], [], 0
    while i < len(text):
        char = text[i]
        if char == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    items.append("".join(current))
    return items


def parse(text: str, implied_key: str | None = None) -> dict[str, object]:
    tree: dict[str, object] = {}
    for index, item in enumerate(split(text)):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            if index == 0 and implied_key is not None:
                key, value = implied_key, item
            else:
                raise ArgumentError(f"Expected '=' after parameter '{item}'")
        node = tree
        *parents, leaf = key.split(".")
        for parent in parents:
            child = node.setdefault(parent, {})
            if not isinstance(child, dict):
                raise ArgumentError(f"Parameter '{key}' conflicts with '{parent}'")
            node = child
        node[leaf] = value
    return tree


def coerce(spec: object, value: object) -> object:
    """Strings in ``value`` made into what ``spec`` declares, where they can be."""
    from qmpvm.schema import Ref, Union, field_specs

    if isinstance(value, str):
        return _scalar(spec, value)
    if not isinstance(value, dict):
        return value
    if isinstance(spec, Ref):
        spec = spec.spec
    if isinstance(spec, Union):
        tag = value.get(spec.tag)
        if isinstance(tag, str) and tag in spec.variants:
            spec = spec.variants[tag]
        else:
            return value
    if not (isinstance(spec, type) and dataclasses.is_dataclass(spec)):
        return value
    fields = field_specs(spec)
    return {k: coerce(fields[k], v) if k in fields else v for k, v in value.items()}


def _scalar(spec: object, text: str) -> object:
    spec = _unwrap(spec)
    if spec is bool:
        if text in TRUE:
            return True
        if text in FALSE:
            return False
    elif spec is int:
        try:
            return int(text, 0)
        except ValueError:
            return text
    return text


def _unwrap(spec: object) -> object:
    from qmpvm.schema import strip_optional

    spec = strip_optional(spec)
    if isinstance(spec, type) and issubclass(spec, enum.Enum):
        return str
    return spec


def coerce_property(qemu_type: str, value: object) -> object:
    """A device property given as text, typed by the engine's property type."""
    if not isinstance(value, str):
        return value
    if qemu_type == "bool":
        if value in TRUE:
            return True
        if value in FALSE:
            return False
    elif qemu_type.startswith(("int", "uint", "size")):
        try:
            return int(value, 0)
        except ValueError:
            return value
    return value
