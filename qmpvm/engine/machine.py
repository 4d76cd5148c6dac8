"""The running engine: one supervised QEMU process and its private link.

Theory of operation: ``start`` builds the launch plan from the store, hands
the engine a socketpair end as its only monitor, waits for the greeting and
applies the settings that have no command-line form (link state).  Any
failure on the way kills the process and raises EngineError carrying what
the engine printed, so a failed machine-init leaves nothing behind.

A supervisor task waits for the process to exit and for the link to drain
its last events, then reports once through ``on_exit``: status ``shutdown``
when the guest powered off (the engine sent SHUTDOWN) or on ``quit``,
``internal-error`` otherwise.  The engine gets PR_SET_PDEATHSIG, so it dies
with qmpvm even on SIGKILL (``qmpvm.engine.process``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qmpvm.config.machine import MachineConfig, as_object
from qmpvm.config.model import Config
from qmpvm.engine import cgroup, record
from qmpvm.engine import process as engine_process
from qmpvm.engine.launch import build_launch
from qmpvm.engine.settings import EngineSettings
from qmpvm.errors import EngineError
from qmpvm.fds import FdRegistry

if TYPE_CHECKING:
    from qmpvm.engine.caps import Capabilities
    from qmpvm.engine.cgroup import EngineCgroup
    from qmpvm.engine.link import EngineLink
    from qmpvm.host.opening import EngineFiles

log = logging.getLogger(__name__)

_ALIAS = re.compile(r"(?:/dev/fdset|/proc/self/fd)/\d+")
"""How the engine names a descriptor qmpvm opened for it (``aliases``)."""
STDERR_LINES = 50
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
QUERY_TIMEOUT = float(os.environ.get("QMPVM_QUERY_TIMEOUT", "30"))
"""Seconds a query may wait for the engine (the environment may set it)."""


class EngineMachine:
    def __init__(
        self,
        process: engine_process.EngineProcess,
        link: EngineLink,
        *,
        accel: str,
        hotplug_ports: Sequence[str],
        stderr: EngineStderr,
        on_exit: Callable[[EngineMachine, dict[str, object]], None],
    ) -> None:
        self.process = process
        self.link = link
        self.accel = accel
        self.hotplug_ports = tuple(hotplug_ports)
        self.port_users: dict[str, str] = {}  # hot-plug port -> device id
        self._stderr = stderr
        self._on_exit = on_exit
        self.saw_shutdown = False
        self.saw_guest_shutdown = False  # the guest powered off (not a quit, a signal)
        self.holds_on_shutdown = False  # then it pauses (-action shutdown=pause), not exits
        self.stopping = False
        self.final_status: str | None = None  # the status once it is gone, if not its own
        self.memory_from: str | None = None  # a snapshot whose RAM it maps copy-on-write
        self.state_dir: Path | None = None  # where its record is kept, if it outlives qmpvm
        self.cgroup: EngineCgroup | None = None  # its own, removed when it is gone
        self.cgroup_why: str | None = None  # why it has none
        self.user_why: str | None = None  # why it runs as qmpvm's user
        self.root_why: str | None = None  # why it sees the host's file system
        self.aliases: dict[str, str] = {}  # a descriptor's name it was given -> the path
        self.consoles_dir: Path | None = None  # the FIFOs of consoles qmpvm serves
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(
        cls,
        config: Config,
        fds: FdRegistry,
        caps: Capabilities | None,
        settings: EngineSettings,
        *,
        incoming: bool = False,
        host: EngineFiles | None = None,
        on_event: Callable[[dict[str, object]], None],
        on_exit: Callable[[EngineMachine, dict[str, object]], None],
    ) -> EngineMachine:
        """Launch the engine; with ``settings.state_dir`` one that outlives qmpvm,
        its monitor listening in the state directory for whichever qmpvm comes;
        ``host``: the files qmpvm opened for it, and the user it runs as."""
        from qmpvm.engine.host import choose_accel  # looks at the host: only when needed

        accel = choose_accel(config.machine.accel, runs_guest_code=config.machine.type != "none")
        keep = settings.state_dir
        try:
            ours, theirs = _link_sockets(keep)
        except OSError as err:  # e.g. out of descriptors: the client's error, not ours
            raise EngineError(f"cannot start the engine: {err.strerror}") from err
        try:
            fdsets = {i: [e.fd for e in entries] for i, entries in fds.fdsets.items()}
            plan = build_launch(
                host.config if host else config,
                binary=caps.binary if caps else settings.binary,
                accel=accel,
                link_fd=theirs.fileno(),
                named_fds={name: entry.fd for name, entry in fds.named.items()},
                fdsets={**fdsets, **(host.fdsets if host else {})},
                incoming=incoming,
                link_listens=keep is not None,
                spawn=settings.allow_host_programs,
                consoles=host.serves_consoles if host else False,
                inherited=host.inherited if host else (),
                opaques={
                    e.fd: e.opaque
                    for entries in fds.fdsets.values()
                    for e in entries
                    if e.opaque is not None
                },
            )
        except BaseException:
            ours.close()
            theirs.close()
            raise
        log.info("launching engine: %s", " ".join(plan.argv))
        stderr = EngineStderr(keep / record.LOG if keep else None)
        try:
            process = await _launch(plan.argv, plan.pass_fds, stderr, host.run_as if host else None)
        except OSError as err:
            ours.close()
            raise EngineError(f"cannot start the engine '{plan.argv[0]}': {err}") from err
        finally:
            theirs.close()
        stderr_task = asyncio.get_running_loop().create_task(stderr.collect(process))
        deliver = _Events(on_event)
        group, group_why = None, None

        # Imported only now, while the engine starts: qmpvm waits for that anyway.
        from qmpvm.engine.link import EngineLink

        try:
            group, group_why = _cgroup(process.pid, config.machine)
            if keep is not None:
                await asyncio.get_running_loop().sock_connect(ours, str(keep / record.SOCKET))
            link = await EngineLink.open(ours, on_event=deliver, timeout=START_TIMEOUT)
            machine = deliver.machine = cls(
                process,
                link,
                accel=accel,
                hotplug_ports=plan.hotplug_ports,
                stderr=stderr,
                on_exit=on_exit,
            )
            machine.holds_on_shutdown = plan.holds_on_shutdown
            for name, arguments in plan.after_start:
                await link.execute(name, arguments)
        except (EngineError, OSError) as err:
            await _kill(process)
            await asyncio.wait_for(stderr_task, 2)
            ours.close()
            if group is not None:
                group.remove()
            raise EngineError(_failure_text(err, stderr.lines())) from err
        machine.state_dir = keep
        machine.cgroup, machine.cgroup_why = group, group_why
        if host is not None:
            machine.aliases, machine.user_why = dict(host.aliases), host.user_why
            machine.root_why = host.root_why
            machine.consoles_dir = Path(host.consoles_dir) if host.consoles_dir else None
        machine.save_record()
        machine._supervisor = asyncio.get_running_loop().create_task(
            machine._supervise(stderr_task)
        )
        return machine

    @classmethod
    async def attach(
        cls,
        state_dir: Path,
        *,
        on_event: Callable[[dict[str, object]], None],
        on_exit: Callable[[EngineMachine, dict[str, object]], None],
    ) -> EngineMachine | None:
        """The engine an earlier qmpvm left running in ``state_dir``, taken over;
        None if there is none (its record is gone, or names a process that is
        no longer it).  EngineError if it runs but does not answer."""
        found = record.EngineRecord.load(state_dir)
        if found is None or not found.is_running():
            return None
        try:
            process = engine_process.WatchedProcess(found.pid)
        except ProcessLookupError:
            return None
        deliver = _Events(on_event)

        from qmpvm.engine.link import EngineLink

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(state_dir / record.SOCKET))
            link = await EngineLink.open(sock, on_event=deliver, timeout=START_TIMEOUT)
        except (EngineError, OSError) as err:
            sock.close()
            process.let_go()
            said = f"the engine (pid {found.pid}) runs but does not answer: {err}"
            raise EngineError(said) from err
        stderr = EngineStderr(state_dir / record.LOG)
        machine = deliver.machine = cls(
            process,
            link,
            accel=found.accel,
            hotplug_ports=found.hotplug_ports,
            stderr=stderr,
            on_exit=on_exit,
        )
        machine.state_dir = state_dir
        machine.memory_from = found.memory_from
        machine.aliases, machine.user_why = dict(found.aliases), found.user_why
        machine.root_why = found.root_why
        machine.consoles_dir = Path(found.consoles_dir) if found.consoles_dir else None
        machine.holds_on_shutdown = found.holds_on_shutdown
        if found.cgroups:
            machine.cgroup = cgroup.EngineCgroup(tuple(Path(p) for p in found.cgroups))
        machine._supervisor = asyncio.get_running_loop().create_task(
            machine._supervise(asyncio.get_running_loop().create_task(stderr.collect(process)))
        )
        return machine

    def save_record(self) -> None:
        """What the next qmpvm needs to take this engine over (an outliving one)."""
        if self.state_dir is None:
            return
        found = record.identity(self.pid)
        if found is None:
            return
        record.EngineRecord(
            pid=self.pid,
            start_time=found[0],
            executable=found[1],
            accel=self.accel,
            hotplug_ports=self.hotplug_ports,
            memory_from=self.memory_from,
            holds_on_shutdown=self.holds_on_shutdown,
            aliases=self.aliases,
            user_why=self.user_why,
            root_why=self.root_why,
            consoles_dir=str(self.consoles_dir) if self.consoles_dir else None,
            cgroups=tuple(str(p) for p in self.cgroup.paths) if self.cgroup else (),
        ).save(self.state_dir)

    async def let_go(self) -> None:
        """Leave the engine running for the next qmpvm: the link closes (the
        engine's monitor listens again) and the record stays."""
        if self._supervisor is not None:
            self._supervisor.cancel()
        await self.link.close()
        if isinstance(self.process, engine_process.WatchedProcess):
            self.process.let_go()

    def _event(self, message: dict[str, object]) -> bool:
        """Note what the engine tells; False: clients are not to hear it (after
        the guest's power-off, the pause of qmpvm's shutdown action and the
        SHUTDOWN of the quit that ends the engine: QEMU itself sends neither)."""
        name = message.get("event")
        held = self.saw_guest_shutdown and self.holds_on_shutdown
        if name == "SHUTDOWN":
            self.saw_shutdown = True
            data = message.get("data")
            if isinstance(data, dict) and data.get("guest") is True:
                self.saw_guest_shutdown = True
        return not (held and name in ("STOP", "SHUTDOWN"))

    async def execute(
        self, name: str, arguments: Mapping[str, object] | None = None, *, fds: Sequence[int] = ()
    ) -> object:
        """The engine's answer, with the names of descriptors qmpvm opened for
        it given back as the paths they stand for; a query it does not answer
        in ``QUERY_TIMEOUT`` (a stopped or stuck engine) is an error, so no
        client waits for ever."""
        try:
            if not name.startswith("query-"):
                return self._unalias(await self.link.execute(name, arguments, fds=fds))
            async with asyncio.timeout(QUERY_TIMEOUT):
                return self._unalias(await self.link.execute(name, arguments, fds=fds))
        except TimeoutError:
            raise EngineError(
                f"The engine did not answer '{name}' in {QUERY_TIMEOUT:g} s "
                f"(pid {self.pid}: stopped or stuck?)"
            ) from None
        except EngineError as err:
            err.desc = str(self._unalias(err.desc))
            raise

    def _unalias(self, value: object) -> object:
        if not self.aliases:
            return value
        if isinstance(value, str):
            return _ALIAS.sub(lambda m: self.aliases.get(m.group(0), m.group(0)), value)
        if isinstance(value, list):
            return [self._unalias(item) for item in value]
        if isinstance(value, dict):
            return {key: self._unalias(item) for key, item in value.items()}
        return value

    async def ended(self) -> bool:
        """Whether the engine has exited and been reported, waiting up to
        ``QUERY_TIMEOUT`` for that: a link that closed mid-command is an
        engine on its way out, and its exit report follows shortly."""
        if self._supervisor is None or not self.link.closed:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._supervisor), QUERY_TIMEOUT)
        return self._supervisor.done()

    async def stop(self, *, by_signal: bool = False, kill: bool = False) -> None:
        """Ask the engine to quit (``by_signal``: with SIGTERM, so that its
        clients hear SHUTDOWN "host-signal", as when QEMU itself gets one);
        kill it if it does not.  ``kill``: at once, with no clean-up of its own
        (after a migration to this host, the socket files it would remove are
        the destination's)."""
        self.stopping = True
        if self.process.returncode is None:
            if kill:
                await _kill(self.process)
            elif by_signal:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
            else:
                with contextlib.suppress(EngineError, OSError):
                    await asyncio.wait_for(self.link.execute("quit"), STOP_TIMEOUT)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                await _kill(self.process)
        if self._supervisor is not None:
            await self._supervisor

    async def _supervise(self, stderr_task: asyncio.Task[None]) -> None:
        code = await self.process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.link.wait_closed(), 2)
        await self.link.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stderr_task, 2)
        if self.state_dir is not None:
            record.remove(self.state_dir)
        if self.cgroup is not None:
            self.cgroup.remove()
        known = code is not None
        clean = (code == 0 or not known) and (self.saw_shutdown or self.stopping)
        info: dict[str, object] = {
            "status": self.final_status or ("shutdown" if clean else "internal-error"),
            "exit-code": code if code is not None and code >= 0 else None,
            "signal": signal.Signals(-code).name if code is not None and code < 0 else None,
            "reason": _exit_reason(code, self.saw_guest_shutdown, self.stopping),
            "stderr": "\n".join(self._stderr.lines()),
        }
        self._on_exit(self, info)


