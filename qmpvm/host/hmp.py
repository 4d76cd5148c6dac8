"""HMP monitors on the consoles qmpvm serves: QEMU's human monitor and its mux.

``-serial mon:stdio`` (and ``-nographic``'s default) shares one console
between the guest and a monitor, as QEMU's mux chardev does: keys go to the
guest until the escape key (Ctrl-A unless ``-echr``) and ``c`` switch them to
the monitor, whose lines run as ``human-monitor-command`` through qmpvm's
own dispatcher (with the same refusals as over QMP).  A monitor alone on a
console (``-monitor stdio``, ``-mon chardev=ID,mode=readline``) takes every
key.  Each source of keys (qmpvm's terminal, each socket client) has a
``Keyboard`` of its own: its own focus, line and monitor output, so clients
of one socket do not type into each other's monitor.  No I/O of its own:
the console gives it callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

Execute = Callable[[str, Mapping[str, object]], Awaitable[Mapping[str, object]]]
"""Runs one QMP command as a client of qmpvm would; the reply message."""

ESCAPE_DEFAULT = 0x01  # Ctrl-A
PROMPT = b"(qemu) "
LINE_LIMIT = 4095
"""QEMU's readline buffer: keys beyond it are not taken."""
WAITING_LIMIT = 64 * 1024
"""Keys typed while a command runs; beyond this they are dropped, so a
client that floods a busy monitor cannot grow qmpvm's memory."""
_ENTER, _NEWLINE, _ERASE = (0x0D, 0x0A), b"\r\n", (0x7F, 0x08)
_KILL_LINE, _ESC = (0x03, 0x15), 0x1B


@dataclass(frozen=True, slots=True)
class MonitorSpec:
    """An HMP monitor on a console: ``mux`` when it shares the console with the guest."""

    mux: bool
    escape: int = ESCAPE_DEFAULT


def escape_name(escape: int) -> str:
    """``C-a`` for Ctrl-A, as QEMU's mux help names the escape key."""
    return f"C-{chr(escape + 0x60)}" if escape < 0x20 else chr(escape)


def mux_help(escape: int) -> bytes:
    name = escape_name(escape)
    lines = [
        f"{name} h    print this help",
        f"{name} x    exit emulator",
        f"{name} b    send break (magic sysrq)",
        f"{name} c    switch between console and monitor",
        f"{name} {name}  sends {name}",
        f"({name} s and {name} t, QEMU's disk commit and timestamps, are not offered)",
    ]
    return "\r\n".join(lines).encode() + _NEWLINE


def hmp_text(text: str) -> bytes:
    """A monitor's output for a raw terminal: every line ending is CR LF."""
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode(errors="replace")


