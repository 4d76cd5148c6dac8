"""Machine state with the real guest: snapshot to a directory, restore in a new
qmpvm, live migration between two qmpvm, and every refusal on the way.

The guest keeps a random token in its shell's memory and prints it with a
counter every 0.2 s; a restored or migrated guest must go on printing the
same token with a counter that continues, not one that starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import connect, next_event, quit_and_disconnect, start_qmpvm
from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient
from test_engine import BOOT_TIMEOUT, configure

from qmpvm.images import READY_MARKER, GuestImage, guest_cmdline
from qmpvm.state import snapshot as snap
from qmpvm.tools.console import SocketConsole

pytestmark = pytest.mark.usefixtures("guest")
TICK = re.compile(r"TICK (\w+) (\d+)")


async def start_ticker(console: SocketConsole) -> str:
    """The token the guest prints, its counter in the shell's memory."""
    token = secrets.token_hex(8)
    await console.run(f"T={token}; i=0")
    await console.write("while :; do echo TICK $T $i; i=$((i+1)); usleep 200000; done &\n")
    await console.expect(f"TICK {token} 3", 30)
    return token


async def last_tick(console: SocketConsole, token: str) -> int:
    """The highest counter printed so far, after waiting for a whole tick line
    received after this call (so two calls in a row see the guest count on)."""
    console.skip_received()
    await console.expect(f"TICK {token} ", 30)
    await console.expect("\n", 30)
    return max(int(n) for t, n in TICK.findall(console.transcript) if t == token)


async def first_tick(console: SocketConsole, timeout: float = 60) -> tuple[str, int]:
    """The first whole tick line a fresh console sees."""
    await console.expect("\n", timeout)  # whatever line was half-written
    while True:
        await console.expect("\n", timeout)
        found = TICK.findall(console.transcript)
        if found:
            token, number = found[0]
            return token, int(number)


async def booted(client: QMPClient, guest: GuestImage, tmp: Path) -> tuple[SocketConsole, Path]:
    path = await configure(client, guest, tmp)
    await client.execute("machine-init")
    await client.execute("cont")
    console = await SocketConsole.connect(str(path))
    await console.expect(READY_MARKER, BOOT_TIMEOUT)
    return console, path


async def test_snapshot_quit_restore_continues_the_guest(tmp_path: Path, guest: GuestImage) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    watcher = await connect(proc, "watcher")
    console, console_path = await booted(client, guest, tmp_path)
    token = await start_ticker(console)
    before = await last_tick(console, token)
    snapshot_dir = tmp_path / "snap"
    result = await client.execute("machine-snapshot", {"dir": str(snapshot_dir)})
    assert result["size"] > 10 << 20 and result["downtime"] >= 0
    event = await next_event(watcher, "MIGRATION", status="completed")
    assert event["data"]["status"] == "completed"
    # the guest runs on after a snapshot
    assert (await client.execute("query-status"))["status"] == "running"
    running_on = await last_tick(console, token)
    assert running_on > before
    manifest = json.loads((snapshot_dir / "manifest.json").read_text())
    assert manifest["machine"]["resolved-type"].startswith("pc-q35-")
    assert manifest["engine"]["version"] == (await client.execute("query-version"))["package"] or (
        manifest["engine"]["version"].count(".") == 2
    )
    assert set(manifest["files"]) == {"config.json", "state"}
    exported = await client.execute("config-export", {"diff": False})
    assert json.loads((snapshot_dir / "config.json").read_text()) == exported
    with pytest.raises(ExecuteError, match="already holds a snapshot"):
        await client.execute("machine-snapshot", {"dir": str(snapshot_dir)})
    await console.close()
    await drop(watcher)
    await quit_and_disconnect(client)
    proc.process.wait(15)

    again = start_qmpvm(tmp_path, name="again")
    client = await connect(again)
    with pytest.raises(ExecuteError, match="needs a machine"):
        await client.execute("machine-snapshot", {"dir": str(tmp_path / "x")})
    await client.execute("machine-restore", {"dir": str(snapshot_dir)})
    assert (await client.execute("query-status"))["status"] == "running"
    assert await client.execute("config-export", {"diff": False}) == exported
    console = await SocketConsole.connect(str(console_path))
    seen, counter = await first_tick(console)
    assert seen == token, "the restored guest prints the token it had in memory"
    assert before <= counter <= running_on + 5, (
        f"the counter continues from the snapshot ({before}..{running_on}), it is {counter}"
    )
    later = await last_tick(console, token)
    assert later >= counter
    with pytest.raises(ExecuteError, match="only allowed before machine-init"):
        await client.execute("machine-restore", {"dir": str(snapshot_dir)})
    await console.close()
    await quit_and_disconnect(client)


