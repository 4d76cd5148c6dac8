"""libvirt 9.0 starting and probing QEMU 7.2 and qmpvm-system-x86_64, in one run.

A private libvirtd (``tests/interop/libvirt_env.py``: libvirtd and virtlogd
as root in a mount namespace of their own, no security driver, no cgroups;
its log has the qemu driver's decisions and all monitor traffic at debug
level) drives the domain of ``tests/interop/test_libvirt.py``
(``domain_xml``): ``type='qemu'`` (TCG), q35, 256 MiB, 1 vCPU, 8
pcie-root-ports, direct kernel boot of the test guest
(``qmpvm.images.build_guest()``, ``console=ttyS0 panic=-1 quiet``), a 64 MiB
sparse raw disk on virtio, user networking with a virtio NIC, the serial
console on a pty that libvirt also logs to a file.  The two domains differ
only in ``<emulator>``: ``/usr/bin/qemu-system-x86_64`` and
``.venv/bin/qmpvm-system-x86_64`` (next to ``sys.executable``).

(1) ``virsh start`` -> ready marker.  The clock (``time.time()``, so that it
    lines up with libvirtd's log) runs from launching ``virsh start NAME``
    to :data:`qmpvm.images.READY_MARKER` in the serial log file (removed
    before each start, polled every 10 ms with the test's ``Domain.wait_for``);
    ``virsh start`` alone is the time until that command returns (libvirt
    has then started the emulator, set it up over QMP and sent ``cont``).
    One daemon for all boots; both emulators are probed (``virsh
    domcapabilities``) and booted once each, unmeasured, first; then
    ``--runs`` (5) boots of each in ABBA order, each followed by ``virsh
    destroy`` and a wait until none of the domain's processes is left.
    Median of each.  Goal: qmpvm / QEMU <= 1.1.

    To show where the time goes, each start is cut at libvirtd's log lines
    (median per step): the request reaching the qemu driver
    (``qemuProcessStart``), the emulator forked (``running with pid``), its
    reply to ``qmp_capabilities`` (QEMU answers once the command-line machine
    exists), the guest CPU check (``qom-list`` and ~400 ``qom-get`` of the
    vCPU), ``cont`` sent, the RESUME event, the start finished (``Writing
    domain status``), ``virsh`` returned, the ready marker.  Also the monitor
    commands libvirt sent during the start, with their round trips (from
    ``QEMU_MONITOR_SEND_MSG`` to ``QEMU_MONITOR_RECV_REPLY`` of the same id),
    and the CPU time of the domain's processes at the ready marker
    (qmpvm: the control plane and its engine apart).

(2) Capability probe.  ``--runs`` fresh daemons (an empty libvirt cache
    each), qmpvm's own capability cache warm (``qmpvm --print-qmp`` loads or
    writes it first; qmpvm under libvirt finds it in the account's home).
    A new libvirtd probes the ``qemu-system-*`` on its PATH while it starts,
    so ``/usr/bin/qemu-system-x86_64`` is already in its cache when the
    daemon answers: QEMU is probed here through a symlink to it
    (``WORKDIR/bin/qemu-system-x86_64``, a path libvirt has not seen), qmpvm
    at its own path, one after the other by ``virsh domcapabilities
    --emulatorbin B --virttype qemu --machine q35`` (order alternating
    between daemons).  Timed: per binary, from libvirtd's first "probe
    capabilities of B" (process launch) to its "Saved caps ... for B"
    (``test_libvirt.probe_spans``, as ``test_probe_times`` does), median;
    and each ``virsh domcapabilities`` wall time.  libvirt launches each
    binary twice (``-machine none,accel=kvm:tcg``, then ``accel=tcg``: /dev/kvm
    opens here); each probe process's life (launch -> "Killing QMP caps
    process") is shown too, and the rest of the span is libvirt's own:
    mostly ``virProcessKillPainfully`` polling (every 200 ms) until the
    killed, daemonized probe process has gone, which here takes as long as
    PID 1 needs to reap an orphan.  The span of ``/usr/bin/qemu-system-x86_64``
    probed while the daemon started is shown for reference.  Goal: qmpvm /
    QEMU <= 1.0 on the span.

Every libvirt process is ended on exit, on errors and on SIGTERM (the
daemons' ``LibvirtEnv.stop``: running domains destroyed, both daemons and
whatever is left in their namespace terminated by pid; then any process
whose command line names the private root, in case the daemons were being
started when the run ended).

Command::

    .venv/bin/python benchmarks/libvirt.py             # 5 runs each (~5 min)
    .venv/bin/python benchmarks/libvirt.py --quick     # 2 runs each (~2.5 min)
    .venv/bin/python benchmarks/libvirt.py --runs 9

It needs root, libvirt 9.0 (``libvirt-daemon libvirt-daemon-driver-qemu
libvirt-clients``) and unshare; it says why and exits 2 otherwise.  libvirt
starts qmpvm with an environment of its own (no PYTHONDONTWRITEBYTECODE), so
qmpvm's modules load from ``__pycache__``; the benchmark warns when that
bytecode is stale or a source changed during the run (the warm-up start
compiles it once).

Measured here, 2026-12-01 19:48 UTC (2 cores, QEMU 7.2.22, libvirt 9.0.0,
TCG, CPython 3.11.7; another engineer's stress tests ran meanwhile, load
average 0.73 -> 1.50; default run, ~3 min)::

    (1) QEMU   ready marker median 5.271 s (4.686 .. 6.015), virsh start 0.564 s
        qmpvm  ready marker median 6.013 s (5.004 .. 7.029), virsh start 1.028 s
    (2) QEMU   first launch -> caps saved median 3.948 s; domcapabilities 3.989 s
        qmpvm  first launch -> caps saved median 3.951 s; domcapabilities 3.978 s
    virsh start -> ready marker, qmpvm / QEMU: 1.141   goal <= 1.1: MISSED
    capability probe, qmpvm / QEMU: 1.001   goal <= 1.0: MISSED

In the start, qmpvm adds ~0.46 s before the guest runs, all of it in its
monitor: its reply to ``qmp_capabilities`` comes ~0.1 s later (Python
starts, then the engine builds the machine), the first command it relays
(``query-migrate-capabilities``) takes ~0.16 s (the engine's schema checker
is built on first use), and each of the ~400 ``qom-get`` of the CPU check
takes ~0.37 ms more (1.27 against 0.90 ms).  The guest's own boot after
RESUME varies by +-0.4 s between runs either way (a ``--quick`` run just
before: qmpvm 0.38 s faster there, ratio 0.98); the engine's CPU time per
boot equals QEMU's.  In the probe, qmpvm's probe processes live longer (328
and 289 ms against 227 and 74 ms: Python and the daemonizing parent before
the monitor answers), but each span is ~3.3-3.6 s of libvirt waiting for
the killed probe processes to go: they are daemonized orphans, and PID 1
here reaps an orphan ~1.7-1.9 s after it dies, while libvirt polls every
200 ms.  So the two spans tie within that polling; on a host whose init
reaps at once, qmpvm's probe would take about twice QEMU's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from monitor import stale_bytecode, warm_capability_cache
from processes import REPO, cpu_seconds, loadavg

from qmpvm.engine.caps import cache_dirs, cache_path, resolve_binary, stat_identity
from qmpvm.images import READY_MARKER, GuestImage, build_guest

# the helpers of tests/interop, imported as pytest imports them (tests/ for conftest)
sys.path += [str(REPO / "tests"), str(REPO / "tests" / "interop")]
from libvirt_env import LibvirtEnv, unavailable
from test_libvirt import (
    EMULATORS,
    Domain,
    defined,
    domain_xml,
    domcapabilities,
    probe_spans,
)

QEMU = EMULATORS["qemu"]
QMPVM = EMULATORS["qmpvm"]
NAMES = {"QEMU": "qemu", "qmpvm": "qmpvm"}  # label -> the EMULATORS key
DISK_BYTES = 64 << 20
BOOT_TIMEOUT = 120.0
GOAL_BOOT = 1.1
GOAL_PROBE = 1.0

# -- ending what we started -----------------------------------------------------


def exit_once_on_sigterm() -> None:
    """SIGTERM -> SystemExit, so that the ``with`` blocks end the daemons; a
    second SIGTERM is ignored, so that it cannot cut that cleanup short."""

    def terminated(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)


def end_pid(pid: int, grace: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def sweep(root: Path) -> list[int]:
    """End any process whose command line names ``root`` (libvirtd and virtlogd
    run with ``-f ROOT/etc/...``) and whatever shares their private mount
    namespace (the probes libvirtd launches as it starts): only a run cut
    short while the daemons were starting, before their pids were known, can
    leave any."""
    needle = str(root).encode() + b"/"
    ours = os.readlink("/proc/self/ns/mnt")
    daemons, namespaces = [], set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    daemons.append(int(entry.name))
                    namespaces.add(os.readlink(entry / "ns" / "mnt"))
    namespaces.discard(ours)  # never what runs beside us
    inside = []
    for entry in Path("/proc").iterdir():
        if namespaces and entry.name.isdigit() and int(entry.name) not in daemons:
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "mnt") in namespaces:
                    inside.append(int(entry.name))
    for pid in (*daemons, *inside):
        end_pid(pid)
    return [*daemons, *inside]


@contextlib.contextmanager
def private_libvirt() -> Iterator[LibvirtEnv]:
    root = Path(tempfile.mkdtemp(prefix="lv", dir="/tmp"))  # short: socket paths
    try:
        with LibvirtEnv.start(root) as env:
            yield env
    finally:
        if left := sweep(root):
            print(f"WARNING: ended leftover libvirt processes {left}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)


# -- libvirtd's log ---------------------------------------------------------------

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\+0000: ")
SENT = re.compile(r'QEMU_MONITOR_SEND_MSG: .*?msg=\{"execute":"([^"]+)".*"id":"(libvirt-\d+)"\}')
REPLY = re.compile(r'QEMU_MONITOR_RECV_REPLY: .*"id": ?"(libvirt-\d+)"\}\s*$')

#: The points a start is cut at: the first line (after the request) that has the text.
MARKS = {
    "request": "qemuProcessStart:",
    "forked": "running with pid=",
    "cpu check": "qemuMonitorGetGuestCPU:",
    "cpu checked": "Detecting IOThread PIDs",
    "running": "into running state",
    "started": "Writing domain status to disk",
}

#: The steps printed: (what, from mark, to mark).
STEPS = [
    ("virsh launched -> request in the driver", "virsh", "request"),
    ("request -> emulator forked", "request", "forked"),
    ("forked -> qmp_capabilities answered", "forked", "monitor"),
    ("-> guest CPU check (migration caps, chardevs)", "monitor", "cpu check"),
    ("guest CPU check (qom-list, qom-get x N)", "cpu check", "cpu checked"),
    ("-> cont sent (iothreads, block nodes, devices)", "cpu checked", "cont"),
    ("cont sent -> RESUME event", "cont", "running"),
    ("RESUME -> start finished (status written)", "running", "started"),
    ("start finished -> virsh returned", "started", "returned"),
    ("RESUME -> ready marker (the guest boots)", "running", "ready"),
]


def stamp(line: str) -> float | None:
    m = STAMP.match(line)
    if m is None:
        return None
    return datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC).timestamp()


@dataclass
class Start:
    marks: dict[str, float]
    #: command -> its round trips (s), in the order sent
    round_trips: dict[str, list[float]] = field(default_factory=dict)


def parse_start(log: str) -> Start:
    marks: dict[str, float] = {}
    sent: dict[str, tuple[str, float]] = {}
    start = Start(marks)
    for line in log.splitlines():
        t = stamp(line)
        if t is None:
            continue
        if "request" not in marks and MARKS["request"] not in line:
            continue
        for mark, text in MARKS.items():
            if mark not in marks and text in line:
                marks[mark] = t
        if (m := SENT.search(line)) is not None:
            sent[m[2]] = (m[1], t)
            if m[1] == "cont" and "cont" not in marks:
                marks["cont"] = t
        elif (m := REPLY.search(line)) is not None and m[1] in sent:
            command, t0 = sent.pop(m[1])
            start.round_trips.setdefault(command, []).append(t - t0)
            if command == "qmp_capabilities" and "monitor" not in marks:
                marks["monitor"] = t
        if "started" in marks:
            break
    missing = {*MARKS, "monitor", "cont"} - set(marks)
    if missing:
        raise RuntimeError(f"libvirtd's log lacks {sorted(missing)} for this start")
    return start


# -- (1) virsh start -> ready marker ---------------------------------------------


@dataclass
class Boot:
    virsh: float  # virsh start launched -> returned
    ready: float  # virsh start launched -> ready marker
    start: Start
    cpu: dict[str, float]  # CPU-s per process kind at the ready marker


def processes_cpu(dom: Domain, label: str) -> dict[str, float]:
    """CPU time of the domain's processes: QEMU; or qmpvm and its engine."""
    cpu: dict[str, float] = {}
    for pid in dom.process_pids():
        with contextlib.suppress(OSError):
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
            kind = label if label == "QEMU" else "engine" if exe.startswith("qemu") else "qmpvm"
            cpu[kind] = cpu.get(kind, 0.0) + cpu_seconds(pid)
    return cpu


