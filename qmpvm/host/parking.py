"""Descriptors parked in the engine, so that consoles outlive a qmpvm restart.

With ``--state-dir`` the engine outlives qmpvm; a console's host side (its
listening socket, its clients' connections, a pty's master) is qmpvm's and
would close with it.  So each is also handed to the engine with ``getfd`` under a name of its
own (``qmpvm-park-INODE``), which the engine keeps, unused, for as long as
it runs (its monitor's named descriptors survive the link's reconnection;
fdsets would not: QEMU closes unused ones when its last monitor
disconnects).  The next qmpvm copies the engine's sockets and pty masters
back (``pidfd_getfd``) and each console takes its own: its clients stay
connected, its path stays bound (connections made meanwhile wait in the
backlog), a pty keeps its ``/dev/pts`` name.  The engine never reads them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from typing import TYPE_CHECKING

from qmpvm.errors import EngineError
from qmpvm.host.console_clients import pty_path

if TYPE_CHECKING:
    from qmpvm.engine.machine import EngineMachine

log = logging.getLogger(__name__)

MAX_PARKED = 256
"""Beyond this many, descriptors are not parked (their clients are dropped
at a restart, as without parking): the engine's descriptor table is its own."""
PREFIX = "qmpvm-park-"


def park_name(fd: int) -> str:
    """The ``getfd`` name of a parked socket (its inode) or pty master (its
    number): the same in every process that holds it, so a qmpvm that took
    it back knows the name."""
    found = os.fstat(fd)
    if stat.S_ISCHR(found.st_mode):
        return f"{PREFIX}pty{pty_path(fd).rsplit('/', 1)[-1]}"
    return f"{PREFIX}{found.st_ino}"


def is_pty_master(found: os.stat_result) -> bool:
    """/dev/ptmx (or a devpts instance's ``ptmx``): character device 5:2."""
    return stat.S_ISCHR(found.st_mode) and (os.major(found.st_rdev), os.minor(found.st_rdev)) == (
        5,
        2,
    )


class Parking:
    """What qmpvm parked in one engine, counted."""

    def __init__(self, machine: EngineMachine) -> None:
        self.machine = machine
        self.count = 0

    async def park(self, fd: int, what: str) -> str | None:
        """A copy of ``fd`` kept in the engine, and its name there (to unpark
        it); None if it could not be (the console works on, only not across
        a restart)."""
        if self.count >= MAX_PARKED:
            return None
        self.count += 1
        try:
            name = park_name(fd)
            await self.machine.execute("getfd", {"fdname": name}, fds=[fd])
        except (EngineError, OSError) as err:
            self.count -= 1
            log.debug("cannot park %s in the engine: %s", what, err)
            return None
        log.info("parked %s in the engine as %s", what, name)
        return name

    async def unpark(self, name: str) -> None:
        """The engine's copy closed (a client gone, a console removed)."""
        self.count = max(0, self.count - 1)
        with contextlib.suppress(EngineError, OSError):
            await self.machine.execute("closefd", {"fdname": name})

    def take_back(self) -> list[int]:
        """Copies of the engine's sockets and pty masters, one each (the
        consoles pick theirs; the rest are for the caller to close)."""
        from qmpvm.engine.process import WatchedProcess

        process = self.machine.process
        if not isinstance(process, WatchedProcess):
            return []
        copies: list[int] = []
        seen: set[int] = set()
        table = f"/proc/{self.machine.pid}/fd"
        with contextlib.suppress(OSError):
            for name in os.listdir(table):
                with contextlib.suppress(OSError):
                    found = os.stat(f"{table}/{name}")
                    if is_pty_master(found):
                        copies.append(process.copy_fd(int(name)))  # each its own pty
                    elif stat.S_ISSOCK(found.st_mode) and found.st_ino not in seen:
                        copies.append(process.copy_fd(int(name)))
                        seen.add(found.st_ino)
        return copies
