"""Restarting qmpvm under a running guest (``--state-dir``): how soon a new
qmpvm answers for the engine an earlier one left running, and whether the
guest notices.

One guest, booted once: qmpvm started with the test guest on its command
line (as ``tests/interop/test_machine_state.py`` ``guest_options`` gives
it: q35, TCG, 1 vCPU, 256 MiB, ``qmpvm.images.build_guest()`` with
``guest_cmdline("q35")``, ttyS0 on a UNIX socket chardev, which qmpvm
serves itself: the engine writes to FIFOs qmpvm reads, see
``qmpvm/host/consoles.py``)::

    python -m qmpvm -qmp unix:Q,server=on,wait=off --state-dir STATE
      -machine q35 -accel tcg -m 256 -nodefaults -kernel K -initrd I
      -append "console=ttyS0 panic=-1 quiet"
      -chardev socket,id=ser0,path=S,server=on,wait=off -serial chardev:ser0

Timed once: that cold boot, Popen -> :data:`qmpvm.images.READY_MARKER` on
the console (the peer of a restart: what it would cost if the guest had to
boot again).  Then the guest shell's ticker (as ``start_ticker`` of the
tests, the counter in the shell's memory, but each line also carries the
guest's own clock: ``TICK <token> <n> <uptime>`` every 0.2 s, from
``read up idle < /proc/uptime`` and ``usleep 200000``) runs for the whole
benchmark.  A console client in a thread of its own (its own event loop, so
nothing the timing loop does delays it) reads it, recording each TICK
line's arrival (``time.monotonic()``).  qmpvm closes console clients when it
dies or leaves, and the next qmpvm binds the socket again during the
takeover, so the client connects again after every restart (retried every
2 ms while the path is missing or refuses).

Then ``--runs`` (10) rounds, alternating two ways to leave:

* even rounds (0, 2, ...): ``kill -9`` of qmpvm (SIGKILL to its pid; its
  client connection still open);
* odd rounds: QMP ``quit {"keep-machine": true}``, timed from the request
  written to qmpvm's exit (seen on a pidfd);

then in both: the monitor socket file is removed if qmpvm left it (a killed
qmpvm does), and a new qmpvm is started on the same state directory::

    python -m qmpvm -qmp unix:Q,server=on,wait=off --state-dir STATE --preconfig

and timed from its ``Popen`` to (1) the QMP greeting read from a raw UNIX
socket (connect retried every 1 ms while the file is missing or refuses),
(2) ``qmp_capabilities`` answered and (3) the reattached monitor answering:
``query-status`` returning ``running`` (the timed figure, "restart ->
answering"; QMP over a raw socket, one JSON line per message, no qemu.qmp).
Not timed, then checked every round: ``query-machine`` shows the same
``engine.pid``.  Also read: qmpvm's own CPU time up to that answer
(/proc/PID/stat, utime + stime).  Rounds are ``--pause`` (0.5 s) apart, so
that every restart has ticks before and after it.  After the pause, the
console's delivery (informative): the first console connection opened
once the old qmpvm was gone, and the first TICK line read on it, both in
ms from the new qmpvm answering (negative: before it).

At the end, ``console-history {"device": "ser0"}`` of the last qmpvm gives
every byte the guest printed, also the lines printed while no qmpvm ran
(they wait in the FIFO and the next qmpvm delivers them) and those that
reached no client.  Then the last qmpvm gets a plain ``quit`` (which stops
the engine too); the benchmark waits until both are gone, checks the
engine's pid is no longer a running process, and removes its work
directory (a private one in /tmp, mode 0711 since the engine, running as
nobody, opens the consoles' FIFOs in it; qmpvm runs with TMPDIR inside
it).  Every process it starts runs in its own process group and is ended
on exit, on errors and on SIGTERM (``benchmarks/processes.py``); the
engine, which qmpvm starts in a session of its own, is ended by pid
(through a pidfd, after checking its start time) if anything goes wrong.

Printed: each round; then medians (min .. max) of restart -> greeting and
restart -> answering (all rounds, and per way of leaving), quit -> exit,
the outage a client sees (kill or quit request -> the new qmpvm
answering), a reference (``python -c pass``, Popen -> exit, 5 times: the
interpreter's own start), the console's reconnection and first TICK line
after each restart; the ticks, all from the history: how many, whether any
counter value is missing, repeated or out of order, whether every line
read live is in it, the longest gap in the guest's clock between two
consecutive ticks (and whether it fell inside a restart, from the kill or
quit to the answer, the guest's clock put on the host's by the smallest
arrival - uptime of the lines read live), the longest outside restarts,
and the guest's clock against the host's from the first to the last line
read live (a guest paused by its engine would not count the pause in its
uptime; this would show it); and last the ratios: restart -> answering /
150 ms goal, restart -> answering / cold boot, longest guest gap / 0.2 s
and longest guest gap / cold boot.

qmpvm runs with the environment as is (but TMPDIR); ``--pyc`` gives it a
private .pyc cache, as in benchmarks/boot.py.

Command::

    .venv/bin/python benchmarks/reattach.py             # 10 rounds (~15 s)
    .venv/bin/python benchmarks/reattach.py --quick     # 3 rounds, smoke run (~8 s)
    .venv/bin/python benchmarks/reattach.py --runs 20 --pause 1 --pyc

Measured here, 2026-12-02 00:23 UTC, at commit 7a3bb72 (2 cores, QEMU
7.2.22, TCG, CPython 3.11.7, just after a test suite run, load average
0.35; default run, 15 s)::

    cold boot, Popen -> ready marker            4.209 s (once)
    restart, Popen -> greeting                  28 ms (21 .. 33)
                   -> qmp_capabilities          139 ms (111 .. 157)
                   -> query-status "running"    233 ms (197 .. 254)
                      after kill -9 230 ms, after quit keep-machine 236 ms
        qmpvm's CPU up to that answer 215 ms; python -c pass alone 15 ms
    quit keep-machine: reply 1 ms, qmpvm exits 49 ms (43 .. 67) after it
    outage a client sees (kill/quit -> answering) 269 ms (201 .. 308)
    console, from the answer: connected -8 ms (-12 .. -0), first TICK
        line 81 ms (4 .. 195)
    ticks (history): 43, counter 0 .. 42, none missing, 11 printed while
        qmpvm was away; longest gap in the guest's clock 220 ms (median
        210 ms), 220 ms both overlapping restarts and outside them; the
        guest's clock 8.75 s over 8.75 s of the host's
    ratios: answering / 150 ms goal 1.556 (missed), answering / cold boot
        0.055, longest guest gap / 0.2 s 1.100, / cold boot 0.052

Two more runs a minute later (load ~0.3): answering 194 ms (163 .. 219)
and 185 ms (157 .. 237, ``--pyc``), qmpvm's CPU 175 and 165 ms; goal
ratios 1.29 and 1.23.  The guest never noticed: no counter value was
missing in any run, the gap in its clock between two ticks was 210-220 ms
(``usleep 200000`` and the loop; ``/proc/uptime`` counts in 10 ms steps),
the same inside and outside the restarts.  Console clients connect again
0-15 ms before ``query-status`` answers; the lines the guest printed while
no qmpvm ran are read from the FIFO during the takeover, before that (into
the history), so the first line a client reads is the guest's next one,
0-200 ms later.

Where the restart's time goes (2026-12-01, before the consoles moved to
qmpvm; ``-v -v`` logs of restarts, timestamps against the Popen;
``-X importtime``): the interpreter starts in ~15 ms and
the early monitor greets at ~25 ms; the asyncio server takes the socket
over at ~115-120 ms (importing ``qmpvm.cli``, most of it
``qmpvm.cli.translate``, then ``qmpvm.app`` with asyncio), which is when
``qmp_capabilities`` is answered; the control plane (``qmpvm.commands``,
the Vmm, the store) loads only then, and the takeover starts once it is
loaded: the engine's monitor greets at ~175-185 ms; the takeover itself
(``qmp_capabilities``, ``query-pci`` for the hot-plug ports) takes ~10 ms
and the ``query-status`` round trip ~1 ms.  qmpvm's CPU time up to the
answer is ~90% of the wall time: the cost is Python imports, done one
after the other, not waiting on the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processes import bytecode_env, cpu_seconds, exit_on_sigterm, loadavg, spawn, stop, stop_all

from qmpvm.engine.record import EngineRecord, identity
from qmpvm.images import READY_MARKER, GuestImage, build_guest, guest_cmdline
from qmpvm.tools.console import SocketConsole

BOOT_TIMEOUT = 120.0
TIMEOUT = 30.0
TICK_PERIOD = 0.2
GOAL = 0.150  # restart -> answering, seconds
TICK = re.compile(r"TICK ([0-9a-f]+) (\d+) (\d+\.\d+)")
CONSOLE_RETRY = 0.002  # seconds between connects while the console is away

Figures = dict[str, float]


def now() -> float:
    return time.monotonic()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def signed(seconds: float) -> str:
    return f"{seconds * 1000:+.0f} ms"


def spread(values: list[float], unit: str = "ms") -> str:
    """Median (min .. max) of seconds, shown in ms or s."""
    if not values:
        return "n/a"
    scale, digits = (1000.0, 0) if unit == "ms" else (1.0, 3)
    low, mid, high = (v * scale for v in (min(values), statistics.median(values), max(values)))
    return f"{mid:.{digits}f} {unit} ({low:.{digits}f} .. {high:.{digits}f})"


def stderr_tail(process: subprocess.Popen[bytes] | None) -> str:
    if process is None or process.poll() is None or process.stderr is None:
        return ""
    with contextlib.suppress(ValueError, OSError):
        return process.stderr.read().decode(errors="replace")[-1000:]
    return ""


# -- the console: reconnected after every restart, in a thread of its own ----------


class StampedConsole(SocketConsole):
    """A SocketConsole that stamps every TICK line with its arrival time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.ticks: list[tuple[float, str, int, float]] = []  # (arrival, token, counter, uptime)
        self._partial = ""

    async def read(self) -> str:
        text = await super().read()
        stamp = now()
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            found = TICK.search(line)
            if found:
                token, counter, uptime = found.groups()
                self.ticks.append((stamp, token, int(counter), float(uptime)))
        return text


