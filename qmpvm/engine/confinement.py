"""What confines the running engine, read from the process itself.

``query-machine`` reports each part of the engine's confinement as the
kernel sees it (``/proc/PID/...``), not as qmpvm meant it, so an engine an
earlier qmpvm started is described as truly as one started now; each part
that is off says why.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

WHY_OFF = {
    "no-new-privileges": "util-linux's setpriv, which sets it, is not installed",
    "user": "the engine runs as qmpvm's user",
    "root": "the engine sees the host's file system",
    "namespaces": "the engine shares qmpvm's namespaces: this host lets qmpvm make none "
    "(unshare is missing, or it lacks CAP_SYS_ADMIN)",
    "cgroup": "the engine shares qmpvm's cgroup",
}
"""Why the parts qmpvm does not set up yet are off."""
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "user")


def describe(
    pid: int,
    settings: Mapping[str, object],
    cgroup_why: str | None = None,
    user_why: str | None = None,
    root_why: str | None = None,
) -> dict[str, dict[str, object]]:
    """Each part: ``{"on": bool}``, with ``why`` when it is off (``user`` also
    gives the ``uid``).  ``settings``: the machine's, for why seccomp may be
    off; ``cgroup_why``: why the engine got no cgroup of its own; ``user_why``:
    why it runs as qmpvm's user; ``root_why``: why it sees the host's files."""
    status = _status(pid)
    own = [ns for ns in NAMESPACES if not _same(f"/proc/{pid}/ns/{ns}", f"/proc/self/ns/{ns}")]
    uid = int((status.get("Uid") or "0").split()[0])
    on = {
        "seccomp": status.get("Seccomp") == "2",
        "no-new-privileges": status.get("NoNewPrivs") == "1",
        "user": uid != 0,
        "root": not _same(f"/proc/{pid}/root", "/"),
        "namespaces": bool(own),
        "cgroup": _read(f"/proc/{pid}/cgroup") != _read("/proc/self/cgroup"),
    }
    why = {**WHY_OFF, "seccomp": _seccomp_off(settings)}
    if cgroup_why is not None:
        why["cgroup"] = cgroup_why
    if user_why is not None:
        why["user"] = f"the engine runs as qmpvm's user: {user_why}"
    if root_why is not None:
        why["root"] = f"the engine sees the host's file system: {root_why}"
    parts: dict[str, dict[str, object]] = {
        name: {"on": True} if is_on else {"on": False, "why": why[name]}
        for name, is_on in on.items()
    }
    parts["user"]["uid"] = uid
    if own:
        parts["namespaces"]["own"] = own
    return parts


def _seccomp_off(settings: Mapping[str, object]) -> str:
    confine = settings.get("confine")
    if isinstance(confine, dict) and confine.get("seccomp") is False:
        return 'machine-set {"confine": {"seccomp": false}} lifted it'
    if settings.get("sandbox") is not None:
        return "the configuration's own sandbox setting (-sandbox) leaves it off"
    return "the engine did not install it"


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in _read(f"/proc/{pid}/status").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _same(a: str, b: str) -> bool:
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return True  # cannot tell: claim nothing
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
