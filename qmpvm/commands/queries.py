"""Queries about resources that answer before a machine exists.

With a machine, the engine answers; before one, the answer is built from the
configuration in the engine's shapes, so a client can look before it builds.
"""

from __future__ import annotations

from qmpvm.commands.common import REGISTRY
from qmpvm.config.resource import Kind
from qmpvm.monitor.dispatch import ENGINE_ARGS, Call


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
