"""Snapshot, restore and live migration: qmpvm against plain QEMU, in one run.

Every machine is the test guest as the interop tests configure it
(``tests/interop/test_engine.py`` ``configure()``): q35, TCG, 1 vCPU,
256 MiB, ``qmpvm.images.build_guest()`` (the host's kernel and a busybox
initramfs) with ``guest_cmdline("q35")``, ttyS0 on a UNIX socket chardev
(``server=on,wait=off``), no disk.  qmpvm is started as
``sys.executable -m qmpvm -qmp unix:Q,server=on,wait=off --preconfig`` and
configured over QMP (machine-set, boot-set, chardev-add, device_add
isa-serial, machine-init, cont); plain QEMU gets one command line::

    qemu-system-x86_64 -nodefaults -no-user-config -display none
      -machine q35 -accel tcg -m 256M -smp 1
      -kernel K -initrd I -append "console=ttyS0 panic=-1 quiet"
      -chardev socket,id=ser0,path=S,server=on,wait=off -serial chardev:ser0
      -qmp unix:Q,server=on,wait=off

"The guest answers" below means: a fresh connection to the console socket,
``echo "PO""NG"`` written to the guest's shell, ``PONG`` read back.

Made once, before the runs (these boots are also the warm-up): a qmpvm
snapshot of the guest (``machine-snapshot {"stop": true}`` once it printed
:data:`qmpvm.images.READY_MARKER` and its shell ran one command), the same
for plain QEMU (``stop``, ``migrate-set-parameters max-bandwidth`` 64 GiB/s,
``getfd`` of a file opened here, ``migrate fd:``, until ``completed``), and a
qmpvm snapshot of the guest with its RAM in a shared file
(``object-add memory-backend-file`` with ``mem-path`` in /dev/shm,
``share: true``, ``machine-set properties memory-backend``).

Then, ``--runs`` (5) times, in ABBA order (the order of the five parts below
is reversed every other run):

(a) qmpvm cold boot: Popen -> READY_MARKER on the console.  The same guest
    then serves two more measurements: ``machine-snapshot`` into a new
    directory (guest running, not live, stop false: stop, stream, cont,
    fsync, checksums, manifest), command -> reply, and the guest's pause
    from the STOP and RESUME events' timestamps; and live migration,
    ``machine-migrate unix:DEST`` to a second qmpvm started with
    ``--preconfig`` and idle (its first ``query-status`` answered before the
    clock starts; it replays the configuration, starts an incoming engine,
    takes the stream and starts the guest; the source's engine is ended
    after the handover), command -> reply, with the engine's ``total-time``
    and ``downtime`` from the reply; then the guest answers on the
    destination.
(b) qmpvm restore: Popen -> ``machine-restore`` -> the guest answers; also
    the ``machine-restore`` round trip alone.
(c) plain QEMU restore: Popen of the command line plus ``-S -incoming defer``
    -> ``migrate-set-capabilities events``, ``getfd`` of the state file,
    ``migrate-incoming fd:`` -> MIGRATION ``completed`` -> ``cont`` -> the
    guest answers.
(d) qmpvm fast restore of the shared-RAM snapshot, timed as (b) (the
    snapshot's RAM file is mapped copy-on-write, not read).
(e) plain QEMU reference for (a)'s extra measurements: boot (not compared),
    then ``stop`` + ``migrate fd:`` into a file until MIGRATION ``completed``
    (max-bandwidth 64 GiB/s as qmpvm sets it for a snapshot; set before the
    clock, restored after it, then ``cont``); then live migration to a second
    QEMU (same command line with its own console socket, ``-incoming
    defer``, ``migrate-incoming unix:DATA``; the source ``migrate
    unix:DATA``; both with QEMU's default parameters, 128 MiB/s and 300 ms):
    ``total-time`` and ``downtime`` from the source's ``query-migrate``,
    and the wall time from ``migrate`` to the destination's RESUME (and
    from the destination's Popen).

Page-fault warm-up: after (b) and (d) answer, two commands run twice each in
the guest's shell, timed from the host (command written -> its end read
back from the console) with the engine's page faults (minflt + majflt in
/proc) counted across each: ``md5sum`` of every file of the initramfs root
(~2.5 MB, already in guest RAM: reading pages that hold data) and ``dd`` of
64 MiB into the guest's /tmp (rootfs: guest RAM) then ``rm`` (writing pages
the guest allocates).  The first run after any restore also pays TCG's
translation of the code (its translation cache starts empty), so (b), whose
RAM the stream loaded before the guest ran, is the control: what (d) adds
on top of (b), in the first run and the second, is what mapping the
snapshot's RAM copy-on-write costs the guest.  The RSS of each restored
engine is read once the guest answers.

Printed: per-run figures, medians (min .. max), and last the ratios of the
medians: b/a (goal <= 0.1), b/c (goal <= 1.0), d/a, d/c, machine-snapshot /
QEMU stop+migrate, and machine-migrate / QEMU total-time (goal <= 1.1) and
downtime.  QEMU 7.2 sends the MIGRATION ``completed`` event before it fills
in ``total-time`` and ``downtime``: a ``query-migrate`` right after the
event can read 0 for both.  Plain QEMU's are read again until set; a qmpvm
reply with 0 (qmpvm asks right after the event) is left out of the median
and counted.

Every process runs in its own process group and is ended (QMP ``quit`` for
qmpvm, then SIGTERM, then SIGKILL for the group) after its part, on errors
and on SIGTERM.  Everything is written in one work directory in /tmp
(qmpvm runs with TMPDIR inside it) and the RAM file in /dev/shm; both are
removed at exit.

qmpvm runs with the environment as is (but TMPDIR); ``--pyc`` gives it a
private .pyc cache, as in benchmarks/boot.py (this sandbox sets
PYTHONDONTWRITEBYTECODE=1, so modules edited since ``scripts/setup.sh``
compiled them are compiled at every start).

Command::

    .venv/bin/python benchmarks/snapshot.py              # 5 runs (~1 min)
    .venv/bin/python benchmarks/snapshot.py --quick      # 2 runs, smoke run (~30 s)
    .venv/bin/python benchmarks/snapshot.py --runs 9 --pyc

Measured here, 2026-12-01 21:33 UTC (2 cores, QEMU 7.2.22, TCG, CPython
3.11.7, other users' tests on the host, load average ~1.0; default run,
62 s)::

    (a) qmpvm cold boot -> ready marker       2.785 s (2.606 .. 3.533)
    (b) qmpvm machine-restore -> answers      0.371 s (0.328 .. 0.395)
        greeting 130 ms, machine-restore 188 ms; engine RSS 164 MiB
    (c) plain QEMU -incoming -> answers       0.155 s (0.125 .. 0.161)
        QMP up 51 ms, migrate-incoming + cont 44 ms; RSS 159 MiB
    (d) qmpvm fast restore -> answers         0.268 s (0.254 .. 0.340)
        greeting 98 ms, machine-restore 116 ms; engine RSS 68 MiB
        md5sum of the root, 1st/2nd: (b) 146/53 ms, 320/7 faults;
                                     (d) 160/68 ms, 564/18 faults
        dd 64 MiB into /tmp, 1st/2nd: (b) 282/188 ms, 70/34 faults;
                                      (d) 368/212 ms, 17018/1020 faults
    machine-snapshot 178 ms (guest paused 58 ms, the engine's migrate
        51 ms) vs QEMU stop + migrate 60 ms; 91.3 MiB
    machine-migrate total-time 679 ms, downtime 25 ms (3 .. 92), reply
        764 ms vs QEMU total-time 681 ms, downtime 24 ms (9 .. 33),
        migrate -> destination RESUME 685 ms; 91.4 MiB at 128 MiB/s
    ratios: b/a 0.133 (goal 0.1: missed), b/c 2.398 (goal 1.0: missed),
        d/a 0.096, d/c 1.729, snapshot 2.950, migrate total-time 0.997
        (goal 1.1: met), downtime 1.042

The next default run (21:36 UTC, 69 s): b/a 0.093 (met: the boots took
3.75 s there), b/c 2.054, d/a 0.094, d/c 2.082, snapshot 2.997, migrate
total-time 1.006, downtime 3.000 (24 against 8 ms).  Downtime ranges over
2-92 ms for both, as much as QEMU's own choice of when to stop leaves
dirty (3-7 MiB sent while stopped), so its ratio is noise at 5 runs; the
total-time is set by the 128 MiB/s limit for both.

Where (b)'s time goes (``-v -v`` logs of a restore): ~100-130 ms from Popen
to qmpvm's greeting (the interpreter and its imports; ``--pyc`` did not
shorten it), ~35-40 ms from the machine-restore request to the engine's
launch (the control plane's modules and capability cache, the snapshot's
manifest), then what plain QEMU does too: the engine up (~65 ms with the
machine built), the state loaded (~45 ms), cont.  A Python process started
before QEMU costs about as much as plain QEMU's whole restore, so b/c <= 1
cannot be met this way.  machine-snapshot pauses the guest about as long
as plain QEMU's stop + migrate; its reply then waits ~120 ms more for the
fsync and the SHA-256 of the state it re-reads.  Fast restore saves the
stream's load (machine-restore 116-154 ms against 188-192 ms) and half the
engine's memory (RSS 68 against 164 MiB: the RAM stays in the snapshot's
file until touched); the guest pays for it in copy-on-write faults, 17k for
the first 64 MiB it writes and ~240 more for 2.5 MB it reads, which cost
+86 ms and +5 ms in the two runs' first dd medians and nothing measurable
for the reads: within the run-to-run noise of TCG's own warm-up (every
first run after a restore, (b)'s too, is 1.1-2.8x its second).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from processes import bytecode_env, exit_on_sigterm, loadavg, spawn, stop, stop_all
from qemu.qmp import ConnectError, QMPClient
from qemu.qmp.events import EventListener

from qmpvm.images import READY_MARKER, GuestImage, build_guest, guest_cmdline
from qmpvm.tools.console import SocketConsole

QEMU = "qemu-system-x86_64"
MiB = 1024 * 1024
RAM = 256 * MiB
APPEND = guest_cmdline("q35")
BANDWIDTH = 64 << 30  # what qmpvm sets for a stream into a file
TIMEOUT = 120.0
PROBES = {  # name: shell command; each runs twice, right after the guest first answered
    "read": "md5sum $(find / -xdev -type f) >/dev/null",
    "write": "dd if=/dev/zero of=/tmp/probe bs=1M count=64 2>/dev/null; rm /tmp/probe",
}
GOALS = {"b/a restore / cold boot": 0.1, "b/c restore / QEMU": 1.0,
         "migrate total-time / QEMU": 1.1}  # fmt: skip

_SHM: list[Path] = []  # RAM files in /dev/shm, removed at exit

Figures = dict[str, float]


def now() -> float:
    return time.perf_counter()


def stderr_tail(process: subprocess.Popen[bytes] | None) -> str:
    """What the process wrote to stderr (its end), once it is ended; after a
    failure, so it is ended here first (``stop`` does the rest)."""
    if process is None or process.stderr is None or process.stderr.closed:
        return ""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
    if process.poll() is None:
        return ""
    os.set_blocking(process.stderr.fileno(), False)  # a child may still hold the pipe
    try:
        text = (process.stderr.read() or b"").decode(errors="replace").strip()
    except BlockingIOError:
        text = ""
    return f"\n--- stderr of {process.args[0]} (pid {process.pid}):\n{text[-3000:]}" if text else ""


def faults(pid: int) -> int:
    """minflt + majflt of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]) + int(fields[9])


