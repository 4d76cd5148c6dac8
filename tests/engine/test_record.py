"""The engine record and the state directory's lock (a later qmpvm takes over
only the very process an earlier one left, and only one qmpvm at a time),
and the engine's cgroup limits."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qmpvm.engine.process import WatchedProcess
from qmpvm.engine.record import EngineRecord, identity, remove
from qmpvm.errors import StoreError
from qmpvm.store import Store


def record_of(pid: int) -> EngineRecord:
    found = identity(pid)
    assert found is not None
    return EngineRecord(
        pid=pid, start_time=found[0], executable=found[1], accel="tcg", hotplug_ports=("hp0",)
    )


def test_a_record_round_trips_and_names_one_process(tmp_path: Path) -> None:
    mine = record_of(os.getpid())
    mine.save(tmp_path)
    assert (tmp_path / "engine.json").stat().st_mode & 0o777 == 0o600
    assert EngineRecord.load(tmp_path) == mine
    assert mine.is_running()
    reused = dataclasses.replace(mine, start_time=mine.start_time + 1)
    assert not reused.is_running(), "a pid now used by a process started later is not ours"
    other_binary = dataclasses.replace(mine, executable="/usr/bin/qemu-system-x86_64")
    assert not other_binary.is_running()
    remove(tmp_path)
    remove(tmp_path)  # twice is fine
    assert EngineRecord.load(tmp_path) is None


@pytest.mark.parametrize("text", ["", "{", "[]", '{"pid": "x"}', '{"pid": 1}'])
def test_a_damaged_record_is_no_record(tmp_path: Path, text: str) -> None:
    (tmp_path / "engine.json").write_text(text)
    assert EngineRecord.load(tmp_path) is None


def test_a_process_that_ended_is_not_running() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert identity(child.pid) is None


async def test_a_watched_child_reports_its_exit_status() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    watched = WatchedProcess(child.pid, child)
    assert await asyncio.wait_for(watched.wait(), 30) == 3
    assert watched.returncode == 3


def test_one_qmpvm_per_state_directory(tmp_path: Path) -> None:
    first = Store(tmp_path)
    with pytest.raises(StoreError, match=rf"in use by another qmpvm \(pid {os.getpid()}\)"):
        Store(tmp_path)
    first.close()
    Store(tmp_path).close()  # free again once the first is gone


def test_limits_are_checked_and_written_where_the_hierarchy_wants_them() -> None:
    from qmpvm.config.machine import LIMITS as CHECKED
    from qmpvm.config.machine import check_setting
    from qmpvm.engine.cgroup import LIMITS, _value
    from qmpvm.errors import ArgumentError

    assert set(LIMITS) == set(CHECKED)
    assert check_setting("limits", {"memory": 1 << 30, "cpu": 0.5}) is not None
    refusals = [
        ({"swap": 1}, "is unexpected"),
        ({"pids": 1.5}, "expected: integer"),
        ({"cpu": True}, "expected: number"),
        ({"memory": 0}, "greater"),
    ]
    for bad, message in refusals:
        with pytest.raises(ArgumentError, match=message):
            check_setting("limits", bad)
    assert _value("cpu", 1.5, v2=False) == "150000"
    assert _value("cpu", 1.5, v2=True) == "150000 100000"
    assert _value("memory", 4096, v2=True) == "4096"
