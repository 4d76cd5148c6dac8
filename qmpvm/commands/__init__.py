"""QMP commands, one module per area; each is thin: check -> store -> engine.

Importing this package registers every command in ``REGISTRY``.
"""

from __future__ import annotations

from qmpvm.commands import (  # noqa: F401
    consoles,
    fds,
    introspection,
    machine,
    outputs,
    queries,
    resources,
    runstate,
    session,
    state,
)
from qmpvm.commands.common import REGISTRY

__all__ = ["REGISTRY"]
