"""The monitor alone: qmpvm against QEMU 7.2's own QMP monitor, in one run.

Peer: ``qemu-system-x86_64 -M none -S -nodefaults -display none
-qmp unix:PATH,server=on,wait=off`` (no machine, only the monitor), the
closest QEMU has to qmpvm's "monitor first" start; for (e) ``-M q35 -S``
instead, since QEMU's blockdev-add needs a machine.  qmpvm is started with
``-qmp unix:PATH,server=on,wait=off --preconfig`` (no machine either), both as
``sys.executable -m qmpvm`` and as the console script ``.venv/bin/qmpvm``.

Before anything is timed, ``qmpvm --print-qmp -object secret,id=s,data=x``
runs once: it loads qmpvm's capability cache for the engine
($QMPVM_CACHE_DIR or ~/.cache/qmpvm), or probes the engine (~1-2 s) and
writes it if it is missing, so no timed start probes.  The benchmark prints
whether the cache was warm.

Measured, each printed as a qmpvm/QEMU ratio (lower is better for qmpvm):

(a) start to greeting: from ``Popen`` to the greeting bytes arriving on a raw
    UNIX socket (the socket is poll-connected every 1 ms until it exists);
    median of ``--runs`` (10) runs per program, the programs taking turns
    (QEMU, each qmpvm launcher, the floors, QEMU, ...) after one unmeasured
    warm-up start each.  qmpvm is started two ways, ``python -m qmpvm`` and
    ``.venv/bin/qmpvm``, in the environment as it is.  Its modules load from
    the bytecode ``scripts/setup.sh`` compiles (``compileall``); the
    benchmark warns if any is missing or stale, since this sandbox sets
    PYTHONDONTWRITEBYTECODE=1 and such a module is compiled at every start.
    The greeting comes from ``qmpvm.monitor.early`` before asyncio or the
    command modules are imported.  The ratio uses the faster launcher.
(b) ``query-status`` round trip through one ``qemu.qmp`` QMPClient per
    server: sequential (2,000 calls, timed one by one; median per call, mean
    also shown) and pipelined (``asyncio.gather`` of 1,000 ``execute`` calls
    on one client; total time, median of 5 rounds).  Servers take turns in
    chunks so drift hits both.
(c) qmpvm alone: 64 concurrent clients, each doing N sequential
    ``query-status`` (waiting for each reply); total commands / wall time.
    Two kinds of client take turns against one qmpvm: qemu.qmp QMPClients,
    and raw sockets driven by one epoll loop (negotiate, then send
    ``{"execute": "query-status"}`` and read one reply line).  qemu.qmp costs
    ~150 µs of client CPU per call, so on 2 cores its row measures mostly
    the client library; the raw clients cost ~15 µs, so their row measures
    the server.  The CPU time qmpvm itself spent is read from /proc and shown
    per command.  ``--client-procs N`` spreads the clients over N processes.
(d) start to the whole schema: from ``Popen`` to the last byte of the reply
    to ``query-qmp-schema`` on a raw UNIX socket (poll-connect as in (a),
    read the greeting, send ``qmp_capabilities``, read its reply, send
    ``query-qmp-schema``, read until its reply line ends); QEMU (``-M none
    -S``) and both qmpvm launchers take turns, median of ``--runs``, after
    one warm-up start each.  qmpvm answers the engine's schema merged with
    its own commands, encoded on the first ``query-qmp-schema`` of a
    process, so this includes decoding the cached schema.  The size in bytes
    and the number of entries of each answer are printed.  No goal.
(e) ``blockdev-add`` round trip through one ``qemu.qmp`` QMPClient per
    server: ``{"driver": "qcow2", "node-name": "nN", "file": {"driver":
    "file", "filename": IMG}}``, IMG a 64 MiB qcow2 image made once with
    ``qemu-img create -f qcow2``, a fresh node-name for every call, each
    call followed by an untimed ``blockdev-del`` of that node (QEMU refuses
    a second read-write node on the same image: "Failed to get "write"
    lock"), the same on every server.  Servers: QEMU ``-M q35 -S`` (it opens
    the image), qmpvm ``--preconfig`` (no machine: the command is checked
    against the engine's schema and recorded in qmpvm's store, in memory)
    and qmpvm ``--preconfig --state-dir DIR`` (the store on disk, a commit
    with fsync per command).  1,000 sequential calls (200 with ``--quick``)
    per server, taking turns in 4 chunks after 20 warm-up calls; median per
    call.  Then the same number of invalid ``blockdev-add`` (``file.filename``
    a number; every server refuses it with "Invalid parameter type for
    'file.filename', expected: string"), to show the cost of the check.

Goals (printed as met / MISSED): start-to-greeting ratio <= 1.0, sequential
round-trip ratio <= 1.0, >= 10,000 commands/s over 64 clients, judged on the
raw-socket row (the server's capacity; the qemu.qmp row is shown beside it),
and blockdev-add round-trip ratio <= 1.5 for qmpvm with its store in memory
(the --state-dir row and the invalid blockdev-add are shown, with no goal).

Command::

    .venv/bin/python benchmarks/monitor.py            # full run (~30 s)
    .venv/bin/python benchmarks/monitor.py --quick    # smoke run (~12 s)

The floor rows (a bare Python greeter over a plain socket, and one over
asyncio) are not qmpvm: they show what any Python server pays on this host.

Measured here, 2026-12-01 17:30 UTC (2 cores, QEMU 7.2.22, CPython 3.11.7,
load average 0.36-0.58, bytecode compiled first; the second of two full
runs, the first, at load 1.1-1.6, in brackets where it differs much)::

    (a) start -> greeting, median of 10      QEMU 25.0 ms
        python -m qmpvm            23.3 ms   .venv/bin/qmpvm            17.3 ms
        floor: python, socket      23.1 ms   floor: python, asyncio     64.4 ms
    (b) sequential query-status  QEMU 0.505 ms/call  qmpvm 0.279 ms/call (median)
        1000 pipelined           QEMU 298 ms         qmpvm 124 ms
    (c) 64 clients x 400 query-status, clients in 1 process:
        qemu.qmp    10,066 commands/s (5,447); qmpvm 44 µs/command; clients 98 µs/call
        raw socket  25,473 commands/s (16,736); qmpvm 39 µs/command; clients 13 µs/call
    (d) start -> query-qmp-schema reply      QEMU 73.2 ms (207,000 bytes, 1,051 entries)
        python -m qmpvm           181.2 ms   .venv/bin/qmpvm           182.1 ms
        (211,756 bytes, 1,064 entries)
    (e) blockdev-add, median     QEMU 1.827 ms  qmpvm 0.532 ms  --state-dir 0.996 ms
        invalid blockdev-add     QEMU 1.111 ms  qmpvm 0.331 ms  --state-dir 0.368 ms
    ratios: greeting 0.69 met; round trip 0.55 met (mean 0.54); pipelined
    0.42; 64 raw-socket clients 25,473/s met; schema 2.47; blockdev-add 0.29
    met (goal 1.5), --state-dir 0.55; invalid blockdev-add 0.30

On 2026-11-24 (before the schema checks), 16:06 UTC, the same host gave:
greeting QEMU 25.6 ms, .venv/bin/qmpvm 15.9 ms (0.62); query-status 0.485
vs 0.297 ms/call (0.61); pipelined 370 vs 136 ms; 17,088 raw-socket and
5,404 qemu.qmp commands/s.

Six full runs that day (16:03-16:24, load average 1.3-2.4) gave
13,342-18,746 commands/s from raw-socket clients (qmpvm 38-55 µs of CPU per
command) and 4,110-6,015 from qemu.qmp clients.  Run alternately with them,
the same benchmark against qmpvm before its I/O path was reworked gave
6,840-10,213 and 2,865-4,134 (qmpvm 86-127 µs per command, raw sockets).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import logging
import multiprocessing
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from processes import REPO, cpu_seconds, exit_on_sigterm, loadavg, spawn, stop, stop_all
from qemu.qmp import ConnectError, ExecuteError, QMPClient

QEMU = "qemu-system-x86_64"
CONSOLE_SCRIPT = Path(sys.executable).parent / "qmpvm"
GOAL_COMMANDS_PER_S = 10_000
GOAL_BLOCKDEV_RATIO = 1.5


class BarrierLike(Protocol):
    def wait(self, timeout: float | None = None) -> int: ...


class QueueLike(Protocol):
    def put(self, obj: object) -> None: ...


# -- processes: every one we start is remembered and ended on any exit path --


# -- programs ------------------------------------------------------------------


def qemu_argv(sock: Path) -> list[str]:
    return [QEMU, "-M", "none", "-S", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{sock},server=on,wait=off"]  # fmt: skip


def qmpvm_module_argv(sock: Path) -> list[str]:
    return [sys.executable, "-m", "qmpvm", "-qmp", f"unix:{sock},server=on,wait=off", "--preconfig"]


def qmpvm_script_argv(sock: Path) -> list[str]:
    return [str(CONSOLE_SCRIPT), "-qmp", f"unix:{sock},server=on,wait=off", "--preconfig"]


def _unique_socket(workdir: Path) -> Iterator[Path]:
    n = 0
    while True:
        n += 1
        yield workdir / f"qmp{n}.sock"


# -- (a) start to greeting -----------------------------------------------------


def start_to_greeting(argv: list[str], sock: Path, timeout: float = 30.0) -> float:
    """Seconds from Popen to the first greeting line on a raw UNIX socket."""
    started = time.perf_counter()
    process = spawn(argv)
    try:
        conn = _connect_when_listening(process, argv, sock, started + timeout)
        with conn:
            conn.settimeout(timeout)
            data = _recv_line(conn, bytearray(), argv[0])
            elapsed = time.perf_counter() - started
        if b'"QMP"' not in data:
            raise RuntimeError(f"{argv[0]}: not a QMP greeting: {data[:200]!r}")
        return elapsed
    finally:
        stop(process)


def _connect_when_listening(
    process: subprocess.Popen[bytes], argv: list[str], sock: Path, deadline: float
) -> socket.socket:
    """A raw connection to ``sock``, poll-connected every 1 ms until it exists."""
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(sock))
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise RuntimeError(f"{argv[0]}: exited with {process.returncode}: {err}") from None
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{argv[0]}: no QMP socket in time") from None
            time.sleep(0.001)


def start_to_schema(argv: list[str], sock: Path, timeout: float = 30.0) -> tuple[float, bytes]:
    """Seconds from Popen to the whole ``query-qmp-schema`` reply, and the reply line.

    A raw UNIX socket, as for the greeting: read the greeting, negotiate,
    ask, and read until the reply's line ends (events are skipped).
    """
    started = time.perf_counter()
    process = spawn(argv)
    try:
        conn = _connect_when_listening(process, argv, sock, started + timeout)
        with conn:
            conn.settimeout(timeout)
            pending = bytearray()
            greeting = _recv_line(conn, pending, argv[0])
            conn.sendall(b'{"execute": "qmp_capabilities"}')
            negotiated = _recv_reply(conn, pending, argv[0])
            conn.sendall(b'{"execute": "query-qmp-schema"}')
            reply = _recv_reply(conn, pending, argv[0])
            elapsed = time.perf_counter() - started
        if b'"QMP"' not in greeting or not negotiated.startswith(b'{"return": {}'):
            raise RuntimeError(f"{argv[0]}: no QMP negotiation: {greeting[:200]!r} {negotiated!r}")
        if not reply.startswith(b'{"return": ['):
            raise RuntimeError(f"{argv[0]}: query-qmp-schema failed: {reply[:200]!r}")
        return elapsed, reply
    finally:
        stop(process)


def _recv_line(conn: socket.socket, pending: bytearray, who: str) -> bytes:
    """The next line (with its end) from ``conn``; what follows stays in ``pending``."""
    scanned = 0
    while (end := pending.find(b"\n", scanned)) < 0:
        scanned = len(pending)
        chunk = conn.recv(1 << 20)
        if not chunk:
            raise RuntimeError(f"{who}: connection closed after {bytes(pending[:200])!r}")
        pending += chunk
    line = bytes(pending[: end + 1])
    del pending[: end + 1]
    return line


def _recv_reply(conn: socket.socket, pending: bytearray, who: str) -> bytes:
    """The next line that is not an event."""
    while (line := _recv_line(conn, pending, who)).startswith(b'{"event"'):
        pass
    return line


# Floors for a Python server on this host (not qmpvm): the interpreter plus a
# greeting over a plain socket, and the same from an asyncio server.
_RAW_GREETER = """\
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen()
c, _ = s.accept()
c.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\\r\\n')
c.recv(1)
"""
_ASYNCIO_GREETER = """\
import asyncio, sys
async def greet(reader, writer):
    writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\\r\\n')
    await writer.drain()
    await reader.read(1)