def boot(env: LibvirtEnv, dom: Domain, label: str) -> Boot:
    dom.serial_log.unlink(missing_ok=True)
    offset = env.daemon_log.stat().st_size
    t0 = time.time()
    env.virsh("start", dom.name)
    t1 = time.time()
    dom.wait_for(READY_MARKER, timeout=BOOT_TIMEOUT)
    t2 = time.time()
    cpu = processes_cpu(dom, label)
    env.virsh("destroy", dom.name)
    deadline = time.monotonic() + 30
    while dom.process_pids():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{dom.name}: processes {dom.process_pids()} left after destroy")
        time.sleep(0.05)
    with env.daemon_log.open("rb") as f:
        f.seek(offset)
        start = parse_start(f.read().decode(errors="replace"))
    start.marks.update(virsh=t0, returned=t1, ready=t2)
    return Boot(virsh=t1 - t0, ready=t2 - t0, start=start, cpu=cpu)


def bench_boot(workdir: Path, guest: GuestImage, runs: int) -> dict[str, list[Boot]]:
    boots: dict[str, list[Boot]] = {label: [] for label in NAMES}
    with private_libvirt() as env, contextlib.ExitStack() as domains:
        doms: dict[str, Domain] = {}
        for label, key in NAMES.items():
            name = f"bench-{key}"
            disk = workdir / f"{name}.raw"
            with disk.open("wb") as f:
                f.truncate(DISK_BYTES)
            doms[label] = Domain(env, name, workdir / f"{name}-serial.log")
            t0 = time.perf_counter()
            domcapabilities(env, EMULATORS[key])  # libvirt probes it (not timed here)
            probed = time.perf_counter() - t0
            xml = domain_xml(name, EMULATORS[key], guest, disk, doms[label].serial_log)
            domains.enter_context(defined(env, name, xml, workdir))
            print(f"  {label}: probed by libvirt in {probed:.2f} s; domain {name} defined",
                  flush=True)  # fmt: skip
        print("  warm-up (not counted): one start of each", flush=True)
        for label, dom in doms.items():
            warm = boot(env, dom, label)
            print(f"    {label}: virsh start {warm.virsh:.3f} s, ready {warm.ready:.3f} s",
                  flush=True)  # fmt: skip
        for n in range(1, runs + 1):
            order = list(NAMES) if n % 2 else list(reversed(NAMES))  # ABBA
            for label in order:
                boots[label].append(boot(env, doms[label], label))
            q, v = boots["QEMU"][-1], boots["qmpvm"][-1]
            print(f"  run {n} ({' then '.join(order)}): "
                  f"QEMU start {q.virsh:.3f} s, ready {q.ready:.3f} s   "
                  f"qmpvm start {v.virsh:.3f} s, ready {v.ready:.3f} s", flush=True)  # fmt: skip
    return boots


