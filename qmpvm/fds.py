"""File descriptors clients passed with SCM_RIGHTS, and who owns them.

A descriptor belongs to the connection that passed it and is closed when
that connection ends, unless the configuration refers to it by then (a tap
netdev's ``fd``, a ``/dev/fdset/N`` filename): then it belongs to the
machine and is closed when the referring item is deleted.  A connection
sees, replaces and closes only its own descriptors, plus (to see) those the
configuration uses: another client's names and fdsets are not there for it.  Descriptors do
not survive a restart of qmpvm; a stored item that names one asks for it
again at machine-init.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Collection
from dataclasses import dataclass

from qmpvm.errors import ConfigError

log = logging.getLogger(__name__)

MACHINE = 0
"""Owner id of descriptors the configuration holds on to."""
RESERVED_FDSETS = 1_000_000_000
"""fdset ids from here on are qmpvm's own, for the files it opens for the engine."""


@dataclass(slots=True, kw_only=True)
class PassedFd:
    fd: int
    owner: int
    opaque: str | None = None

    def seen_by(self, owner: int) -> bool:
        """The connection ``owner`` passed it, or the configuration holds it."""
        return self.owner in (owner, MACHINE)


class FdRegistry:
    def __init__(self) -> None:
        self.named: dict[str, PassedFd] = {}
        self.fdsets: dict[int, list[PassedFd]] = {}

    def open(self, path: str, flags: int, mode: int = 0o666) -> int:
        """``open_nonblocking``, and for ``/dev/fdset/N`` what QEMU's
        ``qemu_open`` does: a duplicate of a descriptor in set N with the same
        access mode, given the status flags asked for (``O_APPEND``...)."""
        number = path.removeprefix("/dev/fdset/")
        if number == path:
            return open_nonblocking(path, flags, mode)
        entries = self.fdsets.get(int(number)) if number.isdigit() else None
        if not entries:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        for entry in entries:
            if _access(entry.fd) == flags & os.O_ACCMODE:
                fd = os.dup(entry.fd)
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & (os.O_APPEND | os.O_NONBLOCK))
                if flags & os.O_TRUNC and stat.S_ISREG(os.fstat(fd).st_mode):
                    os.ftruncate(fd, 0)
                return fd
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    def getfd(self, name: str, fd: int, owner: int) -> None:
        old = self.named.get(name)
        if old is not None and old.owner != owner:
            _close(fd)
            raise ConfigError(f"File descriptor named '{name}' belongs to another connection")
        if old is not None:
            _close(old.fd)
        self.named[name] = PassedFd(fd=fd, owner=owner)

    def closefd(self, name: str, in_use: Collection[str], owner: int) -> None:
        entry = self.named.get(name)
        if entry is None or not entry.seen_by(owner):
            raise ConfigError(f"File descriptor named '{name}' not found")  # QEMU: GenericError
        if name in in_use:
            raise ConfigError(f"File descriptor named '{name}' is in use by the configuration")
        _close(self.named.pop(name).fd)

    def add_fd(self, fd: int, owner: int, fdset_id: int | None, opaque: str | None) -> int:
        if fdset_id is None:
            fdset_id = max(self.fdsets, default=-1) + 1
        if fdset_id >= RESERVED_FDSETS:
            _close(fd)
            raise ConfigError(
                f"fdset-id {fdset_id} is reserved: qmpvm's own start at {RESERVED_FDSETS}"
            )
        elif not all(e.seen_by(owner) for e in self.fdsets.get(fdset_id, ())):
            _close(fd)
            raise ConfigError(f"fdset {fdset_id} belongs to another connection")
        self.fdsets.setdefault(fdset_id, []).append(PassedFd(fd=fd, owner=owner, opaque=opaque))
        return fdset_id

    def remove_fd(self, fdset_id: int, fd: int | None, in_use: Collection[int], owner: int) -> None:
        entries = [e for e in self.fdsets.get(fdset_id, ()) if e.seen_by(owner)]
        if not entries or (fd is not None and all(e.fd != fd for e in entries)):
            what = f"fdset-id={fdset_id}" + (f", fd={fd}" if fd is not None else "")
            raise ConfigError(f"File descriptor named '{what}' not found")
        if fdset_id in in_use:
            raise ConfigError(f"fdset {fdset_id} is in use by the configuration")
        for entry in [e for e in entries if fd is None or e.fd == fd]:
            self.fdsets[fdset_id].remove(entry)
            _close(entry.fd)
        if not self.fdsets[fdset_id]:
            del self.fdsets[fdset_id]

    def query_fdsets(self, owner: int, in_use: Collection[int]) -> list[dict[str, object]]:
        """The fdsets ``owner`` passed, and those the configuration uses."""
        out: list[dict[str, object]] = []
        for fdset_id, entries in sorted(self.fdsets.items()):
            fds: list[dict[str, object]] = []
            for e in entries:
                if not e.seen_by(owner) and fdset_id not in in_use:
                    continue
                item: dict[str, object] = {"fd": e.fd}
                if e.opaque is not None:
                    item["opaque"] = e.opaque
                fds.append(item)
            if fds:
                out.append({"fdset-id": fdset_id, "fds": fds})
        return out

    def release_owner(
        self, owner: int, names_in_use: Collection[str], sets_in_use: Collection[int]
    ) -> int:
        """A connection ended: close what it owned, hand what is in use to the machine."""
        closed = 0
        for name, entry in list(self.named.items()):
            if entry.owner != owner:
                continue
            if name in names_in_use:
                entry.owner = MACHINE
            else:
                _close(self.named.pop(name).fd)
                closed += 1
        for fdset_id, entries in list(self.fdsets.items()):
            for entry in [e for e in entries if e.owner == owner]:
                if fdset_id in sets_in_use:
                    entry.owner = MACHINE
                else:
                    entries.remove(entry)
                    _close(entry.fd)
                    closed += 1
            if not entries:
                del self.fdsets[fdset_id]
        return closed

    def collect_unused(self, names_in_use: Collection[str], sets_in_use: Collection[int]) -> None:
        """Close machine-owned descriptors the configuration no longer names."""
        self.release_owner(MACHINE, names_in_use, sets_in_use)

    def close_all(self) -> None:
        for entry in self.named.values():
            _close(entry.fd)
        for entries in self.fdsets.values():
            for entry in entries:
                _close(entry.fd)
        self.named.clear()
        self.fdsets.clear()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as err:
        log.warning("closing fd %d: %s", fd, err)


def open_nonblocking(
    path: str, flags: int, mode: int = 0o666, *, kinds: tuple[str, ...] = ()
) -> int:
    """``os.open`` that cannot block qmpvm: a FIFO without a peer or a slow
    device fails or opens at once (``O_NONBLOCK``, kept: qmpvm's writes must
    not block either); ``kinds``: what it must be, of "file", "block"."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    found = os.fstat(fd).st_mode
    wanted = {"file": stat.S_ISREG(found), "block": stat.S_ISBLK(found)}
    if kinds and not any(wanted[kind] for kind in kinds):
        os.close(fd)
        what = " or ".join({"file": "a regular file", "block": "a block device"}[k] for k in kinds)
        raise OSError(errno.EINVAL, f"not {what}", path)
    return fd


def _access(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