async def main():
    await asyncio.start_unix_server(greet, sys.argv[1])
    await asyncio.Event().wait()
asyncio.run(main())
"""
REFERENCE = "floor: "


LAUNCHERS: dict[str, Callable[[Path], list[str]]] = {
    "QEMU": qemu_argv,
    "qmpvm: python -m qmpvm": qmpvm_module_argv,
    "qmpvm: .venv/bin/qmpvm": qmpvm_script_argv,
    f"{REFERENCE}python, socket": lambda sock: [sys.executable, "-c", _RAW_GREETER, str(sock)],
    f"{REFERENCE}python, asyncio": lambda sock: [sys.executable, "-c", _ASYNCIO_GREETER, str(sock)],
}


def stale_bytecode() -> list[str]:
    """qmpvm modules whose .pyc is missing or older than the source.

    The sandbox sets PYTHONDONTWRITEBYTECODE=1, so such a module is compiled
    at every start, which would add 25-40 ms to (a).
    """
    stale = []
    for source in sorted((REPO / "qmpvm").rglob("*.py")):
        cached = Path(importlib.util.cache_from_source(str(source)))
        if not cached.exists() or cached.stat().st_mtime < source.stat().st_mtime:
            stale.append(str(source.relative_to(REPO)))
    return stale


def bench_greeting(workdir: Path, runs: int) -> dict[str, list[float]]:
    socks = _unique_socket(workdir)
    for make in LAUNCHERS.values():  # warm-up: the page cache
        sock = next(socks)
        start_to_greeting(make(sock), sock)
    times: dict[str, list[float]] = {name: [] for name in LAUNCHERS}
    for _ in range(runs):
        for name, make in LAUNCHERS.items():
            sock = next(socks)
            times[name].append(start_to_greeting(make(sock), sock))
    return times


SCHEMA_LAUNCHERS: dict[str, Callable[[Path], list[str]]] = {
    name: make for name, make in LAUNCHERS.items() if not name.startswith(REFERENCE)
}
"""(d): QEMU (``-M none -S``) and both qmpvm launchers, no floors."""


def bench_schema(workdir: Path, runs: int) -> tuple[dict[str, list[float]], dict[str, bytes]]:
    """(d): start to the whole query-qmp-schema reply, programs taking turns."""
    socks = _unique_socket(workdir)
    for make in SCHEMA_LAUNCHERS.values():  # warm-up
        sock = next(socks)
        start_to_schema(make(sock), sock)
    times: dict[str, list[float]] = {name: [] for name in SCHEMA_LAUNCHERS}
    replies: dict[str, bytes] = {}
    for _ in range(runs):
        for name, make in SCHEMA_LAUNCHERS.items():
            sock = next(socks)
            elapsed, reply = start_to_schema(make(sock), sock)
            times[name].append(elapsed)
            if replies.setdefault(name, reply) != reply:
                raise RuntimeError(f"{name}: query-qmp-schema answered differently between runs")
    return times, replies


def warm_capability_cache() -> str:
    """Load (or, the first time, probe and store) qmpvm's capability cache for
    the engine, so that no timed start probes the engine; say which it was."""
    from qmpvm.engine.caps import (
        cache_key,
        cache_path,
        default_cache_dir,
        resolve_binary,
        stat_identity,
    )

    file = cache_path(default_cache_dir(), cache_key(stat_identity(resolve_binary(QEMU))))
    was_there = file.exists()
    argv = [str(CONSOLE_SCRIPT), "--print-qmp", "-object", "secret,id=s,data=x"]
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=REPO, capture_output=True, check=True)
    elapsed = time.perf_counter() - t0
    if not file.exists():
        return f"WARNING: no capability cache at {file} after {argv[1:]}: every start probes"
    state = "warm" if was_there else "was cold, probed now"
    return f"capability cache {state}: {file} ({' '.join(argv[1:])} took {elapsed:.2f} s)"


# -- (b) round trips, (c) many clients -------------------------------------------


async def connect(
    sock: Path, name: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 30.0
) -> QMPClient:
    """A negotiated qemu.qmp client; retries while the server is not listening yet."""
    deadline = time.monotonic() + timeout
    while True:  # the socket file appears at bind(), a moment before listen()
        client = QMPClient(name)
        try:
            await client.connect(str(sock))
            return client
        except ConnectError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}") from None
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.005)


async def sequential(client: QMPClient, calls: int) -> list[float]:
    per_call = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await client.execute("query-status")
        per_call.append(time.perf_counter() - t0)
    return per_call


async def pipelined(client: QMPClient, calls: int) -> float:
    t0 = time.perf_counter()
    replies = await asyncio.gather(*(client.execute("query-status") for _ in range(calls)))
    elapsed = time.perf_counter() - t0
    assert len(replies) == calls and all("status" in r for r in replies)  # type: ignore[operator]
    return elapsed


Span = tuple[float, float, float]
"""One client process's (start, end, own CPU-s) of the timed part."""


