"""The console's matching and terminal-query logic, on scripted output."""

from __future__ import annotations

import asyncio

import pytest

from qmpvm.tools.console import CURSOR_QUERY, CURSOR_REPLY, PROMPT, GuestConsole, RingbufConsole


class ScriptedConsole(GuestConsole):
    """Hands out canned chunks of guest output and records what was written."""

    def __init__(self, chunks: list[str]) -> None:
        super().__init__()
        self.chunks = chunks
        self.written: list[str] = []

    async def _receive(self) -> str:
        return self.chunks.pop(0)

    async def write(self, text: str) -> None:
        self.written.append(text)


class ReadOnlyConsole(ScriptedConsole):
    interactive = False

    async def write(self, text: str) -> None:
        raise AssertionError("a read-only console must not be written to")


async def test_expect_returns_text_up_to_each_match_across_chunks() -> None:
    console = ScriptedConsole(["boot", "ing\nREA", "DY\nmore READY"])
    assert await console.expect("READY") == "booting\nREADY"
    assert await console.expect("READY") == "\nmore READY"


async def test_expect_times_out_naming_the_needle_and_the_output() -> None:
    class StalledConsole(ScriptedConsole):
        async def _receive(self) -> str:
            if self.chunks:
                return self.chunks.pop(0)
            await asyncio.sleep(3600)
            return ""

    with pytest.raises(TimeoutError, match=r"'READY' not seen.*almost there"):
        await StalledConsole(["almost there"]).expect("READY", timeout=0.05)


async def test_interactive_console_answers_the_cursor_query() -> None:
    console = ScriptedConsole([f"{CURSOR_QUERY}READY"])
    await console.expect("READY")
    assert console.written == [CURSOR_REPLY]


async def test_read_only_console_leaves_the_cursor_query_alone() -> None:
    console = ReadOnlyConsole([f"READY{CURSOR_QUERY}"])
    assert await console.expect("READY") == "READY"


async def test_run_strips_echo_and_end_mark() -> None:
    console = ScriptedConsole([PROMPT, 'uname; echo "__E""ND1__"\r\nLinux\r\n__END1__\r\n'])
    assert await console.run("uname") == "Linux"
    assert console.written == ['uname; echo "__E""ND1__"\n']


async def test_ringbuf_console_refuses_input_with_a_reason() -> None:
    console = RingbufConsole(client=None, chardev="ser0")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="use a socket chardev"):
        await console.write("ls\n")
