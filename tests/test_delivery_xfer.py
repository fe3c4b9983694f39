"""The XFER client (fastrelay.delivery.xfer) against the real XFER server storing into a real spool,
and against small real HTTP servers that answer badly: docs/reliability.md cases 36, 38, 49 and P4.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import NamedTuple

import pytest
import uvloop
from aiohttp import web

from fastrelay.delivery import OK, PERM, TEMP, ConnectError, Hop, Settings
from fastrelay.delivery.connect import connect
from fastrelay.delivery.xfer import XferConnection, _sessions, close_sessions, connect_xfer
from fastrelay.message import DELIVERED, Envelope, Recipient
from fastrelay.spool import Spool
from fastrelay.xfer import wire
from fastrelay.xfer.server import XferServer, XferServerSettings
from tests.support import free_port
from tests.test_xfer_server import SpoolIntake, open_spool, spooled

SECRET = "s3cret shared by both nodes"
FAST = Settings(helo_name="a.test", connect_timeout=1.0, xfer_timeout=2.0, xfer_secret=SECRET)
BODY = b"Received: from a\r\nSubject: xfer\r\n\r\nbody \x00\xff\r\n..\r\n"
KEY = ("node-a", "41")


def hop(port: int, host: str = "127.0.0.1") -> Hop:
    return Hop(host, port, "xfer", "peer.test", 0)


def settings(**kw) -> Settings:
    return dataclasses.replace(FAST, **kw)


def envelope(**kw) -> Envelope:
    base = dict(sender="s@src.test", recipients=[Recipient("r1@dst.test", "NOTIFY=NEVER"), Recipient("r2@dst.test"),
                                                 Recipient("r3@dst.test", state=DELIVERED)],
                domain="xfer.test", client_ip="192.0.2.9", helo="c.test", msgid="29.aaaa",
                received_at=time.time() - 600, first_queued=time.time() - 500, attempts=2,
                next_attempt=time.time() - 1, meta={"rerouted_from": "dst.test", "note": "kept"})
    base.update(kw)
    return Envelope(**base)


@pytest.fixture(autouse=True)
async def _close_sessions():
    yield
    await close_sessions()


class Receiver(NamedTuple):
    srv: XferServer
    spool: Spool
    port: int


@pytest.fixture
async def receiver_factory(tmp_path):
    made: list[Receiver] = []

    async def make(**kw) -> Receiver:
        kw.setdefault("secret", SECRET)
        sp = await open_spool(tmp_path / f"recv{len(made)}")
        srv = XferServer(XferServerSettings(**kw), SpoolIntake(sp))
        await srv.start("127.0.0.1", 0)
        r = Receiver(srv, sp, srv.sockets[0].getsockname()[1])
        made.append(r)
        return r

    yield make
    for r in made:
        await r.srv.stop()
        await r.spool.close()


@pytest.fixture
async def receiver(receiver_factory):
    return await receiver_factory(tokens=("tok",))


async def send(port: int, env: Envelope | None = None, idx=(0, 1), body: bytes = BODY, key=KEY,
               s: Settings = FAST) -> tuple[list, XferConnection]:
    conn = await connect_xfer(hop(port), s)
    res = await conn.transfer(env or envelope(), list(idx), body, key)
    assert len(res) == len(idx) and len(set(res)) == 1
    return res, conn


# --- against the real server and spool ------------------------------------------------------------


async def test_ok_carries_the_receivers_durable_id(receiver):
    res, conn = await send(receiver.port)
    (env, body), = await spooled(receiver.spool)
    node = receiver.spool.node_id
    assert res[0] == (OK, 250, f"2.0.0 transferred as {env.msgid} to {node}")
    assert res[0].response == f"250 2.0.0 transferred as {env.msgid} to {node}"
    assert body == BODY
    assert [(r.address, r.params) for r in env.recipients] == [("r1@dst.test", "NOTIFY=NEVER"), ("r2@dst.test", "")]
    assert (env.domain, env.protocol, env.meta["xfer_path"]) == ("dst.test", "xfer", ["node-a"])
    assert env.meta["xfer_origin"]["id"] == "41" and env.meta["xfer_origin"]["domain"] == "dst.test"
    assert conn.usable and conn.remote == f"127.0.0.1:{receiver.port}"
    await conn.close()
    await conn.close()  # never raises
    assert not conn.usable


async def test_the_same_key_twice_is_a_duplicate_with_the_same_id(receiver):
    first, conn = await send(receiver.port)
    again = await conn.transfer(envelope(), [0, 1], BODY, KEY)
    assert again[0].status == OK and again[0].text == first[0].text + " (already transferred before)"
    assert len(await spooled(receiver.spool)) == 1
    other = await conn.transfer(envelope(), [0, 1], BODY, ("node-a", "42"))
    assert other[0].status == OK and other[0].text != first[0].text
    assert len(await spooled(receiver.spool)) == 2


async def test_bearer_token_and_the_scheduler_connector(receiver):
    conn = await connect(hop(receiver.port), settings(xfer_secret=None, xfer_token="tok"))
    assert isinstance(conn, XferConnection)
    res = await conn.transfer(envelope(), [1], BODY, KEY)
    assert res[0].status == OK
    with pytest.raises(NotImplementedError):
        await conn.deliver("s@src.test", "", [("r@d.test", "")], BODY)


async def test_teleport_carries_the_context_and_without_it_the_receiver_starts_afresh(receiver_factory):
    env = envelope()
    on = await receiver_factory()
    await send(on.port, env, s=settings(teleport=True))
    (got, _), = await spooled(on.spool)
    assert (got.attempts, got.first_queued, got.next_attempt) == (env.attempts, env.first_queued, env.next_attempt)
    assert got.meta["note"] == "kept" and "rerouted_from" not in got.meta

    off = await receiver_factory()
    t0 = time.time()
    await send(off.port, env, s=settings(teleport=False))
    (got, _), = await spooled(off.spool)
    assert got.attempts == 0 and t0 <= got.first_queued <= time.time() and t0 <= got.next_attempt <= time.time()
    assert "note" not in got.meta


async def test_a_peer_refusing_the_message_is_permanent(receiver, caplog):
    env = envelope(recipients=[Recipient("r1@dst.test"), Recipient("bad@@dst.test")])
    with caplog.at_level(logging.ERROR, logger="fastrelay.delivery.xfer"):
        res, conn = await send(receiver.port, env)
    assert res[0].status == PERM and res[0].code == 554
    assert res[0].text.startswith(f"5.6.0 XFER peer 127.0.0.1:{receiver.port} refused the message: 400 bad_recipient:")
    assert "refused for good" in caplog.text and conn.usable
    assert await spooled(receiver.spool) == []


async def test_a_loop_is_permanent(receiver):
    env = envelope(meta={"xfer_path": ["n1", receiver.spool.node_id]})
    res, _ = await send(receiver.port, env)
    assert (res[0].status, res[0].code) == (PERM, 554) and res[0].text.startswith("5.4.6 XFER loop detected")
    assert "508 loop_detected" in res[0].text


async def test_too_big_for_the_peer_is_permanent(receiver_factory):
    small = await receiver_factory(max_body=64 * 1024)
    # Above 1 MiB the client asks with Expect: 100-continue, so the 413 comes before the upload.
    res, conn = await send(small.port, body=b"x" * (1536 * 1024))
    assert (res[0].status, res[0].code) == (PERM, 552) and res[0].text.startswith("5.3.4 Message too big")
    assert conn.usable


async def test_a_large_message_goes_whole_and_byte_exact(receiver):
    body = (bytes(range(256)) * 16384)[: 3 * 1024 * 1024 + 17]  # over 1 MiB: sent with Expect: 100-continue
    res, _ = await send(receiver.port, body=body)
    assert res[0].status == OK
    (env, got), = await spooled(receiver.spool)
    assert got == body and res[0].text == f"2.0.0 transferred as {env.msgid} to {receiver.spool.node_id}"


async def test_a_wrong_secret_is_transient_and_logged(receiver, caplog):
    with caplog.at_level(logging.ERROR, logger="fastrelay.delivery.xfer"):
        res, _ = await send(receiver.port, s=settings(xfer_secret="not it"))
    assert (res[0].status, res[0].code) == (TEMP, 451)
    assert res[0].text == f"4.7.0 XFER peer 127.0.0.1:{receiver.port} refused this node: 401 bad_signature: " \
                          "the signature does not match (secret, method, path or body)"
    assert "check xfer_secret" in caplog.text
    assert await spooled(receiver.spool) == []


async def test_connect_refused_is_a_connect_error():
    port = free_port()
    with pytest.raises(ConnectError) as ei:
        await connect_xfer(hop(port), FAST)
    assert ei.value.code == 451 and ei.value.text.startswith(f"4.4.1 Connection to 127.0.0.1:{port} failed")
    with pytest.raises(ConnectError):
        await connect(hop(port), FAST)


# --- against servers that answer badly ------------------------------------------------------------


class FaultServer:
    """A plain aiohttp server answering every request with `status` and `body` after `delay`."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b""
        self.delay = 0.0
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()  # ends a delay early when the test is done

    async def handle(self, request: web.Request) -> web.Response:
        data = await request.read()
        self.requests.append((request.method, request.raw_path, dict(request.headers), data))
        if self.delay:
            try:
                await asyncio.wait_for(self._release.wait(), self.delay)
            except TimeoutError:
                pass
        return web.Response(status=self.status, body=self.body, content_type="application/json")

    async def __aenter__(self) -> FaultServer:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site.port
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._runner is not None
        self._release.set()
        await self._runner.cleanup()


