"""The engine's confinement, as the kernel reports it for the process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import connect, quit_and_disconnect, start_qmpvm
from qemu.qmp import ExecuteError
from test_engine import configure

from qmpvm.engine.cgroup import hierarchies
from qmpvm.engine.process import namespaces_wrapper
from qmpvm.images import GuestImage

pytestmark = pytest.mark.usefixtures("guest")


def seccomp_mode(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Seccomp:"):
            return line.split()[1]
    raise AssertionError("no Seccomp line")


@pytest.mark.parametrize("seccomp", [True, False])
async def test_the_engine_runs_under_a_syscall_filter(
    tmp_path: Path, guest: GuestImage, seccomp: bool
) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    await configure(client, guest, tmp_path, serial="ringbuf")
    with pytest.raises(ExecuteError, match=r"'confine\.user' is unexpected"):
        await client.execute("machine-set", {"confine": {"user": False}})
    if not seccomp:
        await client.execute("machine-set", {"confine": {"seccomp": False}})
    await client.execute("machine-init")
    machine = await client.execute("query-machine")
    pid = machine["engine"]["pid"]
    confinement = machine["engine"]["confinement"]
    assert seccomp_mode(pid) == ("2" if seccomp else "0")
    assert confinement["seccomp"]["on"] is seccomp
    if not seccomp:
        assert "lifted it" in confinement["seccomp"]["why"]
    # what is not built yet says so, as the kernel sees the process
    assert confinement["user"] == {"on": False, "uid": 0, "why": confinement["user"]["why"]}
    assert "does not yet open the host resources" in confinement["user"]["why"]
    assert confinement["root"]["on"] is False
    assert confinement["no-new-privileges"] == {"on": True}
    if namespaces_wrapper():  # this host lets qmpvm make namespaces
        assert confinement["namespaces"] == {"on": True, "own": ["ipc", "uts"]}
    with pytest.raises(ExecuteError, match="'confine' is a boot-only setting"):
        await client.execute("machine-set", {"confine": {"seccomp": True}})
    await client.execute("cont")
    assert (await client.execute("query-status"))["status"] == "running"
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
