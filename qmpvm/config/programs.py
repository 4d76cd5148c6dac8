"""Programs the engine would run on the host because a command said so.

A QMP client may be anyone who can reach a socket, and the engine runs as
qmpvm's user: an ``exec:`` migration URI is a shell command, a tap netdev runs
its ``script``/``downscript`` (``/etc/qemu-ifup`` when none is named), a bridge
netdev or a tap ``helper`` runs a (setuid) helper, user networking runs
``smbd`` for ``smb`` and any command of a ``guestfwd`` ``cmd:`` rule.  qmpvm
refuses these unless its operator started it with ``--allow-host-programs``.
Pure: arguments in, descriptions out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

TAP_SCRIPT = "/etc/qemu-ifup"
TAP_DOWNSCRIPT = "/etc/qemu-ifdown"
BRIDGE_HELPER = "/usr/lib/qemu/qemu-bridge-helper"
NO_SCRIPT = frozenset({"", "no"})


def programs(command: str, args: Mapping[str, Any]) -> list[str]:
    """What ``command`` with checked ``args`` would have the engine run."""
    if command in ("migrate", "migrate-incoming"):
        return _uri(args.get("uri"))
    if command == "netdev_add":
        return netdev_programs(args)
    if command == "machine-set":
        found = _uri(args.get("incoming"))
        for key in ("net", "nic"):
            for entry in args.get(key) or ():
                if isinstance(entry, Mapping):
                    found += netdev_programs(entry)
        return found
    return []


def netdev_programs(args: Mapping[str, Any]) -> list[str]:
    """A netdev's programs, with QEMU 7.2's defaults (net/tap.c, net/slirp.c)."""
    kind = args.get("type")
    if kind == "bridge":
        return [f"the bridge helper {args.get('helper', BRIDGE_HELPER)}"]
    if kind == "tap":
        if args.get("helper"):
            return [f"the bridge helper {args['helper']}"]
        if any(args.get(key) for key in ("fd", "fds")):
            return []  # a passed tap: QEMU runs no script for it
        return [
            f"tap {role} {script}"
            for role, script in (
                ("script", args.get("script", TAP_SCRIPT)),
                ("downscript", args.get("downscript", TAP_DOWNSCRIPT)),
            )
            if str(script) not in NO_SCRIPT
        ]
    if kind == "user":
        found = ["smbd (user networking 'smb')"] if args.get("smb") else []
        return found + [f"guestfwd command '{rule}'" for rule in _guestfwd_commands(args)]
    return []


def _guestfwd_commands(args: Mapping[str, Any]) -> Iterable[str]:
    for rule in args.get("guestfwd") or ():
        text = rule.get("str") if isinstance(rule, Mapping) else rule
        if isinstance(text, str) and "-cmd:" in text:
            yield text.split("-cmd:", 1)[1]


def _uri(uri: object) -> list[str]:
    if isinstance(uri, str) and uri.startswith("exec:"):
        return [f"the shell command '{uri[5:]}'"]
    return []
