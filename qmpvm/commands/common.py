"""What the command modules share: the registry and the change pattern."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from qmpvm.config.model import Config
from qmpvm.monitor.dispatch import Registry
from qmpvm.vmm import Vmm

REGISTRY = Registry()


EngineStep = Callable[[], Awaitable[object]]


async def change(
    vmm: Vmm,
    update: Callable[[Config], Config],
    *,
    on_engine: EngineStep | None = None,
    undo: EngineStep | None = None,
) -> object:
    """Change the store and the live machine together, or neither.

    ``update`` is pure: it runs once to refuse bad changes before the engine
    is touched, and again after the engine step, on whatever configuration
    is current by then (an event may have changed it meanwhile).  It runs once
    more before the lock is taken, so a change that is refused anyway does
    not wait behind one that waits for the engine.
    """
    update(vmm.config)
    async with vmm.change_lock:
        update(vmm.config)
        result: object = {}
        if vmm.machine is not None and on_engine is not None:
            result = await on_engine()
        try:
            vmm.commit(update(vmm.config))
        except Exception:
            if vmm.machine is not None and undo is not None:
                await undo()
            raise
        return result
