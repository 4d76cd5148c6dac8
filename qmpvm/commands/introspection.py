"""What the engine can build, answered from the capability cache.

QEMU answers these from its own type system; qmpvm answers them before any
machine exists from what the probe learnt (``qmpvm.engine.caps``), in the
engine's shapes, so a client such as libvirt can probe qmpvm as it probes
QEMU.  With a machine, what the cache does not hold is asked of the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmpvm.commands.common import REGISTRY
from qmpvm.errors import ConfigError, NotFoundError, QmpvmError
from qmpvm.monitor.dispatch import ENGINE_ARGS, Call
from qmpvm.vmm import Vmm

if TYPE_CHECKING:
    from qmpvm.engine.caps import Capabilities


async def _caps(vmm: Vmm) -> Capabilities:
    caps = await vmm.capabilities()
    if caps is None:
        raise QmpvmError("The engine's capabilities are unavailable (is QEMU installed?)")
    return caps


@REGISTRY.command("query-machines")
async def query_machines(call: Call) -> object:
    seen: dict[str, object] = {}
    for entry in (await _caps(call.vmm)).machines.values():
        seen.setdefault(str(entry.get("name")), entry)
    return list(seen.values())


@REGISTRY.command("qom-list-types", args=ENGINE_ARGS)
async def qom_list_types(call: Call) -> object:
    """With a machine, the engine's own answer (every type, with its parent);
    before one, the concrete types the cache knows, by name."""
    implements = call.args.get("implements")
    if call.vmm.machine is not None:
        return await call.vmm.forward("qom-list-types", call.args)
    caps = await _caps(call.vmm)
    families = {
        "device": list(caps.devices),
        "user-creatable": list(caps.object_types),
        "machine": sorted({f"{e.get('name')}-machine" for e in caps.machines.values()}),
        "accel": [f"{name}-accel" for name in caps.accelerators],
    }
    if implements is not None:
        names = families.get(str(implements), [])
    else:
        names = [name for family in families.values() for name in family]
    return [{"name": name} for name in dict.fromkeys(names)]


@REGISTRY.command("device-list-properties", args=ENGINE_ARGS)
async def device_list_properties(call: Call) -> object:
    typename = str(call.args["typename"])
    found = (await _caps(call.vmm)).device_list_properties(typename)
    if found is not None:
        return found
    if call.vmm.machine is not None:
        return await call.vmm.forward("device-list-properties", call.args)
    raise NotFoundError(f"Device '{typename}' not found")


@REGISTRY.command("qom-list-properties", args=ENGINE_ARGS)
async def qom_list_properties(call: Call) -> object:
    """Machine types (``NAME-machine``), object types and devices, from the cache."""
    typename = str(call.args["typename"])
    caps = await _caps(call.vmm)
    found = caps.device_list_properties(typename)
    if found is None:
        properties = caps.object_types.get(typename)
        if properties is None and typename.endswith("-machine"):
            properties = caps.machine_properties.get(typename.removesuffix("-machine"))
        found = properties.to_qmp() if properties is not None else None
    if found is not None:
        return found
    if call.vmm.machine is not None:
        return await call.vmm.forward("qom-list-properties", call.args)
    raise ConfigError(f"Class '{typename}' not found")


@REGISTRY.command("query-cpu-definitions")
async def query_cpu_definitions(call: Call) -> object:
    if call.vmm.machine is not None:
        return await call.vmm.forward("query-cpu-definitions", {})
    models = (await _caps(call.vmm)).cpu_models
    return [
        {"name": name, **({"alias-of": alias} if alias else {})} for name, alias in models.items()
    ]


@REGISTRY.command("query-command-line-options", args=ENGINE_ARGS)
async def query_command_line_options(call: Call) -> object:
    option = call.args.get("option")
    options = (await _caps(call.vmm)).command_line_options
    if option is not None and option not in options:
        raise ConfigError(f"Invalid option name: {option}")
    return [
        {"option": name, "parameters": [{"name": p, "type": t} for p, t in params.items()]}
        for name, params in options.items()
        if option in (None, name)
    ]
