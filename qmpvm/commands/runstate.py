"""HMP through QMP, and the events qmpvm declares.

Run-state commands (``cont``, ``stop``, ...) need nothing of qmpvm: the
dispatcher relays them, checked against the engine's schema.
"""

from __future__ import annotations

from qmpvm.commands.common import REGISTRY
from qmpvm.errors import ConfigError
from qmpvm.monitor.dispatch import AFTER_INIT, ENGINE_ARGS, Call

HMP_CHANGES_CONFIG = frozenset(
    {
        "device_add",
        "device_del",
        "drive_add",
        "drive_del",
        "netdev_add",
        "netdev_del",
        "chardev-add",
        "chardev-change",
        "chardev-remove",
        "set_link",
    }
)
"""HMP commands that would change what the store records behind its back."""


@REGISTRY.command("human-monitor-command", args=ENGINE_ARGS, phases=AFTER_INIT)
async def human_monitor_command(call: Call) -> object:
    """Forwarded, except what would change the configuration unrecorded."""
    line = str(call.args["command-line"])
    name = line.split(maxsplit=1)[0] if line.strip() else ""
    if name in HMP_CHANGES_CONFIG:
        raise ConfigError(
            f"HMP command '{name}' would change the configuration without qmpvm "
            f"recording it; use the QMP command instead"
        )
    return await call.vmm.forward("human-monitor-command", call.args)


for _event in ("STOP", "RESUME", "RESET", "SHUTDOWN", "POWERDOWN", "DEVICE_DELETED"):
    REGISTRY.event(_event)  # the engine's: its schema declares their data
REGISTRY.event(
    "ENGINE_EXIT",
    {"status": "str", "exit-code": "any", "signal": "any", "reason": "str", "stderr": "str"},
)
