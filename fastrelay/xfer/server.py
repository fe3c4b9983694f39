"""Accept XFER transfers over HTTP: check, authenticate, bound and validate each one, spool it once, answer 200.

One `XferServer` per HTTP_Listener Listen address (seeds 000/001: `script ... { source =
"msys.xfer.server" }` plus `HTTP_Listener { Listen ":8080" {} }`). A request goes through these
checks, in this order, each answered with a JSON error body and the connection closed:

    403  the client address is not in xfer_allowed_clients (loopback by default)
    401  no valid HMAC signature (xfer_secret) or bearer token (xfer_tokens)   (docs/reliability.md case 32);
         with neither configured, xfer_allowed_clients alone authenticates (as relay_hosts does for SMTP)
    404  not HTTP_URI;  405  not HTTP_METHOD
    415  a Content-Encoding other than identity (no decompression bombs, case 33), another media
         type, or an X-Xfer-Version above ours; 400 for an X-Xfer-Version or X-Xfer-Content-SHA256
         that is not ASCII digits / 64 hex digits
    413  a body over xfer_max_body: refused from Content-Length at once, and counted while it is
         read (chunked bodies have no Content-Length to trust); 408 if it is not all there within
         the read deadline (case 33)
    400  a malformed transfer (fastrelay.xfer.wire.decode_request; case 37): nothing is spooled
    508  a loop: this node is on the transfer's path, or it has passed xfer_max_hops nodes (case 35)
    503  the spool has no room or cannot commit (case 37), with Retry-After; or, with Workers > 1,
         another worker is storing the same transfer right now (in_progress: the resend that
         follows gets the duplicate answer; fastrelay.xfer.claims)
    200  only after the spool committed it (P1), at most once per (origin node, origin id): a
         resend after a lost 200 gets the same id and "duplicate": true (case 36)

A connection that has not sent a whole request head within 60 s (of opening, or of its last
answer) is closed: aiohttp's keep-alive timer, which trickled bytes do not push back (case 14).

Authentication comes before the body is read: the signature covers the body's SHA-256 as declared
in X-Xfer-Content-SHA256, checked against the body once it is in. So a stranger is refused from its
headers, and a client sending Expect: 100-continue gets its 401/404/413 before it sends the body.

Why the low-level aiohttp server (web.Server + ServerRunner) rather than web.Application with a
middleware: aiohttp answers a request it cannot parse (a bad request line, SMTP spoken to this
port: case 7) from RequestHandler.handle_error, which no middleware sees. Overriding handle_error
makes those JSON too, and `_guard` plays the middleware's part for everything else, so a client
never gets a text/html page or a traceback (unexpected errors are logged here instead).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp.web_request import BaseRequest

from fastrelay.message import Envelope
from fastrelay.spool import SpoolError, SpoolFull
from fastrelay.xfer import wire
from fastrelay.xfer.claims import TransferInProgress
from fastrelay.xfer.wire import WireError

log = logging.getLogger("fastrelay.xfer")

__all__ = ["XferIntake", "XferServer", "XferServerSettings"]

_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
# How long a peer should wait before resending when the spool is full (seconds; the sender's own
# retry schedule decides in the end).
RETRY_AFTER = 60
# The whole body must arrive within this many seconds (case 33: "wrap body reads in a deadline");
# 64 MiB in 120 s is 0.5 MiB/s, little for two relays. A slow-loris body gets 408 and a close.
READ_TIMEOUT = 120.0
# A connection that has not sent a whole request head this long after it opened or after its last
# answer is closed (aiohttp's keepalive timer, which a trickling client does not push back): the
# slow-loris of case 14 for HTTP. Longer than the client's pool keep-alive (15 s), so the client
# never reuses a connection the server is closing.
IDLE_TIMEOUT = 60.0
# Requests in flight when the server stops get this long to finish their spool commit.
SHUTDOWN_TIMEOUT = 10.0
# Request line and header sizes: a transfer has a handful of short headers.
MAX_LINE = 8190
MAX_HEADERS = 64


class XferIntake(Protocol):
    """Where transfers go (fastrelay.relay.Relay): the spool, once per key, then the queue."""

    @property
    def node_id(self) -> str: ...

    def space_ok(self) -> bool: ...

    def submit_transfer(self, items: list[tuple[Envelope, bytes]],
                        key: tuple[str, str]) -> Awaitable[tuple[str, bool]]: ...


@dataclass(frozen=True)
class XferServerSettings:
    """A Listen entry's XFER settings, resolved once at start."""

    uri: str = "/delay_message"
    method: str = "POST"
    secret: str | None = None
    tokens: tuple[str, ...] = ()
    allowed_clients: tuple = _LOOPBACK
    max_body: int = 64 * 1024 * 1024
    max_hops: int = 10
    replay_window: float = 300.0
    read_timeout: float = READ_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    retry_after: int = RETRY_AFTER
    nonce_cache_size: int = wire.NONCE_CACHE_SIZE

    @classmethod
    def from_listen(cls, listen: Any) -> XferServerSettings:
        """From an HTTP_Listener's Listen entry (fastrelay.config.model.ListenScope: Listen, then
        HTTP_Listener, then global)."""
        g = listen.get
        return cls(
            uri=g("HTTP_URI"),
            method=g("HTTP_METHOD").upper(),
            secret=g("xfer_secret"),
            tokens=tuple(g("xfer_tokens") or ()),
            allowed_clients=tuple(g("xfer_allowed_clients")),
            max_body=int(g("xfer_max_body")),
            max_hops=int(g("xfer_max_hops")),
            replay_window=float(g("xfer_replay_window")),
            # Idle_Time 0 (Momentum: never for silence): keep-alive connections stay until closed.
            idle_timeout=float(g("Idle_Time") or 86400 * 365),
        )


