"""The monitor alone: qmpvm against QEMU 7.2's own QMP monitor, in one run.

Peer: ``qemu-system-x86_64 -M none -S -nodefaults -display none
-qmp unix:PATH,server=on,wait=off`` (no machine, only the monitor), the
closest QEMU has to qmpvm's "monitor first" start.  qmpvm is started with
``-qmp unix:PATH,server=on,wait=off --preconfig`` (no machine either), both as
``sys.executable -m qmpvm`` and as the console script ``.venv/bin/qmpvm``.

Measured, each printed as a qmpvm/QEMU ratio (lower is better for qmpvm):

(a) start to greeting: from ``Popen`` to the greeting bytes arriving on a raw
    UNIX socket (the socket is poll-connected every 1 ms until it exists);
    median of ``--runs`` (10) runs per program, the programs taking turns
    (QEMU, each qmpvm launcher, the floors, QEMU, ...) after one unmeasured
    warm-up start each.  qmpvm is started four ways: ``python -m qmpvm`` and
    ``.venv/bin/qmpvm``, each in the environment as it is (this sandbox sets
    PYTHONDONTWRITEBYTECODE=1, so qmpvm's own modules are compiled from
    source at every start) and with a .pyc cache ("+pyc":
    PYTHONPYCACHEPREFIX in the benchmark's temporary directory, which is how
    an installed package runs).  The ratio uses the fastest of the four.
(b) ``query-status`` round trip through one ``qemu.qmp`` QMPClient per
    server: sequential (2,000 calls, timed one by one; median per call, mean
    also shown) and pipelined (``asyncio.gather`` of 1,000 ``execute`` calls
    on one client; total time, median of 5 rounds).  Servers take turns in
    chunks so drift hits both.
(c) qmpvm alone: 64 concurrent qemu.qmp clients, each doing N sequential
    ``query-status``; total commands / wall time.  The clients run in this
    process, so on a small host the client library may be the bottleneck:
    the CPU time qmpvm itself spent is read from /proc and shown as the
    server's own capacity (commands per server CPU-second).

Goals (printed as met / MISSED): start-to-greeting ratio <= 1.0, sequential
round-trip ratio <= 1.0, >= 10,000 commands/s over 64 clients.

Command::

    .venv/bin/python benchmarks/monitor.py            # full run (~30 s)
    .venv/bin/python benchmarks/monitor.py --quick    # smoke run (~10 s)

The floor rows (a bare Python greeter over a plain socket, and one over
asyncio) are not qmpvm: they show what any Python server pays on this host.

Measured here, 2026-11-24 15:22 UTC (2 cores, QEMU 7.2.22, CPython 3.11.7,
TCG work from other users on the host, load average ~2.2; full run)::

    (a) start -> greeting, median of 10      QEMU 32.5 ms
        python -m qmpvm           148.2 ms   .venv/bin/qmpvm           119.0 ms
        python -m qmpvm +pyc      122.8 ms   .venv/bin/qmpvm +pyc      118.6 ms
        floor: python, socket      32.4 ms   floor: python, asyncio     84.2 ms
    (b) sequential query-status  QEMU 0.482 ms/call  qmpvm 0.380 ms/call (median)
        1000 pipelined           QEMU 368 ms         qmpvm 133 ms
    (c) 64 clients: 3,922 commands/s wall; qmpvm 1.44 CPU-s for 12,800
        commands = 8,889 commands per server CPU-second; clients 1.81 CPU-s
    ratios: greeting 3.65 (.venv/bin/qmpvm +pyc; the fastest launcher, by a
    hair over python -m qmpvm +pyc) MISSED; round trip 0.79 met (mean 0.90);
    pipelined 0.36; 64 clients 3,922/s MISSED (goal 10,000/s)

Two earlier full runs the same day (load average 3.7-4.0) gave greeting
ratios 3.84 and 3.36, round-trip ratios 0.76 and 0.68, pipelined 0.46 and
0.31, and 3,371 and 3,128 commands/s (8,050 and 8,707 per server CPU-s).
The fastest qmpvm launcher changes from run to run; the ones with a .pyc
cache always beat the ones without by 25-40 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from processes import bytecode_env, cpu_seconds, exit_on_sigterm, spawn, stop, stop_all
from qemu.qmp import ConnectError, QMPClient

QEMU = "qemu-system-x86_64"
CONSOLE_SCRIPT = Path(sys.executable).parent / "qmpvm"
GOAL_COMMANDS_PER_S = 10_000


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


def start_to_greeting(
    argv: list[str], sock: Path, env: dict[str, str] | None = None, timeout: float = 30.0
) -> float:
    """Seconds from Popen to the first greeting line on a raw UNIX socket."""
    started = time.perf_counter()
    process = spawn(argv, env)
    try:
        deadline = started + timeout
        while True:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(str(sock))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                conn.close()
                if process.poll() is not None:
                    err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                    raise RuntimeError(
                        f"{argv[0]} exited with {process.returncode}: {err}"
                    ) from None
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{argv[0]}: no QMP socket after {timeout}s") from None
                time.sleep(0.001)
        with conn:
            conn.settimeout(timeout)
            data = b""
            while b"\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    raise RuntimeError(f"{argv[0]}: connection closed before the greeting")
                data += chunk
            elapsed = time.perf_counter() - started
        if b'"QMP"' not in data:
            raise RuntimeError(f"{argv[0]}: not a QMP greeting: {data[:200]!r}")
        return elapsed
    finally:
        stop(process)


Launcher = tuple[Callable[[Path], list[str]], dict[str, str] | None]


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


def launchers(workdir: Path) -> dict[str, Launcher]:
    as_is = dict(os.environ)
    pyc = bytecode_env(workdir / "pycache")
    return {
        "QEMU": (qemu_argv, None),
        "qmpvm: python -m qmpvm": (qmpvm_module_argv, as_is),
        "qmpvm: .venv/bin/qmpvm": (qmpvm_script_argv, as_is),
        "qmpvm: python -m qmpvm +pyc": (qmpvm_module_argv, pyc),
        "qmpvm: .venv/bin/qmpvm +pyc": (qmpvm_script_argv, pyc),
        f"{REFERENCE}python, socket": (
            lambda sock: [sys.executable, "-c", _RAW_GREETER, str(sock)],
            as_is,
        ),
        f"{REFERENCE}python, asyncio": (
            lambda sock: [sys.executable, "-c", _ASYNCIO_GREETER, str(sock)],
            as_is,
        ),
    }


def bench_greeting(workdir: Path, runs: int) -> dict[str, list[float]]:
    socks = _unique_socket(workdir)
    programs = launchers(workdir)
    for make, env in programs.values():  # warm-up: page cache, the .pyc cache
        sock = next(socks)
        start_to_greeting(make(sock), sock, env)
    times: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(runs):
        for name, (make, env) in programs.items():
            sock = next(socks)
            times[name].append(start_to_greeting(make(sock), sock, env))
    return times


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


async def client_load(
    sock: Path,
    clients: int,
    calls: int,
    barrier: BarrierLike | None = None,
    mark: Callable[[], None] | None = None,
) -> tuple[float, float, float]:
    """``clients`` connections doing ``calls`` query-status each: (start, end, own CPU-s).

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


