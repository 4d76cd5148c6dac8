"""The monitor on real sockets, driven by the real qemu.qmp client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import QmpvmProcess, connect, quit_and_disconnect, start_qmpvm
from qemu.qmp import ExecuteError, QMPClient


def raw_connect(proc: QmpvmProcess) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(proc.socket))
    sock.settimeout(10)
    return sock


def read_lines(sock: socket.socket, count: int) -> list[dict[str, object]]:
    data = b""
    while data.count(b"\r\n") < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return [json.loads(line) for line in data.split(b"\r\n")[:count]]


async def test_greeting_negotiation_and_wire_format(qmpvm: QmpvmProcess) -> None:
    sock = raw_connect(qmpvm)
    (greeting,) = read_lines(sock, 1)
    assert greeting["QMP"]["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
    assert greeting["QMP"]["version"]["package"].startswith("qmpvm ")
    sock.sendall(b'{"execute": "query-status", "id": "early"}')
    sock.sendall(
        b"{'execute': 'qmp_capabilities', 'id': 1}{\"execute\": \"qmp_capabilities\", \"id\": 2}"
    )
    sock.sendall(b'{"execute": "query-status", "id": {"nested": [1]}}')
    lines = read_lines(sock, 4)
    assert lines[0] == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
        "id": "early",
    }
    assert lines[1] == {"return": {}, "id": 1}
    assert lines[2]["error"]["class"] == "CommandNotFound"
    assert lines[2]["id"] == 2
    assert lines[3]["id"] == {"nested": [1]}
    assert lines[3]["return"]["phase"] == "no-machine"
    sock.close()


async def test_socket_is_private(qmpvm: QmpvmProcess) -> None:
    assert stat.S_IMODE(qmpvm.socket.stat().st_mode) == 0o600


async def test_garbage_on_one_connection_while_another_is_served(qmpvm: QmpvmProcess) -> None:
    good = await connect(qmpvm)
    bad = raw_connect(qmpvm)
    read_lines(bad, 1)
    bad.sendall(b'{"execute": "qmp_capabilities"}')
    read_lines(bad, 1)
    bad.sendall(b'\xff\x00}}}]] {"execute": [} not json \x01\x02' + os.urandom(4096))
    for _ in range(20):
        assert (await good.execute("query-status"))["phase"] == "no-machine"
    bad.sendall(b'\xff {"execute": "query-name", "id": "still-alive"}')  # 0xFF resyncs
    deadline = time.monotonic() + 5
    seen = b""
    while b"still-alive" not in seen and time.monotonic() < deadline:
        seen += bad.recv(65536)
    assert b'"id": "still-alive"' in seen  # the garbage was answered, the session resynced
    bad.close()
    await good.disconnect()


async def test_a_client_that_never_reads_stalls_only_itself(qmpvm: QmpvmProcess) -> None:
    hog = raw_connect(qmpvm)
    read_lines(hog, 1)
    hog.setblocking(False)
    payload = b'{"execute": "qmp_capabilities"}' + b'{"execute": "query-qmp-schema"}' * 2000
    sent = 0
    deadline = time.monotonic() + 5
    while sent < len(payload) and time.monotonic() < deadline:
        try:
            sent += hog.send(payload[sent:])
        except BlockingIOError:
            await asyncio.sleep(0.01)
    other = await connect(qmpvm)
    started = time.monotonic()
    for _ in range(50):
        await other.execute("query-version")
    assert time.monotonic() - started < 5
    rss_kib = int(
        next(
            line
            for line in Path(f"/proc/{qmpvm.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS")
        ).split()[1]
    )
    assert rss_kib < 400_000, "output for a non-reading client must stay bounded"
    await other.disconnect()
    hog.close()


async def test_64_simultaneous_clients(qmpvm: QmpvmProcess) -> None:
    clients = [await connect(qmpvm, f"c{i}") for i in range(64)]

    async def work(i: int, client: QMPClient) -> None:
        for _ in range(20):
            reply = await client.execute("query-status")
            assert reply["status"] == "prelaunch"
        await client.execute("machine-set", {"name": f"vm{i}"})

    await asyncio.gather(*(work(i, c) for i, c in enumerate(clients)))
    names = {(await c.execute("query-name"))["name"] for c in clients[:3]}
    assert len(names) == 1 and names.pop().startswith("vm")
    await asyncio.gather(*(c.disconnect() for c in clients))


async def test_arguments_are_checked_before_any_effect(qmpvm: QmpvmProcess) -> None:
    client = await connect(qmpvm)
    cases = [
        (
            "machine-set",
            {"memory": "big"},
            "Invalid parameter type for 'memory', expected: integer",
        ),
        ("machine-set", {"cpus": 2, "colour": "red"}, "Parameter 'colour' is unexpected"),
        ("boot-set", {"initrd": "/x"}, "Parameter 'kernel' is missing"),
        (
            "blockdev-add",
            {"driver": "raw", "node-name": "x", "file": {"driver": "file"}},
            "Parameter 'file.filename' is missing",
        ),
        (
            "chardev-add",
            {"id": "c", "backend": {"type": "teletype", "data": {}}},
            "Parameter 'backend.type' does not accept value 'teletype'",
        ),
        (
            "device_add",
            {"driver": "virtio-blk-pci", "drive": "ghost"},
            "Block node 'ghost' not found",
        ),
        (
            "boot-set",
            {"kernel": "/nonexistent/vmlinuz"},
            "'/nonexistent/vmlinuz' cannot be opened: No such file",
        ),
        # issue 7: host programs and files the engine would touch on a client's word
        (
            "netdev_add",
            {"type": "tap", "id": "t9", "ifname": "tap9"},
            "would have the engine run tap script /etc/qemu-ifup on the host",
        ),
        (
            "machine-set",
            {"incoming": "exec:touch /tmp/qmpvm-never"},
            "--allow-host-programs",
        ),
        (
            "chardev-add",
            {
                "id": "s9",
                "backend": {
                    "type": "socket",
                    "data": {
                        "addr": {"type": "unix", "data": {"path": "/etc/passwd"}},
                        "server": True,
                    },
                },
            },
            "chardev socket path '/etc/passwd' exists and is not a socket",
        ),
        ("blockdev-add", {"driver": "null-co", "node-name": "1st"}, "expects an identifier"),
        ("no-such-command", None, "The command no-such-command has not been found"),
        ("cont", None, "needs a machine: run machine-init first"),
    ]
    for command, arguments, message in cases:
        with pytest.raises(ExecuteError) as caught:
            await client.execute(command, arguments)
        assert message in str(caught.value), command
    machine = await client.execute("query-machine")
    assert machine["machine"]["cpus"] == 1  # the refused machine-set changed nothing
    assert machine["devices"] == [] and machine["block-nodes"] == []
    await client.disconnect()


async def test_phase_table_before_machine_init(qmpvm: QmpvmProcess) -> None:
    from qmpvm.commands import REGISTRY
    from qmpvm.monitor.dispatch import Phase

    declared = {n for n, s in REGISTRY.commands.items() if Phase.NO_MACHINE not in s.phases}
    relayed = {"cont", "stop", "system_reset", "system_powerdown", "block_resize"}
    assert not relayed & set(REGISTRY.commands), "the engine's schema declares these"
    needs_machine = sorted(declared | relayed)
    client = await connect(qmpvm)
    for name in needs_machine:
        with pytest.raises(ExecuteError) as caught:
            await client.execute(name)
        assert caught.value.error_class == "GenericError"
        assert f"The command '{name}' needs a machine" in str(caught.value)
    await client.disconnect()


async def test_queries_answer_before_any_machine(qmpvm: QmpvmProcess) -> None:
    client = await connect(qmpvm)
    assert await client.execute("query-name") == {}
    assert set(await client.execute("query-kvm")) == {"enabled", "present"}
    assert await client.execute("query-fdsets") == []
    assert await client.execute("query-block") == []
    assert await client.execute("query-chardev") == []
    commands = {c["name"] for c in await client.execute("query-commands")}
    assert {
        "machine-set",
        "boot-set",
        "machine-init",
        "x-exit-preconfig",
        "config-export",
    } <= commands
    schema = {e["name"]: e for e in await client.execute("query-qmp-schema")}
    machine_set = schema[schema["machine-set"]["arg-type"]]
    from qmpvm.config.machine import SETTINGS

    assert {m["name"] for m in machine_set["members"]} == set(SETTINGS)
    # the engine's own declarations are there, with the engine's return types
    assert "blockdev-add" in schema and schema["query-block"]["ret-type"] != "any"
    assert len(schema) > 1000
    await client.execute(
        "blockdev-add", {"driver": "file", "node-name": "f0", "filename": "/tmp/img"}
    )
    assert await client.execute("query-named-block-nodes") == [
        {"node-name": "f0", "drv": "file", "ro": False, "file": "/tmp/img"}
    ]
    await client.disconnect()


class _AnyFd(int):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, int) and other > 2

    __hash__ = int.__hash__


ANY_FD = _AnyFd()


async def test_passed_fd_belongs_to_its_connection(qmpvm: QmpvmProcess) -> None:
    def open_fds() -> set[str]:
        targets = set()
        for n in os.listdir(f"/proc/{qmpvm.pid}/fd"):
            try:
                targets.add(os.readlink(f"/proc/{qmpvm.pid}/fd/{n}"))
            except FileNotFoundError:
                continue  # closed while we looked
        return targets

    marker_a, marker_b = (
        Path(f"/tmp/qmpvm-fd-a-{os.getpid()}"),
        Path(f"/tmp/qmpvm-fd-b-{os.getpid()}"),
    )
    client = await connect(qmpvm)
    for marker, name in ((marker_a, "loose"), (marker_b, "kept")):
        with marker.open("w") as f:
            client.send_fd_scm(f.fileno())
            await client.execute("getfd", {"fdname": name})
    with marker_a.open("w") as f:
        client.send_fd_scm(f.fileno())
        added = await client.execute("add-fd", {"opaque": "spare"})
    assert (await client.execute("query-fdsets"))[0]["fds"][0]["opaque"] == "spare"
    assert str(marker_a) in open_fds() and str(marker_b) in open_fds()
    await client.execute("netdev_add", {"type": "tap", "id": "t0", "fd": "kept"})
    with pytest.raises(ExecuteError, match="in use"):
        await client.execute("closefd", {"fdname": "kept"})
    await client.disconnect()
    deadline = time.monotonic() + 5
    while str(marker_a) in open_fds() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert str(marker_a) not in open_fds(), "the getfd/add-fd descriptors die with their connection"
    assert str(marker_b) in open_fds(), "a descriptor the config refers to lives on"
    assert added["fdset-id"] == 0
    again = await connect(qmpvm)
    await again.execute("netdev_del", {"id": "t0"})
    assert str(marker_b) not in open_fds(), "and dies with the config item"
    await again.disconnect()
    marker_a.unlink()
    marker_b.unlink()


async def test_a_connection_sees_and_closes_only_its_own_descriptors(
    qmpvm: QmpvmProcess,
) -> None:
    """Client B can neither close, replace nor see what client A passed."""
    a, b = await connect(qmpvm), await connect(qmpvm)
    with open("/dev/null") as f:
        a.send_fd_scm(f.fileno())
        await a.execute("getfd", {"fdname": "mine"})
        a.send_fd_scm(f.fileno())
        await a.execute("add-fd", {"fdset-id": 5, "opaque": "a's"})
        b.send_fd_scm(f.fileno())
        with pytest.raises(ExecuteError, match="belongs to another connection"):
            await b.execute("getfd", {"fdname": "mine"})
        b.send_fd_scm(f.fileno())
        with pytest.raises(ExecuteError, match="fdset 5 belongs to another connection"):
            await b.execute("add-fd", {"fdset-id": 5})
    with pytest.raises(ExecuteError, match="File descriptor named 'mine' not found"):
        await b.execute("closefd", {"fdname": "mine"})
    with pytest.raises(ExecuteError, match="not found"):
        await b.execute("remove-fd", {"fdset-id": 5})
    assert await b.execute("query-fdsets") == []
    assert await a.execute("query-fdsets") == [
        {"fdset-id": 5, "fds": [{"fd": ANY_FD, "opaque": "a's"}]}
    ]
    # what the configuration uses is visible to every connection
    await a.execute(
        "blockdev-add", {"driver": "file", "node-name": "f", "filename": "/dev/fdset/5"}
    )
    assert [s["fdset-id"] for s in await b.execute("query-fdsets")] == [5]
    await a.execute("closefd", {"fdname": "mine"})
    await a.disconnect()
    await b.disconnect()


async def test_kill_9_after_a_reply_keeps_the_change(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = start_qmpvm(tmp_path, state_dir=state)
    client = await connect(proc)
    await client.execute("machine-set", {"cpus": 3, "name": "durable"})
    await client.execute("chardev-add", {"id": "c0", "backend": {"type": "null", "data": {}}})
    os.kill(proc.pid, signal.SIGKILL)
    proc.process.wait()
    await client.disconnect()
    again = start_qmpvm(tmp_path, state_dir=state, name="again")
    client = await connect(again)
    machine = await client.execute("query-machine")
    assert machine["machine"]["cpus"] == 3 and machine["machine"]["name"] == "durable"
    assert machine["chardevs"] == [{"id": "c0", "backend": {"type": "null", "data": {}}}]
    await client.disconnect()
    again.stop()


async def test_export_replayed_on_another_qmpvm_gives_the_same_machine(tmp_path: Path) -> None:
    first = start_qmpvm(tmp_path, name="first")
    second = start_qmpvm(tmp_path, name="second")
    a, b = await connect(first), await connect(second)
    setup = [
        ("machine-set", {"type": "pc", "memory": 512 << 20, "accel": "tcg"}),
        ("chardev-add", {"id": "s0", "backend": {"type": "ringbuf", "data": {"size": 4096}}}),
        (
            "blockdev-add",
            {"driver": "raw", "node-name": "d0", "file": {"driver": "file", "filename": "/tmp/d"}},
        ),
        ("device_add", {"driver": "virtio-blk-pci", "drive": "d0", "id": "vd0"}),
        ("device_add", {"driver": "isa-serial", "chardev": "s0"}),
        ("netdev_add", {"type": "user", "id": "n0"}),
        ("set_link", {"name": "n0", "up": False}),
    ]
    for command, arguments in setup:
        await a.execute(command, arguments)
    for item in await a.execute("config-export"):
        await b.execute(item["execute"], item.get("arguments"))
    assert await a.execute("query-machine") == await b.execute("query-machine")
    assert await a.execute("config-export", {"diff": False}) == await b.execute(
        "config-export", {"diff": False}
    )
    await a.disconnect()
    await b.disconnect()
    first.stop()
    second.stop()


async def test_config_file_and_failed_command_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "vm.json"
    config.write_text(json.dumps([{"execute": "machine-set", "arguments": {"cpus": 2}}]))
    proc = start_qmpvm(tmp_path, "--config", str(config), "--preconfig", state_dir=state)
    client = await connect(proc)
    assert (await client.execute("query-machine"))["machine"]["cpus"] == 2
    await quit_and_disconnect(client)
    proc.process.wait(10)
    assert not proc.socket.exists(), "quit removes the socket file"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmpvm",
            "--state-dir",
            str(state),
            "-m",
            "512",
            "-device",
            "isa-serial,chardev=nope",
            "--preconfig",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 1
    assert (
        bad.stderr.strip().splitlines()[-1]
        == "qmpvm: command line: device_add refused: Chardev 'nope' not found"
    )
    proc = start_qmpvm(tmp_path, state_dir=state, name="after")
    client = await connect(proc)
    assert (await client.execute("query-machine"))["machine"]["memory"] == 128 << 20, (
        "nothing half-applied"
    )
    await client.disconnect()
    proc.stop()


async def test_tcp_listener_and_many_listeners(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = start_qmpvm(tmp_path, "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off", "--preconfig")
    tcp = QMPClient("tcp")
    await tcp.connect(("127.0.0.1", port))
    unix = await connect(proc)
    await tcp.execute("machine-set", {"cpus": 5})
    assert (await unix.execute("query-machine"))["machine"]["cpus"] == 5
    await tcp.disconnect()
    await unix.disconnect()
    proc.stop()


def test_qmp_shell_works_unchanged(qmpvm: QmpvmProcess) -> None:
    shell = Path(sys.executable).parent / "qmp-shell"
    out = subprocess.run(
        [str(shell), str(qmpvm.socket)],
        input="machine-set cpus=4 name=shell\nquery-status\nquery-machine\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert '"phase": "no-machine"' in out.stdout
    assert '"name": "shell"' in out.stdout and '"cpus": 4' in out.stdout
