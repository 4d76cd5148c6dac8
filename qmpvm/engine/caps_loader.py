"""Engine capabilities for a binary: from the cache when it is fresh, else probed.

``qmpvm.engine.caps`` is the data model and the cache file, and
``qmpvm.engine.probe`` asks the binary (importing ``caps``); this module joins
the two, so imports run one way only: ``caps_loader -> probe -> caps``.
``probe`` (and what it pulls in: the monitor link, process spawning) is
imported on a cache miss only, since a warm load is on the path to the first
command.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from qmpvm.engine.caps import (
    Capabilities,
    ProbeError,
    Progress,
    cache_dirs,
    cache_key,
    cache_path,
    load_cached,
    resolve_binary,
    stat_identity,
    store,
)

__all__ = ["ProbeError", "load_or_probe"]

logger = logging.getLogger(__name__)


async def load_or_probe(
    binary: str = "qemu-system-x86_64",
    cache_dir: Path | None = None,
    *,
    progress: Progress | None = None,
) -> Capabilities:
    """Capabilities from the cache when the binary is unchanged, else from a fresh probe.

    ``cache_dir`` defaults to each of ``caps.cache_dirs()`` in turn.  A cache that cannot
    be written is logged and skipped: the probe result is still returned.
    Raises ``ProbeError`` when the binary is missing or unusable.
    """
    directories = [cache_dir] if cache_dir is not None else cache_dirs()
    key = cache_key(stat_identity(resolve_binary(binary)))
    for directory in directories:
        file = cache_path(directory, key)
        # Reading ~0.5 MB may wait for the disk: keep it off the event loop.
        cached = await asyncio.to_thread(load_cached, file, key)
        if cached is not None:
            logger.debug("engine capabilities from %s", file)
            return cached
    from qmpvm.engine.probe import probe  # compiled only when the cache misses

    caps = await probe(binary, progress=progress)
    for directory in directories:
        try:
            written = await asyncio.to_thread(store, directory, caps)
        except OSError as err:
            logger.info("cannot write capability cache in %s: %s", directory, err)
        else:
            logger.info("engine capabilities cached in %s", written)
            break
    else:
        logger.warning("no capability cache could be written in %s", directories)
    return caps