def _client_worker(
    sock: str, clients: int, calls: int, barrier: BarrierLike, results: QueueLike
) -> None:
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    results.put(asyncio.run(client_load(Path(sock), clients, calls, barrier)))


def bench_many(workdir: Path, clients: int, calls: int, procs: int) -> tuple[float, float, float]:
    """(commands/s, qmpvm CPU-s, clients' CPU-s) for ``clients`` spread over ``procs``.

    perf_counter is CLOCK_MONOTONIC, one clock for every process, so the
    wall time is the first start to the last end over all client processes.
    qmpvm's CPU time is read at the start barrier and when the last client
    process reports (in-process: right around the timed part).
    """
    sock = workdir / "many.sock"
    qmpvm = spawn(qmpvm_module_argv(sock), bytecode_env(workdir / "pycache"))
    workers: list[multiprocessing.process.BaseProcess] = []
    cpu: list[float] = []
    try:
        asyncio.run(_wait_listening(sock, qmpvm))
        if procs <= 1:

            def mark() -> None:
                cpu.append(cpu_seconds(qmpvm.pid))

            spans = [asyncio.run(client_load(sock, clients, calls, mark=mark))]
        else:
            ctx = multiprocessing.get_context("spawn")
            barrier, results = ctx.Barrier(procs + 1), ctx.Queue()
            shares = [clients // procs + (i < clients % procs) for i in range(procs)]
            for share in shares:
                worker = ctx.Process(
                    target=_client_worker, args=(str(sock), share, calls, barrier, results)
                )
                worker.start()
                workers.append(worker)
            barrier.wait(timeout=120)
            cpu.append(cpu_seconds(qmpvm.pid))
            spans = [results.get(timeout=300) for _ in workers]
            cpu.append(cpu_seconds(qmpvm.pid))
    finally:
        for worker in workers:  # they have reported (or we are failing): end them
            worker.join(5 if len(cpu) == 2 else 0)
            if worker.is_alive():
                worker.kill()
                worker.join()
        stop(qmpvm)
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
    qmpvm = spawn(qmpvm_module_argv(qmpvm_sock), bytecode_env(workdir / "pycache"))
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
    opts.per_client = 40 if opts.quick else 200
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # connect retries log errors
    exit_on_sigterm()
    load_before = loadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="qmpvm-bench-") as tmp:
            workdir = Path(tmp)
            print(f"monitor benchmark: QEMU {qemu_version()}, {os.cpu_count()} CPUs, "
                  f"{'quick' if opts.quick else 'full'} run", flush=True)  # fmt: skip
            greet = bench_greeting(workdir, opts.runs)
            mon = asyncio.run(bench_monitor(workdir, opts))
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
    assert isinstance(many, tuple)
    rate, server_cpu, client_cpu = many
    total = opts.clients * opts.per_client
    print(f"\n(c) qmpvm, {opts.clients} concurrent qemu.qmp clients "
          f"x {opts.per_client} query-status, in {opts.client_procs} process(es):")  # fmt: skip
    print(f"    {rate:,.0f} commands/s wall; qmpvm used {server_cpu:.2f} CPU-s "
          f"({total / server_cpu if server_cpu else float('inf'):,.0f} commands per server CPU-s), "
          f"the clients {client_cpu:.2f} CPU-s")  # fmt: skip

    print("\nratios (qmpvm / QEMU; <= 1.0 means qmpvm is as fast or faster):")
    print(f"    start -> greeting ({best}): {greet_ratio:.2f}   "
          f"goal <= 1.0: {goal(greet_ratio <= 1.0)}")  # fmt: skip
    print(f"    query-status round trip, median:  {rt_ratio:.2f}   "
          f"goal <= 1.0: {goal(rt_ratio <= 1.0)}")  # fmt: skip
    print(f"    query-status round trip, mean:    {rt_mean_ratio:.2f}")
    print(f"    {opts.pipeline} pipelined, total:         {pipe_ratio:.2f}")
    print(f"    64 clients: {rate:,.0f} commands/s   goal >= {GOAL_COMMANDS_PER_S:,}: "
          f"{goal(rate >= GOAL_COMMANDS_PER_S)}")  # fmt: skip
    return 0


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("\n", 1)[0].removeprefix("QEMU emulator version ")


if __name__ == "__main__":
    sys.exit(main())
