"""Consoles qmpvm serves, driven from the engine's side of their FIFOs (the
test plays the engine): real FIFOs, real sockets, no VM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path

import pytest

from qmpvm.config.kinds import make
from qmpvm.config.model import Config
from qmpvm.config.resource import Kind
from qmpvm.errors import ArgumentError, EngineError
from qmpvm.fds import open_nonblocking
from qmpvm.host import console_clients, console_wiring
from qmpvm.host import consoles as consoles_module
from qmpvm.host.console_output import History, Ring
from qmpvm.host.console_wiring import (
    check,
    check_stdio_free,
    engine_chardev,
    filename,
    owns,
    stem,
)
from qmpvm.host.consoles import Console


def chardev(chardev_id: str, backend: str, **data: object) -> dict[str, object]:
    return {"id": chardev_id, "backend": {"type": backend, "data": data}}


def unix_server(chardev_id: str, path: Path, **more: object) -> dict[str, object]:
    addr = {"type": "unix", "data": {"path": str(path)}}
    return chardev(chardev_id, "socket", addr=addr, server=True, wait=False, **more)


class Engine:
    """The engine's end of a console's FIFOs, opened as QEMU's pipe chardev opens them."""

    def __init__(self, console: Console) -> None:
        self.output = os.open(console.fifo_stem + ".out", os.O_RDWR)
        self.input = os.open(console.fifo_stem + ".in", os.O_RDWR | os.O_NONBLOCK)

    def prints(self, data: bytes) -> None:
        os.write(self.output, data)

    async def typed(self, size: int) -> bytes:
        """What qmpvm passed on as the guest's input, ``size`` bytes of it."""
        got = b""
        async with asyncio.timeout(10):
            while len(got) < size:
                try:
                    got += os.read(self.input, size - len(got))
                except BlockingIOError:
                    await asyncio.sleep(0.01)
        return got

    def close(self) -> None:
        os.close(self.output)
        os.close(self.input)


async def read_until(reader: asyncio.StreamReader, needle: bytes) -> bytes:
    async with asyncio.timeout(10):
        return await reader.readuntil(needle)


# -- which chardevs are served, and how the engine sees them ---------------

UNIX_X = {"type": "unix", "data": {"path": "/x"}}


@pytest.mark.parametrize(
    ("args", "served"),
    [
        (chardev("r", "ringbuf"), True),
        (chardev("r", "memory", size=4096), True),
        (chardev("n", "null"), True),
        (chardev("f", "file", out="/tmp/x"), True),
        (chardev("f", "file", out="/tmp/x", **{"in": "/tmp/y"}), False),
        (chardev("p", "pty"), True),
        (unix_server("s", Path("/tmp/s.sock")), True),
        (unix_server("s", Path("/tmp/s.sock"), telnet=True), False),
        (chardev("s", "socket", addr={"type": "unix", "data": {"path": "/x"}}), True),
        (chardev("s", "socket", addr={"type": "unix", "data": {"path": "/x"}}, wait=True), False),
        (chardev("s", "socket", addr=UNIX_X, server=False), True),
        (chardev("s", "socket", addr=UNIX_X, server=False, reconnect=2), True),
        (chardev("s", "socket", addr=UNIX_X, server=True, reconnect=2), False),
        (chardev("t", "socket", addr={"type": "inet", "data": {"host": "", "port": "5"}}), True),
        (chardev("t", "socket", addr={"type": "inet", "data": {"port": "5", "to": "9"}}), False),
        (chardev("t", "socket", addr={"type": "fd", "data": {"str": "x"}}), False),
        (chardev("u", "udp", remote={"type": "inet", "data": {"host": "h", "port": "1"}}), False),
    ],
)
def test_which_chardevs_qmpvm_serves(args: dict[str, object], served: bool) -> None:
    assert owns(args) is served