def rss(pid: int) -> float:
    """Resident bytes of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024.0
    return math.nan


def millis(value: object) -> float:
    """QEMU's milliseconds as seconds; NaN for 0, which QEMU 7.2 reports when
    query-migrate comes between the MIGRATION event and its own bookkeeping."""
    return value / 1000 if isinstance(value, int) and value > 0 else math.nan


# -- QMP and the console --------------------------------------------------------


async def connect_qmp(
    process: subprocess.Popen[bytes], sock: Path, name: str, timeout: float = 30
) -> QMPClient:
    """A negotiated client, retried until the socket listens."""
    client = QMPClient(name)
    deadline = now() + timeout
    while True:  # the socket file appears at bind(), a moment before listen()
        try:
            if sock.exists():
                await client.connect(str(sock))
                return client
        except ConnectError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}: {stderr_tail(process)}")
        if now() > deadline:
            raise TimeoutError(f"{name} did not open its QMP socket in {timeout} s")
        await asyncio.sleep(0.001)


async def disconnect(client: QMPClient | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def end_qmpvm(client: QMPClient | None, process: subprocess.Popen[bytes]) -> None:
    """QMP quit (qmpvm stops its engine and exits), then the process group."""
    if client is not None and process.poll() is None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.execute("quit"), 10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(process.wait, 10)
    await disconnect(client)
    stop(process)


async def migration_info(client: QMPClient) -> dict[str, Any]:
    """query-migrate once completed, its figures filled in: QEMU 7.2 sends the
    MIGRATION event before it sets total-time and downtime."""
    deadline = now() + 5
    while True:
        info = await client.execute("query-migrate")
        if info.get("total-time") or now() > deadline:
            return dict(info)
        await asyncio.sleep(0.001)


async def migration_end(listener: EventListener, what: str) -> None:
    """The next MIGRATION event that ends a migration; it must be ``completed``."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            event = await listener.get()
            status = event["data"]["status"]
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"{what}: migration {status}")