async def test_restore_refuses_bad_snapshots_and_changes_nothing(
    tmp_path: Path, guest: GuestImage
) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    console, _ = await booted(client, guest, tmp_path)
    await console.close()
    good = tmp_path / "good"
    await client.execute("machine-snapshot", {"dir": str(good), "stop": True})
    assert (await client.execute("query-status"))["running"] is False
    await quit_and_disconnect(client)
    proc.process.wait(15)

    fresh = start_qmpvm(tmp_path, name="fresh")
    client = await connect(fresh)
    await client.execute("machine-set", {"name": "kept"})
    before = await client.execute("config-export")

    def broken(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(good, copy)
        return copy

    incomplete = broken("incomplete")
    (incomplete / "manifest.json").unlink()
    truncated = broken("truncated")
    with (truncated / "state").open("r+b") as state:
        state.truncate(1000)
    flipped = broken("flipped")
    with (flipped / "state").open("r+b") as state:
        state.seek(-4096, 2)
        byte = state.read(1)
        state.seek(-4096, 2)
        state.write(bytes([byte[0] ^ 0xFF]))
    garbled = broken("garbled")
    (garbled / "manifest.json").write_text("{not json")
    other_engine = broken("other-engine")
    manifest = json.loads((other_engine / "manifest.json").read_text())
    manifest["engine"]["version"] = "6.2.0"
    (other_engine / "manifest.json").write_text(json.dumps(manifest))
    bad_config = broken("bad-config")
    text = (bad_config / "config.json").read_text()
    (bad_config / "config.json").write_text(text.replace("ser0", "serX"))  # same size
    cases = {
        tmp_path / "missing": "has no manifest.json",
        incomplete: "is incomplete: it has no manifest.json",
        truncated: "state has 1000 bytes",
        flipped: "fails its checksum",
        garbled: "is corrupt",
        other_engine: "written by engine version 6.2.0",
        bad_config: "config.json does not match its checksum",
    }
    for directory, message in cases.items():
        with pytest.raises(ExecuteError, match=message):
            await client.execute("machine-restore", {"dir": str(directory)})
        assert await client.execute("config-export") == before, directory.name
        status = await client.execute("query-status")
        assert status["phase"] == "no-machine", directory.name
    await client.execute("machine-restore", {"dir": str(good), "paused": True})
    status = await client.execute("query-status")
    assert (status["status"], status["phase"]) == ("paused", "machine-ready")
    await quit_and_disconnect(client)


async def test_snapshot_refuses_what_it_cannot_restore(tmp_path: Path, guest: GuestImage) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    await configure(client, guest, tmp_path)
    await client.execute("machine-set", {"snapshot": True})
    await client.execute("machine-init")
    with pytest.raises(ExecuteError, match="-snapshot"):
        await client.execute("machine-snapshot", {"dir": str(tmp_path / "s1")})
    assert not (tmp_path / "s1").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExecuteError, match="is not a directory"):
        await client.execute("machine-snapshot", {"dir": str(tmp_path / "file")})
    await quit_and_disconnect(client)


