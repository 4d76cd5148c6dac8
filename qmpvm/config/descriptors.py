"""Where configuration documents name passed descriptors.

Two ways, as in QEMU: a ``getfd`` name in a netdev's ``fd``-like members (or
a chardev socket address of type ``fd``), and ``/dev/fdset/N`` as a block
node's filename.  The configuration keeps the names; the descriptors belong
to ``qmpvm.fds``.
"""

from __future__ import annotations

from collections.abc import Mapping

NETDEV_FD_MEMBERS = ("fd", "vhostfd", "fds", "vhostfds")
"""Netdev members naming descriptors passed with getfd (``fds``/``vhostfds``:
several, colon-separated)."""

FDSET_PREFIX = "/dev/fdset/"


def fd_names(args: Mapping[str, object]) -> list[str]:
    """The getfd names a netdev document uses; a bare number names nothing."""
    names: list[str] = []
    for member in NETDEV_FD_MEMBERS:
        value = args.get(member)
        if isinstance(value, str):
            names.extend(name for name in value.split(":") if name and not name.isdigit())
    return names


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
