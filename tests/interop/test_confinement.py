"""The engine's confinement, as the kernel reports it for the process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import connect, quit_and_disconnect, start_qmpvm
from qemu.qmp import ExecuteError
from test_engine import BOOT_TIMEOUT, configure

from qmpvm.engine.cgroup import hierarchies
from qmpvm.engine.process import namespaces_wrapper
from qmpvm.images import READY_MARKER, GuestImage
from qmpvm.tools.console import RingbufConsole

pytestmark = pytest.mark.usefixtures("guest")


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split()[1]
    raise AssertionError(f"no {name} line")


@pytest.mark.parametrize("confined", [True, False])
async def test_the_engine_runs_unprivileged_under_a_syscall_filter(
    tmp_path: Path, guest: GuestImage, confined: bool
) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    await configure(client, guest, tmp_path, serial="ringbuf")
    with pytest.raises(ExecuteError, match=r"'confine\.files' is unexpected"):
        await client.execute("machine-set", {"confine": {"files": False}})
    if not confined:
        await client.execute("machine-set", {"confine": {"seccomp": False, "user": False}})
    await client.execute("machine-init")
    machine = await client.execute("query-machine")
    pid = machine["engine"]["pid"]
    confinement = machine["engine"]["confinement"]
    assert status_field(pid, "Seccomp") == ("2" if confined else "0")
    uid = int(status_field(pid, "Uid"))
    assert (uid >= 2_100_000_000) if confined else (uid == 0)
    assert confinement["seccomp"]["on"] is confined
    assert confinement["user"]["on"] is confined
    assert confinement["user"]["uid"] == uid
    if not confined:
        assert "lifted it" in confinement["seccomp"]["why"]
        assert "lifted it" in confinement["user"]["why"]
    assert confinement["no-new-privileges"] == {"on": True}
    if namespaces_wrapper():  # this host lets qmpvm make namespaces: a root of its own
        own = ["mnt", "ipc", "uts"] if confined else ["ipc", "uts"]
        assert confinement["namespaces"] == {"on": True, "own": own}
        assert confinement["root"]["on"] is confined
        assert not Path(f"/proc/{pid}/root/etc/passwd").exists() or not confined
        assert Path(f"/proc/{pid}/root/usr/share/qemu").is_dir()
    with pytest.raises(ExecuteError, match="'confine' is a boot-only setting"):
        await client.execute("machine-set", {"confine": {"seccomp": True}})
    await client.execute("cont")
    console = RingbufConsole(client, "ser0")  # qmpvm opened the kernel and initrd for it
    await console.expect(READY_MARKER, BOOT_TIMEOUT)
    # files the engine writes for a client: qmpvm opens them, the engine cannot
    saved, dump = tmp_path / "mem", tmp_path / "dump"
    await client.execute("pmemsave", {"val": 0, "size": 4096, "filename": str(saved)})
    assert saved.stat().st_size == 4096 and saved.stat().st_uid == os.getuid()
    await client.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{dump}"})
    assert dump.stat().st_size > 1 << 20
    missing = tmp_path / "no" / "mem"
    with pytest.raises(ExecuteError, match=f"Could not open '{missing}': No such file"):
        await client.execute("pmemsave", {"val": 0, "size": 1, "filename": str(missing)})
    await quit_and_disconnect(client)


async def test_what_the_engine_would_open_itself_keeps_it_privileged(
    tmp_path: Path, guest: GuestImage
) -> None:
    """A configuration naming a host path qmpvm does not open for the engine
    (here the log file of a chardev the engine serves) keeps it as qmpvm's
    user, and says why."""
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    await configure(client, guest, tmp_path, serial="ringbuf")
    udp = {"remote": {"type": "inet", "data": {"host": "127.0.0.1", "port": "9"}},
           "logfile": str(tmp_path / "udp.log")}  # fmt: skip
    await client.execute("chardev-add", {"id": "p", "backend": {"type": "udp", "data": udp}})
    await client.execute("machine-init")
    part = (await client.execute("query-machine"))["engine"]["confinement"]["user"]
    assert part["on"] is False and part["uid"] == 0
    assert "chardev 'p' writes its log file" in part["why"]
    await quit_and_disconnect(client)


def engine_cgroups(pid: int) -> dict[str, str]:
    """Controller (or "" for the unified hierarchy) -> the engine's cgroup path."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _number, names, path = line.split(":", 2)
        for name in names.split(",") if names else [""]:
            out[name] = path
    return out


def writable_cgroups() -> bool:
    found = hierarchies()
    return bool(found) and all(os.access(path, os.W_OK) for path in found.values())


@pytest.mark.skipif(not writable_cgroups(), reason="this host's cgroups are not writable")
async def test_the_engine_gets_a_cgroup_with_the_limits_set(
    tmp_path: Path, guest: GuestImage
) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    await configure(client, guest, tmp_path, serial="ringbuf")
    with pytest.raises(ExecuteError, match=r"'limits\.pids' must be greater than zero"):
        await client.execute("machine-set", {"limits": {"pids": 0}})
    limits = {"memory": 1 << 30, "pids": 512, "cpu": 1.5}
    await client.execute("machine-set", {"limits": limits})
    await client.execute("machine-init")
    machine = await client.execute("query-machine")
    pid = machine["engine"]["pid"]
    assert machine["engine"]["confinement"]["cgroup"] == {"on": True}
    groups = [path for path in hierarchies().values()]
    made = [group / f"qmpvm-engine-{pid}" for group in groups]
    for directory in made:
        assert str(pid) in (directory / "cgroup.procs").read_text().split()
    own = engine_cgroups(pid)
    for name in hierarchies():  # what /proc/PID/cgroup calls the unified one is ""
        assert own["" if name == "unified" else name].endswith(f"/qmpvm-engine-{pid}")
    written = {
        name: (directory / file).read_text().split()[0]
        for directory in made
        for name, file in (
            ("memory", "memory.limit_in_bytes"),
            ("pids", "pids.max"),
            ("cpu", "cpu.cfs_quota_us"),
        )
        if (directory / file).exists()
    }
    assert written == {"memory": str(1 << 30), "pids": "512", "cpu": "150000"}
    await client.execute("cont")
    assert (await client.execute("query-status"))["status"] == "running"
    await quit_and_disconnect(client)
    proc.process.wait(15)
    assert not any(directory.exists() for directory in made), "removed with the engine"


@pytest.mark.skipif(not writable_cgroups(), reason="this host's cgroups are not writable")
async def test_the_cgroup_can_be_left_off(tmp_path: Path, guest: GuestImage) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    await configure(client, guest, tmp_path, serial="ringbuf")
    await client.execute("machine-set", {"confine": {"cgroup": False}})
    await client.execute("machine-init")
    machine = await client.execute("query-machine")
    part = machine["engine"]["confinement"]["cgroup"]
    assert part["on"] is False and "lifted it" in part["why"]
    assert "qmpvm-engine" not in Path(f"/proc/{machine['engine']['pid']}/cgroup").read_text()
    await quit_and_disconnect(client)
