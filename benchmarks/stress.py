"""Hostile clients: qmpvm and QEMU 7.2 under the same flood, in one run.

The stress suite (``tests/stress/``) at full size, timed.  The hostile
units are the suite's (``tests/stress/stress_support.py``: garbage bytes,
truncated and deeply nested JSON, numbers such as 1e999, strings of up to
``--big`` MiB, invalid UTF-8, unpaired surrogate escapes, duplicate keys,
arguments of the wrong type for every command of qmpvm's
``query-qmp-schema``, commands refused by the state, harmless queries),
made from ``--seed``; every unit ends with two 0xFF bytes, so none can join
the next into a command that succeeds.

Peer: ``qemu-system-x86_64 -machine none -nodefaults -display none -qmp
unix:A,server=on,wait=off -qmp unix:B,server=on,wait=off``.  A QEMU monitor
socket serves one client at a time, so the flood goes to A while the
checker uses B.  qmpvm (``python -m qmpvm --preconfig -qmp unix:S,...``, its
store in memory) takes the same flood on one connection of S while the
checker is another; then on ``--connections`` connections at once (two in
eight never send ``qmp_capabilities``), which QEMU cannot serve.  Both get
the same small configuration first (a null chardev, a null-co node, a raw
node over it, a secret; on qmpvm also ``machine-set``), which the refused
units name.

The flood runs in a separate process (this file with ``--flood-worker``),
cycling a pool of ``--pool`` units for ``--seconds``, reading and checking
every reply line (CRLF, UTF-8, JSON without Infinity/NaN/1e999, no unpaired
surrogate, a QMP message, no "internal error"), then sends a marker and
waits for its answer.  Measured:

* hostile units per second absorbed: units sent / (first byte to the
  marker's answer), and MB/s;
* the checker (one ``qemu.qmp`` QMPClient in this process) sending
  ``query-status`` one at a time for the whole flood, each answer compared
  with the one given before any flood: p50 / p99 / max round trip, during
  the flood and on the idle server (``--seconds`` / 4 each, taking turns);
* QEMU reads hostile input 20-40 times more slowly than qmpvm (a 400 KiB
  string costs it ~1.7 s of CPU), so in the same time it takes far less of
  the stream.  So qmpvm gets the flood three times: the same units in the
  same order at the pace QEMU took them (the comparison with QEMU), then as
  fast as it takes them on one connection and on ``--connections``;
* peak RSS (VmHWM) of each server after each phase;
* qmpvm with ``--slow-readers`` clients that send requests with large
  answers and never read, the checker timed meanwhile;
* ``--many`` connections opened at once: all greeted, all answered, then
  qmpvm's descriptors back to where they were.

After each qmpvm phase its ``config-export`` must be unchanged and its log
free of tracebacks.

Goals (issue 7): the checker's p99 during the flood <= 3x its idle p99;
qmpvm's peak RSS <= 64 MiB.  Printed last: the checker's p99 during the
same one-connection flood at the same pace, qmpvm / QEMU.

Command::

    .venv/bin/python benchmarks/stress.py                 # full run (~5 min)
    .venv/bin/python benchmarks/stress.py --seconds 20    # shorter (~2 min)

Measured here, 2026-12-01 20:37 UTC (2 cores, QEMU 7.2.22, CPython 3.11.7,
load average 0.7-1.1, 60 s floods, seed 7207), p50 / p99 / max of the
checker's query-status in ms (the whole table and its history: BENCHMARKS.md)::

    QEMU idle                               0.43 /  0.69 /  11.0
    qmpvm idle                              0.26 /  0.52 /  10.9
    QEMU flood, 1 connection      5 units/s 0.55 /  1.30 /  74.0   VmHWM 53.0 MiB
    qmpvm, QEMU's pace            5 units/s 0.29 /  0.66 /  24.3
    qmpvm flood, 1 connection   174 units/s 1.24 /  5.17 /  32.3   5.7 ms CPU/unit
    qmpvm flood, 16 connections 122 units/s 1.01 /  5.12 /  29.0   VmHWM 44.5 MiB
    qmpvm, 16 slow readers                  0.29 /  0.76 / 124.6   VmHWM 60.9 MiB
    1000 connections greeted in 0.38 s, all answered in 0.44 s
    ratios: at QEMU's pace 1.27 (met); as fast as qmpvm takes it 9.99 (1
    connection) and 9.88 (16) MISSED; peak RSS 60.9 MiB (met); p99 during
    the same flood at the same pace, qmpvm / QEMU: 0.51
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from processes import REPO, cpu_seconds, exit_on_sigterm, loadavg, stop
from qemu.qmp import QMPClient

sys.path.insert(0, str(REPO / "tests" / "stress"))
from stress_support import (
    BASELINE,
    ENGINE_BASELINE,
    NEGOTIATE,
    Findings,
    Hostile,
    RawClient,
    fd_targets,
    hostile_client,
    percentile,
    proc_status,
    server_side_connections,
    wait_until_sync,
    wrong_type_cases,
)

QEMU = "qemu-system-x86_64"
GOAL_P99_RATIO = 3.0
GOAL_RSS_MIB = 64


# -- processes ---------------------------------------------------------------------

_STARTED: list[subprocess.Popen[bytes]] = []


def launch(argv: list[str], stderr: Path) -> subprocess.Popen[bytes]:
    """In its own process group, stderr to a file (a pipe nobody reads could fill)."""
    with stderr.open("wb") as out:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out,
            start_new_session=True, cwd=REPO,
        )  # fmt: skip
    _STARTED.append(process)
    return process


def wait_for_sockets(process: subprocess.Popen[bytes], *socks: Path) -> None:
    wait_until_sync(
        lambda: all(s.exists() for s in socks) or process.poll() is not None,
        f"{socks} appear",
        timeout=60,
    )
    if process.poll() is not None:
        raise RuntimeError(f"{process.args!r} exited {process.returncode}")


def hwm_mib(pid: int) -> float:
    return proc_status(pid)["VmHWM"] / 1024


# -- the flood, in a process of its own ---------------------------------------------


def flood_worker(config_path: str) -> int:
    config = json.loads(Path(config_path).read_text())
    result = asyncio.run(_flood(config))
    print(json.dumps(result))
    return 0


async def _flood(config: dict[str, object]) -> dict[str, object]:
    seed = int(str(config["seed"]))
    listed = config["cases"]
    assert isinstance(listed, list)
    cases = [(str(name), dict(arguments)) for name, arguments in listed]
    findings = Findings(seed)
    rng = random.Random(seed)
    pool = Hostile(random.Random(seed), cases, big=int(str(config["big"]))).units(
        int(str(config["pool"]))
    )
    connections = int(str(config["connections"]))
    pace = None if config["pace"] is None else float(str(config["pace"]))
    started = time.monotonic()
    deadline = started + float(str(config["seconds"]))

    def cycle(offset: int) -> Iterator[bytes]:
        n = offset
        while time.monotonic() < deadline:
            yield pool[n % len(pool)]
            n += 1

    results = await asyncio.gather(*(
        hostile_client(
            str(config["path"]), cycle(rng.randrange(len(pool))), findings, tag=f"h{i}",
            negotiate=connections == 1 or i % 8 not in (3, 7), pace=pace,
        )
        for i in range(connections)
    ))  # fmt: skip
    elapsed = time.monotonic() - started
    return {
        "units": sum(r.units for r in results),
        "bytes": sum(r.bytes_sent for r in results),
        "lines": sum(r.lines for r in results),
        "finished": sum(r.finished for r in results),
        "connections": connections,
        "elapsed": elapsed,
        "findings": findings.counts,
        "examples": findings.examples,
    }


# -- the checker ---------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    wrong: int = 0
    flood: dict[str, object] | None = None
    hwm_mib: float = 0.0
    cpu: float | None = None
    notes: list[str] = field(default_factory=list)

    def p(self, fraction: float) -> float:
        return percentile(self.latencies, fraction) if self.latencies else float("nan")


async def round_trips(
    client: QMPClient, expected: object, phase: Phase, done: Callable[[], bool]
) -> None:
    """``query-status`` one at a time until ``done()``; each timed and compared."""
    while not done():
        started = time.perf_counter()
        got = await client.execute("query-status")
        phase.latencies.append(time.perf_counter() - started)
        if got != expected:
            phase.wrong += 1


async def idle(client: QMPClient, expected: object, phase: Phase, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    await round_trips(client, expected, phase, lambda: time.monotonic() > deadline)


async def flooded(
    path: Path,
    connections: int,
    *,
    opts: argparse.Namespace,
    cases: list[tuple[str, dict[str, object]]],
    workdir: Path,
    checker: QMPClient,
    expected: object,
    phase: Phase,
    pace: float | None = None,
) -> None:
    """The checker's round trips while a worker process floods ``path``, as
    fast as the server takes it or ``pace`` units a second."""
    config = workdir / "flood.json"
    config.write_text(json.dumps({
        "path": str(path), "connections": connections, "seconds": opts.seconds,
        "seed": opts.seed, "big": opts.big, "pool": opts.pool, "cases": cases, "pace": pace,
    }))  # fmt: skip
    worker = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--flood-worker", str(config),
        stdout=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    output = asyncio.create_task(worker.communicate())
    await round_trips(checker, expected, phase, output.done)
    stdout, _ = await output
    if worker.returncode != 0:
        raise RuntimeError(f"the flood worker failed ({worker.returncode})")
    phase.flood = json.loads(stdout)


# -- slow readers, many connections ---------------------------------------------------

SLOW_REQUESTS = [
    b'{"execute": "query-qmp-schema"}',
    b'{"execute": "query-name", "id": "' + b"x" * (256 << 10) + b'"}',
    b'{"execute": "config-export"}',
    b'{"execute": "query-commands"}',
]


async def slow_readers(
    path: Path, count: int, seconds: float, *, checker: QMPClient, expected: object, phase: Phase
) -> None:
    loop = asyncio.get_running_loop()
    socks, sending = [], []
    for i in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        sock.setblocking(False)
        request = SLOW_REQUESTS[i % len(SLOW_REQUESTS)]
        socks.append(sock)
        payload = NEGOTIATE + request * ((64 << 20) // len(request))
        sending.append(loop.create_task(loop.sock_sendall(sock, payload)))
    try:
        await idle(checker, expected, phase, seconds)
    finally:
        held = sum(not task.done() for task in sending)
        dropped = sum(task.done() and task.exception() is not None for task in sending)
        phase.notes.append(f"of {count} slow readers, {held} held back (not read from), "
                           f"{dropped} dropped by qmpvm, {count - held - dropped} read to the "
                           "end (should be 0)")  # fmt: skip
        for task in sending:
            task.cancel()
        await asyncio.gather(*sending, return_exceptions=True)
        for sock in socks:
            sock.close()


def many_connections(path: Path, pid: int, count: int) -> list[str]:
    wait_until_sync(lambda: server_side_connections(pid) <= 1, "a quiet qmpvm")
    fds_before = len(fd_targets(pid))
    findings = Findings(0)
    started = time.perf_counter()
    clients = [RawClient(path, findings) for _ in range(count)]
    greeted = time.perf_counter() - started
    for n, client in enumerate(clients):
        client.send(NEGOTIATE + f'{{"execute": "query-status", "id": {n}}}'.encode())
    answered = 0
    for n, client in enumerate(clients):
        client.message()
        reply = client.message()
        answered += reply.get("id") == n and "return" in reply
    all_answered = time.perf_counter() - started
    for client in clients:
        client.close()
    wait_until_sync(lambda: server_side_connections(pid) <= 1, "qmpvm ends the sessions")
    wait_until_sync(lambda: len(fd_targets(pid)) <= fds_before, "descriptors back", timeout=30)
    return [
        f"{count} connections opened and greeted in {greeted:.2f} s "
        f"({count / greeted:,.0f}/s); {answered} answered query-status, "
        f"all in {all_answered:.2f} s; descriptors back to {fds_before}",
        *([findings.report()] if findings else []),
    ]


# -- the run ----------------------------------------------------------------------------


async def run(workdir: Path, opts: argparse.Namespace) -> dict[str, Phase]:
    qemu_a, qemu_b, vm_sock = workdir / "qemu-a.sock", workdir / "qemu-b.sock", workdir / "vm.sock"
    qemu_argv = [QEMU, "-machine", "none", "-nodefaults", "-display", "none",
                 "-qmp", f"unix:{qemu_a},server=on,wait=off",
                 "-qmp", f"unix:{qemu_b},server=on,wait=off"]  # fmt: skip
    qemu = launch(qemu_argv, workdir / "qemu.stderr")
    vm_log = workdir / "qmpvm.stderr"
    vm = launch([sys.executable, "-m", "qmpvm", "-qmp", f"unix:{vm_sock},server=on,wait=off",
                 "--preconfig"], vm_log)  # fmt: skip
    wait_for_sockets(qemu, qemu_a, qemu_b)
    wait_for_sockets(vm, vm_sock)
    phases: dict[str, Phase] = {}
    vm_checker, qemu_checker = QMPClient("checker"), QMPClient("checker")
    await vm_checker.connect(str(vm_sock))
    await qemu_checker.connect(str(qemu_b))
    try:
        for command, arguments in BASELINE:
            await vm_checker.execute(command, arguments)
        for command, arguments in ENGINE_BASELINE:
            await qemu_checker.execute(command, arguments)
        export = await vm_checker.execute("config-export")
        qemu_state = [await qemu_checker.execute(q) for q in ("query-chardev",
                      "query-named-block-nodes")]  # fmt: skip
        vm_status = await vm_checker.execute("query-status")
        qemu_status = await qemu_checker.execute("query-status")
        schema = await vm_checker.execute("query-qmp-schema")
        assert isinstance(schema, list)
        cases = wrong_type_cases(schema)
        print(f"{len(cases)} wrong-type cases from qmpvm's query-qmp-schema", flush=True)

        idle_s = max(2.0, opts.seconds / 4)
        for name in ("QEMU idle", "qmpvm idle"):
            phases[name] = Phase(name)
        for _ in range(4):  # taking turns, so drift hits both
            await idle(qemu_checker, qemu_status, phases["QEMU idle"], idle_s / 4)
            await idle(vm_checker, vm_status, phases["qmpvm idle"], idle_s / 4)
        phases["QEMU idle"].hwm_mib = hwm_mib(qemu.pid)
        phases["qmpvm idle"].hwm_mib = hwm_mib(vm.pid)

        print(f"QEMU: {opts.seconds:g} s flood on monitor A, checker on B", flush=True)
        phase = phases["QEMU flood, 1 connection"] = Phase("QEMU flood, 1 connection")
        await flooded(qemu_a, 1, opts=opts, cases=cases, workdir=workdir, checker=qemu_checker,
                      expected=qemu_status, phase=phase)  # fmt: skip
        phase.hwm_mib = hwm_mib(qemu.pid)
        after = [await qemu_checker.execute(q) for q in ("query-chardev",
                 "query-named-block-nodes")]  # fmt: skip
        phase.notes.append(f"QEMU alive: {qemu.poll() is None}; its state unchanged: "
                           f"{after == qemu_state}")  # fmt: skip

        qemu_flood = phase.flood or {}
        qemu_pace = int(str(qemu_flood["units"])) / float(str(qemu_flood["elapsed"]))
        runs: list[tuple[str, int, float | None]] = [
            ("qmpvm, QEMU's pace, 1 connection", 1, qemu_pace),
            ("qmpvm flood, 1 connection", 1, None),
            (f"qmpvm flood, {opts.connections} connections", opts.connections, None),
        ]
        for name, connections, pace in runs:
            how = f"at {pace:.1f} units/s" if pace else "as fast as it takes them"
            print(f"qmpvm: {opts.seconds:g} s flood on {connections} connection(s), {how}",
                  flush=True)  # fmt: skip
            phase = phases[name] = Phase(name)
            cpu = cpu_seconds(vm.pid)
            await flooded(vm_sock, connections, opts=opts, cases=cases, workdir=workdir,
                          checker=vm_checker, expected=vm_status, phase=phase,
                          pace=pace)  # fmt: skip
            phase.cpu = cpu_seconds(vm.pid) - cpu
            phase.hwm_mib = hwm_mib(vm.pid)
            same = await vm_checker.execute("config-export") == export
            phase.notes.append(f"qmpvm alive: {vm.poll() is None}; config-export unchanged: {same}")

        name = f"qmpvm, {opts.slow_readers} slow readers"
        print(f"{name} for {opts.seconds / 2:g} s", flush=True)
        phase = phases[name] = Phase(name)
        await slow_readers(vm_sock, opts.slow_readers, opts.seconds / 2, checker=vm_checker,
                           expected=vm_status, phase=phase)  # fmt: skip
        phase.hwm_mib = hwm_mib(vm.pid)

        print(f"qmpvm: {opts.many} connections at once", flush=True)
        phase = phases[f"qmpvm, {opts.many} connections"] = Phase(f"{opts.many} connections")
        phase.notes = await asyncio.to_thread(many_connections, vm_sock, vm.pid, opts.many)
        phase.hwm_mib = hwm_mib(vm.pid)
        same = await vm_checker.execute("config-export") == export
        log = vm_log.read_text(errors="replace")
        phase.notes.append(f"at the end: config-export unchanged: {same}; qmpvm's log: "
                           f"{log.count('Traceback')} tracebacks, "
                           f"{log.count('internal error')} internal errors")  # fmt: skip
    finally:
        for client in (vm_checker, qemu_checker):
            with contextlib.suppress(Exception):
                await client.disconnect()
        for process in (vm, qemu):
            stop(process)
    return phases


# -- report -----------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def goal(met: bool) -> str:
    return "met" if met else "MISSED"


def report(phases: dict[str, Phase], opts: argparse.Namespace) -> None:
    print(f"\n{'':34s} {'units/s':>9s} {'MB/s':>6s} {'replies':>9s} {'bad':>6s} "
          f"{'p50 ms':>7s} {'p99 ms':>7s} {'max ms':>8s} {'calls':>7s} {'wrong':>5s} "
          f"{'VmHWM':>9s}")  # fmt: skip
    for name, phase in phases.items():
        flood = phase.flood or {}
        rate = mb = lines = bad = ""
        if flood:
            elapsed = float(str(flood["elapsed"]))
            rate = f"{int(str(flood['units'])) / elapsed:,.0f}"
            mb = f"{int(str(flood['bytes'])) / elapsed / 1e6:.1f}"
            lines = f"{int(str(flood['lines'])):,}"
            counts = flood["findings"]
            bad = str(sum(counts.values())) if isinstance(counts, dict) else "?"
        calls = f"{len(phase.latencies):,}" if phase.latencies else ""
        timing = (
            f"{ms(phase.p(0.5)):>7s} {ms(phase.p(0.99)):>7s} {ms(max(phase.latencies)):>8s}"
            if phase.latencies
            else f"{'':7s} {'':7s} {'':8s}"
        )
        print(f"{name:34s} {rate:>9s} {mb:>6s} {lines:>9s} {bad:>6s} {timing} {calls:>7s} "
              f"{phase.wrong if phase.latencies else '':>5} {phase.hwm_mib:7.1f} MiB")  # fmt: skip
    print("\n(units/s: hostile units absorbed, first byte to the end marker's answer; bad: reply "
          "lines that fail the checks; p50/p99/max: the checker's query-status round trips; "
          "wrong: answers unlike the idle one)")  # fmt: skip
    for name, phase in phases.items():
        flood = phase.flood or {}
        extra = []
        if flood:
            extra.append(f"{flood['units']:,} units, {int(str(flood['bytes'])) / 1e6:,.0f} MB "
                         f"in {float(str(flood['elapsed'])):.1f} s on {flood['connections']} "
                         f"connection(s), {flood['finished']} served to the end")  # fmt: skip
            if phase.cpu is not None:  # the checker's calls cost some of it (~40 µs each)
                per_unit = phase.cpu / max(1, int(str(flood["units"]))) * 1e6
                cost = f" = {per_unit:,.0f} µs/unit" if "pace" not in name else ""
                extra.append(f"qmpvm CPU {phase.cpu:.1f} s{cost}, with the checker's "
                             f"{len(phase.latencies):,} calls")  # fmt: skip
            examples = flood.get("examples")
            if isinstance(examples, dict):
                counts = flood["findings"]
                assert isinstance(counts, dict)
                for kind, count in counts.items():
                    extra.append(f"{count} x {kind}, e.g. {examples[kind][0][:160]}")
        for line in [*extra, *phase.notes]:
            print(f"  {name}: {line}")

    vm_idle = phases["qmpvm idle"].p(0.99)
    vm_paced = phases["qmpvm, QEMU's pace, 1 connection"].p(0.99)
    vm_one = phases["qmpvm flood, 1 connection"].p(0.99)
    vm_many = phases[f"qmpvm flood, {opts.connections} connections"].p(0.99)
    vm_slow = phases[f"qmpvm, {opts.slow_readers} slow readers"].p(0.99)
    qemu_idle = phases["QEMU idle"].p(0.99)
    qemu_flood = phases["QEMU flood, 1 connection"].p(0.99)
    peak = max(phase.hwm_mib for name, phase in phases.items() if not name.startswith("QEMU"))
    print("\nratios (p99 of the checker's round trip):")
    for label, value in (
        ("qmpvm, flood at QEMU's pace / idle", vm_paced / vm_idle),
        ("qmpvm, flood as fast as it takes it, 1 connection / idle", vm_one / vm_idle),
        (f"qmpvm, flood as fast as it takes it, {opts.connections} connections / idle",
         vm_many / vm_idle),
    ):  # fmt: skip
        print(f"    {label}: {value:.2f}   goal <= {GOAL_P99_RATIO:g}: "
              f"{goal(value <= GOAL_P99_RATIO)}")  # fmt: skip
    print(f"    qmpvm, {opts.slow_readers} slow readers / idle: {vm_slow / vm_idle:.2f}")
    print(f"    QEMU, flood as fast as it takes it / idle: {qemu_flood / qemu_idle:.2f}")
    floods = max(phase.hwm_mib for name, phase in phases.items() if "flood" in name
                 and name.startswith("qmpvm"))  # fmt: skip
    print(f"    qmpvm peak RSS (VmHWM), all phases: {peak:.1f} MiB   goal <= {GOAL_RSS_MIB} "
          f"MiB: {goal(peak <= GOAL_RSS_MIB)} (the floods alone: {floods:.1f} MiB)")  # fmt: skip
    print(f"    p99 during the same flood at the same pace, 1 connection, qmpvm / QEMU: "
          f"{vm_paced / qemu_flood:.2f}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="each flood's length (60)")
    parser.add_argument("--seed", type=int, default=7207)
    parser.add_argument("--connections", type=int, default=16, help="qmpvm's parallel flood")
    parser.add_argument("--slow-readers", type=int, default=16)
    parser.add_argument("--many", type=int, default=1000, help="connections at once")
    parser.add_argument("--big", type=int, default=4, help="scale of strings and nesting")
    parser.add_argument("--pool", type=int, default=1500, help="distinct hostile units")
    parser.add_argument("--flood-worker", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.flood_worker:
        return flood_worker(opts.flood_worker)
    exit_on_sigterm()
    load_before = loadavg()
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True)
    print(f"stress benchmark: {version.stdout.splitlines()[0]}, {os.cpu_count()} CPUs, "
          f"seed {opts.seed}, {opts.seconds:g} s per flood, load average {load_before}",
          flush=True)  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="qmpvm-stress-") as tmp:
            phases = asyncio.run(run(Path(tmp), opts))
    finally:
        for process in list(_STARTED):
            stop(process, 3.0)
    load_after = loadavg()
    print(f"load average: {load_before} -> {load_after} (other work on the host skews figures)")
    report(phases, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
