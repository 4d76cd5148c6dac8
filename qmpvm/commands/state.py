"""Machine state: machine-snapshot, machine-restore, machine-migrate, machine-receive.

Declared here; done by ``qmpvm.state.operations``, loaded on first use (it
is large, and a qmpvm that never moves a machine need not wait for it).
"""

from __future__ import annotations

from qmpvm.commands.common import REGISTRY
from qmpvm.monitor.dispatch import AFTER_INIT, BEFORE_INIT, ENGINE_ARGS, Call

REGISTRY.event(
    "MACHINE_MIGRATION",
    {"role": "str", "status": "str", "*total-time": "int", "*downtime": "int",
     "*transferred": "int", "*error": "str"},
)  # fmt: skip


@REGISTRY.command(
    "machine-snapshot", args={"dir": "str", "*live": "bool", "*stop": "bool"}, phases=AFTER_INIT
)
async def machine_snapshot(call: Call) -> object:
    from qmpvm.state import operations

    return await operations.snapshot(call.vmm, call.args)


@REGISTRY.command("machine-restore", args={"dir": "str", "*paused": "bool"}, phases=BEFORE_INIT)
async def machine_restore(call: Call) -> object:
    from qmpvm.state import operations

    return await operations.restore(call.vmm, call.args)


@REGISTRY.command("machine-migrate", args={"uri": "str"}, phases=AFTER_INIT)
async def machine_migrate(call: Call) -> object:
    from qmpvm.state import operations

    return await operations.migrate(call.vmm, call.args)


@REGISTRY.command("machine-receive", args={"*listen": "str"}, phases=BEFORE_INIT)
async def machine_receive(call: Call) -> object:
    """Prepare an incoming machine and open its data channel; the state and the
    guest's start follow in the background (machine-migrate's other half)."""
    from qmpvm.state import operations

    return await operations.receive(call.vmm, call.args)


@REGISTRY.command("query-migrate", args=ENGINE_ARGS)
async def query_migrate(call: Call) -> object:
    """The engine's answer; once a migration took the machine away, its figures."""
    vmm = call.vmm
    if vmm.machine is not None:
        return await vmm.forward("query-migrate", {})
    return vmm.last_migration or {}
