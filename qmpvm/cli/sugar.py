"""QEMU's shorthand options, spelt out: sizes, drive names, -serial specs.

Pure functions; each follows what QEMU 7.2 does with the same text
(``qemu_strtosz``, ``drive_new``'s names, ``qemu_chr_parse_compat``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from qmpvm.errors import ArgumentError

MiB = 1024 * 1024
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKmMgGtTpPeE]?)[bB]?$")
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str, default_unit: str = "") -> int:
    """``1G``, ``512M``, ``4096``; a bare number is in ``default_unit`` (-m: MiB)."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise ArgumentError(f"invalid size '{text}'")
    number, unit = match.groups()
    shift = _SHIFT[(unit or default_unit).lower()]
    value = float(number) * (1 << shift)
    if value != int(value):
        raise ArgumentError(f"invalid size '{text}': not a whole number of bytes")
    return int(value)


DRIVE_BUS_UNITS: Mapping[str, int] = {"ide": 2, "scsi": 7}
"""Units per bus for the interfaces that have buses (QEMU's if_max_devs)."""


def drive_id(
    tree: Mapping[str, object],
    default_if: str,
    taken: Sequence[tuple[str, int, int]],
    default_units: int | None = None,
) -> tuple[str, int, int]:
    """QEMU's name for a -drive without id, and its (bus, unit).

    ``taken`` lists (interface, bus, unit) of the drives before it;
    ``default_units`` is the machine's units per bus of its default interface
    where it differs (q35's AHCI: 1).
    """
    interface = str(tree.get("if", default_if))
    max_devs = DRIVE_BUS_UNITS.get(interface, 0)
    if interface == default_if and default_units is not None:
        max_devs = default_units
    index = integer(tree.get("index"), -1)
    bus, unit = integer(tree.get("bus"), 0), integer(tree.get("unit"), -1)
    if index != -1:
        bus, unit = (index // max_devs, index % max_devs) if max_devs else (0, index)
    if unit == -1:
        unit = 0
        while (interface, bus, unit) in taken:
            unit += 1
            if max_devs and unit >= max_devs:
                unit -= max_devs
                bus += 1
    media = ""
    if interface in DRIVE_BUS_UNITS:
        media = "-cd" if tree.get("media") == "cdrom" else "-hd"
    if max_devs:
        return f"{interface}{bus}{media}{unit}", bus, unit
    return f"{interface}{media}{unit}", bus, unit


def integer(value: object, default: int | None = None) -> int:
    """An option's number, as QEMU reads it (0x.. hex, 0.. octal); ``default`` if absent."""
    if value is None and default is not None:
        return default
    try:
        return int(str(value), 0)
    except ValueError:
        raise ArgumentError(f"invalid number '{value}'") from None


def chardev_spec(spec: str, chardev_id: str) -> dict[str, object]:
    """A -serial/-parallel spec (``file:F``, ``unix:P,server=on``, ``tcp:H:P``,
    ``udp:H:P``, ``null``, ``pty``, ``vc``, ``stdio``...) as -chardev keys."""
    kind, _, rest = spec.partition(":")
    out: dict[str, object] = {"id": chardev_id}
    if kind in ("null", "pty", "vc", "stdio", "msmouse", "braille", "testdev") and not rest:
        out["backend"] = kind
    elif kind == "vc":
        out["backend"] = "vc"
    elif kind == "file":
        out.update(backend="file", path=rest)
    elif kind in ("pipe", "tty", "parport") or spec.startswith("/dev/"):
        out.update(backend=kind if not spec.startswith("/dev/") else "serial",
                   path=rest or spec)  # fmt: skip
    elif kind == "unix":
        path, *options = rest.split(",")
        out.update(backend="socket", path=path, **_flags(options))
    elif kind in ("tcp", "telnet", "websocket"):
        where, *options = rest.split(",")
        host, _, port = where.rpartition(":")
        out.update(backend="socket", host=host, port=port, **_flags(options))
        if kind != "tcp":
            out[kind] = "on"
    elif kind == "udp":
        remote, _, local = rest.partition("@")
        host, _, port = remote.rpartition(":")
        out.update(backend="udp", host=host, port=port)
        if local:
            localaddr, _, localport = local.rpartition(":")
            out.update(localaddr=localaddr, localport=localport)
    else:
        raise ArgumentError(f"'{spec}' is not a character device QEMU knows")
    return out


def _flags(options: Sequence[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if key == "nowait":
            out["wait"] = "off"
        else:
            out[key] = value if sep else "on"
    return out


_SECTION = re.compile(r'^\[\s*([\w-]+)\s*(?:"([^"]*)")?\s*\]$')
_ITEM = re.compile(r'^([\w.-]+)\s*=\s*"(.*)"$')


def config_sections(text: str, where: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """QEMU's ``-readconfig`` file: ``[group "id"]`` sections of ``key = "value"``
    lines; an id becomes the section's ``id`` item (``qemu_config_parse``)."""
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        section, item = _SECTION.match(line), _ITEM.match(line)
        if section is not None:
            group, section_id = section.groups()
            sections.append((group, [("id", section_id)] if section_id else []))
        elif item is not None and sections:
            sections[-1][1].append((item.group(1), item.group(2)))
        else:
            raise ArgumentError(f"{where}:{number}: cannot parse '{line}'")
    return sections