async def client_load(
    sock: Path,
    clients: int,
    calls: int,
    barrier: BarrierLike | None = None,
    mark: Callable[[], None] | None = None,
) -> Span:
    """``clients`` qemu.qmp connections doing ``calls`` query-status each.

    ``barrier`` lines up client processes before the clock starts; ``mark`` is
    called just before and just after the timed part.
    """
    conns = await asyncio.gather(*(connect(sock, f"c{i}") for i in range(clients)))
    try:
        await asyncio.gather(*(sequential(c, 10) for c in conns))  # warm-up
        if barrier is not None:
            await asyncio.to_thread(barrier.wait)
        if mark is not None:
            mark()
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(sequential(c, calls) for c in conns))
        t1, cpu1 = time.perf_counter(), time.process_time()
        if mark is not None:
            mark()
    finally:
        await asyncio.gather(*(c.disconnect() for c in conns), return_exceptions=True)
    return t0, t1, cpu1 - cpu0


QUERY = b'{"execute": "query-status"}'


def raw_load(
    sock: Path,
    clients: int,
    calls: int,
    barrier: BarrierLike | None = None,
    mark: Callable[[], None] | None = None,
) -> Span:
    """``client_load`` with raw sockets and one epoll loop: a few µs per call.

    Each connection negotiates, then sends ``query-status`` and reads the
    reply line before sending the next, as a qemu.qmp client's sequential
    calls do, so the server, not the client library, sets the pace.
    """
    conns = [_raw_connect(sock) for _ in range(clients)]
    try:
        _raw_calls(conns, 10)  # warm-up
        if barrier is not None:
            barrier.wait(timeout=120)
        if mark is not None:
            mark()
        cpu0, t0 = time.process_time(), time.perf_counter()
        _raw_calls(conns, calls)
        t1, cpu1 = time.perf_counter(), time.process_time()
        if mark is not None:
            mark()
    finally:
        for conn in conns:
            conn.close()
    return t0, t1, cpu1 - cpu0


