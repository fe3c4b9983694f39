"""RawClient reads replies exactly and never hangs, against a scripted loopback server."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support import MalformedReply, RawClient, ServerClosed


@pytest.fixture
async def scripted():
    """Start a server that writes the given bytes (in pieces, with pauses) and then, if asked, closes."""
    servers = []

    async def make(*pieces: bytes, close: bool = False, pause: float = 0.02) -> RawClient:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for p in pieces:
                writer.write(p)
                await writer.drain()
                await asyncio.sleep(pause)
            if close:
                writer.close()
            else:
                await reader.read()  # hold the connection until the client leaves

        server = await asyncio.start_server(serve, "127.0.0.6", 0)
        servers.append(server)
        return await RawClient.connect("127.0.0.6", server.sockets[0].getsockname()[1], timeout=1)

    yield make
    for s in servers:
        s.close()


async def test_multiline_reply_split_anywhere(scripted):
    c = await scripted(b"250-first\r", b"\n250-sec", b"ond\r\n250 ", b"last\r\n220 x\r\n")
    assert await c.read_reply() == (250, ["first", "second", "last"])
    assert await c.read_reply() == (220, ["x"])
    await c.close()


async def test_bare_code_and_bare_lf(scripted):
    c = await scripted(b"250\n354 go\r\n")
    assert await c.read_reply() == (250, [""])
    assert await c.expect(354) == ["go"]
    await c.close()


async def test_expect_reports_the_wrong_code(scripted):
    c = await scripted(b"451 4.3.0 later\r\n")
    with pytest.raises(AssertionError, match="expected 250, got 451"):
        await c.expect(250)
    await c.close()


@pytest.mark.parametrize("line", [b"25O ok\r\n", b"hello\r\n", b"250x\r\n", b"250-a\r\n251 b\r\n"])
async def test_malformed(scripted, line):
    c = await scripted(line)
    with pytest.raises(MalformedReply):
        await c.read_reply()
    await c.close()


async def test_silent_server_times_out_quickly(scripted):
    c = await scripted()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await c.read_reply(timeout=0.2)
    assert time.monotonic() - t0 < 1
    assert await c.closed(0.2) is False
    await c.close()


async def test_trickled_reply_still_bounded_by_one_deadline(scripted):
    # A continuation line every 0.1 s must not reset the deadline (slowloris from the server).
    c = await scripted(*[b"250-x\r\n"] * 30, pause=0.1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await c.read_reply(timeout=0.5)
    assert time.monotonic() - t0 < 1.0
    await c.close()


async def test_closed_mid_reply(scripted):
    c = await scripted(b"250-partial\r\n250 no end", close=True)
    with pytest.raises(ServerClosed):
        await c.read_reply()
    assert await c.closed(0.5) is True
    await c.close()


async def test_closed_keeps_unread_data(scripted):
    c = await scripted(b"221 bye\r\n", close=True)
    assert await c.closed(1) is True
    assert c.buffer == b"221 bye\r\n"
    assert await c.read_reply() == (221, ["bye"])
    await c.close()
