"""The HMP monitor and mux qmpvm serves on consoles, without a VM: the
keys of one source, the commands they run, and what that source sees."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from qmpvm.config.kinds import make
from qmpvm.config.model import Config
from qmpvm.config.resource import Kind, Resource
from qmpvm.errors import ArgumentError, ConfigError
from qmpvm.host.console_wiring import monitor_specs
from qmpvm.host.hmp import LINE_LIMIT, WAITING_LIMIT, Keyboard, MonitorSpec


class Harness:
    """A Keyboard whose guest input, output and commands are recorded; each
    command waits until the test lets it finish (``release``)."""

    def __init__(self, spec: MonitorSpec) -> None:
        self.guest = bytearray()
        self.shown = bytearray()
        self.commands: list[tuple[str, dict[str, object]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.keyboard = Keyboard(
            spec, chardev="serial0", to_guest=self.guest.extend, show=self.shown.extend,
            execute=self.execute,
        )  # fmt: skip

    async def execute(self, name: str, arguments: Mapping[str, object]) -> dict[str, object]:
        self.commands.append((name, dict(arguments)))
        await self.gate.wait()
        if name == "query-version":
            return {"return": {"qemu": {"major": 7, "minor": 2, "micro": 22}}}
        if arguments.get("command-line") == "bogus":
            return {
                "error": {"class": "GenericError", "desc": "HMP command 'bogus' is not relayed"}
            }
        if name == "human-monitor-command":
            return {"return": "VM status: running\r\n"}
        return {"return": {}}

    async def type(self, keys: bytes) -> None:
        self.keyboard.feed(keys)
        await settle()

    def names(self) -> list[str]:
        return [name for name, _ in self.commands]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_the_mux_switches_keys_between_guest_and_monitor() -> None:
    h = Harness(MonitorSpec(mux=True))
    h.keyboard.start()
    await h.type(b"ls\r")
    assert (bytes(h.guest), h.commands) == (b"ls\r", []), "keys start with the guest"
    await h.type(b"\x01c")
    assert h.shown.endswith(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
    await h.type(b"info status\r")
    assert h.commands[-1] == ("human-monitor-command", {"command-line": "info status"})
    assert h.shown.endswith(b"info status\r\nVM status: running\r\n(qemu) ")
    await h.type(b"\x01cpwd\r\x01\x01")
    assert bytes(h.guest) == b"ls\rpwd\r\x01", "back to the guest; C-a C-a sends C-a"
    await h.type(b"\x01c")
    assert h.shown.endswith(b"running\r\n(qemu) (qemu) "), "the banner only once"
    await h.type(b"\x01b\x01x")
    assert h.names()[-2:] == ["chardev-send-break", "quit"]
    assert h.commands[-2][1] == {"id": "serial0"}


async def test_mux_help_and_unoffered_keys_say_so() -> None:
    h = Harness(MonitorSpec(mux=True, escape=0x14))
    await h.type(b"\x14h")
    assert b"C-t c    switch between console and monitor" in h.shown
    await h.type(b"\x14s")
    assert h.shown.endswith(b"qmpvm: C-t s is not offered\r\n")
    assert h.commands == [] and bytes(h.guest) == b""


async def test_the_monitor_edits_lines_as_a_terminal_types_them() -> None:
    h = Harness(MonitorSpec(mux=False))
    h.keyboard.start()
    await settle()
    await h.type(b"infx\x7fo st\x1b[Datus\r\n")  # a typo erased, an arrow key skipped
    assert h.commands[-1] == ("human-monitor-command", {"command-line": "info status"})
    assert h.names().count("human-monitor-command") == 1, "CR LF is one Enter"
    await h.type(b"\x01c")  # no mux: the escape key is nothing, 'c' a letter
    assert h.shown.endswith(b"(qemu) c")
    await h.type(b"\x7f")
    await h.type(b"bogus\r")
    assert h.shown.endswith(b"'bogus' is not relayed\r\n(qemu) ")
    await h.type(b"quit\r")
    assert h.names()[-1] == "quit", "quit is qmpvm's quit, not the engine's"


async def test_keys_typed_while_a_command_runs_wait_for_it() -> None:
    h = Harness(MonitorSpec(mux=True))
    await h.type(b"\x01c")
    h.gate.clear()
    await h.type(b"info status\r\x01cguest keys")
    assert h.guest == b"", "the rest waits while the command runs"
    h.gate.set()
    await settle()
    assert h.names()[-1] == "human-monitor-command"
    assert bytes(h.guest) == b"guest keys"


async def test_a_flooding_client_cannot_grow_qmpvms_memory() -> None:
    """A line is at most QEMU's 4095 keys; keys typed while a command runs
    wait up to 64 KiB, the rest are dropped."""
    h = Harness(MonitorSpec(mux=False))
    await h.type(b"x" * 10_000)
    assert len(h.keyboard._line) == LINE_LIMIT
    await h.type(b"\x15")
    h.gate.clear()
    await h.type(b"info status\r" + b"y" * (1 << 20))
    assert len(h.keyboard._waiting) == WAITING_LIMIT
    h.gate.set()
    await settle()
    assert h.names().count("human-monitor-command") == 1


def chardev(chardev_id: str, backend: str, **data: object) -> Resource:
    return make(Kind.CHARDEV, {"id": chardev_id, "backend": {"type": backend, "data": data}}, 0)


@pytest.mark.parametrize(
    ("chardev_id", "message"),
    [
        ("gone", "chardev 'gone' not found"),
        ("ring", "not on 'ringbuf'"),  # no input: nobody could type into it
        ("net", "not on 'udp'"),  # the engine's, not qmpvm's
    ],
)
def test_monitors_go_only_on_consoles_qmpvm_serves_with_input(
    chardev_id: str, message: str
) -> None:
    config = Config()
    udp = {"remote": {"type": "inet", "data": {"host": "h", "port": "1"}}}
    for resource in (
        chardev("con", "stdio"),
        chardev("ring", "ringbuf"),
        chardev("net", "udp", **udp),
    ):
        config = config.add(resource)
    good = config.set_machine({"monitors": [{"chardev": "con", "mux": True}], "escape-char": 2})
    assert monitor_specs(good) == {"con": MonitorSpec(mux=True, escape=2)}
    bad = config.set_machine({"monitors": [{"chardev": chardev_id}]})
    with pytest.raises(ConfigError, match=message):
        monitor_specs(bad)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([{"mux": True}], r"'monitors\[0\].chardev' is missing"),
        ([{"chardev": "c", "mux": "yes"}], r"'monitors\[0\].mux', expected: boolean"),
        ([{"chardev": "c", "mode": "control"}], r"'monitors\[0\].mode' is unexpected"),
    ],
)
def test_monitor_settings_are_checked(value: object, message: str) -> None:
    with pytest.raises(ArgumentError, match=message):
        Config().set_machine({"monitors": value})
