"""Run-state and console commands that the running machine answers."""

from __future__ import annotations

from qmpvm.commands.common import REGISTRY, Passthrough
from qmpvm.monitor.dispatch import AFTER_INIT, Call
from qmpvm.schema import to_json

RELAYED = (
    "cont",
    "stop",
    "system_reset",
    "system_powerdown",
    "ringbuf-read",
    "ringbuf-write",
    "human-monitor-command",
    "qom-list",
    "qom-get",
    "query-pci",
    "query-cpus-fast",
)


async def relay(call: Call) -> object:
    arguments = to_json(call.args) if call.args is not None else {}
    return await call.vmm.forward(call.name, arguments)


for _name in RELAYED:
    REGISTRY.command(_name, args=Passthrough, returns=object, phases=AFTER_INIT)(relay)

for _event in ("STOP", "RESUME", "RESET", "SHUTDOWN", "POWERDOWN", "DEVICE_DELETED", "ENGINE_EXIT"):
    REGISTRY.event(_event)