# -- (2) the capability probe ----------------------------------------------------


@dataclass
class Probe:
    span: dict[str, float]  # label -> first launch -> saved caps (libvirtd's log)
    wall: dict[str, float]  # label -> virsh domcapabilities
    sessions: dict[str, dict[str, float]]  # label -> machine -> launch -> killed
    at_daemon_start: float  # /usr/bin/qemu-system-x86_64, probed as the daemon started
    cached_wall: float  # virsh domcapabilities of that one (libvirt's cache)
    daemon_up: float  # LibvirtEnv.start() until virsh answers


def probe_once(binaries: dict[str, str], order: list[str]) -> Probe:
    t0 = time.perf_counter()
    with private_libvirt() as env:
        daemon_up = time.perf_counter() - t0
        wall = {}
        for label in order:
            t0 = time.perf_counter()
            domcapabilities(env, binaries[label])
            wall[label] = time.perf_counter() - t0
        t0 = time.perf_counter()
        domcapabilities(env, QEMU)
        cached_wall = time.perf_counter() - t0
        spans, launches = probe_spans(env)
    by_path = {path: label for label, path in binaries.items()}
    sessions: dict[str, dict[str, float]] = {label: {} for label in binaries}
    for path, machine, seconds in launches:
        if path in by_path:
            sessions[by_path[path]][machine] = seconds
    missing = [path for path in (*binaries.values(), QEMU) if path not in spans]
    if missing:
        raise RuntimeError(f"libvirtd's log has no complete probe of {missing}")
    return Probe(
        span={label: spans[path] for label, path in binaries.items()},
        wall=wall,
        sessions=sessions,
        at_daemon_start=spans[QEMU],
        cached_wall=cached_wall,
        daemon_up=daemon_up,
    )


