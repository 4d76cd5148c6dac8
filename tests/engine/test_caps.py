"""Tests for engine capability probing (``qmpvm.engine.probe``) and its on-disk cache.

One real probe of ``qemu-system-x86_64`` is shared by the session (through
a temporary cache directory).  Crash survival runs twice: against real QEMU
killed mid-probe, and against a fake engine (a Python script speaking QMP)
that aborts or hangs on chosen device types.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest

from qmpvm.engine import probe as probe_module
from qmpvm.engine.caps import (
    Capabilities,
    DeviceType,
    ProbeError,
    cache_path,
    default_cache_dir,
    load_or_probe,
)
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


def test_capabilities_round_trip_through_json(real: tuple[Capabilities, float]) -> None:
    caps, _ = real
    doc = json.loads(json.dumps(caps.to_json()))
    assert Capabilities.from_json(doc) == caps


def test_device_properties_are_decoded_when_looked_up(
    real: tuple[Capabilities, float], caplog: pytest.LogCaptureFixture
) -> None:
    """A corrupt entry does not fail the load; looked up, it reads as unknown."""
    caps, _ = real
    doc = json.loads(json.dumps(caps.to_json()))
    assert "drive=str" in doc["devices"]["virtio-blk-pci"]["properties"].split(",")
    doc["devices"]["virtio-blk-pci"]["properties"] = "drive=str,no equals sign"
    doc["devices"]["isa-serial"]["properties"] = '{"chardev": "str"}'
    loaded = Capabilities.from_json(doc)
    assert loaded.devices["virtio-rng-pci"] == caps.devices["virtio-rng-pci"]
    assert not caplog.records
    assert loaded.devices["virtio-blk-pci"].properties is None  # the engine checks instead
    assert loaded.devices["isa-serial"].properties is None
    assert "properties of virtio-blk-pci are corrupt" in caplog.text
    assert "properties of isa-serial are corrupt" in caplog.text
    assert set(loaded.devices) == set(caps.devices)


def test_any_property_name_survives_the_cache(real: tuple[Capabilities, float]) -> None:
    caps, _ = real
    odd = {"a,b": "x=y", "100%": "%2C", "%3D=%": ",", "memhp container[0]": "child<x>", "": ""}
    devices = {
        "odd": DeviceType(name="odd", bus=None, properties=odd),
        "none": DeviceType(name="none", bus="pci", properties={}, hotpluggable=True),
        "unknown": DeviceType(name="unknown", bus=None, properties=None),
    }
    edited = dataclasses.replace(caps, devices=devices)
    loaded = Capabilities.from_json(json.loads(json.dumps(edited.to_json())))
    assert dict(loaded.devices) == devices
    assert loaded == edited


async def test_second_load_comes_from_the_cache(
    real: tuple[Capabilities, float], session_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caps, _ = real
    assert QEMU is not None

    async def no_probe(*_args: object, **_kwargs: object) -> Capabilities:
        raise AssertionError("probed although the cache is fresh")

    monkeypatch.setattr(probe_module, "probe", no_probe)
    started = time.monotonic()
    again = await load_or_probe(QEMU, session_cache)
    elapsed = time.monotonic() - started
    assert again == caps
    assert elapsed < 0.5
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
        "from qmpvm.engine.caps import load_or_probe\n"
        f"caps = asyncio.run(load_or_probe({caps.binary!r}, Path({str(session_cache)!r})))\n"
        "print(len(caps.devices), sorted(m for m in sys.modules if m.startswith('qmpvm')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(" ", 1)[0] == str(len(caps.devices))
    assert "qmpvm.engine.probe" not in done.stdout
    assert "qmpvm.engine.link" not in done.stdout


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
    assert children() == []


@needs_qemu
async def test_real_engine_killed_mid_probe_is_survived(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill QEMU as soon as a request for one type is sent, before QEMU reads it.

    The order of the answers then says nothing about the culprit, which is
    the case the prober's bisection is for.
    """
    assert QEMU is not None
    victim = "isa-serial"
    engines: list[probe_module._Engine] = []
    original_start = probe_module._Engine.start.__func__  # type: ignore[attr-defined]
    original_execute = EngineLink.execute

    async def start(cls: type[probe_module._Engine], path: str) -> probe_module._Engine:
        engine: probe_module._Engine = await original_start(cls, path)
        engines.append(engine)
        return engine

    async def execute(
        self: EngineLink, name: str, arguments: Mapping[str, object] | None = None, **kw: object
    ) -> object:
        if arguments is not None and arguments.get("typename") == victim:
            engines[-1].proc.kill()
        return await original_execute(self, name, arguments, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(probe_module._Engine, "start", classmethod(start))
    monkeypatch.setattr(EngineLink, "execute", execute)
    messages: list[str] = []
    caps = await probe(QEMU, progress=messages.append)
    assert caps.devices[victim].properties is None
    assert [name for name, dev in caps.devices.items() if dev.properties is None] == [victim]
    assert caps.devices["virtio-blk-pci"].properties is not None
    assert len(engines) >= 3  # the first, the one asked about the victim alone, the rest
    assert f"{victim} crashes the engine; its properties are unknown" in messages
    assert children() == []


@needs_qemu
@pytest.mark.parametrize("delay", [0.0, 0.03, 0.1, 0.3])
async def test_cancelled_probe_leaves_no_engine_behind(delay: float) -> None:
    """Cancel at various points: spawning, negotiating, querying, listing properties."""
    assert QEMU is not None
    task = asyncio.create_task(probe(QEMU))
    deadline = time.monotonic() + 5
    while not any("qmpvm-link" in argv for _, argv in children()):
        assert time.monotonic() < deadline, "the probe never started an engine"
        await asyncio.sleep(0.005)
    await asyncio.sleep(delay)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert children() == []


# -- a fake engine -----------------------------------------------------------

FAKE_ENGINE = textwrap.dedent(
    """\
    #!{python}
    # A stand-in engine: speaks just enough QMP for the prober.
    import json, os, socket, sys, time

    DEVICES = {devices!r}
    CRASH, HANG, REFUSE = {crash!r}, {hang!r}, {refuse!r}
    if "--version" in sys.argv:
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
        "query-machines": [{{"name": "fake-1.0", "alias": "fake", "is-default": True}}],
        "query-commands": [{{"name": "qmp_capabilities"}}, {{"name": "netdev_add"}}],
        "query-qmp-schema": schema,
    }}
    send({{"QMP": {{"version": {{"qemu": {{"major": 7, "minor": 2, "micro": 0}},
           "package": "fake"}}, "capabilities": []}}}})
    for raw in stream:
        command = json.loads(raw)
        name, args, msg_id = command["execute"], command.get("arguments", {{}}), command["id"]
        if name == "qom-list-types":
            implements = args["implements"]
            if implements == "device":
                found = DEVICES
            elif implements == "accel":
                found = ["accel", "tcg-accel"]
            elif implements == "pci-device":
                found = [d for d in DEVICES if d.endswith("-pci")]
            else:
                found = []
            send({{"return": [{{"name": d, "parent": "x"}} for d in found], "id": msg_id}})
        elif name == "device-list-properties":
            typename = args["typename"]
            if typename in CRASH:
                print("fake engine: aborting on " + typename, file=sys.stderr, flush=True)
                os.abort()
            if typename in HANG:
                time.sleep(3600)
            if typename in REFUSE:
                send({{"error": {{"class": "GenericError", "desc": "no"}}, "id": msg_id}})
            else:
                props = [{{"name": "prop-" + typename, "type": "str"}}]
                send({{"return": props, "id": msg_id}})
        else:
            send({{"return": answers[name], "id": msg_id}})
    """
)


def fake_engine(
    where: Path,
    *,
    devices: list[str],
    crash: Iterable[str] = (),
    hang: Iterable[str] = (),
    refuse: Iterable[str] = (),
    broken: bool = False,
) -> str:
    script = where / "fake-qemu"
    script.write_text(
        FAKE_ENGINE.format(
            python=sys.executable,
            devices=devices,
            crash=set(crash),
            hang=set(hang),
            refuse=set(refuse),
            broken=broken,
        )
    )
    script.chmod(0o755)
    return str(script)


DEVICES = [f"dev{i:02d}" for i in range(40)] + ["net-pci", "blk-pci"]


async def test_fake_engine_crashes_are_survived(tmp_path: Path) -> None:
    crash = {"dev05", "dev06", "dev30", "blk-pci"}
    binary = fake_engine(tmp_path, devices=DEVICES, crash=crash, refuse={"dev10"})
    messages: list[str] = []
    caps = await probe(binary, progress=messages.append)
    unknown = {name for name, dev in caps.devices.items() if dev.properties is None}
    assert unknown == crash | {"dev10"}
    for name, dev in caps.devices.items():
        if name not in unknown:
            assert dev.properties == {f"prop-{name}": "str"}
    assert caps.devices["net-pci"].bus == "pci"
    assert caps.devices["dev00"].bus is None
    assert caps.accelerators == ("tcg",)
    assert caps.machines["fake"] is caps.machines["fake-1.0"]
    assert caps.default_machine == "fake-1.0"
    assert caps.package == "fake"
    assert caps.schema_enums == {"NetClientDriver": ("user", "tap")}
    assert sum("crashes the engine" in m for m in messages) == 4
    assert "4 crashed the engine" in messages[-1]
    assert children() == []


async def test_fake_engine_hang_is_turned_into_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probe_module, "_ROUND_TIMEOUT", 0.5)
    monkeypatch.setattr(probe_module, "_ALONE_TIMEOUT", 0.5)
    binary = fake_engine(tmp_path, devices=DEVICES, hang={"dev20"})
    caps = await probe(binary)
    assert [n for n, d in caps.devices.items() if d.properties is None] == ["dev20"]
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
