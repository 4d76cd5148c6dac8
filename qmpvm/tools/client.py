"""``qmpvm qmp`` (one command, one reply) and ``qmpvm console`` (a terminal on
a guest serial port: a socket or pty chardev both ways, a ringbuf's output by
ringbuf-read, a file or null chardev's by console-history)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import termios
import tty

from qemu.qmp import ConnectError, ExecuteError, QMPClient

DETACH = b"\x1d"  # Ctrl-]


def _address(target: str) -> str | tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if sep and port.isdigit() and not os.path.exists(target):
        return (host or "127.0.0.1", int(port))
    return target


async def _one_shot(target: str, command: str, arguments: dict[str, object] | None) -> int:
    client = QMPClient("qmpvm-qmp")
    await client.connect(_address(target))
    try:
        reply = await client.execute(command, arguments)
    except ExecuteError as err:
        print(f"qmpvm qmp: {command}: {err.error_class}: {err}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(EOFError, ConnectionError):  # after quit, the server goes first
            await client.disconnect()
    print(json.dumps(reply, indent=2))
    return 0


def qmp_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qmpvm qmp", description="Run one QMP command.")
    parser.add_argument("socket", help="QMP socket path, or HOST:PORT")
    parser.add_argument("command")
    parser.add_argument("arguments", nargs="?", help="JSON object of arguments")
    opts = parser.parse_args(argv)
    arguments = None
    if opts.arguments:
        try:
            arguments = json.loads(opts.arguments)
        except ValueError as err:
            parser.error(f"arguments: not JSON: {err}")
        if not isinstance(arguments, dict):
            parser.error("arguments: must be a JSON object")
    try:
        return asyncio.run(_one_shot(opts.socket, opts.command, arguments))
    except (OSError, ConnectError) as err:
        print(f"qmpvm qmp: {opts.socket}: {err}", file=sys.stderr)
        return 1


async def _chardev_target(target: str, chardev: str) -> tuple[str, str]:
    """How to reach ``chardev``: ("socket", PATH), ("tcp", HOST:PORT),
    ("pty", /dev/pts/N), ("ringbuf", ID) or, for a file or null console qmpvm
    serves, ("history", ID), from the configuration and query-chardev."""
    client = QMPClient("qmpvm-console")
    await client.connect(_address(target))
    try:
        reply = await client.execute("query-machine")
        chardevs = reply.get("chardevs", []) if isinstance(reply, dict) else []
        found = next((item for item in chardevs if item.get("id") == chardev), None)
        if found is None:
            raise SystemExit(f"qmpvm console: no chardev '{chardev}'")
        backend = found["backend"]
        kind = backend.get("type")
        addr = backend.get("data", {}).get("addr", {})
        where = addr.get("data", {})
        if kind == "socket" and addr.get("type") == "unix":
            return "socket", str(where["path"])
        if kind == "socket" and addr.get("type") == "inet":
            return "tcp", f"{where.get('host') or '127.0.0.1'}:{where['port']}"
        if kind in ("ringbuf", "memory"):
            return "ringbuf", chardev
        if kind in ("file", "null", "stdio"):
            return "history", chardev
        if kind == "pty":
            engine = isinstance(reply, dict) and reply.get("engine")
            live = await client.execute("query-chardev") if engine else []
            for item in live if isinstance(live, list) else []:
                if item.get("label") == chardev and str(item["filename"]).startswith("pty:"):
                    return "pty", str(item["filename"]).removeprefix("pty:")
            raise SystemExit(f"qmpvm console: pty chardev '{chardev}' has no terminal yet")
    finally:
        await client.disconnect()
    raise SystemExit(
        f"qmpvm console: chardev '{chardev}' is a {kind}: attach to a socket, pty, "
        "ringbuf, file or null chardev"
    )


def console_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="qmpvm console",
        description="Attach this terminal to a guest serial port (Ctrl-] detaches): a "
        "socket or pty chardev both ways (any number of terminals at once on a socket); "
        "a ringbuf's output (also after the guest powered off); a file or null "
        "chardev's output as qmpvm keeps it.",
    )
    parser.add_argument("socket", help="QMP socket path, or HOST:PORT")
    parser.add_argument("--chardev", default="ser0", help="chardev id (default ser0)")
    parser.add_argument(
        "--history",
        action="store_true",
        help="first print what the console printed before (console-history)",
    )
    opts = parser.parse_args(argv)
    try:
        kind, where = asyncio.run(_chardev_target(opts.socket, opts.chardev))
        if kind == "ringbuf":
            print(f"qmpvm console: reading ringbuf {where} (output only)", file=sys.stderr)
            return asyncio.run(_follow_ringbuf(opts.socket, where))
        since = None
        if opts.history or kind == "history":
            since = asyncio.run(_print_history(opts.socket, opts.chardev, show=opts.history))
        if kind == "history":
            print(f"qmpvm console: following {where}'s output", file=sys.stderr)
            return asyncio.run(_follow_history(opts.socket, where, since))
    except (OSError, ConnectError) as err:
        print(f"qmpvm console: {opts.socket}: {err}", file=sys.stderr)
        return 1
    note = f"qmpvm console: connected to {opts.chardev} ({where}); Ctrl-] detaches"
    if kind == "pty":
        fd = os.open(where, os.O_RDWR | os.O_NOCTTY)
        try:
            print(note, file=sys.stderr)
            _pump(fd)
        finally:
            os.close(fd)
        return 0
    if kind == "tcp":
        host, _sep, port = where.rpartition(":")
        sock = socket.create_connection((host, int(port)))
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(where)
    with sock:
        print(note, file=sys.stderr)
        _pump(sock.fileno())
    return 0


async def _print_history(target: str, chardev: str, *, show: bool) -> int | None:
    """The position a console's kept output ends at (None: it keeps none);
    ``show``: print that output first."""
    client = QMPClient("qmpvm-console")
    await client.connect(_address(target))
    try:
        found = await client.execute("console-history", {"device": chardev})
    except ExecuteError as err:
        if show:
            print(f"qmpvm console: no history: {err}", file=sys.stderr)
        return None
    finally:
        with contextlib.suppress(EOFError, ConnectionError):
            await client.disconnect()
    assert isinstance(found, dict)
    if show:
        sys.stdout.write(str(found["data"]))
        sys.stdout.flush()
    return int(found["end"])


async def _follow_history(target: str, chardev: str, since: int | None) -> int:
    """Print a console's output as qmpvm keeps it, until standard input ends
    (or carries Ctrl-]); 1 if the chardev goes."""
    client = QMPClient("qmpvm-console")
    await client.connect(_address(target))
    stdin_done = asyncio.get_running_loop().run_in_executor(None, _wait_for_detach)
    try:
        while not stdin_done.done():
            arguments: dict[str, object] = {"device": chardev}
            if since is not None:
                arguments["since"] = since
            try:
                found = await client.execute("console-history", arguments)
            except ExecuteError as err:
                print(f"qmpvm console: {err}", file=sys.stderr)
                return 1
            assert isinstance(found, dict)
            sys.stdout.write(str(found["data"]))
            sys.stdout.flush()
            since = int(found["end"])
            await asyncio.wait({stdin_done}, timeout=POLL_INTERVAL)
    finally:
        with contextlib.suppress(EOFError, ConnectionError):
            await client.disconnect()
    return 0


async def _follow_ringbuf(target: str, chardev: str) -> int:
    """Print what the ringbuf holds, then what comes, until standard input ends
    (or carries Ctrl-]) and nothing more is held, or there is no ringbuf left
    to read (the machine gone and its kept output read): 1 if nothing was."""
    client = QMPClient("qmpvm-console")
    await client.connect(_address(target))
    stdin_done = asyncio.get_running_loop().run_in_executor(None, _wait_for_detach)
    printed = False
    try:
        while True:
            try:
                data = await client.execute(
                    "ringbuf-read", {"device": chardev, "size": 65536, "format": "utf8"}
                )
            except ExecuteError as err:
                print(f"qmpvm console: {err}", file=sys.stderr)
                break
            if data:
                sys.stdout.write(str(data))
                sys.stdout.flush()
                printed = True
            elif stdin_done.done():
                break
            else:
                await asyncio.wait({stdin_done}, timeout=POLL_INTERVAL)
    finally:
        with contextlib.suppress(EOFError, ConnectionError):
            await client.disconnect()
    return 0 if printed else 1


POLL_INTERVAL = 0.1
"""Seconds between two ringbuf-read while a ringbuf has nothing new."""


def _wait_for_detach() -> None:
    """Until standard input ends or carries Ctrl-]."""
    stdin = sys.stdin.fileno()
    while True:
        data = os.read(stdin, 1024)
        if not data or DETACH in data:
            return


def _pump(fd: int) -> None:
    """Copy between this terminal and ``fd`` (a socket or a pty) until either ends."""
    import selectors

    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    if saved is not None:
        tty.setraw(stdin)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            sel.register(stdin, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj == fd:
                        try:
                            data = os.read(fd, 4096)
                        except OSError:  # a pty whose other side is gone: EIO
                            return
                        if not data:
                            return
                        os.write(sys.stdout.fileno(), data)
                    else:
                        data = os.read(stdin, 1024)
                        if not data or DETACH in data:
                            return
                        _write_all(fd, data)
    finally:
        if saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
