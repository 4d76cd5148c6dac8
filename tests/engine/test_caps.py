"""Tests for engine capability probing (``qmpvm.engine.probe``) and its on-disk cache
(``qmpvm.engine.caps``, ``qmpvm.engine.caps_loader``).

One real probe of ``qemu-system-x86_64`` is shared by the session (through a
temporary cache directory of its own); every test runs with
``$QMPVM_CACHE_DIR`` pointing at a temporary directory, so none touches the
user's cache.  Crash survival runs twice: against real QEMU killed mid-probe,
and against a fake engine (a Python script speaking QMP) that aborts or hangs
on chosen types.  Nothing here depends on how fast the host is: cancellation
happens at points the test waits for, and a hang is declared when everything
before it is answered, not after a delay.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import json
import os
import pwd
import shutil
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

import qmpvm.engine.caps as caps_module
from qmpvm.engine import probe as probe_module
from qmpvm.engine import process as engine_process
from qmpvm.engine.caps import (
    VAR_CACHE,
    Capabilities,
    DeviceType,
    ProbeError,
    Properties,
    QmpSchema,
    cache_dirs,
    cache_path,
    default_cache_dir,
)
from qmpvm.engine.caps_loader import load_or_probe
from qmpvm.engine.link import EngineLink
from qmpvm.engine.probe import binary_identity, probe

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


def children() -> list[tuple[int, str]]:
    """Child processes of this test process not yet reaped: (pid, command line)."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2 :].split()[1] == me:
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                found.append((int(entry.name), " ".join(a.decode() for a in argv).strip()))
    return found


@pytest.fixture(autouse=True)
def private_cache_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Whatever falls back to the default cache directory lands in a temporary one."""
    directory = tmp_path_factory.mktemp("default-cache")
    monkeypatch.setenv("QMPVM_CACHE_DIR", str(directory))
    monkeypatch.setenv("XDG_CACHE_HOME", str(directory / "xdg"))
    return directory


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("caps-cache")


@pytest.fixture(scope="session")
def real(session_cache: Path) -> tuple[Capabilities, float]:
    """The session's one cold probe of the real binary, and how long it took."""
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    started = time.monotonic()
    caps = asyncio.run(load_or_probe(QEMU, session_cache))
    return caps, time.monotonic() - started


def round_trip(caps: Capabilities) -> Capabilities:
    return Capabilities.from_json(json.loads(json.dumps(caps.to_json())))


# -- the real binary ----------------------------------------------------------


def test_probe_finds_devices_machines_accelerators(real: tuple[Capabilities, float]) -> None:
    caps, elapsed = real
    print(f"cold probe: {elapsed:.2f} s, {len(caps.devices)} device types")
    blk = caps.devices["virtio-blk-pci"]
    assert blk.bus == "pci"
    assert blk.properties is not None
    assert blk.properties["drive"] == "str"
    serial = caps.devices["isa-serial"]
    assert serial.bus == "isa"
    assert serial.properties is not None
    assert "chardev" in serial.properties
    assert caps.devices["virtio-blk-device"].bus == "virtio"
    assert caps.devices["usb-tablet"].bus == "usb"
    assert caps.devices["virtio-net-pci"].hotpluggable is None
    assert len(caps.devices) > 300
    for name in ("q35", "pc", "microvm", "none"):
        assert name in caps.machines
    q35 = caps.machines["q35"]["name"]
    assert isinstance(q35, str)
    assert q35.startswith("pc-q35-")
    assert caps.machines[q35] == caps.machines["q35"]
    assert caps.default_machine is not None
    assert caps.machines[caps.default_machine].get("is-default") is True
    assert "tcg" in caps.accelerators
    assert {"device_add", "qmp_capabilities", "blockdev-add"} <= caps.commands
    assert "tap" in caps.schema_enums["NetClientDriver"]
    assert "socket" in caps.schema_enums["ChardevBackendKind"]
    assert "qcow2" in caps.schema_enums["BlockdevDriver"]
    assert "memory-backend-ram" in caps.schema_enums["ObjectType"]
    major, minor, micro = caps.version
    assert f"version {major}.{minor}.{micro}" in str(caps.identity["version"])
    assert caps.identity["path"] == caps.binary
    assert children() == []


def test_probe_keeps_defaults_and_descriptions(real: tuple[Capabilities, float]) -> None:
    caps, _ = real
    blk = caps.devices["virtio-blk-pci"].properties
    assert blk is not None
    assert blk.defaults["ioeventfd"] is True
    assert blk.defaults["disable-legacy"] == "auto"
    assert blk.descriptions["ioeventfd"] == "on/off"
    assert "drive" not in blk.defaults  # QEMU gives no default for it
    answer = caps.device_list_properties("virtio-blk-pci")
    assert answer is not None
    by_name = {item["name"]: item for item in answer}
    assert by_name["ioeventfd"] == {
        "name": "ioeventfd",
        "type": "bool",
        "description": "on/off",
        "default-value": True,
    }
    assert by_name["drive"] == {
        "name": "drive",
        "type": "str",
        "description": "Node name or ID of a block device to use as a backend",
    }
    assert by_name["romfile"] == {"name": "romfile", "type": "str"}
    assert [item["name"] for item in answer] == list(blk)  # the engine's order
    assert caps.device_list_properties("no-such-device") is None


