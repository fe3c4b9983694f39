"""A TCP fault proxy on loopback (toxiproxy stand-in): latency, rate cap, cut after N bytes, RST, blackhole.

Every setting is an attribute read on each chunk, so a test may change it while connections
are open: ``proxy.latency = 0.2``, ``proxy.rate = 2000``, ``proxy.cut(after=100,
direction="down")``, ``proxy.blackhole = True``, ``proxy.reset_new = True``, ``proxy.reset_all()``.
"up" is client→target, "down" is target→client.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field

__all__ = ["FaultProxy", "ProxyConn"]

CHUNK = 16384


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST: SO_LINGER on with 0 s, then close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class ProxyConn:
    """One proxied connection; ``up``/``down`` count bytes delivered in each direction."""

    index: int
    client: asyncio.StreamWriter
    target: asyncio.StreamWriter | None = None
    up: int = 0
    down: int = 0
    blackholed: bool = False
    tasks: list[asyncio.Task] = field(default_factory=list)
    closed: bool = False


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1", port: int = 0,
                 connect_timeout: float = 5.0) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self._port = port
        self.connect_timeout = connect_timeout
        # Faults, read live:
        self.latency = 0.0  # seconds added to every chunk, each direction
        self.rate: int | None = None  # bytes per second cap, each direction
        self.cut_up: int | None = None  # close both sides after this many bytes client→target
        self.cut_down: int | None = None  # ... target→client
        self.cut_reset = False  # a cut sends RST instead of FIN
        self.blackhole = False  # swallow bytes; new connections never reach the target
        self.reset_new = False  # RST every new connection at once
        self.conns: list[ProxyConn] = []
        self._server: asyncio.base_events.Server | None = None

    # -- control -----------------------------------------------------------------------------

    def cut(self, after: int, direction: str = "both", reset: bool = False) -> None:
        """Close the connection once ``after`` bytes have passed in ``direction`` (up/down/both)."""
        if direction not in ("up", "down", "both"):
            raise ValueError(direction)
        self.cut_up = after if direction in ("up", "both") else None
        self.cut_down = after if direction in ("down", "both") else None
        self.cut_reset = reset

    def heal(self) -> None:
        """Clear every fault (open connections carry on normally)."""
        self.latency = 0.0
        self.rate = None
        self.cut_up = self.cut_down = None
        self.cut_reset = False
        self.blackhole = False
        self.reset_new = False

    def reset_all(self) -> None:
        """RST every open connection, both sides."""
        for c in self.conns:
            self._close(c, reset=True)

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self._port)

    @property
    def active(self) -> int:
        return sum(1 for c in self.conns if not c.closed)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for c in self.conns:
            self._close(c, reset=False, abort=True)
        tasks = [t for c in self.conns for t in c.tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- forwarding ------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ProxyConn(index=len(self.conns), client=writer)
        self.conns.append(conn)
        if self.reset_new:
            conn.closed = True
            _rst(writer)
            return
        if self.blackhole:
            # Accept and say nothing, ever; read and drop so the client's sends succeed.
            conn.blackholed = True
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while await reader.read(CHUNK):
                    pass
            self._close(conn)
            return
        try:
            treader, twriter = await asyncio.wait_for(asyncio.open_connection(*self.target),
                                                      self.connect_timeout)
        except (OSError, TimeoutError):
            # Target down: look like it to the client (RST, as a refused connect would).
            conn.closed = True
            _rst(writer)
            return
        conn.target = twriter
        conn.tasks = [
            asyncio.current_task(),
            asyncio.create_task(self._pump(conn, treader, writer, "down")),
        ]
        await self._pump(conn, reader, twriter, "up")

    async def _pump(self, conn: ProxyConn, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    direction: str) -> None:
        # Reading and writing are split by a queue so latency delays bytes without throttling.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        writer = asyncio.create_task(self._deliver(conn, queue, dst, direction))
        conn.tasks.append(writer)
        try:
            while True:
                data = await src.read(CHUNK)
                if not data:
                    break
                if self.blackhole:
                    continue
                queue.put_nowait((time.monotonic() + self.latency, data))
        except (ConnectionError, asyncio.CancelledError):
            pass
        queue.put_nowait((0.0, b""))  # EOF marker: pass the half-close on
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await writer

    async def _deliver(self, conn: ProxyConn, queue: asyncio.Queue[tuple[float, bytes]],
                       dst: asyncio.StreamWriter, direction: str) -> None:
        try:
            await self._deliver_loop(conn, queue, dst, direction)
        except ConnectionError:
            # One side is gone: so is the connection.
            self._close(conn)

    async def _deliver_loop(self, conn: ProxyConn, queue: asyncio.Queue[tuple[float, bytes]],
                            dst: asyncio.StreamWriter, direction: str) -> None:
        while True:
            due, data = await queue.get()
            if not data:
                if not conn.closed and dst.can_write_eof():
                    with contextlib.suppress(OSError):
                        dst.write_eof()
                if direction == "up" or conn.closed:
                    return
                # Target finished sending: the client side is done once both halves are.
                self._close(conn)
                return
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            while data and not conn.closed:
                rate = self.rate
                piece = data[: max(1, rate // 10)] if rate else data
                limit = self.cut_up if direction == "up" else self.cut_down
                done = conn.up if direction == "up" else conn.down
                cutting = limit is not None and done + len(piece) >= limit
                if cutting:
                    piece = piece[: max(0, limit - done)]
                if piece:
                    dst.write(piece)
                    await dst.drain()
                    if direction == "up":
                        conn.up += len(piece)
                    else:
                        conn.down += len(piece)
                if cutting:
                    self._close(conn, reset=self.cut_reset)
                    return
                data = data[len(piece):]
                if rate:
                    await asyncio.sleep(len(piece) / rate)

    def _close(self, conn: ProxyConn, reset: bool = False, abort: bool = False) -> None:
        if conn.closed and not abort:
            return
        conn.closed = True
        for w in (conn.client, conn.target):
            if w is None:
                continue
            if reset:
                _rst(w)
            elif abort:
                w.transport.abort()
            else:
                w.close()
