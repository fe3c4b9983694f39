"""The XFER server over real HTTP on loopback, storing into a real spool: docs/reliability.md P1 and cases
7, 32, 33, 35, 36, 37. Every error must be a JSON body with the exact status and code word, and
nothing may be spooled for a refused transfer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, NamedTuple

import aiohttp
import pytest

from fastrelay.message import Envelope, Recipient
from fastrelay.spool import Spool
from fastrelay.xfer import wire
from fastrelay.xfer.server import XferServer, XferServerSettings

SECRET = "s3cret shared by both nodes"
URI = "/delay_message"
BODY = b"Received: from a\r\nSubject: xfer\r\n\r\nbody \x00\xff\r\n.\r\n"


class SpoolIntake:
    """The XFER intake exactly as fastrelay.relay.Relay implements it (minus the mainlog and the
    queue): a real Spool, add_once on (origin node, origin id)."""

    def __init__(self, spool: Spool):
        self.spool = spool

    @property
    def node_id(self) -> str:
        return self.spool.node_id

    def space_ok(self) -> bool:
        return self.spool.space_ok()

    async def submit_transfer(self, items: list[tuple[Envelope, bytes]], key: tuple[str, str]) -> tuple[str, bool]:
        _entries, dup = await self.spool.add_once(items, key)  # the relay enqueues the entries
        if dup is not None:
            return dup, True
        return items[0][0].msgid, False


async def open_spool(path) -> Spool:
    sp = Spool(str(path), min_free_bytes=1 << 20)
    await sp.open()
    sp.recover()
    return sp


async def spooled(sp: Spool) -> list[tuple[Envelope, bytes]]:
    return [await sp.load(e.id) for e in sp.recover()]


@pytest.fixture
async def spool(tmp_path):
    sp = await open_spool(tmp_path / "spool")
    yield sp
    await sp.close()


class Node(NamedTuple):
    srv: XferServer
    spool: Spool
    base: str  # http://127.0.0.1:port


@pytest.fixture
async def start(spool):
    servers: list[XferServer] = []

    async def _start(intake=None, host="127.0.0.1", **kw: Any) -> Node:
        kw.setdefault("secret", SECRET)
        srv = XferServer(XferServerSettings(**kw), intake or SpoolIntake(spool))
        await srv.start(host, 0)
        servers.append(srv)
        port = srv.sockets[0].getsockname()[1]
        return Node(srv, spool, f"http://{host}:{port}")

    yield _start
    for srv in servers:
        await srv.stop()
        # Reserve and release in pairs: every request, refused or failed, is counted out again.
        assert srv.in_flight == 0, srv.in_flight


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


def transfer(key=("node-a", "7"), rcpts=("r1@dst.test", "r2@dst.test"), path=(), body=BODY, **kw) -> tuple[bytes, int]:
    env = Envelope("s@src.test", [Recipient(r) for r in rcpts], "dst.test", client_ip="192.0.2.1", helo="h.test",
                   msgid="7.aaaa", received_at=time.time() - 10, meta={"xfer_path": list(path)} if path else {}, **kw)
    return wire.encode_request(env, list(range(len(rcpts))), body, key)


class Resp(NamedTuple):
    status: int
    headers: Any
    doc: dict


async def post(http, node: Node, payload: bytes, n: int, *, secret: str | None = SECRET, method="POST", path=URI,
               headers: dict | None = None, ts: int | None = None, nonce: str | None = None, sign_body: bytes | None = None,
               **kw) -> Resp:
    digest = wire.content_sha256(payload if sign_body is None else sign_body)
    h = {"Content-Type": wire.CONTENT_TYPE, wire.H_VERSION: "1", wire.H_ENVELOPE_LENGTH: str(n),
         wire.H_CONTENT_SHA256: digest}
    if secret is not None:
        h["Authorization"] = wire.authorization(secret, method, path, digest, ts=ts, nonce=nonce)
    h.update(headers or {})
    h = {k: v for k, v in h.items() if v is not None}
    async with http.request(method, node.base + path, data=payload, headers=h, **kw) as r:
        raw = await r.read()
        assert r.content_type == "application/json", (r.status, raw[:200])
        doc = json.loads(raw)
        if r.status != 200:
            assert set(doc) == {"error", "message"} and doc["message"], doc
            assert "Traceback" not in doc["message"]
        return Resp(r.status, r.headers, doc)


def err(r: Resp) -> tuple[int, str]:
    return r.status, r.doc.get("error", "")


# --- accepted -------------------------------------------------------------------------------------


async def test_a_request_counts_as_a_client_sending_while_it_is_handled(start, http, spool):
    """XferServer.in_flight is what the relay tells the spool's commit window (Relay.clients_sending):
    a transfer being handled is a client that may add a message."""
    seen = []

    class Watching(SpoolIntake):
        async def submit_transfer(self, items, key):
            seen.append(node.srv.in_flight)
            return await super().submit_transfer(items, key)

    node = await start(Watching(spool))
    assert node.srv.in_flight == 0
    payload, n = transfer()
    assert (await post(http, node, payload, n)).status == 200
    bad = await post(http, node, payload, n, secret="wrong-secret-wrong-secret-wrong!")
    assert bad.status == 401
    assert seen == [1] and node.srv.in_flight == 0


async def test_accepted_transfer_is_spooled_whole_before_the_200(start, http, spool):
    node = await start()
    payload, n = transfer(rcpts=("r1@dst.test", "r2@other.test"))
    r = await post(http, node, payload, n)
    assert r.status == 200
    assert r.doc == {"status": "accepted", "id": r.doc["id"], "node": spool.node_id, "duplicate": False}
    got = await spooled(spool)
    assert [(e.domain, [x.address for x in e.recipients], body) for e, body in got] == [
        ("dst.test", ["r1@dst.test"], BODY), ("other.test", ["r2@other.test"], BODY)]
    env = got[0][0]
    assert env.msgid == r.doc["id"] and env.protocol == "xfer" and env.sender == "s@src.test"
    assert (env.client_ip, env.helo, env.attempts) == ("192.0.2.1", "h.test", 0)
    assert env.meta["xfer_path"] == ["node-a"]
    assert env.meta["xfer_origin"] == {"node": "node-a", "id": "7", "msgid": "7.aaaa", "domain": "dst.test",
                                       "received_at": env.meta["xfer_origin"]["received_at"], "peer": "127.0.0.1"}
    assert node.srv.stats["accepted"] == 1


async def test_resend_after_a_lost_200_gets_the_same_id_and_is_spooled_once(start, http, spool):
    node = await start()
    payload, n = transfer()
    first = await post(http, node, payload, n)
    again = await post(http, node, payload, n)  # a new signature (nonce), the same idempotency key
    assert first.status == again.status == 200
    assert again.doc == {**first.doc, "duplicate": True}
    assert len(await spooled(spool)) == 1
    other = await post(http, node, *transfer(key=("node-a", "8")))
    assert other.status == 200 and other.doc["id"] != first.doc["id"] and not other.doc["duplicate"]
    assert len(await spooled(spool)) == 2


async def test_bearer_token_and_expect_100_continue(start, http, spool):
    node = await start(secret=None, tokens=("tok-1", "tok-2"))
    payload, n = transfer()
    r = await post(http, node, payload, n, secret=None, headers={"Authorization": "Bearer tok-2"}, expect100=True)
    assert r.status == 200
    assert len(await spooled(spool)) == 1


# --- 401 / 403 ------------------------------------------------------------------------------------


async def test_401_for_every_authentication_failure_and_nothing_spooled(start, http, spool):
    node = await start(tokens=("tok",))
    payload, n = transfer()
    assert err(await post(http, node, payload, n, secret=None)) == (401, "auth_required")
    assert err(await post(http, node, payload, n, secret="not the secret")) == (401, "bad_signature")
    assert err(await post(http, node, payload, n, ts=int(time.time()) - 400)) == (401, "stale_timestamp")
    assert err(await post(http, node, payload, n, secret=None, headers={"Authorization": "Bearer tok-"})) == \
        (401, "bad_token")
    # Signed for another body: the declared hash matches the signature, the body does not.
    r = await post(http, node, payload, n, sign_body=payload + b"x")
    assert err(r) == (401, "body_mismatch")
    # The hash header left out of a signed request.
    r = await post(http, node, payload, n, headers={wire.H_CONTENT_SHA256: None})
    assert err(r) == (401, "missing_content_hash")
    assert r.headers["WWW-Authenticate"].startswith("XFER-HMAC-SHA256")
    assert await spooled(spool) == []


async def test_401_for_a_replayed_request(start, http, spool):
    node = await start()
    payload, n = transfer()
    ts, nonce = int(time.time()), wire.new_nonce()
    assert (await post(http, node, payload, n, ts=ts, nonce=nonce)).status == 200
    assert err(await post(http, node, payload, n, ts=ts, nonce=nonce)) == (401, "replayed_nonce")
    assert len(await spooled(spool)) == 1


async def test_403_for_a_client_outside_the_allowed_networks(start, spool):
    import ipaddress

    node = await start(allowed_clients=(ipaddress.ip_network("127.0.0.1/32"),))
    payload, n = transfer()
    conn = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=conn) as other:
        # Refused before authentication: a valid signature does not help.
        assert err(await post(other, node, payload, n)) == (403, "forbidden")
    async with aiohttp.ClientSession() as local:
        assert (await post(local, node, payload, n)).status == 200
    assert len(await spooled(spool)) == 1


# --- 404 / 405 / 415 / 413 ------------------------------------------------------------------------


async def test_404_and_405(start, http, spool):
    node = await start()
    payload, n = transfer()
    assert err(await post(http, node, payload, n, path="/other")) == (404, "not_found")
    assert err(await post(http, node, payload, n, path=URI + "?x=1")) == (404, "not_found")
    r = await post(http, node, payload, n, method="PUT")
    assert err(r) == (405, "method_not_allowed") and r.headers["Allow"] == "POST"
    assert err(await post(http, node, payload, n, method="GET")) == (405, "method_not_allowed")
    # Unauthenticated, the answer is 401 whatever the path: nothing is revealed to strangers.
    assert err(await post(http, node, payload, n, path="/other", secret=None)) == (401, "auth_required")
    assert await spooled(spool) == []


async def test_configured_method_and_uri(start, http, spool):
    node = await start(uri="/xfer/in", method="PUT")
    payload, n = transfer()
    assert (await post(http, node, payload, n, method="PUT", path="/xfer/in")).status == 200
    assert err(await post(http, node, payload, n, path="/xfer/in")) == (405, "method_not_allowed")


async def test_415_for_compressed_bodies_and_other_media_types_or_versions(start, http, spool):
    node = await start()
    payload, n = transfer()
    assert err(await post(http, node, payload, n, headers={"Content-Encoding": "gzip"})) == \
        (415, "unsupported_encoding")
    assert err(await post(http, node, payload, n, headers={"Content-Encoding": "deflate, identity"})) == \
        (415, "unsupported_encoding")
    assert err(await post(http, node, payload, n, headers={"Content-Type": "application/json"})) == \
        (415, "unsupported_media_type")
    assert err(await post(http, node, payload, n, headers={wire.H_VERSION: "2"})) == (415, "unsupported_version")
    assert err(await post(http, node, payload, n, headers={wire.H_VERSION: None})) == (400, "bad_version")
    doc = json.loads(payload[:n])
    doc["version"] = 2
    head = json.dumps(doc).encode()
    assert err(await post(http, node, head + BODY, len(head))) == (415, "unsupported_version")
    assert await spooled(spool) == []


async def test_413_over_the_cap_with_or_without_a_content_length(start, http, spool):
    node = await start(max_body=64 * 1024)
    payload, n = transfer(body=b"x" * (64 * 1024))
    assert err(await post(http, node, payload, n)) == (413, "too_large")
    # Expect: 100-continue: refused from the headers, before any of the body is sent.
    assert err(await post(http, node, payload, n, expect100=True)) == (413, "too_large")

    async def chunks():
        for k in range(0, len(payload), 8192):
            yield payload[k : k + 8192]

    # Chunked: no Content-Length to trust; the server counts while reading.
    assert err(await post(http, node, chunks(), n, sign_body=payload)) == (413, "too_large")
    small, m = transfer()
    assert (await post(http, node, small, m)).status == 200  # just under the cap is fine
    assert len(await spooled(spool)) == 1


async def raw_exchange(node: Node, data: bytes, *, wait: float = 5.0) -> bytes:
    host, port = node.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), wait)  # to EOF: the server must close
    finally:
        writer.close()


def head_for(payload: bytes, n: int, *, length: int | None = None, extra: str = "") -> bytes:
    digest = wire.content_sha256(payload)
    auth = wire.authorization(SECRET, "POST", URI, digest)
    return (f"POST {URI} HTTP/1.1\r\nHost: x\r\nContent-Type: {wire.CONTENT_TYPE}\r\n{wire.H_VERSION}: 1\r\n"
            f"{wire.H_ENVELOPE_LENGTH}: {n}\r\n{wire.H_CONTENT_SHA256}: {digest}\r\nAuthorization: {auth}\r\n"
            f"Content-Length: {len(payload) if length is None else length}\r\n{extra}\r\n").encode()


def parse_raw(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower()
    return status, json.loads(body)


async def test_lying_content_length_does_not_stretch_or_shrink_the_body(start, spool):
    node = await start(max_body=64 * 1024, read_timeout=0.5)
    payload, n = transfer()
    # Shorter than what follows: only that many bytes are the body (here not even the whole JSON),
    # and what follows is not HTTP. Refused either way (llhttp drops a buffer with a parse error in
    # it whole; had the first request arrived alone, its body would not match its hash), then closed.
    raw = await raw_exchange(node, head_for(payload, n, length=n - 10) + payload)
    status, doc = parse_raw(raw)
    assert (status, doc["error"]) in ((400, "bad_request"), (401, "body_mismatch"))
    # Longer than what comes: the read deadline ends it (case 33: body reads under a deadline).
    t0 = time.monotonic()
    raw = await raw_exchange(node, head_for(payload, n, length=len(payload) + 100) + payload)
    assert parse_raw(raw) == (408, {"error": "timeout", "message": "the body did not arrive within 0.5 s"})
    assert time.monotonic() - t0 < 3
    assert await spooled(spool) == []


async def test_a_client_trickling_its_request_head_is_closed(start, spool):
    node = await start(idle_timeout=0.5)
    t0 = time.monotonic()
    raw = await raw_exchange(node, f"POST {URI} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode(), wait=5)
    assert raw == b"" and 0.4 < time.monotonic() - t0 < 2.5


# --- 400: malformed transfers ---------------------------------------------------------------------

MALFORMED = [
    ("no recipients", lambda d: d.update(recipients=[]), "no_recipients"),
    ("bad recipient", lambda d: d["recipients"][0].update(address="a@@dst.test"), "bad_recipient"),
    ("CRLF in the sender", lambda d: d.update(sender="s@src.test\r\nX: y"), "control_character"),
    ("NUL in a recipient", lambda d: d["recipients"][1].update(address="r\x00@dst.test"), "control_character"),
    ("bad metadata", lambda d: d.update(origin="node-a/7"), "bad_field"),
    ("bad context", lambda d: d.update(context={"attempts": "many"}), "bad_field"),
]


@pytest.mark.parametrize(("mutate", "code"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
async def test_400_for_a_malformed_transfer_and_nothing_spooled(start, http, spool, mutate, code):
    node = await start()
    payload, n = transfer()
    doc = json.loads(payload[:n])
    mutate(doc)
    head = json.dumps(doc).encode()
    assert err(await post(http, node, head + BODY, len(head))) == (400, code)
    assert await spooled(spool) == []


async def test_400_for_a_bad_envelope_split(start, http, spool):
    node = await start()
    payload, n = transfer()
    assert err(await post(http, node, payload, n + 1)) == (400, "bad_json")
    assert err(await post(http, node, payload, n, headers={wire.H_ENVELOPE_LENGTH: "lots"})) == \
        (400, "bad_envelope_length")
    assert err(await post(http, node, b"not json at all", 5)) == (400, "bad_json")
    assert await spooled(spool) == []


# --- 508: loops -----------------------------------------------------------------------------------


async def test_508_when_this_node_is_on_the_path_or_too_many_hops(start, http, spool):
    node = await start(max_hops=3)
    me = spool.node_id
    assert err(await post(http, node, *transfer(path=("n1", me)))) == (508, "loop_detected")
    assert err(await post(http, node, *transfer(key=(me, "7")))) == (508, "loop_detected")
    assert err(await post(http, node, *transfer(path=("n1", "n2", "n3")))) == (508, "too_many_hops")
    assert await spooled(spool) == []
    r = await post(http, node, *transfer(path=("n1", "n2")))  # 3 nodes left so far: the limit
    assert r.status == 200
    (env, _), = await spooled(spool)
    assert env.meta["xfer_path"] == ["n1", "n2", "node-a"]


# --- 503: no room ---------------------------------------------------------------------------------


async def test_503_with_retry_after_when_the_spool_is_short_of_space(start, http, spool):
    node = await start()
    spool.min_free_bytes = 1 << 60  # more than any disk has: the real statvfs check says no
    spool._space_at = -1.0  # skip the 1 s cache
    r = await post(http, node, *transfer())
    assert err(r) == (503, "spool_full") and r.headers["Retry-After"] == "60"
    assert await spooled(spool) == []


async def test_503_when_the_spool_cannot_commit(start, http, spool):
    node = await start()
    await spool.close()  # every add now fails with SpoolError
    r = await post(http, node, *transfer())
    assert err(r) == (503, "spool_error") and r.headers["Retry-After"] == "60"




async def test_503_on_a_really_full_disk_and_every_200_is_in_the_spool(tiny_fs, http):
    sp = Spool(str(tiny_fs / "spool"), min_free_bytes=256 * 1024)
    await sp.open()
    sp.recover()
    srv = XferServer(XferServerSettings(secret=SECRET), SpoolIntake(sp))
    await srv.start("127.0.0.1", 0)
    node = Node(srv, sp, f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}")
    try:
        accepted: dict[str, bytes] = {}
        refused = 0
        for i in range(60):
            body = f"Subject: {i}\r\n\r\n".encode() + bytes([65 + i % 26]) * 60_000
            r = await post(http, node, *transfer(key=("node-a", str(i)), body=body))
            if r.status == 200:
                accepted[r.doc["id"]] = body
            else:
                assert err(r) in ((503, "spool_full"), (503, "spool_error")) and r.headers["Retry-After"] == "60"
                refused += 1
                if refused >= 3:
                    break
        assert refused >= 1 and accepted
        got = {env.msgid: body for env, body in await spooled(sp)}
        assert got == accepted  # every 200 is there whole; nothing refused is
    finally:
        await srv.stop()
        await sp.close()


# --- not HTTP, internal errors --------------------------------------------------------------------


async def test_smtp_on_the_xfer_port_gets_400_and_a_close(start, spool):
    node = await start()
    raw = await raw_exchange(node, b"EHLO x\r\n")
    assert raw.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 "))
    status, doc = parse_raw(raw)
    assert (status, doc["error"]) == (400, "bad_request")
    raw = await raw_exchange(node, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")  # case 34: duplicate Host
    assert parse_raw(raw)[0] in (400, 401)
    assert await spooled(spool) == []


async def test_an_unexpected_error_is_a_json_500_and_logged_never_a_traceback(start, http, spool, caplog):
    class Broken(SpoolIntake):
        async def submit_transfer(self, items, key):
            raise RuntimeError("a bug in the intake")

    node = await start(intake=Broken(spool))
    with caplog.at_level(logging.ERROR, logger="fastrelay.xfer"):
        r = await post(http, node, *transfer())
    assert err(r) == (500, "internal_error") and "bug" not in r.doc["message"]
    assert "a bug in the intake" in caplog.text


async def test_a_transfer_another_worker_is_storing_is_a_503_in_progress(start, http, spool):
    # Workers > 1 (fastrelay.xfer.claims): a retry-later with its own, short Retry-After.
    from fastrelay.xfer.claims import IN_PROGRESS_RETRY_AFTER, TransferInProgress

    class Busy(SpoolIntake):
        async def submit_transfer(self, items, key):
            raise TransferInProgress(key, holder=1)

    node = await start(intake=Busy(spool))
    r = await post(http, node, *transfer())
    assert err(r) == (503, "in_progress")
    assert r.headers["Retry-After"] == str(IN_PROGRESS_RETRY_AFTER)
    assert await spooled(spool) == []


async def test_settings_from_a_listen_entry(tmp_path):
    from fastrelay.config import loads

    cfg = loads(
        'HTTP_URI = "/global"\n'
        'HTTP_Listener {\n  xfer_secret = "sekrit"\n  xfer_max_hops = 4\n'
        '  Listen "127.0.0.1:0" {\n    HTTP_METHOD = "PUT"\n    xfer_tokens = ( "t1" "t2" )\n'
        '    xfer_allowed_clients = ( "10.0.0.0/8" )\n    xfer_max_body = 2m\n    xfer_replay_window = 60\n  }\n}\n'
    )
    (listen,) = cfg.http_listens
    s = XferServerSettings.from_listen(listen)
    import ipaddress

    assert s == XferServerSettings(uri="/global", method="PUT", secret="sekrit", tokens=("t1", "t2"),
                                   allowed_clients=(ipaddress.ip_network("10.0.0.0/8"),), max_body=2 * 1024 * 1024,
                                   max_hops=4, replay_window=60.0,
                                   idle_timeout=300.0)  # Idle_Time's default: Momentum's idle keep-alive


def raw_head(payload: bytes, *, version: str = "1", length: str) -> bytes:
    # Built by hand: aiohttp's client refuses control characters in header values.
    digest = wire.content_sha256(payload)
    auth = wire.authorization(SECRET, "POST", URI, digest)
    return (f"POST {URI} HTTP/1.1\r\nHost: x\r\nContent-Type: {wire.CONTENT_TYPE}\r\n{wire.H_VERSION}: {version}\r\n"
            f"{wire.H_ENVELOPE_LENGTH}: {length}\r\n{wire.H_CONTENT_SHA256}: {digest}\r\nAuthorization: {auth}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()


@pytest.mark.parametrize("version", ["²", "\uff15", "1\x1f", "\x1c1", "\u0661", "1.0", "01a"])
async def test_400_for_a_version_header_that_is_not_ascii_digits(start, spool, version):
    """Issue 9: "`X-Xfer-Version: ²` ... give[s] 500 with a traceback instead of 400 (the sender treats
    500 as transient and retries forever)". Numbers are ASCII digits only; nothing is spooled.
    (llhttp itself refuses some control bytes in a header value: a JSON 400 bad_request then.)"""
    node = await start()
    payload, n = transfer()
    status, doc = parse_raw(await raw_exchange(node, raw_head(payload, version=version, length=str(n)) + payload))
    assert (status, doc["error"]) in ((400, "bad_version"), (400, "bad_request"))
    assert await spooled(spool) == []


@pytest.mark.parametrize("length", ["0\x1f", "2\x1c", "²", "\uff15"])
async def test_400_for_an_envelope_length_header_that_is_not_ascii_digits(start, spool, length):
    node = await start()
    payload, _n = transfer()
    status, doc = parse_raw(await raw_exchange(node, raw_head(payload, length=length) + payload))
    assert (status, doc["error"]) in ((400, "bad_envelope_length"), (400, "bad_request"))
    assert await spooled(spool) == []


async def test_400_for_context_meta_holding_json_infinity(start, http, spool):
    """A context meta value of `1e999` (JSON infinity) gave 500 with a traceback."""
    node = await start()
    payload, n = transfer()
    doc = json.loads(payload[:n])
    doc["context"] = {"attempts": 1, "first_queued": time.time(), "next_attempt": time.time(), "meta": {}}
    head = json.dumps(doc, separators=(",", ":")).encode().replace(b'"meta":{}', b'"meta":{"x":1e999}')
    assert err(await post(http, node, head + BODY, len(head))) == (400, "bad_field")
    assert await spooled(spool) == []


async def test_without_secret_or_tokens_the_allow_list_is_the_authentication(start, spool):
    """Issue 9: "with no secret or token, the XFER server accepts only from `xfer_allowed_clients`,
    whose default is loopback. That is network authentication, as `relay_hosts` is for SMTP."
    A client inside the list needs no Authorization header (any it sends is not needed); one
    outside gets 403 and nothing is spooled."""
    import ipaddress

    node = await start(secret=None, allowed_clients=(ipaddress.ip_network("127.0.0.1/32"),))
    async with aiohttp.ClientSession() as http:
        payload, n = transfer(key=("node-a", "1"))
        r = await post(http, node, payload, n, secret=None)
        assert (r.status, r.doc["status"], r.doc["duplicate"]) == (200, "accepted", False)
        payload, n = transfer(key=("node-a", "2"))
        assert (await post(http, node, payload, n, secret="whatever")).status == 200
    conn = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=conn) as other:
        payload, n = transfer(key=("node-a", "3"))
        assert err(await post(other, node, payload, n, secret=None)) == (403, "forbidden")
    assert sorted(e.meta["xfer_origin"]["id"] for e, _ in await spooled(spool)) == ["1", "2"]


async def test_with_a_secret_the_allow_list_alone_is_not_enough(start, spool, http):
    node = await start()  # secret set, loopback allowed
    payload, n = transfer()
    assert err(await post(http, node, payload, n, secret=None)) == (401, "auth_required")
    assert await spooled(spool) == []


@pytest.mark.parametrize("value", ["\u00e9", "\u00b2" * 64, "g" * 64, "ab", "\u0661" * 64])
@pytest.mark.parametrize("auth", ["network", "bearer"])
async def test_400_for_a_content_hash_that_is_not_hex(start, spool, value, auth):
    """Found probing issue 9's "every malformed request is a 4xx with a JSON error": a non-ASCII
    X-Xfer-Content-SHA256 reached hmac.compare_digest (TypeError) and gave 500, which the sender
    retries forever. With HMAC it is a 401 missing_content_hash before the body is read, as before."""
    node = await start(secret=None, tokens=("tok",) if auth == "bearer" else ())
    payload, n = transfer()
    head = (f"POST {URI} HTTP/1.1\r\nHost: x\r\nContent-Type: {wire.CONTENT_TYPE}\r\n{wire.H_VERSION}: 1\r\n"
            f"{wire.H_ENVELOPE_LENGTH}: {n}\r\n{wire.H_CONTENT_SHA256}: {value}\r\n"
            + ("Authorization: Bearer tok\r\n" if auth == "bearer" else "")
            + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    status, doc = parse_raw(await raw_exchange(node, head + payload))
    assert (status, doc["error"]) == (400, "bad_content_hash")
    assert await spooled(spool) == []
