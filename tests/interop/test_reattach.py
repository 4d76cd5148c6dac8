"""Restarting qmpvm without stopping the guest (``--state-dir``): the engine
runs on when qmpvm dies or leaves, and the next qmpvm takes it over."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QmpvmProcess, connect, next_event, pids_of, quit_and_disconnect, start_qmpvm
from qemu.qmp import ExecuteError, QMPClient
from test_engine import BOOT_TIMEOUT
from test_machine_state import guest_options, start_ticker

from qmpvm.engine.record import EngineRecord, identity
from qmpvm.images import READY_MARKER, GuestImage
from qmpvm.tools.console import SocketConsole

pytestmark = pytest.mark.usefixtures("guest")
ROUNDS = 20


async def drop(client: QMPClient) -> None:
    with contextlib.suppress(EOFError, ConnectionError):
        await client.disconnect()


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """The state directory; an engine left in it by a test that failed half-way
    is ended (it outlives qmpvm by design, so the usual clean-up misses it)."""
    directory = tmp_path / "state"
    yield directory
    left = EngineRecord.load(directory)
    if left is not None and left.is_running():
        os.kill(left.pid, signal.SIGKILL)


def restart(tmp: Path, state: Path, old: QmpvmProcess | None = None) -> QmpvmProcess:
    """A new qmpvm on the same state directory and monitor path."""
    if old is not None:
        with contextlib.suppress(FileNotFoundError):
            old.socket.unlink()  # left by a killed qmpvm: wait for the new one's
    return start_qmpvm(tmp, state_dir=state)


def wait_gone(pid: int) -> None:
    """Until the process is gone (or a zombie), as far as a test waits."""
    deadline = time.monotonic() + 30
    while identity(pid) is not None:
        assert time.monotonic() < deadline, f"process {pid} did not end"
        time.sleep(0.01)


async def test_kill9_of_qmpvm_never_stops_the_guest(
    tmp_path: Path, guest: GuestImage, state: Path
) -> None:
    """qmpvm killed 20 times under a guest printing a counter: each new qmpvm
    takes the engine over; the console's client stays connected through it
    all and reads every tick, as does the history, the ones printed while no
    qmpvm ran too; new clients attach on the same path after each restart."""
    console_path = str(tmp_path / "ttyS0.sock")
    proc = start_qmpvm(tmp_path, *guest_options(guest, tmp_path), state_dir=state)
    client = await connect(proc)
    console = await SocketConsole.connect(console_path)
    await console.expect(READY_MARKER, BOOT_TIMEOUT)
    token = await start_ticker(console)
    await logged(proc, "parked a client of chardev 'ser0'")  # kept in the engine from now on
    engine = (await client.execute("query-machine"))["engine"]["pid"]
    exported = await client.execute("config-export")
    fifos = EngineRecord.load(state).consoles_dir  # type: ignore[union-attr]
    assert fifos is not None and (Path(fifos) / "ser0.out").exists()
    for round_ in range(ROUNDS):
        await drop(client)
        proc.process.kill()
        proc.process.wait()
        proc = restart(tmp_path, state, proc)
        client = await connect(proc)
        status = await client.execute("query-status")
        assert (status["status"], status["phase"]) == ("running", "machine-ready"), round_
        assert (await client.execute("query-machine"))["engine"]["pid"] == engine
        assert await client.execute("config-export") == exported
        late = await SocketConsole.connect(console_path)
        await late.expect(f"TICK {token} ", 30)
        await late.close()
    await console.write("echo TYPED-$((3 * 3))\n")  # input reaches the guest too
    await console.expect("TYPED-9", 30)
    seen = [int(n) for n in re.findall(rf"TICK {token} (\d+)", console.transcript)]
    assert len(seen) > ROUNDS
    assert seen == list(range(seen[0], seen[0] + len(seen))), "one connection saw every tick"
    # events flow again, from the engine taken over
    await client.execute("stop")
    await next_event(client, "STOP")
    await client.execute("cont")
    await next_event(client, "RESUME")
    await console.expect(f"TICK {token} ", 30)
    history = (await client.execute("console-history", {"device": "ser0"}))["data"]
    counters = [int(n) for n in re.findall(rf"TICK {token} (\d+)", history)]
    assert len(counters) > ROUNDS
    assert counters == list(range(counters[0], counters[0] + len(counters))), (
        "the counter went on without a gap or a restart, and no output was lost"
    )
    assert READY_MARKER in history, "the history goes back to the boot"
    assert pids_of("qemu-system-x86_64") & {engine} == {engine}
    leftover = [p for p in pids_of("python3") | pids_of("python") if _qmpvm_on(p, state)]
    assert leftover == [proc.pid], "no qmpvm left behind"
    await console.close()
    await quit_and_disconnect(client)
    assert proc.process.wait(15) == 0
    wait_gone(engine)
    assert not (state / "engine.json").exists()
    assert not Path(fifos).exists(), "the FIFOs went with the engine"
    assert (state / "consoles" / "ser0.log").exists(), "the history stays"


async def logged(proc: QmpvmProcess, text: str, times: int = 1) -> None:
    """qmpvm's log (``-v``) says ``text`` (``times`` over)."""
    async with asyncio.timeout(30):
        while proc.stderr().count(text) < times:
            await asyncio.sleep(0.02)