def e(code: str, message: str = "m") -> bytes:
    return wire.encode_error(code, message)


ANSWERS = [
    (503, e("spool_full", "later"), TEMP, 451, "4.3.0 XFER peer {r} answered 503 spool_full: later"),
    (429, e("slow_down"), TEMP, 451, "4.3.0 XFER peer {r} answered 429 slow_down: m"),
    (500, b"<html>oops</html>", TEMP, 451, "4.3.0 XFER peer {r} answered 500"),
    (502, e("bad_gateway"), TEMP, 451, "4.3.0 XFER peer {r} answered 502 bad_gateway: m"),
    (400, e("bad_recipient", "no\r\nsuch"), PERM, 554, "5.6.0 XFER peer {r} refused the message: 400 bad_recipient: no  such"),
    (413, e("too_large"), PERM, 552, "5.3.4 Message too big for XFER peer {r}: 413 too_large: m"),
    (508, e("loop_detected"), PERM, 554, "5.4.6 XFER loop detected by peer {r}: 508 loop_detected: m"),
    (401, e("bad_signature"), TEMP, 451, "4.7.0 XFER peer {r} refused this node: 401 bad_signature: m"),
    (403, e("forbidden"), TEMP, 451, "4.7.0 XFER peer {r} refused this node: 403 forbidden: m"),
    (404, e("not_found"), TEMP, 451, "4.3.5 XFER peer {r} is not set up for this transfer: 404 not_found: m"),
    (405, e("method_not_allowed"), TEMP, 451, "4.3.5 XFER peer {r} is not set up for this transfer: 405 method_not_allowed: m"),
    (415, e("unsupported_version"), TEMP, 451, "4.3.5 XFER peer {r} is not set up for this transfer: 415 unsupported_version: m"),
    (200, b"garbage", TEMP, 451, "4.5.0 XFER peer {r} answered 200 with a bad body (the response is not valid JSON: Expecting value: line 1 column 1 (char 0)): unknown outcome, will resend with the same idempotency key"),
    (200, b'{"status":"accepted","id":"1","node":"n"}', TEMP, 451, "4.5.0 XFER peer {r} answered 200 with a bad body (duplicate must be true or false): unknown outcome, will resend with the same idempotency key"),
    (200, b" " * (70 * 1024), TEMP, 451, "4.5.0 XFER peer {r} answered 200 with a bad body (the response body is too large): unknown outcome, will resend with the same idempotency key"),
    (302, b"", TEMP, 451, "4.5.0 XFER peer {r} answered an unexpected 302; will resend with the same idempotency key"),
    (408, e("timeout"), TEMP, 451, "4.5.0 XFER peer {r} answered an unexpected 408 timeout: m; will resend with the same idempotency key"),
]