@pytest.mark.parametrize("monitor", ["unix", "tcp"])
async def test_live_migration_between_two_qmpvm(
    tmp_path: Path, guest: GuestImage, monitor: str
) -> None:
    source = start_qmpvm(tmp_path, name="source")
    uri, extra = f"unix:{tmp_path / 'destination.sock'}", []
    if monitor == "tcp":
        uri = f"tcp:127.0.0.1:{free_port()}"
        extra = ["-qmp", f"{uri},server=on,wait=off"]
    destination = start_qmpvm(tmp_path, *extra, "--preconfig", name="destination")
    client = await connect(source)
    console, console_path = await booted(client, guest, tmp_path)
    token = await start_ticker(console)
    before = await last_tick(console, token)
    far = await connect(destination, "far")
    schema = await far.execute("query-qmp-schema")
    assert {"machine-migrate", "machine-receive"} <= {e["name"] for e in schema}
    result = await client.execute("machine-migrate", {"uri": uri})
    assert result["status"] == "completed"
    assert result["total-time"] > 0 and result["downtime"] >= 0 and result["transferred"] > 0
    done = await next_event(far, "MACHINE_MIGRATION", status="completed")
    assert done["data"]["role"] == "destination"
    status = await client.execute("query-status")
    assert (status["status"], status["phase"]) == ("postmigrate", "no-machine")
    assert (await client.execute("query-migrate"))["status"] == "completed"
    assert (await far.execute("query-status"))["status"] == "running"
    assert await far.execute("config-export") == await client.execute("config-export")
    await console.close()
    console = await SocketConsole.connect(str(console_path))
    seen, counter = await first_tick(console)
    assert seen == token
    assert counter >= before, f"the counter continues from {before}: it is {counter}"
    await console.close()
    # the source's machine went; its configuration stays, and a second move is refused
    with pytest.raises(ExecuteError, match="needs a machine"):
        await client.execute("machine-migrate", {"uri": uri})
    await quit_and_disconnect(client)
    await quit_and_disconnect(far)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_migration_refusals_leave_the_source_running(
    tmp_path: Path, guest: GuestImage
) -> None:
    source = start_qmpvm(tmp_path, name="source")
    client = await connect(source)
    console, _ = await booted(client, guest, tmp_path)
    await console.close()
    with pytest.raises(ExecuteError, match="cannot reach the destination"):
        await client.execute("machine-migrate", {"uri": f"unix:{tmp_path / 'nobody.sock'}"})
    with pytest.raises(ExecuteError, match="not a monitor address"):
        await client.execute("machine-migrate", {"uri": "exec:true"})
    other = start_qmpvm(tmp_path, "--preconfig", name="other")
    far = await connect(other, "far")
    await far.execute("machine-set", {"name": "different"})
    with pytest.raises(ExecuteError, match="different configuration"):
        await client.execute("machine-migrate", {"uri": f"unix:{other.socket}"})
    await far.execute("machine-set", {"type": "none"})
    await far.execute("machine-init")
    with pytest.raises(ExecuteError, match="the destination has a machine"):
        await client.execute("machine-migrate", {"uri": f"unix:{other.socket}"})
    assert (await client.execute("query-status"))["status"] == "running"
    await quit_and_disconnect(far)
    await quit_and_disconnect(client)


@pytest.mark.parametrize("failure", ["cancel", "destination-dies", "source-dies"])
async def test_a_failed_migration_loses_nothing(
    tmp_path: Path, guest: GuestImage, failure: str
) -> None:
    """migrate_cancel or the destination dying: the source runs on and the
    destination has no machine; the source dying: the destination has no
    machine and keeps the replayed configuration."""
    source = start_qmpvm(tmp_path, name="source")
    destination = start_qmpvm(tmp_path, "--preconfig", name="destination")
    client, watcher = await connect(source), await connect(source, "watcher")
    console, _ = await booted(client, guest, tmp_path)
    token = await start_ticker(console)
    far = await connect(destination, "far")
    # slow enough that the stream is still going when the failure comes
    await client.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})
    moving = asyncio.create_task(
        client.execute("machine-migrate", {"uri": f"unix:{destination.socket}"})
    )
    await next_event(watcher, "MIGRATION", status="active")
    if failure == "cancel":
        await watcher.execute("migrate_cancel")
    elif failure == "destination-dies":
        destination.process.kill()
    else:
        source.process.kill()
        event = await next_event(far, "MACHINE_MIGRATION", status="failed")
        assert event["data"]["role"] == "destination"
        status = await far.execute("query-status")
        assert status["phase"] == "no-machine"
        exported = await far.execute("config-export")
        assert any(c["execute"] == "boot-set" for c in exported), "the replayed config is kept"
        await quit_and_disconnect(far)
        with contextlib.suppress(EOFError, ConnectionError, ExecInterruptedError):
            await moving
        await drop(client, watcher)
        return
    with pytest.raises(ExecuteError, match="migration"):
        await moving
    assert (await watcher.execute("query-status"))["status"] == "running"
    after = await last_tick(console, token)
    assert await last_tick(console, token) > after, "the source's guest runs on"
    if failure == "cancel":
        event = await next_event(far, "MACHINE_MIGRATION", status="failed")
        assert (await far.execute("query-status"))["phase"] == "no-machine"
        await quit_and_disconnect(far)
    else:
        await drop(far)
    await console.close()
    await drop(watcher)
    await quit_and_disconnect(client)


