"""Driving the engine's migration over a descriptor qmpvm opened.

The engine never opens the snapshot file or the data connection itself:
qmpvm opens it and hands it over (``getfd``, then ``fd:NAME``), so the same
two functions serve a snapshot (a file), a restore (a file) and a live
migration (a socket).  Each waits for the engine's MIGRATION event (or its
exit), which every client hears too, as it hears QEMU's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from qmpvm.config.machine import as_object
from qmpvm.errors import EngineError

if TYPE_CHECKING:
    from qmpvm.vmm import Vmm

CHANNEL_FD = "qmpvm-migration"
"""The getfd name of the descriptor the engine migrates over."""
BANDWIDTH = 64 << 30
"""Bytes/s for a stream into a file: as fast as the engine can write."""
ENDS = frozenset({"completed", "failed", "cancelled"})


def _migration_end(message: Mapping[str, object]) -> bool:
    if message.get("event") == "ENGINE_EXIT":
        return True
    data = message.get("data")
    return (
        message.get("event") == "MIGRATION"
        and isinstance(data, dict)
        and data.get("status") in ENDS
    )


async def _prepare(vmm: Vmm, *, ignore_shared: bool) -> None:
    capabilities = [
        {"capability": "events", "state": True},
        {"capability": "x-ignore-shared", "state": ignore_shared},
    ]
    await vmm.forward("migrate-set-capabilities", {"capabilities": capabilities})


async def send(
    vmm: Vmm, fd: int, *, live: bool, ignore_shared: bool, unthrottled: bool = False
) -> dict[str, object]:
    """Stream the machine's state into ``fd``; the guest ends paused
    (``postmigrate``).  Returns QEMU's figures (``query-migrate``).

    A migration keeps the engine's parameters, which clients may set
    (``migrate-set-parameters``); ``unthrottled`` (a file) lifts the bandwidth
    limit for this stream only."""
    await _prepare(vmm, ignore_shared=ignore_shared)
    status = await vmm.forward("query-status", {})
    if not live and isinstance(status, dict) and status.get("running"):
        await vmm.forward("stop", {})
    engine = vmm.engine()
    limit = None
    if unthrottled:
        parameters = await vmm.forward("query-migrate-parameters", {})
        limit = parameters.get("max-bandwidth") if isinstance(parameters, dict) else None
        await vmm.forward("migrate-set-parameters", {"max-bandwidth": BANDWIDTH})
    try:
        with vmm.watching(_migration_end) as ended:
            await engine.execute("getfd", {"fdname": CHANNEL_FD}, fds=[fd])
            await engine.execute("migrate", {"uri": f"fd:{CHANNEL_FD}"})
            event = await ended
        figures = await _figures(vmm, event)
    finally:
        if isinstance(limit, int) and vmm.machine is not None:
            await vmm.forward("migrate-set-parameters", {"max-bandwidth": limit})
    if figures.get("status") != "completed":
        raise EngineError(f"the migration {figures.get('status')}: {_why(figures)}")
    return figures


async def receive(vmm: Vmm, fd: int, *, ignore_shared: bool) -> None:
    """Load the state the engine reads from ``fd``; it ends paused."""
    await _prepare(vmm, ignore_shared=ignore_shared)
    engine = vmm.engine()
    with vmm.watching(_migration_end) as ended:
        await engine.execute("getfd", {"fdname": CHANNEL_FD}, fds=[fd])
        await engine.execute("migrate-incoming", {"uri": f"fd:{CHANNEL_FD}"})
        event = await ended
    if event.get("event") == "ENGINE_EXIT":
        data = event.get("data")
        said = data.get("stderr") if isinstance(data, dict) else None
        raise EngineError(f"the engine could not load the state: {said or 'it exited'}")
    data = event.get("data")
    if isinstance(data, dict) and data.get("status") != "completed":
        raise EngineError(f"loading the state {data.get('status')}")


async def _figures(vmm: Vmm, event: Mapping[str, object]) -> dict[str, object]:
    """``query-migrate`` once it has the final figures: QEMU 7.2 announces
    "completed" a moment before it fills in total-time and downtime."""
    if event.get("event") == "ENGINE_EXIT":
        return {"status": "failed", "error-desc": "the engine exited"}
    for _ in range(FIGURES_TRIES):
        info = await vmm.forward("query-migrate", {})
        figures = dict(info) if isinstance(info, dict) else {}
        if figures.get("status") != "completed" or figures.get("total-time"):
            return figures
        await asyncio.sleep(0.005)
    return figures


FIGURES_TRIES = 200


def _why(figures: Mapping[str, object]) -> str:
    if figures.get("status") == "cancelled":
        return "migrate_cancel was given"
    return str(figures.get("error-desc") or "no reason given")


def summary(figures: Mapping[str, object]) -> dict[str, object]:
    """The figures a user reads: milliseconds and bytes."""
    ram = as_object(figures.get("ram"))
    return {
        "total-time": figures.get("total-time"),
        "downtime": figures.get("downtime"),
        "transferred": ram.get("transferred"),
    }


def copy_sparse(source: str, target: str) -> int:
    """Copy a RAM file, its holes left holes (the guest never touched those
    pages); returns the bytes copied.  The target is replaced whole."""
    copied = 0
    tmp = f"{target}.qmpvm-tmp"
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(src).st_size
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(dst, size)
            offset = 0
            while offset < size:
                try:
                    start = os.lseek(src, offset, os.SEEK_DATA)
                except OSError:  # ENXIO: nothing but a hole to the end
                    break
                end = os.lseek(src, start, os.SEEK_HOLE)
                os.lseek(dst, start, os.SEEK_SET)
                position = start
                while position < end:
                    sent = os.sendfile(dst, src, position, end - position)
                    if sent == 0:
                        break
                    position += sent
                copied += position - start
                offset = end
        finally:
            os.close(dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(src)
    os.replace(tmp, target)
    return copied


async def copy_memory(pairs: list[tuple[str, str]]) -> int:
    """Copy each (source, target) RAM file, in a thread."""

    def run() -> int:
        return sum(copy_sparse(source, target) for source, target in pairs)

    return await asyncio.to_thread(run)
