"""Write gzip-compressed newc cpio archives for the Linux initramfs.

Done in Python so that building a test guest needs no ``cpio`` binary and no
root (device nodes are just header fields), and so the output is
byte-for-byte reproducible: every entry gets a fixed mtime, owner root and
sequential inode numbers, and gzip gets a zero timestamp.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass

__all__ = ["NEWC_MAGIC", "TRAILER", "CpioArchive", "CpioEntry"]

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True, slots=True, kw_only=True)
class CpioEntry:
    """One archive member; ``name`` is relative (no leading slash)."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def _normalize(path: str) -> str:
    """Make member names canonical so duplicates and parents are detectable."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"empty archive path: {path!r}")
    if ".." in parts:
        raise ValueError(f"'..' is not allowed in archive paths: {path!r}")
    return "/".join(parts)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


class CpioArchive:
    """An ordered set of entries; parent directories are added implicitly.

    The kernel's initramfs unpacker does not create missing parent
    directories, so each entry's parents must precede it in the archive.
    """

    def __init__(self) -> None:
        self._entries: dict[str, CpioEntry] = {}

    @property
    def entries(self) -> tuple[CpioEntry, ...]:
        return tuple(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _normalize(name) in self._entries

    def _add(self, entry: CpioEntry) -> None:
        existing = self._entries.get(entry.name)
        if existing is not None:
            if stat.S_ISDIR(existing.mode) and stat.S_ISDIR(entry.mode):
                return
            raise ValueError(f"duplicate archive entry: {entry.name}")
        self._ensure_parents(entry.name)
        self._entries[entry.name] = entry

    def _ensure_parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            existing = self._entries.get(parent)
            if existing is None:
                self._entries[parent] = CpioEntry(name=parent, mode=stat.S_IFDIR | 0o755)
            elif not stat.S_ISDIR(existing.mode):
                raise ValueError(f"{parent} is not a directory (needed for {name})")

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._add(CpioEntry(name=_normalize(path), mode=stat.S_IFDIR | (mode & 0o7777)))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(CpioEntry(name=_normalize(path), mode=stat.S_IFREG | (mode & 0o7777), data=data))

    def add_symlink(self, path: str, target: str) -> None:
        self._add(CpioEntry(name=_normalize(path), mode=stat.S_IFLNK | 0o777, data=target.encode()))

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(
            CpioEntry(
                name=_normalize(path),
                mode=stat.S_IFCHR | (mode & 0o7777),
                rdev_major=major,
                rdev_minor=minor,
            )
        )

    def to_bytes(self) -> bytes:
        """Serialize as uncompressed newc, trailer included."""
        chunks: list[bytes] = []
        for ino, entry in enumerate(self._entries.values(), start=1):
            nlink = 2 if stat.S_ISDIR(entry.mode) else 1
            chunks.append(_member(entry, ino=ino, nlink=nlink))
        chunks.append(_member(CpioEntry(name=TRAILER, mode=0), ino=0, nlink=1))
        return b"".join(chunks)

    def to_gzip(self, compresslevel: int = 9) -> bytes:
        """Serialize and gzip; the kernel's CONFIG_RD_GZIP is near-universal."""
        return gzip.compress(self.to_bytes(), compresslevel=compresslevel, mtime=0)


def _member(entry: CpioEntry, *, ino: int, nlink: int) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        0,  # mtime
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        len(name),
        0,  # check (only used by the crc format)
    )
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"cpio field out of range for {entry.name}: {value}")
    header = NEWC_MAGIC + b"".join(b"%08X" % v for v in fields)
    head = header + name
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))
