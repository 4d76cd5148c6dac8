"""One row per resource kind, and the generic code that reads every row.

The engine's schema says what a resource's arguments look like; this table
says what only qmpvm needs to know about them: the commands that create and
delete the kind, the member that names an item, the members that name other
items (so a reference must resolve and a used item cannot be deleted), the
members that carry passed descriptors, the engine option that creates the
kind at start-up, and whether it can be added to a running machine.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from qmpvm.config.resource import Kind, Reference, Resource
from qmpvm.errors import ArgumentError

_ANY_BLOCK = (Kind.BLOCK, Kind.DRIVE)


@dataclass(frozen=True, slots=True, kw_only=True)
class KindSpec:
    kind: Kind
    noun: str  # in messages: "Block node 'x' not found"
    add: str  # the QMP command that creates one
    delete: str  # ... and the one that deletes one
    key: str  # the member that names it
    delete_key: str  # the member of ``delete`` that names it
    option: str  # the engine's command-line option for it
    hot: bool  # can be created and deleted while a machine runs
    references: Mapping[str, tuple[Kind, ...]]  # member -> kinds it may name


KINDS: Mapping[Kind, KindSpec] = {
    spec.kind: spec
    for spec in (
        KindSpec(
            kind=Kind.OBJECT, noun="Object", add="object-add", delete="object-del",
            key="id", delete_key="id", option="-object", hot=True,
            references={
                "chardev": (Kind.CHARDEV,), "netdev": (Kind.NETDEV,),
                "keyid": (Kind.OBJECT,), "passwordid": (Kind.OBJECT,),
            },
        ),
        KindSpec(
            kind=Kind.CHARDEV, noun="Chardev", add="chardev-add", delete="chardev-remove",
            key="id", delete_key="id", option="-chardev", hot=True,
            references={"tls-creds": (Kind.OBJECT,), "chardev": (Kind.CHARDEV,)},
        ),
        KindSpec(
            kind=Kind.BLOCK, noun="Block node", add="blockdev-add", delete="blockdev-del",
            key="node-name", delete_key="node-name", option="-blockdev", hot=True,
            references={
                **dict.fromkeys(
                    ("file", "backing", "data-file", "image", "test", "raw", "log", "target",
                     "children"),
                    (Kind.BLOCK,),
                ),
                **dict.fromkeys(
                    ("key-secret", "password-secret", "tls-creds", "throttle-group",
                     "encrypt.key-secret"),
                    (Kind.OBJECT,),
                ),
            },
        ),
        KindSpec(
            kind=Kind.DRIVE, noun="Drive", add="drive-add", delete="drive-del",
            key="id", delete_key="id", option="-drive", hot=False,
            references={"throttling.group": (Kind.OBJECT,)},
        ),
        KindSpec(
            kind=Kind.NETDEV, noun="Netdev", add="netdev_add", delete="netdev_del",
            key="id", delete_key="id", option="-netdev", hot=True,
            references={"chardev": (Kind.CHARDEV,)},
        ),
        KindSpec(
            kind=Kind.DEVICE, noun="Device", add="device_add", delete="device_del",
            key="id", delete_key="id", option="-device", hot=True,
            references={
                "drive": _ANY_BLOCK, "netdev": (Kind.NETDEV,), "chardev": (Kind.CHARDEV,),
                **dict.fromkeys(
                    ("memdev", "iothread", "rng", "memory-backend", "secret", "tls-creds"),
                    (Kind.OBJECT,),
                ),
            },
        ),
    )
}  # fmt: skip

BY_COMMAND: Mapping[str, KindSpec] = {
    name: spec for spec in KINDS.values() for name in (spec.add, spec.delete)
}


_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z", re.ASCII)
"""QEMU's id_wellformed(): what its command line accepts as an id."""
MAX_NODE_NAME = 31


def make(kind: Kind, args: Mapping[str, object], seq: int) -> Resource:
    """The resource ``args`` create: named, with its references found."""
    spec = KINDS[kind]
    key = args.get(spec.key)
    if key is None and kind is Kind.DEVICE:
        key = f"#{seq}"
    if not isinstance(key, str):
        raise ArgumentError(f"Parameter '{spec.key}' is missing")
    if not key:
        raise ArgumentError(f"Parameter '{spec.key}' must not be empty")
    given = key == args.get(spec.key)  # not a name qmpvm made up
    if given and not _IDENTIFIER.match(key):  # the engine's command line takes no other
        raise ArgumentError(
            f"Parameter '{spec.key}' expects an identifier: letters, digits, '-', '.', '_', "
            f"starting with a letter"
        )
    if kind is Kind.BLOCK and len(key) > MAX_NODE_NAME:
        raise ArgumentError(f"Node name too long: more than {MAX_NODE_NAME} characters")
    refs = tuple(dict.fromkeys(references(kind, args)))
    return Resource(kind=kind, key=key, args=dict(args), refs=refs, seq=seq)


def references(kind: Kind, args: Mapping[str, object]) -> Iterator[Reference]:
    """Every name ``args`` (inline children included) use, with the kinds it may be.

    Iterative: a hostile client may nest block children deeply.
    """
    stack: list[tuple[Kind, Mapping[str, object]]] = [(kind, args)]
    while stack:
        current, document = stack.pop()
        members = KINDS[current].references
        for member, value in _members(document):
            kinds = members.get(member)
            if kinds is None:
                continue
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and item:
                    yield kinds, item
                elif isinstance(item, dict) and Kind.BLOCK in kinds:
                    stack.append((Kind.BLOCK, item))


def _members(args: Mapping[str, object], prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted member name, value) pairs, nested objects flattened (a drive's
    ``throttling.group``); a chardev's backend data counts as its own members."""
    for name, value in args.items():
        yield prefix + name, value
        if isinstance(value, dict) and name not in BLOCK_CHILDREN:
            inner = "" if name in ("backend", "data") else f"{prefix}{name}."
            yield from _members(value, inner)


BLOCK_CHILDREN = frozenset(
    name for name, kinds in KINDS[Kind.BLOCK].references.items() if kinds == (Kind.BLOCK,)
)
"""Members whose object is a block node of its own: ``references`` walks those."""


SETTING_REFERENCES: Mapping[str, tuple[Kind, ...]] = {
    "properties.memory-backend": (Kind.OBJECT,),
    "numa.memdev": (Kind.OBJECT,),
    "tpmdev.chardev": (Kind.CHARDEV,),
    "fsdev.chardev": (Kind.CHARDEV,),
    "serial": (Kind.CHARDEV,),
    "parallel": (Kind.CHARDEV,),
    "debugcon": (Kind.CHARDEV,),
    "monitors.chardev": (Kind.CHARDEV,),
}
"""Machine settings that name resources (``serial`` as ``chardev:ID``)."""


def setting_references(settings: Mapping[str, object]) -> Iterator[Reference]:
    """The resources the machine's settings name: they cannot be deleted under it."""
    for path, kinds in SETTING_REFERENCES.items():
        name, _, member = path.partition(".")
        value = settings.get(name)
        for item in value if isinstance(value, list) else [value]:
            if member:
                target = item.get(member) if isinstance(item, dict) else None
            else:  # a port: 'chardev:ID' or 'none'
                target = item.removeprefix("chardev:") if isinstance(item, str) else None
                target = target if target != item else None
            if isinstance(target, str) and target:
                yield kinds, target