@pytest.mark.parametrize(
    ("backend", "driver", "served"),
    [
        ("pty", "isa-serial", True),
        ("pty", "virtserialport", False),  # the guest sees whether a client is there
        ("pty", "virtconsole", False),
        ("null", "virtconsole", True),  # always "connected", in QEMU too
        ("socket", "usb-serial", False),
    ],
)
def test_sockets_and_ptys_of_connection_aware_frontends_stay_the_engines(
    backend: str, driver: str, served: bool
) -> None:
    args = chardev("c", backend, **({"addr": UNIX_X} if backend == "socket" else {}))
    config = Config().add(make(Kind.CHARDEV, args, 0))
    config = config.add(make(Kind.DEVICE, {"driver": driver, "id": "d", "chardev": "c"}, 1))
    assert console_wiring.served(config, args) is served


def test_the_engine_gets_a_pipe_and_no_log_file() -> None:
    args = chardev("ser0", "ringbuf", size=4096, logfile="/tmp/l", logappend=True)
    piped = engine_chardev(args, "/run/c/ser0")
    assert piped == {"id": "ser0", "backend": {"type": "pipe", "data": {"device": "/run/c/ser0"}}}


def test_ring_sizes_are_checked_as_qemu_checks_them() -> None:
    check(chardev("r", "ringbuf", size=4096))
    for size in (1000, 0, -4):
        with pytest.raises(ArgumentError, match="must be power of two"):
            check(chardev("r", "ringbuf", size=size))


def test_one_stdio_console_at_most() -> None:
    assert owns(chardev("s", "stdio"))
    check_stdio_free(chardev("a", "stdio"), [chardev("b", "null")])
    with pytest.raises(ArgumentError, match="cannot use stdio by multiple character devices"):
        check_stdio_free(chardev("a", "stdio"), [chardev("b", "stdio", signal=False)])


def test_file_stems_are_ids_or_digests() -> None:
    assert stem("serial0") == "serial0"
    odd = stem("a/../b" * 30)
    assert odd.startswith("x-") and "/" not in odd and len(odd) < 64
    assert stem("a/../b" * 30) == odd != stem("a/../c")


def test_query_chardev_filenames_are_qemus() -> None:
    server = unix_server("s", Path("/tmp/s.sock"))
    assert filename(server, []) == "disconnected:unix:/tmp/s.sock,server=on"
    assert filename(server, [""]) == "unix:/tmp/s.sock,server=on"
    tcp = chardev("t", "socket", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": "5"}})
    assert filename(tcp, ["127.0.0.1:4000"]) == "tcp:127.0.0.1:5,server=on <-> 127.0.0.1:4000"
    assert filename(chardev("r", "memory"), []) == "ringbuf"
    assert filename(chardev("n", "null"), []) == "null"
    assert filename(chardev("p", "pty"), [], "/dev/pts/7") == "pty:/dev/pts/7"


def test_history_and_ring_keep_qemus_bounds() -> None:
    history = History(limit=8)
    history.append(b"0123456789")
    assert (history.tail(), history.tail(3), history.end) == (b"23456789", b"789", 10)
    ring = Ring(4, b"abcdef")
    assert ring.read(2) == b"cd"
    ring.write(b"ghijk")
    assert ring.read(10) == b"hijk"
    assert ring.read(10) == b""


# -- serving, with real FIFOs and sockets ---------------------------------


async def test_a_socket_console_serves_many_clients_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "ttyS0.sock"
    console = Console(unix_server("ser0", path), None)
    await console.open(tmp_path)
    engine = Engine(console)
    try:
        clients = [await asyncio.open_unix_connection(str(path)) for _ in range(3)]
        async with asyncio.timeout(10):
            while len(console.peers) < 3:
                await asyncio.sleep(0.01)
        assert console.filename() == f"unix:{path},server=on"
        engine.prints(b"login: ")
        for reader, _writer in clients:
            assert await read_until(reader, b"login: ") == b"login: "
        clients[0][1].write(b"root\n")
        clients[2][1].write(b"ls\n")
        got = await engine.typed(8)
        assert sorted(got.split(b"\n")) == [b"", b"ls", b"root"]
        assert console.history.tail() == b"login: "
    finally:
        console.close(remove=True)
        engine.close()
    assert not path.exists(), "the socket goes with the engine, as in QEMU"
    assert not Path(console.fifo_stem + ".in").exists()


async def test_a_client_that_does_not_read_is_dropped_and_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console_clients, "CLIENT_LAG", 64 * 1024)
    path = tmp_path / "c.sock"
    console = Console(unix_server("ser0", path), None)
    await console.open(tmp_path)
    engine = Engine(console)
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(str(path))
    reader, _writer = await asyncio.open_unix_connection(str(path))
    try:
        async with asyncio.timeout(10):
            while len(console.peers) < 2:
                await asyncio.sleep(0.01)
        line = b"x" * 1023 + b"\n"
        for _ in range(1024):  # 1 MiB, read by one client only
            engine.prints(line)
            await reader.readexactly(len(line))
        assert len(console.peers) == 1, "the stalled client was dropped"
        assert len(console.history.tail()) == consoles_module.History().limit
    finally:
        stalled.close()
        console.close(remove=True)
        engine.close()


