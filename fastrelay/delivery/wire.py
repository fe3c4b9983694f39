"""Reply wire and session life cycle of the own SMTP and LMTP clients: bytes in, replies out, in step with the commands.

aiosmtplib cannot pipeline (RFC 2920): its read_response must be awaited once per command written,
and its data_received drops bytes once a reply is parsed. This asyncio Protocol instead counts the
replies still expected (`want`: 1 after a command, N after a pipelined group of N commands), hands
them out in order, and flags any reply nobody asked for (docs/reliability.md case 44, "unsolicited").
Replies go through the framing hot path's ReplyParser (bounded memory: a hostile reply is a
`(-1, reason)`), looked up on `fastrelay._impl` at use so either implementation can be swapped in.

`WireSession` is what the two clients do alike on that wire, kept in one place so that their
connection handling cannot drift apart: the TCP connect, the greeting, STARTTLS per policy with
its one plaintext retry (case 45), the failure texts, QUIT. The SMTP and LMTP modules add the
hello (EHLO/HELO, LHLO) and the transactions, which differ (RFC 2920 pipelining; RFC 2033 §4.2:
one reply per accepted recipient after the dot).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
import socket
import ssl
from collections import deque
from typing import TypeVar

from fastrelay import _impl
from fastrelay.delivery import OK, PERM, TEMP, ConnectError, Hop, RcptResult, Settings

__all__ = ["CONTROL", "QUIT_TIMEOUT", "TEXT_CAP", "Hostile", "Lost", "ReplyWire", "WireSession", "clean_text",
           "connect_session", "hello_keywords", "reply_result", "reply_text", "tcp_connect", "temp", "tls_context",
           "want_tls"]

# QUIT is a courtesy; a peer that does not answer it quickly is simply dropped.
QUIT_TIMEOUT = 2.0

# Remote reply text goes into logs and DSNs: no control characters, bounded (docs/reliability.md case 26).
TEXT_CAP = 500

# What may never go out in a command argument (docs/reliability.md case 22: no command injection).
CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class Lost(Exception):
    """The peer closed the connection."""


class Hostile(Exception):
    """A reply the parser refused (too long, too many lines, malformed), or reply data nobody asked
    for (`shifted`: the replies may be out of step with the commands)."""

    def __init__(self, reason: str, shifted: bool):
        super().__init__(reason)
        self.reason = reason
        self.shifted = shifted


def reply_text(lines: list[bytes]) -> str:
    """A multi-line reply as one line of text; decoded only as far as it will be kept (case 26)."""
    return b" ".join(lines)[: TEXT_CAP + 16].decode("utf-8", "replace")


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class ReplyWire(asyncio.Protocol):
    """Bytes in, whole replies out; holds no more replies than were asked for.

    `lines` and `tail` keep track of bytes the parser holds that are not part of a reply handed
    out yet: complete lines of an unfinished reply, and whether the last byte received ended a
    line. With every expected reply read, either one means the peer is out of step (`settled`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = _impl.ReplyParser()
        self.replies: deque[tuple[int, list[bytes]]] = deque()
        self.want = 1  # replies that may still arrive: the greeting first
        self.waiter: asyncio.Future | None = None
        self.drain_waiter: asyncio.Future | None = None
        self.paused = False
        self.lost = False
        self.bad: Hostile | None = None
        self.lines = 0  # complete lines received that belong to no complete reply yet
        self.tail = False  # the bytes received last did not end a line

    # -- asyncio callbacks -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.bad is not None:
            return
        parser = self.parser
        parser.feed(data)
        self.lines += data.count(b"\n")
        self.tail = data[-1] != 10  # LF
        replies = self.replies
        while (r := parser.next_reply()) is not None:
            if r[0] < 0:
                # Garbage where no reply was due is unsolicited too: out of step.
                reason = r[1][0].decode("ascii", "replace") if r[1] else "malformed"
                self._hostile(Hostile(reason, len(replies) >= self.want))
                break
            if len(replies) >= self.want:
                # No reply comes unasked: one per command (RFC 5321 §4.1.1), one per command of a
                # pipelined group (RFC 2920 §3.1), one per accepted recipient after an LMTP dot
                # (RFC 2033 §4.2). One more means the peer is out of step.
                self._hostile(Hostile("unsolicited reply", True))
                break
            self.lines -= len(r[1])
            replies.append(r)
        if replies:
            self._wake()

    def _hostile(self, e: Hostile) -> None:
        self.bad = e
        if self.transport is not None:
            self.transport.abort()  # stop reading a flood at once (case 44)
        self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- used by the clients ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.bad is not None:
            raise self.bad
        t = self.transport
        if self.lost or t is None or t.is_closing():
            raise Lost
        t.write(data)

    def send(self, data: bytes, n: int) -> None:
        """Write a group of `n` commands at once (RFC 2920; n=1 without PIPELINING) and expect `n`
        replies. Refused if anything arrived since the last expected reply (case 44)."""
        if self.lines or self.tail or self.replies:
            raise Hostile("unsolicited reply data", True)
        self.want = n
        self.write(data)

    async def read(self, timeout: float) -> tuple[int, list[bytes]]:
        """The next reply; TimeoutError, Lost or Hostile if none comes. Replies that arrived
        before a malformed one are handed out first (they were well-formed and in order)."""
        replies = self.replies
        if not replies:
            if self.bad is None and not self.lost:
                fut = self.waiter = self.loop.create_future()
                timer = self.loop.call_later(timeout, _expire, fut)
                try:
                    await fut
                finally:
                    timer.cancel()
                    self.waiter = None
            if not replies:
                if self.bad is not None:
                    raise self.bad
                raise Lost
        if self.bad is not None and self.bad.shifted:
            raise self.bad
        self.want -= 1
        return replies.popleft()

    async def command(self, line: bytes, timeout: float) -> tuple[int, list[bytes]]:
        self.want = 1
        self.write(line)
        return await self.read(timeout)

    def check(self) -> None:
        """Raise if something went wrong after the replies just read (e.g. one reply too many)."""
        if self.bad is not None:
            raise self.bad

    def settled(self) -> None:
        """After the last reply of a group: raise if anything else came, a whole reply or a part
        of one (the pipelined twin of aiosmtplib's non-empty buffer after a reply, case 44)."""
        if self.bad is not None:
            raise self.bad
        if self.lines or self.tail or self.replies:
            raise Hostile("unsolicited reply data", True)

    async def drain(self, timeout: float) -> None:
        """Wait until the body is written out; `timeout` without progress is a timeout (a server
        that stopped reading: data_timeout, "each block of the body")."""
        while self.paused:
            if self.lost:
                raise Lost
            fut = self.drain_waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, _expire, fut)
            try:
                await fut
            finally:
                timer.cancel()
                self.drain_waiter = None
        if self.lost:
            raise Lost

    def reset_parser(self) -> None:
        # docs/reliability.md case 6 (STARTTLS injection): nothing read before TLS carries over.
        self.parser = _impl.ReplyParser()
        self.replies.clear()
        self.want = 0
        self.lines = 0
        self.tail = False

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