def _json(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    # Our own Server header: aiohttp's would tell every prober the Python and aiohttp versions.
    return web.Response(status=status, body=body, content_type=wire.RESPONSE_CONTENT_TYPE,
                        headers={"Server": "fastrelay-xfer", **(headers or {})})


def _error(e: WireError, retry_after: int = RETRY_AFTER, allow: str = "POST") -> web.Response:
    headers: dict[str, str] = {}
    if e.status == 401:
        headers["WWW-Authenticate"] = f'{wire.AUTH_SCHEME} realm="xfer", Bearer realm="xfer"'
    elif e.status == 503:
        headers["Retry-After"] = str(retry_after)
    elif e.status == 405:
        headers["Allow"] = allow
    resp = _json(e.status, wire.encode_error(e.code, e.message), headers)
    # Close after every error: the request body may be unread, and reading it (aiohttp's lingering
    # close) would be reading a refused stranger's bytes for nothing.
    resp.force_close()
    return resp


class _RequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, with JSON bodies for the errors it answers itself."""

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of a response went out already: the connection is broken (aiohttp's own rule).
            raise ConnectionError("response already started; cannot send an error")
        peer = self.peername[0] if isinstance(self.peername, tuple) else self.peername
        if status == 400:
            # Not HTTP at all (SMTP on the XFER port, case 7), or a malformed request line/header.
            # The parser's text quotes the client's bytes: cleaned and capped for the log (case 26).
            why = "".join(c if c.isprintable() else " " for c in str(exc or message)[:200])
            log.info("XFER: malformed HTTP request from %s: %s", peer, why)
            err = WireError(400, "bad_request", "malformed HTTP request (this port speaks XFER over HTTP/1.1)")
        elif status == 504:
            err = WireError(504, "timeout", "the request took too long")
        else:
            log.error("XFER: error handling a request from %s", peer, exc_info=exc)
            err = WireError(500, "internal_error", "internal error; the transfer was not accepted")
        return _error(err)


class _Server(web.Server):
    # The XferServer whose settings each new connection reads (a reload may change them).
    owner: XferServer | None = None

    def __call__(self) -> web.RequestHandler:
        kw = dict(self._kwargs)
        if self.owner is not None:
            kw["keepalive_timeout"] = self.owner.s.idle_timeout
        return _RequestHandler(self, loop=self._loop, **kw)


class XferServer:
    """The XFER endpoint on one address; `intake` stores transfers (fastrelay.relay.Relay)."""

    def __init__(self, settings: XferServerSettings, intake: XferIntake):
        self.s = settings
        self.intake = intake
        self.nonces = wire.NonceCache(settings.replay_window, settings.nonce_cache_size)
        self.stats: dict[str, int] = {"accepted": 0, "duplicates": 0, "refused": 0}
        self._runner: web.ServerRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._method = settings.method.upper()
        # Requests being handled now: clients that may add a message to the spool soon (the
        # spool's group commit window waits for them, fastrelay.spool.Spool._window).
        self.in_flight = 0

    def update(self, settings: XferServerSettings) -> None:
        """A reload's settings (issue 12), from the next request on. The nonce cache is kept, so
        a reload never reopens a replay; the keep-alive timeout applies to new connections."""
        self.s = settings
        self._method = settings.method.upper()
        self.nonces.resize(settings.replay_window, settings.nonce_cache_size, time.time())

    async def start(self, host: str | None, port: int, sock: socket.socket | None = None) -> None:
        """Listen on host:port (all addresses when host is None), or on `sock` when given (a
        worker's share of a listener its supervisor bound); OSError if it cannot bind."""
        loop = asyncio.get_running_loop()

        def make_request(message, payload, protocol, writer, task) -> BaseRequest:
            # client_max_size set on purpose (case 33; aiohttp's default is 1 MiB): nothing here
            # calls request.read(), but if anything ever does, it is capped like _read_body.
            return BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=self.s.max_body)

        server = _Server(
            self._guard,
            request_factory=make_request,
            auto_decompress=False,  # never inflate a body (case 33); 415 refuses them anyway
            access_log=None,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS,
            lingering_time=0,
            keepalive_timeout=self.s.idle_timeout,
        )
        server.owner = self
        runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            # What web.TCPSite does, keeping the asyncio.Server so `sockets` is public API.
            if sock is not None:
                self._server = await loop.create_server(runner.server, sock=sock, backlog=1024)
            else:
                self._server = await loop.create_server(runner.server, host, port, reuse_address=True,
                                                        backlog=1024)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._server.sockets) if self._server is not None else []

    async def stop(self) -> None:
        """Stop listening; requests in flight get SHUTDOWN_TIMEOUT to finish their commit."""
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # --- one request --------------------------------------------------------------------------
    async def _guard(self, request: BaseRequest) -> web.StreamResponse:
        """The middleware: every refusal and every unexpected error becomes a JSON error body."""
        self.in_flight += 1
        try:
            return await self._handle(request)
        except WireError as e:
            self.stats["refused"] += 1
            return _error(e, e.retry_after or self.s.retry_after, self._method)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats["refused"] += 1
            log.exception("XFER: internal error on a request from %s", request.remote)
            return _error(WireError(500, "internal_error", "internal error; the transfer was not accepted"))
        finally:
            self.in_flight -= 1

    def _allowed(self, request: BaseRequest) -> str:
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        ip = peer[0] if isinstance(peer, tuple) else None
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0]) if ip else None
        except ValueError:
            addr = None
        if addr is not None and addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # ::ffff:10.0.0.1 on a dual-stack socket is 10.0.0.1
        if addr is None or not any(addr in net for net in self.s.allowed_clients if net.version == addr.version):
            log.warning("XFER: refused a request from %s: not in xfer_allowed_clients", ip)
            raise WireError(403, "forbidden", "this client address may not transfer to this server")
        return str(addr)

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        s = self.s
        peer = self._allowed(request)
        claimed = request.headers.get(wire.H_CONTENT_SHA256)
        claimed = claimed.strip(" \t").lower() if claimed is not None else None
        if not s.secret and not s.tokens:
            # No secret or token configured: xfer_allowed_clients (checked above) is the
            # authentication, as relay_hosts is for SMTP; an Authorization header is not needed.
            scheme = "network"
        else:
            try:
                scheme = wire.verify(request.headers.get("Authorization"), request.method, request.raw_path,
                                     claimed, secret=s.secret, tokens=s.tokens, nonces=self.nonces,
                                     window=s.replay_window)
            except WireError as e:
                log.warning("XFER: refused a request from %s: %s %s", peer, e.code, e.message)
                raise
        if request.raw_path != s.uri:
            raise WireError(404, "not_found", f"no XFER endpoint at this path; transfers go to {s.uri}")
        if request.method != self._method:
            raise WireError(405, "method_not_allowed", f"transfers use {self._method}")
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise WireError(415, "unsupported_encoding", "Content-Encoding must be identity (no compression)")
        if request.content_type != wire.CONTENT_TYPE:
            raise WireError(415, "unsupported_media_type", f"Content-Type must be {wire.CONTENT_TYPE}")
        version = wire.header_uint(request.headers.get(wire.H_VERSION), max_digits=6)  # ASCII digits only
        if version is None:
            raise WireError(400, "bad_version", f"{wire.H_VERSION} must be an integer")
        if version != wire.VERSION:
            raise WireError(415, "unsupported_version",
                            f"{wire.H_VERSION} {version} is not supported; this node speaks {wire.VERSION}")
        if claimed is not None and not wire.is_sha256_hex(claimed):
            # Checked here too, not only by the HMAC scheme: with a bearer token or no credentials,
            # a non-ASCII value reached hmac.compare_digest, whose TypeError was a 500.
            raise WireError(400, "bad_content_hash", f"{wire.H_CONTENT_SHA256} must be 64 hex digits")
        if request.content_length is not None and request.content_length > s.max_body:
            raise WireError(413, "too_large", f"the body is larger than this server's limit of {s.max_body} bytes")
        expect = request.headers.get("Expect")
        if expect is not None:
            if expect.strip().lower() != "100-continue":
                raise WireError(417, "expectation_failed", "only Expect: 100-continue is understood")
            # Everything that can be said from the headers has been said: now ask for the body.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await self._read_body(request)
        if claimed is not None and not hmac.compare_digest(hashlib.sha256(body).hexdigest(), claimed):
            log.warning("XFER: refused a request from %s: the body does not match %s", peer, wire.H_CONTENT_SHA256)
            raise WireError(401, "body_mismatch", f"the body does not match {wire.H_CONTENT_SHA256}")

        try:
            t = wire.decode_request(body, request.headers.get(wire.H_ENVELOPE_LENGTH))
        except WireError as e:
            log.warning("XFER: refused a transfer from %s: %s %s", peer, e.code, e.message)
            raise
        loop_err = wire.loop_check(t, self.intake.node_id, s.max_hops)
        if loop_err is not None:
            log.warning("XFER: refused transfer %s/%s from %s: %s", t.origin_node, t.origin_id, peer, loop_err.message)
            raise loop_err
        if not self.intake.space_ok():
            log.warning("XFER: refused transfer %s/%s from %s: spool is short of space", t.origin_node, t.origin_id,
                        peer)
            raise WireError(503, "spool_full", "this node's spool is short of space; try again later")
        items = t.envelopes()
        for env, _ in items:
            env.meta["xfer_origin"]["peer"] = peer
        try:
            msgid, duplicate = await self.intake.submit_transfer(items, t.key)
        except TransferInProgress as e:
            log.info("XFER: transfer %s/%s from %s not taken now: worker %d is storing it", t.origin_node,
                     t.origin_id, peer, e.holder)
            raise WireError(503, "in_progress", "this transfer is being stored by this node now; try again shortly",
                            retry_after=e.retry_after) from None
        except SpoolFull as e:
            log.warning("XFER: transfer %s/%s from %s not queued: %s", t.origin_node, t.origin_id, peer, e)
            raise WireError(503, "spool_full", "this node's spool is full; try again later") from None
        except SpoolError as e:
            log.warning("XFER: transfer %s/%s from %s not queued: %s", t.origin_node, t.origin_id, peer, e)
            raise WireError(503, "spool_error", "this node could not queue the message; try again later") from None
        self.stats["duplicates" if duplicate else "accepted"] += 1
        log.info("XFER: %s transfer %s/%s from %s (%s, %d recipients, %d bytes) as %s",
                 "duplicate" if duplicate else "accepted", t.origin_node, t.origin_id, peer, scheme,
                 len(t.recipients), len(t.body), msgid)
        # P1: we get here only after the commit returned.
        return _json(200, wire.encode_response(msgid, self.intake.node_id, duplicate))

    async def _read_body(self, request: BaseRequest) -> bytes:
        """The whole body, at most max_body bytes, within read_timeout (case 33): Content-Length
        may be absent (chunked) or describe only what the parser will deliver, so count."""
        cap = self.s.max_body
        buf = bytearray()
        content = request.content
        try:
            async with asyncio.timeout(self.s.read_timeout):
                while True:
                    chunk = await content.readany()
                    if not chunk:
                        break
                    if len(buf) + len(chunk) > cap:
                        raise WireError(413, "too_large", f"the body is larger than this server's limit of {cap} bytes")
                    buf += chunk
        except TimeoutError:
            raise WireError(408, "timeout", f"the body did not arrive within {self.s.read_timeout:g} s") from None
        except (web.RequestPayloadError, ConnectionError) as e:
            raise WireError(400, "incomplete_body", f"the body could not be read: {type(e).__name__}") from None
        return bytes(buf)
