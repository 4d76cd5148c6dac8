"""What would make the engine run a host program, and HMP's command names."""

from __future__ import annotations

import pytest

from qmpvm.commands.runstate import HMP_ALLOWED, hmp_command_name
from qmpvm.config.programs import programs


@pytest.mark.parametrize(
    ("command", "args", "found"),
    [
        ("migrate", {"uri": "exec:cat > /tmp/x"}, ["the shell command 'cat > /tmp/x'"]),
        ("migrate-incoming", {"uri": "exec:true"}, ["the shell command 'true'"]),
        ("migrate", {"uri": "unix:/tmp/m.sock"}, []),
        ("netdev_add", {"type": "tap", "id": "n", "ifname": "tap0"},
         ["tap script /etc/qemu-ifup", "tap downscript /etc/qemu-ifdown"]),
        ("netdev_add", {"type": "tap", "id": "n", "script": "no", "downscript": "no"}, []),
        ("netdev_add", {"type": "tap", "id": "n", "fd": "tapfd"}, []),
        ("netdev_add", {"type": "tap", "id": "n", "script": "/bin/evil", "downscript": ""},
         ["tap script /bin/evil"]),
        ("netdev_add", {"type": "tap", "id": "n", "helper": "/x/helper"},
         ["the bridge helper /x/helper"]),
        ("netdev_add", {"type": "bridge", "id": "n"},
         ["the bridge helper /usr/lib/qemu/qemu-bridge-helper"]),
        ("netdev_add", {"type": "user", "id": "n", "smb": "/srv"},
         ["smbd (user networking 'smb')"]),
        ("netdev_add", {"type": "user", "id": "n",
                        "guestfwd": [{"str": "tcp:10.0.2.100:80-cmd:nc host 80"}]},
         ["guestfwd command 'nc host 80'"]),
        ("netdev_add", {"type": "user", "id": "n",
                        "guestfwd": [{"str": "tcp:10.0.2.100:80-tcp:127.0.0.1:80"}]}, []),
        ("machine-set", {"incoming": "exec:cat f"}, ["the shell command 'cat f'"]),
        ("machine-set", {"net": [{"type": "tap"}]},
         ["tap script /etc/qemu-ifup", "tap downscript /etc/qemu-ifdown"]),
        ("machine-set", {"memory": 1 << 30}, []),
        ("query-status", {}, []),
    ],
)  # fmt: skip
def test_programs_the_engine_would_run(
    command: str, args: dict[str, object], found: list[str]
) -> None:
    assert programs(command, args) == found


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ("info status", "info"),
        ("  x/4x 0", "x"),
        ("drive_add/ if=none,id=hd1,file=f", "drive_add"),
        ("object_add\tsecret,id=s", "object_add"),
        ("", ""),
    ],
)
def test_hmp_command_names_are_read_as_qemu_reads_them(line: str, name: str) -> None:
    assert hmp_command_name(line) == name


def test_hmp_commands_that_change_configuration_are_not_relayed() -> None:
    for name in (
        "drive_add",
        "device_add",
        "object_add",
        "qom-set",
        "netdev_add",
        "hostfwd_add",
        "chardev-add",
        "savevm",
        "gdbserver",
        "logfile",
        "boot_set",
        "change",
        "eject",
    ):
        assert name not in HMP_ALLOWED
