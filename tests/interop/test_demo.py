"""The README's main job: `qmpvm demo` boots a guest configured over QMP."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import needs_qemu

from qmpvm.images import GuestImage

pytestmark = needs_qemu


def test_demo_boots_runs_commands_and_powers_off(guest: GuestImage) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qmpvm", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert '--> {"execute": "machine-set"' in text, "the transcript shows the QMP session"
    assert re.search(r"^Linux \S+ \S+-cloud-amd64 ", text, re.MULTILINE), (
        "uname -a ran in the guest"
    )
    guest_md5 = re.search(r"^([0-9a-f]{32})  /dev/vda$", text, re.MULTILINE)
    host_md5 = re.search(r"host md5 of the disk: ([0-9a-f]{32})", text)
    assert guest_md5 and host_md5 and guest_md5.group(1) == host_md5.group(1)
    assert '"event": "SHUTDOWN"' in text
    assert "qmpvm exited with 0" in text
