"""``qmpvm qmp`` (one command, one reply) and ``qmpvm console`` (a terminal on
a guest serial port served by a socket chardev)."""

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


async def _chardev_path(target: str, chardev: str) -> str:
    client = QMPClient("qmpvm-console")
    await client.connect(_address(target))
    try:
        reply = await client.execute("query-machine")
    finally:
        await client.disconnect()
    chardevs = reply.get("chardevs", []) if isinstance(reply, dict) else []
    for item in chardevs:
        if item.get("id") != chardev:
            continue
        backend = item["backend"]
        addr = backend.get("data", {}).get("addr", {})
        if backend.get("type") == "socket" and addr.get("type") == "unix":
            return str(addr["data"]["path"])
        raise SystemExit(f"qmpvm console: chardev '{chardev}' is not a UNIX socket chardev")
    raise SystemExit(f"qmpvm console: no chardev '{chardev}'")


def console_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="qmpvm console",
        description="Attach this terminal to a guest serial port (Ctrl-] detaches).",
    )
    parser.add_argument("socket", help="QMP socket path, or HOST:PORT")
    parser.add_argument("--chardev", default="ser0", help="socket chardev id (default ser0)")
    opts = parser.parse_args(argv)
    try:
        path = asyncio.run(_chardev_path(opts.socket, opts.chardev))
    except (OSError, ConnectError) as err:
        print(f"qmpvm console: {opts.socket}: {err}", file=sys.stderr)
        return 1
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        print(
            f"qmpvm console: connected to {opts.chardev} ({path}); Ctrl-] detaches", file=sys.stderr
        )
        _pump(sock)
    return 0


def _pump(sock: socket.socket) -> None:
    import selectors

    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    if saved is not None:
        tty.setraw(stdin)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ)
            sel.register(stdin, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj is sock:
                        data = sock.recv(4096)
                        if not data:
                            return
                        os.write(sys.stdout.fileno(), data)
                    else:
                        data = os.read(stdin, 1024)
                        if not data or DETACH in data:
                            return
                        sock.sendall(data)
    finally:
        if saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
