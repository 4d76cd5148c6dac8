"""Chardevs in QMP's and -chardev's syntax: both ways, and what has no -chardev form."""

from __future__ import annotations

import pytest

from qmpvm.config.chardev import check_writable, from_legacy, to_legacy
from qmpvm.errors import ArgumentError


def qmp(backend: str, **data: object) -> dict[str, object]:
    return {"id": "c", "backend": {"type": backend, "data": data}}


@pytest.mark.parametrize(
    "args",
    [
        qmp("socket", addr={"type": "unix", "data": {"path": "/s"}}, server=True, wait=False),
        qmp(
            "socket",
            addr={"type": "inet", "data": {"host": "::1", "port": "7"}},
            server=False,
            reconnect=5,
        ),
        qmp("socket", addr={"type": "unix", "data": {"path": "/s"}}, server=True, wait=True),
        qmp(
            "udp",
            remote={"type": "inet", "data": {"host": "h", "port": "9", "ipv6": True}},
            local={"type": "inet", "data": {"host": "", "port": "10"}},
        ),
        qmp("file", out="/o", append=True, logfile="/l", logappend=True),
        qmp("ringbuf", size=4096),
        qmp("mux", chardev="base"),
        qmp("null"),
    ],
)
def test_each_chardev_survives_the_trip_through_dash_chardev(args: dict[str, object]) -> None:
    check_writable(args)
    assert from_legacy(dict(to_legacy(args))) == [args]


def test_qmps_defaults_are_written_out() -> None:
    listen = qmp("socket", addr={"type": "unix", "data": {"path": "/s"}})
    assert dict(to_legacy(listen))["server"] is True  # QMP listens by default...
    assert dict(to_legacy(listen))["wait"] is False  # ...without waiting
    legacy = from_legacy({"backend": "socket", "id": "c", "path": "/s", "server": True})
    assert legacy[0]["backend"]["data"]["wait"] is True  # type: ignore[index]  # -chardev waits


def test_mux_on_is_two_chardevs_as_qemu_makes_them() -> None:
    assert from_legacy({"backend": "null", "id": "m", "mux": True}) == [
        {"id": "m-base", "backend": {"type": "null", "data": {}}},
        {"id": "m", "backend": {"type": "mux", "data": {"chardev": "m-base"}}},
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (qmp("socket", addr={"type": "vsock", "data": {"cid": "3", "port": "9"}}),
         "address of type 'vsock' has no -chardev form"),
        (qmp("socket", addr={"type": "inet", "data": {"host": "h", "port": "1",
                                                      "keep-alive": True}}),
         "'addr' has no -chardev form"),
    ],
)  # fmt: skip
def test_what_has_no_dash_chardev_form_is_refused(args: dict[str, object], message: str) -> None:
    with pytest.raises(ArgumentError, match=message):
        check_writable(args)
