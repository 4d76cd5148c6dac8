"""The qmpvm process: open the store, listen, replay, serve until quit.

Start-up order is the design's: the monitor listens (and greets) first,
while the command modules load in a thread; then the config file and the
command-line options are replayed through the dispatcher like any client's
commands, and clients' own commands wait until they are done (QEMU, too,
reads no monitor input before its command-line machine exists).  If one is
refused, qmpvm says which on stderr, puts the configuration back as it was,
and exits 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from qmpvm.errors import EngineError, StoreError
from qmpvm.monitor.client import Client
from qmpvm.monitor.early import EarlyMonitor, Listener, greeting_line
from qmpvm.monitor.protocol import Request
from qmpvm.monitor.server import MonitorServer

if TYPE_CHECKING:
    from qmpvm.cli import Options
    from qmpvm.monitor.dispatch import Dispatcher
    from qmpvm.vmm import Vmm

log = logging.getLogger("qmpvm")


REPLAY_CLIENT = -1
"""The client id of commands from --config and the command line."""
CONSOLE_CLIENT = -2
"""The client id of commands typed into an HMP monitor on a console."""


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


class ControlPlane:
    """The sessions' backend, ready once the command modules are loaded.

    Loading them (schema classes, the registry) takes longer than the
    greeting may; sessions greet at once and their first command waits.
    """

    def __init__(self) -> None:
        self._ready = asyncio.Event()
        self.dispatcher: Dispatcher | None = None
        self.vmm: Vmm | None = None

    async def load(self, options: Options, quit_requested: asyncio.Event) -> Vmm:
        await asyncio.to_thread(_import_control_plane)
        from qmpvm.commands import REGISTRY
        from qmpvm.engine.settings import EngineSettings
        from qmpvm.monitor.dispatch import Dispatcher
        from qmpvm.store import Store
        from qmpvm.vmm import Vmm

        state_dir = Path(options.state_dir) if options.state_dir else None
        vmm = Vmm(
            Store(state_dir),
            EngineSettings(
                binary=options.engine,
                capabilities=options.capabilities,
                schema=options.schema,
                allow_host_programs=options.allow_host_programs,
                state_dir=state_dir,
            ),
            hooks=REGISTRY.hooks,
            quit_requested=quit_requested,
        )
        self.vmm, self.dispatcher = vmm, Dispatcher(REGISTRY, vmm)
        vmm.consoles.execute = self._console_command
        return vmm

    def open(self) -> None:
        """Let clients' commands in: after the start-up commands, as QEMU reads no
        monitor input before its command-line machine exists."""
        self._ready.set()

    async def dispatch(self, request: Request, client: Client) -> dict[str, object]:
        await self._ready.wait()
        if self.dispatcher is None:
            raise RuntimeError("control plane not loaded")
        return await self.dispatcher.dispatch(request, client)

    async def _console_command(
        self, name: str, arguments: Mapping[str, object]
    ) -> Mapping[str, object]:
        """A command from an HMP monitor on a console, dispatched as a client's."""
        request = Request(name=name, arguments=dict(arguments))
        return await self.dispatch(request, Client(id=CONSOLE_CLIENT))

    def client_gone(self, client: Client) -> None:
        if self.vmm is not None:
            self.vmm.client_gone(client)
        else:
            client.close_pending()


def _import_control_plane() -> None:
    """Everything a command may need, loaded while clients are greeted: an import
    later could fail for want of a descriptor (at the process's limit)."""
    import qmpvm.commands
    import qmpvm.engine.caps_loader
    import qmpvm.engine.host
    import qmpvm.engine.link
    import qmpvm.engine.machine
    import qmpvm.qapi.check
    import qmpvm.store
    import qmpvm.vmm  # noqa: F401


async def replay(plane: ControlPlane, commands: list[dict[str, object]], origin: str) -> None:
    client = Client(id=REPLAY_CLIENT)
    try:
        for command in commands:
            arguments = command.get("arguments", {})
            request = Request(
                name=str(command["execute"]),
                arguments=arguments if isinstance(arguments, dict) else {},
            )
            if plane.dispatcher is None:
                raise RuntimeError("control plane not loaded")
            reply = await plane.dispatcher.dispatch(request, client)
            error = reply.get("error")
            if isinstance(error, dict):
                raise StartupError(f"{origin}: {request.name} refused: {error['desc']}")
    finally:
        plane.client_gone(client)


def _open_listeners(
    server: MonitorServer, listeners: list[Listener], early: EarlyMonitor | None
) -> None:
    """Take over what the early monitor bound and greeted, or bind now."""
    if early is None:
        for listener in listeners:
            server.listen(listener)
        return
    bound, greeted = early.handoff()
    if [listener for _sock, listener in bound] != listeners:
        raise RuntimeError(f"early monitor bound {bound}, the command line asks {listeners}")
    for sock, listener in bound:
        server.adopt_listener(sock, listener)
    for sock, peer in greeted:
        server.adopt_connection(sock, peer, greeted=True)


