"""Tests for starting engine processes: they die with qmpvm, with setpriv or without."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmpvm.engine import process

MODES = [
    pytest.param(
        True,
        id="setpriv",
        marks=pytest.mark.skipif(process.SETPRIV is None, reason="setpriv is not installed"),
    ),
    pytest.param(False, id="preexec_fn"),
]


def program(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()


@pytest.mark.parametrize("setpriv", MODES)
def test_child_dies_with_its_parent(setpriv: bool) -> None:
    script = (
        "import asyncio, subprocess\n"
        "from qmpvm.engine import process\n"
        f"if not {setpriv}:\n"
        "    process.SETPRIV = None\n"
        "async def main():\n"
        "    child = await process.start(\n"
        "        ['sleep', '60'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL\n"
        "    )\n"
        "    print(child.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert parent.stdout is not None
    with parent.stdout:
        child = int(parent.stdout.readline())
    deadline = time.monotonic() + 5
    while os.path.basename(program(child)) != "sleep":  # setpriv execs it a moment later
        assert time.monotonic() < deadline, f"the child runs {program(child)!r}, not sleep"
        time.sleep(0.01)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while True:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(") ", 1)[1][0]
        except FileNotFoundError:
            break  # gone
        if state == "Z":
            break  # dead, waiting for whoever adopted it to reap it
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.01)


@pytest.mark.parametrize("setpriv", MODES)
async def test_unrunnable_binaries_fail_as_exec_would(
    setpriv: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a message from setpriv on stderr, but the OSError a direct exec raises."""
    if not setpriv:
        monkeypatch.setattr(process, "SETPRIV", None)
    plain_file = tmp_path / "not-executable"
    plain_file.write_text("")
    for argv0, error in (
        ("qmpvm-no-such-engine", FileNotFoundError),
        (str(tmp_path / "missing"), FileNotFoundError),
        (str(plain_file), PermissionError),
    ):
        with pytest.raises(error, match=re.escape(argv0)):
            await process.start([argv0], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("setpriv", MODES)
async def test_arguments_descriptors_and_output_reach_the_child(
    setpriv: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not setpriv:
        monkeypatch.setattr(process, "SETPRIV", None)
    read_end, write_end = os.pipe()
    script = f'echo "$@"; test -e /proc/self/fd/{write_end} && echo fd'
    try:
        child = await process.start(
            ["sh", "-c", script, "sh", "--", "-x"],  # setpriv must not read the options
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(write_end,),
        )
        out, _ = await asyncio.wait_for(child.communicate(), 10)
        assert out == b"-- -x\nfd\n"
        assert child.returncode == 0
    finally:
        os.close(read_end)
        os.close(write_end)
