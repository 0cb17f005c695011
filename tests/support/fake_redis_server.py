"""A loopback TCP server that speaks just enough RESP to pass for a Redis of a chosen version.

It answers what a client says while connecting and what a worker asks at start-up and when
it closes (PING, SELECT, CLIENT, AUTH, INFO, DBSIZE, DEL); any other command gets an error, so
a test that goes further than the start-up checks fails loudly instead of talking to a fake.

    async with FakeRedisServer("6.2.14") as server:
        settings = settings.model_copy(update={"redis_url": server.url})
"""

from __future__ import annotations

import asyncio
from types import TracebackType

_OK_COMMANDS = {b"SELECT", b"CLIENT", b"AUTH", b"READONLY"}


class FakeRedisServer:
    def __init__(self, version: str) -> None:
        self.version = version
        self.commands: list[list[bytes]] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "use `async with FakeRedisServer(...)`"
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"redis://{host}:{port}/0"

    async def __aenter__(self) -> FakeRedisServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def _info(self) -> bytes:
        # The shape of a real `INFO server` answer, trimmed to what clients read.
        text = (
            "# Server\r\n"
            f"redis_version:{self.version}\r\n"
            "redis_mode:standalone\r\n"
            "os:Linux\r\n"
            "tcp_port:6379\r\n"
        ).encode()
        return b"$%d\r\n%s\r\n" % (len(text), text)

    def _answer(self, command: list[bytes]) -> bytes:
        name = command[0].upper() if command else b""
        if name == b"PING":
            return b"+PONG\r\n"
        if name == b"INFO":
            return self._info()
        if name in (b"DBSIZE", b"DEL"):
            return b":0\r\n"
        if name in _OK_COMMANDS:
            return b"+OK\r\n"
        return b"-ERR fake server: command %s not supported\r\n" % name

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while command := await _read_command(reader):
                self.commands.append(command)
                writer.write(self._answer(command))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _read_command(reader: asyncio.StreamReader) -> list[bytes]:
    """One request: a RESP array of bulk strings (what clients send), or an inline command."""
    line = await reader.readline()
    if not line:
        return []
    if not line.startswith(b"*"):
        return line.split()
    parts = []
    for _ in range(int(line[1:])):
        header = await reader.readline()
        size = int(header[1:])
        parts.append((await reader.readexactly(size + 2))[:-2])
    return parts
