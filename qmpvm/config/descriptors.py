"""Where configuration documents name passed descriptors.

Two ways, as in QEMU: a ``getfd`` name in a netdev's ``fd``-like members (or
a chardev socket address of type ``fd``), and ``/dev/fdset/N`` as a file name
(a block node's, a drive's, a chardev's log file).  The configuration keeps
the names; the descriptors belong to ``qmpvm.fds``.
"""

from __future__ import annotations

from collections.abc import Mapping

NETDEV_FD_MEMBERS = ("fd", "vhostfd", "fds", "vhostfds")
"""Netdev members naming descriptors passed with getfd (``fds``/``vhostfds``:
several, colon-separated)."""

FDSET_PREFIX = "/dev/fdset/"


def fd_names(args: Mapping[str, object]) -> list[str]:
    """The getfd names a netdev or chardev document uses; a bare number names nothing."""
    names: list[str] = []
    for member in NETDEV_FD_MEMBERS:
        value = args.get(member)
        if isinstance(value, str):
            names.extend(name for name in value.split(":") if name and not name.isdigit())
    name = chardev_fd(args)
    if name is not None and not name.isdigit():
        names.append(name)
    return names


def chardev_fd(args: Mapping[str, object]) -> str | None:
    """The descriptor a socket chardev's ``addr`` of type ``fd`` names, if it has one."""
    backend = args.get("backend")
    data = backend.get("data") if isinstance(backend, Mapping) else None
    addr = data.get("addr") if isinstance(data, Mapping) else None
    if isinstance(addr, Mapping) and addr.get("type") == "fd":
        where = addr.get("data")
        name = where.get("str") if isinstance(where, Mapping) else None
        return name if isinstance(name, str) else None
    return None


def fdset_ids(args: object) -> set[int]:
    """The fdsets (``/dev/fdset/N``) that any string in ``args`` opens: a block
    node's filename, a chardev's log file, a drive's file."""
    found: set[int] = set()
    stack = [args]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            number = value.removeprefix(FDSET_PREFIX)
            if number != value and number.isdigit():
                found.add(int(number))
        elif isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return found
