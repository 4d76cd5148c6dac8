"""Queries about resources that answer before a machine exists.

With a machine, the engine answers; before one, the answer is built from the
configuration in the engine's shapes, so a client can look before it builds.
"""

from __future__ import annotations

import base64

from qmpvm.commands.common import REGISTRY
from qmpvm.config.chardev import backend_of
from qmpvm.config.resource import Kind
from qmpvm.engine.launch import LINK_CHARDEV
from qmpvm.errors import ConfigError, PhaseError
from qmpvm.monitor.dispatch import ENGINE_ARGS, Call, Phase, phase_refusal
from qmpvm.vmm import Vmm


@REGISTRY.command("query-named-block-nodes", args=ENGINE_ARGS)
async def query_named_block_nodes(call: Call) -> object:
    vmm = call.vmm
    if vmm.machine is not None:
        return await vmm.forward("query-named-block-nodes", call.args)
    return [_node_info(dict(r.args)) for r in vmm.config.of_kind(Kind.BLOCK)]


@REGISTRY.command("query-block")
async def query_block(call: Call) -> object:
    vmm = call.vmm
    if vmm.machine is not None:
        return await vmm.forward("query-block", {})
    out = []
    for device in vmm.config.of_kind(Kind.DEVICE):
        node_name = device.args.get("drive")
        node = vmm.config.find(Kind.BLOCK, str(node_name)) if node_name else None
        if node is None:
            continue
        out.append(
            {
                "device": "",
                "qdev": device.args.get("id", device.key),
                "locked": False,
                "removable": False,
                "type": "unknown",
                "inserted": _node_info(dict(node.args)),
            }
        )
    return out


def _node_info(args: dict[str, object]) -> dict[str, object]:
    filename = args.get("filename")
    child = args.get("file")
    while filename is None and isinstance(child, dict):
        filename = child.get("filename")
        child = child.get("file")
    return {
        "node-name": args.get("node-name"),
        "drv": args.get("driver"),
        "ro": bool(args.get("read-only", False)),
        "file": filename if filename is not None else "",
    }


@REGISTRY.command("query-chardev")
async def query_chardev(call: Call) -> object:
    vmm = call.vmm
    if vmm.machine is not None:
        found = await vmm.forward("query-chardev", {})
        assert isinstance(found, list)
        return [c for c in found if c.get("label") != LINK_CHARDEV]  # qmpvm's own link
    out = []
    for resource in vmm.config.of_kind(Kind.CHARDEV):
        backend, _data = backend_of(resource.args)
        out.append({"label": resource.key, "filename": backend, "frontend-open": False})
    return out


@REGISTRY.command("ringbuf-read", args=ENGINE_ARGS)
async def ringbuf_read(call: Call) -> object:
    """The engine's ringbuf; after the guest powered off, what the ringbuf held
    then (kept by qmpvm), read and consumed as QEMU reads its buffer."""
    vmm = call.vmm
    if vmm.machine is not None:
        return await vmm.forward("ringbuf-read", call.args)
    device = str(call.args["device"])
    kept = vmm.ringbuf_backlog.get(device)
    if kept is None:
        raise PhaseError(phase_refusal("ringbuf-read", Phase.NO_MACHINE))
    size = int(call.args["size"])
    if size <= 0:
        raise ConfigError("size must be greater than zero")
    data = bytes(kept[:size])
    del kept[:size]
    if call.args.get("format") == "base64":
        return base64.b64encode(data).decode()
    return data.decode("utf-8", errors="replace")


def keep_ringbufs(vmm: Vmm, message: dict[str, object]) -> None:
    """On the guest's power-off, what its ringbufs hold is read before the engine goes."""
    vmm.after_shutdown()


REGISTRY.hook("SHUTDOWN", keep_ringbufs)