def test_probe_keeps_schema_options_cpus(real: tuple[Capabilities, float]) -> None:
    caps, _ = real
    entries = caps.schema_entries()
    assert len(entries) > 1000
    commands = {e["name"] for e in entries if e.get("meta-type") == "command"}
    assert commands == caps.commands
    assert caps.schema_entries() is entries  # decoded once
    assert isinstance(entries[0], MappingProxyType)  # shared by every command: read-only
    assert all(not isinstance(v, list) for e in entries for v in e.values())
    assert json.loads(caps.schema.json())[0] == dict(entries[0])
    assert caps.command_line_options["drive"]["file"] == "string"
    assert caps.command_line_options["drive"]["read-only"] == "boolean"
    assert caps.command_line_options["device"] == {}  # takes anything
    kinds = {kind for params in caps.command_line_options.values() for kind in params.values()}
    assert kinds <= {"string", "boolean", "number", "size"}
    assert caps.cpu_models["qemu64"] == "qemu64-v1"
    assert caps.cpu_models["qemu64-v1"] is None
    assert "max" in caps.cpu_models


def test_probe_keeps_machine_and_object_properties(real: tuple[Capabilities, float]) -> None:
    caps, _ = real
    assert set(caps.machine_properties) == set(caps.machines)
    q35 = caps.machine_properties["q35"]
    assert q35 is not None
    assert q35["smm"] == "OnOffAuto"
    assert q35.descriptions["smm"] == "Enable SMM"
    assert (
        caps.machine_properties["q35"] is caps.machine_properties[str(caps.machines["q35"]["name"])]
    )
    none = caps.machine_properties["none"]
    assert none is not None
    assert none["kernel"] == "string"
    assert "smm" not in none
    ram = caps.object_types["memory-backend-ram"]
    assert ram is not None
    assert ram["size"] == "int"
    assert caps.object_types["memory-backend-file"]["mem-path"] == "string"  # type: ignore[index]
    assert "iothread" in caps.object_types
    assert "memory-backend-ram" in caps.schema_enums["ObjectType"]
    assert "virtio-blk-pci" not in caps.object_types  # devices are not user-creatable objects


def test_capabilities_round_trip_through_json(real: tuple[Capabilities, float]) -> None:
    caps, _ = real
    loaded = round_trip(caps)
    assert loaded == caps
    for name in ("virtio-blk-pci", "isa-serial"):
        assert loaded.device_list_properties(name) == caps.device_list_properties(name)
    assert loaded.schema_entries() == caps.schema_entries()
    for name, props in caps.machine_properties.items():
        assert loaded.machine_properties[name] == props
    assert dict(loaded.object_types) == dict(caps.object_types)


def test_warm_path_of_the_document_needs_no_json_escapes(real: tuple[Capabilities, float]) -> None:
    """Why a warm load is fast: what it copies is a few long strings without escapes."""
    caps, _ = real
    doc = caps.to_json()
    bulky = {
        "devices": doc["devices"],
        "property_items": doc["property_items"],
        "machine_properties": doc["machine_properties"],
        "object_types": doc["object_types"],
        "schema": doc["schema"],
    }
    text = json.dumps(bulky)
    assert "\\" not in text
    types = len(caps.devices) + len(caps.machine_properties) + len(caps.object_types)
    properties = sum(len(dev.properties or ()) for dev in caps.devices.values())
    assert properties > 50_000
    assert text.count('"') < 20 * types  # a few JSON strings per type, none per property
    assert len(json.dumps(doc)) < 2_000_000  # ~0.4 MB for QEMU 7.2


def test_properties_are_decoded_when_looked_up(
    real: tuple[Capabilities, float], caplog: pytest.LogCaptureFixture
) -> None:
    """A corrupt entry does not fail the load; looked up, it reads as unknown."""
    caps, _ = real
    doc = json.loads(json.dumps(caps.to_json()))
    width = doc["property_code_width"]
    assert width == 2
    doc["devices"]["virtio-blk-pci"]["properties"] += "0"  # not a multiple of the width
    doc["devices"]["isa-serial"]["properties"] = '{"chardev": "str"}'
    doc["devices"]["virtio-net-pci"]["properties"] = "__" * 3  # no such item
    doc["machine_properties"]["q35"] = "!!"
    doc["object_types"]["iothread"] = "x"
    doc["schema"] = "[{'name'"  # cut short
    loaded = Capabilities.from_json(doc)
    assert loaded.devices["virtio-rng-pci"] == caps.devices["virtio-rng-pci"]
    assert loaded.machine_properties["pc"] == caps.machine_properties["pc"]
    assert not caplog.records
    assert loaded.devices["virtio-blk-pci"].properties is None  # the engine checks instead
    assert loaded.devices["isa-serial"].properties is None
    assert loaded.devices["virtio-net-pci"].properties is None
    assert loaded.machine_properties["q35"] is None
    assert loaded.object_types["iothread"] is None
    assert loaded.schema_entries() == ()
    for name in ("virtio-blk-pci", "isa-serial", "virtio-net-pci", "machine type q35"):
        assert f"properties of {name} are corrupt" in caplog.text
    assert "object type iothread are corrupt" in caplog.text
    assert "the QMP schema is corrupt" in caplog.text
    assert set(loaded.devices) == set(caps.devices)


def chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def test_corrupt_item_table_fails_only_the_types_that_use_the_item(
    real: tuple[Capabilities, float], caplog: pytest.LogCaptureFixture
) -> None:
    caps, _ = real
    doc = json.loads(json.dumps(caps.to_json()))
    items = doc["property_items"].split(",")
    codes = doc["devices"]["virtio-blk-pci"]["properties"]
    digits = caps_module._DIGITS
    first = digits.index(codes[0]) * len(digits) + digits.index(codes[1])
    items[first] = "no equals sign"
    doc["property_items"] = ",".join(items)
    loaded = Capabilities.from_json(doc)
    assert loaded.devices["virtio-blk-pci"].properties is None
    assert "malformed property item 'no equals sign'" in caplog.text
    users = [
        name
        for name, entry in doc["devices"].items()
        if entry["properties"] is not None and codes[:2] in chunks(entry["properties"], 2)
    ]
    for name in caps.devices:
        assert (loaded.devices[name].properties is None) == (
            name in users or caps.devices[name].properties is None
        ), name


def test_any_property_survives_the_cache(real: tuple[Capabilities, float]) -> None:
    caps, _ = real
    odd_types = {
        "a,b": "x=y",
        "100%": "%2C",
        "%3D=%": ",",
        "memhp container[0]": "child<x>",
        "": "",
    }
    odd_types |= {'quote"': "back\\slash", "ünï": "ʇʎpǝ", "null": "any", "list": "any"}
    odd = Properties(
        odd_types,
        defaults={
            "a,b": 'x,=%"\\',
            "": 0,
            "null": None,
            "list": [1, {"k": "v,="}],
            "ünï": -1.5,
            "100%": False,
        },
        descriptions={"a,b": 'say "hi", = 100%', "": "", "ünï": "∂"},
    )
    devices = {
        "odd": DeviceType(name="odd", bus=None, properties=odd),
        "none": DeviceType(name="none", bus="pci", properties=Properties(), hotpluggable=True),
        "unknown": DeviceType(name="unknown", bus=None, properties=None),
    }
    edited = dataclasses.replace(
        caps,
        devices=devices,
        machine_properties={"m": odd, "alias": odd, "bad": None},
        object_types={"o": Properties({"x": "y"}), "p": None},
    )
    loaded = round_trip(edited)
    assert dict(loaded.devices) == devices
    assert loaded == edited
    odd_loaded = loaded.devices["odd"].properties
    assert odd_loaded is not None
    assert odd_loaded.defaults == odd.defaults
    assert odd_loaded.descriptions == odd.descriptions
    assert "null" in odd_loaded.defaults  # a null default is still a default
    assert "none" not in odd_loaded.defaults
    assert loaded.machine_properties["m"] is loaded.machine_properties["alias"]  # decoded once


@pytest.mark.parametrize("count", [1, 64, 65, 4096, 4097])
def test_item_codes_grow_with_the_table(real: tuple[Capabilities, float], count: int) -> None:
    caps, _ = real
    props = Properties({f"p{i}": "int" for i in range(count)}, defaults={"p0": 0})
    edited = dataclasses.replace(
        caps,
        devices={"many": DeviceType(name="many", bus=None, properties=props)},
        machine_properties={},
        object_types={},
    )
    doc = edited.to_json()
    assert doc["property_code_width"] == (1 if count <= 64 else 2 if count <= 4096 else 3)
    assert round_trip(edited).devices["many"].properties == props


def test_properties_compare_defaults_and_descriptions() -> None:
    plain = Properties({"a": "int"})
    assert plain == {"a": "int"}  # against a plain mapping: names and types
    assert plain != Properties({"a": "int"}, defaults={"a": 1})
    assert plain != Properties({"a": "int"}, descriptions={"a": "x"})
    assert Properties({"a": "int"}, defaults={"a": 1}) == Properties(
        {"a": "int"}, defaults={"a": 1}
    )
    with pytest.raises(ValueError, match="unknown properties"):
        Properties({"a": "int"}, defaults={"b": 1})
    assert Properties({"a": "int", "b": "str"}, defaults={"a": 1}).to_qmp() == [
        {"name": "a", "type": "int", "default-value": 1},
        {"name": "b", "type": "str"},
    ]


def test_schema_text_is_kept_verbatim() -> None:
    entries: list[object] = [{"name": "it's", "values": ['a"b', "c'd", "\\"]}, {"name": "x"}]
    schema = QmpSchema.from_entries(entries)
    assert json.loads(schema.json()) == entries
    assert json.loads(schema.stored.translate(str.maketrans("'\"", "\"'"))) == entries
    assert [dict(e) for e in schema.entries()] == [
        {"name": "it's", "values": ('a"b', "c'd", "\\")},
        {"name": "x"},
    ]


