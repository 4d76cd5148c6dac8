"""Options about the qmpvm process itself, as QEMU's clients use them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path

from conftest import needs_qemu
from qemu.qmp import QMPClient

pytestmark = needs_qemu

QMPVM_AS_QEMU = Path(sys.executable).parent / "qmpvm-system-x86_64"


async def test_libvirts_probe_command_line(tmp_path: Path) -> None:
    """libvirt probes an emulator with this line: qmpvm must daemonize once its
    machine exists, write the pid file, and serve the monitor."""
    sock, pidfile = tmp_path / "probe.sock", tmp_path / "probe.pid"
    argv = [
        str(QMPVM_AS_QEMU), "-S", "-no-user-config", "-nodefaults", "-nographic",
        "-machine", "none,accel=kvm:tcg", "-qmp", f"unix:{sock},server=on,wait=off",
        "-pidfile", str(pidfile), "-daemonize",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    pid = int(pidfile.read_text())
    assert pid != os.getpid() and Path(f"/proc/{pid}").exists()
    client = QMPClient("probe")
    await client.connect(str(sock))
    status = await client.execute("query-status")
    assert (status["status"], status["phase"]) == ("prelaunch", "machine-ready")
    await client.execute("quit")
    with contextlib.suppress(EOFError, ConnectionError):
        await client.disconnect()
    # not our child, so no wait(): poll its /proc entry until it is gone
    async with asyncio.timeout(30):
        while Path(f"/proc/{pid}").exists():
            await asyncio.sleep(0.01)
    assert not pidfile.exists(), "the pid file goes with the process"


def test_a_daemon_that_fails_makes_the_parent_fail(tmp_path: Path) -> None:
    argv = [
        str(QMPVM_AS_QEMU), "-S", "-nodefaults", "-machine", "no-such-machine",
        "-qmp", f"unix:{tmp_path / 's'},server=on,wait=off", "-daemonize",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "no-such-machine" in done.stderr
