"""Speak ESMTP to clients: enforce limits and relay policy, hand each complete message to the intake.

One `SMTPServer` per Listen address holds the settings and counters; one `Session` (an
asyncio.Protocol) per connection runs a small state machine over the events of the sans-I/O
framer (fastrelay._core or its twin). Replies are gathered per batch of pipelined commands and
written with one transport.write (docs/performance.md: per-command work, not bytes, is the cost). A message
is answered 250 only after the intake says it is durable (docs/reliability.md P1).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import math
import os
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any, Protocol

from fastrelay import _impl, limits
from fastrelay.message import Envelope, Recipient
from fastrelay.smtp import auth as A
from fastrelay.smtp import replies as R
from fastrelay.smtp.address import (
    AddressError,
    Path,
    check_rcpt_params,
    parse_params,
    parse_path,
    valid_envid,
    valid_ret,
)

log = logging.getLogger("fastrelay.smtp")

_F = _impl.ACTIVE  # the framing implementation chosen for this process
_fr = __import__(_impl.ServerFramer.__module__, fromlist=["EV_COMMAND"])
EV_COMMAND = _fr.EV_COMMAND
EV_COMMAND_ERROR = _fr.EV_COMMAND_ERROR
EV_OVERFLOW = _fr.EV_OVERFLOW
EV_DATA = _fr.EV_DATA
EV_BDAT_CHUNK = _fr.EV_BDAT_CHUNK
ERR_TOO_LONG = _fr.ERR_TOO_LONG
ERR_NUL = _fr.ERR_NUL
F_BARE_LF = _fr.F_BARE_LF
F_BARE_CR = _fr.F_BARE_CR
F_LONG_LINE = _fr.F_LONG_LINE
F_TOO_BIG = _fr.F_TOO_BIG
F_NUL = _fr.F_NUL

# Session states (an explicit state machine; an unknown state fails loudly).
S_GREETING = 0  # greeting not sent yet (greeting_delay): any input is an early talker
S_NEED_HELO = 1
S_READY = 2  # after EHLO/HELO, no transaction
S_MAIL = 3  # after MAIL
S_RCPT = 4  # at least one RCPT accepted
S_DATA = 5  # receiving DATA or BDAT content
S_CLOSING = 6

# RFC 5321 §4.1.1 / Postfix smtpd_forbidden_commands: an HTTP client on the SMTP port (case 7).
_HTTP_VERBS = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"DELETE"})
_JUNK_VERBS = frozenset({b"NOOP", b"RSET", b"VRFY", b"HELP", b"EXPN"})


class Intake(Protocol):
    """Where complete messages go: the spool (durable) and then the queue."""

    def space_ok(self, need: int = 0) -> bool:
        """Whether `need` more bytes can be stored and still leave spool_min_free free."""
        ...

    def submit(self, items: list[tuple[Envelope, bytes]]) -> Awaitable[Any]: ...


_msg_counter = itertools.count(1)
_MSGID_PREFIX = f"{int(time.time()):08X}{os.getpid() & 0xFFFF:04X}"


def new_msgid() -> str:
    """A message id unique across processes and restarts (start time, pid, counter)."""
    return f"{_MSGID_PREFIX}{next(_msg_counter):08X}"


def _new_msgid_prefix() -> None:
    # A worker forked by the supervisor (fastrelay.supervisor) imported this module in its
    # parent: give it its own pid and start time, or two workers would hand out the same ids.
    global _msg_counter, _MSGID_PREFIX
    _msg_counter = itertools.count(1)
    _MSGID_PREFIX = f"{int(time.time()):08X}{os.getpid() & 0xFFFF:04X}"


os.register_at_fork(after_in_child=_new_msgid_prefix)


class _DateCache:
    """RFC 5322 date for Received: headers, formatted once a second (formatdate is slow)."""

    __slots__ = ("sec", "text")

    def __init__(self) -> None:
        self.sec = -1
        self.text = ""

    def now(self) -> str:
        t = int(time.time())
        if t != self.sec:
            self.sec = t
            self.text = formatdate(t, localtime=True)
        return self.text


_dates = _DateCache()


def _clean(text: str, limit: int = 255) -> str:
    """Strip control characters and cap the length of client-supplied text before it goes into
    Received:, DSNs or logs (docs/reliability.md case 26)."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text)
    return text[:limit]


class ListenSettings:
    """A Listen entry's effective settings, resolved once at start."""

    def __init__(self, listen):
        g = listen.get
        self.relay_hosts = tuple(g("relay_hosts"))
        self.relay_domains = frozenset(g("relay_domains"))
        self.hostname = g("Hostname") or socket.gethostname()
        self.max_size = g("max_message_size")
        self.max_recipients = g("max_recipients_per_message")
        self.max_messages = g("max_messages_per_connection")
        self.max_connections = g("Listener_Sessions") or sys.maxsize  # 0: no limit (Momentum)
        self.max_per_ip = g("max_connections_per_ip")
        self.idle_timeout = g("Idle_Time") or math.inf  # 0: never for silence (Momentum)
        self.overload_idle_timeout = g("overload_idle_timeout")
        self.command_deadline = g("command_deadline")
        self.min_data_rate = g("min_data_rate")
        self.data_deadline = g("data_deadline")
        self.write_timeout = g("write_timeout")
        self.close_linger = g("close_linger")
        self.allow_nul = g("allow_nul_in_data")
        # RFC 5321 §4.5.1: where RCPT TO:<postmaster> goes. A configured value was checked by the
        # conf schema; the default is built from the host name, which may not be a domain.
        pm = g("Postmaster_Address") or f"postmaster@{self.hostname}"
        try:
            self.postmaster = parse_path(f"<{pm}>", R.BAD_RCPT_SYNTAX, allow_null=False)[0]
        except AddressError:
            log.warning("%r is not a valid address: <postmaster> goes to postmaster@localhost "
                        "(set Postmaster_Address)", pm)
            self.postmaster = parse_path("<postmaster@localhost>", R.BAD_RCPT_SYNTAX, allow_null=False)[0]
        self.junk_limit = g("junk_command_limit")
        self.soft_error_limit = g("soft_error_limit")
        self.hard_error_limit = g("hard_error_limit")
        self.error_sleep = g("error_sleep_time")
        self.greeting_delay = g("greeting_delay")
        self.hop_limit = g("hop_count_limit")
        self.normalize_hosts = tuple(g("bare_lf_normalize_hosts"))
        self.max_line = g("max_command_line")
        self.max_text_line = g("max_text_line")
        self.hard_cap = limits.COMMAND_HARD_CAP
        self.tls: ssl.SSLContext | None = None
        cert, key = _conf_path(listen.lookup("TLS_Certificate")), _conf_path(listen.lookup("TLS_Key"))
        if cert and key:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(cert, key)
            _tls_limits(ctx, listen.get("TLS_Protocols"), listen.get("TLS_Ciphers"))
            self.tls = ctx
        elif cert or key:
            raise ValueError("TLS_Certificate and TLS_Key must be set together")
        # Issue 17: implicit TLS (RFC 8314) and SMTP AUTH (RFC 4954).
        self.implicit_tls = bool(g("Use_SSL"))
        if self.implicit_tls and self.tls is None:
            raise ValueError("Use_SSL needs TLS_Certificate and TLS_Key")
        self.auth = A.listener_auth(listen, _conf_path)
        self.auth_bindings: dict[str, str] = g("auth_user_bindings")
        self.auth_senders: dict[str, frozenset] = g("auth_sender_domains")
        self.auth_guard = (g("auth_max_failures"), g("auth_lockout_time"), g("auth_failure_delay"))