# --- the session both clients run on the wire ------------------------------------------------------


def clean_text(text: str) -> str:
    """Reply text fit for a log line or a DSN: control characters (line breaks of a multi-line
    reply included) become spaces, length capped (docs/reliability.md case 26)."""
    text = text[:TEXT_CAP]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else " " for c in text)
    return text


def reply_result(code: int, text: str) -> RcptResult:
    """A 2xx/4xx/5xx reply as a recipient outcome. Anything else (a 3xx where a final reply was
    due) is a protocol error: TEMP; the caller also gives up the connection."""
    if 200 <= code < 300:
        return RcptResult(OK, code, clean_text(text))
    if 500 <= code < 600:
        return RcptResult(PERM, code, clean_text(text))
    if 400 <= code < 500:
        return RcptResult(TEMP, code, clean_text(text))
    return RcptResult(TEMP, 451, clean_text(f"4.5.0 Unexpected reply {code} {text}"))


def temp(text: str) -> RcptResult:
    """A synthetic transient failure (lost connection, timeout, hostile reply): 451, RFC 5321 §3.8."""
    return RcptResult(TEMP, 451, text)


async def local_address(bind: str, family: int) -> str:
    """Bind_Address as an IP of `family`: an IP as written, or a local host name resolved."""
    try:
        ip = ipaddress.ip_address(bind)
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(bind, 0, family=family, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"{bind} has no address of this family") from None
        return infos[0][4][0]
    if (ip.version == 6) != (family == socket.AF_INET6):
        raise OSError(f"it is an IPv{ip.version} address and the next hop is not")
    return str(ip)


