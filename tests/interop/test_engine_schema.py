"""The engine's schema is qmpvm's: checking, introspection and resources,
through a real qmpvm and the real qemu.qmp client (no machine needed)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import QmpvmProcess, connect, needs_qemu, quit_and_disconnect, start_qmpvm
from qemu.qmp import ExecuteError

pytestmark = needs_qemu


async def refused(client: object, command: str, arguments: dict[str, object]) -> ExecuteError:
    with pytest.raises(ExecuteError) as caught:
        await client.execute(command, arguments)  # type: ignore[attr-defined]
    return caught.value


async def test_engine_commands_are_checked_in_qemus_words(qmpvm: QmpvmProcess) -> None:
    client = await connect(qmpvm)
    cases = [
        ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": 7},
         "Invalid parameter type for 'file', expected: object or string"),
        ("blockdev-add", {"driver": "nope", "node-name": "q"},
         "Parameter 'driver' does not accept value 'nope'"),
        ("blockdev-add", {"driver": "file", "node-name": "f"}, "Parameter 'filename' is missing"),
        ("netdev_add", {"type": "user", "id": "n", "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ("object-add", {"qom-type": "memory-backend-ram", "id": "m", "size": "big"},
         "Invalid parameter type for 'size', expected: integer"),
        ("chardev-add", {"id": "", "backend": {"type": "null", "data": {}}},
         "Parameter 'id' must not be empty"),
        ("blockdev-add", {"driver": "null-co", "node-name": ""},
         "Parameter 'node-name' must not be empty"),
        ("closefd", {"fdname": "nothing"}, "File descriptor named 'nothing' not found"),
    ]  # fmt: skip
    for command, arguments, message in cases:
        err = await refused(client, command, arguments)
        assert err.error_class == "GenericError", (command, arguments)
        assert str(err) == message
    assert (await client.execute("query-machine"))["block-nodes"] == []  # nothing changed
    await client.disconnect()


async def test_every_kind_of_resource_is_recorded(qmpvm: QmpvmProcess, tmp_path: Path) -> None:
    """Drivers and types qmpvm never declared itself, as the engine has them."""
    client = await connect(qmpvm)
    image = str(tmp_path / "img")
    await client.execute("object-add", {"qom-type": "secret", "id": "sec0", "data": "pw"})
    await client.execute("object-add", {"qom-type": "throttle-group", "id": "tg0",
                                        "limits": {"iops-total": 100}})  # fmt: skip
    await client.execute("object-add", {"qom-type": "iothread", "id": "io0"})
    await client.execute("blockdev-add", {"driver": "file", "node-name": "f0", "filename": image})
    await client.execute("blockdev-add", {"driver": "throttle", "node-name": "t0",
                                          "throttle-group": "tg0", "file": "f0"})  # fmt: skip
    await client.execute("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "t0",
                                          "backing": None})  # fmt: skip
    await client.execute("blockdev-add", {"driver": "nbd", "node-name": "n0",
        "server": {"type": "inet", "host": "127.0.0.1", "port": "10809"}})  # fmt: skip
    await client.execute("netdev_add", {"type": "user", "id": "u0",
                                        "hostfwd": [{"str": "tcp::0-:22"}]})  # fmt: skip
    await client.execute("netdev_add", {"type": "socket", "id": "s0", "listen": "127.0.0.1:0"})
    await client.execute("chardev-add", {"id": "f0", "backend": {"type": "file",
        "data": {"out": str(tmp_path / "log"), "logfile": str(tmp_path / "l2"),
                 "logappend": True}}})  # fmt: skip
    await client.execute("device_add", {"driver": "pci-bridge", "id": "br0", "chassis_nr": "1"})
    await client.execute("device_add", {"driver": "lsi", "id": "scsi0"})
    machine = await client.execute("query-machine")
    assert [o["id"] for o in machine["objects"]] == ["sec0", "tg0", "io0"]
    assert [n["node-name"] for n in machine["block-nodes"]] == ["f0", "t0", "q0", "n0"]
    assert machine["devices"][0] == {"driver": "pci-bridge", "id": "br0", "chassis_nr": 1}
    err = await refused(client, "object-del", {"id": "tg0"})
    assert str(err) == "Object 'tg0' is in use by block node 't0'"
    await client.execute("blockdev-del", {"node-name": "q0"})
    await client.execute("blockdev-del", {"node-name": "t0"})
    await client.execute("object-del", {"id": "tg0"})
    err = await refused(client, "device_add", {"driver": "virtio-blk-pci", "drive": "gone"})
    assert str(err) == "Block node 'gone' not found"
    await client.disconnect()


async def test_the_engine_answers_introspection_before_any_machine(qmpvm: QmpvmProcess) -> None:
    client = await connect(qmpvm)
    schema = await client.execute("query-qmp-schema")
    names = {entry["name"] for entry in schema}
    assert {"blockdev-add", "object-add", "machine-set", "machine-init", "drive-add"} <= names
    assert len(schema) > 1000
    assert len({e["name"] for e in schema}) == len(schema), "no name twice"
    by_name = {e["name"]: e for e in schema}
    shutdown = by_name[by_name["SHUTDOWN"]["arg-type"]]
    assert {m["name"] for m in shutdown["members"]} == {"guest", "reason"}, "the engine's event"
    assert by_name["ENGINE_EXIT"]["meta-type"] == "event"  # and qmpvm's own
    commands = {c["name"] for c in await client.execute("query-commands")}
    assert {"query-cpu-definitions", "migrate", "machine-set"} <= commands
    props = await client.execute("device-list-properties", {"typename": "virtio-net-pci"})
    addr = next(p for p in props if p["name"] == "addr")
    assert addr["default-value"] == -1
    machine = await client.execute("qom-list-properties", {"typename": "pc-q35-7.2-machine"})
    assert {"usb", "memory-backend", "smm"} <= {p["name"] for p in machine}
    secret = await client.execute("qom-list-properties", {"typename": "secret"})
    assert {"data", "file", "format"} <= {p["name"] for p in secret}
    cpus = {c["name"] for c in await client.execute("query-cpu-definitions")}
    assert {"qemu64", "Haswell"} <= cpus
    boot = await client.execute("query-command-line-options", {"option": "boot-opts"})
    assert {"name": "strict", "type": "boolean"} in boot[0]["parameters"]
    types = {t["name"] for t in await client.execute("qom-list-types", {})}
    assert {"virtio-blk-pci", "memory-backend-file", "pc-q35-7.2-machine", "tcg-accel"} <= types
    err = await refused(client, "cont", {})
    assert "needs a machine" in str(err)
    await client.disconnect()


async def test_machine_settings_are_checked_against_the_engine(qmpvm: QmpvmProcess) -> None:
    client = await connect(qmpvm)
    err = await refused(client, "machine-set", {"properties": {"frobnicate": True}})
    assert str(err) == "Property 'pc-q35-7.2-machine.frobnicate' not found"
    err = await refused(client, "machine-set", {"cpu": {"model": "pentium9000"}})
    assert str(err) == "unable to find CPU model 'pentium9000'"
    err = await refused(client, "machine-set", {"boot": {"orderly": "c"}})
    assert str(err) == "Invalid parameter 'orderly' for 'boot'"
    settings = {"properties": {"usb": False}, "cpu": {"model": "qemu64"},
                "smp": {"sockets": 1, "cores": 2}, "boot": {"strict": True},
                "action": {"shutdown": "pause"}}  # fmt: skip
    await client.execute("machine-set", settings)
    await client.execute("set-action", {"reboot": "shutdown"})
    machine = (await client.execute("query-machine"))["machine"]
    assert machine["action"] == {"shutdown": "pause", "reboot": "shutdown"}
    export = await client.execute("config-export")
    assert export[0]["arguments"]["smp"] == {"sockets": 1, "cores": 2}
    await client.disconnect()


async def test_ids_that_are_not_finite_numbers_come_back_as_json(qmpvm: QmpvmProcess) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(qmpvm.socket))
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-status","id":1e999}')
        reader.readline()
        reply = json.loads(reader.readline())  # strict JSON: "Infinity" would fail here
    assert reply["id"] == 1.7976931348623157e308 and reply["return"]["status"] == "prelaunch"


async def test_boot_only_kinds_are_refused_once_the_machine_exists(tmp_path: Path) -> None:
    proc = start_qmpvm(tmp_path, "-M", "q35,accel=tcg", "-nodefaults", "-S")
    client = await connect(proc)
    err = await refused(client, "drive-add", {"id": "d9", "file": "/dev/null", "if": "none"})
    assert (
        str(err) == "'drive-add' is boot-only and the machine exists; it is only allowed "
        "before machine-init"
    )
    await client.execute("set-action", {"panic": "pause"})  # hot: live and recorded
    assert (await client.execute("query-machine"))["machine"]["action"] == {"panic": "pause"}
    err = await refused(
        client, "chardev-change", {"id": "x", "backend": {"type": "null", "data": {}}}
    )
    assert "is not relayed to the engine: it changes the block graph" in str(err)
    err = await refused(client, "watchdog-set-action", {"action": "poweroff"})
    assert str(err).endswith("the action is a machine setting: use set-action")
    await quit_and_disconnect(client)


async def test_descriptors_a_command_line_names_by_number_reach_the_engine(
    tmp_path: Path,
) -> None:
    """libvirt passes listening sockets and log files as numbered descriptors."""
    import os

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "channel.sock"))
    listener.listen(1)
    log = os.open(tmp_path / "serial.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(listener.fileno(), 1740, inheritable=True)
    os.dup2(log, 1741, inheritable=True)
    listener.close()
    os.close(log)
    argv = [
        "-M", "pc,accel=tcg", "-nodefaults", "-S",
        "-chardev", "socket,id=ch0,fd=1740,server=on,wait=off",
        "-device", "isa-serial,chardev=ch0",
        "-add-fd", "set=3,fd=1741,opaque=log",
        "-chardev", "file,id=ch1,path=/dev/fdset/3,append=on",
        "-device", "isa-serial,chardev=ch1",
    ]  # fmt: skip
    try:
        proc = start_qmpvm(tmp_path, *argv, pass_fds=(1740, 1741))
    finally:
        os.close(1740)
        os.close(1741)
    client = await connect(proc)
    chardevs = {c["label"]: c["filename"] for c in await client.execute("query-chardev")}
    assert chardevs["ch0"] == f"disconnected:unix:{tmp_path / 'channel.sock'},server=on"
    assert chardevs["ch1"] == "file"
    assert await client.execute("query-fdsets") == [
        {"fdset-id": 3, "fds": [{"fd": 1741, "opaque": "log"}]}
    ]
    await quit_and_disconnect(client)
