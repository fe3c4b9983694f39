"""SMTP and LMTP sinks on aiosmtpd that record every accepted message and misbehave on cue.

Faults come two ways.

By recipient local part (as KumoMTA's test sink), case-insensitive:

=====================  =============================================================
``tempfail@``          450 at RCPT
``permfail@``          550 at RCPT
``NNN-anything@``      reply NNN at RCPT (``450-x``, ``421-x`` (then close), ``552-x`` …)
``slow@``              accepted at RCPT after ``faults.slow_delay`` s; ``slow-MS@`` waits MS ms
``drop-in-data@``      354 to DATA, then close once the first body line arrives, no reply
``data-tempfail@``     SMTP: 451 after the final dot; LMTP: 452 for this recipient
``data-permfail@``     SMTP: 554 after the final dot; LMTP: 550 for this recipient
``data-NNN-anything@`` reply NNN after the final dot (LMTP: for this recipient only)
``data-slow@``         the reply after the dot waits ``faults.slow_delay`` s
=====================  =============================================================

By phase, through ``sink.faults``, changeable at any time (also from another thread):
``sink.faults.set(phase, reply=..., delay=..., drop=..., reset=..., hostile=..., times=...)``.
Phases: ``greeting ehlo starttls mail rcpt data body dot rset quit`` (``ehlo`` covers
HELO and LHLO; ``data`` is the reply to the DATA command; ``body`` acts once the first body
line arrived (``delay`` there: stop reading the body for a while); ``dot`` is after the final
dot). ``reply`` replaces the normal reply (a 421 closes the connection after it; a non-2xx
greeting leaves the session answering 503 to all but QUIT, as RFC 5321 §3.1 says); ``drop``
closes without replying, ``reset`` sends a TCP RST; ``hostile`` is one of ``long_line`` (a
reply line of ``faults.long_line_len`` bytes), ``endless`` (``NNN-`` continuation lines until
the client leaves or ``faults.endless_cap`` bytes), ``garbage`` (a line with no reply code),
``unsolicited`` (the normal reply, then an extra reply line nobody asked for). ``times=n``
makes the fault fire n times, then vanish. ``faults.hide`` holds EHLO keywords not to offer
("STARTTLS", "8BITMIME", "SMTPUTF8", "PIPELINING", "SIZE"); hidden ones are also refused when
used (STARTTLS: 454, BODY=8BITMIME: 555, SMTPUTF8: 501). LMTP: ``faults.lmtp_drop_after = k``
sends the first k per-recipient replies after the dot, then closes.

The ledger (``sink.messages``) holds each accepted message; it is written (and, with
``ledger_path``, appended to a JSON-lines file and fsynced) before the 250 is sent, so every
250 the relay saw is in it. ``Message.data`` is the content with dot-stuffing undone and line
ends as sent; the null sender is recorded as ``"<>"``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import os
import re
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

from .loopthread import InThread

__all__ = [
    "HIDEABLE",
    "HOSTILE",
    "PHASES",
    "Faults",
    "Message",
    "PhaseFault",
    "SessionInfo",
    "Sink",
    "ThreadedSink",
    "read_ledger",
]

PHASES = ("greeting", "ehlo", "starttls", "mail", "rcpt", "data", "body", "dot", "rset", "quit")
HOSTILE = ("long_line", "endless", "garbage", "unsolicited")
HIDEABLE = ("STARTTLS", "8BITMIME", "SMTPUTF8", "PIPELINING", "SIZE")
# The code a hostile reply pretends to have in each phase.
_NORMAL_CODE = {"greeting": "220", "ehlo": "250", "starttls": "220", "mail": "250", "rcpt": "250",
                "data": "354", "body": "250", "dot": "250", "rset": "250", "quit": "221"}
# push("") sends nothing: hooks return it when the fault already answered (or chose silence).
_SILENT = ""
_CODE_CUE = re.compile(r"^([245]\d\d)-")
_DATA_CODE_CUE = re.compile(r"^data-([245]\d\d)-")
_SLOW_CUE = re.compile(r"^slow-(\d+)$")
_TEST_ID = re.compile(rb"(?im)^x-test-id:[ \t]*([^\r\n]*)")
_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")


@dataclass
class PhaseFault:
    reply: str | None = None
    delay: float = 0.0
    drop: bool = False
    reset: bool = False
    hostile: str | None = None
    times: int | None = None  # None: every time


@dataclass
class Faults:
    """What the sink does wrong; tests change it at any time."""

    phases: dict[str, PhaseFault] = field(default_factory=dict)
    hide: set[str] = field(default_factory=set)
    lmtp_drop_after: int | None = None
    slow_delay: float = 1.0
    long_line_len: int = 100_000
    endless_cap: int = 64 * 1024 * 1024

    def set(
        self,
        phase: str,
        *,
        reply: str | None = None,
        delay: float = 0.0,
        drop: bool = False,
        reset: bool = False,
        hostile: str | None = None,
        times: int | None = None,
    ) -> PhaseFault:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")
        if hostile is not None and hostile not in HOSTILE:
            raise ValueError(f"unknown hostile reply {hostile!r}; one of {HOSTILE}")
        f = PhaseFault(reply=reply, delay=delay, drop=drop, reset=reset, hostile=hostile, times=times)
        self.phases[phase] = f
        return f

    def unset(self, phase: str) -> None:
        self.phases.pop(phase, None)

    def take(self, phase: str) -> PhaseFault | None:
        """The fault for ``phase``, counting one use of it."""
        f = self.phases.get(phase)
        if f is None:
            return None
        if f.times is not None:
            f.times -= 1
            if f.times <= 0:
                self.phases.pop(phase, None)
            if f.times < 0:
                return None
        return f

    def clear(self) -> None:
        self.phases.clear()
        self.hide.clear()
        self.lmtp_drop_after = None


@dataclass
class Message:
    """One message the sink accepted (or, in ``sink.rejected``, refused after the dot)."""

    mail_from: str
    rcpt_tos: list[str]  # recipients accepted at RCPT, in order
    data: bytes
    sha256: str
    test_id: str | None
    session: int  # index into sink.sessions
    peer: Any
    ehlo: str | None
    tls: bool
    mail_options: list[str]
    delivered: list[str]  # recipients answered 2xx after the dot (SMTP: all, if accepted)
    replies: list[str]  # the reply line(s) after the dot, one per recipient for LMTP
    queue_id: str
    received_at: float
    xclient: dict[str, str] | None = None  # the XCLIENT attributes in effect (xclient=True sinks)

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class SessionInfo:
    index: int
    peer: Any
    opened_at: float
    closed_at: float | None = None
    ehlo: str | None = None
    tls: bool = False
    messages: int = 0  # accepted messages: >1 means the connection was reused
    xclient: dict[str, str] | None = None  # the last XCLIENT's attributes, decoded
    commands: list[str] = field(default_factory=list)  # every recognised command line, in order


def _local_part(address: str) -> str:
    return address.rpartition("@")[0].strip('"').lower()


def _test_id(data: bytes) -> str | None:
    m = _END_OF_HEADERS.search(data)
    head = data[: m.start()] if m else data
    t = _TEST_ID.search(head)
    return t.group(1).strip().decode("utf-8", "replace") if t else None


def _rcpt_cue(lp: str) -> str | None:
    """The RCPT reply a local part asks for, or None to accept."""
    if lp == "tempfail":
        return "450 4.2.0 sink: tempfail"
    if lp == "permfail":
        return "550 5.1.1 sink: permfail"
    m = _CODE_CUE.match(lp)
    if m:
        code = m.group(1)
        return f"{code} {code[0]}.0.0 sink: {lp}"
    return None


def _dot_cue(lp: str, lmtp: bool) -> str | None:
    """The after-dot reply a local part asks for, or None for success."""
    if lp == "data-tempfail":
        return "452 4.2.2 sink: data-tempfail" if lmtp else "451 4.3.0 sink: data-tempfail"
    if lp == "data-permfail":
        return "550 5.1.1 sink: data-permfail" if lmtp else "554 5.6.0 sink: data-permfail"
    m = _DATA_CODE_CUE.match(lp)
    if m:
        code = m.group(1)
        return f"{code} {code[0]}.0.0 sink: {lp}"
    return None


class _SinkProtocol:
    """Mixed in front of aiosmtpd's SMTP/LMTP: session accounting, drops, hostile replies."""

    def __init__(self, sink: Sink, handler: _Handler, **kwargs: Any) -> None:
        self.sink = sink
        # Instance override of the class limit; aiosmtpd sizes its StreamReader from it.
        self.line_length_limit = sink.max_line_length
        super().__init__(handler, **kwargs)  # type: ignore[call-arg]
        self.info: SessionInfo | None = None
        self._dropped = False
        self._unsolicited = False
        self._after_354_delay = 0.0
        self._smtp_methods = {verb: self._logged(verb, m) for verb, m in self._smtp_methods.items()}

    def _logged(self, verb: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        async def wrapper(arg: str | None) -> None:
            if self.info is not None:
                self.info.commands.append(verb if arg is None else f"{verb} {arg}")
            await method(arg)

        return wrapper

    # -- connection accounting ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if self.info is None:
            self.info = self.sink._session_opened(self, transport.get_extra_info("peername"))
        else:
            # Called again by the TLS layer after STARTTLS: same session, now encrypted.
            self.info.tls = True

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)  # type: ignore[misc]
        finally:
            if self.info is not None and self.info.closed_at is None:
                self.sink._session_closed(self)

    # -- output --------------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        if self._dropped or not status:
            return
        await super().push(status)  # type: ignore[misc]
        text = status if isinstance(status, str) else status.decode("latin-1")
        last = text.rsplit("\r\n", 1)[-1]
        final = len(last) == 3 or (len(last) > 3 and last[3] == " ")
        if final and self._unsolicited:
            self._unsolicited = False
            await super().push("250 2.0.0 sink: an unsolicited reply")  # type: ignore[misc]
        if last.startswith("354") and self._after_354_delay:
            delay, self._after_354_delay = self._after_354_delay, 0.0
            await asyncio.sleep(delay)
        if final and last.startswith("421"):
            self.drop()  # a server closes the channel after 421 (RFC 5321 §3.8)

    def drop(self, reset: bool = False) -> None:
        """Close the connection without another word; ``reset`` sends an RST (SO_LINGER 0)."""
        self._dropped = True
        transport = self.transport  # type: ignore[attr-defined]
        if transport is None:
            return
        if reset:
            raw = self._original_transport or transport  # type: ignore[attr-defined]
            sock = raw.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.abort()
        else:
            transport.close()

    async def fault(self, phase: str) -> str | None:
        """Apply the phase fault. Returns None to carry on normally, or what to reply instead
        (``_SILENT``: nothing, the fault has answered or dropped)."""
        f = self.sink.faults.take(phase)
        if f is None:
            return None
        if f.delay:
            await asyncio.sleep(f.delay)
        if f.reset or f.drop:
            self.drop(reset=f.reset)
            return _SILENT
        if f.hostile == "unsolicited":
            self._unsolicited = True
            return f.reply
        if f.hostile:
            await self.hostile(f.hostile, phase)
            return _SILENT
        return f.reply

    async def hostile(self, kind: str, phase: str) -> None:
        code = _NORMAL_CODE[phase]
        push = super().push  # type: ignore[misc]
        try:
            if kind == "long_line":
                await push(f"{code} " + "x" * self.sink.faults.long_line_len)
            elif kind == "garbage":
                await push("this line has no reply code")
            elif kind == "endless":
                chunk = ((f"{code}-" + "x" * 70 + "\r\n") * 64).encode()
                sent = 0
                while sent < self.sink.faults.endless_cap and not self._dropped:
                    transport = self.transport  # type: ignore[attr-defined]
                    if transport is None or transport.is_closing():
                        break
                    self._writer.write(chunk)  # type: ignore[attr-defined]
                    await self._writer.drain()  # type: ignore[attr-defined]
                    sent += len(chunk)
                self.drop()
        except ConnectionError:
            self.drop()

    # -- phases aiosmtpd has no hook for -------------------------------------------------------

    async def _handle_client(self) -> None:
        try:
            reply = await self.fault("greeting")
            if reply is None:
                await super()._handle_client()  # type: ignore[misc]
                return
            await self.push(reply)
            await self._refuse_session()
        except asyncio.CancelledError:
            # aiosmtpd cancels this task on EOF and leaves the transport half-open for the task
            # to close; its own loop does that, ours must too.
            self.drop()
            raise

    async def _refuse_session(self) -> None:
        """After a refusing greeting: 503 to everything but QUIT (bounded), until the client goes."""
        reader: asyncio.StreamReader = self._reader  # type: ignore[attr-defined]
        for _ in range(100):
            if self._dropped:
                return
            try:
                line = await reader.readuntil(b"\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                break
            if line.strip().upper() == b"QUIT":
                await self.push("221 2.0.0 Bye")
                break
            await self.push("503 5.5.1 Error: no valid greeting")
        self.drop()

    async def smtp_XCLIENT(self, arg: str) -> None:
        """Postfix's XCLIENT (XCLIENT_README), offered when the sink has xclient=True: the
        attributes are xtext-decoded and kept; the reply is a 220 greeting, after which the
        client must say EHLO again. `xclient_reply` (a full reply line) refuses it instead."""
        from fastrelay.delivery.xclient import unxtext

        sink = self.sink
        if not sink.xclient:
            await self.push("502 5.5.2 Error: command not recognized")
            return
        if sink.xclient_reply is not None:
            await self.push(sink.xclient_reply)
            return
        if self.envelope.mail_from:  # type: ignore[attr-defined]
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        attrs = {}
        for part in (arg or "").split():
            name, eq, value = part.partition("=")
            if not eq:
                await self.push("501 5.5.4 Syntax: XCLIENT attribute=value...")
                return
            attrs[name.upper()] = unxtext(value)
        self.info.xclient = attrs
        self.session.host_name = None  # type: ignore[attr-defined]  # EHLO is due again
        self.envelope = self._create_envelope()  # type: ignore[attr-defined]
        await self.push(f"220 {self.hostname} ESMTP sink")  # type: ignore[attr-defined]

    async def smtp_STARTTLS(self, arg: str) -> None:
        if "STARTTLS" in self.sink.faults.hide or not self.tls_context:  # type: ignore[attr-defined]
            await self.push("454 4.7.0 TLS not available")
            return
        reply = await self.fault("starttls")
        if reply is not None:
            await self.push(reply)
            return
        await super().smtp_STARTTLS(arg)  # type: ignore[misc]

    async def smtp_DATA(self, arg: str) -> None:
        session, envelope = self.session, self.envelope  # type: ignore[attr-defined]
        if arg or not session.host_name or not envelope.rcpt_tos or not envelope.mail_from:
            await super().smtp_DATA(arg)  # type: ignore[misc]
            return
        reply = await self.fault("data")
        if reply is not None:
            await self.push(reply)
            return
        if any(_local_part(r) == "drop-in-data" for r in envelope.rcpt_tos):
            body = PhaseFault(drop=True)
        else:
            body = self.sink.faults.take("body")
        if body is not None and not (body.drop or body.reset or body.reply or body.hostile):
            # Delay only: a server that stops reading the body for a while.
            self._after_354_delay = body.delay
            body = None
        if body is None:
            await super().smtp_DATA(arg)  # type: ignore[misc]
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            # Act once the client is sending the body, so the fault is really "during DATA".
            await asyncio.wait_for(self._reader.readuntil(b"\n"), 10)  # type: ignore[attr-defined]
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        self.sink.dropped_in_data += 1
        if body.delay:
            await asyncio.sleep(body.delay)
        if body.hostile:
            await self.hostile(body.hostile, "body")
        elif body.reply:
            await self.push(body.reply)
        self.drop(reset=body.reset)


class _FaultySMTP(_SinkProtocol, SMTP):
    pass


class _FaultyLMTP(_SinkProtocol, LMTP):
    pass


class _Handler:
    """aiosmtpd hooks: the phases aiosmtpd calls out for, and the ledger."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would log a traceback for each; a sink only needs to answer.
        return f"500 5.0.0 sink error: {type(error).__name__}"

    async def handle_HELO(self, server: _SinkProtocol, session: Any, envelope: Any, hostname: str) -> str:
        reply = await server.fault("ehlo")
        if reply is not None:
            return reply
        session.host_name = hostname
        server.info.ehlo = hostname
        return f"250 {server.hostname}"  # type: ignore[attr-defined]

    async def handle_EHLO(
        self, server: _SinkProtocol, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        reply = await server.fault("ehlo")
        if reply is not None:
            return [reply] if reply else []
        session.host_name = hostname
        server.info.ehlo = hostname
        hide = self.sink.faults.hide
        # Build the keyword list here, not from aiosmtpd's: it omits PIPELINING (which it
        # handles) and cannot hide what it offers.
        server.enable_SMTPUTF8 = self.sink.smtputf8 and "SMTPUTF8" not in hide  # type: ignore[attr-defined]
        keywords = []
        if server.data_size_limit:  # type: ignore[attr-defined]
            keywords.append(f"SIZE {server.data_size_limit}")  # type: ignore[attr-defined]
        keywords += ["8BITMIME", "PIPELINING"]
        if server.enable_SMTPUTF8:  # type: ignore[attr-defined]
            keywords.append("SMTPUTF8")
        if server.tls_context and not server._tls_protocol:  # type: ignore[attr-defined]
            keywords.append("STARTTLS")
        if self.sink.xclient:
            keywords.append("XCLIENT NAME ADDR PROTO HELO LOGIN")
        keywords = [k for k in keywords if k.split()[0] not in hide]
        keywords.append("HELP")
        lines = [f"250-{server.hostname}"] + [f"250-{k}" for k in keywords]  # type: ignore[attr-defined]
        lines[-1] = "250 " + lines[-1][4:]
        return lines

    async def handle_MAIL(
        self, server: _SinkProtocol, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        reply = await server.fault("mail")
        if reply is not None:
            return reply
        if "8BITMIME" in self.sink.faults.hide and "BODY=8BITMIME" in mail_options:
            return "555 5.5.4 sink: BODY=8BITMIME not supported"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: _SinkProtocol, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        reply = await server.fault("rcpt")
        if reply is not None:
            return reply
        lp = _local_part(address)
        if lp == "slow":
            await asyncio.sleep(self.sink.faults.slow_delay)
        elif m := _SLOW_CUE.match(lp):
            await asyncio.sleep(int(m.group(1)) / 1000)
        cue = _rcpt_cue(lp)
        if cue is not None:
            return cue
        if self.sink.max_rcpts is not None and len(envelope.rcpt_tos) >= self.sink.max_rcpts:
            return "452 4.5.3 sink: too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: _SinkProtocol, session: Any, envelope: Any) -> str:
        reply = await server.fault("rset")
        return "250 2.0.0 Ok" if reply is None else reply

    async def handle_QUIT(self, server: _SinkProtocol, session: Any, envelope: Any) -> str:
        reply = await server.fault("quit")
        return "221 2.0.0 Bye" if reply is None else reply

    async def handle_DATA(self, server: _SinkProtocol, session: Any, envelope: Any) -> str:
        sink = self.sink
        rcpts = list(envelope.rcpt_tos)
        reply = await server.fault("dot")
        if any(_local_part(r) == "data-slow" for r in rcpts):
            await asyncio.sleep(sink.faults.slow_delay)
        if sink.lmtp:
            return await self._lmtp_replies(server, envelope, rcpts, reply)
        if reply is None:
            reply = next((c for r in rcpts if (c := _dot_cue(_local_part(r), False))), None)
        qid = sink._next_queue_id()
        if reply is None:
            reply = f"250 2.0.0 Ok: queued as {qid}"
        accepted = reply.startswith("2")
        msg = sink._record(server, envelope, rcpts if accepted else [], [reply] if reply else [], qid)
        sink._commit(msg, accepted)  # durable before the reply goes out
        return reply

    async def _lmtp_replies(
        self, server: _SinkProtocol, envelope: Any, rcpts: list[str], fault_reply: str | None
    ) -> str:
        sink = self.sink
        if fault_reply == _SILENT:
            msg = sink._record(server, envelope, [], [], sink._next_queue_id())
            sink._commit(msg, False)
            return _SILENT
        qid = sink._next_queue_id()
        replies = []
        for r in rcpts:
            cue = fault_reply or _dot_cue(_local_part(r), True)
            replies.append(cue or f"250 2.1.5 <{r}> delivered as {qid}")
        k = sink.faults.lmtp_drop_after
        sent = replies if k is None else replies[:k]
        # A 421 closes the connection (see push): the recipients after it get no reply.
        first_421 = next((i for i, rep in enumerate(sent) if rep.startswith("421")), None)
        if first_421 is not None:
            sent = sent[: first_421 + 1]
        delivered = [r for r, rep in zip(rcpts, sent, strict=False) if rep.startswith("2")]
        msg = sink._record(server, envelope, delivered, sent, qid)
        sink._commit(msg, bool(delivered))
        for rep in sent:
            # One write per reply, so clients see them arrive separately, as from a real LMTP server.
            await server.push(rep)
        if k is not None:
            server.drop()
        return _SILENT


class Sink:
    """An SMTP (or LMTP) server in the current event loop; see the module docstring."""

    def __init__(
        self,
        host: str = "127.0.0.2",
        port: int = 0,
        *,
        lmtp: bool = False,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        require_starttls: bool = False,
        hostname: str = "sink.test",
        ledger_path: str | os.PathLike[str] | None = None,
        ledger_data: bool = False,
        data_size_limit: int | None = 32 * 1024 * 1024,
        max_line_length: int = 1001,
        max_rcpts: int | None = None,
        smtputf8: bool = True,
        idle_timeout: float = 300.0,
        faults: Faults | None = None,
        xclient: bool = False,
        xclient_reply: str | None = None,
    ) -> None:
        self.host = host
        self.xclient = xclient  # offer XCLIENT (Postfix) and record its attributes
        self.xclient_reply = xclient_reply  # refuse XCLIENT with this reply instead
        self._port = port
        self.lmtp = lmtp
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.require_starttls = require_starttls
        self.hostname = hostname
        self.ledger_path = Path(ledger_path) if ledger_path is not None else None
        self.ledger_data = ledger_data
        self.data_size_limit = data_size_limit
        self.max_line_length = max_line_length
        self.max_rcpts = max_rcpts
        self.smtputf8 = smtputf8
        self.idle_timeout = idle_timeout
        self.faults = faults or Faults()
        self.messages: list[Message] = []
        self.rejected: list[Message] = []
        self.sessions: list[SessionInfo] = []
        self.current_sessions = 0
        self.peak_sessions = 0
        self.dropped_in_data = 0
        self._queue_seq = 0
        self._protocols: set[_SinkProtocol] = set()
        self._server: asyncio.base_events.Server | None = None
        self._ledger_fd: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> Sink:
        loop = asyncio.get_running_loop()
        if self.ledger_path is not None:
            self._ledger_fd = os.open(self.ledger_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            _fsync_dir(self.ledger_path.parent)
        self._server = await loop.create_server(
            self._make_protocol, self.host, self._port,
            ssl=self.tls_context if self.implicit_tls else None,
        )
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    def _make_protocol(self) -> _SinkProtocol:
        cls = _FaultyLMTP if self.lmtp else _FaultySMTP
        proto = cls(
            self,
            _Handler(self),
            hostname=self.hostname,
            ident="fastrelay-test-sink",
            tls_context=None if self.implicit_tls else self.tls_context,
            require_starttls=self.require_starttls,
            data_size_limit=self.data_size_limit,
            enable_SMTPUTF8=self.smtputf8,
            decode_data=False,
            timeout=self.idle_timeout,
            loop=asyncio.get_running_loop(),
        )
        self._protocols.add(proto)
        return proto

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for proto in list(self._protocols):
                # abort, not close: a close waits for a client that may never read (endless).
                proto._dropped = True
                if proto.transport is not None:
                    proto.transport.abort()
            await self._server.wait_closed()
            self._server = None
            # Let connection_lost callbacks run so the session counts settle.
            for _ in range(3):
                await asyncio.sleep(0)
        if self._ledger_fd is not None:
            os.close(self._ledger_fd)
            self._ledger_fd = None

    async def __aenter__(self) -> Sink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self._port)

    # -- accounting --------------------------------------------------------------------------------

    def _session_opened(self, proto: _SinkProtocol, peer: Any) -> SessionInfo:
        info = SessionInfo(index=len(self.sessions), peer=peer, opened_at=time.time(),
                           tls=self.implicit_tls)
        self.sessions.append(info)
        self.current_sessions += 1
        self.peak_sessions = max(self.peak_sessions, self.current_sessions)
        return info

    def _session_closed(self, proto: _SinkProtocol) -> None:
        proto.info.closed_at = time.time()
        self.current_sessions -= 1
        self._protocols.discard(proto)

    def _next_queue_id(self) -> str:
        self._queue_seq += 1
        return f"S{self._queue_seq:06d}"

    def _record(self, server: _SinkProtocol, envelope: Any, delivered: list[str], replies: list[str],
                qid: str) -> Message:
        data = bytes(envelope.original_content or b"")
        info = server.info
        return Message(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=data,
            sha256=hashlib.sha256(data).hexdigest(),
            test_id=_test_id(data),
            session=info.index,
            peer=info.peer,
            ehlo=server.session.host_name,  # type: ignore[attr-defined]
            tls=info.tls,
            mail_options=list(envelope.mail_options),
            delivered=delivered,
            replies=replies,
            queue_id=qid,
            received_at=time.time(),
            xclient=dict(info.xclient) if info.xclient is not None else None,
        )

    def _commit(self, msg: Message, accepted: bool) -> None:
        if not accepted:
            self.rejected.append(msg)
            return
        if self._ledger_fd is not None:
            row = {
                "test_id": msg.test_id, "mail_from": msg.mail_from, "rcpt_tos": msg.rcpt_tos,
                "delivered": msg.delivered, "sha256": msg.sha256, "size": msg.size,
                "session": msg.session, "queue_id": msg.queue_id, "time": msg.received_at,
            }
            if self.ledger_data:
                row["data_b64"] = base64.b64encode(msg.data).decode()
            # One write() per line (O_APPEND) then fsync: the line is on disk before the 250.
            os.write(self._ledger_fd, (json.dumps(row) + "\n").encode())
            os.fsync(self._ledger_fd)
        self.messages.append(msg)
        self.sessions[msg.session].messages += 1

    # -- queries for tests -------------------------------------------------------------------------

    @property
    def sessions_total(self) -> int:
        return len(self.sessions)

    @property
    def message_count(self) -> int:
        return len(self.messages)

    def per_session_messages(self) -> list[int]:
        return [s.messages for s in self.sessions]

    def by_test_id(self, test_id: str) -> list[Message]:
        return [m for m in self.messages if m.test_id == test_id]

    def deliveries(self) -> Counter[tuple[str | None, str, str]]:
        """How often each (X-Test-Id, recipient, body sha256) was delivered: duplicates show as >1."""
        return Counter((m.test_id, r, m.sha256) for m in self.messages for r in m.delivered)

    def reset(self) -> None:
        """Forget the ledger and the counters (not the faults, not open sessions)."""
        self.messages.clear()
        self.rejected.clear()
        self.peak_sessions = self.current_sessions
        self.dropped_in_data = 0

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[Message]:
        """Wait until at least ``n`` messages are in the ledger; raise TimeoutError if not."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sink has {len(self.messages)} messages, wanted {n}")
            await asyncio.sleep(0.01)
        return list(self.messages)

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no session is open."""
        deadline = time.monotonic() + timeout
        while self.current_sessions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sink still has {self.current_sessions} sessions")
            await asyncio.sleep(0.01)


class ThreadedSink(InThread):
    """A Sink on its own event loop thread, for tests whose main thread blocks (a relay in
    another process, subprocess.run, time.sleep). ``ThreadedSink(...)`` takes Sink's arguments;
    ``start()``/``stop()`` block; everything else is the Sink's (``port``, ``messages``,
    ``faults``, ...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(Sink, *args, **kwargs)

    def start(self) -> ThreadedSink:
        super().start()
        return self

    def __enter__(self) -> ThreadedSink:
        return self.start()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Message]:
        return self.lt.run(self.peer.wait_for(n, timeout), timeout + 5)

    def wait_idle(self, timeout: float = 10.0) -> None:
        self.lt.run(self.peer.wait_idle(timeout), timeout + 5)

    def snapshot(self) -> list[Message]:
        """A copy of the ledger taken on the sink's thread."""
        return self.call(lambda s: list(s.messages))


def read_ledger(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a file ledger. A torn last line (no newline) is skipped: its 250 was never sent."""
    raw = Path(path).read_bytes()
    lines = raw.split(b"\n")
    complete = lines[:-1]  # the part after the last newline is empty or torn
    return [json.loads(line) for line in complete if line.strip()]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