@dataclass
class Connection:
    """One connection to the console: to the qmpvm that served it then."""

    opened: float  # monotonic time the connect returned
    console: StampedConsole
    closed: float | None = None  # EOF or reset seen (qmpvm left), or our close

    def first_tick(self, token: str, after: float = 0.0) -> float | None:
        ticks = list(self.console.ticks)
        return next((t for t, tok, _n, _up in ticks if tok == token and t > after), None)


class Ticker(threading.Thread):
    """Connects to the console, waits for the boot, starts the ticker and reads
    until told to stop, connecting again whenever qmpvm closes the console
    (it left); ``ready`` is set once the ticker runs (or on an error)."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="console", daemon=True)
        self.path = path
        self.ready = threading.Event()
        self.ready_at = 0.0  # monotonic time READY_MARKER was read
        self.token = ""
        self.connections: list[Connection] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # reported to the main thread
            self.error = err
        finally:
            self.ready.set()

    async def _connect(self) -> StampedConsole | None:
        """Connect, retried every 2 ms while the path is missing or refuses
        (no qmpvm serves it yet); None if told to stop meanwhile."""
        deadline = now() + (BOOT_TIMEOUT if not self.connections else TIMEOUT)
        while not self._halt.is_set():
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
                return StampedConsole(reader, writer)
            except (FileNotFoundError, ConnectionRefusedError):
                if now() > deadline:
                    raise TimeoutError(f"the console {self.path} did not come back") from None
                await asyncio.sleep(CONSOLE_RETRY)
        return None

    async def _main(self) -> None:
        while True:
            console = await self._connect()
            if console is None:
                return
            connection = Connection(now(), console)
            self.connections.append(connection)
            try:
                if not self.token:
                    await console.expect(READY_MARKER, BOOT_TIMEOUT)
                    self.ready_at = now()
                    self.token = await start_ticker(console)
                    self.ready.set()
                while not self._halt.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(console.read(), 0.1)
            except ConnectionError:  # qmpvm died or left: the next one serves it again
                if not self.token:
                    raise
            finally:
                connection.closed = now()
                await console.close()
            if self._halt.is_set():
                return

    def finish(self) -> None:
        self._halt.set()
        self.join(5)

    def ticks(self) -> list[tuple[float, int, float]]:
        """Every TICK line of our ticker read live: (arrival, counter, uptime)."""
        return [
            (t, n, up)
            for connection in list(self.connections)
            for t, token, n, up in list(connection.console.ticks)
            if token == self.token
        ]

    def delivery(self, gone: float, answered: float) -> tuple[float | None, float] | None:
        """The console after a restart: the connection that carried on through
        it (parked in the engine: None) or else the first opened after the old
        qmpvm was gone (when, in seconds from the new qmpvm answering), and
        its first TICK line after ``gone``, from answering too."""
        for connection in list(self.connections):
            kept = connection.opened < gone and (connection.closed or answered + 1) > answered
            if kept or connection.opened > gone:
                tick = connection.first_tick(self.token, after=gone)
                if tick is not None:
                    return None if kept else connection.opened - answered, tick - answered
        return None


async def start_ticker(console: SocketConsole) -> str:
    """As tests/interop/test_machine_state.py, but each line carries the
    guest's own clock: ``TICK <token> <n> <uptime>`` every 0.2 s."""
    token = os.urandom(8).hex()
    await console.run(f"T={token}; i=0")
    await console.write(
        "while :; do read up idle < /proc/uptime; echo TICK $T $i $up; i=$((i+1)); "
        "usleep 200000; done &\n"
    )
    await console.expect(f"TICK {token} 3 ", TIMEOUT)
    return token


