"""The boot source: kernel, initrd and command line (all boot-only)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qmpvm.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class BootSet:
    """``boot-set`` arguments; an empty ``initrd`` or ``append`` clears it."""

    kernel: str
    initrd: str | None = None
    append: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BootConfig:
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None

    def update(self, change: BootSet) -> BootConfig:
        if not change.kernel:
            raise ConfigError("Parameter 'kernel' must not be empty")
        new = dataclasses.replace(self, kernel=change.kernel)
        if change.initrd is not None:
            new = dataclasses.replace(new, initrd=change.initrd or None)
        if change.append is not None:
            new = dataclasses.replace(new, append=change.append or None)
        return new

    def describe(self) -> dict[str, object]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