async def ready(console_path: Path) -> SocketConsole:
    """The console, once the booting guest printed READY_MARKER."""
    console = await SocketConsole.connect(str(console_path), timeout=30)
    await console.expect(READY_MARKER, TIMEOUT)
    return console


async def answers(console_path: Path) -> SocketConsole:
    """A fresh console connection on which the guest's shell answered."""
    console = await SocketConsole.connect(str(console_path), timeout=30)
    await console.write('echo "PO""NG"\n')  # the echoed input does not contain PONG
    await console.expect("PONG", TIMEOUT)
    return console


async def probe(console: SocketConsole, command: str, engine_pid: int) -> tuple[float, int]:
    """Seconds from sending ``command`` to the guest's shell to its end being
    read back, and the engine's page faults meanwhile."""
    await console.expect("guest# ", 30)  # the prompt after what ran before
    before, t0 = faults(engine_pid), now()
    await console.write(f'{command}; echo "PRO""BED"\n')
    await console.expect("PROBED", TIMEOUT)
    return now() - t0, faults(engine_pid) - before


def event_time(event: dict[str, object]) -> float:
    stamp = event["timestamp"]
    assert isinstance(stamp, dict)
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


# -- the machine ------------------------------------------------------------------


def qemu_argv(guest: GuestImage, console: Path, qmp: Path) -> list[str]:
    return [
        QEMU, "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "q35", "-accel", "tcg", "-m", "256M", "-smp", "1",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", APPEND,
        "-chardev", f"socket,id=ser0,path={console},server=on,wait=off",
        "-serial", "chardev:ser0",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip


def qmpvm_argv(sock: Path) -> list[str]:
    return [sys.executable, "-m", "qmpvm", "-qmp", f"unix:{sock},server=on,wait=off", "--preconfig"]


async def configure(
    client: QMPClient, guest: GuestImage, console: Path, ram: Path | None = None
) -> None:
    """As the interop tests configure the guest; ``ram``: RAM in that shared file."""
    if ram is not None:
        backend = {"qom-type": "memory-backend-file", "id": "ram", "size": RAM,
                   "mem-path": str(ram), "share": True}  # fmt: skip
        await client.execute("object-add", backend)
        await client.execute("machine-set", {"properties": {"memory-backend": "ram"}})
    await client.execute("machine-set", {"type": "q35", "accel": "tcg", "memory": RAM})
    await client.execute(
        "boot-set", {"kernel": str(guest.kernel), "initrd": str(guest.initrd), "append": APPEND}
    )
    addr = {"type": "unix", "data": {"path": str(console)}}
    await client.execute(
        "chardev-add",
        {"id": "ser0", "backend": {"type": "socket",
                                   "data": {"addr": addr, "server": True, "wait": False}}},
    )  # fmt: skip
    await client.execute("device_add", {"driver": "isa-serial", "chardev": "ser0", "id": "serial0"})


async def give_state_file(client: QMPClient, path: Path, flags: int) -> None:
    """Plain QEMU's migration file, opened here and passed as ``fd:state``,
    with MIGRATION events on."""
    caps = [{"capability": "events", "state": True}]
    await client.execute("migrate-set-capabilities", {"capabilities": caps})
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    try:
        client.send_fd_scm(fd)
        await client.execute("getfd", {"fdname": "state"})
    finally:
        os.close(fd)


async def qemu_to_file(client: QMPClient, path: Path) -> Figures:
    """Plain QEMU: stop + migrate into ``path`` until completed (64 GiB/s, set
    before the clock and restored after); the guest stays paused."""
    limit = (await client.execute("query-migrate-parameters"))["max-bandwidth"]
    await client.execute("migrate-set-parameters", {"max-bandwidth": BANDWIDTH})
    await give_state_file(client, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with client.listener("MIGRATION") as migration:
        t0 = now()
        await client.execute("stop")
        await client.execute("migrate", {"uri": "fd:state"})
        await migration_end(migration, "QEMU to a file")
        took = now() - t0
    info = await migration_info(client)
    await client.execute("migrate-set-parameters", {"max-bandwidth": limit})
    return {"wall": took, "total-time": millis(info["total-time"]), "size": path.stat().st_size}


# -- made once ------------------------------------------------------------------------


async def make_qmpvm_snapshot(
    guest: GuestImage, work: Path, name: str, env: dict[str, str], *, fast: bool
) -> tuple[Path, Path]:
    """A qmpvm snapshot (stop: true) of the guest at its ready shell; returns
    the snapshot directory and the console socket path its config names."""
    sock, console_path, snapshot = work / f"{name}-qmp.sock", work / f"{name}.sock", work / name
    ram = Path("/dev/shm") / f"qmpvm-bench-{uuid.uuid4().hex}" if fast else None
    if ram is not None:
        _SHM.append(ram)
    process = spawn(qmpvm_argv(sock), env)
    client = None
    try:
        client = await connect_qmp(process, sock, "qmpvm")
        await configure(client, guest, console_path, ram)
        await client.execute("machine-init")
        await client.execute("cont")
        console = await ready(console_path)
        await console.run("true")  # the shell is up and idle
        await console.close()
        reply = await client.execute("machine-snapshot", {"dir": str(snapshot), "stop": True})
    finally:
        await end_qmpvm(client, process)
        if ram is not None:
            with contextlib.suppress(FileNotFoundError):
                ram.unlink()
    files = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    print(f"  {name}: {reply['size'] / MiB:.1f} MiB in {', '.join(files)}; state "
          f"{(snapshot / 'state').stat().st_size / MiB:.1f} MiB", flush=True)  # fmt: skip
    return snapshot, console_path


async def make_qemu_state(guest: GuestImage, work: Path) -> Path:
    console_path, sock, state = work / "qemu-make.sock", work / "qemu-make-qmp.sock", work / "qemu"
    process = spawn(qemu_argv(guest, console_path, sock))
    client = None
    try:
        client = await connect_qmp(process, sock, "QEMU")
        console = await ready(console_path)
        await console.run("true")
        await console.close()
        await qemu_to_file(client, state)
    finally:
        await disconnect(client)
        stop(process)
    print(f"  plain QEMU: {state.stat().st_size / MiB:.1f} MiB migration file", flush=True)
    return state


# -- the timed parts --------------------------------------------------------------------


async def qmpvm_boot_snapshot_migrate(guest: GuestImage, rd: Path, env: dict[str, str]) -> Figures:
    """(a) the cold boot, then machine-snapshot and machine-migrate of that guest."""
    sock, dsock, console_path = rd / "qmp.sock", rd / "dest-qmp.sock", rd / "ttyS0.sock"
    out: Figures = {}
    started = now()
    process = spawn(qmpvm_argv(sock), env)
    destination: subprocess.Popen[bytes] | None = None
    client = far = None
    try:
        client = await connect_qmp(process, sock, "qmpvm")
        await configure(client, guest, console_path)
        await client.execute("machine-init")
        await client.execute("cont")
        console = await ready(console_path)
        out["boot"] = now() - started
        await console.run("true")

        with client.listener(("STOP", "RESUME")) as runstate:
            t0 = now()
            reply = await client.execute("machine-snapshot", {"dir": str(rd / "snap")})
            out["snapshot"] = now() - t0
            stopped, resumed = await runstate.get(), await runstate.get()
        assert (stopped["event"], resumed["event"]) == ("STOP", "RESUME")
        out["snapshot-paused"] = event_time(resumed) - event_time(stopped)
        out["snapshot-total-time"] = millis(reply["total-time"])
        out["snapshot-size"] = reply["size"]
        shutil.rmtree(rd / "snap")
        await console.run("true")  # running again

        destination = spawn(qmpvm_argv(dsock), env)
        far = await connect_qmp(destination, dsock, "destination qmpvm")
        await far.execute("query-status")  # waits for its control plane: an idle daemon
        t0 = now()
        reply = await client.execute("machine-migrate", {"uri": f"unix:{dsock}"})
        out["migrate-wall"] = now() - t0
        out["migrate-total"] = millis(reply["total-time"])
        out["migrate-downtime"] = millis(reply["downtime"])
        out["migrate-transferred"] = reply["transferred"]
        moved = await client.execute("query-migrate")  # the engine's last figures, kept
        out["migrate-downtime-bytes"] = moved["ram"]["downtime-bytes"]
        await console.close()
        console = await answers(console_path)  # on the destination now
        await console.close()
        return out
    except Exception as err:
        tails = stderr_tail(process) + stderr_tail(destination)
        raise RuntimeError(f"qmpvm boot/snapshot/migrate failed: {err!r} {tails}") from err
    finally:
        if destination is not None:
            await end_qmpvm(far, destination)
        await end_qmpvm(client, process)


async def qemu_boot_snapshot_migrate(guest: GuestImage, rd: Path) -> Figures:
    """(e) plain QEMU: boot, stop + migrate to a file, live migration."""
    console_path, sock = rd / "ttyS0.sock", rd / "qmp.sock"
    dconsole, dsock, data = rd / "dest-ttyS0.sock", rd / "dest-qmp.sock", rd / "data.sock"
    out: Figures = {}
    started = now()
    process = spawn(qemu_argv(guest, console_path, sock))
    destination: subprocess.Popen[bytes] | None = None
    client = far = None
    try:
        client = await connect_qmp(process, sock, "QEMU")
        console = await ready(console_path)
        out["boot"] = now() - started
        await console.run("true")

        to_file = await qemu_to_file(client, rd / "state")
        out["snapshot"], out["snapshot-total-time"] = to_file["wall"], to_file["total-time"]
        out["snapshot-size"] = to_file["size"]
        (rd / "state").unlink()
        await client.execute("cont")
        await console.run("true")  # running again

        popen = now()
        destination = spawn([*qemu_argv(guest, dconsole, dsock), "-incoming", "defer"])
        far = await connect_qmp(destination, dsock, "destination QEMU")
        await far.execute("migrate-incoming", {"uri": f"unix:{data}"})
        with client.listener("MIGRATION") as migration, far.listener("RESUME") as resumed:
            t0 = now()
            await client.execute("migrate", {"uri": f"unix:{data}"})
            await migration_end(migration, "QEMU live migration")
            async with asyncio.timeout(TIMEOUT):
                await resumed.get()
            out["migrate-wall"] = now() - t0
            out["migrate-wall-popen"] = now() - popen
        info = await migration_info(client)
        out["migrate-total"] = millis(info["total-time"])
        out["migrate-downtime"] = millis(info["downtime"])
        out["migrate-transferred"] = info["ram"]["transferred"]
        out["migrate-downtime-bytes"] = info["ram"]["downtime-bytes"]
        await console.close()
        console = await answers(dconsole)
        await console.close()
        return out
    except Exception as err:
        tails = stderr_tail(process) + stderr_tail(destination)
        raise RuntimeError(f"QEMU boot/snapshot/migrate failed: {err!r} {tails}") from err
    finally:
        await disconnect(far)
        await disconnect(client)
        if destination is not None:
            stop(destination)
        stop(process)


async def qmpvm_restore(
    snapshot: Path, console_path: Path, rd: Path, env: dict[str, str]
) -> Figures:
    """(b) and (d): Popen -> machine-restore -> the guest answers; then the probes."""
    sock = rd / "qmp.sock"
    out: Figures = {}
    started = now()
    process = spawn(qmpvm_argv(sock), env)
    client = None
    try:
        client = await connect_qmp(process, sock, "qmpvm")
        out["greeting"] = now() - started
        t0 = now()
        await client.execute("machine-restore", {"dir": str(snapshot)})
        out["restore"] = now() - t0
        console = await answers(console_path)
        out["answer"] = now() - started
        pid = (await client.execute("query-machine"))["engine"]["pid"]
        out["rss"] = rss(pid)
        for name, command in PROBES.items():
            for n in (1, 2):
                out[f"{name}{n}"], out[f"{name}-faults{n}"] = await probe(console, command, pid)
        await console.close()
        return out
    except Exception as err:
        raise RuntimeError(f"qmpvm restore failed: {err!r} {stderr_tail(process)}") from err
    finally:
        await end_qmpvm(client, process)


async def qemu_restore(guest: GuestImage, state: Path, rd: Path) -> Figures:
    """(c): Popen -S -incoming defer -> migrate-incoming fd: -> completed -> cont -> answers."""
    console_path, sock = rd / "ttyS0.sock", rd / "qmp.sock"
    out: Figures = {}
    started = now()
    process = spawn([*qemu_argv(guest, console_path, sock), "-S", "-incoming", "defer"])
    client = None
    try:
        client = await connect_qmp(process, sock, "QEMU")
        out["greeting"] = now() - started
        await give_state_file(client, state, os.O_RDONLY)
        with client.listener("MIGRATION") as migration:
            t0 = now()
            await client.execute("migrate-incoming", {"uri": "fd:state"})
            await migration_end(migration, "QEMU incoming")
            await client.execute("cont")
            out["restore"] = now() - t0
        console = await answers(console_path)
        out["answer"] = now() - started
        out["rss"] = rss(process.pid)
        await console.close()
        return out
    except Exception as err:
        raise RuntimeError(f"QEMU restore failed: {err!r} {stderr_tail(process)}") from err
    finally:
        await disconnect(client)
        stop(process)


# -- the run --------------------------------------------------------------------------------


async def bench(work: Path, opts: argparse.Namespace) -> dict[str, list[Figures]]:
    guest = build_guest()
    print(f"guest: kernel {guest.kernel_version}, initrd {guest.initrd}; "
          f"append {APPEND!r}; QEMU {shutil.which(QEMU)}", flush=True)  # fmt: skip
    env = bytecode_env(work / "pycache") if opts.pyc else dict(os.environ)
    private_tmp = work / "tmp"  # qmpvm's temporary files (a destination's data socket)
    private_tmp.mkdir()
    env["TMPDIR"] = str(private_tmp)
    counter = iter(range(1_000_000))

    def run_dir() -> Path:
        path = work / f"run{next(counter)}"
        path.mkdir()
        return path

    print("made once (also the warm-up):", flush=True)
    plain, plain_console = await make_qmpvm_snapshot(guest, work, "snapshot", env, fast=False)
    fast, fast_console = await make_qmpvm_snapshot(guest, work, "fast-snapshot", env, fast=True)
    state = await make_qemu_state(guest, work)

    results: dict[str, list[Figures]] = {key: [] for key in "abcde"}
    parts: list[tuple[str, Callable[[], Awaitable[Figures]]]] = [
        ("a", lambda: qmpvm_boot_snapshot_migrate(guest, run_dir(), env)),
        ("b", lambda: qmpvm_restore(plain, plain_console, run_dir(), env)),
        ("c", lambda: qemu_restore(guest, state, run_dir())),
        ("d", lambda: qmpvm_restore(fast, fast_console, run_dir(), env)),
        ("e", lambda: qemu_boot_snapshot_migrate(guest, run_dir())),
    ]
    for n in range(1, opts.runs + 1):
        order = parts if n % 2 else parts[::-1]  # ABBA: host drift favours no part
        for key, part in order:
            results[key].append(await part())
        a, b, c, d, e = (results[key][-1] for key in "abcde")
        print(f"  run {n}: (a) boot {a['boot']:.3f} s  (b) {b['answer']:.3f} s "
              f"[restore {ms(b['restore'])}]  (c) {c['answer']:.3f} s "
              f"[incoming+cont {ms(c['restore'])}]  (d) {d['answer']:.3f} s "
              f"[restore {ms(d['restore'])}]", flush=True)  # fmt: skip
        print(f"         snapshot: qmpvm {ms(a['snapshot'])} (paused {ms(a['snapshot-paused'])}),"
              f" QEMU {ms(e['snapshot'])};  migrate: qmpvm total {ms(a['migrate-total'])} down "
              f"{ms(a['migrate-downtime'])} wall {ms(a['migrate-wall'])}, QEMU total "
              f"{ms(e['migrate-total'])} down {ms(e['migrate-downtime'])} wall "
              f"{ms(e['migrate-wall'])}", flush=True)  # fmt: skip
        for name in PROBES:
            print(f"         {name} probe, 1st/2nd: (b) {ms(b[name + '1'])}/{ms(b[name + '2'])}, "
                  f"{b[name + '-faults1']:.0f}/{b[name + '-faults2']:.0f} faults;  (d) "
                  f"{ms(d[name + '1'])}/{ms(d[name + '2'])}, {d[name + '-faults1']:.0f}/"
                  f"{d[name + '-faults2']:.0f} faults", flush=True)  # fmt: skip
    left = sorted(str(path.relative_to(private_tmp)) for path in private_tmp.rglob("*"))
    if left:
        print(f"  qmpvm left in its TMPDIR (removed with the work directory): {left}")
    return results


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def med(runs: list[Figures], key: str) -> float:
    """The median of the figures QEMU filled in (see ``millis``)."""
    values = [run[key] for run in runs if not math.isnan(run[key])]
    return statistics.median(values) if values else math.nan


def spread(runs: list[Figures], key: str, unit: str = "s") -> str:
    """Median (min .. max) of ``key`` in seconds, shown in ``unit`` (s or ms)."""
    scale, digits = (1000.0, 0) if unit == "ms" else (1.0, 3)
    values = [run[key] * scale for run in runs if not math.isnan(run[key])]
    if not values:
        return "n/a"
    low, mid, high = min(values), statistics.median(values), max(values)
    missing = len(runs) - len(values)
    unfilled = f", {missing} reported as 0 left out" if missing else ""
    return f"{mid:.{digits}f} {unit} ({low:.{digits}f} .. {high:.{digits}f}{unfilled})"


def report(r: dict[str, list[Figures]]) -> None:
    a, b, c, d, e = (r[key] for key in "abcde")
    print(f"(a) qmpvm cold boot, Popen -> {READY_MARKER}: {spread(a, 'boot')}")
    print(f"    plain QEMU boot of the same guest (reference only): {spread(e, 'boot')}")
    print(f"(b) qmpvm machine-restore, Popen -> guest answers: {spread(b, 'answer')}")
    print(f"    greeting {ms(med(b, 'greeting'))}, machine-restore round trip "
          f"{spread(b, 'restore', 'ms')}; engine RSS {med(b, 'rss') / MiB:.0f} MiB")  # fmt: skip
    print(f"(c) plain QEMU -incoming defer, Popen -> guest answers: {spread(c, 'answer')}")
    print(f"    QMP up {ms(med(c, 'greeting'))}, migrate-incoming -> completed -> cont answered "
          f"{spread(c, 'restore', 'ms')}; RSS {med(c, 'rss') / MiB:.0f} MiB")  # fmt: skip
    print(f"(d) qmpvm fast restore (RAM mapped), Popen -> guest answers: {spread(d, 'answer')}")
    print(f"    greeting {ms(med(d, 'greeting'))}, machine-restore round trip "
          f"{spread(d, 'restore', 'ms')}; engine RSS {med(d, 'rss') / MiB:.0f} MiB")  # fmt: skip
    print(
        "    page-fault warm-up, each command run twice after the guest first answered "
        "(host round trip; the engine's page faults):"
    )
    for name, command in PROBES.items():
        print(f"      {command}")
        for label, runs in (
            ("(b) RAM loaded from the stream", b),
            ("(d) RAM mapped from the file", d),
        ):
            print(f"        {label}: 1st {ms(med(runs, name + '1'))}, 2nd "
                  f"{ms(med(runs, name + '2'))}; faults {med(runs, name + '-faults1'):.0f} / "
                  f"{med(runs, name + '-faults2'):.0f}")  # fmt: skip
    print(f"machine-snapshot (guest running, not live), command -> reply: "
          f"{spread(a, 'snapshot', 'ms')}; guest paused (STOP -> RESUME) "
          f"{spread(a, 'snapshot-paused', 'ms')}; the engine's migrate (total-time) "
          f"{spread(a, 'snapshot-total-time', 'ms')}; "
          f"{med(a, 'snapshot-size') / MiB:.1f} MiB")  # fmt: skip
    print(f"plain QEMU stop + migrate fd: -> completed: {spread(e, 'snapshot', 'ms')}; "
          f"total-time {spread(e, 'snapshot-total-time', 'ms')}; "
          f"{med(e, 'snapshot-size') / MiB:.1f} MiB")  # fmt: skip
    print(f"machine-migrate: total-time {spread(a, 'migrate-total', 'ms')}, downtime "
          f"{spread(a, 'migrate-downtime', 'ms')}, command -> reply "
          f"{spread(a, 'migrate-wall', 'ms')}; {med(a, 'migrate-transferred') / MiB:.1f} MiB, "
          f"{med(a, 'migrate-downtime-bytes') / MiB:.1f} MiB while stopped")  # fmt: skip
    print(f"plain QEMU migrate: total-time {spread(e, 'migrate-total', 'ms')}, downtime "
          f"{spread(e, 'migrate-downtime', 'ms')}, migrate -> destination RESUME "
          f"{spread(e, 'migrate-wall', 'ms')} (from the destination's Popen "
          f"{spread(e, 'migrate-wall-popen', 'ms')}); {med(e, 'migrate-transferred') / MiB:.1f} "
          f"MiB, {med(e, 'migrate-downtime-bytes') / MiB:.1f} MiB while stopped")  # fmt: skip

    def ratio(name: str, top: float, bottom: float) -> str:
        value = top / bottom
        goal = GOALS.get(name)
        verdict = f"   goal <= {goal}: {'met' if value <= goal else 'MISSED'}" if goal else ""
        return f"  {name:<34} {value:7.3f}{verdict}"

    print("\nratios of medians:")
    for line in (
        ratio("b/a restore / cold boot", med(b, "answer"), med(a, "boot")),
        ratio("b/c restore / QEMU", med(b, "answer"), med(c, "answer")),
        ratio("d/a fast restore / cold boot", med(d, "answer"), med(a, "boot")),
        ratio("d/c fast restore / QEMU", med(d, "answer"), med(c, "answer")),
        ratio("snapshot / QEMU stop+migrate", med(a, "snapshot"), med(e, "snapshot")),
        ratio("migrate total-time / QEMU", med(a, "migrate-total"), med(e, "migrate-total")),
        ratio("migrate downtime / QEMU", med(a, "migrate-downtime"), med(e, "migrate-downtime")),
    ):
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 runs (smoke run)")
    parser.add_argument("--runs", type=int, help="runs of every part, alternating (default 5)")
    parser.add_argument("--pyc", action="store_true", help="give qmpvm a .pyc cache")
    opts = parser.parse_args()
    opts.runs = opts.runs or (2 if opts.quick else 5)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # connect retries log errors
    exit_on_sigterm()
    load_before = loadavg()
    started = now()
    try:
        with tempfile.TemporaryDirectory(prefix="qmpvm-snapshot-") as tmp:
            pyc = "with" if opts.pyc else "without"
            print(f"snapshot benchmark: {os.cpu_count()} CPUs, {opts.runs} runs, "
                  f"qmpvm {pyc} a .pyc cache", flush=True)  # fmt: skip
            results = asyncio.run(bench(Path(tmp), opts))
    finally:
        stop_all()
        for path in _SHM:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    load_after = loadavg()
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average: "
          f"{load_before} -> {load_after}, wall {now() - started:.0f} s "
          "(other work on the host skews figures)")  # fmt: skip
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