# -- QMP over a raw socket ----------------------------------------------------------


class RawQMP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(
        cls, sock: Path, process: subprocess.Popen[bytes], started: float
    ) -> tuple[RawQMP, Figures]:
        """Connect (retried every 1 ms), read the greeting, negotiate; seconds
        from ``started`` to each step."""
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(sock), limit=1 << 24)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if process.poll() is not None:
                    raise RuntimeError(f"qmpvm exited with {process.returncode}") from None
                if now() - started > TIMEOUT:
                    raise TimeoutError(f"qmpvm did not listen in {TIMEOUT} s") from None
                await asyncio.sleep(0.001)
        marks = {"connected": now() - started}
        client = cls(reader, writer)
        greeting = await client.message()
        if "QMP" not in greeting:
            raise RuntimeError(f"not a greeting: {greeting}")
        marks["greeting"] = now() - started
        await client.execute("qmp_capabilities")
        marks["capabilities"] = now() - started
        return client, marks

    async def message(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
        if not line:
            raise EOFError("qmpvm closed the monitor")
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    async def send(self, name: str, arguments: dict[str, object] | None = None) -> None:
        request: dict[str, object] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self.writer.write(json.dumps(request).encode() + b"\n")
        await self.writer.drain()

    async def reply(self, name: str) -> Any:
        while True:
            message = await self.message()
            if "event" in message:
                continue
            if "error" in message:
                raise RuntimeError(f"{name}: {message['error']}")
            return message["return"]

    async def execute(self, name: str, arguments: dict[str, object] | None = None) -> Any:
        await self.send(name, arguments)
        return await self.reply(name)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


# -- processes ----------------------------------------------------------------------


async def exited(pid: int, timeout: float = TIMEOUT) -> float:
    """Wait until ``pid`` ends (a pidfd turns readable); the time it was seen."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return now()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(now())

    loop.add_reader(fd, readable)
    try:
        return await asyncio.wait_for(done, timeout)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


class Engine:
    """The engine, known by pid and start time: ended by pid if need be."""

    def __init__(self, pid: int) -> None:
        found = identity(pid)
        if found is None:
            raise RuntimeError(f"engine pid {pid} is not running")
        self.pid, self.identity = pid, found

    def running(self) -> bool:
        return identity(self.pid) == self.identity

    def kill(self) -> None:
        kill_checked(self.pid, self.identity)


def kill_checked(pid: int, expected: tuple[int, str]) -> None:
    """SIGKILL ``pid`` through a pidfd, if it is still the process ``expected``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if identity(pid) == expected:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)