def pick_source(bind: str | tuple[str, ...] | None, family: int) -> str | None:
    """The Bind_Address to use for one new connection of `family`. A list of source addresses
    (Stalwart's queue.outbound.source-ip.v4/.v6): one chosen at random among those of the next
    hop's family; none of that family lets the kernel choose (as Stalwart with an empty list)."""
    if not isinstance(bind, tuple):
        return bind
    fam6 = family == socket.AF_INET6
    same = [a for a in bind if (":" in a) == fam6]
    return random.choice(same) if same else None


async def bind_socket(sock: socket.socket, hop: Hop, bind: str | tuple[str, ...] | None, binding: str) -> None:
    """Issue #10 (Momentum's bind_address): bind the binding's source address before connect,
    so that the next hop sees the binding's IP. A bind that fails is a transient failure of
    this binding, not of the host (ConnectError with policy=True: other bindings still use it)."""
    bind = pick_source(bind, sock.family)
    if bind is None:
        return
    try:
        ip = await local_address(bind, sock.family)
        sock.bind((ip, 0))
    except OSError as e:
        raise ConnectError(451, clean_text(f"4.4.1 Cannot bind to Bind_Address {bind} of binding {binding} "
                                           f"to reach {hop.ip}:{hop.port}: {e.strerror or e}"),
                           hop=hop, policy=True) from None


