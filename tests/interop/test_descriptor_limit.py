"""At the process's descriptor limit: clear errors, one warning, service resumes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path

from conftest import needs_qemu
from qemu.qmp import QMPClient

pytestmark = needs_qemu
LIMIT = 48


async def test_out_of_descriptors_then_clients_leave(tmp_path: Path) -> None:
    sock_path = tmp_path / "qmp.sock"
    stderr = (tmp_path / "stderr").open("wb")

    proc = subprocess.Popen(
        ["prlimit", f"--nofile={LIMIT}", sys.executable, "-m", "qmpvm",
         "-qmp", f"unix:{sock_path},server=on,wait=off",
         "--preconfig", "-M", "q35,accel=tcg", "-nodefaults"],
        stdin=subprocess.DEVNULL, stderr=stderr,
    )  # fmt: skip
    client = QMPClient("first")
    try:
        async with asyncio.timeout(30):
            while not sock_path.exists():  # qmpvm has not listened yet
                await asyncio.sleep(0.05)
        await client.connect(str(sock_path))
        await client.execute("query-status")  # the control plane is loaded
        hogs = []
        for _ in range(LIMIT):  # more connections than qmpvm has descriptors left
            hog = socket.socket(socket.AF_UNIX)
            hog.connect(str(sock_path))
            hogs.append(hog)
        # the engine needs descriptors too: a clear refusal, not an internal error
        try:
            await client.execute("machine-init")
            refused = None
        except Exception as err:
            refused = str(err)
        for hog in hogs:
            hog.close()
        if refused is not None:
            assert "internal error" not in refused
            assert "Too many open files" in refused or "cannot start" in refused
        late = socket.socket(socket.AF_UNIX)
        late.connect(str(sock_path))
        late.settimeout(30)
        greeting = late.makefile("rb").readline()
        assert "QMP" in json.loads(greeting), "accepting again once clients left"
        late.close()
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
        proc.kill()
        proc.wait()
        stderr.close()
    log = (tmp_path / "stderr").read_text()
    assert log.count("accept failed") == 1, f"the limit was reached, and said once: {log}"
    assert "accepting again" in log