async def test_second_load_comes_from_the_cache(
    real: tuple[Capabilities, float], session_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caps, _ = real
    assert QEMU is not None

    async def no_probe(*_args: object, **_kwargs: object) -> Capabilities:
        raise AssertionError("probed although the cache is fresh")

    monkeypatch.setattr(probe_module, "probe", no_probe)
    again = await load_or_probe(QEMU, session_cache)
    assert again == caps
    assert children() == []
    assert [p.name for p in session_cache.iterdir()] == [
        cache_path(session_cache, caps.identity).name
    ]


def test_warm_load_leaves_the_probing_code_out(
    real: tuple[Capabilities, float], session_cache: Path
) -> None:
    """A warm start is on the path to the first command: it imports no more than it needs."""
    caps, _ = real
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from qmpvm.engine.caps_loader import load_or_probe\n"
        f"caps = asyncio.run(load_or_probe({caps.binary!r}, Path({str(session_cache)!r})))\n"
        "print(len(caps.devices), sorted(m for m in sys.modules if m.startswith('qmpvm')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(" ", 1)[0] == str(len(caps.devices))
    assert "qmpvm.engine.caps_loader" in done.stdout
    assert "qmpvm.engine.probe" not in done.stdout
    assert "qmpvm.engine.link" not in done.stdout


def test_caps_imports_neither_the_prober_nor_the_loader() -> None:
    """Imports run one way: caps_loader -> probe -> caps (no cycle, not even a lazy one)."""

    def imported(module: object) -> set[str]:
        tree = ast.parse(Path(str(getattr(module, "__file__", ""))).read_text())
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        return found

    assert not {"qmpvm.engine.probe", "qmpvm.engine.caps_loader"} & imported(caps_module)
    assert "qmpvm.engine.caps_loader" not in imported(probe_module)
    assert not hasattr(caps_module, "load_or_probe")


def counting_probe(
    monkeypatch: pytest.MonkeyPatch, result: Callable[[str], Capabilities] | None = None
) -> list[str]:
    """Replace ``probe``: by ``result`` when given, else by the real one; count calls."""
    calls: list[str] = []
    real_probe = probe_module.probe

    async def counted(binary: str = "qemu-system-x86_64", **kwargs: object) -> Capabilities:
        calls.append(binary)
        if result is not None:
            return result(binary)
        return await real_probe(binary)

    monkeypatch.setattr(probe_module, "probe", counted)
    return calls


async def test_edited_identity_in_the_cache_is_probed_again(
    real: tuple[Capabilities, float],
    session_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caps, _ = real
    assert QEMU is not None
    source = cache_path(session_cache, caps.identity)
    target = cache_path(tmp_path, caps.identity)
    doc = json.loads(source.read_text())
    doc["identity"]["size"] += 1
    target.write_text(json.dumps(doc))
    calls = counting_probe(monkeypatch, lambda _binary: caps)
    assert await load_or_probe(QEMU, tmp_path) == caps
    assert len(calls) == 1
    assert json.loads(target.read_text())["identity"] == dict(caps.identity)
    assert await load_or_probe(QEMU, tmp_path) == caps
    assert len(calls) == 1


async def test_default_cache_dir_is_used_without_one(
    real: tuple[Capabilities, float], private_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caps, _ = real
    assert QEMU is not None
    calls = counting_probe(monkeypatch, lambda _binary: caps)
    assert await load_or_probe(QEMU) == caps
    assert [p.name for p in private_cache_dir.iterdir()] == [
        cache_path(private_cache_dir, caps.identity).name
    ]
    assert await load_or_probe(QEMU) == caps
    assert len(calls) == 1


@pytest.mark.parametrize(
    "content", [b"", b"{not json", b"[]", b'{"format": 1}', json.dumps({"format": 999}).encode()]
)
async def test_corrupt_cache_is_probed_again_and_replaced(
    real: tuple[Capabilities, float],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: bytes,
) -> None:
    caps, _ = real
    assert QEMU is not None
    target = cache_path(tmp_path, caps.identity)
    target.write_bytes(content)
    calls = counting_probe(monkeypatch, lambda _binary: caps)
    assert await load_or_probe(QEMU, tmp_path) == caps
    assert len(calls) == 1
    assert Capabilities.from_json(json.loads(target.read_text())) == caps
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temp files left


@needs_qemu
async def test_real_engine_abort_mid_probe_is_survived(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real abort, in pipeline order: QEMU 7.2 asserts in ``qom-list-properties
    colo-compare`` (no device type aborts it under ``-machine none``), so that is
    asked in place of one device type."""
    assert QEMU is not None
    victim = "isa-serial"
    original_execute = EngineLink.execute

    async def execute(
        self: EngineLink, name: str, arguments: Mapping[str, object] | None = None, **kw: object
    ) -> object:
        if arguments is not None and arguments.get("typename") == victim:
            name, arguments = "qom-list-properties", {"typename": "colo-compare"}
        return await original_execute(self, name, arguments, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(EngineLink, "execute", execute)
    messages: list[str] = []
    caps = await probe(QEMU, progress=messages.append)
    if caps.devices[victim].properties is not None:
        pytest.skip("this QEMU does not abort on qom-list-properties colo-compare")
    print(messages[-1])
    assert [name for name, dev in caps.devices.items() if dev.properties is None] == [victim]
    assert f"{victim} crashes the engine; its properties are unknown" in messages
    assert caps.object_types["colo-compare"] is None  # asked for itself, it crashes too
    assert caps.object_types["iothread"] is not None
    assert children() == []


@needs_qemu
async def test_real_engine_killed_mid_probe_is_survived(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill QEMU as soon as a request for one type is sent, before QEMU reads it.

    The order of the answers then says nothing about the culprit, which is
    the case the prober's bisection is for.
    """
    assert QEMU is not None
    victim = "isa-serial"
    engines = record_engines(monkeypatch)
    original_execute = EngineLink.execute

    async def execute(
        self: EngineLink, name: str, arguments: Mapping[str, object] | None = None, **kw: object
    ) -> object:
        if arguments is not None and arguments.get("typename") == victim:
            engines[-1].proc.kill()
        return await original_execute(self, name, arguments, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(EngineLink, "execute", execute)
    messages: list[str] = []
    caps = await probe(QEMU, progress=messages.append)
    assert caps.devices[victim].properties is None
    assert [name for name, dev in caps.devices.items() if dev.properties is None] == [victim]
    assert caps.devices["virtio-blk-pci"].properties is not None
    assert len(engines) >= 3  # the first, the one asked about the victim alone, the rest
    assert f"{victim} crashes the engine; its properties are unknown" in messages
    assert all(engine.proc.returncode is not None for engine in engines)
    assert children() == []


# -- cancellation at fixed points ------------------------------------------------


def record_engines(monkeypatch: pytest.MonkeyPatch) -> list[probe_module._Engine]:
    """Every probe engine created from now on, in order."""
    engines: list[probe_module._Engine] = []
    original_init = probe_module._Engine.__init__

    def init(self: probe_module._Engine, proc: asyncio.subprocess.Process) -> None:
        original_init(self, proc)
        engines.append(self)

    monkeypatch.setattr(probe_module._Engine, "__init__", init)
    return engines


async def reach(point: asyncio.Event, task: asyncio.Task[object]) -> None:
    """Wait until the probe reaches ``point`` (failing if it ends first)."""
    waiter = asyncio.create_task(point.wait())
    await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    if not waiter.done():
        waiter.cancel()
        raise AssertionError(f"the probe ended before the point: {task!r}")


def pause_in_execute(
    monkeypatch: pytest.MonkeyPatch, point: asyncio.Event, match: Callable[[str, str], bool]
) -> None:
    """The first command ``match``ed (name, typename) sets ``point`` and never returns."""
    original_execute = EngineLink.execute

    async def execute(
        self: EngineLink, name: str, arguments: Mapping[str, object] | None = None, **kw: object
    ) -> object:
        typename = str((arguments or {}).get("typename", ""))
        if not point.is_set() and match(name, typename):
            point.set()
            await asyncio.get_running_loop().create_future()
        return await original_execute(self, name, arguments, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(EngineLink, "execute", execute)


def pause_in_open(monkeypatch: pytest.MonkeyPatch, point: asyncio.Event, call: int) -> None:
    """The ``call``-th (from 1) greeting sets ``point`` and never completes."""
    original_open = EngineLink.open.__func__  # type: ignore[attr-defined]
    calls = 0

    async def open_(cls: type[EngineLink], /, *args: object, **kwargs: object) -> EngineLink:
        nonlocal calls
        calls += 1
        if calls == call:
            point.set()
            await asyncio.get_running_loop().create_future()
        link: EngineLink = await original_open(cls, *args, **kwargs)
        return link

    monkeypatch.setattr(EngineLink, "open", classmethod(open_))


def crash_on(
    monkeypatch: pytest.MonkeyPatch, engines: list[probe_module._Engine], victim: str
) -> None:
    """Kill the engine when the request for ``victim`` is sent (on the first engine only)."""
    original_execute = EngineLink.execute

    async def execute(
        self: EngineLink, name: str, arguments: Mapping[str, object] | None = None, **kw: object
    ) -> object:
        if (arguments or {}).get("typename") == victim and len(engines) == 1:
            engines[0].proc.kill()
        return await original_execute(self, name, arguments, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(EngineLink, "execute", execute)


def pause_after_a_crash(
    monkeypatch: pytest.MonkeyPatch, point: asyncio.Event, engines: list[probe_module._Engine]
) -> None:
    """The first engine is killed mid-probe; the greeting of the next one pauses."""
    crash_on(monkeypatch, engines, "isa-serial")
    pause_in_open(monkeypatch, point, 2)


Pause = Callable[[pytest.MonkeyPatch, asyncio.Event, list[probe_module._Engine]], None]

PAUSES: dict[str, Pause] = {
    "greeting": lambda mp, point, _engines: pause_in_open(mp, point, 1),
    "introspection": lambda mp, point, _engines: pause_in_execute(
        mp, point, lambda name, _t: name == "query-qmp-schema"
    ),
    "device-properties": lambda mp, point, _engines: pause_in_execute(
        mp, point, lambda name, t: name == "device-list-properties" and t == "virtio-blk-pci"
    ),
    "machine-properties": lambda mp, point, _engines: pause_in_execute(
        mp, point, lambda name, t: name == "qom-list-properties" and t.endswith("-machine")
    ),
    "object-properties": lambda mp, point, _engines: pause_in_execute(
        mp, point, lambda name, t: name == "qom-list-properties" and t == "iothread"
    ),
    "restart-greeting": pause_after_a_crash,
}


@needs_qemu
@pytest.mark.parametrize("where", list(PAUSES))
async def test_cancelled_probe_leaves_no_engine_behind(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancel at a point the probe is known to wait at: every engine is reaped
    before the cancellation comes out of ``probe``."""
    assert QEMU is not None
    engines = record_engines(monkeypatch)
    point = asyncio.Event()
    PAUSES[where](monkeypatch, point, engines)
    task: asyncio.Task[object] = asyncio.create_task(probe(QEMU))
    await reach(point, task)
    assert engines, "no engine was started"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [engine.proc.returncode is not None for engine in engines] == [True] * len(engines)
    assert children() == []


@needs_qemu
async def test_cancelling_a_stopping_engine_still_reaps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancellation that arrives while an engine is being stopped does not cut
    the stop short: the probe holds the cancellation until the engine is reaped."""
    assert QEMU is not None
    engines = record_engines(monkeypatch)
    closing, release = asyncio.Event(), asyncio.Event()
    original_close = EngineLink.close

    async def close(self: EngineLink) -> None:
        if not closing.is_set():
            closing.set()
            await release.wait()
        await original_close(self)

    monkeypatch.setattr(EngineLink, "close", close)
    task: asyncio.Task[object] = asyncio.create_task(probe(QEMU))
    await reach(closing, task)  # the first engine is being stopped (a crash, or the end)
    task.cancel()
    for _ in range(10):
        await asyncio.sleep(0)
    task.cancel()  # again: the stop must hold through repeated cancellation
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done(), "the cancellation cut the engine's stop short"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [engine.proc.returncode is not None for engine in engines] == [True] * len(engines)
    assert children() == []


# -- a fake engine -----------------------------------------------------------

FAKE_ENGINE = textwrap.dedent(
    """\
    #!{python}
    # A stand-in engine: speaks just enough QMP for the prober.
    import json, os, socket, sys, time

    DEVICES, OBJECTS = {devices!r}, {objects!r}
    CRASH, HANG, REFUSE = {crash!r}, {hang!r}, {refuse!r}
    if "--version" in sys.argv:
        if {version_hangs!r}:
            time.sleep(3600)
        print("QEMU emulator version 7.2.0 (fake)")
        sys.exit(0)
    if {broken!r}:
        print("fake engine: refusing to start", file=sys.stderr)
        sys.exit(1)
    spec = sys.argv[sys.argv.index("-chardev") + 1]
    sock = socket.socket(fileno=int(spec.rsplit("fd=", 1)[1]))
    stream = sock.makefile("rwb")

    def send(message):
        stream.write(json.dumps(message).encode() + b"\\r\\n")
        stream.flush()

    schema = [
        {{"name": "netdev_add", "meta-type": "command", "arg-type": "1", "ret-type": "0"}},
        {{"name": "1", "meta-type": "object",
          "members": [{{"name": "id", "type": "str"}}, {{"name": "type", "type": "2"}}]}},
        {{"name": "2", "meta-type": "enum", "values": ["user", "tap"]}},
    ]
    answers = {{
        "qmp_capabilities": {{}},
        "query-version": {{"qemu": {{"major": 7, "minor": 2, "micro": 0}}, "package": " fake "}},
        "query-machines": [{{"name": "fake-1.0", "alias": "fake", "is-default": True}},
                           {{"name": "none"}}],
        "query-commands": [{{"name": "qmp_capabilities"}}, {{"name": "netdev_add"}}],
        "query-qmp-schema": schema,
        "query-command-line-options": [
            {{"option": "drive", "parameters": [
                {{"name": "file", "type": "string", "help": "disk image"}},
                {{"name": "readonly", "type": "boolean"}}]}},
            {{"option": "device", "parameters": []}},
        ],
        "query-cpu-definitions": [
            {{"name": "fake-cpu", "typename": "fake-cpu-x86_64-cpu", "alias-of": "fake-cpu-v1"}},
            {{"name": "fake-cpu-v1", "typename": "fake-cpu-v1-x86_64-cpu"}},
        ],
    }}
    send({{"QMP": {{"version": {{"qemu": {{"major": 7, "minor": 2, "micro": 0}},
           "package": "fake"}}, "capabilities": []}}}})
    for raw in stream:
        command = json.loads(raw)
        name, args, msg_id = command["execute"], command.get("arguments", {{}}), command["id"]
        typename = args.get("typename")
        if name in CRASH or typename in CRASH:
            print("fake engine: aborting on " + (typename or name), file=sys.stderr, flush=True)
            os.abort()
        if typename in HANG:
            time.sleep(3600)
        if name in REFUSE or typename in REFUSE:
            send({{"error": {{"class": "GenericError", "desc": "no"}}, "id": msg_id}})
        elif name == "qom-list-types":
            implements = args["implements"]
            if implements == "device":
                found = DEVICES
            elif implements == "accel":
                found = ["accel", "tcg-accel"]
            elif implements == "user-creatable":
                found = OBJECTS
            elif implements == "pci-device":
                found = [d for d in DEVICES if d.endswith("-pci")]
            else:
                found = []
            send({{"return": [{{"name": d, "parent": "x"}} for d in found], "id": msg_id}})
        elif name == "device-list-properties":
            props = [
                {{"name": "prop-" + typename, "type": "str"}},
                {{"name": "flag", "type": "bool", "default-value": True, "description": "on/off"}},
            ]
            send({{"return": props, "id": msg_id}})
        elif name == "qom-list-properties":
            props = [{{"name": "type", "type": "string"}},
                     {{"name": "qom-" + typename, "type": "int", "description": "a number"}}]
            send({{"return": props, "id": msg_id}})
        else:
            send({{"return": answers[name], "id": msg_id}})
    """
)


def fake_engine(
    where: Path,
    *,
    devices: list[str],
    objects: Sequence[str] = ("obj-a", "obj-b"),
    crash: Iterable[str] = (),
    hang: Iterable[str] = (),
    refuse: Iterable[str] = (),
    broken: bool = False,
    version_hangs: bool = False,
) -> str:
    """A fake engine; ``crash``, ``hang``, ``refuse`` name type names or commands."""
    script = where / "fake-qemu"
    script.write_text(
        FAKE_ENGINE.format(
            python=sys.executable,
            devices=devices,
            objects=list(objects),
            crash=set(crash),
            hang=set(hang),
            refuse=set(refuse),
            broken=broken,
            version_hangs=version_hangs,
        )
    )
    script.chmod(0o755)
    return str(script)


DEVICES = [f"dev{i:02d}" for i in range(40)] + ["net-pci", "blk-pci"]


def fake_device(name: str) -> Properties:
    return Properties(
        {f"prop-{name}": "str", "flag": "bool"},
        defaults={"flag": True},
        descriptions={"flag": "on/off"},
    )


def fake_qom(typename: str) -> Properties:
    return Properties(
        {"type": "string", f"qom-{typename}": "int"}, descriptions={f"qom-{typename}": "a number"}
    )


async def test_fake_engine_probe_finds_everything(tmp_path: Path) -> None:
    binary = fake_engine(tmp_path, devices=DEVICES)
    caps = await probe(binary)
    assert caps.devices["dev03"].properties == fake_device("dev03")
    assert caps.device_list_properties("dev03") == [
        {"name": "prop-dev03", "type": "str"},
        {"name": "flag", "type": "bool", "description": "on/off", "default-value": True},
    ]
    assert dict(caps.machine_properties) == {
        "fake": fake_qom("fake-1.0-machine"),
        "fake-1.0": fake_qom("fake-1.0-machine"),
        "none": fake_qom("none-machine"),
    }
    assert dict(caps.object_types) == {"obj-a": fake_qom("obj-a"), "obj-b": fake_qom("obj-b")}
    assert caps.command_line_options == {
        "device": {},
        "drive": {"file": "string", "readonly": "boolean"},
    }
    assert caps.cpu_models == {"fake-cpu": "fake-cpu-v1", "fake-cpu-v1": None}
    assert [dict(e) for e in caps.schema_entries()][2] == {
        "name": "2",
        "meta-type": "enum",
        "values": ("user", "tap"),
    }
    assert round_trip(caps) == caps
    assert round_trip(caps).to_json()["property_code_width"] == 1
    assert children() == []


async def test_fake_engine_crashes_are_survived(tmp_path: Path) -> None:
    crash = {"dev05", "dev06", "dev30", "blk-pci", "fake-1.0-machine", "obj-a"}
    binary = fake_engine(tmp_path, devices=DEVICES, crash=crash, refuse={"dev10", "obj-b"})
    messages: list[str] = []
    caps = await probe(binary, progress=messages.append)
    unknown = {name for name, dev in caps.devices.items() if dev.properties is None}
    assert unknown == {"dev05", "dev06", "dev30", "blk-pci", "dev10"}
    for name, dev in caps.devices.items():
        if name not in unknown:
            assert dev.properties == fake_device(name)
    assert caps.machine_properties["fake"] is None
    assert caps.machine_properties["fake-1.0"] is None
    assert caps.machine_properties["none"] == fake_qom("none-machine")
    assert dict(caps.object_types) == {"obj-a": None, "obj-b": None}  # crashes, refused
    assert caps.devices["net-pci"].bus == "pci"
    assert caps.devices["dev00"].bus is None
    assert caps.accelerators == ("tcg",)
    assert caps.machines["fake"] is caps.machines["fake-1.0"]
    assert caps.default_machine == "fake-1.0"
    assert caps.package == "fake"
    assert caps.schema_enums == {"NetClientDriver": ("user", "tap")}
    assert sum("crashes the engine" in m for m in messages) == 6
    assert "fake-1.0-machine crashes the engine; its properties are unknown" in messages
    assert "6 crashed the engine" in messages[-1]
    assert children() == []


async def test_fake_engine_may_refuse_the_optional_queries(tmp_path: Path) -> None:
    binary = fake_engine(
        tmp_path, devices=DEVICES, refuse={"query-cpu-definitions", "query-command-line-options"}
    )
    caps = await probe(binary)
    assert caps.cpu_models == {}
    assert caps.command_line_options == {}
    assert caps.devices["dev00"].properties == fake_device("dev00")


async def test_fake_engine_crash_in_the_introspection_queries_is_a_probe_error(
    tmp_path: Path,
) -> None:
    binary = fake_engine(tmp_path, devices=DEVICES, crash={"query-qmp-schema"})
    with pytest.raises(ProbeError, match=r"failed the introspection queries.*aborting on"):
        await probe(binary)
    assert children() == []


def hang_when_the_rest_is_answered(
    monkeypatch: pytest.MonkeyPatch, hang: set[str]
) -> list[list[str]]:
    """Stand in for the round timeout: declare a hang as soon as every request sent
    before the first one in ``hang`` is answered (the engine answers in order, so
    that is all it will answer).  Returns the typenames declared hung, per round."""
    declared: list[list[str]] = []

    async def answers(
        self: probe_module._Prober,
        requests: Sequence[tuple[str, str]],
        tasks: Sequence[asyncio.Task[object]],
        timeout: float,
    ) -> set[asyncio.Task[object]]:
        first = next((i for i, (_, name) in enumerate(requests) if name in hang), None)
        if first is None:
            await asyncio.wait(tasks)
            return set()
        if first:
            await asyncio.wait(tasks[:first])
        pending = {task for task in tasks if not task.done()}
        assert tasks[first] in pending
        declared.append(
            [name for (_, name), task in zip(requests, tasks, strict=True) if task in pending]
        )
        return pending

    monkeypatch.setattr(probe_module._Prober, "_answers", answers)
    return declared


async def test_fake_engine_hang_is_turned_into_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = fake_engine(tmp_path, devices=DEVICES, hang={"dev20", "obj-b"})
    declared = hang_when_the_rest_is_answered(monkeypatch, {"dev20", "obj-b"})
    caps = await probe(binary)
    assert [n for n, d in caps.devices.items() if d.properties is None] == ["dev20"]
    assert caps.object_types["obj-b"] is None
    assert caps.object_types["obj-a"] == fake_qom("obj-a")
    assert [names[0] for names in declared] == ["dev20", "dev20", "obj-b", "obj-b"]
    assert children() == []


async def test_round_timeout_reports_what_is_unanswered() -> None:
    """The real stand-in for a hang: what is still pending after the timeout."""
    answered = asyncio.create_task(asyncio.sleep(0, result="done"))
    never = asyncio.create_task(asyncio.Event().wait())
    prober = probe_module._Prober("unused", None)
    try:
        pending = await prober._answers([("c", "a"), ("c", "b")], [answered, never], timeout=0.01)
        assert pending == {never}
    finally:
        never.cancel()


async def test_cancelled_version_query_leaves_no_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = fake_engine(tmp_path, devices=[], version_hangs=True)
    started = asyncio.Event()
    original_start = engine_process.start

    async def start(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await original_start(*args, **kwargs)
        started.set()
        return proc

    monkeypatch.setattr(engine_process, "start", start)  # what probe.py calls
    task: asyncio.Task[object] = asyncio.create_task(binary_identity(binary))
    await reach(started, task)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert children() == []


async def test_changed_binary_is_probed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = fake_engine(tmp_path, devices=DEVICES)
    cache = tmp_path / "cache"
    calls = counting_probe(monkeypatch)
    first = await load_or_probe(binary, cache)
    assert await load_or_probe(binary, cache) == first
    assert len(calls) == 1
    stat = os.stat(binary)
    os.utime(binary, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = await load_or_probe(binary, cache)
    assert len(calls) == 2
    assert second.identity["mtime_ns"] == stat.st_mtime_ns + 1_000_000_000
    assert [p.name for p in cache.iterdir()] == [cache_path(cache, second.identity).name]


async def test_unusable_binaries_raise_probe_error(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="not found"):
        await probe("qmpvm-no-such-engine")
    with pytest.raises(ProbeError, match="not found"):
        await load_or_probe("qmpvm-no-such-engine", tmp_path)
    broken = fake_engine(tmp_path, devices=DEVICES, broken=True)
    with pytest.raises(ProbeError, match="refusing to start"):
        await probe(broken)
    assert children() == []


async def test_binary_identity_names_the_build(tmp_path: Path) -> None:
    binary = fake_engine(tmp_path, devices=[])
    identity = await binary_identity(binary)
    stat = os.stat(binary)
    assert identity == {
        "path": binary,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "version": "QEMU emulator version 7.2.0 (fake)",
    }


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QMPVM_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("QMPVM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "qmpvm"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "qmpvm"
    # a HOME that is not the account's (libvirt's per-domain one): the account's
    # own cache is looked at next, then the system's
    account = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "qmpvm"
    assert cache_dirs() == [tmp_path / "home" / ".cache" / "qmpvm", account, VAR_CACHE]
    monkeypatch.setenv("QMPVM_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dirs() == [tmp_path / "explicit"]


async def test_a_cache_in_the_accounts_home_serves_a_process_with_another_home(
    real: tuple[Capabilities, float], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Written under one HOME, found under another: no probe the second time."""
    caps, _ = real
    assert QEMU is not None
    first, second = tmp_path / "first", tmp_path / "second"
    monkeypatch.delenv("QMPVM_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(caps_module, "VAR_CACHE", tmp_path / "var")
    account = types.SimpleNamespace(pw_dir=str(first))
    monkeypatch.setattr(pwd, "getpwuid", lambda _uid: account)
    calls = counting_probe(monkeypatch, lambda _binary: caps)
    monkeypatch.setenv("HOME", str(first))
    assert await load_or_probe(QEMU) == caps
    monkeypatch.setenv("HOME", str(second))
    assert await load_or_probe(QEMU) == caps
    assert len(calls) == 1