async def tcp_connect(hop: Hop, timeout: float, bind: str | tuple[str, ...] | None = None,
                      binding: str = "default") -> socket.socket:
    """A connected non-blocking socket to `hop` (from `bind`, the binding's Bind_Address, if set),
    or ConnectError (refused, unreachable, no SYN-ACK within `timeout`: docs/reliability.md case 38).
    Done here rather than by aiosmtplib so that the TCP connect and the greeting each get their
    own timeout (RFC 5321 §4.5.3.2)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in hop.ip else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await bind_socket(sock, hop, bind, binding)
        await asyncio.wait_for(loop.sock_connect(sock, (hop.ip, hop.port)), timeout)
    except TimeoutError:
        sock.close()
        raise ConnectError(451, f"4.4.1 Connection to {hop.ip}:{hop.port} timed out", hop=hop) from None
    except OSError as e:
        sock.close()
        raise ConnectError(451, f"4.4.1 Connection to {hop.ip}:{hop.port} failed: "
                                f"{clean_text(e.strerror or str(e))}", hop=hop) from None
    except BaseException:
        sock.close()
        raise
    return sock


_contexts: dict[tuple, ssl.SSLContext] = {}

# TLS_Protocols tokens -> ssl.TLSVersion, in order (SSLv2 is never negotiated; SSLv3 neither by
# any OpenSSL Python links today, but its token is kept for the range).
_VERSIONS = [("SSLv3", ssl.TLSVersion.SSLv3), ("TLSv1.0", ssl.TLSVersion.TLSv1),
             ("TLSv1.1", ssl.TLSVersion.TLSv1_1), ("TLSv1.2", ssl.TLSVersion.TLSv1_2),
             ("TLSv1.3", ssl.TLSVersion.TLSv1_3)]


def protocol_range(spec: str) -> tuple[ssl.TLSVersion, ssl.TLSVersion] | None:
    """Momentum's TLS_Protocols ("+ALL:-TLSv1.0:-TLSv1.1") as the (minimum, maximum) version that
    OpenSSL's context takes; None leaves OpenSSL's default. A hole in the middle cannot be
    expressed as a range, so the lowest and highest enabled versions bound it."""
    enabled: set[str] = set()
    for tok in spec.split(":"):
        sign, name = tok[0], tok[1:]
        names = [n for n, _ in _VERSIONS] if name == "ALL" else [name]
        for n in names:
            (enabled.add if sign == "+" else enabled.discard)(n)
    on = [v for n, v in _VERSIONS if n in enabled]
    if not on:
        raise ValueError(f"TLS_Protocols {spec!r} enables no protocol")
    return on[0], on[-1]


def _configure(ctx: ssl.SSLContext, settings: Settings) -> None:
    """The outbound TLS options besides verification: client certificate, protocols, ciphers."""
    if settings.tls_cert and settings.tls_cert != "none":
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key or None)
    if settings.tls_protocols:
        lo, hi = protocol_range(settings.tls_protocols)
        # Below TLS 1.2 the OpenSSL build and the system crypto policy decide (Momentum's note on
        # tls_protocols; Python deprecates setting those versions): only a floor of 1.2 or 1.3 is set.
        if lo >= ssl.TLSVersion.TLSv1_2:
            ctx.minimum_version = lo
        ctx.maximum_version = hi
    if settings.tls_ciphers:
        ctx.set_ciphers(settings.tls_ciphers)  # ssl.SSLError (an OSError) if none matches


def verify_mode(settings: Settings) -> str:
    """TLS_Verify as "no", "ca" or "host" (a boolean from older callers: True means "host")."""
    v = settings.tls_verify
    if v is True:
        return "host"
    if v is False or v is None:
        return "no"
    return v


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The client context for STARTTLS, built once per (verify mode, CA file, client certificate):
    loading the system store costs milliseconds, too much per connection. Momentum's TLS_Verify:
    no, ca, host; TLS_Certificate/TLS_Key: the certificate presented to a next hop that asks."""
    mode = verify_mode(settings)
    key = (mode, settings.tls_ca, settings.tls_cert, settings.tls_key, settings.tls_protocols, settings.tls_ciphers)
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        _configure(ctx, settings)
        if mode in ("ca", "host"):
            if settings.tls_ca:
                ctx.load_verify_locations(cafile=settings.tls_ca)  # trusted in addition to the system store
            # "ca": signed by a trusted CA, whatever name it carries.
            ctx.check_hostname = mode == "host"
        else:
            # Opportunistic TLS (RFC 7435): encrypt without authenticating, as MTAs do by default.
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if settings.tls_cert:
            ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
        _contexts[key] = ctx
    return ctx


def want_tls(settings: Settings) -> bool:
    return settings.tls not in ("no", "disabled")


def hello_keywords(lines: list[bytes]) -> dict[str, str]:
    """The extensions a 250 reply to EHLO or LHLO offers: lowercase keyword -> its parameters."""
    ext: dict[str, str] = {}
    for ln in lines[1:]:  # the first line is the server's name (RFC 5321 §4.1.1.1)
        kw, _, params = ln.decode("ascii", "replace").strip().partition(" ")
        ext[kw.lower()] = params
    return ext


_QUIT = b"QUIT\r\n"


class _TLSFailed(Exception):
    """The STARTTLS handshake failed: under "ifavailable" connect_session() retries in plaintext."""