def bench_probe(workdir: Path, runs: int) -> list[Probe]:
    link = workdir / "bin" / "qemu-system-x86_64"
    link.parent.mkdir()
    link.symlink_to(QEMU)
    binaries = {"QEMU": str(link), "qmpvm": QMPVM}
    probes = []
    for n in range(1, runs + 1):
        order = list(NAMES) if n % 2 else list(reversed(NAMES))
        p = probe_once(binaries, order)
        probes.append(p)
        print(f"  daemon {n} (up in {p.daemon_up:.2f} s; {' then '.join(order)}): "
              f"span QEMU {p.span['QEMU']:.3f} s, qmpvm {p.span['qmpvm']:.3f} s; "
              f"domcapabilities QEMU {p.wall['QEMU']:.3f} s, qmpvm {p.wall['qmpvm']:.3f} s",
              flush=True)  # fmt: skip
    return probes


def orphan_reap_delay() -> float:
    """Seconds from killing an orphan (as libvirt's daemonized probe processes
    are) until its pid is gone, that is until PID 1 has reaped it."""
    started = subprocess.run(
        ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    proc = Path(f"/proc/{int(started.stdout)}")
    try:
        time.sleep(0.1)
        t0 = time.monotonic()
        os.kill(int(proc.name), signal.SIGTERM)
        while proc.exists() and time.monotonic() - t0 < 10:
            time.sleep(0.005)
        return time.monotonic() - t0
    finally:
        with contextlib.suppress(OSError):  # still our sleep (not yet killed): end it
            if (proc / "cmdline").read_bytes().startswith(b"sleep"):
                os.kill(int(proc.name), signal.SIGKILL)


# -- report ------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    return f"median {med(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})"


def goal(met: bool) -> str:
    return "met" if met else "MISSED"


def report_boot(boots: dict[str, list[Boot]], runs: int) -> float:
    print(f"\n(1) virsh start -> {READY_MARKER}, {runs} starts each (ABBA):")
    for label, runs_of in boots.items():
        print(f"    {label:6s} ready marker:  {spread([b.ready for b in runs_of])}")
        print(f"    {label:6s} virsh start:   {spread([b.virsh for b in runs_of])}")
    print(f"    {'steps (libvirtd log), median ms':48s} {'QEMU':>7s}  {'qmpvm':>7s}  qmpvm-QEMU")
    for what, a, b in STEPS:
        q, v = (med([x.start.marks[b] - x.start.marks[a] for x in boots[k]]) for k in NAMES)
        print(f"      {what:46s} {q * 1000:7.0f}  {v * 1000:7.0f}  {(v - q) * 1000:+8.0f}")
    totals = {}
    for label, runs_of in boots.items():
        rts = runs_of[-1].start.round_trips
        count = sum(len(v) for v in rts.values())
        totals[label] = med([sum(map(sum, b.start.round_trips.values())) for b in runs_of])
        qom = med([statistics.fmean(b.start.round_trips.get("qom-get", [0.0])) for b in runs_of])
        print(f"    {label:6s} monitor commands during a start: {count} "
              f"({len(rts.get('qom-get', []))} qom-get), their round trips sum to "
              f"{totals[label] * 1000:.0f} ms (median); qom-get mean "
              f"{qom * 1000:.2f} ms")  # fmt: skip
    diffs = []
    commands = set(boots["QEMU"][-1].start.round_trips) | set(boots["qmpvm"][-1].start.round_trips)
    for command in commands:
        per = {
            label: med([sum(b.start.round_trips.get(command, [0.0])) for b in runs_of])
            for label, runs_of in boots.items()
        }
        diffs.append((per["qmpvm"] - per["QEMU"], command, per))
    diffs.sort(reverse=True)
    print("    largest differences in a command's round trips (summed per start, median):")
    for diff, command, per in diffs[:6]:
        print(f"      {command:28s} QEMU {per['QEMU'] * 1000:6.1f} ms  "
              f"qmpvm {per['qmpvm'] * 1000:6.1f} ms  ({diff * 1000:+.1f} ms)")  # fmt: skip
    for label, runs_of in boots.items():
        kinds = sorted({k for b in runs_of for k in b.cpu})
        text = ", ".join(f"{k} {med([b.cpu.get(k, 0.0) for b in runs_of]):.2f}" for k in kinds)
        print(f"    {label:6s} CPU-s by the ready marker (median): {text}")
    return med([b.ready for b in boots["qmpvm"]]) / med([b.ready for b in boots["QEMU"]])


def report_probe(probes: list[Probe], reap: float) -> tuple[float, float]:
    print(f"\n(2) capability probe, {len(probes)} fresh daemons, qmpvm's own cache warm:")
    for label in NAMES:
        spans = [p.span[label] for p in probes]
        print(f"    {label:6s} first launch -> caps saved: {spread(spans)}")
        machines = dict.fromkeys(m for p in probes for m in p.sessions[label])  # launch order
        lives = {m: med([p.sessions[label].get(m, 0.0) for p in probes]) for m in machines}
        inside = med([sum(p.sessions[label].values()) for p in probes])
        text = ", ".join(f"-machine {m} {s * 1000:.0f} ms" for m, s in lives.items())
        print(f"           probe processes, launch -> killed: {text}; "
              f"libvirt's own time (mostly waiting for the killed probes to go): "
              f"{(med(spans) - inside) * 1000:.0f} ms")  # fmt: skip
        walls = [p.wall[label] for p in probes]
        print(f"    {label:6s} virsh domcapabilities:      {spread(walls)}")
    print(f"    /usr/bin/qemu-system-x86_64 probed as the daemon started: "
          f"{spread([p.at_daemon_start for p in probes])}; its domcapabilities afterwards "
          f"(cached): median {med([p.cached_wall for p in probes]) * 1000:.0f} ms")  # fmt: skip
    init = Path("/proc/1/comm").read_text().strip()
    print(f"    an orphan here is gone {reap:.2f} s after it is killed (PID 1, {init}, reaps it "
          "then); libvirt waits for that after killing each probe process")  # fmt: skip
    print(f"    daemon start (LibvirtEnv.start, probing i386 and x86_64 QEMU): "
          f"{spread([p.daemon_up for p in probes])}")  # fmt: skip
    span_ratio = med([p.span["qmpvm"] for p in probes]) / med([p.span["QEMU"] for p in probes])
    inside = {k: med([sum(p.sessions[k].values()) for p in probes]) for k in NAMES}
    return span_ratio, inside["qmpvm"] / inside["QEMU"]


def sources_mtime() -> float:
    return max(p.stat().st_mtime for p in (REPO / "qmpvm").rglob("*.py"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 runs each (smoke run)")
    parser.add_argument("--runs", type=int, help="starts of each and fresh daemons (default 5)")
    opts = parser.parse_args()
    opts.runs = opts.runs or (2 if opts.quick else 5)
    reason = unavailable()
    if reason is None and not os.access(QMPVM, os.X_OK):
        reason = f"{QMPVM} is missing: run this with the project's .venv/bin/python"
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    exit_once_on_sigterm()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    load_before = loadavg()
    version = subprocess.run(
        ["virsh", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(f"libvirt benchmark, {when}: libvirt {version}, {os.cpu_count()} CPUs, "
          f"{opts.runs} runs each; QEMU {QEMU}, qmpvm {QMPVM}", flush=True)  # fmt: skip
    if stale := stale_bytecode():
        print(f"WARNING: no up-to-date .pyc for {len(stale)} qmpvm module(s), e.g. {stale[0]} "
              "(a start that imports one compiles it, unless it may write the .pyc)",
              flush=True)  # fmt: skip
    print(warm_capability_cache(), flush=True)
    identity = stat_identity(resolve_binary("qemu-system-x86_64"))
    caches = [cache_path(d, identity) for d in cache_dirs()]
    cache_before = {c: c.stat().st_mtime_ns for c in caches if c.exists()}
    sources_before = sources_mtime()
    workdir = Path(tempfile.mkdtemp(prefix="lvb", dir="/tmp"))
    try:
        guest = build_guest()
        print(f"guest: kernel {guest.kernel_version}, initrd {guest.initrd}", flush=True)
        print("(1) virsh start -> ready marker", flush=True)
        boots = bench_boot(workdir, guest, opts.runs)
        print("(2) capability probe", flush=True)
        probes = bench_probe(workdir, opts.runs)
        reap = statistics.median(orphan_reap_delay() for _ in range(3))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = loadavg()
    cache_after = {c: c.stat().st_mtime_ns for c in caches if c.exists()}

    print(f"\nload average: {load_before} -> {load_after} (other work on the host skews figures)")
    if cache_after != cache_before:
        print("WARNING: qmpvm's capability cache changed during the run: some start probed")
    if sources_mtime() > sources_before:
        print("WARNING: qmpvm's sources changed during the run: a start after it compiled them")
    boot_ratio = report_boot(boots, opts.runs)
    virsh_ratio = med([b.virsh for b in boots["qmpvm"]]) / med([b.virsh for b in boots["QEMU"]])
    probe_ratio, inside_ratio = report_probe(probes, reap)
    wall_ratio = med([p.wall["qmpvm"] for p in probes]) / med([p.wall["QEMU"] for p in probes])
    print("\nratios (qmpvm / QEMU; lower is better for qmpvm):")
    print(f"    virsh start alone, qmpvm / QEMU: {virsh_ratio:.3f}")
    print(f"    virsh domcapabilities, fresh daemon, qmpvm / QEMU: {wall_ratio:.3f}")
    print(f"    probe processes' lives (launch -> killed), qmpvm / QEMU: {inside_ratio:.3f}")
    print(f"    virsh start -> ready marker, qmpvm / QEMU: {boot_ratio:.3f}   "
          f"goal <= {GOAL_BOOT}: {goal(boot_ratio <= GOAL_BOOT)}")  # fmt: skip
    print(f"    capability probe, qmpvm / QEMU: {probe_ratio:.3f}   "
          f"goal <= {GOAL_PROBE}: {goal(probe_ratio <= GOAL_PROBE)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
