"""XFER delivery client: transfer a queued message's recipients to a peer relay over HTTP, one result each.

The scheduler calls `connect_xfer(hop, settings)` for an `xfer://host?port=N` route (seeds 000/001:
Delivery_Method = "delay_xfer"), then `conn.transfer(env, idx, body, key)` per message. The connect
is a real TCP connect to the peer within Connect_Timeout, so an unreachable peer is a ConnectError
and the scheduler marks the host down and fails over exactly as for SMTP (docs/reliability.md case 38).
The requests themselves go through one aiohttp ClientSession per event loop, with a connection
pool, reused by every connection object (a session per transfer would cost a TCP handshake each).

What the peer's answer means for the recipients (case 49; docs/xfer.md "Response statuses"):

    200 + a valid body       OK: the peer has the message durably under its own id (P4)
    200 + anything else      TEMP: unknown outcome; resent later with the same idempotency key, so
                             the peer stores it at most once (case 36)
    400                      PERM: the peer refuses this message for good (logged at error level)
    413                      PERM: too big for the peer
    508                      PERM: an XFER loop (case 35)
    401 403 404 405 415      TEMP, logged at error level: the two nodes disagree on secret, allowed
                             clients, URI, method or version; a misconfiguration must not bounce mail
    429 5xx (503) other      TEMP
    timeout, refused, reset  TEMP, and the connection is not used again
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
from collections.abc import AsyncGenerator

import aiohttp
import yarl

from fastrelay.__version__ import __version__
from fastrelay.delivery import OK, PERM, TEMP, Hop, RcptResult, Settings
from fastrelay.delivery.smtp import clean_text, tcp_connect
from fastrelay.message import Envelope
from fastrelay.xfer import wire
from fastrelay.xfer.wire import WireError

__all__ = ["XferConnection", "close_sessions", "connect_xfer"]

log = logging.getLogger("fastrelay.delivery.xfer")

# The pool: connections kept per event loop and per peer. The scheduler's own session limits
# decide how many transfers run at once; these only bound what an idle pool keeps open.
POOL_LIMIT = 256
POOL_PER_HOST = 64
KEEPALIVE = 15.0  # below the server's idle timeout (60 s): never reuse a connection it is closing
# Bodies above this size are sent with Expect: 100-continue, so that a peer refusing from the
# headers alone (401, 413 from Content-Length, ...) says so before we upload megabytes, and the
# refusal reaches us as a status rather than as a reset in the middle of the upload.
EXPECT_CONTINUE_ABOVE = 1024 * 1024
# Delivery_Response_Timeout bounds the wait for the answer; a large body gets this many extra
# seconds per MiB to be uploaded first.
UPLOAD_SECONDS_PER_MIB = 1.0

_USER_AGENT = f"fastrelay-xfer/{__version__}"


# --- the shared session -------------------------------------------------------------------------

# One pooled session per (event loop, Bind_Address): a binding's transfers leave from its own
# source address (issue #10), through its own connection pool.
_sessions: dict[tuple[asyncio.AbstractEventLoop, str | None],
                tuple[aiohttp.ClientSession, AsyncGenerator[None, None]]] = {}


async def _closer(session: aiohttp.ClientSession) -> AsyncGenerator[None, None]:
    # Started once and left suspended: the loop tracks live async generators and closes them in
    # shutdown_asyncgens() (asyncio.run, asyncio.Runner, uvloop.run), which runs this finally. So
    # the session is closed cleanly even if nobody calls close_sessions() before the loop ends.
    try:
        yield
    finally:
        if not session.closed:
            await session.close()


async def _session(bind: str | None = None) -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    entry = _sessions.get((loop, bind))
    if entry is not None and not entry[0].closed:
        return entry[0]
    for old in [k for k in _sessions if k[0].is_closed()]:
        del _sessions[old]
    connector = aiohttp.TCPConnector(limit=POOL_LIMIT, limit_per_host=POOL_PER_HOST, keepalive_timeout=KEEPALIVE,
                                     use_dns_cache=False, local_addr=(bind, 0) if bind else None)
    session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # a peer's answer is small JSON; never inflate anything
        trust_env=False,  # relay-to-relay traffic never goes through an HTTP_PROXY from the environment
        cookie_jar=aiohttp.DummyCookieJar(),
        raise_for_status=False,
    )
    closer = _closer(session)
    _sessions[(loop, bind)] = (session, closer)
    await closer.__anext__()
    return session


async def close_sessions() -> None:
    """Close the pooled session of the running event loop (call it when delivery stops); the next
    transfer on this loop makes a new one. Never raises."""
    loop = asyncio.get_running_loop()
    for key in [k for k in _sessions if k[0] is loop]:
        entry = _sessions.pop(key)
        try:
            await entry[1].aclose()
        except Exception:  # pragma: no cover - closing never matters to an outcome
            log.debug("closing the XFER client session failed", exc_info=True)


# --- connections --------------------------------------------------------------------------------


async def connect_xfer(hop: Hop, settings: Settings) -> XferConnection:
    """A connection to the XFER peer `hop`, or ConnectError if it does not accept TCP connections
    within settings.connect_timeout (refused, unreachable, blackholed: cases 38-39)."""
    from fastrelay.delivery.wire import local_address, pick_source

    family = socket.AF_INET6 if ":" in hop.ip else socket.AF_INET
    source = pick_source(settings.bind_address, family)  # one of a list, for this connection
    sock = await tcp_connect(hop, settings.connect_timeout, source, settings.binding)
    sock.close()  # the peer is reachable (from this binding's address); the requests use the pooled session
    bind = None
    if source:
        bind = await local_address(source, family)
    return XferConnection(hop, settings, await _session(bind))


def _hostport(hop: Hop) -> str:
    return f"[{hop.ip}]:{hop.port}" if ":" in hop.ip else f"{hop.ip}:{hop.port}"


class XferConnection:
    """Transfers to one peer (the `Transferring` protocol of fastrelay.delivery)."""

    def __init__(self, hop: Hop, settings: Settings, session: aiohttp.ClientSession):
        self.hop = hop
        self.settings = settings
        self.session = session
        self.usable = True
        self.remote = f"{hop.ip}:{hop.port}"
        self.method = settings.http_method.upper()
        self.uri = settings.http_uri
        hostport = _hostport(hop)
        # encoded=True: the path goes on the request line exactly as configured, which is what is signed.
        self.url = yarl.URL(f"http://{hostport}{self.uri}", encoded=True)
        self.host_header = settings.http_host or hostport

    async def deliver(self, sender: str, mail_params: str, rcpts: list[tuple[str, str]],
                      body: bytes) -> list[RcptResult]:
        raise NotImplementedError("XFER needs the whole envelope: the scheduler calls transfer() for xfer hops")

    async def close(self) -> None:
        """Nothing to say goodbye to: the pooled session outlives the connection. Never raises."""
        self.usable = False

    async def transfer(self, env: Envelope, idx: list[int], body: bytes, key: tuple[str, str]) -> list[RcptResult]:
        """Send recipients `idx` of `env` to the peer; one result per index. `key` (this node, this
        node's id for the message) travels in the envelope's `origin`: the peer stores a transfer at
        most once per key, so a resend after a lost answer is safe (case 36)."""
        s = self.settings
        payload, env_len = wire.encode_request(env, idx, body, key, teleport=s.teleport)
        digest = wire.content_sha256(payload)
        headers = {
            "Host": self.host_header,
            "Content-Type": wire.CONTENT_TYPE,
            wire.H_VERSION: str(wire.VERSION),
            wire.H_ENVELOPE_LENGTH: str(env_len),
            wire.H_CONTENT_SHA256: digest,
            "Accept": wire.RESPONSE_CONTENT_TYPE,
            "Accept-Encoding": "identity",
            "User-Agent": _USER_AGENT,
        }
        if s.xfer_secret:
            headers["Authorization"] = wire.authorization(s.xfer_secret, self.method, self.uri, digest)
        elif s.xfer_token:
            headers["Authorization"] = wire.bearer(s.xfer_token)
        wait = s.xfer_timeout + UPLOAD_SECONDS_PER_MIB * len(payload) / (1024 * 1024)
        timeout = aiohttp.ClientTimeout(total=wait, sock_connect=s.connect_timeout)
        n = len(idx)
        big = len(payload) > EXPECT_CONTINUE_ABOVE
        # A large body goes as BytesIO: aiohttp then writes it in chunks and lets the loop run in
        # between, instead of one write of megabytes (it warns about raw bytes over 1 MiB).
        data = io.BytesIO(payload) if big else payload
        try:
            async with self.session.request(
                self.method, self.url, data=data, headers=headers, timeout=timeout, allow_redirects=False,
                expect100=big,
            ) as resp:
                status = resp.status
                answer = await _read_capped(resp.content, wire.MAX_RESPONSE_BYTES)
        except TimeoutError:
            self.usable = False
            text = (f"4.4.2 No answer from XFER peer {self.remote} within {round(wait, 1):g} s; unknown outcome, "
                    "will resend with the same idempotency key")
            log.warning("XFER %s/%s to %s: %s", key[0], key[1], self.remote, text)
            return [RcptResult(TEMP, 451, text)] * n
        except (aiohttp.ClientError, OSError) as e:
            # Refused, reset, closed mid-answer, or not HTTP at all: nothing is known of the outcome.
            self.usable = False
            text = clean_text(f"4.4.2 XFER to {self.remote} failed: {type(e).__name__}: {e}; "
                              "will resend with the same idempotency key")
            log.warning("XFER %s/%s to %s: %s", key[0], key[1], self.remote, text)
            return [RcptResult(TEMP, 451, text)] * n
        return [self._result(status, answer, key)] * n

    def _result(self, status: int, answer: bytes | None, key: tuple[str, str]) -> RcptResult:
        where = f"XFER {key[0]}/{key[1]} to {self.remote}"
        if status == 200:
            try:
                if answer is None:
                    raise WireError(502, "bad_response", "the response body is too large")
                acc = wire.decode_response(answer)
            except WireError as e:
                text = clean_text(f"4.5.0 XFER peer {self.remote} answered 200 with a bad body ({e.message}): "
                                  "unknown outcome, will resend with the same idempotency key")
                log.warning("%s: %s", where, text)
                return RcptResult(TEMP, 451, text)
            again = " (already transferred before)" if acc.duplicate else ""
            return RcptResult(OK, 250, clean_text(f"2.0.0 transferred as {acc.id} to {acc.node}{again}"))
        code, message = wire.decode_error(answer) if answer is not None else ("", "")
        said = f"{status} {code}: {message}" if code else f"{status}"
        if answer is None:
            said += " (answer too large, not read)"
        if status == 400:
            text, res = f"5.6.0 XFER peer {self.remote} refused the message: {said}", PERM
            log.error("%s: refused for good: %s", where, clean_text(said))
            return RcptResult(res, 554, clean_text(text))
        if status == 413:
            log.error("%s: too big for the peer: %s", where, clean_text(said))
            return RcptResult(PERM, 552, clean_text(f"5.3.4 Message too big for XFER peer {self.remote}: {said}"))
        if status == 508:
            log.error("%s: loop: %s", where, clean_text(said))
            return RcptResult(PERM, 554, clean_text(f"5.4.6 XFER loop detected by peer {self.remote}: {said}"))
        if status in (401, 403):
            log.error("%s: the peer refuses our credentials or address (check xfer_secret/xfer_token and the "
                      "peer's xfer_allowed_clients): %s", where, clean_text(said))
            return RcptResult(TEMP, 451, clean_text(f"4.7.0 XFER peer {self.remote} refused this node: {said}"))
        if status in (404, 405, 415):
            log.error("%s: the peer does not take transfers like this (check HTTP_URI, HTTP_METHOD and the "
                      "XFER version on both nodes): %s", where, clean_text(said))
            return RcptResult(TEMP, 451, clean_text(f"4.3.5 XFER peer {self.remote} is not set up for this "
                                                    f"transfer: {said}"))
        if status == 429 or 500 <= status <= 599:
            log.info("%s: transient: %s", where, clean_text(said))
            return RcptResult(TEMP, 451, clean_text(f"4.3.0 XFER peer {self.remote} answered {said}"))
        log.warning("%s: unexpected answer: %s", where, clean_text(said))
        return RcptResult(TEMP, 451, clean_text(f"4.5.0 XFER peer {self.remote} answered an unexpected {said}; "
                                                "will resend with the same idempotency key"))


async def _read_capped(content: aiohttp.StreamReader, cap: int) -> bytes | None:
    """The response body, or None if it is longer than `cap` (a hostile or confused peer cannot
    make us buffer more: bounded memory, as for SMTP replies in case 44)."""
    buf = bytearray()
    while True:
        chunk = await content.read(cap + 1 - len(buf))
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > cap:
            return None
