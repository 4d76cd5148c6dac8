"""``qmpvm console`` on a pty chardev (both ways) and on a ringbuf (its output,
also after the guest powered off)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from conftest import connect, next_event, quit_and_disconnect, start_qmpvm
from test_engine import BOOT_TIMEOUT, configure

from qmpvm.images import READY_MARKER, GuestImage

pytestmark = pytest.mark.usefixtures("guest")


async def read_until(stream: asyncio.StreamReader, needle: bytes, seen: bytearray) -> None:
    async with asyncio.timeout(BOOT_TIMEOUT):
        while needle not in seen:
            chunk = await stream.read(4096)
            assert chunk, f"the console ended before {needle!r}: {bytes(seen[-300:])!r}"
            seen += chunk


async def test_console_on_a_pty_and_on_a_ringbuf(tmp_path: Path, guest: GuestImage) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    await configure(client, guest, tmp_path, serial="ringbuf")  # ttyS0 on a ringbuf, ser0
    await client.execute("chardev-add", {"id": "tty", "backend": {"type": "pty", "data": {}}})
    await client.execute("device_add", {"driver": "isa-serial", "chardev": "tty", "id": "s1"})
    await client.execute("boot-set", {"kernel": str(guest.kernel), "initrd": str(guest.initrd),
                                      "append": "console=ttyS1 panic=-1 quiet"})  # fmt: skip
    await client.execute("machine-init")
    await client.execute("cont")
    console = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpvm", "console", str(proc.socket), "--chardev", "tty",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert console.stdin is not None and console.stdout is not None
    seen = bytearray()
    await read_until(console.stdout, READY_MARKER.encode(), seen)
    console.stdin.write(b"echo HELLO-$((6*7)) > /dev/ttyS0; poweroff -f\n")
    await console.stdin.drain()
    await next_event(client, "ENGINE_EXIT", timeout=BOOT_TIMEOUT)
    console.stdin.close()
    assert await asyncio.wait_for(console.wait(), 30) == 0
    # the ringbuf's output, read after the power-off
    ringbuf = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpvm", "console", str(proc.socket), "--chardev", "ser0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(ringbuf.communicate(), 30)
    assert ringbuf.returncode == 0 and b"HELLO-42" in out
    await quit_and_disconnect(client)
