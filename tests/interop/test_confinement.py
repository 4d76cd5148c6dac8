"""The engine's confinement, as the kernel reports it for the process."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import connect, quit_and_disconnect, start_qmpvm
from qemu.qmp import ExecuteError
from test_engine import configure

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
    assert confinement["root"]["on"] is False and confinement["cgroup"]["on"] is False
    with pytest.raises(ExecuteError, match="'confine' is a boot-only setting"):
        await client.execute("machine-set", {"confine": {"seccomp": True}})
    await client.execute("cont")
    assert (await client.execute("query-status"))["status"] == "running"
    await quit_and_disconnect(client)
