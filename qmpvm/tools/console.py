"""Guest serial consoles for programs: wait for output, run shell commands.

Two transports share the matching logic: ``RingbufConsole`` reads a ringbuf
chardev through QMP (output only: QEMU's ringbuf-write feeds the buffer,
not the guest), and ``SocketConsole`` talks to a UNIX socket chardev, which
carries both directions with flow control.  Used by the demo, the tests and
the boot benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from qemu.qmp import QMPClient

POLL_INTERVAL = 0.02
PROMPT = "guest# "
CURSOR_QUERY, CURSOR_REPLY = "\x1b[6n", "\x1b[1;1R"


class GuestConsole:
    #: Whether ``write`` reaches the guest; a read-only console leaves
    #: busybox's terminal-size query unanswered (it falls back to 80x24).
    interactive = True

    def __init__(self) -> None:
        self.transcript = ""
        self._seen = 0
        self._commands = 0

    async def _receive(self) -> str:
        raise NotImplementedError

    async def write(self, text: str) -> None:
        raise NotImplementedError

    async def read(self) -> str:
        text = await self._receive()
        self.transcript += text
        if self.interactive and CURSOR_QUERY in text:  # busybox asks the terminal's size
            await self.write(CURSOR_REPLY)
        return text

    def skip_received(self) -> None:
        """Let the next ``expect`` match only output received after this call."""
        self._seen = len(self.transcript)

    async def expect(self, needle: str, timeout: float = 30.0) -> str:
        """Everything from the last match up to and including ``needle``."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.transcript.find(needle, self._seen)
            if found >= 0:
                end = found + len(needle)
                text, self._seen = self.transcript[self._seen : end], end
                return text
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = self.transcript[-400:]
                raise TimeoutError(f"{needle!r} not seen in {timeout}s; last output: {tail!r}")
            try:
                await asyncio.wait_for(self.read(), remaining)
            except TimeoutError:
                continue

    async def run(self, command: str, timeout: float = 30.0) -> str:
        """Run ``command`` in the guest shell; what it printed, without the echo."""
        await self.expect(PROMPT, timeout)
        self._commands += 1
        mark = f"__END{self._commands}__"
        split = f'"{mark[:3]}""{mark[3:]}"'  # the echoed input never contains the mark
        await self.write(f"{command}; echo {split}\n")
        text = await self.expect(mark, timeout)
        lines = text.replace("\r", "").split("\n")
        body = [line for line in lines if split not in line and mark not in line]
        return "\n".join(body).strip("\n")


class RingbufConsole(GuestConsole):
    interactive = False

    def __init__(self, client: QMPClient, chardev: str) -> None:
        super().__init__()
        self.client = client
        self.chardev = chardev

    async def _receive(self) -> str:
        while True:
            data = await self.client.execute(
                "ringbuf-read", {"device": self.chardev, "size": 65536, "format": "utf8"}
            )
            if data:
                return str(data)
            await asyncio.sleep(POLL_INTERVAL)

    async def write(self, text: str) -> None:
        raise RuntimeError(
            f"chardev {self.chardev!r} is a ringbuf: its output can be read, but input "
            "cannot reach the guest; use a socket chardev for an interactive console"
        )


class SocketConsole(GuestConsole):
    """A console on a socket chardev (``server=on,wait=off``) at ``path``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__()
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, path: str, timeout: float = 10.0) -> SocketConsole:
        deadline = time.monotonic() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path)
                return cls(reader, writer)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(POLL_INTERVAL)

    async def _receive(self) -> str:
        data = await self._reader.read(65536)
        if not data:
            raise ConnectionError("guest console closed")
        return data.decode(errors="replace")

    async def write(self, text: str) -> None:
        self._writer.write(text.encode())
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
