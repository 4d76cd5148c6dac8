"""``kill -9`` during a stream of changes: every acknowledged change survives.

A client makes seeded changes (odd ids, items that name other items,
deletions, refusals) on a qmpvm with ``--state-dir``, one at a time; the
test SIGKILLs qmpvm at a seeded point, sometimes with a change in flight,
and starts it again on the same directory.  A second qmpvm, in memory and
never killed, is given every acknowledged change: the restarted one's
``config-export`` must be the reference's, or the reference's plus the one
change that was in flight.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
from pathlib import Path

from conftest import needs_qemu, start_qmpvm
from stress_support import SEED, RawClient

pytestmark = needs_qemu

ROUNDS = 20
"""Kills; each round makes 10-60 changes first."""

ODD_IDS = [
    "ünïcödé-☃", "日本語", "x" * 200, "a.b-c_d", "dots.and.dashes-1", "1starts-with-digit",
    "with space", 'quote"d', "back\\slash", "-leading-dash", "UPPER", "z",
]  # fmt: skip


class Changes:
    """Seeded changes, aware of what exists only to aim well (the reference
    qmpvm, not this class, says what the configuration is)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.n = 0
        self.chardevs: list[str] = []
        self.nodes: list[str] = []
        self.objects: list[str] = []
        self.netdevs: list[str] = []

    def name(self, prefix: str) -> str:
        self.n += 1
        if self.rng.random() < 0.4:
            return f"{self.rng.choice(ODD_IDS)}{self.n}"
        return f"{prefix}{self.n}"

    def next(self) -> tuple[str, dict[str, object]]:
        rng = self.rng
        choice = rng.randrange(13)
        if choice == 0:
            return "machine-set", rng.choice([
                {"name": self.name("vm")}, {"cpus": rng.randrange(1, 9)},
                {"memory": rng.randrange(64, 1024) << 20}, {"cpus": 0},
            ])  # fmt: skip
        if choice in (1, 2):
            backend = rng.choice([
                {"type": "null", "data": {}}, {"type": "ringbuf", "data": {"size": 4096}},
            ])  # fmt: skip
            return "chardev-add", {"id": self.name("chr"), "backend": backend}
        if choice in (3, 4):
            return "blockdev-add", {"driver": "null-co", "node-name": self.name("node")}
        if choice == 5 and self.nodes:  # a node over a node: a reference
            return "blockdev-add", {
                "driver": "raw", "node-name": self.name("raw"), "file": rng.choice(self.nodes),
            }  # fmt: skip
        if choice == 6:  # a node with its child inline
            return "blockdev-add", {
                "driver": "raw", "node-name": self.name("inl"),
                "file": {"driver": "null-co", "node-name": self.name("child")},
            }  # fmt: skip
        if choice == 7:
            return "object-add", rng.choice([
                {"qom-type": "secret", "id": self.name("sec"), "data": "pa55"},
                {"qom-type": "iothread", "id": self.name("io")},
            ])  # fmt: skip
        if choice == 8:
            return "netdev_add", {"type": "user", "id": self.name("net")}
        if choice == 9 and self.netdevs:
            return "set_link", {"name": rng.choice(self.netdevs), "up": rng.random() < 0.5}
        if choice == 10 and self.chardevs:
            return "chardev-remove", {"id": rng.choice(self.chardevs)}
        if choice == 11 and self.nodes:  # refused when another node uses it
            return "blockdev-del", {"node-name": rng.choice(self.nodes)}
        if choice == 12 and self.objects:
            return "object-del", {"id": rng.choice(self.objects)}
        return "chardev-add", {"id": "", "backend": {"type": "null", "data": {}}}  # refused

    def saw(self, command: str, arguments: dict[str, object], reply: dict[str, object]) -> None:
        if "return" not in reply:
            return
        lists = {"chardev-add": self.chardevs, "object-add": self.objects,
                 "netdev_add": self.netdevs}  # fmt: skip
        if command in lists:
            lists[command].append(str(arguments["id"]))
        elif command == "blockdev-add":
            self.nodes.append(str(arguments["node-name"]))
        elif command == "chardev-remove":
            self.chardevs.remove(str(arguments["id"]))
        elif command == "blockdev-del":
            self.nodes.remove(str(arguments["node-name"]))
        elif command == "object-del":
            self.objects.remove(str(arguments["id"]))


