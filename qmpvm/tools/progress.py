"""``qmpvm snapshot`` and ``qmpvm migrate``: run machine-snapshot or
machine-migrate and show the engine's migration while it runs.

The command runs on one connection; a second connection hears the
``MIGRATION`` events and polls ``query-migrate``.  On a terminal, a progress
bar is redrawn in place; otherwise a plain line is written per 10% step and
per status change.  Ctrl-C sends ``migrate_cancel`` (again until the command
ends); a second Ctrl-C leaves without waiting.

The formatting is pure (``render_bar``, ``plain_line``, ``PlainProgress``,
``Tracker``, the summaries); ``run_migration`` does the I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from qmpvm.tools.client import _address

INTERVAL = 0.1
"""Seconds between two ``query-migrate`` polls."""
CANCEL_INTERVAL = 0.5
"""Seconds between two ``migrate_cancel`` after Ctrl-C."""
FINAL_POLL_TIMEOUT = 5.0
BAR_WIDTH = 20
ENDS = frozenset({"completed", "failed", "cancelled"})
"""The statuses a migration ends in."""
KiB = 1024

Info = Mapping[str, object]


# -- pure formatting -------------------------------------------------------------


def _number(value: object) -> float | None:
    """``value`` if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _ram(info: Info) -> Mapping[str, object]:
    ram = info.get("ram")
    return ram if isinstance(ram, Mapping) else {}


def _status(info: Info) -> str | None:
    status = info.get("status")
    return status if isinstance(status, str) else None


_UNITS = ("KiB", "MiB", "GiB", "TiB")


def _unit_of(count: float) -> tuple[float, str]:
    """The divisor and unit ``count`` is written in."""
    divisor, unit = 1.0, "B"
    for name in _UNITS:
        if abs(count) / divisor < KiB:
            break
        divisor, unit = divisor * KiB, name
    return divisor, unit


def format_bytes(count: float) -> str:
    """``512 B``, ``1.5 KiB``, ``96.1 MiB``, ``2.0 GiB``."""
    divisor, unit = _unit_of(count)
    if unit == "B":
        return f"{int(count)} B"
    return f"{count / divisor:.1f} {unit}"


def format_pair(done: float, total: float) -> str:
    """``96.1/200.0 MiB``: both in the unit of ``total``."""
    divisor, unit = _unit_of(total)
    if unit == "B":
        return f"{int(done)}/{int(total)} B"
    return f"{done / divisor:.1f}/{total / divisor:.1f} {unit}"


def format_rate(mbps: float) -> str:
    """QEMU's ``mbps`` (megabits per second) as bytes per second."""
    return f"{format_bytes(mbps * 1e6 / 8)}/s"


def format_seconds(ms: float) -> str:
    """A duration given in milliseconds, in seconds: ``0.75 s``, ``1.2 s``,
    ``12.3 s``, ``95 s``, ``2 min 5 s``."""
    seconds = ms / 1000
    if seconds < 10:
        text = f"{seconds:.2f}".rstrip("0").rstrip(".")
        return f"{text} s"
    if seconds < 100:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{round(seconds)} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


def format_ms(ms: float) -> str:
    """A short duration: ``45 ms`` below a second, else as ``format_seconds``."""
    if ms < 1000:
        return f"{round(ms)} ms"
    return format_seconds(ms)


def fraction(info: Info) -> float | None:
    """How far the migration is, 0..1; None when its figures are missing.

    RAM done is ``total - remaining`` (zero pages cost the stream almost
    nothing, so ``transferred`` alone would never reach ``total``); without
    ``total``, ``transferred / (transferred + remaining)``.
    """
    if _status(info) == "completed":
        return 1.0
    ram = _ram(info)
    total = _number(ram.get("total"))
    remaining = _number(ram.get("remaining"))
    transferred = _number(ram.get("transferred"))
    if total and total > 0 and remaining is not None:
        done = (total - remaining) / total
    elif transferred is not None and remaining is not None and transferred + remaining > 0:
        done = transferred / (transferred + remaining)
    elif total and total > 0 and transferred is not None:
        done = transferred / total
    else:
        return None
    return min(1.0, max(0.0, done))


def _pass(info: Info) -> int | None:
    count = _number(_ram(info).get("dirty-sync-count"))
    return int(count) if count is not None else None