async def test_output_waits_in_the_fifo_while_nobody_reads_and_logs_carry_history(
    tmp_path: Path,
) -> None:
    """A restart: the first console goes without removing its FIFOs, the
    engine prints meanwhile, and the next console reads it and has the
    history and the ringbuf's unread part from the log."""
    first = Console(chardev("ring", "ringbuf", size=64), tmp_path)
    await first.open(tmp_path)
    engine = Engine(first)
    try:
        engine.prints(b"boot\n")
        async with asyncio.timeout(10):
            while first.history.end < 5:
                await asyncio.sleep(0.01)
        assert first.read_ring(3) == b"boo"
        first.close(remove=False)  # qmpvm killed, or leaving with keep-machine
        engine.prints(b"while-away\n")
        second = Console(chardev("ring", "ringbuf", size=64), tmp_path)
        assert second.history.tail() == b"boot\n"
        assert second.ring is not None and bytes(second.ring.data) == b"t\n"
        await second.open(tmp_path, existing=True)
        async with asyncio.timeout(10):
            while second.history.end < 16:
                await asyncio.sleep(0.01)
        assert second.history.tail() == b"boot\nwhile-away\n"
        assert second.read_ring(64) == b"t\nwhile-away\n"
        second.close(remove=True)
    finally:
        engine.close()
    third = Console(chardev("ring", "ringbuf", size=64), tmp_path)
    assert third.history.end == 16 and third.ring is not None and not third.ring.data


async def test_logs_rotate_and_keep_positions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("qmpvm.host.console_output.LOG_LIMIT", 100)
    console = Console(chardev("n", "null"), tmp_path)
    for index in range(25):
        console.deliver(f"line {index:02d}\n".encode())  # 8 bytes each
    console.close(remove=True)
    assert (tmp_path / "n.log.1").exists()
    again = Console(chardev("n", "null"), tmp_path)
    assert again.history.end == 200
    assert again.history.tail().endswith(b"line 24\n")


async def test_a_file_console_writes_its_file(tmp_path: Path) -> None:
    out = tmp_path / "serial.log"
    out.write_bytes(b"old\n")
    console = Console(chardev("f", "file", out=str(out), append=True), None)
    await console.open(tmp_path)
    console.deliver(b"new\n")
    console.close(remove=True)
    assert out.read_bytes() == b"old\nnew\n"


async def test_a_pty_console_serves_its_slave_and_writes_the_log_file(tmp_path: Path) -> None:
    """QEMU's pty: output reaches whoever opened the slave (none is kept for
    a slave nobody has open), input comes back from it; the chardev's
    ``logfile`` gets every byte, written by qmpvm, not the engine."""
    log = tmp_path / "pty.log"
    console = Console(chardev("p", "pty", logfile=str(log)), tmp_path / "logs")
    (tmp_path / "logs").mkdir()
    await console.open(tmp_path)
    engine = Engine(console)
    path = console.pty_path
    assert path is not None and console.filename() == f"pty:{path}"
    assert console.log is not None and console.log.pty == path, "noted for the next qmpvm"
    engine.prints(b"before anyone\n")
    await asyncio.sleep(0)  # qmpvm reads it: nobody has the slave open
    console.drain()
    slave = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        seen = b""
        async with asyncio.timeout(10):  # the slave's opening is seen within a poll
            while b"LATER" not in seen:
                engine.prints(b"LATER\n")
                await asyncio.sleep(0.05)
                with contextlib.suppress(BlockingIOError):
                    os.set_blocking(slave, False)
                    seen += os.read(slave, 4096)
        assert b"before anyone" not in seen, "QEMU drops what no client could read"
        os.write(slave, b"typed")
        assert await engine.typed(5) == b"typed"
    finally:
        os.close(slave)
        engine.close()
        console.close(remove=True)
    assert log.read_bytes().startswith(b"before anyone\nLATER\n")