def _qmpvm_on(pid: int, state: Path) -> bool:
    try:
        return str(state) in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


async def test_leaving_the_machine_running_and_taking_it_back(
    tmp_path: Path, guest: GuestImage, state: Path
) -> None:
    proc = start_qmpvm(tmp_path, *guest_options(guest, tmp_path), state_dir=state)
    client = await connect(proc)
    console = await SocketConsole.connect(str(tmp_path / "ttyS0.sock"))
    await console.expect(READY_MARKER, BOOT_TIMEOUT)
    engine = (await client.execute("query-machine"))["engine"]["pid"]
    exported = await client.execute("config-export")
    await logged(proc, "parked a client of chardev 'ser0'")
    # one qmpvm per state directory
    other = subprocess.run(
        [sys.executable, "-m", "qmpvm", "--preconfig", "--state-dir", str(state),
         "-qmp", f"unix:{tmp_path / 'other.sock'},server=on,wait=off"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert other.returncode == 1
    assert f"is in use by another qmpvm (pid {proc.pid})" in other.stderr
    # quit keep-machine: qmpvm alone goes
    await quit_and_disconnect_keeping(client)
    assert proc.process.wait(15) == 0
    assert identity(engine) is not None, "the engine runs on"
    # a command line that describes a machine is refused, and the guest runs on
    refused = subprocess.run(
        [sys.executable, "-m", "qmpvm", "--state-dir", str(state),
         "-qmp", f"unix:{tmp_path / 'other.sock'},server=on,wait=off",
         *guest_options(guest, tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "has a running machine" in refused.stderr
    assert identity(engine) is not None
    # taken back; then SIGUSR1 leaves it running too
    await console.write("echo KEPT-$((5 * 5))\n")  # typed while no qmpvm runs
    proc = restart(tmp_path, state, proc)
    client = await connect(proc)
    assert (await client.execute("query-status"))["status"] == "running"
    assert await client.execute("config-export") == exported
    await console.expect("KEPT-25", 30)  # the console stayed connected across it
    await console.close()
    await drop(client)
    proc.process.send_signal(signal.SIGUSR1)
    assert proc.process.wait(15) == 0
    assert identity(engine) is not None
    # the engine dies while no qmpvm watches: the next one says so, the config stays
    os.kill(engine, signal.SIGKILL)
    wait_gone(engine)
    proc = restart(tmp_path, state, proc)
    client = await connect(proc)
    machine = await client.execute("query-machine")
    assert machine["phase"] == "no-machine"
    assert "exited while no qmpvm watched it" in machine["last-exit"]["reason"]
    assert await client.execute("config-export") == exported
    await quit_and_disconnect(client)


async def quit_and_disconnect_keeping(client: QMPClient) -> None:
    await client.execute("quit", {"keep-machine": True})
    await drop(client)


async def test_without_a_state_directory_nothing_outlives_qmpvm(tmp_path: Path) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    with pytest.raises(ExecuteError, match="keep-machine needs --state-dir"):
        await client.execute("quit", {"keep-machine": True})
    await quit_and_disconnect(client)


async def test_a_power_off_while_no_qmpvm_watches_is_finished_by_the_next(
    tmp_path: Path, guest: GuestImage, state: Path
) -> None:
    """The engine holds a powered-off guest (its consoles' last output is in
    FIFOs that go with it); with no qmpvm there, the next one finds it so,
    reads that output and ends it as the first would have."""
    ring = "ringbuf,id=ring1,size=4096"
    options = guest_options(guest, tmp_path, "-chardev", ring, "-serial", "chardev:ring1")
    proc = start_qmpvm(tmp_path, *options, state_dir=state)
    client = await connect(proc)
    engine = (await client.execute("query-machine"))["engine"]["pid"]
    console = await SocketConsole.connect(str(tmp_path / "ttyS0.sock"))
    await console.expect(READY_MARKER, BOOT_TIMEOUT)
    await console.close()
    await drop(client)
    proc.process.kill()
    proc.process.wait()
    # typed with no qmpvm there: straight into the FIFO the engine reads
    fifos = EngineRecord.load(state).consoles_dir  # type: ignore[union-attr]
    assert fifos is not None
    with open(Path(fifos) / "ser0.in", "wb", buffering=0) as guest_input:
        guest_input.write(b"echo LAST-WORDS > /dev/ttyS1; poweroff -f\n")
    await engine_status(state / "engine.sock", "shutdown")  # held, paused, not exited
    assert identity(engine) is not None
    proc = restart(tmp_path, state, proc)
    client = await connect(proc)
    exited = await next_event(client, "ENGINE_EXIT")
    assert exited["data"]["reason"] == "guest shut down"
    assert "LAST-WORDS" in await client.execute("ringbuf-read", {"device": "ring1", "size": 4096})
    history = (await client.execute("console-history", {"device": "ser0"}))["data"]
    assert READY_MARKER in history and "LAST-WORDS > /dev/ttyS1" in history
    wait_gone(engine)
    await quit_and_disconnect(client)


async def engine_status(monitor: Path, wanted: str) -> None:
    """Until the engine, asked on its own monitor, is in run state ``wanted``."""
    engine = QMPClient("test-engine")
    await engine.connect(str(monitor))
    try:
        deadline = time.monotonic() + 60
        while (await engine.execute("query-status"))["status"] != wanted:
            assert time.monotonic() < deadline, f"the engine never reached {wanted}"
            await asyncio.sleep(0.05)
    finally:
        await engine.disconnect()


async def test_the_engine_cannot_open_host_paths_itself(
    tmp_path: Path, guest: GuestImage, state: Path
) -> None:
    """qmpvm opens the disks for the engine, which runs unprivileged: a
    blockdev-add by path sent straight to the engine's own monitor fails,
    while the same through qmpvm works (qmpvm opens the file and passes it)."""
    disk, other = tmp_path / "disk.raw", tmp_path / "other.raw"
    disk.write_bytes(os.urandom(1 << 20))
    other.write_bytes(os.urandom(1 << 16))
    node = {"driver": "raw", "node-name": "disk0",
            "file": {"driver": "file", "filename": str(disk)}}  # fmt: skip
    options = guest_options(
        guest, tmp_path, "-blockdev", json.dumps(node), "-device", "virtio-blk-pci,drive=disk0"
    )
    proc = start_qmpvm(tmp_path, *options, state_dir=state)
    client = await connect(proc)
    engine = (await client.execute("query-machine"))["engine"]
    assert engine["confinement"]["user"]["on"] is True
    assert engine["confinement"]["user"]["uid"] >= 2_100_000_000
    files = [n["file"] for n in await client.execute("query-named-block-nodes")]
    assert str(disk) in files and not any("/dev/fdset" in f for f in files), files
    hot = {"driver": "file", "node-name": "hot0", "filename": str(other)}
    await client.execute("blockdev-add", hot)
    await quit_and_disconnect_keeping(client)
    assert proc.process.wait(15) == 0
    link = QMPClient("test-engine")
    await link.connect(str(state / "engine.sock"))
    try:
        # unprivileged, in a root of its own: host files are not there, or not its
        for name, path in (("sneaky", other), ("shadow", Path("/etc/shadow"))):
            sneaky = {"driver": "file", "node-name": name, "filename": str(path), "read-only": True}
            with pytest.raises(ExecuteError, match=r"Permission denied|No such file"):
                await link.execute("blockdev-add", sneaky)
    finally:
        await link.disconnect()
    proc = restart(tmp_path, state)
    client = await connect(proc)
    files = [n["file"] for n in await client.execute("query-named-block-nodes")]
    assert str(other) in files, "the names come back after a takeover too"
    await quit_and_disconnect(client)
    assert proc.process.wait(15) == 0
    wait_gone(engine["pid"])


async def test_fdsets_the_configuration_uses_are_taken_back(
    tmp_path: Path, guest: GuestImage, state: Path
) -> None:
    """A disk passed as an fdset to the first qmpvm: the one that takes the
    engine over copies it back from the engine, so that after the engine dies
    the machine can be built again."""
    disk = tmp_path / "passed.raw"
    disk.write_bytes(os.urandom(1 << 20))
    opened = os.open(disk, os.O_RDWR)
    os.dup2(opened, 1742, inheritable=True)
    os.close(opened)
    node = {"driver": "raw", "node-name": "disk0",
            "file": {"driver": "file", "filename": "/dev/fdset/5"}}  # fmt: skip
    options = guest_options(
        guest, tmp_path, "-add-fd", "fd=1742,set=5,opaque=disk",
        "-blockdev", json.dumps(node), "-device", "virtio-blk-pci,drive=disk0",
    )  # fmt: skip
    try:
        proc = start_qmpvm(tmp_path, *options, state_dir=state, pass_fds=(1742,))
    finally:
        os.close(1742)
    client = await connect(proc)
    engine = (await client.execute("query-machine"))["engine"]["pid"]
    await drop(client)
    proc.process.kill()
    proc.process.wait()
    proc = restart(tmp_path, state, proc)
    client = await connect(proc)
    fdsets = {s["fdset-id"]: s["fds"] for s in await client.execute("query-fdsets")}
    assert [entry.get("opaque") for entry in fdsets[5]] == ["disk"], "copied back"
    os.kill(engine, signal.SIGKILL)
    await next_event(client, "ENGINE_EXIT")
    await client.execute("machine-init")  # with the fdset taken back from the first engine
    await client.execute("cont")
    console = await SocketConsole.connect(str(tmp_path / "ttyS0.sock"))
    await console.expect(READY_MARKER, BOOT_TIMEOUT)
    await console.close()
    await quit_and_disconnect(client)
    assert proc.process.wait(15) == 0


async def test_a_pty_console_keeps_its_path_and_client_across_a_restart(
    tmp_path: Path, guest: GuestImage, state: Path
) -> None:
    """A pty qmpvm serves (ttyS1 here) is parked in the engine too: after
    qmpvm is killed and restarted, query-chardev names the same /dev/pts
    path, and a client that kept the slave open reads on."""
    options = guest_options(guest, tmp_path, "-chardev", "pty,id=tty1", "-serial", "chardev:tty1")
    proc = start_qmpvm(tmp_path, *options, state_dir=state)
    client = await connect(proc)
    console = await SocketConsole.connect(str(tmp_path / "ttyS0.sock"))
    await console.expect(READY_MARKER, BOOT_TIMEOUT)
    path = await pty_of(client, "tty1")
    assert f"char device redirected to {path} (label tty1)" in proc.stderr()
    slave = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        await through_pty(console, slave, "BEFORE")
        await logged(proc, "parked chardev 'tty1' pty")
        await drop(client)
        proc.process.kill()
        proc.process.wait()
        proc = restart(tmp_path, state, proc)
        client = await connect(proc)
        assert await pty_of(client, "tty1") == path, "the same pty, not a new one"
        await through_pty(console, slave, "AFTER")
    finally:
        os.close(slave)
    await console.close()
    await quit_and_disconnect(client)


async def pty_of(client: QMPClient, label: str) -> str:
    found = {c["label"]: c["filename"] for c in await client.execute("query-chardev")}
    assert found[label].startswith("pty:/dev/pts/"), found
    return str(found[label]).removeprefix("pty:")


async def through_pty(console: SocketConsole, slave: int, word: str) -> None:
    """The guest writes ``word`` to ttyS1 until the pty's slave reads it (a
    slave's opening is noticed within a second, as in QEMU)."""
    seen = b""
    async with asyncio.timeout(30):
        while word.encode() not in seen:
            await console.write(f"echo {word} > /dev/ttyS1\n")
            await asyncio.sleep(0.2)
            with contextlib.suppress(BlockingIOError):
                seen += os.read(slave, 4096)


async def test_a_connecting_console_redials_and_stays_connected_across_a_restart(
    tmp_path: Path, guest: GuestImage, state: Path
) -> None:
    """``-chardev socket,server=off,reconnect=1``: qmpvm dials the test's
    server, dials again when the server drops it, and its connection
    survives qmpvm's kill -9 (parked in the engine)."""
    path = tmp_path / "listening.sock"
    connections: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
    connections = asyncio.Queue()
    server = await asyncio.start_unix_server(lambda r, w: connections.put_nowait((r, w)), str(path))
    dialling = f"socket,id=ser0,path={path},server=off,reconnect=1"
    proc = start_qmpvm(tmp_path, *guest_options(guest, tmp_path, console=dialling), state_dir=state)
    try:
        client = await connect(proc)
        async with asyncio.timeout(BOOT_TIMEOUT):
            reader, writer = await connections.get()
            await reader.readuntil(READY_MARKER.encode())
        writer.close()  # dropped by the server: qmpvm dials again
        async with asyncio.timeout(30):
            reader, writer = await connections.get()
        await logged(proc, "parked a client of chardev 'ser0'", times=2)  # this connection
        await drop(client)
        proc.process.kill()
        proc.process.wait()
        writer.write(b"echo DIALLED-$((7 * 6))\n")  # while no qmpvm runs
        proc = restart(tmp_path, state, proc)
        client = await connect(proc)
        async with asyncio.timeout(30):
            await reader.readuntil(b"DIALLED-42")
        assert connections.empty(), "the same connection, not a new one"
        chardevs = {c["label"]: c["filename"] for c in await client.execute("query-chardev")}
        assert chardevs["ser0"] == "unix:"  # QEMU's name for a connected unix client
        writer.close()
        await quit_and_disconnect(client)
    finally:
        server.close()
