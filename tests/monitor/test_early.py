"""The early monitor: listeners bound and clients greeted before asyncio exists."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qmpvm.cli import FLAGS as CLI_FLAGS
from qmpvm.monitor.client import Client
from qmpvm.monitor.early import FLAGS, EarlyMonitor, Listener, greeting_line, scan_listeners
from qmpvm.monitor.protocol import Request, encode
from qmpvm.monitor.server import MonitorServer

UNIX = "unix:/tmp/q.sock,server=on,wait=off"


def test_greeting_is_what_the_server_would_encode() -> None:
    from qmpvm import QEMU_VERSION, __version__

    major, minor, micro = QEMU_VERSION
    version = {"qemu": {"major": major, "minor": minor, "micro": micro}}
    expected = {"QMP": {"version": {**version, "package": f"qmpvm {__version__}"}}}
    expected["QMP"]["capabilities"] = []  # type: ignore[index]
    assert greeting_line() == encode(expected)


@pytest.mark.parametrize(
    ("argv", "found"),
    [
        (["-qmp", UNIX, "-m", "256", "-S"], [Listener("unix", path="/tmp/q.sock")]),
        (["--qmp", "tcp:127.0.0.1:4444"], [Listener("tcp", host="127.0.0.1", port=4444)]),
        (["--qmp", "tcp::4444"], []),  # every address: cli decides
        (["-qmp", "tcp:localhost:1,tls-creds=t"], []),  # TLS: the full parse sets it up
        (["-append", "-qmp", "-qmp", UNIX], [Listener("unix", path="/tmp/q.sock")]),
        (["-m", "256"], []),
        (["demo"], []),  # a subcommand
        (["-qmp", UNIX, "--help"], []),
        (["-qmp", UNIX, "--print-qmp"], []),
        (["-qmp", UNIX, "-m"], []),  # missing value: cli reports it
        (["-qmp", "stdio"], []),
    ],
)
def test_scan_trusts_only_what_it_understands(argv: list[str], found: list[Listener]) -> None:
    assert scan_listeners(argv) == found


def test_flags_are_the_options_cli_takes_without_a_value() -> None:
    assert CLI_FLAGS == FLAGS


def test_imports_nothing_slow() -> None:
    slow = ["asyncio", "json", "typing", "dataclasses", "socket", "threading", "contextlib"]
    code = f"import sys, qmpvm.__main__; print([m for m in {slow!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class EchoBackend:
    """Answers every command with its own name: enough to see replies flow."""

    async def dispatch(self, request: Request, client: Client) -> dict[str, object]:
        return request.reply({"command": request.name, "client": client.id})

    def client_gone(self, client: Client) -> None:
        pass


def _read_line(sock: socket.socket) -> dict[str, object]:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        assert chunk, "connection closed"
        data += chunk
    result: dict[str, object] = json.loads(data)
    return result


async def test_greeted_connections_and_listeners_pass_to_the_server(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    early = EarlyMonitor([Listener("unix", path=str(path))])
    assert path.stat().st_mode & 0o777 == 0o600
    first = socket.socket(socket.AF_UNIX)
    first.settimeout(5)
    first.connect(str(path))
    assert "QMP" in _read_line(first), "greeted with no event loop serving"

    server = MonitorServer(EchoBackend(), greeting_line())  # type: ignore[arg-type]
    listeners, greeted = early.handoff()
    assert len(greeted) == 1
    for sock, listener in listeners:
        server.adopt_listener(sock, listener)
    for sock, peer in greeted:
        server.adopt_connection(sock, peer, greeted=True)

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, first.sendall, b'{"execute": "qmp_capabilities"}')
    reply = await loop.run_in_executor(None, _read_line, first)
    assert reply == {"return": {}}, "negotiation after handoff, no second greeting"
    await loop.run_in_executor(None, first.sendall, b'{"execute": "query-status", "id": 7}')
    reply = await loop.run_in_executor(None, _read_line, first)
    assert reply["id"] == 7 and reply["return"] == {"command": "query-status", "client": 1}

    second = socket.socket(socket.AF_UNIX)
    second.settimeout(5)
    await loop.run_in_executor(None, second.connect, str(path))
    assert "QMP" in await loop.run_in_executor(None, _read_line, second), "listener adopted"

    first.close()
    second.close()
    await server.close()
    assert not path.exists()


def test_bind_failure_leaves_nothing(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.sock", tmp_path / "file"
    bad.write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        EarlyMonitor([Listener("unix", path=str(good)), Listener("unix", path=str(bad))])
    assert not good.exists()
    assert bad.read_text() == "not a socket"


def test_close_before_handoff_removes_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    early = EarlyMonitor([Listener("unix", path=str(path))])
    client = socket.socket(socket.AF_UNIX)
    client.settimeout(5)
    client.connect(str(path))
    assert "QMP" in _read_line(client)
    early.close()
    assert not path.exists()
    assert client.recv(1) == b"", "the greeted client sees the connection end"


def test_bad_option_after_the_early_bind_exits_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    argv = ["-frobnicate", "1", "-qmp", f"unix:{path},server=on,wait=off"]
    bad = subprocess.run(
        [sys.executable, "-m", "qmpvm", *argv], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1
    assert bad.stderr.strip() == "qmpvm: unknown option '-frobnicate' (see --help)"
    assert not path.exists()
