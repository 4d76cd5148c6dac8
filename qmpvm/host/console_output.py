"""What a console has printed: the history, a ringbuf's buffer, the log.

The history is the last ``HISTORY`` bytes of output, whatever the backend,
kept for as long as the chardev is configured: across the guest's power-off,
the engine's death and a rebuilt machine.  A ringbuf's buffer keeps QEMU's
semantics on top of it (reads consume, a full buffer drops the oldest).
With ``--state-dir`` the output is also appended to a log, so that the next
qmpvm starts with the history the last one had.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

HISTORY = 256 * 1024
LOG_LIMIT = 4 * 1024 * 1024
"""A log is rotated (``STEM.log`` -> ``STEM.log.1``) when it reaches this size."""


class History:
    """The last ``limit`` bytes of output and the count of all bytes ever
    printed (``end``), so that a position in the output means the same
    across restarts."""

    def __init__(self, limit: int = HISTORY) -> None:
        self.limit = limit
        self.data = bytearray()
        self.end = 0

    def append(self, chunk: bytes) -> None:
        self.data += chunk
        self.end += len(chunk)
        if len(self.data) > self.limit:
            del self.data[: len(self.data) - self.limit]

    def tail(self, size: int | None = None) -> bytes:
        if size is None or size >= len(self.data):
            return bytes(self.data)
        return bytes(self.data[len(self.data) - size :])


class Ring:
    """QEMU's ringbuf: ``size`` bytes, the oldest overwritten when full,
    consumed by reads."""

    def __init__(self, size: int, initial: bytes = b"") -> None:
        self.size = size
        self.data = bytearray()
        self.write(initial)

    def write(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.size:
            del self.data[: len(self.data) - self.size]

    def read(self, size: int) -> bytes:
        taken = bytes(self.data[:size])
        del self.data[:size]
        return taken


class ConsoleLog:
    """``STEM.log`` (with one rotated ``STEM.log.1``) and ``STEM.pos``, which
    says where the rotated part starts and how far a ringbuf was read, as
    positions in all the output ever printed, and a pty console's path (the
    next qmpvm finds its master among the engine's by it)."""

    def __init__(self, directory: Path, stem: str) -> None:
        self.path = directory / f"{stem}.log"
        self.old = directory / f"{stem}.log.1"
        self.pos_path = directory / f"{stem}.pos"
        self.pty: str | None = None
        self.base, self.read_to = self._load_positions()
        self._fd: int | None = None

    def _load_positions(self) -> tuple[int, int | None]:
        try:
            found = json.loads(self.pos_path.read_text())
            read_to = found.get("read")
            self.pty = str(found["pty"]) if found.get("pty") else None
            return int(found["base"]), int(read_to) if read_to is not None else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return 0, None

    def restore(self, history: History) -> None:
        """Fill a fresh history with what the log holds."""
        kept = b""
        for part in (self.old, self.path):  # only the tails: a log is up to 4 MiB
            with contextlib.suppress(OSError), part.open("rb") as stream:
                stream.seek(max(0, stream.seek(0, os.SEEK_END) - history.limit))
                kept += stream.read()
        history.append(kept)
        history.end = self.base + _size(self.old) + _size(self.path)

    def append(self, chunk: bytes) -> None:
        try:
            if self._fd is None:
                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                self._fd = os.open(self.path, flags, 0o600)
            os.write(self._fd, chunk)
            if os.fstat(self._fd).st_size >= LOG_LIMIT:
                self._rotate()
        except OSError:
            pass  # a full disk costs the log, not the console

    def _rotate(self) -> None:
        self.base += _size(self.old)
        self._save_positions()
        os.replace(self.path, self.old)
        self.close()

    def note_read(self, position: int) -> None:
        """A ringbuf was read up to ``position``: the next qmpvm starts from there."""
        self.read_to = position
        with contextlib.suppress(OSError):
            self._save_positions()

    def note_pty(self, path: str | None) -> None:
        if path != self.pty:
            self.pty = path
            with contextlib.suppress(OSError):
                self._save_positions()

    def _save_positions(self) -> None:
        temporary = self.pos_path.with_suffix(".pos.new")
        saved = {"base": self.base, "read": self.read_to, "pty": self.pty}
        temporary.write_text(json.dumps(saved))
        os.replace(temporary, self.pos_path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.close()
        for path in (self.path, self.old, self.pos_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
