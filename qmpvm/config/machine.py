"""The machine resource: type, accelerator, name, memory, vCPUs, hot-plug
ports (all boot-only)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

from qmpvm.errors import ConfigError

MiB = 1024 * 1024
MIN_MEMORY = 16 * MiB
MAX_CPUS = 288
MAX_HOTPLUG_PORTS = 24
"""q35's root bus has 32 slots; the machine's own devices use a few."""


class Accel(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineSet:
    """``machine-set`` arguments: only the members given change."""

    type: str | None = None
    accel: Accel | None = None
    name: str | None = None
    memory: int | None = None
    cpus: int | None = None
    hotplug_ports: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineConfig:
    type: str = "q35"
    accel: Accel | None = None  # None: decided at machine-init from what the host offers
    name: str | None = None
    memory: int = 128 * MiB
    cpus: int = 1
    hotplug_ports: int = 4  # q35 only: free PCIe root ports for device_add at run time

    def update(self, change: MachineSet) -> MachineConfig:
        if change.memory is not None and (change.memory < MIN_MEMORY or change.memory % MiB):
            raise ConfigError(
                f"Parameter 'memory' must be a multiple of 1 MiB and at least {MIN_MEMORY} bytes"
            )
        if change.cpus is not None and not 1 <= change.cpus <= MAX_CPUS:
            raise ConfigError(f"Parameter 'cpus' must be between 1 and {MAX_CPUS}")
        if change.hotplug_ports is not None and not 0 <= change.hotplug_ports <= MAX_HOTPLUG_PORTS:
            raise ConfigError(
                f"Parameter 'hotplug-ports' must be between 0 and {MAX_HOTPLUG_PORTS}"
            )
        if change.type is not None and not change.type:
            raise ConfigError("Parameter 'type' must not be empty")
        given = {f.name: getattr(change, f.name) for f in dataclasses.fields(change)}
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})
