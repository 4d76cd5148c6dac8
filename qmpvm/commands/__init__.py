"""QMP commands, one module per area; each is thin: check -> store -> engine.

Importing this package registers every command in ``REGISTRY``.
"""

from __future__ import annotations

from qmpvm.commands import block, chardev, device, fds, machine, net, runstate, session  # noqa: F401
from qmpvm.commands.common import REGISTRY

__all__ = ["REGISTRY"]
