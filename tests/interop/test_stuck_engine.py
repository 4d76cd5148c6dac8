"""An engine that stops answering (SIGSTOP) stalls nobody for ever."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from conftest import connect, needs_qemu, quit_and_disconnect, start_qmpvm
from qemu.qmp import ExecuteError

pytestmark = needs_qemu


async def test_a_stopped_engine_times_queries_out_and_refusals_do_not_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QMPVM_QUERY_TIMEOUT", "1")
    proc = start_qmpvm(tmp_path, "-M", "q35,accel=tcg", "-nodefaults", "-S")
    client = await connect(proc)
    pid = (await client.execute("query-machine"))["engine"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(ExecuteError, match="did not answer 'query-status'"):
            await client.execute("query-status")
        # a change that waits for the engine holds the change lock...
        other = await connect(proc, "other")
        stuck = asyncio.ensure_future(
            other.execute("chardev-add", {"id": "c1", "backend": {"type": "null", "data": {}}})
        )
        await asyncio.sleep(0)  # let it be sent; nothing below depends on its timing
        # ...and one that is refused anyway is refused at once, not behind it
        async with asyncio.timeout(20):
            with pytest.raises(ExecuteError, match="Block node 'nope' not found"):
                await client.execute("blockdev-del", {"node-name": "nope"})
    finally:
        os.kill(pid, signal.SIGCONT)
    assert await stuck == {}
    await other.disconnect()
    await quit_and_disconnect(client)


async def test_query_status_right_after_the_engine_dies_answers_the_state(
    tmp_path: Path,
) -> None:
    """Not "link closed": the engine's death is a state, and query-status tells it."""
    proc = start_qmpvm(tmp_path, "-M", "q35,accel=tcg", "-nodefaults", "-S")
    client = await connect(proc)
    for _ in range(3):
        pid = (await client.execute("query-machine"))["engine"]["pid"]
        os.kill(pid, signal.SIGKILL)
        status = await client.execute("query-status")
        assert status["status"] in ("internal-error", "paused", "prelaunch"), status
        while (await client.execute("query-status"))["phase"] != "no-machine":
            await asyncio.sleep(0.01)
        assert (await client.execute("query-status"))["status"] == "internal-error"
        await client.execute("machine-init")
    await quit_and_disconnect(client)
