"""The ``qmpvm`` command (and ``python -m qmpvm``): greet first, then load.

Only this module and ``qmpvm.monitor.early`` run before the first greeting,
so clients are answered within a few milliseconds of Python starting;
``qmpvm.cli`` and everything after it load while they wait.
"""

import sys

from qmpvm.monitor.early import EarlyMonitor, scan_listeners


def main() -> int:
    argv = sys.argv[1:]
    early = None
    listeners = scan_listeners(argv)
    if listeners:
        try:
            early = EarlyMonitor(listeners)
        except OSError:
            early = None  # the full start-up binds again and says what is wrong
    from qmpvm.cli import main as cli_main

    return cli_main(argv, early)


if __name__ == "__main__":
    sys.exit(main())
