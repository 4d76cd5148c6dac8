"""``qmpvm qmp`` (one command, one reply) and ``qmpvm console`` (a terminal on
a guest serial port: a UNIX socket or pty chardev both ways, a ringbuf's
output by ringbuf-read)."""

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
    """How to reach ``chardev``: ("socket", PATH), ("pty", /dev/pts/N) or
    ("ringbuf", ID), from the configuration and the engine's query-chardev."""
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
        if kind == "socket" and addr.get("type") == "unix":
            return "socket", str(addr["data"]["path"])
        if kind in ("ringbuf", "memory"):
            return "ringbuf", chardev
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
        f"qmpvm console: chardev '{chardev}' is a {kind}: attach to a UNIX socket, "
        "pty or ringbuf chardev"
    )


def console_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="qmpvm console",
        description="Attach this terminal to a guest serial port (Ctrl-] detaches): a "
        "UNIX socket or pty chardev both ways; a ringbuf's output (also after "
        "the guest powered off).",
    )
    parser.add_argument("socket", help="QMP socket path, or HOST:PORT")
    parser.add_argument("--chardev", default="ser0", help="chardev id (default ser0)")
    opts = parser.parse_args(argv)
    try:
        kind, where = asyncio.run(_chardev_target(opts.socket, opts.chardev))
        if kind == "ringbuf":
            print(f"qmpvm console: reading ringbuf {where} (output only)", file=sys.stderr)
            return asyncio.run(_follow_ringbuf(opts.socket, where))
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
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(where)
        print(note, file=sys.stderr)
        _pump(sock.fileno())
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