@pytest.mark.parametrize(("status", "body", "want", "code", "text"), ANSWERS,
                         ids=[f"{a[0]}-{a[1][:12]!r}" for a in ANSWERS])
async def test_each_answer_maps_to_the_right_outcome(status, body, want, code, text):
    async with FaultServer() as fs:
        fs.status, fs.body = status, body
        res, conn = await send(fs.port)
        assert (res[0].status, res[0].code) == (want, code)
        assert res[0].text == text.format(r=f"127.0.0.1:{fs.port}")
        assert conn.usable  # an HTTP answer leaves the pool usable
        assert len(fs.requests) == 1  # and nothing was followed or retried behind our back


async def test_the_request_on_the_wire(receiver):
    async with FaultServer() as fs:
        fs.body = wire.encode_response("9.x", "peer-node", False)
        s = settings(http_uri="/in?v=1", http_method="PUT", http_host="localhost", teleport=True)
        res, _ = await send(fs.port, s=s)
        assert res[0] == (OK, 250, "2.0.0 transferred as 9.x to peer-node")
        method, path, headers, data = fs.requests[0]
        assert (method, path, headers["Host"]) == ("PUT", "/in?v=1", "localhost")
        assert headers["Content-Type"] == wire.CONTENT_TYPE and headers[wire.H_VERSION] == "1"
        assert headers[wire.H_CONTENT_SHA256] == wire.content_sha256(data)
        assert "Content-Encoding" not in headers
        assert wire.verify(headers["Authorization"], "PUT", "/in?v=1", headers[wire.H_CONTENT_SHA256],
                           secret=SECRET) == "hmac"
        t = wire.decode_request(data, headers[wire.H_ENVELOPE_LENGTH])
        assert t.key == KEY and t.body == BODY and t.context is not None and t.context.attempts == 2
        # No HTTP_HOST: the route's host and port; a token when there is no secret.
        await send(fs.port, s=settings(xfer_secret=None, xfer_token="tok"))
        _, _, headers, _ = fs.requests[1]
        assert headers["Host"] == f"127.0.0.1:{fs.port}" and headers["Authorization"] == "Bearer tok"


