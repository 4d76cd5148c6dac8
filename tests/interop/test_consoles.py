"""Consoles qmpvm serves, with the real guest: many clients on one serial
socket, history for late clients and after the engine is gone, a file
console, hot-plug, and refusals that change nothing."""

from __future__ import annotations

import asyncio
import stat
import sys
from asyncio.subprocess import Process
from pathlib import Path

import pytest
from conftest import connect, next_event, quit_and_disconnect, start_qmpvm
from qemu.qmp import ExecuteError, QMPClient
from test_console_tool import read_until as read_stream_until
from test_engine import BOOT_TIMEOUT, configure, socket_chardev

from qmpvm.images import READY_MARKER, GuestImage, guest_cmdline
from qmpvm.tools.console import SocketConsole

pytestmark = pytest.mark.usefixtures("guest")


async def console_tool(monitor: Path, chardev: str, *options: str) -> Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpvm", "console", str(monitor), "--chardev", chardev, *options,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def read_until(tool: Process, needle: bytes, seen: bytearray) -> None:
    """``needle`` in what ``tool`` printed (``seen`` grows with it)."""
    assert tool.stdout is not None
    await read_stream_until(tool.stdout, needle, seen)


async def peers(client: QMPClient, label: str, connected: bool) -> str:
    """query-chardev's filename for ``label`` once it says (dis)connected."""
    async with asyncio.timeout(30):
        while True:
            found = {c["label"]: c["filename"] for c in await client.execute("query-chardev")}
            if found[label].startswith("disconnected:") is not connected:
                return str(found[label])
            await asyncio.sleep(0.02)


async def booted_with_two_clients(
    client: QMPClient, path: Path
) -> tuple[SocketConsole, SocketConsole]:
    """Two clients on the console socket at ``path``, then the guest started
    and booted; the second leaves the shell's terminal query to the first."""
    first = await SocketConsole.connect(str(path))
    second = await SocketConsole.connect(str(path))
    second.interactive = False
    await client.execute("cont")
    await first.expect(READY_MARKER, BOOT_TIMEOUT)
    await second.expect(READY_MARKER, BOOT_TIMEOUT)
    return first, second


async def test_clients_share_a_serial_console_and_late_ones_read_its_history(
    tmp_path: Path, guest: GuestImage
) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    path = await configure(client, guest, tmp_path)
    await client.execute("machine-init")
    first, second = await booted_with_two_clients(client, path)
    assert await peers(client, "ser0", True) == f"unix:{path},server=on"
    # either can type; both see the answer
    await first.write("echo FROM-A-$((20 + 1))\n")
    await first.expect("FROM-A-21")
    await second.expect("FROM-A-21")
    await second.write("echo FROM-B-$((30 + 2))\n")
    await first.expect("FROM-B-32")
    await second.expect("FROM-B-32")
    # a client that comes late asks for what it missed
    history = await client.execute("console-history", {"device": "ser0"})
    assert READY_MARKER in history["data"] and "FROM-B-32" in history["data"]
    assert history["end"] - history["start"] == len(history["data"].encode())
    recent = await client.execute("console-history", {"device": "ser0", "since": history["end"]})
    assert recent["start"] == history["end"]
    # qmpvm console --history: what was missed, then the live console both ways
    tool = await console_tool(proc.socket, "ser0", "--history")
    seen = bytearray()
    await read_until(tool, b"FROM-B-32", seen)
    assert READY_MARKER.encode() in seen
    assert tool.stdin is not None
    tool.stdin.write(b"echo LATE-$((1 + 2))\n")
    await first.expect("LATE-3")
    await read_until(tool, b"LATE-3", seen)
    tool.stdin.write(b"\x1d")  # Ctrl-] detaches
    assert await asyncio.wait_for(tool.wait(), 30) == 0
    await first.close()
    await second.close()
    assert (await peers(client, "ser0", False)).startswith("disconnected:unix:")
    # a console hot-plugged on the running machine is served too, and goes on removal
    extra = tmp_path / "extra.sock"
    await client.execute("chardev-add", socket_chardev("extra", extra))
    assert stat.S_ISSOCK(extra.stat().st_mode)
    late = await SocketConsole.connect(str(extra))
    assert await peers(client, "extra", True) == f"unix:{extra},server=on"
    await late.close()
    await client.execute("chardev-remove", {"id": "extra"})
    assert not extra.exists()
    await quit_and_disconnect(client)