def details(info: Info) -> list[str]:
    """The figures after the percentage: RAM done of total, the rate, what
    remains, and the pass once there is more than one; at the end, the bytes
    the stream carried (zero pages cost it almost nothing)."""
    ram = _ram(info)
    total = _number(ram.get("total"))
    remaining = _number(ram.get("remaining"))
    transferred = _number(ram.get("transferred"))
    parts = []
    if total and total > 0:
        done = total if _status(info) == "completed" else None
        if done is None:
            done = total - remaining if remaining is not None else transferred
        if done is not None:
            parts.append(format_pair(max(0.0, done), total))
    running = _status(info) not in ENDS
    if transferred is not None and (not running or not total):
        parts.append(f"{format_bytes(transferred)} sent")
    mbps = _number(ram.get("mbps"))
    if running and mbps:
        parts.append(format_rate(mbps))
    if running and remaining is not None:
        parts.append(f"remaining {format_bytes(remaining)}")
    passes = _pass(info)
    if running and passes is not None and passes > 1:
        parts.append(f"pass {passes}")
    return parts


def render_bar(label: str, info: Info, width: int = BAR_WIDTH) -> str:
    """One terminal line: ``snapshot  [#########...........]  48%  96.1/200.0 MiB
    312.0 MiB/s  remaining 104.0 MiB``; the status, when it is not ``active``,
    before the figures (a narrow terminal cuts the end of the line)."""
    done = fraction(info)
    filled = 0 if done is None else math.floor(done * width)
    bar = "#" * filled + "." * (width - filled)
    parts = [label, f"[{bar}]"]
    if done is not None:
        parts.append(f"{math.floor(done * 100):3d}%")
    status = _status(info)
    if status is not None and status != "active":
        parts.append(status)
    parts.extend(details(info))
    return "  ".join(parts)


def plain_line(label: str, info: Info) -> str:
    """One log line: ``snapshot: active  40%  102.4/256.0 MiB  ...``."""
    done = fraction(info)
    parts = [f"{label}: {_status(info) or 'waiting'}"]
    if done is not None:
        parts.append(f"{math.floor(done * 100)}%")
    parts.extend(details(info))
    return "  ".join(parts)


@dataclass(slots=True)
class PlainProgress:
    """Decides when a non-terminal gets a line: on a status change, on each
    new 10% step, and on the first step of each new pass."""

    label: str
    status: str | None = None
    step: int = -1
    passes: int | None = None
    started: bool = False

    def update(self, info: Info) -> str | None:
        status = _status(info)
        done = fraction(info)
        step = -1 if done is None else math.floor(done * 10)
        passes = _pass(info)
        changed = not self.started or status != self.status
        new_pass = passes is not None and self.passes is not None and passes > self.passes
        if new_pass and status not in ENDS:
            self.step = -1
        if passes is not None:
            self.passes = passes
        if not changed and step <= self.step:
            return None
        self.started = True
        self.status = status
        self.step = max(self.step, step)
        return plain_line(self.label, info)


@dataclass(slots=True)
class Tracker:
    """What is known of this run's migration: the status from ``MIGRATION``
    events (their order is the engine's), the figures from ``query-migrate``.

    Until this migration shows itself, a poll that reports an ended one (a
    previous snapshot or migration's figures) is ignored."""

    info: dict[str, object] = field(default_factory=dict)
    status: str | None = None
    started: bool = False

    def on_event(self, status: str) -> None:
        self.status = status
        if status not in ENDS:
            self.started = True

    def on_poll(self, info: Info, *, final: bool = False) -> bool:
        """Take a ``query-migrate`` answer; False if it was ignored."""
        status = _status(info)
        if not self.started and not final:
            if status is None or status == "none" or status in ENDS:
                return False
            self.started = True
        self.info = dict(info)
        return True

    def view(self) -> dict[str, object]:
        """The figures, with the latest status."""
        view = dict(self.info)
        if self.status is not None:
            view["status"] = self.status
        return view


def _summary_parts(result: Info) -> list[str]:
    parts = []
    total = _number(result.get("total-time"))
    if total is not None:
        parts.append(f"total {format_seconds(total)}")
    downtime = _number(result.get("downtime"))
    if downtime is not None:
        parts.append(f"downtime {format_ms(downtime)}")
    return parts


def snapshot_summary(directory: str, result: Info) -> str:
    """``snapshot written to DIR: 256.4 MiB, total 0.75 s, downtime 120 ms``."""
    parts = []
    size = _number(result.get("size"))
    if size is not None:
        parts.append(format_bytes(size))
    parts.extend(_summary_parts(result))
    written = result.get("dir")
    where = written if isinstance(written, str) else directory
    return f"snapshot written to {where}" + (": " + ", ".join(parts) if parts else "")


