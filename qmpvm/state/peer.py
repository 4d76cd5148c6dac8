"""The destination qmpvm, as the source's QMP client.

``machine-migrate`` talks to the destination's monitor like any client:
qemu.qmp (already qmpvm's client library) does the protocol; this wraps it
so that refusals become qmpvm errors naming the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from qmpvm.errors import ConfigError, EngineCommandError

CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0


def parse_uri(uri: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (``[v6]`` brackets allowed)."""
    kind, _, rest = uri.partition(":")
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if host and port.isdigit() and int(port) < 65536:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return family, (host, int(port))
    raise ConfigError(f"'{uri}' is not a monitor address: expected unix:PATH or tcp:HOST:PORT")


class Peer:
    def __init__(self, uri: str, client: object) -> None:
        from qemu.qmp import QMPClient

        assert isinstance(client, QMPClient)
        self.uri = uri
        self._client = client

    @classmethod
    async def connect(cls, uri: str) -> Peer:
        from qemu.qmp import QMPClient

        _family, address = parse_uri(uri)
        client = QMPClient("qmpvm-migrate")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await client.connect(address)
        except (OSError, TimeoutError, Exception) as err:
            raise ConfigError(f"cannot reach the destination {uri}: {err}") from err
        return cls(uri, client)

    async def execute(self, name: str, arguments: Mapping[str, object] | None = None) -> object:
        from qemu.qmp import ExecuteError

        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                return await self._client.execute(name, dict(arguments or {}))
        except ExecuteError as err:
            said = err.error.error.desc
            raise EngineCommandError(f"destination {self.uri}: {name}: {said}") from err
        except (OSError, EOFError, TimeoutError) as err:
            raise ConfigError(f"destination {self.uri} did not answer {name}: {err}") from err

    def receive_arguments(self) -> dict[str, object]:
        """The data channel beside the monitor: a TCP port on the same host for
        a TCP monitor, a UNIX socket the destination chooses otherwise."""
        family, address = parse_uri(self.uri)
        if family == socket.AF_UNIX:
            return {}
        host = address[0] if isinstance(address, tuple) else "127.0.0.1"
        return {"listen": f"tcp:{'[' + host + ']' if ':' in host else host}:0"}

    @contextlib.contextmanager
    def watching(self, names: Iterable[str]) -> Iterator[asyncio.Future[dict[str, object]]]:
        """The destination's next event among ``names``."""
        with self._client.listener(list(names)) as listener:
            task = asyncio.ensure_future(listener.get())
            future: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()

            def done(got: asyncio.Task[Any]) -> None:
                if future.done():
                    return
                if got.cancelled() or got.exception() is not None:
                    future.set_exception(EOFError("the destination's events ended"))
                else:
                    future.set_result(dict(got.result()))

            task.add_done_callback(done)
            try:
                yield future
            finally:
                task.cancel()
                future.cancel()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self._client.disconnect()
