"""QEMU's Python harness (qemu.machine.QEMUMachine), its launch and QMP use
reproduced step by step against qmpvm-system-x86_64.

QEMUMachine is not on the package registries; this follows its
``_base_args``, ``launch`` and ``shutdown`` (QEMU 8.x's python/qemu/machine):
``-display none -vga none``, the monitor as one end of a socketpair
(``-chardev socket,id=mon,fd=N -mon chardev=mon,mode=control``), the console
as another (``-chardev socket,id=console,fd=M -serial chardev:console``),
then the test's own arguments; no ``-machine`` (QEMU's default, pc).  After
launch it negotiates, reads the console, and ``shutdown()`` sends ``quit``
and waits for the process, which must exit 0 and leave no engine behind.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import needs_qemu, pids_of
from qemu.qmp import QMPClient

from qmpvm.images import READY_MARKER, GuestImage

pytestmark = needs_qemu

QMPVM_AS_QEMU = str(Path(sys.executable).parent / "qmpvm-system-x86_64")


async def test_qemu_machine_launches_boots_and_shuts_down(guest: GuestImage) -> None:
    mon_ours, mon_theirs = socket.socketpair()
    con_ours, con_theirs = socket.socketpair()
    for sock in (mon_theirs, con_theirs):
        os.set_inheritable(sock.fileno(), True)
    argv = [
        QMPVM_AS_QEMU, "-display", "none", "-vga", "none",
        "-chardev", f"socket,id=mon,fd={mon_theirs.fileno()}", "-mon", "chardev=mon,mode=control",
        "-chardev", f"socket,id=console,fd={con_theirs.fileno()}", "-serial", "chardev:console",
        "-accel", "tcg", "-m", "256", "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
        "-append", "console=ttyS0",
    ]  # fmt: skip
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
        pass_fds=(mon_theirs.fileno(), con_theirs.fileno()),
    )  # fmt: skip
    mon_theirs.close()
    con_theirs.close()
    client = QMPClient("qemu-machine")
    try:
        await client.connect(mon_ours)  # QEMUMachine: QEMUMonitorProtocol(sock=...).connect()
        status = await client.execute("query-status")
        assert status["status"] in ("running", "prelaunch"), status
        console = b""
        loop = asyncio.get_running_loop()
        con_ours.setblocking(False)
        async with asyncio.timeout(180):
            while READY_MARKER.encode() not in console:
                chunk = await loop.sock_recv(con_ours, 65536)
                assert chunk, f"console closed: {console[-500:]!r}"
                console += chunk
        assert (await client.execute("query-status"))["status"] == "running"
        machine = await client.execute("query-machine")
        assert machine["machine"]["type"] == "pc", "no -machine: QEMU's default"
        assert not machine["engine"]["hotplug-ports"], "no spare ports QEMU would not add"
        engine = machine["engine"]["pid"]
        await client.execute("quit")  # QEMUMachine.shutdown(): _soft_shutdown
        await client.disconnect()
        assert await asyncio.to_thread(process.wait, 60) == 0, process.stderr
        assert engine not in pids_of("qemu-system-x86_64")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        con_ours.close()