async def drop(*clients: QMPClient) -> None:
    """Disconnect clients whose server may be gone."""
    for client in clients:
        with contextlib.suppress(EOFError, ConnectionError):
            await client.disconnect()


async def test_fast_restore_maps_the_snapshot_memory(tmp_path: Path, guest: GuestImage) -> None:
    """RAM in a shared file: the state stream leaves its pages out, the snapshot
    keeps a copy, and a restore maps that copy-on-write, leaving it intact."""
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    ram = {"qom-type": "memory-backend-file", "id": "ram", "size": 256 << 20,
           "mem-path": str(tmp_path / "guest-ram"), "share": True}  # fmt: skip
    await client.execute("object-add", ram)
    await client.execute("machine-set", {"properties": {"memory-backend": "ram"}})
    console, console_path = await booted(client, guest, tmp_path)
    token = await start_ticker(console)
    before = await last_tick(console, token)
    snapshot_dir = tmp_path / "fast"
    await client.execute("machine-snapshot", {"dir": str(snapshot_dir), "stop": True})
    state_size = (snapshot_dir / "state").stat().st_size
    assert state_size < 4 << 20, f"RAM left out of the stream: {state_size} bytes"
    memory = snapshot_dir / "memory" / "ram"
    manifest = json.loads((snapshot_dir / "manifest.json").read_text())
    assert manifest["ignore-shared"] is True
    assert manifest["files"]["memory/ram"]["size"] == 256 << 20
    await console.close()
    await quit_and_disconnect(client)
    proc.process.wait(15)
    digest = snap.file_sha256(memory)

    for round_ in range(2):  # the snapshot is left as it was: it restores again
        again = start_qmpvm(tmp_path, name=f"again{round_}")
        client = await connect(again)
        await client.execute("machine-restore", {"dir": str(snapshot_dir)})
        machine = await client.execute("query-machine")
        assert machine["engine"]["memory-from"] == str(snapshot_dir)
        console = await SocketConsole.connect(str(console_path))
        seen, counter = await first_tick(console)
        assert seen == token and counter >= before
        await last_tick(console, token)
        await console.close()
        await quit_and_disconnect(client)
        again.process.wait(15)
        assert snap.file_sha256(memory) == digest, "the snapshot's memory is unchanged"


def guest_options(
    guest: GuestImage, tmp: Path, *extra: str, console: str | None = None
) -> list[str]:
    """The test guest as a QEMU command line, its console on a socket
    (``console``: the -chardev of another one, id ser0)."""
    console = console or f"socket,id=ser0,path={tmp / 'ttyS0.sock'},server=on,wait=off"
    return [
        "-machine", "q35", "-accel", "tcg", "-m", "256", "-nodefaults",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
        "-append", guest_cmdline("q35"),
        "-chardev", console, "-serial", "chardev:ser0", *extra,
    ]  # fmt: skip


