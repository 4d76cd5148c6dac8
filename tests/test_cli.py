"""The command line turns into QMP commands (no process started)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qmpvm.cli import Listener, Start, UsageError, parse_argv


def commands(*argv: str) -> list[dict[str, object]]:
    return parse_argv(list(argv)).machine_commands()


def test_each_option_is_a_qmp_command() -> None:
    cmds = commands(
        "-M",
        "q35,accel=tcg",
        "-m",
        "1G",
        "-smp",
        "2",
        "-name",
        "vm1",
        "-kernel",
        "/k",
        "-append",
        "console=ttyS0",
        "-chardev",
        "socket,id=c0,path=/tmp/c0,server=on,wait=off",
        "-serial",
        "chardev:c0",
        "-drive",
        "file=/tmp/d.img,if=virtio,format=raw,readonly=on",
        "-netdev",
        "user,id=n0,hostfwd=tcp::2222-:22",
        "-device",
        "virtio-net-pci,netdev=n0",
    )
    assert cmds == [
        {"execute": "machine-set", "arguments": {"type": "q35", "accel": "tcg"}},
        {"execute": "machine-set", "arguments": {"memory": 1 << 30}},
        {"execute": "machine-set", "arguments": {"cpus": 2}},
        {"execute": "machine-set", "arguments": {"name": "vm1"}},
        {
            "execute": "chardev-add",
            "arguments": {
                "id": "c0",
                "backend": {
                    "type": "socket",
                    "data": {
                        "addr": {"type": "unix", "data": {"path": "/tmp/c0"}},
                        "server": True,
                        "wait": False,
                    },
                },
            },
        },
        {"execute": "device_add", "arguments": {"driver": "isa-serial", "chardev": "c0"}},
        {
            "execute": "blockdev-add",
            "arguments": {
                "driver": "raw",
                "node-name": "drive0",
                "read-only": True,
                "file": {"driver": "file", "filename": "/tmp/d.img"},
            },
        },
        {"execute": "device_add", "arguments": {"driver": "virtio-blk-pci", "drive": "drive0"}},
        {
            "execute": "netdev_add",
            "arguments": {"type": "user", "id": "n0", "hostfwd": [{"str": "tcp::2222-:22"}]},
        },
        {"execute": "device_add", "arguments": {"driver": "virtio-net-pci", "netdev": "n0"}},
        {"execute": "boot-set", "arguments": {"kernel": "/k", "append": "console=ttyS0"}},
        {"execute": "machine-init"},
        {"execute": "cont"},
    ]


def test_start_modes() -> None:
    assert parse_argv([]).start is Start.RUN
    assert commands("-S")[-1] == {"execute": "machine-init"}
    assert commands("--preconfig") == []
    assert commands("-enable-kvm")[0]["arguments"] == {"accel": "kvm"}


def test_drive_on_microvm_uses_the_mmio_device() -> None:
    cmds = commands("-drive", "file=/d,format=raw", "-M", "microvm", "--preconfig")
    assert cmds[1] == {
        "execute": "device_add",
        "arguments": {"driver": "virtio-blk-device", "drive": "drive0"},
    }


def test_listeners() -> None:
    options = parse_argv(
        ["-qmp", "unix:/tmp/a,server=on,wait=off", "-qmp", "tcp:127.0.0.1:4444,server=on,wait=off"]
    )
    assert options.listeners == [
        Listener(kind="unix", path="/tmp/a"),
        Listener(kind="tcp", host="127.0.0.1", port=4444),
    ]


def test_json_options_pass_through() -> None:
    cmds = commands("-device", '{"driver": "virtio-rng-pci", "id": "rng0"}', "--preconfig")
    assert cmds == [
        {"execute": "device_add", "arguments": {"driver": "virtio-rng-pci", "id": "rng0"}}
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-bogus"], "unknown option '-bogus'"),
        (["-m"], "option -m requires an argument"),
        (["-m", "lots"], "invalid size"),
        (["-initrd", "/i"], "need -kernel"),
        (["-display", "gtk"], "only '-display none'"),
        (["-qmp", "stdio"], "expected unix:PATH"),
    ],
)
def test_bad_options_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_argv(argv)


def test_print_qmp_and_errors_from_the_real_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qmpvm", "--print-qmp", "-m", "256", "-S"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [json.loads(line) for line in out.stdout.splitlines()] == [
        {"execute": "machine-set", "arguments": {"memory": 256 << 20}},
        {"execute": "machine-init"},
    ]
    bad = subprocess.run(
        [sys.executable, "-m", "qmpvm", "-frobnicate"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1
    assert bad.stderr.strip() == "qmpvm: unknown option '-frobnicate' (see --help)"
