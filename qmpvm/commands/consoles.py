"""Consoles: query-chardev, ringbuf-read/-write and console-history.

For the chardevs qmpvm serves (``qmpvm.host``) these answer from qmpvm,
with or without a machine, in QEMU's shapes and words; for the rest the
engine answers.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

from qmpvm.commands.common import REGISTRY
from qmpvm.config.chardev import backend_of
from qmpvm.config.resource import Kind
from qmpvm.engine.launch import LINK_CHARDEV
from qmpvm.errors import ArgumentError, ConfigError, PhaseError
from qmpvm.host.consoles import Console
from qmpvm.monitor.dispatch import ENGINE_ARGS, Call, Phase, phase_refusal
from qmpvm.vmm import Vmm


@REGISTRY.command("query-chardev")
async def query_chardev(call: Call) -> object:
    vmm = call.vmm
    if vmm.machine is None:
        out = []
        for resource in vmm.config.of_kind(Kind.CHARDEV):
            backend, _data = backend_of(resource.args)
            out.append({"label": resource.key, "filename": backend, "frontend-open": False})
        return out
    found = await vmm.forward("query-chardev", {})
    assert isinstance(found, list)
    answer = []
    for chardev in found:
        if chardev.get("label") == LINK_CHARDEV:  # qmpvm's own link
            continue
        console = vmm.consoles.console(str(chardev.get("label")), vmm.config)
        if console is not None:  # the engine has a pipe; the user asked for this
            answer.append({**chardev, "filename": console.filename()})
        else:
            answer.append(chardev)
    return answer


@REGISTRY.command("ringbuf-read", args=ENGINE_ARGS)
async def ringbuf_read(call: Call) -> object:
    """QEMU's, on the ringbuf qmpvm keeps: it answers after a power-off too."""
    size = int(call.args["size"])
    console = _ring(call.vmm, str(call.args["device"]), "ringbuf-read")
    if console is None:
        return await call.vmm.forward("ringbuf-read", call.args)
    if size <= 0:
        raise ConfigError("size must be greater than zero")
    return _encoded(console.read_ring(size), call.args)


@REGISTRY.command("ringbuf-write", args=ENGINE_ARGS)
async def ringbuf_write(call: Call) -> object:
    """QEMU's: the data goes into the buffer (not to the guest)."""
    console = _ring(call.vmm, str(call.args["device"]), "ringbuf-write")
    if console is None:
        return await call.vmm.forward("ringbuf-write", call.args)
    data = str(call.args["data"])
    raw = base64.b64decode(data) if call.args.get("format") == "base64" else data.encode()
    assert console.ring is not None
    console.ring.write(raw)
    return {}


@REGISTRY.command(
    "console-history", args={"device": "str", "*size": "int", "*since": "int", "*format": "str"}
)
async def console_history(call: Call) -> object:
    """The output a console qmpvm serves has kept, not consumed: ``data``
    from position ``start`` to ``end`` (positions count every byte the
    console ever printed).  ``size``: only the last bytes; ``since``: from
    there on (``start`` is later if that much is no longer kept).  A client
    that attaches late reads what it missed; one that follows passes the
    last ``end`` as ``since``."""
    vmm = call.vmm
    device = str(call.args["device"])
    console = vmm.consoles.console(device, vmm.config)
    if console is None:
        if vmm.config.find(Kind.CHARDEV, device) is None:
            raise ConfigError(f"Device '{device}' not found")
        raise ConfigError(
            f"chardev '{device}' is served by the engine, which keeps no history of it "
            "(qmpvm serves ringbuf, null, stdio, file and listening socket chardevs)"
        )
    history = console.history
    size, since = call.args.get("size"), call.args.get("since")
    if isinstance(size, int) and size <= 0:
        raise ConfigError("size must be greater than zero")
    if isinstance(since, int) and since < 0:
        raise ConfigError("since must not be negative")
    data = history.tail(size if isinstance(size, int) else None)
    if isinstance(since, int):
        data = data[max(0, len(data) - max(0, history.end - since)) :]
    start = history.end - len(data)
    return {"data": _encoded(data, call.args), "start": start, "end": history.end}


def _ring(vmm: Vmm, device: str, command: str) -> Console | None:
    """The ringbuf qmpvm keeps for ``device``; None: the engine's to answer."""
    console = vmm.consoles.console(device, vmm.config)
    if console is not None:
        if console.ring is None:
            raise ConfigError(f"{device} is not a ringbuf device")
        return console
    if vmm.machine is not None:
        return None
    if vmm.config.find(Kind.CHARDEV, device) is None:
        raise ConfigError(f"Device '{device}' not found")
    raise PhaseError(phase_refusal(command, Phase.NO_MACHINE))


def _encoded(data: bytes, args: Mapping[str, object]) -> str:
    form = args.get("format", "utf8")
    if form == "base64":
        return base64.b64encode(data).decode()
    if form != "utf8":
        raise ArgumentError(f"Parameter 'format' does not accept value '{form}'")
    return data.decode("utf-8", errors="replace")


def end_held_engine(vmm: Vmm, message: dict[str, object]) -> None:
    """The guest powered off an engine that holds it for its consoles' sake."""
    vmm.after_shutdown()


REGISTRY.hook("SHUTDOWN", end_held_engine)
