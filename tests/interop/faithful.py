"""Build one machine twice, with plain QEMU and through qmpvm, and describe both.

A command line from ``tests/data/cli-sample`` names files, block devices and
descriptors of the host it was written on; ``MappedLine`` makes them real
here (files in a temporary directory, loop devices for ``/dev/HostVG/*``,
the monitor's ``fd=1729`` as a listening socket), the same for both runs.
``describe`` asks the engine what it built, in forms that do not depend on
who started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import os
import pprint
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
MONITOR_FD = 1729
_PATH = re.compile(
    r"(?<![\w.])/(?:tmp/lib|tmp/usbdisk|tmp/firmware|var|export|storage|dev/HostVG|dev/cdrom|"
    r"dev/fd0|"
    r"oDtUsPr1q8wBYM91uEHCn6j)[\w./+-]*"
)
_AUTO_NODE = re.compile(r"#(block|net)\d+")  # QEMU's generated names: counters, not meaning


def sample_argv(path: Path) -> list[str]:
    """A libvirt test line: environment assignments, the binary, then the options."""
    words = shlex.split(path.read_text().replace("\\\n", " "))
    start = next(i for i, word in enumerate(words) if word.startswith("/usr/bin/qemu"))
    return words[start + 1 :]


@dataclass
class MappedLine:
    """``argv`` with the host's paths made real under ``root``."""

    argv: list[str]
    root: Path
    loops: list[str] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)  # -add-fd numbers: open files in the child

    @classmethod
    def make(cls, argv: list[str], root: Path) -> MappedLine:
        line = cls([], root)
        mapping: dict[str, str] = {}
        for option, arg in zip(["", *argv], argv, strict=False):
            directory = option in ("-fsdev", "-virtfs")

            def mapped(match: re.Match[str], directory: bool = directory) -> str:
                return line._map(match.group(0), mapping, directory)

            line.argv.append(_PATH.sub(mapped, arg))
            if option == "-add-fd":
                line.fds.append(int(re.search(r"fd=(\d+)", arg).group(1)))  # type: ignore[union-attr]
        line._format_qcow2()
        return line

    def _format_qcow2(self) -> None:
        """Files under a qcow2 node become qcow2 images (qemu-img), as the line expects."""
        nodes: dict[str, dict[str, Any]] = {}
        for option, arg in zip(["", *self.argv], self.argv, strict=False):
            if option == "-blockdev" and arg.startswith("{"):
                node = json.loads(arg)
                nodes[node.get("node-name", "")] = node
        for node in nodes.values():
            child = nodes.get(node.get("file")) if node.get("driver") == "qcow2" else None
            filename = child.get("filename") if child else None
            if filename and filename.startswith(str(self.root)) and shutil.which("qemu-img"):
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", filename, "16M"],
                               check=True)  # fmt: skip

    def _map(self, path: str, mapping: dict[str, str], directory: bool) -> str:
        if path in mapping:
            return mapping[path]
        target = self.root / "host" / path.strip("/").replace("/", "_")
        target.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            target.mkdir(exist_ok=True)
            mapped = str(target)
        elif path.endswith(".sock"):
            mapped = str(target)
        elif path.endswith(".aes"):
            target.write_bytes(os.urandom(32))
            mapped = str(target)
        else:
            with target.open("wb") as f:
                f.truncate(16 << 20)
            mapped = str(target)
            if path.startswith("/dev/"):
                mapped = self._loop(target) or mapped
        mapping[path] = mapped
        return mapped

    def _loop(self, image: Path) -> str | None:
        """A block device over ``image`` (host_device nodes need one), if the host lends one."""
        done = subprocess.run(
            ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            return None
        self.loops.append(done.stdout.strip())
        return self.loops[-1]

    def release(self) -> None:
        for loop in self.loops:
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)