class WireSession:
    """What an SMTP and an LMTP session do alike on a `ReplyWire`: open it (TCP connect, greeting,
    hello, STARTTLS per policy), turn trouble into results or a ConnectError, close it with QUIT.

    A subclass gives `_hello` (EHLO/HELO or LHLO: fills `_ext`), `deliver` (its transactions) and,
    where it differs, `_exchange` (how strictly one setup reply is read) and `_GREETING_REFUSED`.
    """

    __slots__ = ("_deadline", "_dotted", "_expired", "_ext", "_fresh", "_hop", "_settings", "_wire", "remote", "tls",
                 "tls_info", "usable")

    # The text of the ConnectError for a refused greeting that says nothing.
    _GREETING_REFUSED = "greeting refused"

    def __init__(self, hop: Hop, settings: Settings):
        self._hop = hop
        self._settings = settings
        self._wire: ReplyWire | None = None
        self._ext: dict[str, str] = {}  # the hello's keywords, lowercase (empty after HELO)
        self._fresh = True  # no transaction started since the hello or the last RSET
        self._dotted = False  # the body of the current message has gone out, final dot included
        self.remote = f"{hop.ip}:{hop.port}"
        self.usable = False
        self.tls = False
        self.tls_info = ""  # "TLSv1.3:TLS_AES_256_GCM_SHA384" once under TLS
        self._deadline: asyncio.TimerHandle | None = None  # Session_Timeout's timer
        self._expired = False  # Session_Timeout passed: the connection was dropped

    # -- session setup ---------------------------------------------------------------------------

    @property
    def takes_dsn(self) -> bool:
        """The next hop offered DSN (RFC 3461): NOTIFY, ORCPT, RET and ENVID went on with the
        message, so reporting its delivery is that hop's job from here (RFC 3461 §5.2.1)."""
        return "dsn" in self._ext

    async def _open(self, try_tls: bool) -> None:
        hop, s = self._hop, self._settings
        sock = await tcp_connect(hop, s.connect_timeout, s.bind_address, s.binding)
        loop = asyncio.get_running_loop()
        if s.tls_implicit:
            # RFC 8314 §3 (SMTPS/LMTPS, Stalwart's remote tls.implicit): TLS from the first byte,
            # so the greeting already comes under TLS and STARTTLS is never offered nor asked.
            wire = await self._implicit_tls(sock)
        else:
            try:
                _, wire = await loop.create_connection(lambda: ReplyWire(loop), sock=sock)
            except BaseException:
                sock.close()
                raise
        self._wire = wire
        if s.session_timeout:
            # Stalwart's remote `timeout`: one bound for the whole session, whatever each phase's
            # own timeout says; past it the connection is dropped and what is left is deferred.
            self._deadline = loop.call_later(s.session_timeout, self._session_expired)
        try:
            code, lines = await self._setup(None, s.greeting_timeout, "the greeting")
            if code != 220:
                # docs/reliability.md case 39: a 4xx/5xx greeting makes the host unusable, never a
                # per-recipient result (Postfix smtp_skip_5xx_greeting).
                raise self._refusal(code, lines, self._GREETING_REFUSED)
            await self._hello()
            if try_tls and want_tls(s) and not s.tls_implicit:
                await self._starttls()
        except BaseException:
            wire.abort()
            self._wire = None
            self._cancel_deadline()
            raise
        self.usable = True

    async def _implicit_tls(self, sock: socket.socket) -> ReplyWire:
        """The TLS handshake of an implicit-TLS next hop (RFC 8314), before any SMTP; a failure is a
        ConnectError (4.7.5 when the certificate is refused: the host's own policy, not a crash)."""
        hop, s = self._hop, self._settings
        loop = asyncio.get_running_loop()
        try:
            ctx = tls_context(s)
        except (OSError, ValueError) as e:
            sock.close()
            raise ConnectError(451, clean_text(f"4.7.5 Cannot load the TLS CA file: {e}"), hop=hop,
                               policy=True) from None
        try:
            transport, wire = await loop.create_connection(
                lambda: ReplyWire(loop), sock=sock, ssl=ctx, server_hostname=hop.name or hop.ip,
                ssl_handshake_timeout=s.tls_timeout)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as e:
            sock.close()
            raise ConnectError(451, clean_text(f"4.7.5 Implicit TLS handshake with {self.remote} failed: {e}"),
                               hop=hop, policy=isinstance(e, ssl.SSLCertVerificationError)) from None
        except BaseException:
            sock.close()
            raise
        self.tls = True
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            cipher = sslobj.cipher()
            self.tls_info = f"{sslobj.version()}:{cipher[0] if cipher else '?'}"
        return wire

    def _session_expired(self) -> None:
        self._deadline = None
        self._expired = True
        self._drop()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    async def _setup(self, line: bytes | None, timeout: float, what: str) -> tuple[int, list[bytes]]:
        """One exchange before any message: every failure is a ConnectError (cases 38, 39, 44)."""
        try:
            return await self._exchange(line, timeout)
        except TimeoutError:
            why = f"4.4.2 Timed out waiting for {what} from {self.remote}"
        except Lost:
            why = f"4.4.2 Lost connection with {self.remote} during {what}"
        except Hostile as e:
            why = clean_text(f"4.5.0 Bad reply from {self.remote} during {what}: {e.reason}")
        raise ConnectError(451, why, hop=self._hop)

    async def _exchange(self, line: bytes | None, timeout: float) -> tuple[int, list[bytes]]:
        """Send `line` (None: nothing, for the greeting) and read its one reply."""
        wire = self._wire
        if line is not None:
            wire.send(line, 1)
        r = await wire.read(timeout)
        wire.settled()  # nothing may follow a reply without PIPELINING (RFC 5321 §4.1.1)
        return r

    def _refusal(self, code: int, lines: list[bytes], silent: str = "") -> ConnectError:
        """The ConnectError for a refused greeting or hello; `silent` stands for a reply without text."""
        return ConnectError(code if 400 <= code < 600 else 451, clean_text(reply_text(lines)) or silent,
                            hop=self._hop)

    async def _hello(self) -> None:
        """EHLO (or HELO) or LHLO; sets `_ext`. Called again after STARTTLS (RFC 3207 §4.2)."""
        raise NotImplementedError

    async def _starttls(self) -> None:
        """docs/reliability.md case 45, RFC 3207: the same policy for SMTP and LMTP."""
        s, hop, wire = self._settings, self._hop, self._wire
        required = s.tls == "required"
        if "starttls" not in self._ext:
            if required:
                raise ConnectError(451, "4.7.4 TLS is required, but STARTTLS was not offered", hop=hop, policy=True)
            return
        try:
            ctx = tls_context(s)
        except (OSError, ValueError) as e:
            raise ConnectError(451, clean_text(f"4.7.5 Cannot set up outbound TLS (TLS_CA, TLS_Certificate, "
                                               f"TLS_Key, TLS_Protocols, TLS_Ciphers): {e}"), hop=hop,
                               policy=True) from None
        code, lines = await self._setup(b"STARTTLS\r\n", s.tls_timeout, "STARTTLS")
        if code != 220:
            if wire.lost or code == 421:  # the server closed
                raise ConnectError(451, clean_text(f"4.4.2 STARTTLS answered {code} {reply_text(lines)}"),
                                   hop=hop)
            if required:
                raise ConnectError(451, clean_text(f"4.7.4 TLS is required, but STARTTLS was refused: "
                                                   f"{code} {reply_text(lines)}"), hop=hop, policy=True)
            return  # 454 under "ifavailable": carry on in plaintext on this connection
        wire.reset_parser()  # docs/reliability.md case 6: nothing read before TLS carries over
        loop = asyncio.get_running_loop()
        try:
            wire.transport = await loop.start_tls(wire.transport, wire, ctx, server_hostname=hop.name or hop.ip,
                                                  ssl_handshake_timeout=s.tls_timeout)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError, RuntimeError) as e:
            # A failed handshake or an untrusted certificate: the connection is gone (or unusable).
            wire.abort()
            if required:
                raise ConnectError(451, clean_text(f"4.7.5 TLS handshake failed: {e}"), hop=hop,
                                   policy=True) from None
            raise _TLSFailed(str(e)) from None
        self.tls = True
        sslobj = wire.transport.get_extra_info("ssl_object")
        if sslobj is not None:
            # For the mainlog D record, as Postfix logs "TLS connection established ... TLSv1.3
            # with cipher ...".
            cipher = sslobj.cipher()
            self.tls_info = f"{sslobj.version()}:{cipher[0] if cipher else '?'}"
        # RFC 3207 §4.2: forget what was learnt before TLS and ask again.
        await self._hello()

    # -- trouble during delivery -----------------------------------------------------------------

    def _trouble(self, phase: str, template: str) -> str:
        """The text of a synthetic 451; `template` has {phase} and {remote}."""
        if self._expired:
            template = f"4.4.2 Session with {{remote}} exceeded its Session_Timeout of " \
                       f"{self._settings.session_timeout:g}s during {{phase}}"
        if self._dotted:
            # RFC 5321 §3.8 / §4.5.3.2, docs/reliability.md cases 40, 48: the message may have been taken
            # (for LMTP: by the recipients not answered yet); retry, knowing it may arrive twice
            # (Postfix: "message may be sent more than once").
            return clean_text(template.format(phase="end of data", remote=self.remote)
                              + "; the message may have been delivered (possible duplicate)")
        return clean_text(template.format(phase=phase, remote=self.remote))

    def _reply(self, code: int, lines: list[bytes]) -> RcptResult:
        res = reply_result(code, reply_text(lines))
        if code == 421 or 300 <= code < 400:
            self._drop()  # closing (§3.8), or out of step with the server
        return res

    def _broken(self, todo: range | list[int], results: list[RcptResult | None], text: str) -> list[int]:
        """Connection-level trouble: every recipient of `todo` still without a result gets TEMP;
        the connection carries no further message."""
        self._drop()
        res = temp(text or f"4.4.2 Lost connection with {self.remote}")
        for i in todo:
            if results[i] is None:
                results[i] = res
        return []

    def _drop(self) -> None:
        self.usable = False
        if self._wire is not None:
            self._wire.abort()  # also stops the flood of a hostile peer at once

    async def close(self) -> None:
        self._cancel_deadline()
        wire, self._wire = self._wire, None
        if wire is None:
            return
        try:
            if self.usable and not wire.lost:
                await wire.command(_QUIT, min(QUIT_TIMEOUT, self._settings.rset_timeout))
        except Exception:
            pass  # QUIT is a courtesy; the session is over either way
        finally:
            self.usable = False
            t = wire.transport
            if t is not None:
                try:
                    t.close()
                except Exception:
                    pass


_S = TypeVar("_S", bound=WireSession)


async def connect_session(cls: type[_S], hop: Hop, settings: Settings) -> _S:
    """A session of `cls` to `hop`, greeted, hello'd and (per policy) under TLS; or ConnectError."""
    conn = cls(hop, settings)
    try:
        await conn._open(try_tls=True)
    except _TLSFailed as e:
        if not settings.tls_fallback:
            # TLS_Ifavailable_Fallback = false (Momentum): back to the queue, retried with TLS.
            raise ConnectError(451, clean_text(f"4.7.5 TLS handshake failed: {e}; no plaintext fallback "
                                               f"(TLS_Ifavailable_Fallback)"), hop=hop, policy=True) from None
        # docs/reliability.md case 45: opportunistic TLS that fails in the handshake retries once in
        # plaintext on a new connection ("required" raised ConnectError instead).
        await conn._open(try_tls=False)
    return conn