def _raw_connect(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30)
    conn.connect(str(path))
    for send in (b"", b'{"execute": "qmp_capabilities"}'):
        conn.sendall(send)
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                raise RuntimeError(f"qmpvm closed the connection after {line!r}")
            line += chunk
    conn.settimeout(None)  # blocking: recv only after epoll says it will not block
    return conn


def _raw_calls(conns: list[socket.socket], calls: int) -> None:
    by_fd = {conn.fileno(): conn for conn in conns}
    left = dict.fromkeys(by_fd, calls)
    partial = dict.fromkeys(by_fd, b"")
    with select.epoll() as poller:
        for fd, conn in by_fd.items():
            poller.register(fd, select.EPOLLIN)
            conn.send(QUERY)
        busy = len(conns)
        while busy:
            ready = poller.poll(30)
            if not ready:
                raise TimeoutError("no reply from qmpvm in 30 s")
            for fd, _events in ready:
                data = partial[fd] + by_fd[fd].recv(65536)
                if not data:
                    raise RuntimeError("qmpvm closed a connection")
                lines = data.split(b"\r\n")
                partial[fd] = lines.pop()
                for line in lines:
                    if not line.startswith((b'{"return"', b'{"event"')):
                        raise RuntimeError(f"unexpected reply: {line[:200]!r}")
                    if line.startswith(b'{"return"'):
                        left[fd] -= 1
                        if left[fd]:
                            by_fd[fd].send(QUERY)
                        else:
                            busy -= 1