@dataclass
class Started:
    process: subprocess.Popen[bytes]
    socket: Path
    stderr: Path

    def error(self) -> str:
        return self.stderr.read_text(errors="replace").strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def start(command: list[str], root: Path, name: str, fds: list[int] = []) -> Started:  # noqa: B006
    """``command`` with a listening socket as descriptor 1729, the monitor's, and
    a file open as each of ``fds`` (the line's ``-add-fd`` descriptors)."""
    sock_path = root / f"{name}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(8)
    os.dup2(listener.fileno(), MONITOR_FD, inheritable=True)
    listener.close()
    for number in fds:
        # write-only, as libvirt passes log files: QEMU matches an fdset's access mode
        opened = os.open(root / f"{name}-fd{number}", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(opened, number, inheritable=True)
        os.close(opened)
    stderr = root / f"{name}.stderr"
    try:
        with stderr.open("wb") as err:
            process = subprocess.Popen(
                command,
                pass_fds=(MONITOR_FD, *fds),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=root,
            )
    finally:
        for number in (MONITOR_FD, *fds):
            os.close(number)
    return Started(process, sock_path, stderr)


def qemu_command(argv: list[str]) -> list[str]:
    return [QEMU, *argv]


def qmpvm_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "qmpvm", *argv]  # no spare ports: QEMU adds none either


async def describe(started: Started, timeout: float = 60) -> dict[str, Any] | str:
    """What the engine built, or why there is nothing to ask (the process's error)."""
    client = QMPClient("faithful")
    try:
        async with asyncio.timeout(timeout):
            while True:
                if started.process.poll() is not None:
                    return started.error() or f"exited {started.process.returncode}"
                try:
                    await client.connect(str(started.socket))
                    break
                except (ConnectionError, OSError, EOFError):
                    await asyncio.sleep(0.05)  # the process has not listened yet: poll
            status = await client.execute("query-status")
            if status.get("status") != "prelaunch":  # type: ignore[union-attr]
                return f"status {status}"
            found: dict[str, Any] = {}
            found["qtree"] = await client.execute(
                "human-monitor-command", {"command-line": "info qtree"}
            )
            for query in ("query-pci", "query-block", "query-chardev", "query-cpus-fast",
                          "query-memdev", "query-named-block-nodes"):  # fmt: skip
                found[query] = await client.execute(query)
            return normalize(found)
    except Exception as err:
        return started.error() or f"{type(err).__name__}: {err}"
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


def normalize(found: dict[str, Any]) -> dict[str, Any]:
    """Drop what differs by construction: auto node names, the monitor's own chardev,
    host process ids, and the order of unordered lists."""
    out = dict(found)
    out["qtree"] = _AUTO_NODE.sub(r"#\1", str(found["qtree"]))
    out["query-chardev"] = sorted(
        (c["label"], c["filename"].split(":")[0])
        for c in found["query-chardev"]
        if c["label"] not in ("charmonitor", "qmpvm-link")
    )
    out["query-cpus-fast"] = [
        {k: v for k, v in cpu.items() if k != "thread-id"} for cpu in found["query-cpus-fast"]
    ]
    text = repr(found["query-block"]) + repr(found["query-named-block-nodes"])
    out["query-block"] = _AUTO_NODE.sub(r"#\1", repr(found["query-block"]))
    out["query-named-block-nodes"] = len(found["query-named-block-nodes"])
    out["files"] = sorted(set(re.findall(r"'file': '([^']*)'", text)))
    return out


def differences(a: dict[str, Any], b: dict[str, Any]) -> Iterator[str]:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            yield key


def explain(a: dict[str, Any], b: dict[str, Any]) -> str:
    """The differences, as unified diffs of QEMU's answer (-) and qmpvm's (+)."""
    out = []
    for key in differences(a, b):
        left, right = (pprint.pformat(x.get(key), width=100).splitlines() for x in (a, b))
        if key == "qtree":
            left, right = str(a.get(key)).splitlines(), str(b.get(key)).splitlines()
        diff = difflib.unified_diff(left, right, "qemu", "qmpvm", lineterm="", n=2)
        out.append(f"{key}:\n" + "\n".join(diff))
    return "\n".join(out)
