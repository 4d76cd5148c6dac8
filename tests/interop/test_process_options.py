"""Options about the qmpvm process itself, as QEMU's clients use them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import needs_qemu, next_event, pids_of
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


async def test_a_monitor_on_a_socket_qmpvm_dials(tmp_path: Path) -> None:
    """QEMU's Python harness (QEMU 7.2) listens and lets the emulator connect:
    ``-chardev socket,id=mon,path=P -mon chardev=mon,mode=control``."""
    path = tmp_path / "harness.sock"
    client = QMPClient("harness")
    await client.start_server(str(path))
    argv = [
        str(QMPVM_AS_QEMU), "-display", "none", "-vga", "none", "-nodefaults", "-S",
        "-chardev", f"socket,id=mon,path={path}", "-mon", "chardev=mon,mode=control",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async with asyncio.timeout(60):
            await client.accept()
        status = await client.execute("query-status")
        assert status["status"] == "prelaunch"
        await client.execute("quit")
        with contextlib.suppress(EOFError, ConnectionError):
            await client.disconnect()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_monitor_on_an_inherited_connected_socket(tmp_path: Path) -> None:
    """QEMU >= 8.0's harness passes one end of a socketpair: ``-chardev socket,id=mon,fd=N``."""
    import json
    import socket

    ours, theirs = socket.socketpair()
    argv = [
        str(QMPVM_AS_QEMU), "-nodefaults", "-S", "-machine", "none",
        "-chardev", f"socket,id=mon,fd={theirs.fileno()}", "-mon", "chardev=mon,mode=control",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        reader = ours.makefile("rb")
        assert "QMP" in json.loads(reader.readline())
        ours.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status", "id": 1}\n')
        assert json.loads(reader.readline()) == {"return": {}}
        reply = json.loads(reader.readline())
        assert (reply["id"], reply["return"]["status"]) == (1, "prelaunch")
        ours.sendall(b'{"execute": "quit"}\n')
        assert proc.wait(30) == 0
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_descriptor_qmpvm_was_not_started_with_is_refused() -> None:
    """-add-fd of a number qmpvm did not inherit must not take one of its own."""
    argv = [str(QMPVM_AS_QEMU), "-nodefaults", "-S", "-machine", "none",
            "-add-fd", "fd=3,set=1"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "-add-fd fd=3: not a descriptor qmpvm was started with" in done.stderr


async def test_a_signal_to_qmpvm_ends_the_engine_as_a_signal_ends_qemu(tmp_path: Path) -> None:
    """``virsh destroy`` signals the pid: clients hear SHUTDOWN "host-signal", as
    from QEMU, the engine goes, and qmpvm exits 0 as QEMU does."""
    sock = tmp_path / "m.sock"
    argv = [str(QMPVM_AS_QEMU), "-machine", "q35,accel=tcg", "-nodefaults", "-S",
            "-qmp", f"unix:{sock},server=on,wait=off"]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = QMPClient("destroyer")
        async with asyncio.timeout(60):
            while not sock.exists():
                await asyncio.sleep(0.01)
            await client.connect(str(sock))
        engine = (await client.execute("query-machine"))["engine"]["pid"]
        proc.send_signal(signal.SIGTERM)
        shutdown = await next_event(client, "SHUTDOWN")
        assert shutdown["data"]["reason"] == "host-signal"
        with contextlib.suppress(EOFError, ConnectionError):
            await client.disconnect()
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert engine not in pids_of("qemu-system-x86_64")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
