"""The engine record: what a new qmpvm needs to take over a running engine.

With ``--state-dir``, the engine outlives qmpvm (a crash, ``kill -9``, an
upgrade): it listens for its monitor on ``engine.sock`` in the state
directory, writes its stderr to ``engine.log`` there, and ``engine.json``
says which process it is.  A pid alone could name another process by the
time qmpvm comes back, so the record also keeps the process's start time
(``/proc/PID/stat``) and executable; all three must match.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

RECORD = "engine.json"
SOCKET = "engine.sock"
LOG = "engine.log"
LOCK = "lock"


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineRecord:
    pid: int
    start_time: int  # clock ticks after boot (/proc/PID/stat field 22)
    executable: str
    accel: str
    hotplug_ports: tuple[str, ...]
    memory_from: str | None = None
    holds_on_shutdown: bool = False
    aliases: Mapping[str, str] = field(default_factory=dict)
    user_why: str | None = None
    root_why: str | None = None
    consoles_dir: str | None = None
    cgroups: tuple[str, ...] = ()

    def save(self, state_dir: Path) -> None:
        """Written whole or not at all (rename), and on disk."""
        path = state_dir / RECORD
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as stream:
            doc = {**asdict(self), "hotplug_ports": list(self.hotplug_ports)}
            doc["aliases"] = dict(self.aliases)
            json.dump({**doc, "cgroups": list(self.cgroups)}, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, state_dir: Path) -> EngineRecord | None:
        """The record, or None if there is none or it does not parse."""
        try:
            doc = json.loads((state_dir / RECORD).read_text())
            return cls(
                pid=int(doc["pid"]),
                start_time=int(doc["start_time"]),
                executable=str(doc["executable"]),
                accel=str(doc["accel"]),
                hotplug_ports=tuple(str(p) for p in doc["hotplug_ports"]),
                memory_from=doc.get("memory_from"),
                holds_on_shutdown=bool(doc.get("holds_on_shutdown", False)),
                aliases={str(k): str(v) for k, v in doc.get("aliases", {}).items()},
                user_why=doc.get("user_why"),
                root_why=doc.get("root_why"),
                consoles_dir=doc.get("consoles_dir"),
                cgroups=tuple(str(p) for p in doc.get("cgroups", ())),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def is_running(self) -> bool:
        """Whether the process the record names still runs (the same one)."""
        return identity(self.pid) == (self.start_time, self.executable)


def identity(pid: int) -> tuple[int, str] | None:
    """A process's start time and executable, or None if it is gone (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        executable = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19]), executable


def remove(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (state_dir / RECORD).unlink()