def qmpvm_argv(sock: Path, state: Path, *rest: str) -> list[str]:
    return [sys.executable, "-m", "qmpvm", "-qmp", f"unix:{sock},server=on,wait=off",
            "--state-dir", str(state), *rest]  # fmt: skip


def guest_options(guest: GuestImage, console: Path) -> list[str]:
    return [
        "-machine", "q35", "-accel", "tcg", "-m", "256", "-nodefaults",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
        "-append", guest_cmdline("q35"),
        "-chardev", f"socket,id=ser0,path={console},server=on,wait=off",
        "-serial", "chardev:ser0",
    ]  # fmt: skip


# -- the run ------------------------------------------------------------------------


class Run:
    def __init__(self, work: Path, opts: argparse.Namespace) -> None:
        self.work, self.opts = work, opts
        self.sock = work / "qmp.sock"
        self.console_path = work / "ttyS0.sock"
        self.state = work / "state"
        env = bytecode_env(work / "pycache") if opts.pyc else dict(os.environ)
        self.env = dict(env, TMPDIR=str(work / "tmp"))
        # The engine runs as nobody: it opens the consoles' FIFOs, which qmpvm
        # makes in a directory of its own in TMPDIR, so the path must be open to it.
        work.chmod(0o711)
        (work / "tmp").mkdir(mode=0o711)
        self.process: subprocess.Popen[bytes] | None = None
        self.client: RawQMP | None = None
        self.engine: Engine | None = None
        self.ticker: Ticker | None = None
        self.rounds: list[Figures] = []
        self.windows: list[tuple[float, float, int]] = []  # restart: (left, answering, round)
        self.history: dict[str, Any] = {}  # console-history of ser0 at the end
        self.cold_boot = 0.0
        self.engine_gone = False
        self.engine_reaped = False

    async def boot(self) -> None:
        guest = build_guest()
        print(f"guest: kernel {guest.kernel_version}, initrd {guest.initrd}; "
              f"append {guest_cmdline('q35')!r}", flush=True)  # fmt: skip
        argv = qmpvm_argv(self.sock, self.state, *guest_options(guest, self.console_path))
        started = now()
        self.process = spawn(argv, self.env)
        self.ticker = Ticker(self.console_path)
        self.ticker.start()
        self.client, _marks = await RawQMP.connect(self.sock, self.process, started)
        machine = await self.client.execute("query-machine")
        self.engine = Engine(int(machine["engine"]["pid"]))
        deadline = started + BOOT_TIMEOUT + TIMEOUT
        while not self.ticker.ready.is_set():  # polled: a thread waiting would delay an exit
            if self.process.poll() is not None or now() > deadline:
                raise RuntimeError(f"the boot failed: qmpvm exit status {self.process.poll()}")
            await asyncio.sleep(0.05)
        if self.ticker.error is not None or not self.ticker.token:
            raise RuntimeError(f"console: {self.ticker.error!r}")
        self.cold_boot = self.ticker.ready_at - started
        print(f"cold boot, Popen -> {READY_MARKER}: {self.cold_boot:.3f} s; engine pid "
              f"{self.engine.pid}; ticker {self.ticker.token} running", flush=True)  # fmt: skip

    async def leave(self, how: str) -> Figures:
        """kill -9 or quit keep-machine: the old qmpvm gone, the engine running on."""
        process, client, engine = self.process, self.client, self.engine
        assert process is not None and client is not None and engine is not None
        out: Figures = {}
        if how == "kill":
            out["left"] = now()
            process.kill()
            out["exit"] = await exited(process.pid) - out["left"]
        else:
            out["left"] = now()
            await client.send("quit", {"keep-machine": True})
            await client.reply("quit")
            out["quit-reply"] = now() - out["left"]
            out["exit"] = await exited(process.pid) - out["left"]
            if process.wait() != 0:
                raise RuntimeError(f"quit keep-machine: qmpvm exited {process.returncode}")
        await client.close()
        self.client = None
        stop(process)
        self.process = None
        out["socket-left"] = float(self.sock.exists())
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()  # a killed qmpvm's: wait for the new one's
        if not engine.running():
            raise RuntimeError(f"the engine (pid {engine.pid}) ended with qmpvm ({how})")
        return out

    async def restart(self) -> Figures:
        assert self.engine is not None
        started = now()
        self.process = process = spawn(qmpvm_argv(self.sock, self.state, "--preconfig"), self.env)
        out: Figures = {"popen": now() - started}
        self.client, marks = await RawQMP.connect(self.sock, process, started)
        out.update(marks)
        status = await self.client.execute("query-status")
        out["answering"] = now() - started
        out["cpu"] = cpu_seconds(process.pid)
        if status.get("status") != "running":
            raise RuntimeError(f"query-status after the restart: {status}")
        out["answered-at"] = now()
        machine = await self.client.execute("query-machine")
        if machine["engine"]["pid"] != self.engine.pid:
            raise RuntimeError(f"another engine: {machine['engine']} (was {self.engine.pid})")
        return out

    async def rounds_(self) -> None:
        assert self.ticker is not None
        for n in range(self.opts.runs):
            how = "kill" if n % 2 == 0 else "quit"
            left = await self.leave(how)
            back = await self.restart()
            figures = {**left, **back, "outage": back["answered-at"] - left["left"]}
            self.rounds.append(figures)
            self.windows.append((left["left"], back["answered-at"], n))
            await asyncio.sleep(self.opts.pause)  # ticks after the restart
            if self.ticker.error is not None:
                raise RuntimeError(f"console: {self.ticker.error!r}")
            found = self.ticker.delivery(left["left"] + left["exit"], back["answered-at"])
            if found is not None:
                back_at, figures["delivery"] = found
                figures["console-kept"] = back_at is None
                if back_at is not None:
                    figures["console-back"] = back_at
            quit_part = (
                f"quit reply {ms(left['quit-reply'])}, exit {ms(left['exit'])}"
                if how == "quit"
                else f"killed, reaped {ms(left['exit'])}"
            )
            if found is None:
                console = "no TICK on the console after it"
            elif found[0] is None:
                console = f"console kept connected, first TICK {signed(found[1])}"
            else:
                console = f"console reconnected {signed(found[0])}, first TICK {signed(found[1])}"
            print(f"  round {n} ({how:>4}): {quit_part}; restart: greeting "
                  f"{ms(back['greeting'])}, capabilities {ms(back['capabilities'])}, "
                  f"answering {ms(back['answering'])} (qmpvm {back['cpu']:.2f} CPU-s); "
                  f"outage {ms(figures['outage'])}; {console} (from answering)",
                  flush=True)  # fmt: skip

    async def finish(self) -> None:
        """Plain quit: qmpvm stops the engine and exits; both must be gone."""
        assert self.client is not None and self.process is not None and self.engine is not None
        if self.ticker is not None:
            self.ticker.finish()
            if self.ticker.error is not None:
                raise RuntimeError(f"console: {self.ticker.error!r}")
        # everything the guest printed, also while no qmpvm ran
        self.history = await self.client.execute("console-history", {"device": "ser0"})
        await self.client.send("quit")
        with contextlib.suppress(EOFError, ConnectionError):
            await self.client.reply("quit")
        await self.client.close()
        self.client = None
        await exited(self.process.pid, 15)
        code = self.process.wait()
        stop(self.process)
        self.process = None
        await exited(self.engine.pid, 15)
        self.engine_gone = identity(self.engine.pid) is None
        if code != 0 or not self.engine_gone:
            raise RuntimeError(f"final quit: qmpvm exited {code}, engine gone {self.engine_gone}")
        # Not our child (the first qmpvm, killed, was its parent): whoever adopted
        # it reaps it; until then it is a zombie, which runs nothing.
        proc = Path(f"/proc/{self.engine.pid}")
        deadline = now() + 5
        while proc.exists() and now() < deadline:
            await asyncio.sleep(0.05)
        self.engine_reaped = not proc.exists()

    def cleanup(self) -> None:
        """On any exit: qmpvm by process group, then the engine by pid."""
        stop_all()
        if self.engine is not None and self.engine.running():
            print(f"ending the engine (pid {self.engine.pid}) by pid", file=sys.stderr)
            self.engine.kill()
        left = EngineRecord.load(self.state)
        if left is not None and left.is_running():
            print(f"ending the engine (pid {left.pid}) by pid", file=sys.stderr)
            kill_checked(left.pid, (left.start_time, left.executable))

    async def bench(self) -> None:
        try:
            await self.boot()
            await asyncio.sleep(self.opts.pause)
            await self.rounds_()
            await self.finish()
        except Exception as err:
            raise RuntimeError(f"{err!r} {stderr_tail(self.process)}") from err