def _cgroup(pid: int, machine: MachineConfig) -> tuple[EngineCgroup | None, str | None]:
    """The engine's own cgroup, and why it has none.  Limits the configuration
    sets must hold: a host that cannot give them fails the machine."""
    if as_object(machine.get("confine")).get("cgroup", True) is False:
        return None, 'machine-set {"confine": {"cgroup": false}} lifted it'
    limits = as_object(machine.get("limits"))
    try:
        return cgroup.create(pid, limits), None
    except OSError as err:
        why = f"the host's cgroups cannot be written: {err.strerror or err}"
        if limits:
            raise EngineError(f"the engine's limits cannot be set: {why}") from err
        log.info("engine without a cgroup of its own: %s", why)
        return None, why


class _Events:
    """The link's event handler: engine events reach qmpvm (``on_event``) once
    the machine that notes them first exists."""

    def __init__(self, on_event: Callable[[dict[str, object]], None]) -> None:
        self.machine: EngineMachine | None = None
        self._on_event = on_event

    def __call__(self, message: dict[str, object]) -> None:
        if self.machine is None or self.machine._event(message):
            self._on_event(message)


class EngineStderr:
    """What the engine wrote on stderr: read from a pipe into memory, or, for
    an engine that outlives qmpvm, written to its log file and read from there."""

    def __init__(self, log_path: Path | None) -> None:
        self.log_path = log_path
        self._lines: deque[str] = deque(maxlen=STDERR_LINES)

    def target(self) -> int:
        """The engine's stderr: the log file (opened afresh), or a pipe."""
        if self.log_path is None:
            return asyncio.subprocess.PIPE
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        return os.open(self.log_path, flags, 0o600)

    async def collect(self, process: engine_process.EngineProcess) -> None:
        stream = getattr(process, "stderr", None)
        if self.log_path is not None or not isinstance(stream, asyncio.StreamReader):
            return
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            log.info("engine: %s", line)
            self._lines.append(line)

    def lines(self) -> list[str]:
        if self.log_path is None:
            return list(self._lines)
        try:
            with self.log_path.open("rb") as stream:
                stream.seek(max(0, stream.seek(0, os.SEEK_END) - 16384))
                text = stream.read().decode(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-STDERR_LINES:]


