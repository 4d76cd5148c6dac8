"""``qmpvm snapshot`` and ``qmpvm migrate`` as a user runs them, against a
qmpvm with the real guest: the summary, the progress on stderr (lines when
it is not a terminal, a bar redrawn in place on one), errors, and Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import signal
import sys
from pathlib import Path

import pytest
from conftest import QmpvmProcess, connect, next_event, quit_and_disconnect, start_qmpvm
from test_engine import BOOT_TIMEOUT
from test_machine_state import booted

from qmpvm.images import GuestImage

pytestmark = pytest.mark.usefixtures("guest")
TOOL_TIMEOUT = 120


async def tool(*argv: str, stderr: int = asyncio.subprocess.PIPE) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpvm", *argv,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr,
    )  # fmt: skip


async def run_tool(*argv: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``qmpvm ARGV`` (pipes: not a terminal)."""
    process = await tool(*argv)
    async with asyncio.timeout(TOOL_TIMEOUT):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def read_all(fd: int) -> bytes:
    """A pty master's output until the last slave closes."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def test_snapshot_tool_shows_progress_and_refuses_a_used_directory(
    tmp_path: Path, guest: GuestImage
) -> None:
    proc = start_qmpvm(tmp_path)
    client = await connect(proc)
    console, _ = await booted(client, guest, tmp_path)
    snapshot_dir = tmp_path / "snap"

    code, out, err = await run_tool("snapshot", str(proc.socket), str(snapshot_dir))
    assert code == 0, err
    summary = out.strip()
    assert summary.startswith(f"snapshot written to {snapshot_dir}: "), out
    assert "MiB" in summary and "total " in summary and "downtime " in summary
    assert (snapshot_dir / "manifest.json").is_file()
    lines = err.splitlines()
    assert lines, "progress lines on stderr"
    assert all(line.startswith("snapshot: ") for line in lines), err
    assert "\r" not in err, "no bar redrawn where stderr is not a terminal"
    assert lines[-1].startswith("snapshot: completed  100%"), err
    assert any(line.startswith(("snapshot: setup", "snapshot: active")) for line in lines), err
    assert (await client.execute("query-status"))["status"] == "running"

    # the same directory again: the command's error, exit 1, the snapshot kept
    code, out, err = await run_tool("snapshot", str(proc.socket), str(snapshot_dir))
    assert code == 1
    assert out == ""
    assert "qmpvm snapshot: machine-snapshot: GenericError: " in err
    assert "already holds a snapshot" in err
    assert (snapshot_dir / "manifest.json").is_file()

    # on a terminal: one line redrawn in place, left on its own line at the end
    master, slave = pty.openpty()
    try:
        reader = asyncio.create_task(asyncio.to_thread(read_all, master))
        process = await tool(
            "snapshot", str(proc.socket), str(tmp_path / "paused"), "--stop", stderr=slave
        )
        os.close(slave)
        slave = -1
        async with asyncio.timeout(TOOL_TIMEOUT):
            out_bytes, _ = await process.communicate()
            shown = (await reader).decode()
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert process.returncode == 0, shown
    assert out_bytes.decode().startswith(f"snapshot written to {tmp_path / 'paused'}: ")
    assert "\r\x1b[Ksnapshot  [" in shown
    last = shown.split("\r\x1b[K")[-1]
    assert last.startswith("snapshot  [####################]  100%  completed  "), shown
    assert last.endswith("\r\n"), "the last bar keeps its line"
    assert (await client.execute("query-status"))["running"] is False, "--stop leaves it paused"

    await console.close()
    await quit_and_disconnect(client)


async def start_migrating(
    source: QmpvmProcess, destination: QmpvmProcess
) -> asyncio.subprocess.Process:
    """``qmpvm migrate`` running, once its stderr says the stream is active."""
    process = await tool("migrate", str(source.socket), f"unix:{destination.socket}")
    assert process.stderr is not None
    async with asyncio.timeout(TOOL_TIMEOUT):
        while True:
            line = (await process.stderr.readline()).decode()
            assert line, "qmpvm migrate ended before its migration was active"
            if line.startswith("migrate: active"):
                return process


async def test_migrate_tool_cancels_on_ctrl_c_then_migrates(
    tmp_path: Path, guest: GuestImage
) -> None:
    source = start_qmpvm(tmp_path, name="source")
    destination = start_qmpvm(tmp_path, "--preconfig", name="destination")
    client = await connect(source)
    console, _ = await booted(client, guest, tmp_path)
    far = await connect(destination, "far")

    # Ctrl-C while the stream is slow: migrate_cancel, exit 1, the source runs on
    await client.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})
    process = await start_migrating(source, destination)
    process.send_signal(signal.SIGINT)
    async with asyncio.timeout(TOOL_TIMEOUT):
        out, err_bytes = await process.communicate()
    err = err_bytes.decode()
    assert process.returncode == 1, err
    assert out == b""
    assert "interrupted: cancelling the migration" in err
    assert "qmpvm migrate: machine-migrate: GenericError: " in err and "cancelled" in err, err
    assert (await client.execute("query-status"))["status"] == "running"
    await next_event(far, "MACHINE_MIGRATION", status="failed")
    assert (await far.execute("query-status"))["phase"] == "no-machine"

    # then the whole way, to a destination with no machine
    await client.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30})
    target = start_qmpvm(tmp_path, "--preconfig", name="target")
    near = await connect(target, "near")
    uri = f"unix:{target.socket}"
    code, out_text, err = await run_tool("migrate", str(source.socket), uri)
    assert code == 0, err
    summary = out_text.strip()
    assert summary.startswith(f"migrated to {uri}: total "), summary
    assert "downtime " in summary and summary.endswith(" sent")
    lines = err.splitlines()
    assert lines and all(line.startswith("migrate: ") for line in lines), err
    assert lines[-1].startswith("migrate: completed  100%"), err
    await next_event(near, "MACHINE_MIGRATION", status="completed", timeout=BOOT_TIMEOUT)
    assert (await near.execute("query-status"))["status"] == "running"
    status = await client.execute("query-status")
    assert (status["status"], status["phase"]) == ("postmigrate", "no-machine")

    await console.close()
    with contextlib.suppress(EOFError, ConnectionError):
        await quit_and_disconnect(far)
    await quit_and_disconnect(near)
    await quit_and_disconnect(client)


async def test_tools_name_an_unreachable_monitor(tmp_path: Path) -> None:
    nowhere = str(tmp_path / "nobody.sock")
    code, out, err = await run_tool("snapshot", nowhere, str(tmp_path / "s"))
    assert (code, out) == (1, "")
    assert err.startswith(f"qmpvm snapshot: {nowhere}: "), err
    assert "Traceback" not in err
    code, _, err = await run_tool("migrate", nowhere, "unix:/nowhere")
    assert code == 1 and err.startswith(f"qmpvm migrate: {nowhere}: "), err