def python_start(env: dict[str, str], times: int = 5) -> list[float]:
    """``python -c pass``, Popen -> exit: the interpreter's own start."""
    out = []
    for _ in range(times):
        started = now()
        process = spawn([sys.executable, "-c", "pass"], env)
        process.wait()
        out.append(now() - started)
        stop(process)
    return out


def tick_report(run: Run) -> tuple[float, list[str]]:
    """The guest's own continuity, from the whole console history: every TICK
    line with its counter and the guest's uptime."""
    assert run.ticker is not None
    token = run.ticker.token
    text = str(run.history.get("data", ""))
    ticks: list[tuple[int, float]] = []
    for line in text.split("\n")[:-1]:  # whole lines only
        found = TICK.search(line)
        if found and found.group(1) == token:
            ticks.append((int(found.group(2)), float(found.group(3))))
    live = run.ticker.ticks()
    if len(ticks) < 2 or not live:
        return float("nan"), [f"ticks: only {len(ticks)} in the history, {len(live)} read live"]
    numbers = [n for n, _up in ticks]
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    repeated = len(numbers) - len(set(numbers))
    out_of_order = sum(1 for a, b in itertools.pairwise(numbers) if b <= a)
    in_history = set(ticks)
    live_missing = sum(1 for _t, n, up in live if (n, up) not in in_history)
    # The guest's clock on the host's: ticks read live arrive a little after they
    # are printed, never before, so the smallest difference is the offset.
    offset = min(t - up for t, _n, up in live)
    gaps = [(b[1] - a[1], a, b) for a, b in itertools.pairwise(ticks)]

    def inside(printed: float, next_printed: float) -> int | None:
        at, until = printed + offset, next_printed + offset
        for left, answered, n in run.windows:
            if at < answered and until > left:
                return n
        return None

    longest, first, second = max(gaps)
    during = inside(first[1], second[1])
    where = f"overlapping round {during}'s restart" if during is not None else "between restarts"
    within = [g for g, a, b in gaps if inside(a[1], b[1]) is not None]
    outside = [g for g, a, b in gaps if inside(a[1], b[1]) is None]
    worst_within = ms(max(within)) if within else "n/a"
    worst_outside = ms(max(outside)) if outside else "n/a"
    away = sum(1 for _n, up in ticks if inside(up, up) is not None)
    host_span = live[-1][0] - live[0][0]
    guest_span = live[-1][2] - live[0][2]
    lines = [
        f"ticks, from console-history at the end ({len(text)} bytes kept from position "
        f"{run.history.get('start')} to {run.history.get('end')}): {len(ticks)} lines, counter "
        f"{numbers[0]} .. {numbers[-1]}, {ticks[-1][1] - ticks[0][1]:.1f} s of the guest's clock; "
        f"missing numbers: {missing[:20] if missing else 'none'}; repeated {repeated}, "
        f"out of order {out_of_order}",
        f"  printed while qmpvm was away (kill/quit -> answering): {away}; read live on the "
        f"console: {len(live)} (the others were delivered while no client was connected); "
        f"read live but not in the history: {live_missing}",
        f"longest gap in the guest's clock between two ticks: {ms(longest)} (after "
        f"{first[0]}, {where}); median gap {ms(statistics.median(g for g, _a, _b in gaps))}",
        f"  longest overlapping a restart (kill/quit -> answering, guest clock mapped to the "
        f"host's): {worst_within}; outside them {worst_outside}",
        f"  the guest's clock from the first to the last tick read live: {guest_span:.2f} s, "
        f"the host's {host_span:.2f} s",
    ]  # fmt: skip
    return longest, lines