async def test_command_line_restore_and_incoming(tmp_path: Path, guest: GuestImage) -> None:
    """``--restore DIR``, and QEMU's ``-incoming defer`` + ``migrate-incoming``."""
    console_path = tmp_path / "ttyS0.sock"
    proc = start_qmpvm(tmp_path, *guest_options(guest, tmp_path))
    client = await connect(proc)
    console = await SocketConsole.connect(str(console_path))
    await console.expect(READY_MARKER, BOOT_TIMEOUT)
    token = await start_ticker(console)
    before = await last_tick(console, token)
    snapshot_dir = tmp_path / "snap"
    live = {"dir": str(snapshot_dir), "live": True, "stop": True}
    figures = await client.execute("machine-snapshot", live)
    assert 0 <= figures["downtime"] <= figures["total-time"]
    assert (await client.execute("query-status"))["status"] == "postmigrate"
    await console.close()
    await quit_and_disconnect(client)
    proc.process.wait(15)

    restored = start_qmpvm(tmp_path, "--restore", str(snapshot_dir), name="restored")
    client = await connect(restored)
    assert (await client.execute("query-status"))["status"] == "running"
    console = await SocketConsole.connect(str(console_path))
    assert await first_tick(console) >= (token, before)
    await console.close()
    await quit_and_disconnect(client)
    restored.process.wait(15)

    incoming = start_qmpvm(
        tmp_path, *guest_options(guest, tmp_path, "-incoming", "defer"), name="incoming"
    )
    client = await connect(incoming)
    assert (await client.execute("query-status"))["status"] == "inmigrate"
    port = free_port()  # for the engine to listen on
    events = [{"capability": "events", "state": True}]
    await client.execute("migrate-set-capabilities", {"capabilities": events})
    await client.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((snapshot_dir / "state").read_bytes())
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    # the stream says the guest ran when it was saved, and the command line's
    # cont asked for it to run: it runs once loaded, as with QEMU
    await next_event(client, "RESUME")
    assert (await client.execute("query-migrate"))["status"] == "completed"
    console = await SocketConsole.connect(str(console_path))
    assert await first_tick(console) >= (token, before)
    await console.close()
    await quit_and_disconnect(client)


async def test_internal_snapshots_and_loadvm(tmp_path: Path, guest: GuestImage) -> None:
    """QEMU's qcow2 snapshot jobs through qmpvm, their jobs visible, and ``-loadvm``."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    disk = ["-blockdev", f"driver=qcow2,node-name=d0,file.driver=file,file.filename={image}",
            "-device", "virtio-blk-pci,drive=d0,id=vda"]  # fmt: skip
    proc = start_qmpvm(tmp_path, *guest_options(guest, tmp_path, *disk))
    client = await connect(proc)
    console = await SocketConsole.connect(str(tmp_path / "ttyS0.sock"))
    await console.expect(READY_MARKER, BOOT_TIMEOUT)
    token = await start_ticker(console)
    before = await last_tick(console, token)
    for command, arguments in (
        ("snapshot-save", {"tag": "t1", "vmstate": "d0", "devices": ["d0"]}),
        ("snapshot-save", {"tag": "t2", "vmstate": "d0", "devices": ["d0"]}),
        ("snapshot-delete", {"tag": "t2", "devices": ["d0"]}),
    ):
        job = f"{command}-{arguments['tag']}"
        await client.execute(command, {"job-id": job, **arguments})
        await next_event(client, "JOB_STATUS_CHANGE", id=job, status="concluded")
        jobs = await client.execute("query-jobs")
        assert [j["status"] for j in jobs if j["id"] == job] == ["concluded"], jobs
        await client.execute("job-dismiss", {"id": job})
    info = subprocess.run(
        ["qemu-img", "snapshot", "-U", "-l", str(image)], check=True, capture_output=True, text=True
    )
    assert " t1 " in info.stdout and " t2 " not in info.stdout, info.stdout
    await console.close()
    await quit_and_disconnect(client)
    proc.process.wait(15)

    loaded = start_qmpvm(tmp_path, *guest_options(guest, tmp_path, *disk, "-loadvm", "t1"),
                         name="loaded")  # fmt: skip
    client = await connect(loaded)
    console = await SocketConsole.connect(str(tmp_path / "ttyS0.sock"))
    assert await first_tick(console) >= (token, before)
    await console.close()
    await quit_and_disconnect(client)
