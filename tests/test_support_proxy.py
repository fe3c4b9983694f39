"""The fault proxy forwards bytes and injects each fault it claims: latency, rate, cut, RST, blackhole."""

from __future__ import annotations

import asyncio
import socket
import time

import aiosmtplib
import pytest

from tests.support import FaultProxy, InThread, Sink, free_port


class Target:
    """A loopback TCP server: echoes, or first sends ``hello`` bytes; records what it received."""

    def __init__(self, hello: bytes = b"") -> None:
        self.hello = hello
        self.accepted = 0
        self.received: list[bytes] = []
        self.eofs = 0

    async def start(self) -> Target:
        self.server = await asyncio.start_server(self._serve, "127.0.0.3", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        got = bytearray()
        self.received.append(b"")
        try:
            if self.hello:
                writer.write(self.hello)
            while data := await reader.read(65536):
                got += data
                self.received[-1] = bytes(got)
                if not self.hello:
                    writer.write(data)
                    await writer.drain()
            self.eofs += 1
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        self.server.close()


@pytest.fixture
async def echo():
    t = await Target().start()
    yield t
    await t.stop()


@pytest.fixture
async def proxy(echo):
    async with FaultProxy("127.0.0.3", echo.port) as p:
        yield p


async def connect(p: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(*p.address), 3)


async def read_exactly(reader: asyncio.StreamReader, n: int, timeout: float = 3.0) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), timeout)


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


async def test_forwards_both_ways(proxy, echo):
    assert proxy.address == ("127.0.0.1", proxy.port)
    r, w = await connect(proxy)
    w.write(b"hello")
    assert await read_exactly(r, 5) == b"hello"
    w.write_eof()  # a half-close passes through; the target then closes
    assert await read_to_eof(r) == b""
    assert echo.received == [b"hello"] and echo.eofs == 1
    conn = proxy.conns[0]
    assert (conn.up, conn.down) == (5, 5)
    w.close()


async def test_latency(proxy):
    proxy.latency = 0.2
    r, w = await connect(proxy)
    t0 = time.monotonic()
    w.write(b"ping")
    assert await read_exactly(r, 4) == b"ping"
    elapsed = time.monotonic() - t0
    assert 0.38 <= elapsed < 2  # 0.2 s each way
    proxy.latency = 0.0  # changed live, same connection
    t0 = time.monotonic()
    w.write(b"pong")
    assert await read_exactly(r, 4) == b"pong"
    assert time.monotonic() - t0 < 0.15
    w.close()


async def test_rate_cap(proxy):
    proxy.rate = 20_000
    r, w = await connect(proxy)
    payload = bytes(range(256)) * 40  # 10240 bytes
    t0 = time.monotonic()
    w.write(payload)
    assert await read_exactly(r, len(payload), timeout=5) == payload
    assert time.monotonic() - t0 >= 0.45  # ~0.5 s at 20 kB/s
    w.close()


async def test_cut_down_after_n_bytes():
    talker = await Target(hello=b"x" * 1000).start()
    async with FaultProxy("127.0.0.3", talker.port) as p:
        p.cut(after=100, direction="down")
        r, w = await connect(p)
        assert await read_to_eof(r) == b"x" * 100
        w.close()
    await talker.stop()


async def test_cut_up_after_n_bytes(proxy, echo):
    proxy.cut(after=50, direction="up")
    r, w = await connect(proxy)
    w.write(b"a" * 200)
    # Cut the moment the 50th byte is forwarded: before the echo can come back.
    assert await read_to_eof(r) == b""
    await asyncio.sleep(0.05)
    assert echo.received == [b"a" * 50]
    assert proxy.conns[0].up == 50
    w.close()


async def test_cut_with_reset(proxy):
    proxy.cut(after=3, direction="both", reset=True)
    r, w = await connect(proxy)
    w.write(b"abcdef")
    with pytest.raises(ConnectionResetError):
        await read_to_eof(r)
    w.close()


async def test_reset_new_connections(proxy, echo):
    proxy.reset_new = True
    r, w = await connect(proxy)
    with pytest.raises(ConnectionResetError):
        await read_to_eof(r)
    assert echo.accepted == 0
    w.close()


async def test_reset_all_open_connections(proxy):
    r, w = await connect(proxy)
    w.write(b"hi")
    assert await read_exactly(r, 2) == b"hi"
    proxy.reset_all()
    with pytest.raises(ConnectionResetError):
        await read_to_eof(r)
    assert proxy.active == 0
    w.close()


async def test_blackhole(proxy, echo):
    proxy.blackhole = True
    r, w = await connect(proxy)  # the connect succeeds...
    w.write(b"EHLO x\r\n")
    await w.drain()
    with pytest.raises(TimeoutError):  # ...and nothing ever answers
        await asyncio.wait_for(r.read(1), 0.5)
    assert echo.accepted == 0
    w.close()
    # Switched on for an open connection, it swallows what is sent from then on.
    proxy.blackhole = False
    r2, w2 = await connect(proxy)
    w2.write(b"one")
    assert await read_exactly(r2, 3) == b"one"
    proxy.blackhole = True
    w2.write(b"two")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r2.read(1), 0.3)
    proxy.heal()
    w2.write(b"three")
    assert await read_exactly(r2, 5) == b"three"
    w2.close()


async def test_target_down_looks_like_a_refusal():
    async with FaultProxy("127.0.0.3", free_port("127.0.0.3")) as p:
        r, w = await connect(p)
        with pytest.raises(ConnectionResetError):
            await read_to_eof(r)
        w.close()


async def test_smtp_through_the_proxy():
    async with Sink() as sink, FaultProxy(sink.host, sink.port, host="127.0.0.4") as p:
        p.latency = 0.05
        errors, _ = await aiosmtplib.send(b"Subject: x\r\n\r\nbody\r\n", sender="s@c.test",
                                          recipients=["a@d.test"], hostname=p.host, port=p.port,
                                          start_tls=False, timeout=5)
        assert errors == {} and len(sink.messages) == 1
        # Cut the replies mid-session: the client sees the server vanish.
        p.cut(after=40, direction="down")
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await aiosmtplib.send(b"Subject: x\r\n\r\nbody\r\n", sender="s@c.test", recipients=["a@d.test"],
                                  hostname=p.host, port=p.port, start_tls=False, timeout=5)
        assert len(sink.messages) == 1


def test_proxy_in_a_thread_with_a_blocking_socket():
    with socket.create_server(("127.0.0.5", 0)) as target:
        tport = target.getsockname()[1]
        with InThread(FaultProxy, "127.0.0.5", tport) as p, \
                socket.create_connection(p.address, timeout=3) as c:
            server_side, _ = target.accept()
            c.sendall(b"abc")
            assert server_side.recv(10) == b"abc"
            p.cut(after=2, direction="down")
            server_side.sendall(b"12345")
            got = b""
            while chunk := c.recv(10):
                got += chunk
            assert got == b"12"
            server_side.close()