def connecting(path: Path, **more: object) -> dict[str, object]:
    addr = {"type": "unix", "data": {"path": str(path)}}
    return chardev("c", "socket", addr=addr, server=False, **more)


async def test_a_connecting_socket_console_dials_and_redials_as_qemu(tmp_path: Path) -> None:
    """``server=off``: connected when it opens (refused then: an error, as
    QEMU's "Failed to connect"); with ``reconnect=N`` an absent server is
    dialled again every N seconds, and a lost connection too."""
    path = tmp_path / "server.sock"
    with pytest.raises(EngineError, match=f"Failed to connect to '{path}'"):
        await Console(connecting(path), None).open(tmp_path)

    console = Console(connecting(path, reconnect=1), None)
    await console.open(tmp_path)  # nobody listens yet: it will try again
    engine = Engine(console)
    assert console.filename() == f"disconnected:unix:{path}"
    connections: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
    connections = asyncio.Queue()
    server = await asyncio.start_unix_server(lambda r, w: connections.put_nowait((r, w)), str(path))
    try:
        async with asyncio.timeout(10):
            reader, writer = await connections.get()
        assert console.filename() == "unix:", "QEMU names a unix client's own (unnamed) end"
        engine.prints(b"to the server\n")
        assert await read_until(reader, b"\n") == b"to the server\n"
        writer.write(b"typed")
        assert await engine.typed(5) == b"typed"
        writer.close()  # the server drops it: dialled again a second later
        async with asyncio.timeout(10):
            reader, writer = await connections.get()
        engine.prints(b"again\n")
        assert await read_until(reader, b"\n") == b"again\n"
        writer.close()
    finally:
        server.close()
        engine.close()
        console.close(remove=True)


async def test_a_path_the_host_refuses_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "s.sock"
    console = Console(unix_server("ser0", missing), None)
    with pytest.raises(EngineError, match=f"cannot open '{missing}': No such file"):
        await console.open(tmp_path)
    assert not console.is_open
    assert not list(tmp_path.glob("ser0.*")), "nothing left behind"


async def test_input_waits_when_the_guest_does_not_take_it(tmp_path: Path) -> None:
    console = Console(chardev("n", "null"), None)
    await console.open(tmp_path)
    engine = Engine(console)
    try:
        blob = os.urandom(3 * 1024 * 1024)  # more than the FIFO holds
        console.write_input(blob)
        got = await engine.typed(len(blob))
        assert got == blob
    finally:
        console.close(remove=True)
        engine.close()


async def test_a_file_console_taken_over_appends(tmp_path: Path) -> None:
    out = tmp_path / "serial.log"
    console = Console(chardev("f", "file", out=str(out)), None)
    await console.open(tmp_path)
    console.deliver(b"before\n")
    console.close(remove=False)  # qmpvm restarts; the engine keeps its FIFOs
    again = Console(chardev("f", "file", out=str(out)), None)
    await again.open(tmp_path, existing=True)
    again.deliver(b"after\n")
    again.close(remove=True)
    assert out.read_bytes() == b"before\nafter\n"


def test_what_could_block_qmpvm_is_not_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "trap"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file or a block device"):
        open_nonblocking(str(fifo), os.O_RDONLY, kinds=("file", "block"))
    with pytest.raises(OSError, match="No such device or address"):
        open_nonblocking(str(fifo), os.O_WRONLY)  # no reader: refused, not waited for
