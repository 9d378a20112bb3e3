"""A TCP proxy for fault tests: forwards to a server until told to cut it off or freeze, like a network outage.

While cut, every open connection is closed and new ones are accepted and closed
at once (what a client sees when the database host goes away and comes back).
While frozen, nothing is forwarded and nothing is closed: bytes wait on both
sides and new connections wait for their upstream, as in a network partition or
a failover, where packets are dropped and TCP retransmits them once the network
heals. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port`` until :meth:`cut`.

    Args:
        target_host: the real server's host.
        target_port: the real server's port.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.cut_off = False
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        """Listen on a free local port (see :attr:`port`)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        """Close every connection and refuse new ones until :meth:`restore`."""
        self.cut_off = True
        for writer in list(self._writers):
            writer.close()

    def freeze(self) -> None:
        """Stop forwarding without closing anything (a blackhole) until :meth:`restore`."""
        self._flowing.clear()

    def restore(self) -> None:
        """Forward again: new connections after a cut, and what waited during a freeze."""
        self.cut_off = False
        self._flowing.set()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.close()
            return
        await self._flowing.wait()
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, upstream_writer))
        try:
            await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
        finally:
            for each in (writer, upstream_writer):
                self._writers.discard(each)
                each.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.close()