async def test_console_output_outlives_the_engine_and_a_rebuilt_machine(
    tmp_path: Path, guest: GuestImage
) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    path = await configure(client, guest, tmp_path)
    out = tmp_path / "ttyS1.log"
    await client.execute(
        "chardev-add", {"id": "file1", "backend": {"type": "file", "data": {"out": str(out)}}}
    )
    await client.execute("device_add", {"driver": "isa-serial", "chardev": "file1", "id": "s1"})
    await client.execute("machine-init")
    await client.execute("cont")
    console = await SocketConsole.connect(str(path))
    follower = await console_tool(proc.socket, "file1")  # the file console, as kept
    await console.expect(READY_MARKER, BOOT_TIMEOUT)
    await console.write("echo TO-THE-FILE > /dev/ttyS1; echo BYE-$((6 * 7)); poweroff -f\n")
    await read_until(follower, b"TO-THE-FILE", bytearray())
    await next_event(client, "ENGINE_EXIT", timeout=60)
    assert follower.stdin is not None
    follower.stdin.close()
    assert await asyncio.wait_for(follower.wait(), 30) == 0
    assert "TO-THE-FILE" in out.read_text()
    first = await client.execute("console-history", {"device": "ser0"})
    assert "BYE-42" in first["data"], "what the guest printed as it powered off is kept"
    # a new machine: the history runs on from the old one's
    await client.execute("machine-init")
    await client.execute("cont")
    console = await SocketConsole.connect(str(path))
    await console.expect(READY_MARKER, BOOT_TIMEOUT)
    second = await client.execute("console-history", {"device": "ser0"})
    assert second["start"] <= first["end"] < second["end"]
    assert "BYE-42" in second["data"] and second["data"].count(READY_MARKER) == 2
    await console.close()
    await quit_and_disconnect(client)


async def test_console_refusals_change_nothing(tmp_path: Path, guest: GuestImage) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    path = await configure(client, guest, tmp_path)
    ring = {"id": "r1", "backend": {"type": "ringbuf", "data": {"size": 1000}}}
    with pytest.raises(ExecuteError, match="size of ringbuf chardev must be power of two"):
        await client.execute("chardev-add", ring)
    # a path the host refuses: at machine-init, and nothing is left
    bad = tmp_path / "missing" / "s.sock"
    await client.execute("chardev-add", socket_chardev("bad", bad))
    with pytest.raises(ExecuteError, match=f"chardev 'bad': cannot open '{bad}': No such file"):
        await client.execute("machine-init")
    status = await client.execute("query-status")
    assert status["phase"] == "no-machine"
    assert not path.exists(), "the other console's socket was closed again"
    await client.execute("chardev-remove", {"id": "bad"})
    await client.execute("machine-init")
    exported = await client.execute("config-export")
    # and on the running machine, refused at the command
    with pytest.raises(ExecuteError, match=f"cannot open '{bad}'"):
        await client.execute("chardev-add", socket_chardev("bad", bad))
    assert await client.execute("config-export") == exported
    labels = [c["label"] for c in await client.execute("query-chardev")]
    assert labels == ["ser0"]
    with pytest.raises(ExecuteError, match="ser0 is not a ringbuf device"):
        await client.execute("ringbuf-read", {"device": "ser0", "size": 10})
    with pytest.raises(ExecuteError, match="Device 'nope' not found"):
        await client.execute("console-history", {"device": "nope"})
    await quit_and_disconnect(client)


async def test_a_stdio_console_is_qmpvms_own_standard_io(tmp_path: Path, guest: GuestImage) -> None:
    """``-serial stdio``: the guest's console on qmpvm's stdin and stdout."""
    monitor = tmp_path / "qmp.sock"
    argv = [
        sys.executable, "-m", "qmpvm", "-qmp", f"unix:{monitor},server=on,wait=off",
        "-machine", "q35", "-accel", "tcg", "-m", "256", "-nodefaults",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
        "-append", guest_cmdline("q35"), "-serial", "stdio",
    ]  # fmt: skip
    with (tmp_path / "qmpvm.log").open("wb") as log:
        qmpvm = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log
        )
    assert qmpvm.stdin is not None
    seen = bytearray()
    await read_until(qmpvm, READY_MARKER.encode(), seen)
    qmpvm.stdin.write(b"echo STDIO-$((4 * 5))\n")
    await read_until(qmpvm, b"STDIO-20", seen)
    client = QMPClient("test")
    await client.connect(str(monitor))
    chardevs = {c["label"]: c["filename"] for c in await client.execute("query-chardev")}
    assert chardevs["serial0"] == "stdio"
    history = await client.execute("console-history", {"device": "serial0"})
    assert "STDIO-20" in history["data"]
    await quit_and_disconnect(client)
    assert await asyncio.wait_for(qmpvm.wait(), 30) == 0