def _link_sockets(state_dir: Path | None) -> tuple[socket.socket, socket.socket]:
    """(qmpvm's end, the engine's): a connected pair, or, for an engine that
    outlives qmpvm, a socket to connect and one listening in ``state_dir``."""
    if state_dir is None:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    path = state_dir / record.SOCKET
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # an engine's that is gone: the state directory is locked
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listening.bind(str(path))
        listening.listen(4)
        ours = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        listening.close()
        raise
    ours.setblocking(False)
    return ours, listening


async def _launch(
    argv: Sequence[str],
    pass_fds: Sequence[int],
    stderr: EngineStderr,
    run_as: engine_process.RunAs | None,
) -> engine_process.EngineProcess:
    target = stderr.target()
    if stderr.log_path is None:
        return await engine_process.start(
            argv, stdout=asyncio.subprocess.DEVNULL, stderr=target, pass_fds=pass_fds,
            run_as=run_as,
        )  # fmt: skip
    try:
        child = engine_process.spawn_outliving(
            argv, stderr=target, pass_fds=pass_fds, run_as=run_as
        )
    finally:
        os.close(target)
    return engine_process.WatchedProcess(child.pid, child)


def _exit_reason(code: int | None, guest_shut_down: bool, stopping: bool) -> str:
    if guest_shut_down and code in (0, None):
        return "guest shut down"  # also when qmpvm ended the engine it held after it
    if stopping:
        return "stopped by qmpvm"
    if code is None:
        return "engine exited (started by an earlier qmpvm: its exit status is unknown)"
    if code < 0:
        return f"engine killed by {signal.Signals(-code).name}"
    return f"engine exited with status {code}"


def _failure_text(err: Exception, stderr: Sequence[str]) -> str:
    said = " ".join(line.strip() for line in stderr if line.strip())
    return f"machine-init failed: {said}" if said else f"machine-init failed: {err}"


async def _kill(process: engine_process.EngineProcess) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    await process.wait()