def _tls_limits(ctx: ssl.SSLContext, protocols: str | None, ciphers: str | None) -> None:
    """TLS_Protocols and TLS_Ciphers for STARTTLS here, as for outbound (Momentum: both scopes)."""
    if protocols:
        from fastrelay.delivery.wire import protocol_range

        lo, hi = protocol_range(protocols)
        if lo >= ssl.TLSVersion.TLSv1_2:  # below 1.2 OpenSSL and the system policy decide
            ctx.minimum_version = lo
        ctx.maximum_version = hi
    if ciphers:
        ctx.set_ciphers(ciphers)  # ssl.SSLError (an OSError) if it matches no cipher


def _conf_path(setting) -> str | None:
    """A path option, relative to the directory of the conf file that set it."""
    if setting.value is None:
        return None
    if os.path.isabs(setting.value) or setting.pos is None:
        return setting.value
    return os.path.join(os.path.dirname(os.path.abspath(setting.pos.file)), setting.value)


def _in(nets: tuple, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
    if ip is None:
        return False
    for n in nets:
        if ip.version == n.version and ip in n:
            return True
    return False


class SMTPServer:
    """One Listen address: its settings, its sessions and their counters, its timer sweep."""

    def __init__(self, settings: ListenSettings, intake: Intake, binding: str = "default",
                 on_received: Callable[[Envelope, int], None] | None = None):
        self.s = settings
        self.intake = intake
        self.binding = binding
        # Binding assignment by conf (fastrelay.bindings.ListenerBinding), set by the relay.
        self.binder = None
        self.on_received = on_received
        self.sessions: set[Session] = set()
        self.per_ip: dict[str, int] = {}
        self.server: asyncio.base_events.Server | None = None
        self._reaper: asyncio.TimerHandle | None = None
        self._ehlo_cache: dict[bool, bytes] = {}
        self.greeting = f"220 {settings.hostname} ESMTP fastrelay\r\n".encode()
        self._policy_cache: dict[str, tuple] = {}
        # With workers (issue 13): the relay-wide counter table, this worker's column in it, the
        # slot counting this listener's connections and (memoised) each client address's slot.
        self.shared = None
        self.worker = 0
        self.conn_slot = -1
        self._ip_slots: dict[str, int] = {}
        self._share_name = ""
        mf, lockout, delay = settings.auth_guard
        # Shared by the relay's listeners: a lockout on one port holds on the others (issue 17).
        self.auth_guard = A.AuthGuard(mf, lockout, delay, delay * limits.AUTH_FAILURE_DELAY_CAP,
                                      fails=A.shared_failures(intake))
        # Counters for operators and tests (every one back to zero at teardown where it counts
        # something live).
        self.stats = {"connections": 0, "refused": 0, "messages": 0, "rejected": 0}

    def share(self, counters, worker: int, name: str) -> None:
        """Count connections in the relay-wide table, so Concurrency and max_connections_per_ip
        hold for the whole relay, not per worker (issue 13); `name` tells this Listen apart."""
        self.shared = counters
        self.worker = worker
        self._share_name = name
        self.conn_slot = counters.slot(f"listen:{name}")

    def ip_slot(self, ip: str) -> int:
        slot = self._ip_slots.get(ip)
        if slot is None:
            if len(self._ip_slots) >= limits.CLIENT_POLICY_CACHE:
                self._ip_slots.clear()  # slot() finds the same slot again: only a memo
            slot = self._ip_slots[ip] = self.shared.slot(f"ip:{self._share_name}:{ip}")
        return slot

    async def start(self, host: str | None, port: int, sock: socket.socket | None = None) -> None:
        """Listen on host:port, or on `sock` when given (a worker's share of a listener its
        supervisor bound with SO_REUSEPORT)."""
        loop = asyncio.get_running_loop()
        tls = self.s.tls if self.s.implicit_tls else None  # RFC 8314 §3.3: TLS from the first byte
        tls_kw = {"ssl": tls, "ssl_handshake_timeout": limits.TLS_HANDSHAKE_TIMEOUT if tls else None}
        if sock is not None:
            self.server = await loop.create_server(lambda: Session(self), sock=sock, backlog=1024, **tls_kw)
        else:
            self.server = await loop.create_server(lambda: Session(self), host, port, reuse_address=True,
                                                   backlog=1024, **tls_kw)
        self._schedule_reaper()

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self.server.sockets) if self.server else []

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        if self.server is not None:
            self.server.close()
        for sess in list(self.sessions):
            sess.shutdown()
        # A close waits for the write buffer to drain: give the last replies a moment, then abort
        # the connections of clients that do not read (nothing may stay counted after stop).
        loop = asyncio.get_running_loop()
        end = loop.time() + limits.SHUTDOWN_GRACE
        while self.sessions and loop.time() < end:
            await asyncio.sleep(0.02)
        for sess in list(self.sessions):
            sess.abort()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    def ehlo_reply(self, tls_active: bool, auth: bool = False) -> bytes:
        cached = self._ehlo_cache.get((tls_active, auth))
        if cached is None:
            lines = [
                f"{self.s.hostname}",
                "PIPELINING",
                f"SIZE {self.s.max_size}",
                "8BITMIME",
                "ENHANCEDSTATUSCODES",
                "DSN",  # RFC 3461: NOTIFY, ORCPT, RET, ENVID
            ]
            if self.s.tls is not None and not tls_active:
                lines.append("STARTTLS")
            if auth:
                lines.append(f"AUTH {self.s.auth.mechanisms}")  # RFC 4954 §3
            lines += ["SMTPUTF8", "CHUNKING"]
            cached = "".join(
                f"250{'-' if i < len(lines) - 1 else ' '}{ln}\r\n" for i, ln in enumerate(lines)
            ).encode()
            self._ehlo_cache[(tls_active, auth)] = cached
        return cached

    def client_policy(self, peer_ip: str) -> tuple:
        """(address, may relay, bare-LF normalised) for a client address, memoised: the same few
        clients connect over and over, and parsing plus CIDR matching per connection adds up."""
        hit = self._policy_cache.get(peer_ip)
        if hit is None:
            try:
                ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
            except ValueError:
                ip = None
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            hit = (ip, _in(self.s.relay_hosts, ip), _in(self.s.normalize_hosts, ip))
            if len(self._policy_cache) >= limits.CLIENT_POLICY_CACHE:
                self._policy_cache.clear()
            self._policy_cache[peer_ip] = hit
        return hit

    def overloaded(self) -> bool:
        return len(self.sessions) > self.s.max_connections * limits.OVERLOAD_FRACTION

    def _schedule_reaper(self) -> None:
        loop = asyncio.get_running_loop()
        self._reaper = loop.call_later(limits.REAPER_INTERVAL, self._reap)

    def _reap(self) -> None:
        # One timer sweep for all sessions instead of a timer per session and command: resetting
        # per-command timers would cost more than the commands.
        now = time.monotonic()
        idle = self.s.overload_idle_timeout if self.overloaded() else self.s.idle_timeout
        for sess in list(self.sessions):
            sess.check_timers(now, idle)
        self._schedule_reaper()


