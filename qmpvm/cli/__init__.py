"""The ``qmpvm`` command line: QEMU's options, qmpvm's own, and subcommands.

``translate`` turns options into QMP commands (pure); ``main`` runs them
with ``qmpvm.app``, or hands a subcommand to its tool.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from qmpvm.cli.translate import (
    FLAGS,
    OPTIONS,
    InheritedFd,
    Options,
    Start,
    Typer,
    UsageError,
    option_lines,
    options_given,
    translate,
)
from qmpvm.monitor.early import Listener

if TYPE_CHECKING:
    from qmpvm.cli.typer import EngineTyper
    from qmpvm.monitor.early import EarlyMonitor

__all__ = [
    "FLAGS",
    "OPTIONS",
    "InheritedFd",
    "Listener",
    "Options",
    "Start",
    "UsageError",
    "main",
    "parse_argv",
]

USAGE = """\
usage: qmpvm [options]
       qmpvm image build [DIR]            build the test/demo guest
       qmpvm console SOCKET [--chardev ID] [--history]
                                          attach a terminal to a guest console
       qmpvm qmp SOCKET COMMAND [JSON]    run one QMP command and print the reply
       qmpvm snapshot SOCKET DIR [--live] [--stop]
                                          snapshot the machine, showing progress
       qmpvm migrate SOCKET URI           migrate the machine, showing progress
       qmpvm demo                         boot a guest configured over QMP

The monitor comes up first; every machine option is a QMP command
(--print-qmp shows them).  With neither -S nor --preconfig, the machine is
created and started.  Options are QEMU 7.2's (one or two dashes):

"""

SUBCOMMANDS = ("image", "console", "qmp", "demo", "snapshot", "migrate")
_PLAIN = {
    "-qmp",
    "-S",
    "-preconfig",
    "-state-dir",
    "-restore",
    "-config",
    "-engine",
    "-v",
    "-verbose",
    "-print-qmp",
    "-m",
    "-smp",
    "-kernel",
    "-initrd",
    "-append",
    "-device",
    "-nodefaults",
}
_TYPED = [spec for name, spec in OPTIONS.items() if name not in _PLAIN]
"""Options whose text the engine's schema types: only these need the cache loaded."""


def parse_argv(argv: list[str], typer: Typer | None = None) -> Options:
    return translate(argv, typer)


def engine_typer(binary: str) -> EngineTyper | None:
    """Types option text from the engine's cached schema; None without an engine."""
    import asyncio

    from qmpvm.cli.typer import EngineTyper
    from qmpvm.engine.caps_loader import ProbeError, load_or_probe

    try:
        caps = asyncio.run(load_or_probe(binary))
    except ProbeError:
        return None
    return EngineTyper.from_caps(caps)


def _engine_of(argv: list[str]) -> str:
    for index, arg in enumerate(argv[:-1]):
        if arg.lstrip("-") == "engine":
            return argv[index + 1]
    return "qemu-system-x86_64"


def main(
    argv: list[str] | None = None,
    early: EarlyMonitor | None = None,
    open_at_start: frozenset[int] | None = None,
) -> int:
    """Run qmpvm; ``early`` is the monitor ``qmpvm.__main__`` opened already, if any,
    and ``open_at_start`` the descriptors the process had before it opened any."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return _subcommand(argv[0], argv[1:])
    given = options_given(argv)
    if {"-h", "-help"} & set(given):
        sys.stdout.write(USAGE + "\n".join(option_lines()) + "\n")
        return 0
    if "-version" in given:
        from qmpvm import __version__

        print(f"qmpvm {__version__}")
        return 0
    typed = any(OPTIONS.get(option) in _TYPED for option in given)
    try:
        typer = engine_typer(_engine_of(argv)) if typed else None
        options = parse_argv(argv, typer)
    except UsageError as err:
        if early is not None:
            early.close()
        print(f"qmpvm: {err}", file=sys.stderr)
        return 1
    options.open_at_start = open_at_start
    options.capabilities = typer.caps if typer is not None else None
    options.schema = typer.built_schema if typer is not None else None
    for warning in options.warnings:
        print(f"qmpvm: warning: {warning}", file=sys.stderr)
    if options.engine_help is not None:
        os.execvp(options.engine, [options.engine, *options.engine_help])
    if options.daemonize and not options.print_qmp:
        return _daemonize_then_run(options)
    from qmpvm.app import run

    return run(options, early)


def _daemonize_then_run(options: Options) -> int:
    """QEMU's -daemonize: the parent exits 0 once the child's monitor and
    machine are ready (1 if the child fails first); the child runs on, detached."""
    readable, writable = os.pipe()
    if os.fork() > 0:
        os.close(writable)
        with os.fdopen(readable, "rb") as pipe:
            return 0 if pipe.read() else 1
    os.close(readable)
    os.setsid()
    options.ready_fd = writable
    from qmpvm.app import run

    code = run(options, None)
    os._exit(code)


def _subcommand(name: str, argv: list[str]) -> int:
    if name == "image":
        from qmpvm.images.cli import main as image_main

        return image_main(argv)
    if name == "demo":
        from qmpvm.tools.demo import main as demo_main

        return demo_main(argv)
    if name in ("snapshot", "migrate"):
        from qmpvm.tools.progress import migrate_main, snapshot_main

        return snapshot_main(argv) if name == "snapshot" else migrate_main(argv)
    from qmpvm.tools.client import console_main, qmp_main

    return console_main(argv) if name == "console" else qmp_main(argv)
