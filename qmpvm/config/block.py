"""Block nodes (``blockdev-add``): QEMU 7.2's BlockdevOptions, a subset."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from qmpvm.config.resource import Kind, Resource
from qmpvm.schema import Ref, Union, to_json


class OnOffAuto(StrEnum):
    ON = "on"
    OFF = "off"
    AUTO = "auto"


class DiscardAction(StrEnum):
    IGNORE = "ignore"
    UNMAP = "unmap"


class DetectZeroes(StrEnum):
    OFF = "off"
    ON = "on"
    UNMAP = "unmap"


class Aio(StrEnum):
    THREADS = "threads"
    NATIVE = "native"
    IO_URING = "io_uring"


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheOptions:
    direct: bool | None = None
    no_flush: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockdevBase:
    driver: str
    node_name: str | None = None
    discard: DiscardAction | None = None
    cache: CacheOptions | None = None
    read_only: bool | None = None
    auto_read_only: bool | None = None
    force_share: bool | None = None
    detect_zeroes: DetectZeroes | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockdevFile(BlockdevBase):
    filename: str
    locking: OnOffAuto | None = None
    aio: Aio | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockdevNull(BlockdevBase):
    size: int | None = None
    read_zeroes: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockdevRaw(BlockdevBase):
    file: Annotated[object, Ref("BlockdevRef", BlockdevOptions)]
    offset: int | None = None
    size: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockdevQcow2(BlockdevBase):
    file: Annotated[object, Ref("BlockdevRef", BlockdevOptions)]
    backing: Annotated[object, Ref("BlockdevRef", BlockdevOptions)] | None = None
    lazy_refcounts: bool | None = None


BlockdevOptions = Union(
    "BlockdevOptions",
    "driver",
    {
        "file": BlockdevFile,
        "host_device": BlockdevFile,
        "null-co": BlockdevNull,
        "raw": BlockdevRaw,
        "qcow2": BlockdevQcow2,
    },
)

CHILD_MEMBERS = ("file", "backing")


def child_refs(args: Mapping[str, object]) -> Iterator[str]:
    """Names of existing nodes that ``args`` (or its inline children) use."""
    for member in CHILD_MEMBERS:
        child = args.get(member)
        if isinstance(child, str):
            yield child
        elif isinstance(child, dict):
            yield from child_refs(child)


FDSET_PREFIX = "/dev/fdset/"


def fdset_ids(args: Mapping[str, object]) -> set[int]:
    """The fdsets (``/dev/fdset/N`` filenames) that ``args`` or its inline children open."""
    found: set[int] = set()
    filename = args.get("filename")
    if isinstance(filename, str) and filename.startswith(FDSET_PREFIX):
        number = filename.removeprefix(FDSET_PREFIX)
        if number.isdigit():
            found.add(int(number))
    for member in CHILD_MEMBERS:
        child = args.get(member)
        if isinstance(child, dict):
            found |= fdset_ids(child)
    return found


def make(args: BlockdevBase, seq: int) -> Resource:
    doc = to_json(args)
    refs = tuple((Kind.BLOCK, name) for name in child_refs(doc))
    return Resource(kind=Kind.BLOCK, key=str(args.node_name), args=doc, refs=refs, seq=seq)


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockdevDel:
    node_name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockResize:
    device: str | None = None
    node_name: str | None = None
    size: int
