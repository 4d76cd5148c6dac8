"""``qmpvm demo``: monitor first, machine later, shown step by step.

Starts qmpvm with only a QMP socket, configures a q35 machine entirely over
QMP (printing every command and reply), boots the guest, runs commands on
its serial console, and powers it off.  TCG is asked for explicitly: on
hosts whose /dev/kvm is emulated (kvm_pvm) KVM runs guest kernel code far
slower than TCG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

from qmpvm.images import READY_MARKER, build_guest, guest_cmdline
from qmpvm.tools.console import SocketConsole

MiB = 1024 * 1024


def _show(direction: str, message: object) -> None:
    print(f"{direction} {json.dumps(message)}", flush=True)


async def _execute(
    client: QMPClient, command: str, arguments: dict[str, object] | None = None
) -> object:
    request: dict[str, object] = {"execute": command}
    if arguments:
        request["arguments"] = arguments
    _show("-->", request)
    reply = await client.execute(command, arguments)
    _show("<--", {"return": reply})
    return reply


async def _wait_for_socket(
    path: Path, process: subprocess.Popen[bytes], timeout: float = 10
) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("qmpvm demo: qmpvm did not open its QMP socket")
        await asyncio.sleep(0.01)


async def demo(workdir: Path, accel: str) -> int:
    print("== building the guest (host kernel + busybox initramfs)", flush=True)
    guest = build_guest()
    print(f"   kernel {guest.kernel}\n   initrd {guest.initrd}", flush=True)
    disk = workdir / "disk.raw"
    disk.write_bytes(os.urandom(4 * MiB))
    host_md5 = hashlib.md5(disk.read_bytes()).hexdigest()
    sock = workdir / "qmp.sock"
    print("== starting qmpvm with nothing but a monitor", flush=True)
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "qmpvm", "-qmp", f"unix:{sock},server=on,wait=off", "--preconfig"]
    )
    try:
        await _wait_for_socket(sock, process)
        client = QMPClient("demo")
        await client.connect(str(sock))
        if client.greeting is not None:
            _show("<--", client.greeting._asdict())
        print("== configuring the machine over QMP", flush=True)
        await _execute(client, "query-status")
        await _execute(
            client,
            "machine-set",
            {"type": "q35", "accel": accel, "memory": 256 * MiB, "cpus": 1, "name": "demo"},
        )
        await _execute(
            client,
            "boot-set",
            {
                "kernel": str(guest.kernel),
                "initrd": str(guest.initrd),
                "append": guest_cmdline("q35"),
            },
        )
        console_path = workdir / "ttyS0.sock"
        await _execute(
            client,
            "chardev-add",
            {
                "id": "ser0",
                "backend": {
                    "type": "socket",
                    "data": {
                        "addr": {"type": "unix", "data": {"path": str(console_path)}},
                        "server": True,
                        "wait": False,
                    },
                },
            },
        )
        await _execute(
            client, "device_add", {"driver": "isa-serial", "chardev": "ser0", "id": "serial0"}
        )
        await _execute(
            client,
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "disk0",
                "file": {"driver": "file", "filename": str(disk)},
            },
        )
        await _execute(
            client, "device_add", {"driver": "virtio-blk-pci", "drive": "disk0", "id": "vda"}
        )
        await _execute(client, "config-export")
        print("== creating and starting the machine", flush=True)
        await _execute(client, "machine-init")
        await _execute(client, "query-status")
        await _execute(client, "cont")
        console = await SocketConsole.connect(str(console_path))
        await console.expect(READY_MARKER, timeout=60)
        print(f"== guest ready {time.monotonic() - started:.2f}s after qmpvm started", flush=True)
        for command in ("uname -a", "cat /proc/cmdline", "md5sum /dev/vda"):
            output = await console.run(command)
            print(f"guest# {command}\n{output}", flush=True)
        print(f"   host md5 of the disk: {host_md5}", flush=True)
        print("== powering off from inside the guest", flush=True)
        await console.write("poweroff -f\n")
        async with asyncio.timeout(30):
            async for event in client.events:
                _show("<--", {"event": event["event"], "data": event.get("data", {})})
                if event["event"] == "ENGINE_EXIT":
                    break
        await _execute(client, "query-status")
        await _execute(client, "quit")
        with contextlib.suppress(EOFError, ConnectionError):
            await client.disconnect()  # qmpvm may have closed its side first
        process.wait(timeout=10)
        print(
            f"== done in {time.monotonic() - started:.2f}s; qmpvm exited with {process.returncode}",
            flush=True,
        )
        return 0
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qmpvm demo", description=__doc__)
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm"))
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qmpvm-demo-") as workdir:
        return asyncio.run(demo(Path(workdir), opts.accel))
