"""Devices (``device_add``): a driver, an optional id and bus, free properties."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from qmpvm.config.resource import Kind, Resource
from qmpvm.schema import to_json

REFERENCE_PROPERTIES: Mapping[str, Kind] = {
    "drive": Kind.BLOCK,
    "netdev": Kind.NETDEV,
    "chardev": Kind.CHARDEV,
}
"""Device properties that name another resource; they must resolve."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceAdd:
    """QEMU marks device_add 'gen': false: any property may follow."""

    driver: str
    id: str | None = None
    bus: str | None = None
    properties: Mapping[str, object] = field(default_factory=dict)


def make(args: DeviceAdd, seq: int) -> Resource:
    refs = tuple(
        (kind, str(args.properties[prop]))
        for prop, kind in REFERENCE_PROPERTIES.items()
        if isinstance(args.properties.get(prop), str)
    )
    key = args.id if args.id is not None else f"#{seq}"
    return Resource(kind=Kind.DEVICE, key=key, args=to_json(args), refs=refs, seq=seq)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceDel:
    id: str
