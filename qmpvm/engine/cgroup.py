"""A cgroup of the engine's own, with the limits the configuration sets.

The engine goes into a new cgroup under qmpvm's own (so whatever limits
qmpvm is under still hold), one per controller on a cgroup v1 host, one
in the unified hierarchy on a v2 host.  Where the hierarchy is not writable
the engine stays where it is and ``query-machine`` says why; only limits the
configuration sets make that an error (a limit is never silently dropped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True, slots=True)
class Limit:
    controller: str
    v1_file: str
    v2_file: str


LIMITS: Mapping[str, Limit] = {
    "memory": Limit("memory", "memory.limit_in_bytes", "memory.max"),  # bytes
    "pids": Limit("pids", "pids.max", "pids.max"),  # tasks (threads)
    "cpu": Limit("cpu", "cpu.cfs_quota_us", "cpu.max"),  # CPUs, e.g. 1.5
}
"""Where each member of the ``limits`` machine setting is written
(``qmpvm.config.machine.LIMITS`` checks them)."""


def _value(name: str, value: object, v2: bool) -> str:
    if name == "cpu":
        quota = max(1000, round(float(str(value)) * CPU_PERIOD_US))
        return f"{quota} {CPU_PERIOD_US}" if v2 else str(quota)
    return str(value)


def hierarchies() -> dict[str, Path]:
    """Controller (or "unified") -> the directory of qmpvm's own cgroup in it."""
    own: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _number, names, path = line.split(":", 2)
            for name in names.split(",") if names else ["unified"]:
                own[name] = path.lstrip("/")
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return {"unified": CGROUP_ROOT / own.get("unified", "")}
    found = {}
    for controller in CONTROLLERS:
        mount = CGROUP_ROOT / controller
        if controller in own and (mount / "cgroup.procs").exists():
            found[controller] = mount / own[controller]
    return found


@dataclass(frozen=True, slots=True)
class EngineCgroup:
    paths: tuple[Path, ...]

    def remove(self) -> None:
        """Gone with the engine (a cgroup with no tasks left can be removed)."""
        for path in self.paths:
            with contextlib.suppress(OSError):
                path.rmdir()


def create(pid: int, limits: Mapping[str, object]) -> EngineCgroup:
    """A cgroup for process ``pid`` (moved into it) with ``limits``; OSError
    if the hierarchy cannot be written (what was made is removed again)."""
    found = hierarchies()
    if not found:
        raise OSError("no cgroup hierarchy with memory, pids and cpu is mounted")
    made: list[Path] = []
    for parent in found.values():
        _sweep(parent)
    try:
        for controller, parent in found.items():
            path = parent / f"qmpvm-engine-{pid}"
            path.mkdir(exist_ok=True)
            made.append(path)
            v2 = controller == "unified"
            for name, value in limits.items():
                limit = LIMITS[name]
                if v2 or limit.controller == controller:
                    target = path / (limit.v2_file if v2 else limit.v1_file)
                    target.write_text(_value(name, value, v2))
            (path / "cgroup.procs").write_text(str(pid))
    except OSError:
        EngineCgroup(tuple(made)).remove()
        raise
    return EngineCgroup(tuple(made))


def remove_paths(paths: Sequence[str]) -> None:
    EngineCgroup(tuple(Path(p) for p in paths)).remove()


def _sweep(parent: Path) -> None:
    """Remove the empty cgroups of engines that are gone without a qmpvm to
    remove them (qmpvm was killed): a cgroup with tasks cannot be removed."""
    with contextlib.suppress(OSError):
        for stale in parent.glob("qmpvm-engine-*"):
            pid = stale.name.removeprefix("qmpvm-engine-")
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):
                    stale.rmdir()
