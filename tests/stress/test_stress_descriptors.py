"""Descriptor cycles: connections and SCM_RIGHTS descriptors come and go, and
qmpvm's own descriptor count comes back to where it was."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from conftest import QmpvmProcess, needs_qemu, start_qmpvm
from stress_support import (
    SEED,
    Findings,
    RawClient,
    fd_targets,
    server_side_connections,
    wait_until_sync,
)

pytestmark = needs_qemu

CYCLES = 3000


class Cycles:
    """One kind of connection life each; every descriptor passed is ``marker``."""

    def __init__(self, proc: QmpvmProcess, marker: int, rng: random.Random) -> None:
        self.proc = proc
        self.marker = marker
        self.rng = rng
        self.findings = Findings(SEED)
        self.connections = 0
        self.kinds: list[Callable[[int], None]] = [
            self.close_at_once, self.close_after_greeting, self.query_then_close,
            self.half_a_message, self.getfd_closefd, self.getfd_then_leave,
            self.add_fd_then_leave, self.add_fd_remove_fd, self.fds_with_no_command,
            self.too_many_fds_in_one_message, self.more_fds_than_kept, self.reset_by_peer,
            self.getfd_twice, self.getfd_refused, self.half_close,
        ]  # fmt: skip

    def client(self) -> RawClient:
        self.connections += 1
        client = RawClient(self.proc.socket, self.findings)
        client.negotiate()
        return client

    def run(self, n: int) -> None:
        kind = self.rng.choice(self.kinds)
        kind(n)

    def close_at_once(self, _n: int) -> None:
        self.connections += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.proc.socket))
        sock.close()

    def close_after_greeting(self, _n: int) -> None:
        self.connections += 1
        RawClient(self.proc.socket, self.findings).close()

    def query_then_close(self, _n: int) -> None:
        client = self.client()
        assert "return" in client.call("query-status")
        client.close()

    def half_a_message(self, _n: int) -> None:
        client = self.client()
        client.send(b'{"execute": "getfd", "arguments": {"fdname": "half', [self.marker])
        client.close()

    def getfd_closefd(self, n: int) -> None:
        client = self.client()
        assert client.call("getfd", {"fdname": f"fd{n}"}, [self.marker]) == {"return": {}}
        assert client.call("closefd", {"fdname": f"fd{n}"}) == {"return": {}}
        client.close()

    def getfd_then_leave(self, n: int) -> None:
        client = self.client()
        assert client.call("getfd", {"fdname": f"fd{n}"}, [self.marker]) == {"return": {}}
        client.close()

    def add_fd_then_leave(self, _n: int) -> None:
        client = self.client()
        reply = client.call("add-fd", {"opaque": "stress"}, [self.marker])
        assert "return" in reply, reply
        client.close()

    def add_fd_remove_fd(self, _n: int) -> None:
        client = self.client()
        reply = client.call("add-fd", None, [self.marker])
        added = reply["return"]
        assert isinstance(added, dict), reply
        assert client.call("remove-fd", {"fdset-id": added["fdset-id"], "fd": added["fd"]}) == {
            "return": {}
        }
        client.close()

    def fds_with_no_command(self, _n: int) -> None:
        client = self.client()
        client.replies_until_sync(b"", [self.marker] * 3)
        client.close()

    def too_many_fds_in_one_message(self, n: int) -> None:
        client = self.client()
        reply = client.call("getfd", {"fdname": f"many{n}"}, [self.marker] * 20)
        assert reply == {"return": {}}, reply
        client.close()

    def more_fds_than_kept(self, _n: int) -> None:
        client = self.client()
        for _ in range(5):
            client.replies_until_sync(b"", [self.marker] * 10)
        client.close()

    def reset_by_peer(self, _n: int) -> None:
        client = self.client()
        client.send(b'{"execute": "query-qmp-schema"}' * 4, [self.marker])
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()

    def getfd_twice(self, n: int) -> None:
        client = self.client()
        for _ in range(2):
            assert client.call("getfd", {"fdname": f"twice{n}"}, [self.marker]) == {"return": {}}
        client.close()

    def getfd_refused(self, _n: int) -> None:
        client = self.client()
        reply = client.call("getfd", {"fdname": "1starts-with-a-digit"}, [self.marker])
        assert "error" in reply, reply
        client.close()

    def half_close(self, _n: int) -> None:
        """Commands, then EOF: answered before qmpvm closes its side."""
        client = self.client()
        client.send(b'{"execute": "query-version", "id": "last"}')
        client.sock.shutdown(socket.SHUT_WR)
        last = client.message()
        assert last.get("id") == "last" and "return" in last, last
        with contextlib.suppress(ConnectionError):
            extra = client.line()
            raise AssertionError(f"more after the last reply: {extra!r}")
        client.close()


def test_connections_and_passed_descriptors_come_back_to_the_baseline(tmp_path: Path) -> None:
    proc = start_qmpvm(tmp_path)
    marker_path = tmp_path / "passed-descriptor"
    marker = os.open(marker_path, os.O_RDWR | os.O_CREAT, 0o600)
    cycles = Cycles(proc, marker, random.Random(SEED))
    try:
        for n, kind in enumerate(cycles.kinds):  # each once: whatever loads lazily, loads
            kind(n)
        wait_until_sync(
            lambda: server_side_connections(proc.pid) == 0,
            "qmpvm ended every session of the warm-up",
        )
        baseline = fd_targets(proc.pid)
        for n in range(len(cycles.kinds), CYCLES):
            cycles.run(n)
        wait_until_sync(
            lambda: server_side_connections(proc.pid) == 0,
            f"seed {SEED}: qmpvm ended all {cycles.connections} sessions",
        )
        after = fd_targets(proc.pid)
        assert str(marker_path) not in after, (
            f"seed {SEED}: a passed descriptor outlived its connection: "
            f"{after.count(str(marker_path))} still open"
        )
        wait_until_sync(  # not equal: a descriptor of qmpvm's own may close meanwhile
            lambda: len(fd_targets(proc.pid)) <= len(baseline),
            f"seed {SEED}: qmpvm's descriptors back to {baseline}: {fd_targets(proc.pid)}",
        )
    finally:
        os.close(marker)
    assert proc.process.poll() is None, proc.stderr()[-3000:]
    assert not cycles.findings, cycles.findings.report()
    check = RawClient(proc.socket)
    check.negotiate()
    assert check.call("query-fdsets") == {"return": []}
    check.close()
    assert "Traceback" not in proc.stderr(), proc.stderr()[-3000:]