def qmp_load(
    sock: Path,
    clients: int,
    calls: int,
    barrier: BarrierLike | None = None,
    mark: Callable[[], None] | None = None,
) -> Span:
    return asyncio.run(client_load(sock, clients, calls, barrier, mark))


LOADS: dict[str, Callable[..., Span]] = {"qemu.qmp": qmp_load, "raw socket": raw_load}
"""The kinds of client in (c); the goal is judged on the raw-socket row."""


def _client_worker(
    kind: str, sock: str, barrier: BarrierLike, results: QueueLike, *, clients: int, calls: int
) -> None:
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    results.put(LOADS[kind](Path(sock), clients, calls, barrier))


Many = tuple[float, float, float]
"""(commands/s, qmpvm CPU-s, clients' CPU-s)."""


def bench_many(workdir: Path, clients: int, calls: int, procs: int) -> dict[str, Many]:
    """Each kind of client in turn against one qmpvm: ``clients`` over ``procs``."""
    sock = workdir / "many.sock"
    qmpvm = spawn(qmpvm_module_argv(sock))
    try:
        asyncio.run(_wait_listening(sock, qmpvm))
        return {
            kind: _many(kind, sock, qmpvm.pid, clients=clients, calls=calls, procs=procs)
            for kind in LOADS
        }
    finally:
        stop(qmpvm)