class Keyboard:
    """One source's keys on a console with a monitor: routed to the guest or
    edited into monitor lines; a line runs to its end before the next key is
    read, as QEMU suspends its monitor while a command runs."""

    def __init__(
        self,
        spec: MonitorSpec,
        *,
        chardev: str,
        to_guest: Callable[[bytes], None],
        show: Callable[[bytes], None],
        execute: Execute,
    ) -> None:
        self.spec = spec
        self.chardev = chardev
        self.to_guest = to_guest
        self.show = show
        self.execute = execute
        self.monitor_focus = not spec.mux
        self._greeted = False
        self._escaped = False  # the escape key came: the next one is a mux command
        self._sequence = 0  # inside a terminal's escape sequence: 1 after ESC, 2 in CSI
        self._line = bytearray()
        self._last_enter = 0
        self._waiting = bytearray()  # keys that came while a line ran
        self._running: asyncio.Task[None] | None = None

    def start(self) -> None:
        """A new source: a monitor alone greets it at once."""
        if self.monitor_focus:
            self._run_soon(self._greet())

    def close(self) -> None:
        if self._running is not None:
            self._running.cancel()

    def feed(self, data: bytes) -> None:
        guest = bytearray()
        for index, key in enumerate(data):
            if self._running is not None:
                room = max(0, WAITING_LIMIT - len(self._waiting))
                self._waiting += data[index : index + room]
                break
            if self.spec.mux and self._escaped:
                self._escaped = False
                if key != self.spec.escape:
                    self._flush(guest)
                    self._mux_command(key)
                    continue
            elif self.spec.mux and key == self.spec.escape:
                self._escaped = True
                continue
            if self.monitor_focus:
                self._flush(guest)
                self._edit(key)
            else:
                guest.append(key)
        self._flush(guest)

    def _flush(self, guest: bytearray) -> None:
        if guest:
            self.to_guest(bytes(guest))
            guest.clear()

    # -- the mux ---------------------------------------------------------

    def _mux_command(self, key: int) -> None:
        command = chr(key).lower()
        if command in ("h", "?"):
            self.show(mux_help(self.spec.escape))
        elif command == "x":
            self.show(b"QEMU: Terminated" + _NEWLINE)
            self._run_soon(self._command("quit", {}))
        elif command == "b":
            self._run_soon(self._command("chardev-send-break", {"id": self.chardev}))
        elif command == "c":
            self.monitor_focus = not self.monitor_focus
            self._line.clear()
            if self.monitor_focus:
                self._run_soon(self._greet())
        elif command in ("s", "t"):
            self.show(f"qmpvm: {escape_name(self.spec.escape)} {command} is not "
                      "offered".encode() + _NEWLINE)  # fmt: skip

    # -- the monitor's line ----------------------------------------------

    def _edit(self, key: int) -> None:
        """QEMU's readline, simply: printable keys, erase, kill, enter; the
        terminal's own escape sequences (arrows, ...) are skipped."""
        if self._sequence:
            if self._sequence == 1:
                self._sequence = 2 if key in b"[O" else 0
            elif 0x40 <= key <= 0x7E:
                self._sequence = 0
            return
        last, self._last_enter = self._last_enter, key if key in _ENTER else 0
        if key in _ENTER:
            if last and last != key:
                return  # the second half of CR LF
            self.show(_NEWLINE)
            line = self._line.decode(errors="replace").strip()
            self._line.clear()
            self._run_soon(self._run_line(line))
        elif key in _ERASE:
            if self._line:
                del self._line[-1]
                self.show(b"\b \b")
        elif key in _KILL_LINE:
            self._line.clear()
            self.show(_NEWLINE + PROMPT)
        elif key == _ESC:
            self._sequence = 1
        elif key >= 0x20 and len(self._line) < LINE_LIMIT:
            self._line.append(key)
            self.show(bytes([key]))

    async def _run_line(self, line: str) -> None:
        if line.split(maxsplit=1)[:1] in (["quit"], ["q"]):
            await self._command("quit", {})
        elif line:
            reply = await self.execute("human-monitor-command", {"command-line": line})
            self.show(hmp_text(_error(reply) or str(reply.get("return", ""))))
        self.show(PROMPT)

    async def _greet(self) -> None:
        if not self._greeted:
            self._greeted = True
            reply = await self.execute("query-version", {})
            version = reply.get("return")
            qemu = version.get("qemu", {}) if isinstance(version, dict) else {}
            numbers = ".".join(str(qemu.get(k, "?")) for k in ("major", "minor", "micro"))
            self.show(f"QEMU {numbers} monitor - type 'help' for more "
                      "information".encode() + _NEWLINE)  # fmt: skip
        self.show(PROMPT)

    async def _command(self, name: str, arguments: Mapping[str, object]) -> None:
        error = _error(await self.execute(name, arguments))
        if error:
            self.show(hmp_text(error))

    # -- one line at a time ----------------------------------------------

    def _run_soon(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            finally:
                self._running = None
                waiting, self._waiting = bytes(self._waiting), bytearray()
                if waiting:
                    self.feed(waiting)

        with contextlib.suppress(RuntimeError):  # no loop: closing
            self._running = asyncio.get_running_loop().create_task(run())


def _error(reply: Mapping[str, object]) -> str:
    """A failed reply's words, as a line; "" for a success."""
    error = reply.get("error")
    return f"{error.get('desc', 'error')}\n" if isinstance(error, dict) else ""