async def test_nographic_shares_stdio_between_the_guest_and_a_monitor(
    tmp_path: Path, guest: GuestImage
) -> None:
    """QEMU's ``-nographic``: the serial port on stdio with an HMP monitor
    multiplexed on it; Ctrl-A c switches between them, Ctrl-A x quits."""
    argv = [
        sys.executable, "-m", "qmpvm", "-nographic", "-machine", "q35", "-accel", "tcg",
        "-m", "256", "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
        "-append", guest_cmdline("q35"),
    ]  # fmt: skip
    with (tmp_path / "qmpvm.log").open("wb") as log:
        qmpvm = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log
        )
    assert qmpvm.stdin is not None and qmpvm.stdout is not None
    seen = bytearray()

    async def typed(keys: bytes, answer: bytes) -> None:
        qmpvm.stdin.write(keys)  # type: ignore[union-attr]
        await read_until(qmpvm, answer, seen)
        del seen[: seen.index(answer) + len(answer)]

    await read_until(qmpvm, READY_MARKER.encode(), seen)
    await typed(b"echo GUEST-$((4 * 5))\n", b"GUEST-20")
    await typed(b"\x01c", b"monitor - type 'help' for more information\r\n(qemu) ")
    await typed(b"info status\r", b"VM status: running\r\n(qemu) ")
    await typed(b"info chardev\r", b"serial0: filename=stdio\r\n")  # the user's, not a pipe
    await typed(b"device_add e1000\r", b"HMP command 'device_add' is not relayed")
    await typed(b"stop\rinfo status\r", b"VM status: paused")
    await typed(b"cont\r\x01cecho BACK-$((6 * 7))\n", b"BACK-42")
    qmpvm.stdin.write(b"\x01x")
    assert await asyncio.wait_for(qmpvm.wait(), 30) == 0
    assert b"QEMU: Terminated" in seen + await qmpvm.stdout.read()


async def test_hmp_monitors_on_sockets_give_each_client_its_own(
    tmp_path: Path, guest: GuestImage
) -> None:
    """``-serial mon:unix:...`` and ``-monitor unix:...``: every client of
    either socket has its own monitor line and output; the guest's output
    reaches every client of the serial socket."""
    serial, monitor = tmp_path / "serial.sock", tmp_path / "monitor.sock"
    proc = start_qmpvm(
        tmp_path, "-machine", "q35", "-accel", "tcg", "-m", "256", "-nodefaults",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
        "-append", guest_cmdline("q35"),
        "-serial", f"mon:unix:{serial},server=on,wait=off",
        "-monitor", f"unix:{monitor},server=on,wait=off", "-S",
    )  # fmt: skip
    client = await connect(proc)
    watching, typist = await booted_with_two_clients(client, serial)

    await typist.write("\x01c")
    await typist.expect("(qemu) ")
    await typist.write("info status\r")
    await typist.expect("VM status: running")
    await typist.write("\x01cecho SHARED-$((2 * 3))\n")  # back to the guest
    await watching.expect("SHARED-6")
    assert "VM status" not in watching.transcript, "monitor output is its client's own"

    first, second = [await SocketConsole.connect(str(monitor)) for _ in range(2)]
    for console in (first, second):
        await console.expect("monitor - type 'help' for more information\r\n(qemu) ")
    await first.write("info name\rinfo status\r")
    await first.expect("VM status: running\r\n(qemu) ")
    await second.write("stop\r")
    await second.expect("(qemu) ")
    assert (await client.execute("query-status"))["status"] == "paused"
    assert "info name" not in second.transcript and "stop" not in first.transcript
    settings = (await client.execute("query-machine"))["machine"]
    assert settings["monitors"] == [{"chardev": "serial0", "mux": True},
                                    {"chardev": "compat_monitor0"}]  # fmt: skip
    for console in (watching, typist, first, second):
        await console.close()
    await quit_and_disconnect(client)