def _many(kind: str, sock: Path, pid: int, *, clients: int, calls: int, procs: int) -> Many:
    """One kind of client against qmpvm (process ``pid``).

    perf_counter is CLOCK_MONOTONIC, one clock for every process, so the
    wall time is the first start to the last end over all client processes.
    qmpvm's CPU time is read at the start barrier and when the last client
    process reports (in-process: right around the timed part).
    """
    workers: list[multiprocessing.process.BaseProcess] = []
    cpu: list[float] = []
    try:
        if procs <= 1:

            def mark() -> None:
                cpu.append(cpu_seconds(pid))

            spans = [LOADS[kind](sock, clients, calls, mark=mark)]
        else:
            ctx = multiprocessing.get_context("spawn")
            barrier, results = ctx.Barrier(procs + 1), ctx.Queue()
            shares = [clients // procs + (i < clients % procs) for i in range(procs)]
            for share in shares:
                worker = ctx.Process(
                    target=_client_worker,
                    args=(kind, str(sock), barrier, results),
                    kwargs={"clients": share, "calls": calls},
                )
                worker.start()
                workers.append(worker)
            barrier.wait(timeout=120)
            cpu.append(cpu_seconds(pid))
            spans = [results.get(timeout=300) for _ in workers]
            cpu.append(cpu_seconds(pid))
    finally:
        for worker in workers:  # they have reported (or we are failing): end them
            worker.join(5 if len(cpu) == 2 else 0)
            if worker.is_alive():
                worker.kill()
                worker.join()
    wall = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
    return clients * calls / wall, cpu[1] - cpu[0], sum(used for _, _, used in spans)


async def _wait_listening(sock: Path, process: subprocess.Popen[bytes]) -> None:
    """Until qmpvm answers commands and has finished its start-up work."""
    client = await connect(sock, "probe", process)
    await client.execute("query-status")
    await asyncio.sleep(1.0)
    await client.disconnect()


async def bench_monitor(workdir: Path, opts: argparse.Namespace) -> dict[str, object]:
    qemu_sock, qmpvm_sock = workdir / "rt-qemu.sock", workdir / "rt-qmpvm.sock"
    qemu = spawn(qemu_argv(qemu_sock))
    qmpvm = spawn(qmpvm_module_argv(qmpvm_sock))
    results: dict[str, object] = {}
    try:
        clients = {
            "QEMU": await connect(qemu_sock, "qemu", qemu),
            "qmpvm": await connect(qmpvm_sock, "qmpvm", qmpvm),
        }
        try:
            for client in clients.values():
                await sequential(client, 200)  # warm-up
            seq: dict[str, list[float]] = {name: [] for name in clients}
            chunks = 4
            for _ in range(chunks):
                for name, client in clients.items():
                    seq[name] += await sequential(client, opts.calls // chunks)
            pipe: dict[str, list[float]] = {name: [] for name in clients}
            for _ in range(opts.pipeline_rounds):
                for name, client in clients.items():
                    pipe[name].append(await pipelined(client, opts.pipeline))
            results["seq"], results["pipe"] = seq, pipe
        finally:
            for client in clients.values():
                await client.disconnect()
    finally:
        stop(qemu)
        stop(qmpvm)
    return results


# -- (e) blockdev-add ------------------------------------------------------------


def qemu_q35_argv(sock: Path) -> list[str]:
    """QEMU's blockdev-add needs a machine: q35, created and stopped (``-S``)."""
    return [QEMU, "-M", "q35", "-S", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{sock},server=on,wait=off"]  # fmt: skip


def blockdev_servers(workdir: Path) -> dict[str, list[str]]:
    """(e)'s servers: QEMU with a machine, qmpvm without one, in memory and on disk."""
    return {
        "QEMU": qemu_q35_argv(workdir / "bd-qemu.sock"),
        "qmpvm": qmpvm_module_argv(workdir / "bd-qmpvm.sock"),
        "qmpvm --state-dir": [
            *qmpvm_module_argv(workdir / "bd-qmpvm-disk.sock"),
            "--state-dir",
            str(workdir / "state"),
        ],
    }


def make_image(workdir: Path) -> Path:
    image = workdir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(image), "64M"],
                   capture_output=True, check=True)  # fmt: skip
    return image


def qcow2_node(node: str, image: Path) -> dict[str, object]:
    return {
        "driver": "qcow2",
        "node-name": node,
        "file": {"driver": "file", "filename": str(image)},
    }


INVALID_NODE: dict[str, object] = {
    "driver": "qcow2",
    "node-name": "bad",
    "file": {"driver": "file", "filename": 64},  # must be a string
}


async def add_then_del(
    client: QMPClient, image: Path, nodes: Iterator[str], calls: int
) -> list[float]:
    """``calls`` blockdev-add of a fresh node, each timed; the untimed blockdev-del
    after each releases the image's write lock (QEMU refuses a second writer)."""
    per_call = []
    for _ in range(calls):
        node = next(nodes)
        t0 = time.perf_counter()
        await client.execute("blockdev-add", qcow2_node(node, image))
        per_call.append(time.perf_counter() - t0)
        await client.execute("blockdev-del", {"node-name": node})
    return per_call


async def invalid_adds(client: QMPClient, calls: int) -> tuple[list[float], str]:
    """``calls`` refused blockdev-add, each timed, and the (last) refusal's text."""
    per_call, refusal = [], ""
    for _ in range(calls):
        t0 = time.perf_counter()
        try:
            await client.execute("blockdev-add", INVALID_NODE)
        except ExecuteError as err:
            per_call.append(time.perf_counter() - t0)
            refusal = f"{err.error_class}: {err}"
        else:
            raise RuntimeError(f"{client.name}: an invalid blockdev-add was accepted")
    return per_call, refusal


async def bench_blockdev(workdir: Path, image: Path, opts: argparse.Namespace) -> dict[str, object]:
    """(e): the servers take turns in chunks on one qemu.qmp client each."""
    servers = blockdev_servers(workdir)
    processes = {name: spawn(argv) for name, argv in servers.items()}
    results: dict[str, object] = {}
    try:
        clients: dict[str, QMPClient] = {}
        try:
            for name, argv in servers.items():
                sock = Path(argv[argv.index("-qmp") + 1].removeprefix("unix:").split(",")[0])
                clients[name] = await connect(sock, name, processes[name])
            nodes = {name: (f"n{i}" for i in itertools.count()) for name in clients}
            for name, client in clients.items():  # warm-up
                await client.execute("query-status")
                await add_then_del(client, image, nodes[name], 20)
                await invalid_adds(client, 20)
            chunks = 4
            add: dict[str, list[float]] = {name: [] for name in clients}
            for _ in range(chunks):
                for name, client in clients.items():
                    add[name] += await add_then_del(
                        client, image, nodes[name], opts.blockdev_calls // chunks
                    )
            bad: dict[str, list[float]] = {name: [] for name in clients}
            refusals: dict[str, str] = {}
            for _ in range(chunks):
                for name, client in clients.items():
                    times, refusals[name] = await invalid_adds(
                        client, opts.blockdev_calls // chunks
                    )
                    bad[name] += times
            results["add"], results["bad"], results["refusals"] = add, bad, refusals
        finally:
            for client in clients.values():
                await client.disconnect()
    finally:
        for process in processes.values():
            stop(process)
    return results


# -- report ----------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def goal(met: bool) -> str:
    return "met" if met else "MISSED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and calls (smoke run)")
    parser.add_argument("--runs", type=int, help="start-to-greeting runs per program (10)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument(
        "--client-procs", type=int, default=1, help="spread the clients over N processes"
    )
    opts = parser.parse_args()
    opts.runs = opts.runs or (3 if opts.quick else 10)
    opts.calls = 400 if opts.quick else 2000
    opts.pipeline = 1000
    opts.pipeline_rounds = 2 if opts.quick else 5
    opts.per_client = 100 if opts.quick else 400
    opts.blockdev_calls = 200 if opts.quick else 1000
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # connect retries log errors
    exit_on_sigterm()
    load_before = loadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="qmpvm-bench-") as tmp:
            workdir = Path(tmp)
            print(f"monitor benchmark: QEMU {qemu_version()}, {os.cpu_count()} CPUs, "
                  f"{'quick' if opts.quick else 'full'} run", flush=True)  # fmt: skip
            if stale := stale_bytecode():
                print(f"WARNING: no up-to-date .pyc for {len(stale)} qmpvm module(s), "
                      f"e.g. {stale[0]}: (a) includes compiling them; run "
                      ".venv/bin/python -m compileall -q qmpvm first", flush=True)  # fmt: skip
            print(warm_capability_cache(), flush=True)
            greet = bench_greeting(workdir, opts.runs)
            schema, schema_replies = bench_schema(workdir, opts.runs)
            mon = asyncio.run(bench_monitor(workdir, opts))
            blockdev = asyncio.run(bench_blockdev(workdir, make_image(workdir), opts))
            mon["many"] = bench_many(workdir, opts.clients, opts.per_client, opts.client_procs)
            print(f"load average during the run: {load_before} -> {loadavg()} "
                  "(other work on the host skews every figure)", flush=True)  # fmt: skip
    finally:
        stop_all()

    med = {name: statistics.median(values) for name, values in greet.items()}
    print(f"\n(a) process start -> greeting, median of {opts.runs} runs each (alternating):")
    for name, value in med.items():
        spread = f"min {ms(min(greet[name]))}, max {ms(max(greet[name]))}"
        print(f"    {name:30s} {ms(value):>12s}   ({spread})")
    qmpvms = {k: v for k, v in med.items() if k.startswith("qmpvm")}
    best = min(qmpvms, key=qmpvms.__getitem__)
    greet_ratio = med[best] / med["QEMU"]

    seq, pipe = mon["seq"], mon["pipe"]
    assert isinstance(seq, dict) and isinstance(pipe, dict)
    seq_med = {name: statistics.median(v) for name, v in seq.items()}
    seq_mean = {name: statistics.fmean(v) for name, v in seq.items()}
    pipe_med = {name: statistics.median(v) for name, v in pipe.items()}
    print(f"\n(b) query-status through qemu.qmp, {opts.calls} sequential calls:")
    for name in seq:
        print(f"    {name:6s} median {ms(seq_med[name])}/call, mean {ms(seq_mean[name])}/call")
    print(f"    {opts.pipeline} pipelined calls (asyncio.gather), "
          f"median of {opts.pipeline_rounds}:")  # fmt: skip
    for name in pipe:
        rate = opts.pipeline / pipe_med[name]
        print(f"    {name:6s} {ms(pipe_med[name])} total ({rate:,.0f} commands/s)")
    rt_ratio = seq_med["qmpvm"] / seq_med["QEMU"]
    rt_mean_ratio = seq_mean["qmpvm"] / seq_mean["QEMU"]
    pipe_ratio = pipe_med["qmpvm"] / pipe_med["QEMU"]

    many = mon["many"]
    assert isinstance(many, dict)
    total = opts.clients * opts.per_client
    print(f"\n(c) qmpvm, {opts.clients} concurrent clients x {opts.per_client} sequential "
          f"query-status, clients in {opts.client_procs} process(es):")  # fmt: skip
    for kind, (rate, server_cpu, client_cpu) in many.items():
        server_us, client_us = server_cpu / total * 1e6, client_cpu / total * 1e6
        print(f"    {kind:10s} {rate:7,.0f} commands/s wall; "
              f"qmpvm {server_cpu:.2f} CPU-s = {server_us:.0f} µs/command; "
              f"clients {client_cpu:.2f} CPU-s = {client_us:.0f} µs/call")  # fmt: skip
    raw_rate = many["raw socket"][0]

    schema_med = {name: statistics.median(values) for name, values in schema.items()}
    print(f"\n(d) process start -> whole query-qmp-schema reply (connect, negotiate, ask, read), "
          f"median of {opts.runs} runs each (alternating), QEMU -M none -S:")  # fmt: skip
    for name, value in schema_med.items():
        reply = schema_replies[name]
        entries = len(json.loads(reply)["return"])
        spread = f"min {ms(min(schema[name]))}, max {ms(max(schema[name]))}"
        print(f"    {name:30s} {ms(value):>12s}   ({spread}); "
              f"reply {len(reply):,} bytes, {entries:,} entries")  # fmt: skip
    schema_qmpvms = {k: v for k, v in schema_med.items() if k.startswith("qmpvm")}
    schema_best = min(schema_qmpvms, key=schema_qmpvms.__getitem__)
    schema_ratio = schema_med[schema_best] / schema_med["QEMU"]

    add, bad, refusals = blockdev["add"], blockdev["bad"], blockdev["refusals"]
    assert isinstance(add, dict) and isinstance(bad, dict) and isinstance(refusals, dict)
    add_med = {name: statistics.median(v) for name, v in add.items()}
    bad_med = {name: statistics.median(v) for name, v in bad.items()}
    print(f"\n(e) blockdev-add of a fresh qcow2-over-file node through qemu.qmp, "
          f"{opts.blockdev_calls} sequential calls (each followed by an untimed blockdev-del); "
          "QEMU -M q35 -S, qmpvm --preconfig (no machine: checked and recorded):")  # fmt: skip
    for name, values in add.items():
        print(f"    {name:18s} median {ms(add_med[name])}/call, "
              f"mean {ms(statistics.fmean(values))}/call")  # fmt: skip
    print(f"    invalid blockdev-add ('file.filename' a number), {opts.blockdev_calls} calls:")
    for name in bad:
        print(f"    {name:18s} median {ms(bad_med[name])}/call   {refusals[name]}")
    add_ratio = add_med["qmpvm"] / add_med["QEMU"]
    add_disk_ratio = add_med["qmpvm --state-dir"] / add_med["QEMU"]
    bad_ratio = bad_med["qmpvm"] / bad_med["QEMU"]

    print("\nratios (qmpvm / QEMU; <= 1.0 means qmpvm is as fast or faster):")
    print(f"    start -> greeting ({best}): {greet_ratio:.2f}   "
          f"goal <= 1.0: {goal(greet_ratio <= 1.0)}")  # fmt: skip
    print(f"    query-status round trip, median:  {rt_ratio:.2f}   "
          f"goal <= 1.0: {goal(rt_ratio <= 1.0)}")  # fmt: skip
    print(f"    query-status round trip, mean:    {rt_mean_ratio:.2f}")
    print(f"    {opts.pipeline} pipelined, total:         {pipe_ratio:.2f}")
    print(f"    {opts.clients} raw-socket clients: {raw_rate:,.0f} commands/s   "
          f"goal >= {GOAL_COMMANDS_PER_S:,}: {goal(raw_rate >= GOAL_COMMANDS_PER_S)}")  # fmt: skip
    print(f"    ({opts.clients} qemu.qmp clients: {many['qemu.qmp'][0]:,.0f} commands/s, "
          "bound by the client library)")  # fmt: skip
    sizes = f"{len(schema_replies[schema_best]):,} vs {len(schema_replies['QEMU']):,} bytes"
    print(f"    start -> query-qmp-schema reply ({schema_best}): {schema_ratio:.2f}   "
          f"(no goal; reply {sizes})")  # fmt: skip
    print(f"    blockdev-add round trip, median, in memory: {add_ratio:.2f}   "
          f"goal <= {GOAL_BLOCKDEV_RATIO}: {goal(add_ratio <= GOAL_BLOCKDEV_RATIO)}")  # fmt: skip
    print(f"    blockdev-add round trip, median, --state-dir (fsync): {add_disk_ratio:.2f}   "
          "(no goal)")  # fmt: skip
    print(f"    invalid blockdev-add round trip, median, in memory: {bad_ratio:.2f}")
    return 0


def qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("\n", 1)[0].removeprefix("QEMU emulator version ")


if __name__ == "__main__":
    sys.exit(main())
