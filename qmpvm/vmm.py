"""The control plane's state: configuration, store, descriptors, engine, events.

Commands (``qmpvm.commands``) are thin and call into ``Vmm``; ``Vmm`` keeps
the invariants that span parts: a change is committed to the store and made
on the engine together or not at all; every client hears every event once,
in order; the engine may die and qmpvm carries on.

Runs entirely on the event loop thread; ``change_lock`` serializes the
commands that change configuration, so concurrent clients cannot interleave
a check and a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from qmpvm.config.descriptors import fd_names, fdset_ids
from qmpvm.config.model import Config
from qmpvm.config.resource import Kind
from qmpvm.engine.settings import EngineSettings
from qmpvm.errors import EngineError
from qmpvm.fds import FdRegistry
from qmpvm.host.consoles import Consoles
from qmpvm.monitor.client import Client
from qmpvm.monitor.dispatch import EventHook, Phase
from qmpvm.store import Store

if TYPE_CHECKING:
    from qmpvm.engine.caps import Capabilities
    from qmpvm.engine.machine import EngineMachine
    from qmpvm.qapi.check import Schema

log = logging.getLogger(__name__)

EventSink = Callable[[dict[str, object]], None]


class Vmm:
    def __init__(
        self,
        store: Store,
        settings: EngineSettings | None = None,
        hooks: Mapping[str, list[EventHook]] | None = None,
        quit_requested: asyncio.Event | None = None,
    ) -> None:
        self.store = store
        self._hooks = hooks or {}
        self.settings = settings or EngineSettings()
        self.config = Config.from_documents(store.documents)
        self.fds = FdRegistry()
        self.change_lock = asyncio.Lock()
        self.machine: EngineMachine | None = None
        self.status = "prelaunch"
        self.last_exit: dict[str, object] | None = None
        self.last_migration: dict[str, object] | None = None  # query-migrate once it is gone
        self.background: set[asyncio.Task[None]] = set()  # work a command started
        self.quit_requested = quit_requested or asyncio.Event()
        self.keep_machine = False  # on quit, leave the engine running (--state-dir)
        self.consoles = Consoles(self.settings.state_dir, self.fds)  # chardevs qmpvm serves
        self._sinks: list[EventSink] = []
        self._caps_task: asyncio.Task[Capabilities | None] | None = None
        self._schema_task: asyncio.Task[Schema | None] | None = None

    # -- clients and events ----------------------------------------------

    def client_gone(self, client: Client) -> None:
        client.close_pending()
        names, sets = self.fds_in_use()
        closed = self.fds.release_owner(client.id, names, sets)
        if closed:
            log.info("client %d left: closed %d passed descriptor(s)", client.id, closed)

    def add_sink(self, sink: EventSink) -> None:
        self._sinks.append(sink)

    @contextlib.contextmanager
    def watching(
        self, match: Callable[[dict[str, object]], bool]
    ) -> Iterator[asyncio.Future[dict[str, object]]]:
        """A future for the first event ``match`` accepts from now on: enter
        before the command that causes it, so the event cannot slip past."""
        found: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()

        def sink(message: dict[str, object]) -> None:
            if not found.done() and match(message):
                found.set_result(message)

        self._sinks.append(sink)
        try:
            yield found
        finally:
            self._sinks.remove(sink)
            found.cancel()

    def emit(self, name: str, data: Mapping[str, object] | None = None) -> None:
        """Our own event, stamped now."""
        from qmpvm.monitor.protocol import event

        self.relay(event(name, data, time.time()))

    def relay(self, message: dict[str, object]) -> None:
        for hook in self._hooks.get(str(message.get("event")), ()):
            try:
                hook(self, message)
            except Exception:
                log.exception("event hook for %s failed", message.get("event"))
        for sink in self._sinks:
            sink(message)

    # -- configuration ---------------------------------------------------

    @property
    def phase(self) -> Phase:
        return Phase.MACHINE_READY if self.machine is not None else Phase.NO_MACHINE

    def commit(self, new: Config) -> None:
        """Make ``new`` the configuration, durably; then drop unused descriptors."""
        self.store.commit(new.documents())
        self.config = new
        names, sets = self.fds_in_use()
        self.fds.collect_unused(names, sets)

    def fds_in_use(self) -> tuple[set[str], set[int]]:
        """The getfd names and the fdsets the configuration refers to."""
        names: set[str] = set()
        sets: set[int] = set()
        for resource in self.config.resources:
            if resource.kind in (Kind.NETDEV, Kind.CHARDEV):
                names.update(fd_names(resource.args))
            sets |= fdset_ids(resource.args)
        return names, sets

    # -- capabilities ----------------------------------------------------

    def start_probe(self) -> None:
        """Load (or probe) engine capabilities in the background."""
        if self._caps_task is None:
            self._caps_task = asyncio.get_running_loop().create_task(self._load_caps())

    async def capabilities(self) -> Capabilities | None:
        """None when the engine binary is missing: checks fall back to the engine."""
        self.start_probe()
        assert self._caps_task is not None
        return await asyncio.shield(self._caps_task)

    async def engine_schema(self) -> Schema | None:
        """The engine's QAPI schema, for checking its commands; None without an engine."""
        self.warm_up()
        assert self._schema_task is not None
        return await asyncio.shield(self._schema_task)

    def warm_up(self) -> None:
        """Build the engine's schema checker now, in a thread (~150 ms of CPU),
        rather than on the first command that needs it (a client waits then)."""
        if self._schema_task is None:
            self._schema_task = asyncio.get_running_loop().create_task(self._build_schema())

    async def _build_schema(self) -> Schema | None:
        if self.settings.schema is not None:  # the command line's typing built it
            return self.settings.schema
        caps = await self.capabilities()
        if caps is None:
            return None
        from qmpvm.qapi.check import Schema

        return await asyncio.to_thread(lambda: Schema(caps.schema_entries()))

    async def _load_caps(self) -> Capabilities | None:
        if self.settings.capabilities is not None:  # loaded once per process, not twice
            return self.settings.capabilities
        from qmpvm.engine.caps_loader import ProbeError, load_or_probe

        try:
            return await load_or_probe(self.settings.binary, self.settings.cache_dir)
        except ProbeError as err:
            log.warning("engine capabilities unavailable: %s", err)
            return None

    # -- the engine ------------------------------------------------------

    async def forward(self, name: str, arguments: Mapping[str, object]) -> object:
        return await self.engine().execute(name, arguments)

    def engine(self) -> EngineMachine:
        if self.machine is None:
            raise EngineError("There is no machine: run machine-init first")
        return self.machine

    async def init_machine(self, config: Config | None = None, *, incoming: bool = False) -> None:
        """Start the engine on ``config`` (the committed one by default);
        ``incoming``: to load its state from a migration stream, not boot."""
        from qmpvm.engine.machine import EngineMachine
        from qmpvm.engine.process import may_give_own_root, may_switch_user
        from qmpvm.host.opening import open_for_engine

        caps = await self.capabilities()
        self.status = "inmigrate" if incoming else "prelaunch"
        self.last_exit = None
        config = config or self.config
        consoles = await self.consoles.open_all(config)
        host = None
        try:
            host = open_for_engine(
                config,
                consoles,
                unprivileged=may_switch_user(),
                own_root=may_give_own_root(caps.binary if caps else self.settings.binary),
                shared=(str(self.consoles.directory()),),
            )
            self.machine = await EngineMachine.start(
                config,
                self.fds,
                caps,
                self.settings,
                incoming=incoming,
                host=host,
                on_event=self.relay,
                on_exit=self._engine_exited,
            )
            if self.settings.state_dir is not None:  # the engine may outlive qmpvm
                from qmpvm.host.parking import Parking

                await self.consoles.start_parking(Parking(self.machine))
        except BaseException:
            self.consoles.close_all(remove=True)
            raise
        finally:
            if host is not None:
                host.close()  # the engine has its own copies now

    async def reattach(self) -> bool:
        """Take over the engine an earlier qmpvm left running in the state
        directory (``--state-dir``); True if there was one.  One that exited
        while no qmpvm watched is reported in ``last_exit``."""
        state_dir = self.settings.state_dir
        if state_dir is None:
            return False
        from qmpvm.engine import record
        from qmpvm.engine.machine import EngineMachine, EngineStderr

        left = record.EngineRecord.load(state_dir)
        machine = await EngineMachine.attach(
            state_dir, on_event=self.relay, on_exit=self._engine_exited
        )
        if machine is None:
            if left is not None:
                record.remove(state_dir)
                self.status = "shutdown"
                self.last_exit = {
                    "status": "shutdown", "exit-code": None, "signal": None,
                    "reason": f"the engine (pid {left.pid}) exited while no qmpvm watched it",
                    "stderr": "\n".join(EngineStderr(state_dir / record.LOG).lines()),
                }  # fmt: skip
                log.warning("%s", self.last_exit["reason"])
            return False
        self.machine = machine
        from qmpvm.host.parking import Parking

        parking = Parking(machine)
        parked = parking.take_back()
        await self.consoles.open_all(self.config, taken_over=machine.consoles_dir, parked=parked)
        await self.consoles.start_parking(parking)
        await self._take_back_fdsets(machine)
        await _find_port_users(machine)
        log.info("took over the engine (pid %d) left running in %s", machine.pid, state_dir)
        status = await machine.execute("query-status", {})
        if isinstance(status, dict) and status.get("status") == "shutdown":
            machine.saw_guest_shutdown = True  # it powered off while no qmpvm watched
            self.after_shutdown()
        return True

    async def _take_back_fdsets(self, machine: EngineMachine) -> None:
        """The fdsets the configuration uses, copied back from the engine the
        earlier qmpvm passed them to: a machine rebuilt later needs them.
        (Descriptors passed with getfd are the engine's netdevs' and chardevs'
        own by now, with no name left to find them by.)"""
        from qmpvm.engine.process import WatchedProcess
        from qmpvm.fds import MACHINE

        _names, wanted = self.fds_in_use()
        if not wanted or not isinstance(machine.process, WatchedProcess):
            return
        found = await machine.execute("query-fdsets", {})
        for fdset in found if isinstance(found, list) else []:
            if fdset.get("fdset-id") not in wanted:
                continue
            for entry in fdset.get("fds", []):
                try:
                    fd = machine.process.copy_fd(int(entry["fd"]))
                except OSError as err:
                    log.warning("fdset %s: cannot copy it back from the engine: %s",
                                fdset["fdset-id"], err)  # fmt: skip
                    continue
                self.fds.add_fd(fd, MACHINE, int(fdset["fdset-id"]), entry.get("opaque"))

    async def let_go_engine(self) -> None:
        """Leave the engine running for the next qmpvm on this state directory."""
        machine = self.machine
        if machine is not None:
            await machine.let_go()
        self.consoles.close_all(remove=False)

    def _engine_exited(self, machine: EngineMachine, info: dict[str, object]) -> None:
        if self.machine is not machine:
            return
        self.machine = None
        self.consoles.engine_gone()
        self.status = str(info["status"])
        self.last_exit = info
        log.info("engine exited: %s", info)
        self.emit("ENGINE_EXIT", info)

    def after_shutdown(self) -> None:
        """The guest powered off, and its engine, held paused (``-action
        shutdown=pause``, for an engine that outlives qmpvm) waits: with the
        consoles' FIFOs open here, their last output is safe, so it is ended
        as QEMU would have ended."""
        machine = self.machine
        if machine is None or not (machine.holds_on_shutdown and machine.saw_guest_shutdown):
            return
        task = asyncio.get_running_loop().create_task(machine.stop())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def stop_engine(self, *, by_signal: bool = False, kill: bool = False) -> None:
        machine = self.machine
        if machine is not None:
            await machine.stop(by_signal=by_signal, kill=kill)


async def _find_port_users(machine: EngineMachine) -> None:
    """Which hot-plug ports hold a device: asked of an engine taken over."""
    if not machine.hotplug_ports:
        return  # also no PCI to ask (microvm, none)
    try:
        buses = await machine.execute("query-pci", {})
    except EngineError as err:
        log.warning("cannot tell which hot-plug ports are in use: %s", err.desc)
        return
    for bus in buses if isinstance(buses, list) else []:
        for device in bus.get("devices", []):
            port = device.get("qdev_id")
            bridge = device.get("pci_bridge") or {}
            below = bridge.get("devices") or []
            if port in machine.hotplug_ports and below:
                machine.port_users[port] = str(below[0].get("qdev_id") or "(no id)")