async def serve(options: Options, early: EarlyMonitor | None = None) -> int:
    plane = ControlPlane()
    server = MonitorServer(plane, greeting_line())
    try:
        _open_listeners(server, options.listeners, early)
    except OSError as err:
        await server.close()
        print(f"qmpvm: -qmp: {err}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()  # a signal during start-up still stops cleanly
    signalled: list[int] = []  # a signal ends the engine with one too, as QEMU would end

    def on_signal(sig: int) -> None:
        signalled.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    keep: list[bool] = []  # SIGUSR1: exit, leaving the machine to the next qmpvm

    def on_keep() -> None:
        keep.append(True)
        stop.set()

    if options.state_dir:
        loop.add_signal_handler(signal.SIGUSR1, on_keep)
    try:
        vmm = await plane.load(options, stop)
    except StoreError as err:
        print(f"qmpvm: {err}", file=sys.stderr)
        await server.close()
        return 1
    store = vmm.store
    vmm.add_sink(server.broadcast)
    vmm.start_probe()
    vmm.warm_up()
    before = vmm.config
    if options.pidfile:
        _write_pidfile(options.pidfile)
    taken_over = False
    try:
        try:
            await vmm.reattach()
        except EngineError as err:
            raise StartupError(f"state directory {options.state_dir}: {err.desc}") from err
        finally:
            taken_over = vmm.machine is not None
        if taken_over:
            _check_takeover(vmm, options)
            adopt_inherited_fds(vmm, options)
        else:
            if options.config_file:
                await replay(plane, read_config_file(options.config_file), "--config")
            adopt_inherited_fds(vmm, options)
            await replay(plane, options.machine_commands(), "command line")
    except StartupError as err:
        print(f"qmpvm: {err}", file=sys.stderr)
        if taken_over:
            await vmm.let_go_engine()  # the guest runs on, for a qmpvm started right
        else:
            await vmm.stop_engine()
        vmm.commit(before)
        if not taken_over:
            vmm.consoles.remove_fifo_dir()
        await server.close()
        store.close()
        return 1
    if not options.listeners and vmm.machine is None:
        print("qmpvm: nothing to do: no -qmp listener and no machine", file=sys.stderr)
        store.close()
        return 1
    plane.open()
    if options.ready_fd is not None:
        _report_ready(options.ready_fd)
    await _wait_for_end(vmm, has_listeners=bool(options.listeners))
    if (keep or vmm.keep_machine) and vmm.machine is not None:
        log.info("exiting; the engine (pid %d) runs on for the next qmpvm", vmm.machine.pid)
        await vmm.let_go_engine()
    else:
        log.info("shutting down")
        await vmm.stop_engine(by_signal=bool(signalled))
        vmm.consoles.remove_fifo_dir()
    await server.close()
    vmm.fds.close_all()
    store.close()
    return _exit_status(vmm, has_listeners=bool(options.listeners))


def _check_takeover(vmm: Vmm, options: Options) -> None:
    """With --state-dir, the machine an earlier qmpvm left running there is
    taken over, not built again: the command line may not describe another."""
    if options.commands or options.config_file or options.restore:
        raise StartupError(
            f"state directory {options.state_dir} has a running machine (engine pid "
            f"{vmm.engine().pid}), which qmpvm took over: give no machine options"
        )


def adopt_inherited_fds(vmm: Vmm, options: Options) -> None:
    """Descriptors qmpvm was started with: ``-add-fd`` ones join their fdsets,
    those a netdev or chardev names by number become getfd names; all owned by
    the command line's replay, so what its commands leave unused is closed."""
    for inherited in options.inherited_fds:
        _take_inherited(inherited.fd, f"-add-fd fd={inherited.fd}", options.open_at_start)
        vmm.fds.add_fd(inherited.fd, REPLAY_CLIENT, inherited.set, inherited.opaque)
    for named in options.named_fds:
        _take_inherited(named.fd, f"file descriptor {named.fd}", options.open_at_start)
        vmm.fds.getfd(named.name, named.fd, REPLAY_CLIENT)


def _take_inherited(fd: int, what: str, open_at_start: frozenset[int] | None) -> None:
    """An inherited descriptor must have been open when the process started: one
    opened since is qmpvm's own (a listener, the event loop's) and not to give away."""
    import os

    if open_at_start is not None and fd not in open_at_start:
        raise StartupError(f"{what}: not a descriptor qmpvm was started with")
    try:
        os.fstat(fd)
    except OSError as err:
        raise StartupError(f"{what}: {err.strerror}") from err
    os.set_inheritable(fd, False)


def _write_pidfile(path: str) -> None:
    import os

    try:
        Path(path).write_text(f"{os.getpid()}\n")
    except OSError as err:
        log.warning("-pidfile %s: %s", path, err.strerror)


def _report_ready(fd: int) -> None:
    """-daemonize: the parent waiting on ``fd`` may exit now; stdio goes to /dev/null."""
    import os

    os.write(fd, b"ready\n")
    os.close(fd)
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    os.close(null)


def _exit_status(vmm: Vmm, *, has_listeners: bool) -> int:
    """Without a monitor, qmpvm is the machine, as QEMU is: 1 when it failed."""
    ended = vmm.last_exit
    if has_listeners or ended is None or ended.get("status") == "shutdown":
        return 0
    print(f"qmpvm: the engine exited: {ended.get('reason')}", file=sys.stderr)
    return 1


async def _wait_for_end(vmm: Vmm, *, has_listeners: bool) -> None:
    """Until quit or a signal; without a monitor, also until the engine exits."""
    if not has_listeners:

        def end_with_engine(message: dict[str, object]) -> None:
            if message.get("event") == "ENGINE_EXIT":
                vmm.quit_requested.set()

        vmm.add_sink(end_with_engine)
        if vmm.machine is None:  # it exited before the sink was there
            return
    await vmm.quit_requested.wait()


def run(options: Options, early: EarlyMonitor | None = None) -> int:
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(options.verbosity, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if options.print_qmp:
        for command in options.machine_commands():
            print(json.dumps(command))
        return 0
    try:
        return asyncio.run(serve(options, early))
    finally:
        if options.pidfile:  # as QEMU does: the file names a running process only
            Path(options.pidfile).unlink(missing_ok=True)
