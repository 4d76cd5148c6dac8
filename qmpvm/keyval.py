"""QEMU's ``key=value,...`` option syntax, both ways.

``parse`` gives the nested dict (``file.filename=x`` -> {"file":
{"filename": "x"}}; ``,,`` is a literal comma; the first item may omit its
key); ``encode`` writes one.  Typing the text is the engine schema's job
(``qmpvm.qapi.check.Schema.from_keyval``); ``coerce_property`` types a device
property by the engine's property type.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

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


def parse(text: str, implied_key: str | None = None, *, repeats: bool = False) -> dict[str, object]:
    """The nested dict of ``text``; with ``repeats``, a key given again makes a list
    (``cpus=0-3,cpus=8-11``, as QEMU's -numa takes it), else the last one wins."""
    tree: dict[str, object] = {}
    for index, item in enumerate(split(text)):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            if index == 0 and implied_key is not None:
                key, value = implied_key, item
            elif item.startswith("no") and len(item) > 2:  # QemuOpts: 'nowait' is wait=off
                key, value = item[2:], "off"
            else:  # and 'server' is server=on (deprecated in QEMU, still accepted)
                value = "on"
        node = tree
        *parents, leaf = key.split(".")
        for parent in parents:
            child = node.setdefault(parent, {})
            if not isinstance(child, dict):
                raise ArgumentError(f"Parameter '{key}' conflicts with '{parent}'")
            node = child
        old = node.get(leaf)
        if repeats and old is not None:
            node[leaf] = [*old, value] if isinstance(old, list) else [old, value]
        else:
            node[leaf] = value
    return tree


def encode(tree: Mapping[str, object], implied_key: str | None = None) -> str:
    """``parse``'s inverse: ``on``/``off`` for bools, dotted keys for nested
    objects, a list as its key repeated, commas doubled."""
    items: list[str] = []
    implied = tree.get(implied_key) if implied_key is not None else None
    bare = implied is not None and "=" not in _text(implied)  # else it reads as a key
    if bare:
        items.append(_text(implied))
    for key, value in _flatten(tree, ""):
        if not (bare and key == implied_key):
            items.append(f"{key}={_text(value)}")
    return ",".join(items)


def _flatten(tree: Mapping[str, object], prefix: str) -> Iterator[tuple[str, object]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            for item in value:
                yield prefix + key, item
        else:
            yield prefix + key, value


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace(",", ",,")


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
