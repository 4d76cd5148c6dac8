"""Which engine to run and where its capabilities are cached: set once per process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmpvm.engine.caps import Capabilities
    from qmpvm.qapi.check import Schema


@dataclass(slots=True, kw_only=True)
class EngineSettings:
    binary: str = "qemu-system-x86_64"
    cache_dir: Path | None = None
    capabilities: Capabilities | None = None  # already loaded (by the command line's typing)
    schema: Schema | None = None  # already built from them (likewise)
    allow_host_programs: bool = False  # exec: URIs, tap scripts, ... (qmpvm.config.programs)
    state_dir: Path | None = None  # set: the engine outlives qmpvm, its record kept here
