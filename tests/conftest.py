"""Shared fixtures: a real qmpvm process on real sockets, and the guest."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


@dataclass
class QmpvmProcess:
    process: subprocess.Popen[bytes]
    socket: Path
    state_dir: Path | None
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_STARTED: list[QmpvmProcess] = []


@pytest.fixture(autouse=True)
def _stop_leftover_qmpvm() -> Iterator[None]:
    """A test that fails half-way must not leave qmpvm (and its engine) running."""
    yield
    while _STARTED:
        _STARTED.pop().stop()


def start_qmpvm(
    tmp: Path,
    *extra: str,
    state_dir: Path | None = None,
    name: str = "qmp",
    pass_fds: tuple[int, ...] = (),
) -> QmpvmProcess:
    sock = tmp / f"{name}.sock"
    stderr_path = tmp / f"{name}.stderr"
    argv = [sys.executable, "-m", "qmpvm", "-qmp", f"unix:{sock},server=on,wait=off", "-v"]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    argv += list(extra) or ["--preconfig"]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=stderr, pass_fds=pass_fds)
    deadline = time.monotonic() + 15
    while not sock.exists():
        if process.poll() is not None:
            raise RuntimeError(f"qmpvm exited {process.returncode}: {stderr_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("qmpvm did not open its socket")
        time.sleep(0.01)
    started = QmpvmProcess(
        process=process, socket=sock, state_dir=state_dir, stderr_path=stderr_path
    )
    _STARTED.append(started)
    return started


@pytest.fixture
def qmpvm(tmp_path: Path) -> Iterator[QmpvmProcess]:
    proc = start_qmpvm(tmp_path)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def guest() -> object:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    from qmpvm.images import ImageError, build_guest

    try:
        return build_guest()
    except ImageError as err:
        pytest.skip(f"guest image unavailable: {err}")


def pids_of(binary: str) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and os.path.basename(cmdline[0].decode(errors="replace")) == binary:
                out.add(int(entry.name))
    return out


async def quit_and_disconnect(client: QMPClient) -> None:
    """``quit``, then close our side: the server may have closed first."""
    await client.execute("quit")
    with contextlib.suppress(EOFError, ConnectionError):
        await client.disconnect()


async def connect(proc: QmpvmProcess, name: str = "test") -> QMPClient:
    """A qemu.qmp client, negotiated, on ``proc``'s socket."""
    client = QMPClient(name)
    await client.connect(str(proc.socket))
    return client


async def next_event(
    client: QMPClient, name: str, timeout: float = 30, **data: object
) -> dict[str, Any]:
    """The next event ``name`` whose data has the members in ``data``."""
    async with asyncio.timeout(timeout):
        async for event in client.events:
            got = event.get("data")
            got = got if isinstance(got, dict) else {}
            if event["event"] == name and all(got.get(k) == v for k, v in data.items()):
                return dict(event)
    raise AssertionError(f"the event stream ended before {name}")
