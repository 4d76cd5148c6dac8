"""The qmpvm process: open the store, listen, replay, serve until quit.

Start-up order is the design's: the monitor listens first, then the config
file and the command-line options are replayed through the dispatcher like
any client's commands.  If one is refused, qmpvm says which on stderr, puts
the configuration back as it was, and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

from qmpvm.cli import Options
from qmpvm.commands import REGISTRY
from qmpvm.monitor.dispatch import Dispatcher
from qmpvm.monitor.protocol import Request
from qmpvm.monitor.server import MonitorServer, default_greeting
from qmpvm.store import Store
from qmpvm.vmm import EngineSettings, Vmm

log = logging.getLogger("qmpvm")


class StartupError(Exception):
    """A replayed command was refused: one line for stderr."""


def read_config_file(path: str) -> list[dict[str, object]]:
    """A JSON array of commands, or one JSON object a line."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise StartupError(f"--config {path}: {err.strerror}") from err
    try:
        value = json.loads(text)
        items = value if isinstance(value, list) else [value]
    except ValueError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as err:
            raise StartupError(f"--config {path}: not JSON: {err}") from err
    if not all(isinstance(item, dict) and "execute" in item for item in items):
        raise StartupError(f'--config {path}: expected QMP commands ({{"execute": ...}})')
    return items


async def replay(
    dispatcher: Dispatcher, vmm: Vmm, commands: list[dict[str, object]], origin: str
) -> None:
    client = vmm.new_client()
    try:
        for command in commands:
            arguments = command.get("arguments", {})
            request = Request(
                name=str(command["execute"]),
                arguments=arguments if isinstance(arguments, dict) else {},
            )
            reply = await dispatcher.dispatch(request, client)
            error = reply.get("error")
            if isinstance(error, dict):
                raise StartupError(f"{origin}: {request.name} refused: {error['desc']}")
    finally:
        vmm.client_gone(client)


async def serve(options: Options) -> int:
    state_dir = Path(options.state_dir) if options.state_dir else None
    store = Store(state_dir)
    vmm = Vmm(store, EngineSettings(binary=options.engine), hooks=REGISTRY.hooks)
    dispatcher = Dispatcher(REGISTRY, vmm)
    server = MonitorServer(dispatcher, vmm, default_greeting())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, vmm.quit_requested.set)
    try:
        for listener in options.listeners:
            if listener.kind == "unix":
                server.listen_unix(listener.path)
            else:
                server.listen_tcp(listener.host, listener.port)
    except OSError as err:
        await server.close()
        print(f"qmpvm: -qmp: {err}", file=sys.stderr)
        return 1
    vmm.start_probe()
    before = vmm.config
    try:
        if options.config_file:
            await replay(dispatcher, vmm, read_config_file(options.config_file), "--config")
        await replay(dispatcher, vmm, options.machine_commands(), "command line")
    except StartupError as err:
        print(f"qmpvm: {err}", file=sys.stderr)
        await vmm.stop_engine()
        vmm.commit(before)
        await server.close()
        store.close()
        return 1
    if not options.listeners and vmm.machine is None:
        print("qmpvm: nothing to do: no -qmp listener and no machine", file=sys.stderr)
        store.close()
        return 1
    await _wait_for_end(vmm, has_listeners=bool(options.listeners))
    log.info("shutting down")
    await vmm.stop_engine()
    await server.close()
    vmm.fds.close_all()
    store.close()
    return 0


async def _wait_for_end(vmm: Vmm, *, has_listeners: bool) -> None:
    """Until quit or a signal; without a monitor, also until the engine exits."""
    while not vmm.quit_requested.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(vmm.quit_requested.wait(), 0.2)
        if not has_listeners and vmm.machine is None:
            return


def run(options: Options) -> int:
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(options.verbosity, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if options.print_qmp:
        for command in options.machine_commands():
            print(json.dumps(command))
        return 0
    return asyncio.run(serve(options))
