"""What every named configuration item has in common."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """Resource kinds, in the order QEMU creates them at machine start."""

    OBJECT = "object"
    CHARDEV = "chardev"
    BLOCK = "block"
    DRIVE = "drive"
    NETDEV = "netdev"
    DEVICE = "device"


Reference = tuple[tuple[Kind, ...], str]
"""A name another item must carry, and the kinds that may carry it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Resource:
    """One configured item, kept as the QMP arguments that create it.

    Keeping the creating arguments (rather than a translation) is what makes
    export exact: replaying ``args`` through the same command rebuilds it.
    """

    kind: Kind
    key: str  # the id / node-name; "#<n>" for a device created without id
    args: Mapping[str, object]
    refs: tuple[Reference, ...] = ()
    seq: int = 0  # creation order, kept across restarts
