"""Block nodes: hot on every machine; their devices follow the device rules."""

from __future__ import annotations

from qmpvm.commands.common import REGISTRY, change
from qmpvm.config import block
from qmpvm.config.resource import Kind
from qmpvm.errors import ArgumentError, NotFoundError
from qmpvm.monitor.dispatch import AFTER_INIT, Call
from qmpvm.schema import to_json
from qmpvm.vmm import Vmm


@REGISTRY.command("blockdev-add", args=block.BlockdevOptions)
async def blockdev_add(call: Call) -> object:
    args: block.BlockdevBase = call.args
    if args.node_name is None:
        raise ArgumentError("'node-name' must be specified for the root node")
    vmm = call.vmm
    document = to_json(args)

    async def on_engine() -> object:
        await _share_fdsets(vmm, block.fdset_ids(document))
        return await vmm.engine().execute("blockdev-add", document)

    await change(
        vmm,
        lambda c: c.add(block.make(args, c.next_seq)),
        on_engine=on_engine,
        undo=lambda: vmm.engine().execute("blockdev-del", {"node-name": args.node_name}),
    )
    return {}


async def _share_fdsets(vmm: Vmm, wanted: set[int]) -> None:
    """Give the running engine the fdsets a hot-plugged node opens.

    At machine-init every fdset goes over with ``-add-fd``; one added
    later must be passed on the private link before the engine can open it.
    """
    if not wanted:
        return
    engine = vmm.engine()
    known = await engine.execute("query-fdsets", {})
    have = {entry["fdset-id"] for entry in known} if isinstance(known, list) else set()
    for fdset_id in sorted(wanted - have):
        entries = vmm.fds.fdsets.get(fdset_id)
        if not entries:
            raise NotFoundError(f"File descriptor named 'fdset-id={fdset_id}' not found")
        for entry in entries:
            arguments: dict[str, object] = {"fdset-id": fdset_id}
            if entry.opaque is not None:
                arguments["opaque"] = entry.opaque
            await engine.execute("add-fd", arguments, fds=[entry.fd])


@REGISTRY.command("blockdev-del", args=block.BlockdevDel)
async def blockdev_del(call: Call) -> object:
    args: block.BlockdevDel = call.args
    vmm = call.vmm
    await change(
        vmm,
        lambda c: c.remove(Kind.BLOCK, args.node_name),
        on_engine=lambda: vmm.engine().execute("blockdev-del", {"node-name": args.node_name}),
    )
    return {}


@REGISTRY.command("block_resize", args=block.BlockResize, phases=AFTER_INIT)
async def block_resize(call: Call) -> object:
    """The size lives in the image, not in the configuration."""
    return await call.vmm.forward("block_resize", to_json(call.args))


@REGISTRY.command("query-named-block-nodes", returns=object)
async def query_named_block_nodes(call: Call) -> object:
    vmm = call.vmm
    if vmm.machine is not None:
        return await vmm.forward("query-named-block-nodes", {})
    return [_node_info(dict(r.args)) for r in vmm.config.of_kind(Kind.BLOCK)]


@REGISTRY.command("query-block", returns=object)
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
        qdev = device.args.get("id", device.key)
        out.append(
            {
                "device": "",
                "qdev": qdev,
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
