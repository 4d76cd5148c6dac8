"""qmpvm.qapi.check against QEMU 7.2's real schema and small hand-made ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qmpvm.errors import ArgumentError, CommandNotFoundError
from qmpvm.qapi.check import (
    MAX_DEPTH,
    Alternate,
    CommandDecl,
    Enum,
    FlatUnion,
    Member,
    Schema,
    declare,
    merge,
    parse_int,
    parse_number,
    parse_size,
)

ENTRIES = json.loads((Path(__file__).parent / "qemu-7.2-schema.json").read_text())
QEMU = Schema(ENTRIES)

QCOW2 = {"driver": "qcow2", "node-name": "n", "file": {"driver": "file", "filename": "/x"}}


def refusal(schema: Schema, command: str, arguments: dict[str, object]) -> str:
    with pytest.raises(ArgumentError) as caught:
        schema.check_command(command, arguments)
    return caught.value.desc


# ---- the real schema: accepted


@pytest.mark.parametrize(
    ("command", "arguments"),
    [
        ("blockdev-add", {"driver": "file", "node-name": "f", "filename": "/x.img"}),
        ("blockdev-add", QCOW2),
        ("blockdev-add", {**QCOW2, "backing": None}),
        ("blockdev-add", {**QCOW2, "backing": "other-node", "read-only": True}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "n", "file": "f"}),
        (
            "blockdev-add",
            {"driver": "qcow2", "node-name": "n", "file": "f", "overlap-check": "all"},
        ),
        (
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "n",
                "file": "f",
                "overlap-check": {"inactive-l2": True},
            },
        ),
        (
            "blockdev-add",
            {
                "driver": "nbd",
                "node-name": "d",
                "server": {"type": "inet", "host": "localhost", "port": "6000"},
                "export": "disk",
            },
        ),
        (
            "blockdev-add",
            {
                "driver": "luks",
                "node-name": "l",
                "key-secret": "sec0",
                "file": {"driver": "file", "filename": "/l.img"},
            },
        ),
        (
            "blockdev-add",
            {"driver": "throttle", "node-name": "t", "throttle-group": "tg0", "file": "f"},
        ),
        (
            "netdev_add",
            {"type": "user", "id": "n0", "hostfwd": [{"str": "tcp::2222-:22"}], "ipv6": False},
        ),
        ("netdev_add", {"type": "tap", "id": "n1", "fd": "3", "vhost": True}),
        (
            "netdev_add",
            {
                "type": "stream",
                "id": "n2",
                "server": False,
                "addr": {"type": "inet", "host": "127.0.0.1", "port": "1234"},
            },
        ),
        (
            "netdev_add",
            {
                "type": "dgram",
                "id": "n3",
                "local": {"type": "inet", "host": "127.0.0.1", "port": "1"},
                "remote": {"type": "inet", "host": "127.0.0.1", "port": "2"},
            },
        ),
        ("netdev_add", {"type": "none", "id": "n4"}),
        (
            "chardev-add",
            {
                "id": "c0",
                "backend": {
                    "type": "socket",
                    "data": {
                        "addr": {"type": "unix", "data": {"path": "/run/c0.sock"}},
                        "server": True,
                        "wait": False,
                    },
                },
            },
        ),
        ("chardev-add", {"id": "c1", "backend": {"type": "ringbuf", "data": {"size": 65536}}}),
        ("chardev-add", {"id": "c2", "backend": {"type": "file", "data": {"out": "/log"}}}),
        ("chardev-add", {"id": "c3", "backend": {"type": "null", "data": {}}}),
        ("object-add", {"qom-type": "memory-backend-ram", "id": "m0", "size": 1 << 30}),
        (
            "object-add",
            {"qom-type": "memory-backend-ram", "id": "m1", "size": 4096, "host-nodes": [0, 1]},
        ),
        ("object-add", {"qom-type": "secret", "id": "s0", "data": "hunter2", "format": "raw"}),
        ("object-add", {"qom-type": "iothread", "id": "io0", "poll-max-ns": 32768}),
        ("object-add", {"qom-type": "rng-random", "id": "r0", "filename": "/dev/urandom"}),
        (
            "object-add",
            {"qom-type": "throttle-group", "id": "tg0", "limits": {"iops-total": 100}},
        ),
        ("object-add", {"qom-type": "can-bus", "id": "bus0"}),
        ("device_add", {"driver": "virtio-net-pci", "id": "nic0", "bus": "pci.0"}),
        ("device_add", {"driver": "virtio-blk-pci"}),
        ("qom-set", {"path": "/machine", "property": "x", "value": {"any": ["thing", 1]}}),
        ("query-status", {}),
    ],
)
def test_real_commands_accepted(command: str, arguments: dict[str, object]) -> None:
    assert QEMU.check_command(command, arguments) == arguments


# ---- the real schema: refused, in QEMU's words


@pytest.mark.parametrize(
    ("command", "arguments", "message"),
    [
        ("blockdev-add", {"node-name": "n"}, "Parameter 'driver' is missing"),
        ("blockdev-add", {"driver": "nope"}, "Parameter 'driver' does not accept value 'nope'"),
        ("blockdev-add", {"driver": 7}, "Invalid parameter type for 'driver', expected: string"),
        ("blockdev-add", {"driver": "file", "node-name": "f"}, "Parameter 'filename' is missing"),
        (
            "blockdev-add",
            {"driver": "file", "filename": "/x", "size": 1},
            "Parameter 'size' is unexpected",
        ),
        (
            "blockdev-add",
            {"driver": "file", "filename": "/x", "read-only": "yes"},
            "Invalid parameter type for 'read-only', expected: boolean",
        ),
        ("blockdev-add", {"driver": "qcow2", "node-name": "n"}, "Parameter 'file' is missing"),
        (
            "blockdev-add",
            {"driver": "qcow2", "node-name": "n", "file": {"driver": "file"}},
            "Parameter 'file.filename' is missing",
        ),
        (
            "blockdev-add",
            {"driver": "qcow2", "file": {"driver": "file", "filename": "/x", "bogus": 1}},
            "Parameter 'file.bogus' is unexpected",
        ),
        (
            "blockdev-add",
            {"driver": "qcow2", "file": {"driver": "zzz"}},
            "Parameter 'file.driver' does not accept value 'zzz'",
        ),
        (
            "blockdev-add",
            {"driver": "qcow2", "file": 5},
            "Invalid parameter type for 'file', expected: object or string",
        ),
        (
            "blockdev-add",
            {"driver": "qcow2", "file": "f", "backing": 5},
            "Invalid parameter type for 'backing', expected: object, string or null",
        ),
        (
            "blockdev-add",
            {"driver": "qcow2", "file": "f", "cache-size": 1.5},
            "Invalid parameter type for 'cache-size', expected: integer",
        ),
        (
            "blockdev-add",
            {"driver": "qcow2", "file": "f", "cache-size": True},
            "Invalid parameter type for 'cache-size', expected: integer",
        ),
        (
            "blockdev-add",
            {"driver": "qcow2", "file": "f", "cache-size": 1 << 64},
            "Invalid parameter type for 'cache-size', expected: integer",
        ),
        (
            "blockdev-add",
            {"driver": "qcow2", "file": "f", "overlap-check": "some"},
            "Parameter 'overlap-check' does not accept value 'some'",
        ),
        (
            "blockdev-add",
            {"driver": "nbd", "server": {"type": "inet", "host": "h", "port": 6000}},
            "Invalid parameter type for 'server.port', expected: string",
        ),
        (
            "blockdev-add",
            {"driver": "nbd", "server": {"type": "inet", "port": "6000"}},
            "Parameter 'server.host' is missing",
        ),
        (
            "blockdev-add",
            {"driver": "nbd", "server": {"type": "tcp", "host": "h", "port": "1"}},
            "Parameter 'server.type' does not accept value 'tcp'",
        ),
        (
            "blockdev-add",
            {"driver": "luks", "file": "f", "key-secret": 1},
            "Invalid parameter type for 'key-secret', expected: string",
        ),
        (
            "blockdev-add",
            {"driver": "throttle", "file": "f"},
            "Parameter 'throttle-group' is missing",
        ),
        ("netdev_add", {"type": "user"}, "Parameter 'id' is missing"),
        ("netdev_add", {"id": "n"}, "Parameter 'type' is missing"),
        (
            "netdev_add",
            {"type": "user", "id": "n", "hostfwd": {"str": "x"}},
            "Invalid parameter type for 'hostfwd', expected: array",
        ),
        (
            "netdev_add",
            {"type": "user", "id": "n", "hostfwd": [{"str": "x"}, {"str": 5}]},
            "Invalid parameter type for 'hostfwd[1].str', expected: string",
        ),
        (
            "netdev_add",
            {"type": "user", "id": "n", "hostfwd": ["tcp::1-:2"]},
            "Invalid parameter type for 'hostfwd[0]', expected: object",
        ),
        (
            "netdev_add",
            {"type": "tap", "id": "n", "fd": 3},
            "Invalid parameter type for 'fd', expected: string",
        ),
        ("netdev_add", {"type": "stream", "id": "n"}, "Parameter 'addr' is missing"),
        (
            "netdev_add",
            {"type": "dgram", "id": "n", "local": {"type": "unix"}},
            "Parameter 'local.path' is missing",
        ),
        ("netdev_add", {"type": "none", "id": "n", "x": 1}, "Parameter 'x' is unexpected"),
        (
            "chardev-add",
            {"id": "c", "backend": {"type": "socket", "data": {"addr": {"type": "unix"}}}},
            "Parameter 'backend.data.addr.data' is missing",
        ),
        (
            "chardev-add",
            {
                "id": "c",
                "backend": {"type": "socket", "data": {"addr": {"type": "unix", "data": {}}}},
            },
            "Parameter 'backend.data.addr.data.path' is missing",
        ),
        (
            "chardev-add",
            {"id": "c", "backend": {"type": "ringbuf", "data": {"size": "64k"}}},
            "Invalid parameter type for 'backend.data.size', expected: integer",
        ),
        (
            "chardev-add",
            {"id": "c", "backend": {"type": "file", "data": {}}},
            "Parameter 'backend.data.out' is missing",
        ),
        (
            "chardev-add",
            {"id": "c", "backend": {"type": "null"}},
            "Parameter 'backend.data' is missing",
        ),
        (
            "object-add",
            {"qom-type": "memory-backend-ram", "id": "m"},
            "Parameter 'size' is missing",
        ),
        (
            "object-add",
            {"qom-type": "memory-backend-ram", "id": "m", "size": "1G"},
            "Invalid parameter type for 'size', expected: integer",
        ),
        (
            "object-add",
            {"qom-type": "memory-backend-ram", "id": "m", "size": 1, "host-nodes": [0, "1"]},
            "Invalid parameter type for 'host-nodes[1]', expected: integer",
        ),
        (
            "object-add",
            {"qom-type": "secret", "id": "s", "data": "x", "format": "hex"},
            "Parameter 'format' does not accept value 'hex'",
        ),
        (
            "object-add",
            {"qom-type": "iothread", "id": "io", "poll-max-ns": "1"},
            "Invalid parameter type for 'poll-max-ns', expected: integer",
        ),
        (
            "object-add",
            {"qom-type": "rng-random", "id": "r", "file": "/dev/urandom"},
            "Parameter 'file' is unexpected",
        ),
        (
            "object-add",
            {"qom-type": "throttle-group", "id": "t", "limits": {"iops": 1}},
            "Parameter 'limits.iops' is unexpected",
        ),
        (
            "object-add",
            {"qom-type": "no-such-object", "id": "x"},
            "Parameter 'qom-type' does not accept value 'no-such-object'",
        ),
        ("object-add", {"qom-type": "iothread"}, "Parameter 'id' is missing"),
        ("device_add", {"id": "nic0"}, "Parameter 'driver' is missing"),
        (
            "device_add",
            {"driver": "virtio-net-pci", "mac": "52:54:00:12:34:56"},
            "Parameter 'mac' is unexpected",
        ),
        ("query-status", {"verbose": True}, "Parameter 'verbose' is unexpected"),
    ],
)
def test_real_commands_refused(command: str, arguments: dict[str, object], message: str) -> None:
    assert refusal(QEMU, command, arguments) == message


def test_unknown_command_and_bad_arguments() -> None:
    with pytest.raises(CommandNotFoundError, match="The command nope has not been found"):
        QEMU.check_command("nope", {})
    with pytest.raises(ArgumentError, match="QMP input member 'arguments' must be an object"):
        QEMU.check_command("blockdev-add", ["driver"])  # type: ignore[arg-type]


def test_check_command_returns_a_plain_copy() -> None:
    result = QEMU.check_command("blockdev-add", QCOW2)
    assert result == QCOW2
    assert result is not QCOW2


def test_lookups() -> None:
    assert QEMU.has_command("blockdev-add")
    assert not QEMU.has_command("SHUTDOWN")  # an event
    assert not QEMU.has_command("49")  # a type
    assert QEMU.command("device_add") == {
        "name": "device_add",
        "ret-type": "0",
        "meta-type": "command",
        "arg-type": "186",
        "features": ["json-cli", "json-cli-hotplug"],
    }
    assert QEMU.command("nope") is None
    assert QEMU.arg_type("blockdev-add") == "49"
    assert QEMU.arg_type("nope") is None
    assert QEMU.enum_values("640") == ("none", "constant", "cached", "all")
    assert QEMU.enum_values("49") is None
    assert QEMU.enum_values("no-such-type") is None
    assert QEMU.members("186") == (
        Member("driver", "str", optional=False),
        Member("bus", "str", optional=True),
        Member("id", "str", optional=True),
    )
    assert QEMU.members("str") is None


def test_variant_members() -> None:
    netdev = QEMU.arg_type("netdev_add")
    assert netdev is not None
    tap = QEMU.variant_members(netdev, "tap")
    assert tap is not None
    assert [m.name for m in tap[:3]] == ["id", "type", "ifname"]
    assert Member("fd", "str", optional=True) in tap
    assert QEMU.variant_members(netdev, "none") == QEMU.members(netdev)
    assert QEMU.variant_members(netdev, "bogus") is None
    assert QEMU.variant_members("186", "x") is None  # not a union


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (["driver"], "291"),
        (["file"], "518"),
        (["file", "filename"], "str"),
        (["file", "driver"], "291"),
        (["server"], "[365]"),  # gluster's, the first variant with a 'server'
        (["backing", "cache", "direct"], "bool"),
        (["nope"], None),
        (["driver", "x"], None),
        ([], "49"),
    ],
)
def test_member_type(path: list[str], expected: str | None) -> None:
    assert QEMU.member_type("49", path) == expected


def test_member_type_by_tag() -> None:
    assert QEMU.member_type("49", ["server", "port"]) is None  # gluster's is a list
    assert QEMU.member_type("49", ["server", "port"], {"driver": "nbd"}) == "str"
    assert QEMU.member_type("49", ["server", "0", "port"]) == "str"
    nested = {"driver": "qcow2", "file": {"driver": "nbd"}}
    assert QEMU.member_type("49", ["file", "server"], nested) == "365"
    assert QEMU.member_type("49", ["file", "server"], {"file": "name"}) == "[365]"
    quorum = {"driver": "quorum", "children": [{"driver": "nbd"}]}
    assert QEMU.member_type("49", ["children", "0", "server"], quorum) == "365"
    keyval = {"driver": "quorum", "children": {"0": {"driver": "nbd"}}}
    assert QEMU.member_type("49", ["children", "0", "server"], keyval) == "365"


def test_member_type_through_lists() -> None:
    assert QEMU.member_type("100", ["hostfwd"]) == "[574]"
    assert QEMU.member_type("100", ["hostfwd", "0", "str"]) == "str"
    assert QEMU.member_type("100", ["hostfwd", "x"]) is None


# ---- a small hand-made schema: the rules one by one

BUILTIN_ENTRIES = [
    {"name": name, "json-type": json_type, "meta-type": "builtin"}
    for name, json_type in [
        ("str", "string"),
        ("int", "int"),
        ("bool", "boolean"),
        ("number", "number"),
        ("null", "null"),
        ("any", "value"),
        ("uint8", "int"),
        ("int8", "int"),
        ("int64", "int"),
        ("uint32", "int"),
        ("size", "int"),
    ]
]
SMALL = Schema(
    [
        *BUILTIN_ENTRIES,
        {"name": "cmd", "meta-type": "command", "arg-type": "1", "ret-type": "0"},
        {"name": "bare", "meta-type": "command"},
        {"name": "0", "members": [], "meta-type": "object"},
        {
            "name": "1",
            "meta-type": "object",
            "members": [
                {"name": "kind", "type": "2"},
                {"name": "opt", "default": None, "type": "str"},
            ],
            "tag": "kind",
            "variants": [{"case": "a", "type": "3"}, {"case": "c", "type": "4"}],
        },
        {"name": "2", "meta-type": "enum", "values": ["a", "b", "c"]},
        {"name": "3", "meta-type": "object", "members": [{"name": "x", "type": "int"}]},
        {
            "name": "4",
            "meta-type": "object",
            "members": [{"name": "sub", "type": "5"}, {"name": "y", "default": None, "type": "9"}],
            "tag": "sub",
            "variants": [{"case": "deep", "type": "6"}],
        },
        {"name": "5", "meta-type": "enum", "members": [{"name": "deep"}, {"name": "shallow"}]},
        {"name": "6", "meta-type": "object", "members": [{"name": "z", "type": "bool"}]},
        {"name": "7", "meta-type": "alternate", "members": [{"type": "bool"}, {"type": "str"}]},
        {"name": "8", "meta-type": "alternate", "members": [{"type": "int"}, {"type": "str"}]},
        {"name": "9", "meta-type": "array", "element-type": "int"},
        {"name": "10", "meta-type": "alternate", "members": [{"type": "str"}, {"type": "3"}]},
        {
            "name": "11",
            "meta-type": "alternate",
            "members": [{"type": "number"}, {"type": "2"}, {"type": "9"}],
        },
        {
            "name": "tree",
            "meta-type": "object",
            "members": [
                {"name": "children", "default": None, "type": "[tree]"},
                {"name": "next", "default": None, "type": "tree"},
                {"name": "data", "default": None, "type": "any"},
            ],
        },
        {"name": "[tree]", "meta-type": "array", "element-type": "tree"},
    ]
)


@pytest.mark.parametrize(
    ("type_name", "value", "message"),
    [
        ("str", "x", None),
        ("str", 1, "Invalid parameter type for 'v', expected: string"),
        ("str", None, "Invalid parameter type for 'v', expected: string"),
        ("int", 1, None),
        ("int", -(1 << 63), None),
        ("int", (1 << 64) - 1, None),
        ("int", 1 << 64, "Invalid parameter type for 'v', expected: integer"),
        ("int", -(1 << 63) - 1, "Invalid parameter type for 'v', expected: integer"),
        ("int", True, "Invalid parameter type for 'v', expected: integer"),
        ("int", 1.0, "Invalid parameter type for 'v', expected: integer"),
        ("int", "1", "Invalid parameter type for 'v', expected: integer"),
        ("uint8", 255, None),
        ("uint8", 256, "Parameter 'v' expects uint8"),
        ("uint8", -1, "Parameter 'v' expects uint8"),
        ("uint8", "1", "Invalid parameter type for 'v', expected: integer"),
        ("int8", -128, None),
        ("int8", 128, "Parameter 'v' expects int8"),
        ("int64", 1 << 63, "Parameter 'v' expects int64"),
        ("uint32", (1 << 32) - 1, None),
        ("uint32", 1 << 32, "Parameter 'v' expects uint32"),
        ("size", (1 << 64) - 1, None),
        ("size", -1, "Parameter 'v' expects size"),
        ("size", 1 << 64, "Parameter 'v' expects size"),
        ("number", 1, None),
        ("number", 1.5, None),
        ("number", True, "Invalid parameter type for 'v', expected: number"),
        ("number", "1.5", "Invalid parameter type for 'v', expected: number"),
        ("bool", False, None),
        ("bool", 0, "Invalid parameter type for 'v', expected: boolean"),
        ("bool", "on", "Invalid parameter type for 'v', expected: boolean"),
        ("null", None, None),
        ("null", 0, "Invalid parameter type for 'v', expected: null"),
        ("any", {"x": [1, None]}, None),
        ("any", None, None),
        ("2", "b", None),
        ("2", "d", "Parameter 'v' does not accept value 'd'"),
        ("2", 1, "Invalid parameter type for 'v', expected: string"),
        ("9", [1, 2], None),
        ("9", (1, 2), None),
        ("9", [], None),
        ("9", [1, "2"], "Invalid parameter type for 'v[1]', expected: integer"),
        ("9", {"0": 1}, "Invalid parameter type for 'v', expected: array"),
        ("7", True, None),
        ("7", "x", None),
        ("7", 1, "Invalid parameter type for 'v', expected: boolean or string"),
        ("8", 1, None),
        ("8", 1.5, "Invalid parameter type for 'v', expected: integer"),
        ("8", None, "Invalid parameter type for 'v', expected: integer or string"),
        ("10", {"x": 1}, None),
        ("10", {}, "Parameter 'v.x' is missing"),
        ("10", [], "Invalid parameter type for 'v', expected: string or object"),
        ("11", 2, None),
        ("11", "c", None),
        ("11", "z", "Parameter 'v' does not accept value 'z'"),
        ("11", [1], None),
        ("11", False, "Invalid parameter type for 'v', expected: number, string or array"),
        ("3", [], "Invalid parameter type for 'v', expected: object"),
        ("[int]", [1], None),
        ("[int]", ["1"], "Invalid parameter type for 'v[0]', expected: integer"),
    ],
)
def test_check_rules(type_name: str, value: object, message: str | None) -> None:
    if message is None:
        assert SMALL.check(type_name, value, "v") is value
    else:
        with pytest.raises(ArgumentError) as caught:
            SMALL.check(type_name, value, "v")
        assert caught.value.desc == message


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"kind": "a", "x": 1}, None),
        ({"kind": "a", "x": 1, "opt": "o"}, None),
        ({"kind": "a"}, "Parameter 'x' is missing"),
        ({"kind": "a", "x": 1, "z": True}, "Parameter 'z' is unexpected"),
        # a tag value the enum has but no variant: no more members
        ({"kind": "b"}, None),
        ({"kind": "b", "x": 1}, "Parameter 'x' is unexpected"),
        ({"kind": "zz", "x": 1}, "Parameter 'kind' does not accept value 'zz'"),
        ({"kind": 1}, "Invalid parameter type for 'kind', expected: string"),
        ({}, "Parameter 'kind' is missing"),
        # a variant that is itself a union
        ({"kind": "c", "sub": "deep", "z": False}, None),
        ({"kind": "c", "sub": "deep"}, "Parameter 'z' is missing"),
        ({"kind": "c", "sub": "shallow", "y": [1]}, None),
        ({"kind": "c", "sub": "shallow", "z": True}, "Parameter 'z' is unexpected"),
        # base members are visited before the variant's, unexpected ones last
        ({"kind": "a", "opt": 1}, "Invalid parameter type for 'opt', expected: string"),
        ({"kind": "a", "q": 1}, "Parameter 'x' is missing"),
    ],
)
def test_flat_unions(arguments: dict[str, object], message: str | None) -> None:
    if message is None:
        assert SMALL.check_command("cmd", arguments) == arguments
    else:
        assert refusal(SMALL, "cmd", arguments) == message


def test_command_without_arg_type() -> None:
    assert SMALL.check_command("bare", {}) == {}
    assert refusal(SMALL, "bare", {"x": 1}) == "Parameter 'x' is unexpected"


def test_top_level_wrong_type() -> None:
    with pytest.raises(ArgumentError, match="Invalid parameter type for 'arguments', expected"):
        SMALL.check("3", 5)


def test_unknown_type_is_a_schema_bug() -> None:
    with pytest.raises(ValueError, match="not in the schema"):
        SMALL.check("nope", 1)
    with pytest.raises(ValueError, match="is a command, not a type"):
        SMALL.check("cmd", {})


# ---- nesting


def nested(levels: int, member: str, leaf: dict[str, object]) -> dict[str, object]:
    value = leaf
    for _ in range(levels):
        value = {member: value}
    return value


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    value: dict[str, object] = {"driver": "file", "filename": "/x"}
    for _ in range(2000):
        value = {"driver": "qcow2", "file": value}
    message = refusal(QEMU, "blockdev-add", value)
    assert message == f"Parameter '{'.'.join(['file'] * MAX_DEPTH)}' is nested too deeply"


def test_deep_lists_are_refused() -> None:
    value: dict[str, object] = {}
    for _ in range(2000):
        value = {"children": [value]}
    with pytest.raises(ArgumentError, match=r"is nested too deeply$"):
        SMALL.check("tree", value)


def test_nesting_up_to_the_bound_is_accepted() -> None:
    assert SMALL.check("tree", nested(MAX_DEPTH - 1, "next", {}))
    with pytest.raises(ArgumentError, match="nested too deeply"):
        SMALL.check("tree", nested(MAX_DEPTH, "next", {}))


def test_deep_any_is_not_walked() -> None:
    deep = nested(2000, "x", {})
    assert SMALL.check("tree", {"data": deep})
    args = {"path": "/machine", "property": "p", "value": deep}
    assert QEMU.check_command("qom-set", args) == args


def test_keyval_on_deep_input_does_not_raise() -> None:
    value = nested(2000, "next", {})
    assert SMALL.from_keyval("tree", value) == value
    blockdev: dict[str, object] = {"driver": "file", "filename": "/x"}
    for _ in range(2000):
        blockdev = {"driver": "qcow2", "file": blockdev, "cache-size": "1"}
    typed = QEMU.from_keyval("49", blockdev)
    assert isinstance(typed, dict)
    assert typed["cache-size"] == 1


# ---- keyval typing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1024", 1024),
        ("64k", 64 * 1024),
        ("64K", 64 * 1024),
        ("2M", 2 << 20),
        ("1G", 1 << 30),
        ("1.5G", 3 << 29),
        ("1T", 1 << 40),
        ("1P", 1 << 50),
        ("15E", 15 << 60),
        ("16E", None),
        ("1.k", 1024),
        ("1.0", 1),
        ("0.5", None),
        ("0.5K", 512),
        ("512B", 512),
        ("512b", 512),
        ("0x1000", 4096),
        ("0x1000k", None),
        ("1e3", None),
        ("1.5e3k", None),
        ("-1", None),
        ("1Q", None),
        ("", None),
        ("k", None),
        ("18446744073709551615", (1 << 64) - 1),
        ("18446744073709551616", None),
    ],
)
def test_parse_size(text: str, expected: int | None) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("42", 42),
        ("-42", -42),
        ("+7", 7),
        ("0x1F", 31),
        ("-0x10", -16),
        ("010", 8),
        ("08", None),
        ("1k", None),
        ("1.0", None),
        ("", None),
        ("0x", None),
        (" 1", None),
    ],
)
def test_parse_int(text: str, expected: int | None) -> None:
    assert parse_int(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1.0),
        ("1.5", 1.5),
        ("-.5", -0.5),
        ("2e3", 2000.0),
        ("0x1p4", 16.0),
        ("1e999", None),
        ("inf", None),
        ("nan", None),
        ("1_000", None),
        ("x", None),
    ],
)
def test_parse_number(text: str, expected: float | None) -> None:
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    ("type_name", "value", "expected"),
    [
        ("bool", "on", True),
        ("bool", "yes", True),
        ("bool", "true", True),
        ("bool", "y", True),
        ("bool", "off", False),
        ("bool", "no", False),
        ("bool", "false", False),
        ("bool", "n", False),
        ("bool", "On", "On"),
        ("bool", "1", "1"),
        ("int", "12", 12),
        ("int", "0x10", 16),
        ("int", "-3", -3),
        ("int", "1G", 1 << 30),  # 'int' may be a masked 'size'
        ("int", "ten", "ten"),
        ("uint8", "7", 7),
        ("uint8", "1k", "1k"),  # a named sized int is not a size
        ("size", "4k", 4096),
        ("size", "010", 10),  # qemu_strtosz is decimal
        ("number", "2.5", 2.5),
        ("number", "3", 3.0),
        ("number", "x", "x"),
        ("str", "on", "on"),
        ("any", "1", "1"),
        ("null", "", ""),
        ("2", "a", "a"),
        ("9", {"0": "1", "1": "0x2"}, [1, 2]),
        ("9", ["3", "4"], [3, 4]),
        ("9", {"1": "1"}, {"1": "1"}),  # not a keyval list: left for check
        ("9", {"0": "1", "2": "2"}, {"0": "1", "2": "2"}),
        ("9", "1", "1"),
        ("7", "on", True),  # bool | str: the bool branch first
        ("7", "off", False),
        ("7", "other", "other"),
        ("8", "12", 12),  # int | str
        ("8", "twelve", "twelve"),
        ("10", "node0", "node0"),  # str | object
        ("10", {"x": "5"}, {"x": 5}),
        ("11", "2", 2.0),  # number | enum | array
        ("11", "a", "a"),
        ("11", {"0": "1"}, [1]),
        ("3", {"x": "7", "extra": "on"}, {"x": 7, "extra": "on"}),
        ("3", "7", "7"),
    ],
)
def test_from_keyval(type_name: str, value: object, expected: object) -> None:
    assert SMALL.from_keyval(type_name, value) == expected


def test_from_keyval_flat_unions() -> None:
    assert SMALL.from_keyval("1", {"kind": "a", "x": "5", "opt": "on"}) == {
        "kind": "a",
        "x": 5,
        "opt": "on",
    }
    assert SMALL.from_keyval("1", {"kind": "c", "sub": "deep", "z": "on", "y": {"0": "1"}}) == {
        "kind": "c",
        "sub": "deep",
        "z": True,
        "y": [1],
    }
    # no variant picked: variant members are left as they are
    assert SMALL.from_keyval("1", {"kind": "b", "x": "5"}) == {"kind": "b", "x": "5"}


def test_from_keyval_real_commands() -> None:
    object_add = QEMU.arg_type("object-add")
    assert object_add is not None
    typed = QEMU.from_keyval(
        object_add,
        {
            "qom-type": "memory-backend-ram",
            "id": "m0",
            "size": "1.5G",
            "share": "on",
            "host-nodes": {"0": "0", "1": "1"},
        },
    )
    assert typed == {
        "qom-type": "memory-backend-ram",
        "id": "m0",
        "size": 3 << 29,
        "share": True,
        "host-nodes": [0, 1],
    }
    assert QEMU.check_command("object-add", typed) == typed

    netdev = QEMU.from_keyval(
        "100",
        {"type": "user", "id": "n", "hostfwd": {"0": {"str": "tcp::1-:2"}}, "ipv6": "off"},
    )
    assert netdev == {"type": "user", "id": "n", "hostfwd": [{"str": "tcp::1-:2"}], "ipv6": False}

    blockdev = QEMU.from_keyval(
        "49",
        {
            "driver": "qcow2",
            "node-name": "n",
            "read-only": "on",
            "file": {"driver": "file", "filename": "/x", "drop-cache": "off"},
            "backing": "base",
            "cache-size": "1M",
            "unknown": "on",
        },
    )
    assert blockdev == {
        "driver": "qcow2",
        "node-name": "n",
        "read-only": True,
        "file": {"driver": "file", "filename": "/x", "drop-cache": False},
        "backing": "base",
        "cache-size": 1 << 20,
        "unknown": "on",
    }
    assert QEMU.from_keyval("626", "5") == 5  # int | bool | [int]
    assert QEMU.from_keyval("626", "on") is True
    assert QEMU.from_keyval("626", {"0": "1", "1": "2"}) == [1, 2]


def test_untypeable_text_is_then_refused_by_check() -> None:
    typed = QEMU.from_keyval("49", {"driver": "file", "filename": "/x", "read-only": "maybe"})
    with pytest.raises(ArgumentError) as caught:
        QEMU.check("49", typed)
    assert caught.value.desc == "Invalid parameter type for 'read-only', expected: boolean"


# ---- qmpvm's own commands


OWN = declare(
    {
        "vm-set-memory": CommandDecl(
            args={
                "size": "size",
                "*slots": "uint8",
                "*tags": "[str]",
                "*policy": Enum("bind", "interleave"),
                "*source": {"path": "str", "*readonly": "bool"},
                "*ranges": [{"start": "int", "*end": "int"}],
            },
            ret={"size": "size"},
        ),
        "vm-attach": CommandDecl(
            args=FlatUnion(
                tag="kind",
                base={"id": "str"},
                variants={"disk": {"file": "str", "*ro": "bool"}, "none": {}},
            ),
            features=("unstable",),
        ),
        "vm-link": CommandDecl(args={"to": Alternate("str", {"node": "str"}), "*raw": "any"}),
        "vm-tree": CommandDecl(args={"root": "Tree"}, ret="[Tree]"),
        "query-status": CommandDecl(ret={"state": "str", "*reason": "str"}),
    },
    types={"Tree": {"name": "str", "*kids": "[Tree]"}},
)


def test_declare_shapes() -> None:
    by_name = {e["name"]: e for e in OWN}
    assert {"vm-set-memory", "vm-attach", "vm-link", "vm-tree", "query-status"} <= set(by_name)
    command = by_name["vm-set-memory"]
    assert command["meta-type"] == "command"
    args = by_name[command["arg-type"]]
    assert args["meta-type"] == "object"
    assert args["members"][0] == {"name": "size", "type": "size"}  # type: ignore[index]
    assert args["members"][1] == {"name": "slots", "default": None, "type": "uint8"}  # type: ignore[index]
    assert by_name["[str]"] == {"name": "[str]", "element-type": "str", "meta-type": "array"}
    assert by_name["size"] == {"name": "size", "json-type": "int", "meta-type": "builtin"}
    attach = by_name[by_name["vm-attach"]["arg-type"]]
    assert attach["tag"] == "kind"
    assert [m["name"] for m in attach["members"]] == ["kind", "id"]  # type: ignore[attr-defined]
    assert by_name["vm-attach"]["features"] == ["unstable"]
    assert by_name["Tree"]["meta-type"] == "object"
    assert by_name["vm-tree"]["ret-type"] == "[Tree]"
    empty = by_name[by_name["vm-link"]["ret-type"]]
    assert empty == {"name": empty["name"], "members": [], "meta-type": "object"}
    names = [e["name"] for e in OWN]
    assert len(names) == len(set(names))


def test_declare_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="neither a builtin nor declared"):
        declare({"x": CommandDecl(args={"a": "Nope"})})
    with pytest.raises(ValueError, match="an array is declared as"):
        declare({"x": CommandDecl(args={"a": ["str", "int"]})})
    with pytest.raises(ValueError, match="has no name"):
        declare({"x": CommandDecl(args={"*": "str"})})


@pytest.mark.parametrize(
    ("command", "arguments", "message"),
    [
        ("vm-set-memory", {"size": 1 << 30}, None),
        (
            "vm-set-memory",
            {
                "size": 1,
                "slots": 8,
                "tags": ["a"],
                "policy": "bind",
                "source": {"path": "/p", "readonly": True},
                "ranges": [{"start": 0}, {"start": 1, "end": 2}],
            },
            None,
        ),
        ("vm-set-memory", {}, "Parameter 'size' is missing"),
        ("vm-set-memory", {"size": -1}, "Parameter 'size' expects size"),
        ("vm-set-memory", {"size": 1, "slots": 300}, "Parameter 'slots' expects uint8"),
        (
            "vm-set-memory",
            {"size": 1, "policy": "spread"},
            "Parameter 'policy' does not accept value 'spread'",
        ),
        ("vm-set-memory", {"size": 1, "source": {}}, "Parameter 'source.path' is missing"),
        ("vm-set-memory", {"size": 1, "ranges": [{}]}, "Parameter 'ranges[0].start' is missing"),
        ("vm-attach", {"kind": "disk", "id": "d", "file": "/f"}, None),
        ("vm-attach", {"kind": "none", "id": "d"}, None),
        ("vm-attach", {"kind": "disk", "id": "d"}, "Parameter 'file' is missing"),
        ("vm-attach", {"kind": "tape", "id": "d"}, "Parameter 'kind' does not accept value 'tape'"),
        ("vm-link", {"to": "n"}, None),
        ("vm-link", {"to": {"node": "n"}, "raw": [1, {"x": None}]}, None),
        ("vm-link", {"to": 1}, "Invalid parameter type for 'to', expected: string or object"),
        ("vm-tree", {"root": {"name": "r", "kids": [{"name": "k", "kids": []}]}}, None),
        (
            "vm-tree",
            {"root": {"name": "r", "kids": [{}]}},
            "Parameter 'root.kids[0].name' is missing",
        ),
        ("query-status", {}, None),
        ("query-status", {"x": 1}, "Parameter 'x' is unexpected"),
    ],
)
def test_declared_commands_check(
    command: str, arguments: dict[str, object], message: str | None
) -> None:
    for schema in (Schema(OWN), Schema(merge(ENTRIES, OWN))):
        if message is None:
            assert schema.check_command(command, arguments) == arguments
        else:
            assert refusal(schema, command, arguments) == message


def test_declared_keyval() -> None:
    schema = Schema(merge(ENTRIES, OWN))
    arg = schema.arg_type("vm-set-memory")
    assert arg is not None
    typed = schema.from_keyval(arg, {"size": "2G", "slots": "4", "tags": {"0": "a", "1": "b"}})
    assert typed == {"size": 2 << 30, "slots": 4, "tags": ["a", "b"]}


def test_merge_renames_and_rewrites() -> None:
    merged = merge(ENTRIES, OWN)
    names = [e["name"] for e in merged]
    assert len(names) == len(set(names))
    engine_numbers = [int(e["name"]) for e in ENTRIES if e["name"].isdigit()]
    top = max(engine_numbers)
    by_name = {e["name"]: e for e in merged}
    # the engine's entries come first and are untouched
    engine_kept = [e for e in ENTRIES if e["name"] != "query-status"]
    assert merged[: len(engine_kept)] == engine_kept
    own = merged[len(engine_kept) :]
    for entry in own:
        name = str(entry["name"])
        meta = entry["meta-type"]
        if meta in ("object", "enum", "alternate"):
            assert name.isdigit()
            assert int(name) > top
    # every reference resolves inside the merged schema
    referenced: list[str] = []
    for entry in merged:
        referenced += [
            str(entry[k]) for k in ("arg-type", "ret-type", "element-type") if k in entry
        ]
        if entry["meta-type"] in ("object", "alternate"):
            referenced += [str(m["type"]) for m in entry["members"]]  # type: ignore[attr-defined]
        referenced += [str(v["type"]) for v in entry.get("variants", [])]  # type: ignore[attr-defined]
    assert set(referenced) <= set(by_name)
    # the declared names are gone, renamed
    assert "Tree" not in by_name
    tree_array = str(by_name["vm-tree"]["ret-type"])
    assert tree_array.startswith("[")
    assert int(tree_array[1:-1]) > top


def test_merge_does_not_repeat_builtins_and_replaces_commands() -> None:
    merged = merge(ENTRIES, OWN)
    names = [e["name"] for e in merged]
    for builtin in ("str", "int", "bool", "any"):
        assert names.count(builtin) == 1
    assert names.count("[str]") == 1
    assert "size" in names  # not the engine's: added once
    assert names.count("query-status") == 1
    assert merged[-1]["name"] == "query-status"  # qmpvm's, in place of the engine's
    schema = Schema(merged)
    ret = schema.command("query-status")
    assert ret is not None
    assert schema.members(str(ret["ret-type"])) == (
        Member("state", "str", optional=False),
        Member("reason", "str", optional=True),
    )
    # the engine's commands still check as before
    assert schema.check_command("blockdev-add", QCOW2) == QCOW2


def test_merge_numbers_past_the_highest() -> None:
    engine: list[dict[str, object]] = [
        {"name": "str", "json-type": "string", "meta-type": "builtin"},
        {"name": "5", "members": [], "meta-type": "object"},
        {"name": "x", "meta-type": "command", "arg-type": "5", "ret-type": "5"},
    ]
    own = declare({"y": CommandDecl(args={"a": "str"})})
    merged = merge(engine, own)
    assert [e["name"] for e in merged] == ["str", "5", "x", "6", "7", "y"]
    assert merged[-1] == {"name": "y", "meta-type": "command", "arg-type": "6", "ret-type": "7"}
    assert Schema(merged).check_command("y", {"a": "b"}) == {"a": "b"}
    assert merge([], []) == []