def migrate_summary(uri: str, result: Info) -> str:
    """``migrated to URI: total 1.2 s, downtime 45 ms, 97.3 MiB sent``."""
    parts = _summary_parts(result)
    sent = _number(result.get("transferred"))
    if sent is not None:
        parts.append(f"{format_bytes(sent)} sent")
    return f"migrated to {uri}" + (": " + ", ".join(parts) if parts else "")


# -- the display -----------------------------------------------------------------

CLEAR_LINE = "\r\x1b[K"


class Display:
    """Progress on ``stream``: a bar redrawn in place on a terminal, else lines."""

    def __init__(self, label: str, stream: TextIO, *, tty: bool, columns: int = 80) -> None:
        self.label = label
        self.stream = stream
        self.tty = tty
        self.columns = max(columns, 20)
        self.plain = PlainProgress(label)
        self.drawn = ""

    def show(self, info: Info) -> None:
        if self.tty:
            line = render_bar(self.label, info)[: self.columns - 1]
            if line != self.drawn:
                self.stream.write(CLEAR_LINE + line)
                self.drawn = line
        else:
            text = self.plain.update(info)
            if text is None:
                return
            self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A message of its own, the bar drawn again below it."""
        if self.tty and self.drawn:
            self.stream.write(CLEAR_LINE + text + "\n" + self.drawn)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """Leave the last bar on its own line."""
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = ""


# -- running ---------------------------------------------------------------------


class AbandonedError(Exception):
    """A second Ctrl-C: leave without waiting for the command."""


@dataclass(slots=True)
class Interrupts:
    """Counts SIGINTs; ``changed`` is set at each."""

    count: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self) -> None:
        self.count += 1
        self.changed.set()


async def _poll(watcher: QMPClient, tracker: Tracker, display: Display) -> None:
    while True:
        try:
            info = await watcher.execute("query-migrate")
        except ExecuteError:
            info = None
        if isinstance(info, dict) and tracker.on_poll(info):
            display.show(tracker.view())
        await asyncio.sleep(INTERVAL)


def _apply_events(events: Sequence[Mapping[str, object]], tracker: Tracker) -> bool:
    seen = False
    for event in events:
        data = event.get("data")
        status = data.get("status") if isinstance(data, Mapping) else None
        if isinstance(status, str):
            tracker.on_event(status)
            seen = True
    return seen


async def _listen(
    listener: EventListener, watcher: QMPClient, tracker: Tracker, display: Display
) -> None:
    while True:
        event = await listener.get()
        if not _apply_events([event], tracker):
            continue
        if tracker.status in ENDS:  # shown with its final figures
            with contextlib.suppress(ExecuteError):
                info = await watcher.execute("query-migrate")
                if isinstance(info, dict):
                    tracker.on_poll(info)
        display.show(tracker.view())


async def _keep_cancelling(watcher: QMPClient) -> None:
    """``migrate_cancel`` until the command ends: a migration that had not
    begun yet when the first was sent is cancelled by the next."""
    while True:
        with contextlib.suppress(ExecuteError):
            await watcher.execute("migrate_cancel")
        await asyncio.sleep(CANCEL_INTERVAL)


async def _await_command(
    command: asyncio.Task[object], interrupts: Interrupts, watcher: QMPClient, display: Display
) -> tuple[object, bool]:
    """The command's reply, and whether it was interrupted."""
    canceller: asyncio.Task[None] | None = None
    try:
        while True:
            waker = asyncio.ensure_future(interrupts.changed.wait())
            try:
                done, _ = await asyncio.wait({command, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waker.cancel()
            if command in done:
                return command.result(), canceller is not None
            interrupts.changed.clear()
            if interrupts.count >= 2:
                raise AbandonedError
            if canceller is None:
                display.note("interrupted: cancelling the migration (Ctrl-C again to leave now)")
                canceller = asyncio.create_task(_keep_cancelling(watcher))
    finally:
        if canceller is not None:
            canceller.cancel()
            with contextlib.suppress(asyncio.CancelledError, QMPError, OSError, EOFError):
                await canceller


def _install_sigint(interrupts: Interrupts) -> bool:
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupts)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
        return False
    return True


async def _disconnect(client: QMPClient) -> None:
    with contextlib.suppress(EOFError, ConnectionError, QMPError):
        await client.disconnect()


@dataclass(slots=True)
class Outcome:
    reply: object
    interrupted: bool


async def run_migration(
    target: str,
    command: str,
    arguments: dict[str, object],
    display: Display,
) -> Outcome:
    """Run ``command`` on ``target`` and show its migration on ``display``;
    raises what the command raises (ExecuteError), or AbandonedError."""
    address = _address(target)
    client = QMPClient(f"qmpvm-{display.label}")
    watcher = QMPClient(f"qmpvm-{display.label}-progress")
    await client.connect(address)
    tasks: list[asyncio.Task[None]] = []
    try:
        await watcher.connect(address)
        listener = EventListener(("MIGRATION",))
        watcher.register_listener(listener)
        tracker = Tracker()
        interrupts = Interrupts()
        handled = _install_sigint(interrupts)
        running = asyncio.create_task(client.execute(command, arguments))
        tasks = [
            asyncio.create_task(_listen(listener, watcher, tracker, display)),
            asyncio.create_task(_poll(watcher, tracker, display)),
        ]
        try:
            reply, interrupted = await _await_command(running, interrupts, watcher, display)
        except BaseException:
            display.finish()
            raise
        finally:
            if handled:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
            if not running.done():
                running.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(ExecuteError, TimeoutError):
            async with asyncio.timeout(FINAL_POLL_TIMEOUT):
                final = await watcher.execute("query-migrate")
            _apply_events(listener.clear(), tracker)  # those before the reply are all in
            if isinstance(final, dict):
                tracker.on_poll(final, final=True)
                display.show(tracker.view())
        display.finish()
        return Outcome(reply, interrupted)
    finally:
        await _disconnect(watcher)
        await _disconnect(client)


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError):
        return 80


