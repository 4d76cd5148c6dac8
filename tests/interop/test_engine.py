"""A real machine: QEMU on TCG boots the guest, configured over QMP only."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    connect,
    needs_qemu,
    next_event,
    pids_of,
    quit_and_disconnect,
    start_qmpvm,
)
from qemu.qmp import ExecuteError, QMPClient

from qmpvm.images import READY_MARKER, GuestImage, guest_cmdline
from qmpvm.tools.console import RingbufConsole, SocketConsole

pytestmark = needs_qemu
MiB = 1024 * 1024
BOOT_TIMEOUT = 60


def socket_chardev(chardev_id: str, path: Path) -> dict[str, object]:
    addr = {"type": "unix", "data": {"path": str(path)}}
    return {
        "id": chardev_id,
        "backend": {"type": "socket", "data": {"addr": addr, "server": True, "wait": False}},
    }


async def configure(
    client: QMPClient, guest: GuestImage, tmp: Path, *, machine: str = "q35", serial: str = "socket"
) -> Path:
    """The guest, its console on ttyS0; returns the console socket path."""
    await client.execute("machine-set", {"type": machine, "accel": "tcg", "memory": 256 * MiB})
    await client.execute(
        "boot-set",
        {
            "kernel": str(guest.kernel),
            "initrd": str(guest.initrd),
            "append": guest_cmdline(machine),
        },
    )
    console = tmp / "ttyS0.sock"
    if serial == "socket":
        await client.execute("chardev-add", socket_chardev("ser0", console))
    else:
        await client.execute(
            "chardev-add", {"id": "ser0", "backend": {"type": "ringbuf", "data": {"size": 1 << 20}}}
        )
    await client.execute("device_add", {"driver": "isa-serial", "chardev": "ser0", "id": "serial0"})
    return console


def disk(tmp: Path, name: str, size: int = 2 * MiB) -> tuple[Path, str]:
    path = tmp / name
    path.write_bytes(os.urandom(size))
    return path, hashlib.md5(path.read_bytes()).hexdigest()


def raw_node(node: str, path: Path) -> dict[str, object]:
    return {"driver": "raw", "node-name": node, "file": {"driver": "file", "filename": str(path)}}


async def test_boot_to_ready_marker_on_a_ringbuf_serial(tmp_path: Path, guest: GuestImage) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    await configure(client, guest, tmp_path, serial="ringbuf")
    await client.execute("machine-init")
    status = await client.execute("query-status")
    assert status == {
        "status": "prelaunch",
        "running": False,
        "singlestep": False,
        "phase": "machine-ready",
    }
    await client.execute("cont")
    await RingbufConsole(client, "ser0").expect(READY_MARKER, BOOT_TIMEOUT)
    assert (await client.execute("query-status"))["status"] == "running"
    hmp = "human-monitor-command"
    assert "running" in await client.execute(hmp, {"command-line": "info status"})
    with pytest.raises(ExecuteError, match="HMP command 'device_del' is not relayed"):
        await client.execute(hmp, {"command-line": "device_del serial0"})
    # issue 7: QEMU ends a name at "/"; configuration and host programs stay out
    marker = tmp_path / "exec-ran"
    for line in (
        "drive_add/ if=none,id=hd1,file=/dev/null,format=raw",
        "object_add secret,id=s,data=x",
        "qom-set /machine/unattached kvm-pit off",
        "  netdev_add user,id=n9",
    ):
        with pytest.raises(ExecuteError, match="is not relayed"):
            await client.execute(hmp, {"command-line": line})
    with pytest.raises(ExecuteError, match="--allow-host-programs"):
        await client.execute(hmp, {"command-line": f"migrate -d exec:touch {marker}"})
    with pytest.raises(ExecuteError, match="the shell command 'touch"):
        await client.execute("migrate", {"uri": f"exec:touch {marker}"})
    assert not marker.exists()
    assert "hd1" not in str(await client.execute("query-block"))
    machine = await client.execute("query-machine")
    assert machine["engine"]["accel"] == "tcg"
    assert (await client.execute("query-kvm"))["enabled"] is False
    assert await client.execute(hmp, {"command-line": "quit"}) == ""  # QEMU's: all of it ends
    with contextlib.suppress(EOFError, ConnectionError):
        await client.disconnect()
    proc.process.wait(15)
    assert proc.process.returncode == 0
    assert machine["engine"]["pid"] not in pids_of("qemu-system-x86_64"), (
        "quit leaves no engine behind"
    )
    assert not proc.socket.exists()


async def test_disk_hotplug_unplug_and_two_clients_hear_shutdown(
    tmp_path: Path, guest: GuestImage
) -> None:
    proc = start_qmpvm(tmp_path)
    client, watcher = await connect(proc), await connect(proc)
    console_path = await configure(client, guest, tmp_path)
    cold, cold_md5 = disk(tmp_path, "cold.raw")
    hot, hot_md5 = disk(tmp_path, "hot.raw", 3 * MiB)
    await client.execute("blockdev-add", raw_node("d0", cold))
    await client.execute("device_add", {"driver": "virtio-blk-pci", "drive": "d0", "id": "vda"})
    await client.execute("machine-init")
    await client.execute("cont")
    console = await SocketConsole.connect(str(console_path))
    await console.expect(READY_MARKER, BOOT_TIMEOUT)
    assert (await console.run("md5sum /dev/vda")).split()[0] == cold_md5

    with pytest.raises(ExecuteError, match="'memory' is a boot-only setting"):
        await client.execute("machine-set", {"memory": 512 * MiB})
    with pytest.raises(ExecuteError, match="'kernel' is a boot-only setting"):
        await client.execute("boot-set", {"kernel": str(guest.kernel)})
    with pytest.raises(ExecuteError, match="only allowed before machine-init"):
        await client.execute("machine-init")

    await client.execute("blockdev-add", raw_node("d1", hot))
    await client.execute("device_add", {"driver": "virtio-blk-pci", "drive": "d1", "id": "vdb"})
    wait_for_vdb = "for i in $(seq 20); do [ -e /sys/block/vdb ] && break; sleep 0.5; done"
    assert "vdb" in await console.run(f"{wait_for_vdb}; ls /sys/block")
    assert (await console.run("md5sum /dev/vdb")).split()[0] == hot_md5

    passed, passed_md5 = disk(tmp_path, "passed.raw")  # opened by the client, not by path
    fd = os.open(passed, os.O_RDWR)
    try:
        client.send_fd_scm(fd)
        fdset = (await client.execute("add-fd", {"opaque": "passed.raw"}))["fdset-id"]
    finally:
        os.close(fd)
    file = {"driver": "file", "filename": f"/dev/fdset/{fdset}"}
    await client.execute("blockdev-add", {"driver": "raw", "node-name": "d2", "file": file})
    await client.execute("device_add", {"driver": "virtio-blk-pci", "drive": "d2", "id": "vdc"})
    wait_for_vdc = wait_for_vdb.replace("vdb", "vdc")
    assert (await console.run(f"{wait_for_vdc}; md5sum /dev/vdc")).split()[0] == passed_md5
    export = await client.execute("config-export")
    assert {
        "execute": "device_add",
        "arguments": {"driver": "virtio-blk-pci", "drive": "d1", "id": "vdb"},
    } in export
    machine = await client.execute("query-machine")
    assert "qmpvm-hp0" in machine["engine"]["hotplug-ports"]
    pci = await client.execute("query-pci")
    assert pci, "the running machine answers query-pci"

    with pytest.raises(ExecuteError, match="is in use by device 'vdb'"):
        await client.execute("blockdev-del", {"node-name": "d1"})
    await client.execute("device_del", {"id": "vdb"})
    deleted = await next_event(watcher, "DEVICE_DELETED", device="vdb")
    assert deleted["data"]["path"] == "/machine/peripheral/vdb"
    devices = (await client.execute("query-machine"))["devices"]
    assert all(d.get("id") != "vdb" for d in devices), (
        "the store forgets the device on DEVICE_DELETED"
    )
    await client.execute("blockdev-del", {"node-name": "d1"})
    assert all(
        n["node-name"] != "d1" for n in (await client.execute("query-machine"))["block-nodes"]
    )

    await console.write("poweroff -f\n")
    first, second = await asyncio.gather(
        next_event(client, "SHUTDOWN"), next_event(watcher, "SHUTDOWN")
    )
    assert first["data"]["guest"] is True and second["data"]["guest"] is True
    exit_event = await next_event(client, "ENGINE_EXIT")
    assert exit_event["data"]["status"] == "shutdown"
    status = await client.execute("query-status")
    assert status["status"] == "shutdown" and status["phase"] == "no-machine"
    devices = (await client.execute("query-machine"))["devices"]
    assert [d.get("id") for d in devices] == ["serial0", "vda", "vdc"], "the store is intact"
    await console.close()
    await client.disconnect()
    await watcher.disconnect()
    proc.stop()


async def test_engine_killed_then_machine_init_boots_again(
    tmp_path: Path, guest: GuestImage
) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    await configure(client, guest, tmp_path, serial="ringbuf")
    await client.execute("machine-init")
    await client.execute("cont")
    await RingbufConsole(client, "ser0").expect(READY_MARKER, BOOT_TIMEOUT)
    engine_pid = (await client.execute("query-machine"))["engine"]["pid"]
    os.kill(engine_pid, signal.SIGKILL)
    event = await next_event(client, "ENGINE_EXIT")
    assert event["data"]["status"] == "internal-error"
    assert event["data"]["signal"] == "SIGKILL"
    status = await client.execute("query-status")
    assert status == {
        "status": "internal-error",
        "running": False,
        "singlestep": False,
        "phase": "no-machine",
    }
    assert "SIGKILL" in (await client.execute("query-machine"))["last-exit"]["reason"]
    assert proc.process.poll() is None, "qmpvm stays up"
    await client.execute("machine-init")
    await client.execute("cont")
    await RingbufConsole(client, "ser0").expect(READY_MARKER, BOOT_TIMEOUT)
    new_pid = (await client.execute("query-machine"))["engine"]["pid"]
    assert new_pid != engine_pid
    proc.process.send_signal(signal.SIGTERM)
    proc.process.wait(15)
    await client.disconnect()
    deadline = time.monotonic() + 5
    while new_pid in pids_of("qemu-system-x86_64") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert new_pid not in pids_of("qemu-system-x86_64"), "SIGTERM to qmpvm stops the engine"


async def test_qmpvm_killed_takes_its_engine_along(tmp_path: Path, guest: GuestImage) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    await configure(client, guest, tmp_path, serial="ringbuf")
    await client.execute("machine-init")
    engine_pid = (await client.execute("query-machine"))["engine"]["pid"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.process.wait()
    deadline = time.monotonic() + 5
    while engine_pid in pids_of("qemu-system-x86_64") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert engine_pid not in pids_of("qemu-system-x86_64"), "no orphan engine outlives qmpvm"


async def test_engine_capabilities_checked_when_issued(tmp_path: Path, guest: GuestImage) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    with pytest.raises(ExecuteError, match="'virtio-floppy' is not a valid device model name"):
        await client.execute("device_add", {"driver": "virtio-floppy"})
    with pytest.raises(ExecuteError, match=r"Property 'virtio-rng-pci\.colour' not found"):
        await client.execute("device_add", {"driver": "virtio-rng-pci", "colour": "blue"})
    with pytest.raises(ExecuteError, match="Machine type 'pdp11' is not supported"):
        await client.execute("machine-set", {"type": "pdp11"})
    names = {m["name"] for m in await client.execute("query-machines")}
    assert {"q35", "microvm"} <= names or any(n.startswith("pc-q35") for n in names)
    props = {
        p["name"]
        for p in await client.execute("device-list-properties", {"typename": "virtio-blk-pci"})
    }
    assert "drive" in props
    assert (await client.execute("query-machine"))["devices"] == []
    await client.disconnect()
    proc.stop()


async def test_failed_machine_init_leaves_nothing_behind(tmp_path: Path, guest: GuestImage) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    await configure(client, guest, tmp_path, serial="ringbuf")
    await client.execute("blockdev-add", raw_node("gone", tmp_path / "missing.raw"))
    with pytest.raises(ExecuteError) as caught:
        await client.execute("machine-init")
    assert "missing.raw" in str(caught.value), "the engine's own words"
    status = await client.execute("query-status")
    assert status["phase"] == "no-machine"
    # only this qmpvm's children: other tests or users may run engines meanwhile
    engines = {p for p in pids_of("qemu-system-x86_64") if _ppid(p) == proc.pid}
    assert engines == set(), "no engine left behind"
    await client.execute("blockdev-del", {"node-name": "gone"})
    await client.execute("machine-init")
    assert (await client.execute("query-status"))["phase"] == "machine-ready"
    await quit_and_disconnect(client)
    proc.process.wait(15)


async def test_microvm_refuses_hotplug(tmp_path: Path, guest: GuestImage) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    await configure(client, guest, tmp_path, machine="microvm", serial="ringbuf")
    await client.execute("machine-init")
    await client.execute("cont")
    await RingbufConsole(client, "ser0").expect(READY_MARKER, BOOT_TIMEOUT)
    hot, _ = disk(tmp_path, "hot.raw")
    await client.execute("blockdev-add", raw_node("d1", hot))
    with pytest.raises(ExecuteError, match="cannot be hot-plugged: machine type 'microvm'"):
        await client.execute(
            "device_add", {"driver": "virtio-blk-device", "drive": "d1", "id": "vdb"}
        )
    assert all(d.get("id") != "vdb" for d in (await client.execute("query-machine"))["devices"])
    await quit_and_disconnect(client)
    proc.process.wait(15)


def test_without_a_monitor_qmpvm_lives_as_long_as_its_engine(
    tmp_path: Path, guest: GuestImage
) -> None:
    serial = tmp_path / "serial.txt"
    argv = ["-M", "q35,accel=tcg", "-m", "256", "-kernel", str(guest.kernel)]
    argv += ["-initrd", str(guest.initrd), "-append", guest_cmdline("q35")]
    argv += ["-chardev", f"file,id=s0,path={serial}", "-serial", "chardev:s0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpvm", *argv], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not (serial.exists() and READY_MARKER in serial.read_text(errors="replace")):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the guest did not boot"
            time.sleep(0.05)
        (engine,) = [p for p in pids_of("qemu-system-x86_64") if _ppid(p) == proc.pid]
        os.kill(engine, signal.SIGKILL)
        _out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 1, "a machine that died is a failure, as it would be for QEMU"
    assert "qmpvm: the engine exited:" in err.decode() and "SIGKILL" in err.decode()


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


async def test_a_ringbuf_keeps_the_last_output_after_power_off(
    tmp_path: Path, guest: GuestImage
) -> None:
    """The guest prints its last line into a ringbuf and powers off: the
    ringbuf is qmpvm's, and ringbuf-read answers after the engine is gone."""
    proc = start_qmpvm(tmp_path)
    client, watcher = await connect(proc), await connect(proc, "watcher")
    console_path = await configure(client, guest, tmp_path)
    ring = {"id": "ring1", "backend": {"type": "ringbuf", "data": {"size": 4096}}}
    await client.execute("chardev-add", ring)
    await client.execute("device_add", {"driver": "isa-serial", "chardev": "ring1", "id": "s1"})
    await client.execute("machine-init")
    await client.execute("cont")
    console = await SocketConsole.connect(str(console_path))
    await console.expect(READY_MARKER, BOOT_TIMEOUT)
    await console.write("echo LAST-WORDS > /dev/ttyS1; poweroff -f\n")
    events = []
    async with asyncio.timeout(60):
        async for event in watcher.events:
            events.append(event["event"])
            if event["event"] == "ENGINE_EXIT":
                assert event["data"]["reason"] == "guest shut down"
                break
    assert events.count("SHUTDOWN") == 1
    assert "STOP" not in events[events.index("SHUTDOWN") :], "as QEMU: no pause after power-off"
    status = await client.execute("query-status")
    assert (status["status"], status["phase"]) == ("shutdown", "no-machine")
    read = {"device": "ring1", "size": 4096}
    assert "LAST-WORDS" in await client.execute("ringbuf-read", read)
    assert await client.execute("ringbuf-read", read) == "", "read once, as QEMU's buffer"
    with pytest.raises(ExecuteError, match="ser0 is not a ringbuf device"):
        await client.execute("ringbuf-read", {"device": "ser0", "size": 10})
    # the socket console's history outlives the engine too (the command it echoed)
    history = await client.execute("console-history", {"device": "ser0"})
    assert "LAST-WORDS > /dev/ttyS1" in history["data"]
    await console.close()
    await watcher.disconnect()
    await quit_and_disconnect(client)
