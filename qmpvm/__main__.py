"""The ``qmpvm`` command (and ``python -m qmpvm``): greet first, then load.

Only this module and ``qmpvm.monitor.early`` run before the first greeting,
so clients are answered within a few milliseconds of Python starting;
``qmpvm.cli`` and everything after it load while they wait.
"""

import os
import sys

from qmpvm.monitor.early import EarlyMonitor, scan_listeners


def _open_descriptors() -> frozenset[int]:
    """The descriptors this process was started with (before it opens any)."""
    listed = [int(name) for name in os.listdir("/proc/self/fd")]
    open_now = set()
    for fd in listed:  # the listing's own descriptor is closed again by now
        try:
            os.fstat(fd)
        except OSError:
            continue
        open_now.add(fd)
    return frozenset(open_now)


def main() -> int:
    argv = sys.argv[1:]
    open_at_start = _open_descriptors()
    early = None
    listeners = scan_listeners(argv)
    if listeners:
        try:
            early = EarlyMonitor(listeners)
        except OSError:
            early = None  # the full start-up binds again and says what is wrong
    from qmpvm.cli import main as cli_main

    return cli_main(argv, early, open_at_start)


if __name__ == "__main__":
    sys.exit(main())