async def test_no_answer_within_the_timeout_is_transient_and_ends_the_connection():
    async with FaultServer() as fs:
        fs.delay = 5.0
        t0 = time.monotonic()
        res, conn = await send(fs.port, s=settings(xfer_timeout=0.5))
        took = time.monotonic() - t0
        assert 0.4 < took < 1.5, took
        assert (res[0].status, res[0].code) == (TEMP, 451)
        assert res[0].text == (f"4.4.2 No answer from XFER peer 127.0.0.1:{fs.port} within 0.5 s; unknown outcome, "
                               "will resend with the same idempotency key")
        assert not conn.usable


async def raw_server(on_connect) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await on_connect(reader, writer)
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("behaviour", ["reset mid-request", "closed without an answer", "not HTTP"])
async def test_network_failures_are_transient(behaviour):
    async def act(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        if not data:
            return  # the reachability probe
        if behaviour == "reset mid-request":
            writer.transport.abort()
        elif behaviour == "not HTTP":
            writer.write(b"220 smtp.example ESMTP\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)

    srv = await raw_server(act)
    try:
        port = srv.sockets[0].getsockname()[1]
        res, conn = await send(port)
        assert (res[0].status, res[0].code) == (TEMP, 451)
        assert res[0].text.startswith(f"4.4.2 XFER to 127.0.0.1:{port} failed: ")
        assert res[0].text.endswith("will resend with the same idempotency key")
        assert not conn.usable
    finally:
        srv.close()
        await srv.wait_closed()


# --- the pooled session ---------------------------------------------------------------------------


async def test_one_session_per_loop_reused_and_closed(receiver):
    _, c1 = await send(receiver.port)
    _, c2 = await send(receiver.port, key=("node-a", "99"))
    assert c1.session is c2.session and not c1.session.closed
    await close_sessions()
    assert c1.session.closed and not [k for k in _sessions if k[0] is asyncio.get_running_loop()]
    _, c3 = await send(receiver.port, key=("node-a", "100"))
    assert c3.session is not c1.session and not c3.session.closed


def test_under_uvloop_and_the_session_closes_with_the_loop(tmp_path):
    seen = {}

    async def scenario() -> None:
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        sp = await open_spool(tmp_path / "uv")
        srv = XferServer(XferServerSettings(secret=SECRET), SpoolIntake(sp))
        await srv.start("127.0.0.1", 0)
        try:
            res, conn = await send(srv.sockets[0].getsockname()[1])
            assert res[0].status == OK
            seen["session"] = conn.session
        finally:
            await srv.stop()
            await sp.close()
        # No close_sessions(): the loop's shutdown_asyncgens() must close it.

    uvloop.run(scenario())
    assert seen["session"].closed


async def test_bind_address_list_one_source_per_connection():
    """A Bind_Address list (Stalwart's source-ip.v4/.v6): each XFER connection leaves from one of
    the addresses of the peer's family, never from one of the other family."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.remote)
        return web.Response(status=503, text="busy")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        s = settings(bind_address=("127.0.0.5", "::1", "127.0.0.6"))
        for _ in range(4):
            conn = await connect_xfer(hop(port), s)
            await conn.transfer(envelope(), [0], BODY, KEY)
            await conn.close()
        assert seen and set(seen) <= {"127.0.0.5", "127.0.0.6"}
    finally:
        await runner.cleanup()