def report(run: Run, pystart: list[float]) -> None:
    rounds = run.rounds
    kill = [r for i, r in enumerate(rounds) if i % 2 == 0]
    quit_ = [r for i, r in enumerate(rounds) if i % 2 == 1]

    def col(runs: list[Figures], key: str) -> list[float]:
        return [r[key] for r in runs if key in r]

    answering = col(rounds, "answering")
    print(f"cold boot (qmpvm Popen -> {READY_MARKER}, once): {run.cold_boot:.3f} s")
    print(f"restart (new qmpvm Popen -> ...), {len(rounds)} rounds; QMP over a raw socket:")
    print(f"  -> greeting:            {spread(col(rounds, 'greeting'))}")
    print(f"  -> qmp_capabilities:    {spread(col(rounds, 'capabilities'))}")
    print(f"  -> answering (query-status running): {spread(answering)}   goal <= {ms(GOAL)}")
    print(f"       after kill -9:     {spread(col(kill, 'answering'))}")
    print(f"       after quit keep:   {spread(col(quit_, 'answering'))}")
    print(f"  Popen call itself {spread(col(rounds, 'popen'))}; qmpvm CPU up to the answer "
          f"{spread(col(rounds, 'cpu'))}")  # fmt: skip
    print(f"  reference, python -c pass (Popen -> exit): {spread(pystart)}")
    print(
        f"quit keep-machine -> qmpvm exit: {spread(col(quit_, 'exit'))} (reply "
        f"{spread(col(quit_, 'quit-reply'))}); kill -9 -> reaped {spread(col(kill, 'exit'))}"
    )
    killed_left = sum(int(r["socket-left"]) for r in kill)
    quit_left = sum(int(r["socket-left"]) for r in quit_)
    print(f"monitor socket file left behind (removed before the restart): after kill -9 "
          f"{killed_left}/{len(kill)}, after quit {quit_left}/{len(quit_)}")  # fmt: skip
    print(f"outage a client sees (kill/quit -> new qmpvm answering): "
          f"{spread(col(rounds, 'outage'))}")  # fmt: skip
    kept = sum(1 for r in rounds if r.get("console-kept"))
    print(f"console after a restart: the connection kept through it {kept}/{len(rounds)}, "
          f"reconnected {spread(col(rounds, 'console-back'))} (from the new qmpvm answering); "
          f"first TICK line after it {spread(col(rounds, 'delivery'))}")  # fmt: skip
    longest, lines = tick_report(run)
    for line in lines:
        print(line)
    assert run.engine is not None
    reaped = "reaped" if run.engine_reaped else "a zombie 5 s later, not reaped yet"
    print(f"final quit: qmpvm exited 0; the engine (pid {run.engine.pid}) no longer runs: "
          f"{run.engine_gone} ({reaped})")  # fmt: skip
    answer = statistics.median(answering)
    print("\nratios:")
    print(f"  restart -> answering / 150 ms goal   {answer / GOAL:7.3f}   "
          f"{'met' if answer <= GOAL else 'MISSED'}")  # fmt: skip
    print(f"  restart -> answering / cold boot     {answer / run.cold_boot:7.3f}")
    print(f"  longest guest gap / {TICK_PERIOD} s period     {longest / TICK_PERIOD:7.3f}")
    print(f"  longest guest gap / cold boot        {longest / run.cold_boot:7.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds (smoke run)")
    parser.add_argument("--runs", type=int, help="restarts, alternating kill -9 / quit (10)")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between rounds")
    parser.add_argument("--pyc", action="store_true", help="give qmpvm a .pyc cache")
    opts = parser.parse_args()
    opts.runs = opts.runs or (3 if opts.quick else 10)
    logging.basicConfig(level=logging.ERROR)
    exit_on_sigterm()
    load_before = loadavg()
    started = now()
    with tempfile.TemporaryDirectory(prefix="qmpvm-reattach-") as tmp:
        run = Run(Path(tmp), opts)
        try:
            pyc = "with" if opts.pyc else "without"
            print(f"reattach benchmark: {os.cpu_count()} CPUs, {opts.runs} rounds, "
                  f"pause {opts.pause} s, qmpvm {pyc} a .pyc cache", flush=True)  # fmt: skip
            asyncio.run(run.bench())
            pystart = python_start(run.env)
        finally:
            run.cleanup()
    load_after = loadavg()
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average: "
          f"{load_before} -> {load_after}, wall {now() - started:.0f} s "
          "(other work on the host skews figures)")  # fmt: skip
    report(run, pystart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