def _main(
    prog: str, label: str, target: str, command: str, arguments: dict[str, object]
) -> tuple[int, Outcome | None]:
    stream = sys.stderr
    tty = stream.isatty()
    columns = _columns(stream) if tty else 80
    display = Display(label, stream, tty=tty, columns=columns)
    try:
        outcome = asyncio.run(run_migration(target, command, arguments, display))
    except ExecuteError as err:
        print(f"{prog}: {command}: {err.error_class}: {err}", file=sys.stderr)
        return 1, None
    except AbandonedError:
        print(f"{prog}: interrupted; left without waiting for {command} to end", file=sys.stderr)
        return 1, None
    except (OSError, EOFError, QMPError) as err:
        print(f"{prog}: {target}: {err}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:  # before the handler was in place, or after
        print(f"{prog}: interrupted", file=sys.stderr)
        return 1, None
    if outcome.interrupted:
        print(f"{prog}: interrupted too late: {command} had completed", file=sys.stderr)
    return 0, outcome


def _reply(outcome: Outcome) -> dict[str, object]:
    return dict(outcome.reply) if isinstance(outcome.reply, dict) else {}


def local_path(target: str, path: str) -> str:
    """``path`` as the server reads it: a relative one is this process's when
    the monitor is a UNIX socket (the server is on this host, its working
    directory another); over TCP it is left for the server to resolve."""
    if isinstance(_address(target), tuple):
        return path
    return os.path.abspath(path)


def local_uri(target: str, uri: str) -> str:
    """A ``unix:`` URI's relative path made this process's (see ``local_path``)."""
    scheme, sep, rest = uri.partition(":")
    if sep and scheme == "unix" and rest:
        return f"unix:{local_path(target, rest)}"
    return uri


def snapshot_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="qmpvm snapshot", description="Snapshot the machine into a directory."
    )
    parser.add_argument("socket", help="QMP socket path, or HOST:PORT")
    parser.add_argument("dir", help="the snapshot directory (new, or empty)")
    parser.add_argument("--live", action="store_true", help="stream while the guest runs")
    parser.add_argument("--stop", action="store_true", help="leave the guest paused")
    opts = parser.parse_args(argv)
    arguments: dict[str, object] = {"dir": local_path(opts.socket, opts.dir)}
    if opts.live:
        arguments["live"] = True
    if opts.stop:
        arguments["stop"] = True
    code, outcome = _main("qmpvm snapshot", "snapshot", opts.socket, "machine-snapshot", arguments)
    if outcome is not None:
        print(snapshot_summary(str(arguments["dir"]), _reply(outcome)))
    return code


def migrate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="qmpvm migrate", description="Move the running machine to another qmpvm."
    )
    parser.add_argument("socket", help="QMP socket path, or HOST:PORT")
    parser.add_argument("uri", help="the destination qmpvm's monitor: unix:PATH or tcp:HOST:PORT")
    opts = parser.parse_args(argv)
    uri = local_uri(opts.socket, opts.uri)
    code, outcome = _main("qmpvm migrate", "migrate", opts.socket, "machine-migrate", {"uri": uri})
    if outcome is not None:
        print(migrate_summary(uri, _reply(outcome)))
    return code