def disk_state(state: Path) -> tuple[int, int]:
    try:
        info = (state / "config.sqlite3-wal").stat()
    except FileNotFoundError:
        return (0, 0)
    return (info.st_size, info.st_mtime_ns)


def outcome(reply: dict[str, object]) -> object:
    return reply.get("return", reply.get("error"))


def test_kill_9_keeps_every_acknowledged_change(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    state = tmp_path / "state"
    reference = start_qmpvm(tmp_path, name="reference")
    ref = RawClient(reference.socket)
    ref.negotiate()
    changes = Changes(rng)
    in_flight: tuple[str, dict[str, object]] | None = None
    acknowledged = 0
    made_in_flight = 0
    for round_ in range(ROUNDS + 1):
        proc = start_qmpvm(tmp_path, state_dir=state, name=f"run{round_}")
        client = RawClient(proc.socket)
        client.negotiate()
        export = client.call("config-export", {"diff": False})
        want = ref.call("config-export", {"diff": False})
        if export != want and in_flight is not None:  # the change in flight was made
            changes.saw(*in_flight, ref.call(*in_flight))
            made_in_flight += 1
            want = ref.call("config-export", {"diff": False})
        assert export == want, (
            f"seed {SEED}, round {round_}: after kill -9, {acknowledged} acknowledged changes "
            f"(in flight: {in_flight}):\nstored    {export}\nreference {want}"
        )
        if round_ == ROUNDS:
            client.close()
            proc.stop()
            break
        count = rng.randrange(10, 60)
        kill = rng.choice(["after a reply", "as it is sent", "as it reaches the disk"])
        in_flight = None
        for i in range(count):
            command, arguments = changes.next()
            if i == count - 1 and kill != "after a reply":
                wal = disk_state(state)
                client.send(json.dumps({"execute": command, "arguments": arguments}).encode())
                in_flight = (command, arguments)
                if kill == "as it reaches the disk":  # mid-commit, or the reply is there
                    while (
                        disk_state(state) == wal and not select.select([client.sock], [], [], 0)[0]
                    ):
                        pass
                break
            reply = client.call(command, arguments)
            expected = ref.call(command, arguments)
            assert outcome(reply) == outcome(expected), (
                f"seed {SEED}: {command} {arguments}: {reply} but the reference {expected}"
            )
            changes.saw(command, arguments, reply)
            acknowledged += 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.process.wait()
        client.close()
    ref.close()
    items = export.get("return")
    print(
        f"seed {SEED}: {acknowledged} acknowledged changes, {made_in_flight} made in flight, "
        f"{len(items) if isinstance(items, list) else items} commands exported at the end"
    )
    assert acknowledged > ROUNDS * 5


def test_odd_ids_that_qmpvm_accepts_are_ids_the_engine_starts_with(tmp_path: Path) -> None:
    """An id is refused when it is given, or the machine starts with it: QEMU's
    command line takes only identifiers (letters, digits, '-', '.', '_',
    starting with a letter; node names up to 31 bytes), so an item qmpvm
    stored with another id would fail every later machine-init."""
    proc = start_qmpvm(tmp_path)
    client = RawClient(proc.socket)
    client.negotiate()
    assert client.call("machine-set", {"type": "none", "accel": "tcg"}) == {"return": {}}
    accepted = []
    for odd in ODD_IDS:
        for command, arguments in (
            ("chardev-add", {"id": odd, "backend": {"type": "null", "data": {}}}),
            ("object-add", {"qom-type": "secret", "id": odd, "data": "x"}),
            ("blockdev-add", {"driver": "null-co", "node-name": odd}),
        ):
            reply = client.call(command, arguments)
            assert "return" in reply or "error" in reply, reply
            if "return" in reply:
                accepted.append(f"{command} {odd[:24]!r}")
    reply = client.call("machine-init")
    assert reply == {"return": {}}, (
        f"qmpvm accepted {len(accepted)} items ({', '.join(accepted)}), "
        f"then machine-init said: {reply}"
    )
    client.send(b'{"execute": "quit"}')
    client.close()