class _Tx:
    """One mail transaction (RFC 5321 §3.3)."""

    __slots__ = ("bdat", "bdat_failed", "domains", "mail_params", "params", "rcpts", "sender", "size", "smtputf8")

    def __init__(self, sender: Path, params: dict, raw_params: str):
        self.sender = sender
        self.params = params
        self.mail_params = raw_params
        self.rcpts: list[tuple[Path, str]] = []
        self.domains: set[str] = set()  # of the accepted recipients (one spool copy each)
        self.smtputf8 = "SMTPUTF8" in params
        self.size = smtp_number(params.get("SIZE"), 20) or 0  # RFC 1870: the client's estimate
        self.bdat = False
        self.bdat_failed = False


class Session(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: SMTPServer):
        self.srv = server
        s = server.s
        self.framer = _impl.ServerFramer(s.max_line, s.max_text_line, s.max_size, s.hard_cap)
        self.transport: asyncio.Transport | None = None
        self.state = S_GREETING
        self.busy = False  # waiting for the spool, a tarpit or a TLS handshake: input stays buffered
        self.tx: _Tx | None = None
        self.helo = ""
        self.esmtp = False
        self.tls = s.implicit_tls  # connection_made comes after the handshake (RFC 8314)
        self.peer_ip = ""
        self.ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self.trusted = False
        self.normalize = False
        self.messages = 0
        self.errors = 0
        self.junk = 0
        now = time.monotonic()
        self.last_input = now
        self.line_started = 0.0  # when the command line now being received began (0: none)
        self.data_started = 0.0
        self.write_paused = 0.0
        self.closing_at = 0.0  # when transport.close() was called (it waits for the buffer to drain)
        self.peer_eof = False  # the client half-closed: answer what it sent, then close
        self.said_bye = False  # QUIT answered: nothing more is expected, close at once
        self.lingering = False  # half-closed by us, discarding input until the client's EOF
        self.auth_user: str | None = None  # RFC 4954: the user of a successful AUTH
        self._sasl: tuple | None = None  # an AUTH exchange waiting for the client's next line

    # --- connection lifecycle ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        srv = self.srv
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        srv.stats["connections"] += 1
        # docs/reliability.md case 13: refuse beyond the limits at the banner, never an unbounded accept.
        if len(srv.sessions) >= srv.s.max_connections:
            self._refuse(R.TOO_MANY_CONNECTIONS)
            return
        n = srv.per_ip.get(self.peer_ip, 0)
        if n >= srv.s.max_per_ip:
            self._refuse(R.TOO_MANY_FROM_CLIENT)
            return
        sh = srv.shared
        if sh is not None:
            # Issue 13: the same two limits across every worker of the relay.
            if not sh.acquire(srv.conn_slot, srv.worker, srv.s.max_connections):
                self._refuse(R.TOO_MANY_CONNECTIONS)
                return
            if not sh.acquire(srv.ip_slot(self.peer_ip), srv.worker, srv.s.max_per_ip):
                sh.release(srv.conn_slot, srv.worker)
                self._refuse(R.TOO_MANY_FROM_CLIENT)
                return
        # Reserve: released in connection_lost, whatever ends the connection.
        srv.per_ip[self.peer_ip] = n + 1
        srv.sessions.add(self)
        self.ip, self.trusted, self.normalize = srv.client_policy(self.peer_ip)
        if srv.s.greeting_delay > 0:
            asyncio.get_running_loop().call_later(srv.s.greeting_delay, self._greet)
        else:
            self._greet()

    def _refuse(self, reply: R.Reply) -> None:
        self.srv.stats["refused"] += 1
        self.state = S_CLOSING
        self.transport.write(reply.wire)
        self._close_transport()

    def _greet(self) -> None:
        if self.state != S_GREETING:
            return
        self.state = S_NEED_HELO
        self.transport.write(self.srv.greeting)

    def connection_lost(self, exc: Exception | None) -> None:
        srv = self.srv
        if self in srv.sessions:
            srv.sessions.discard(self)
            n = srv.per_ip.get(self.peer_ip, 1) - 1
            if n:
                srv.per_ip[self.peer_ip] = n
            else:
                srv.per_ip.pop(self.peer_ip, None)
            if srv.shared is not None:
                srv.shared.release(srv.conn_slot, srv.worker)
                srv.shared.release(srv.ip_slot(self.peer_ip), srv.worker)
        # A client gone mid-DATA leaves nothing behind: nothing is spooled before the end
        # (docs/reliability.md case 31, P5).
        self.state = S_CLOSING
        self.tx = None

    def pause_writing(self) -> None:
        # A client that does not read its replies: stop reading its commands (bounded write
        # buffer); the reaper closes it if this lasts (docs/reliability.md case 14).
        self.write_paused = time.monotonic()
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = 0.0
        if self.state != S_CLOSING:
            self.transport.resume_reading()

    def shutdown(self) -> None:
        if self.state != S_CLOSING and self.transport is not None and not self.transport.is_closing():
            if not self.busy:
                self.transport.write(R.SHUTTING_DOWN.wire)
            # No lingering: a stop must not wait on clients, and its 421 follows their last reply.
            self._close(linger=False)

    def _close(self, linger: bool = True) -> None:
        self.state = S_CLOSING
        self.tx = None
        self._close_transport(linger)

    def _close_transport(self, linger: bool = True) -> None:
        tr = self.transport
        if tr is None or self.closing_at:
            return
        self.closing_at = time.monotonic()
        # A close() with input still unread makes the kernel send a reset, and a reset may reach
        # the client before it has read our last reply (its stack or its library then discards
        # it). Unless the client is done sending (QUIT answered, or its EOF seen), send FIN after
        # the reply and read on, discarding, until the client closes or close_linger runs out.
        # asyncio's TLS transport cannot half-close.
        # A refused connection (not in sessions) is not lingered: no sweep would bound it.
        if (not linger or self.said_bye or self.peer_eof or self.srv.s.close_linger <= 0
                or self not in self.srv.sessions or tr.is_closing() or not tr.can_write_eof()):
            tr.close()
            return
        self.lingering = True
        tr.write_eof()
        if not self.write_paused:
            tr.resume_reading()

    def abort(self) -> None:
        """Drop the connection now, with whatever replies are still unsent (a client that does not
        read them never will)."""
        self.state = S_CLOSING
        self.tx = None
        if self.transport is not None:
            self.closing_at = self.closing_at or time.monotonic()
            self.transport.abort()

    def eof_received(self) -> bool:
        # RFC 5321 §4.1.1.10 / issue 16: a client may send the end of data and QUIT, then shut down
        # its write side (Exim does). Everything it sent before its EOF is answered, the 250 that
        # waits for the spool commit included; then we close. True keeps the transport open for
        # writing. asyncio's TLS transport cannot stay half-open (it closes and warns if asked
        # to), so over TLS what can be answered now is, and the rest is the case 31 duplicate.
        self.peer_eof = True
        if self.lingering:
            return False  # the client has read our FIN and closed: the close costs no reset now
        if self.state != S_CLOSING and not self.busy:
            self._process()
        return not self.tls

    def check_timers(self, now: float, idle: float) -> None:
        """Called once a second by the server's sweep (docs/reliability.md case 14)."""
        s = self.srv.s
        if self.state == S_CLOSING:
            # close() waits for the write buffer to drain, which a client that does not read never
            # lets happen: the fd, the replies and the connection's slots would stay for ever.
            if self.closing_at and now - self.closing_at > s.write_timeout:
                self.abort()
            elif (self.lingering and now - self.closing_at > s.close_linger
                  and not self.transport.get_write_buffer_size()):
                # The reply and the FIN went out close_linger ago: the client had its time.
                self.abort()
            return
        if self.write_paused and now - self.write_paused > s.write_timeout:
            log.info("client %s does not read its replies: disconnected", self.peer_ip)
            self.abort()
            return
        if self.busy:
            return
        reply = None
        if self.state == S_DATA:
            # The absolute bound always applies, so min_data_rate = 0 cannot hold a slot for ever.
            if now - self.data_started > s.data_deadline:
                reply = R.DATA_DEADLINE
            elif s.min_data_rate > 0:
                deadline = self.data_started + s.command_deadline + self.framer.size / s.min_data_rate
                if now > deadline:
                    reply = R.DATA_TOO_SLOW
        elif self.line_started and now - self.line_started > s.command_deadline:
            reply = R.COMMAND_DEADLINE
        elif now - self.last_input > idle:
            reply = R.IDLE_TIMEOUT
        if reply is not None:
            self.transport.write(reply.wire)
            self._close()

    # --- input ------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.state == S_CLOSING:
            return
        if self.state == S_GREETING:
            # docs/reliability.md case 5: bytes before the greeting.
            self.transport.write(R.EARLY_TALKER.wire)
            self._close()
            return
        self.last_input = time.monotonic()
        self.framer.feed(data)
        if not self.busy:
            self._process()

    def _process(self) -> None:
        out: list[bytes] = []
        framer = self.framer
        while not self.busy and self.state != S_CLOSING:
            ev = framer.next_event()
            if ev is None:
                break
            kind = ev[0]
            if kind == EV_COMMAND:
                self._command(ev[1], out)
            elif kind == EV_DATA:
                self._end_of_data(ev[1], ev[2], out)
            elif kind == EV_BDAT_CHUNK:
                self._bdat_chunk_done(ev[1], out)
            elif kind == EV_COMMAND_ERROR:
                err = ev[1]
                out.append(R.LINE_TOO_LONG.wire if err == ERR_TOO_LONG
                           else R.NUL_IN_COMMAND.wire if err == ERR_NUL else R.BARE_LF_COMMAND.wire)
                self._error(out)
            elif kind == EV_OVERFLOW:
                out.append(R.LINE_TOO_LONG.wire)
                self.state = S_CLOSING
            else:  # pragma: no cover - the framer has no other events
                raise AssertionError(f"unknown framer event {ev!r}")
        # A partial command line is buffered: start its deadline (case 14, trickled bytes).
        if self.state in (S_NEED_HELO, S_READY, S_MAIL, S_RCPT) and framer.pending():
            if not self.line_started:
                self.line_started = time.monotonic()
        else:
            self.line_started = 0.0
        if out and self.transport is not None:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        if self.peer_eof and not self.busy and self.state != S_CLOSING:
            # Every complete command before the EOF is answered; a partial line or an unfinished
            # message is dropped (nothing spooled: docs/reliability.md case 31).
            self.state = S_CLOSING
            self.tx = None
        if self.state == S_CLOSING:
            self._close_transport()

    def _error(self, out: list[bytes]) -> None:
        """Count an error; tarpit past the soft limit, close past the hard limit (case 15)."""
        self.errors += 1
        s = self.srv.s
        if self.errors >= s.hard_error_limit:
            out.append(R.TOO_MANY_ERRORS.wire)
            self.state = S_CLOSING
        elif self.errors > s.soft_error_limit and s.error_sleep > 0:
            self._pause_for(s.error_sleep)

    def _pause_for(self, seconds: float) -> None:
        self.busy = True
        asyncio.get_running_loop().call_later(seconds, self._resume)

    def _resume(self) -> None:
        self.busy = False
        if self.state != S_CLOSING:
            self._process()

    def _junk(self, out: list[bytes]) -> bool:
        self.junk += 1
        if self.junk > self.srv.s.junk_limit:
            out.append(R.TOO_MANY_ERRORS.wire)
            self.state = S_CLOSING
            return True
        return False

    # --- commands ---------------------------------------------------------------------------
    def _command(self, line: bytes, out: list[bytes]) -> None:
        if self._sasl is not None:
            self._sasl_line(line, out)  # RFC 4954 §4: a response to our 334, not a command
            return
        sp = line.find(b" ")
        verb = (line if sp < 0 else line[:sp]).upper()
        handler = _HANDLERS.get(verb)
        if handler is None:
            if verb in _HTTP_VERBS:
                out.append(R.HTTP_COMMAND.wire)  # case 7: close at once
                self.state = S_CLOSING
                return
            out.append(R.UNKNOWN_COMMAND.wire)
            if not self._junk(out):
                self._error(out)
            return
        raw = b"" if sp < 0 else line[sp + 1 :]
        try:
            arg = raw.decode("ascii")
        except UnicodeDecodeError:
            try:
                arg = raw.decode("utf-8")
            except UnicodeDecodeError:
                out.append(R.BAD_UTF8.wire)  # case 23: the session stays usable
                self._error(out)
                return
        if verb in _JUNK_VERBS and self._junk(out):
            return
        handler(self, arg, out)

    def _need_helo(self, out: list[bytes]) -> bool:
        if self.state == S_NEED_HELO:
            out.append(R.NEED_EHLO.wire)
            self._error(out)
            return True
        return False

    def smtp_EHLO(self, arg: str, out: list[bytes]) -> None:
        self._helo(arg, out, esmtp=True)

    def smtp_HELO(self, arg: str, out: list[bytes]) -> None:
        self._helo(arg, out, esmtp=False)

    def _helo(self, arg: str, out: list[bytes], esmtp: bool) -> None:
        name = arg.strip()
        if not name or " " in name or not name.isprintable():
            out.append(R.HELO_NEEDS_DOMAIN.wire)
            self._error(out)
            return
        # RFC 5321 §4.1.4: EHLO resets the state as RSET does.
        self.helo = _clean(name)
        self.esmtp = esmtp
        self.tx = None
        self.framer.reset()
        self.state = S_READY
        if esmtp:
            out.append(self.srv.ehlo_reply(self.tls, self._auth_offered()))
        else:
            out.append(f"250 {self.srv.s.hostname}\r\n".encode())

    def smtp_MAIL(self, arg: str, out: list[bytes]) -> None:
        if self._need_helo(out):
            return
        if self.tx is not None:
            out.append(R.NESTED_MAIL.wire)
            self._error(out)
            return
        if arg[:5].upper() != "FROM:":
            out.append(R.SYNTAX.wire)
            self._error(out)
            return
        if self.messages >= self.srv.s.max_messages:
            out.append(R.TOO_MANY_MESSAGES.wire)  # case 13
            return
        try:
            path, rest = parse_path(arg[5:], R.BAD_SENDER_SYNTAX, allow_null=True)
            params = parse_params(rest, R.BAD_SENDER_SYNTAX)
        except AddressError as e:
            out.append(e.reply.wire)
            self._error(out)
            return
        reply = self._check_mail_params(params, path)
        if reply is None and self.auth_user is not None and path.address:
            allowed = self.srv.s.auth_senders.get(self.auth_user)
            if allowed is not None and path.domain.lower().rstrip(".") not in allowed:
                reply = R.AUTH_SENDER_NOT_OWNED  # issue 17 (Postfix reject_sender_login_mismatch)
        if reply is not None:
            out.append(reply.wire)
            self._error(out)
            return
        tx = _Tx(path, params, rest.strip())
        # Case 17, RFC 1870 §6.1: 452 4.3.1 at MAIL while the disk is low, or when the SIZE the
        # client announces would take it below spool_min_free: before the body, not after it.
        if not self.srv.intake.space_ok(tx.size):
            out.append(R.SPOOL_LOW_SPACE.wire)
            return
        self.tx = tx
        self.state = S_MAIL
        out.append(R.SENDER_OK.wire)

    def _check_mail_params(self, params: dict, path: Path) -> R.Reply | None:
        for key, value in params.items():
            if key == "SIZE":
                size = smtp_number(value, 20)
                if size is None:
                    return R.SYNTAX  # RFC 1870 §3: size-value ::= 1*20DIGIT (ASCII only)
                if size > self.srv.s.max_size:
                    return R.SIZE_EXCEEDED  # case 11, RFC 1870
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return R.SYNTAX
            elif key == "SMTPUTF8":
                if value is not None:
                    return R.SYNTAX
            elif key == "RET":
                if not valid_ret(value):
                    return R.BAD_DSN_PARAM
            elif key == "ENVID":
                if not valid_envid(value):
                    return R.BAD_DSN_PARAM
            elif key == "AUTH" and self.srv.s.auth is not None:
                # RFC 4954 §5: a server offering AUTH takes AUTH=; it is not passed on (mail_args).
                if not value:
                    return R.SYNTAX
            else:
                return R.UNKNOWN_PARAM
        if path.utf8 and "SMTPUTF8" not in params:
            return R.UTF8_NEEDS_SMTPUTF8  # case 23
        return None

    def smtp_RCPT(self, arg: str, out: list[bytes]) -> None:
        if self._need_helo(out):
            return
        tx = self.tx
        if tx is None:
            out.append(R.NEED_MAIL.wire)
            self._error(out)
            return
        if arg[:3].upper() != "TO:":
            out.append(R.SYNTAX.wire)
            self._error(out)
            return
        inner = arg[3:].lstrip(" ")
        # RFC 5321 §4.5.1: "<Postmaster>" with no domain (case-insensitive) MUST be accepted, from
        # any client: it goes to the Postmaster_Address the conf names.
        postmaster = inner[:12].lower() == "<postmaster>"
        try:
            if postmaster:
                path, rest = self.srv.s.postmaster, inner[12:]
            else:
                path, rest = parse_path(arg[3:], R.BAD_RCPT_SYNTAX, allow_null=False)
            params = parse_params(rest, R.BAD_RCPT_SYNTAX)
        except AddressError as e:
            # Case 21: an unqualified <u> from a client that may not relay is a relay attempt.
            inner = arg[3:].strip()
            unqualified = len(inner) > 2 and inner[0] == "<" and inner[-1] == ">" and "@" not in inner
            out.append(R.RELAY_DENIED.wire if unqualified and not self.trusted else e.reply.wire)
            self._error(out)
            return
        reply = check_rcpt_params(params, tx.smtputf8) if params else None
        if reply is not None:
            out.append(reply.wire)
            self._error(out)
            return
        if not self.trusted and not postmaster and not self._may_receive_for(path):
            out.append(R.RELAY_DENIED.wire)  # case 21
            self._error(out)
            return
        if path.utf8 and not tx.smtputf8:
            out.append(R.UTF8_NEEDS_SMTPUTF8.wire)
            self._error(out)
            return
        if len(tx.rcpts) >= self.srv.s.max_recipients:
            out.append(R.TOO_MANY_RECIPIENTS.wire)  # case 12: keep the ones accepted
            return
        dom = path.domain.lower().rstrip(".")
        if tx.size and dom not in tx.domains and not self.srv.intake.space_ok(tx.size * (len(tx.domains) + 1)):
            # One spool copy per destination domain (_envelopes): a new domain is one more SIZE.
            out.append(R.SPOOL_LOW_SPACE.wire)  # 452 4.3.1: the others stay accepted
            return
        tx.domains.add(dom)
        tx.rcpts.append((path, rest.strip()))
        self.state = S_RCPT
        out.append(R.RCPT_OK.wire)

    def _may_receive_for(self, path: Path) -> bool:
        """Mail from a client outside relay_hosts: only to relay_domains, and no routing tricks
        (docs/reliability.md case 21: Postfix reject_unauth_destination, allow_untrusted_routing=no)."""
        if path.literal:
            return False
        if path.domain.lower().rstrip(".") not in self.srv.s.relay_domains:
            return False
        local = path.local
        if "%" in local or "!" in local or (path.quoted and "@" in local):
            return False
        return True

    def smtp_DATA(self, arg: str, out: list[bytes]) -> None:
        if self._need_helo(out):
            return
        tx = self.tx
        if tx is not None and tx.bdat:
            out.append(R.DATA_AFTER_BDAT.wire)  # case 29
            self._error(out)
            return
        if tx is None or not tx.rcpts:
            out.append(R.NEED_MAIL.wire if tx is None else R.NEED_RCPT.wire)
            self._error(out)
            return
        if arg:
            out.append(R.SYNTAX.wire)
            self._error(out)
            return
        # RFC 2920 §3.1: DATA ends a pipelined group. Content before our 354 is a client that
        # does not wait: smuggling-prone, refuse and close (docs/reliability.md case 4).
        if self.framer.pending():
            out.append(R.PIPELINING_VIOLATION.wire)
            self.state = S_CLOSING
            return
        self.state = S_DATA
        self.data_started = time.monotonic()
        self.framer.begin_data()
        out.append(R.START_DATA.wire)

    def smtp_BDAT(self, arg: str, out: list[bytes]) -> None:
        # RFC 3030. Whatever we answer, a well-formed BDAT's chunk must be consumed.
        # RFC 3030 §2: "BDAT" SP chunk-size [ SP end-marker ]: split on SP only (str.split() would
        # also split on \x1c-\x1f, NBSP and other Unicode spaces).
        parts = [p for p in arg.split(" ") if p]
        if not self.esmtp:
            out.append(R.BDAT_NOT_OFFERED.wire)  # case 29: what follows is raw content
            self.state = S_CLOSING
            return
        size = smtp_number(parts[0], 18) if parts else None
        if size is None or len(parts) > 2 or (len(parts) == 2 and parts[1].upper() != "LAST"):
            out.append(R.BDAT_BAD_COUNT.wire)
            self.state = S_CLOSING
            return
        last = len(parts) == 2
        if size == 0 and not last:
            out.append(R.BDAT_ZERO_NOT_LAST.wire)
            self._error(out)
            return
        tx = self.tx
        self.framer.begin_bdat(size, last)
        self.state = S_DATA
        self.data_started = time.monotonic()
        if tx is None or not tx.rcpts:
            # Consume the chunk, then answer 503 (RFC 3030 §3: the server must read it).
            self._bdat_orphan = True
        else:
            tx.bdat = True
            self._bdat_orphan = False

    _bdat_orphan = False
    _tls_task: asyncio.Future | None = None

    def _bdat_chunk_done(self, nbytes: int, out: list[bytes]) -> None:
        tx = self.tx
        if self._bdat_orphan or tx is None:
            self._bdat_orphan = False
            self.framer.reset()
            self.state = S_READY if tx is None else S_MAIL
            out.append((R.NEED_MAIL if tx is None else R.NEED_RCPT).wire)
            self._error(out)
            return
        self.state = S_RCPT
        if self.framer.flags & F_TOO_BIG:
            tx.bdat_failed = True
            out.append(R.SIZE_EXCEEDED.wire)
            return
        out.append(R.BDAT_CHUNK_OK.with_text(f"{nbytes} octets received"))

    def smtp_RSET(self, arg: str, out: list[bytes]) -> None:
        self.tx = None
        self.framer.reset()
        if self.state != S_NEED_HELO:
            self.state = S_READY
        out.append(R.RESET_OK.wire)

    def smtp_NOOP(self, arg: str, out: list[bytes]) -> None:
        out.append(R.NOOP_OK.wire)

    def smtp_VRFY(self, arg: str, out: list[bytes]) -> None:
        out.append(R.VRFY_CANNOT.wire)

    def smtp_HELP(self, arg: str, out: list[bytes]) -> None:
        out.append(R.HELP.wire)

    def smtp_AUTH(self, arg: str, out: list[bytes]) -> None:
        a = self.srv.s.auth
        if a is None or not self._auth_offered():
            # docs/reliability.md case 30: never invite credentials in plaintext.
            out.append(R.AUTH_NEEDS_TLS.wire if not self.tls else R.AUTH_NOT_AVAILABLE.wire)
            self._error(out)
            return
        if self._need_helo(out):
            return
        if not self.esmtp:
            out.append(R.AUTH_NEEDS_EHLO.wire)  # AUTH is an EHLO extension (RFC 4954 §3)
            self._error(out)
            return
        if self.auth_user is not None:
            out.append(R.AUTH_ALREADY.wire)  # RFC 4954 §4: once per session
            self._error(out)
            return
        if self.tx is not None:
            out.append(R.AUTH_IN_TRANSACTION.wire)  # RFC 4954 §4: not during a mail transaction
            self._error(out)
            return
        parts = arg.split(" ")
        mech = parts[0].upper()
        if not mech or len(parts) > 2:
            out.append(R.SYNTAX.wire)
            self._error(out)
            return
        if mech not in a.files:
            out.append(R.AUTH_UNKNOWN_MECHANISM.wire)
            self._error(out)
            return
        if self.srv.auth_guard.locked(self.peer_ip):
            log.warning("AUTH from %s refused: locked out after too many failures", self.peer_ip)
            out.append(R.AUTH_LOCKED_OUT.wire)
            self._error(out)
            return
        initial = parts[1] if len(parts) == 2 else None
        if mech == "PLAIN":
            if initial is None:
                self._sasl = ("PLAIN",)
                out.append(R.AUTH_CONTINUE.wire)  # "334 " (RFC 4954 §4: an empty challenge)
            else:
                self._sasl_step(("PLAIN",), initial, out)
        elif initial is None:  # LOGIN: user, then password, each asked for with a 334
            self._sasl = ("LOGIN",)
            out.append(R.AUTH_LOGIN_USERNAME.wire)
        else:
            self._sasl_step(("LOGIN",), initial, out)  # the user name as an initial response

    def _auth_offered(self) -> bool:
        a = self.srv.s.auth
        if a is None:
            return False
        if self.tls:
            return True
        return a.plaintext_loopback and self.ip is not None and self.ip.is_loopback

    def _sasl_line(self, line: bytes, out: list[bytes]) -> None:
        step, self._sasl = self._sasl, None
        try:
            text = line.decode("ascii").strip()
        except UnicodeDecodeError:
            text = "\x00"  # not base64: answered as such below
        if text == "*":
            out.append(R.AUTH_CANCELLED.wire)  # RFC 4954 §4
            self._error(out)
            return
        self._sasl_step(step, text, out)

    def _sasl_step(self, step: tuple, text: str, out: list[bytes]) -> None:
        """One client response of an AUTH exchange. Nothing of it is logged (issue 17)."""
        try:
            data = A.decode_b64(text)
        except A.SaslError:
            out.append(R.AUTH_BAD_BASE64.wire)
            self._error(out)
            return
        mech = step[0]
        if mech == "LOGIN" and len(step) == 1:
            try:
                user = data.decode("utf-8")
            except UnicodeDecodeError:
                user = ""
            self._sasl = ("LOGIN", user)
            out.append(R.AUTH_LOGIN_PASSWORD.wire)
            return
        if mech == "LOGIN":
            user = step[1]
            try:
                password = data.decode("utf-8")
            except UnicodeDecodeError:
                user = ""
                password = ""
        else:
            try:
                user, password = A.parse_plain(data)
            except ValueError:
                user, password = "", ""
        self._verify(mech, user, password)

    def _verify(self, mech: str, user: str, password: str) -> None:
        """Check the password off the event loop (scrypt takes tens of milliseconds); input waits."""
        pwfile = self.srv.s.auth.files[mech]
        self.busy = True
        if not A.valid_username(user):
            fut: asyncio.Future = asyncio.get_running_loop().create_future()
            fut.set_result(False)
        else:
            fut = asyncio.ensure_future(asyncio.to_thread(pwfile.verify, user, password))
        del password
        fut.add_done_callback(lambda f: self._verified(f, mech, user))

    def _verified(self, fut: asyncio.Future, mech: str, user: str) -> None:
        if self.state == S_CLOSING or self.transport is None or self.transport.is_closing():
            return
        exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        if exc is not None:
            log.warning("AUTH %s from %s: cannot check the password: %s", mech, self.peer_ip, exc)
            self._auth_reply(R.AUTH_TEMP_FAILURE.wire)
            return
        if fut.result():
            self.auth_user = user
            self.trusted = True  # Postfix permit_sasl_authenticated: may relay from any address
            self.srv.auth_guard.succeeded(self.peer_ip)
            log.info("AUTH %s from %s: authenticated as %s", mech, self.peer_ip, _clean(user, 64))
            self._auth_reply(R.AUTH_OK.wire)
            return
        # The user name is not logged either: a password typed into the user field is common.
        delay = self.srv.auth_guard.failed(self.peer_ip)
        log.warning("AUTH %s from %s failed", mech, self.peer_ip)
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._auth_reply, R.AUTH_FAILED.wire)
        else:
            self._auth_reply(R.AUTH_FAILED.wire)

    def _auth_reply(self, wire: bytes) -> None:
        self.busy = False
        if self.state == S_CLOSING or self.transport is None or self.transport.is_closing():
            return
        self.transport.write(wire)
        self._process()

    def smtp_EXPN(self, arg: str, out: list[bytes]) -> None:
        out.append(R.NOT_IMPLEMENTED.wire)

    def smtp_QUIT(self, arg: str, out: list[bytes]) -> None:
        out.append(R.BYE.wire)
        self.said_bye = True
        self.state = S_CLOSING

    def smtp_STARTTLS(self, arg: str, out: list[bytes]) -> None:
        if self._need_helo(out):
            return
        if arg:
            out.append(R.TLS_NO_PARAMS.wire)
            self._error(out)
            return
        if self.tls:
            out.append(R.TLS_ALREADY.wire)  # case 6: a second STARTTLS
            self._error(out)
            return
        if self.srv.s.tls is None or not self.esmtp:
            out.append(R.TLS_NOT_AVAILABLE.wire)
            return
        # Case 6 (CVE-2011-0411): drop any plaintext sent after STARTTLS, and read nothing more
        # in plaintext: start_tls takes the transport over from here.
        self.framer.discard_pending()
        out.append(R.READY_TLS.wire)
        self.transport.write(b"".join(out))
        out.clear()
        self.transport.pause_reading()
        self.busy = True
        self._tls_task = asyncio.ensure_future(self._starttls())

    async def _starttls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            tr = await loop.start_tls(
                self.transport, self, self.srv.s.tls, server_side=True,
                ssl_handshake_timeout=limits.TLS_HANDSHAKE_TIMEOUT,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as e:
            log.info("TLS handshake with %s failed: %s", self.peer_ip, e)
            self._close()
            return
        if tr is None:
            self._close()
            return
        self.transport = tr  # type: ignore[assignment]
        # RFC 3207 §4.2: forget everything learned before TLS; the client must EHLO again.
        self.tls = True
        self.tx = None
        if self.auth_user is not None:  # authenticated in plaintext (auth_plaintext_loopback)
            self.auth_user = None
            self.trusted = self.srv.client_policy(self.peer_ip)[1]
        self._sasl = None
        self.helo = ""
        self.esmtp = False
        # No discard_pending() here: the plaintext after STARTTLS was dropped before the handshake
        # (smtp_STARTTLS), and reading stayed paused until start_tls took the socket over. What the
        # framer holds now came through TLS: a client may send its EHLO as soon as its side of the
        # handshake is done, and the SSL protocol delivers it (we are busy, so it is buffered)
        # before this coroutine resumes. Python 3.12's wait_for, which no longer wraps the client's
        # start_tls in a task, made that early EHLO usual; dropping it hung the session.
        self.framer.reset()
        self.state = S_NEED_HELO
        self.busy = False
        self.last_input = time.monotonic()
        self._process()

    # --- end of message ---------------------------------------------------------------------
    def _end_of_data(self, body: bytes, flags: int, out: list[bytes]) -> None:
        tx = self.tx
        if tx is None or self._bdat_orphan:
            self._bdat_chunk_done(0, out)
            return
        self.tx = None
        self.state = S_READY
        self.messages += 1
        reply = None
        if flags & F_TOO_BIG or tx.bdat_failed:
            reply = R.SIZE_EXCEEDED  # case 11: read to the end, then 552
        elif flags & F_NUL and not self.srv.s.allow_nul:
            reply = R.NUL_IN_DATA  # case 25, issue 9: <CR><LF><NUL>.<CR><LF> smuggling
        elif flags & (F_BARE_LF | F_BARE_CR):
            if self.normalize:
                body = _normalize_line_ends(body)
            else:
                reply = R.BARE_LF_DATA  # case 2
        if reply is None and flags & F_LONG_LINE:
            reply = R.LONG_LINE_DATA  # case 10: never truncate silently
        if reply is None and _count_received(body) > self.srv.s.hop_limit:
            reply = R.TOO_MANY_HOPS  # case 16
        if reply is not None:
            self.srv.stats["rejected"] += 1
            out.append(reply.wire)
            return
        items = self._envelopes(tx, body)
        self.busy = True
        fut = asyncio.ensure_future(self.srv.intake.submit(items))
        fut.add_done_callback(lambda f, items=items, size=len(body): self._committed(f, items, size))

    def _committed(self, fut: asyncio.Future, items: list, size: int) -> None:
        self.busy = False
        if self.state == S_CLOSING or self.transport is None or self.transport.is_closing():
            # Committed but the client is gone before reading 250: the message is ours; a
            # resend is the accepted duplicate (docs/reliability.md case 31).
            return
        exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        if exc is not None:
            log.warning("message from %s not queued: %s", self.peer_ip, exc)
            self.transport.write(R.SPOOL_FAILED.wire)  # P1: never a 250 for mail not on disk
        else:
            env: Envelope = items[0][0]
            self.srv.stats["messages"] += 1
            self.transport.write(R.QUEUED.with_text(f"OK queued as {env.msgid}"))
        self._process()

    def _envelopes(self, tx: _Tx, body: bytes) -> list[tuple[Envelope, bytes]]:
        """One spool entry per destination domain (as Momentum splits), all committed together."""
        msgid = new_msgid()
        now = time.time()
        proto = ("ESMTPS" if self.tls else "ESMTP") if self.esmtp else ("SMTPS" if self.tls else "SMTP")
        if self.auth_user is not None:
            proto += "A"  # RFC 3848: ESMTPA, ESMTPSA
        first = tx.rcpts[0][0].address if len(tx.rcpts) == 1 else None
        received = (
            f"Received: from {self.helo} ([{self.peer_ip}])\r\n"
            f"\tby {self.srv.s.hostname} (fastrelay) with {proto} id {msgid}"
            + (f"\r\n\tfor <{first}>" if first else "")
            + f"; {_dates.now()}\r\n"
        ).encode("utf-8", "replace")
        binding = self.srv.binding
        if self.srv.binder is not None:
            # Issue #10: Binding/Binding_Group of this listener, or Binding_Header from a client in
            # relay_hosts; the header never goes further.
            binding, body = self.srv.binder.assign(body, self.trusted, tx.sender.address)
        full = received + body
        if self.auth_user is not None:
            binding = self.srv.s.auth_bindings.get(self.auth_user, binding)  # issue 17: by user
        by_domain: dict[str, list[Recipient]] = {}
        for path, params in tx.rcpts:
            dom = path.domain.lower().rstrip(".")
            by_domain.setdefault(dom, []).append(Recipient(path.address, params))
        items = []
        for dom, rcpts in by_domain.items():
            env = Envelope(
                sender=tx.sender.address,
                recipients=rcpts,
                domain=dom,
                mail_params=tx.mail_params,
                client_ip=self.peer_ip,
                helo=self.helo,
                protocol=proto.lower(),
                binding=binding,
                msgid=msgid,
                received_at=now,
                first_queued=now,
                next_attempt=now,
                meta={"auth_user": self.auth_user} if self.auth_user is not None else {},
            )
            items.append((env, full))
        return items


def smtp_number(text: str | None, max_digits: int) -> int | None:
    """An SMTP number: 1 to max_digits ASCII digits, else None. RFC 3030 §2 (chunk-size) and RFC 1870
    §3 (size-value) say DIGIT, which is ASCII 0-9 (RFC 5234 B.1); str.isdigit() also takes "²" (that
    int() refuses) and fullwidth U+FF15 "5" (that int() takes), so neither may decide alone."""
    if not text or len(text) > max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def _normalize_line_ends(body: bytes) -> bytes:
    # Postfix's normalize mode: every bare CR or LF becomes CRLF (docs/reliability.md case 2). The
    # outbound side dot-stuffs again, so a resulting lone "." line cannot end the next hop's DATA.
    return body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _count_received(body: bytes) -> int:
    """Received: headers in the header section (header names are case-insensitive)."""
    end = body.find(b"\r\n\r\n")
    head = (body if end < 0 else body[: end + 2]).lower()
    return head.count(b"\nreceived:") + (1 if head.startswith(b"received:") else 0)


_HANDLERS: dict[bytes, Callable[[Session, str, list[bytes]], None]] = {
    name[5:].encode(): getattr(Session, name) for name in dir(Session) if name.startswith("smtp_")
}
