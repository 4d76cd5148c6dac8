"""Session and introspection commands, and the machine-wide queries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmpvm import QEMU_VERSION, __version__
from qmpvm.commands.common import REGISTRY
from qmpvm.errors import CommandNotFoundError, ConfigError, EngineError
from qmpvm.monitor.dispatch import ENGINE_ARGS, UNRECORDED, Call

if TYPE_CHECKING:
    from qmpvm.monitor.protocol import Encoded


@REGISTRY.command("qmp_capabilities", args=ENGINE_ARGS)
async def qmp_capabilities(call: Call) -> object:
    raise CommandNotFoundError("Capabilities negotiation is already complete, command ignored")


def version() -> dict[str, object]:
    major, minor, micro = QEMU_VERSION
    return {
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": f"qmpvm {__version__}",
    }


@REGISTRY.command("query-version")
async def query_version(call: Call) -> object:
    """The engine's version where its capabilities are known (the greeting,
    sent before they load, says the version qmpvm was built for)."""
    answer = version()
    caps = await call.vmm.capabilities()
    if caps is not None:
        major, minor, micro = caps.version
        answer["qemu"] = {"major": major, "minor": minor, "micro": micro}
    return answer


@REGISTRY.command("query-commands")
async def query_commands(call: Call) -> object:
    """qmpvm's commands and every engine command it relays."""
    names = set(REGISTRY.commands)
    caps = await call.vmm.capabilities()
    if caps is not None:
        names |= caps.commands - set(UNRECORDED)
    return [{"name": name} for name in sorted(names)]


_merged_schema: Encoded | None = None


@REGISTRY.command("query-qmp-schema")
async def query_qmp_schema(call: Call) -> object:
    """The engine's schema with qmpvm's own commands merged in, type names masked
    as QEMU masks them: a client reading capabilities from it sees the engine.

    Where the engine declares a command or event, its declaration stands (its
    precise argument, return and event data types). Built and encoded once.
    """
    global _merged_schema
    if _merged_schema is None:
        caps = await call.vmm.capabilities()
        if caps is None:
            return REGISTRY.schema()
        import json

        from qmpvm.monitor.protocol import Encoded
        from qmpvm.qapi.check import merge

        engine = [e for e in json.loads(caps.schema.json()) if e.get("name") not in UNRECORDED]
        declared = {e["name"] for e in engine if e.get("meta-type") in ("command", "event")}
        own = [e for e in REGISTRY.schema() if e.get("name") not in declared]
        _merged_schema = Encoded(merge(engine, own))
    return _merged_schema


@REGISTRY.command("query-name")
async def query_name(call: Call) -> object:
    name = call.vmm.config.machine.name
    return {"name": name} if name is not None else {}


@REGISTRY.command("query-kvm")
async def query_kvm(call: Call) -> object:
    from qmpvm.engine.host import kvm_state

    machine = call.vmm.machine
    return {
        "enabled": machine is not None and machine.accel == "kvm",
        "present": kvm_state().present,
    }


@REGISTRY.command("query-status")
async def query_status(call: Call) -> object:
    vmm = call.vmm
    machine = vmm.machine
    if machine is not None:
        try:
            status = await machine.execute("query-status", {})
        except EngineError:
            if not await machine.ended():
                raise
            status = None  # it died meanwhile: the state it left is the answer
        if isinstance(status, dict):
            return {**status, "phase": str(vmm.phase)}
    return {"status": vmm.status, "running": False, "singlestep": False, "phase": str(vmm.phase)}


@REGISTRY.command("query-machine")
async def query_machine(call: Call) -> object:
    vmm = call.vmm
    reply: dict[str, object] = {"phase": str(vmm.phase), **vmm.config.describe()}
    if vmm.machine is not None:
        engine: dict[str, object] = {
            "pid": vmm.machine.pid,
            "accel": vmm.machine.accel,
            "hotplug-ports": list(vmm.machine.hotplug_ports),
        }
        if vmm.machine.memory_from is not None:  # a fast restore's RAM, copy-on-write
            engine["memory-from"] = vmm.machine.memory_from
        from qmpvm.engine.confinement import describe

        machine = vmm.machine
        engine["confinement"] = describe(
            machine.pid,
            vmm.config.machine.values,
            machine.cgroup_why,
            machine.user_why,
            machine.root_why,
        )
        reply["engine"] = engine
    if vmm.last_exit is not None:
        reply["last-exit"] = vmm.last_exit
    return reply


@REGISTRY.command("config-export", args={"*diff": "bool"})
async def config_export(call: Call) -> object:
    return call.vmm.config.export(diff=call.args.get("diff", True))


@REGISTRY.command("quit", args={"*keep-machine": "bool"})
async def quit_(call: Call) -> object:
    """QEMU's quit; ``keep-machine``: qmpvm alone exits, the guest runs on, and
    the next qmpvm on the same state directory takes it over."""
    vmm = call.vmm
    if call.args.get("keep-machine"):
        if vmm.settings.state_dir is None:
            raise ConfigError(
                "keep-machine needs --state-dir: without one, no engine outlives qmpvm"
            )
        vmm.keep_machine = True
    vmm.quit_requested.set()
    return {}
