"""SMTP delivery client: one session to a next hop, pipelined (RFC 2920) where offered, one result per recipient.

Why an own client rather than aiosmtplib: under full load (smtp-source, 20 sessions, 4 KB, a new
connection per message) py-spy put ~20% of the event loop's samples in aiosmtplib's DATA path and
more in its per-command execute_command/read_response/wait_for, and ~52% in uvloop's socket work,
which grows with round trips; the same load through the own LMTP client cost 5.44 s of relay CPU
per 10,000 messages against 7.13 s. aiosmtplib cannot pipeline (read_response must be awaited once
per command written, and data_received drops bytes once a reply is parsed). So this client writes
RSET, MAIL, every RCPT and DATA in one write, reads the replies in order on the shared reply wire
(fastrelay.delivery.wire), and sends the body through `_impl.encode_data` (CRLF normalisation,
dot-stuffing and the final dot in one pass: docs/reliability.md cases 3, 27).

Also holds what the LMTP client shares with it at the command level: MAIL/RCPT parameter
filtering. What both do alike on the connection (TCP connect, greeting, STARTTLS, QUIT, the
mapping of replies to `RcptResult`s) is `WireSession` in fastrelay.delivery.wire; `tcp_connect`,
`clean_text` and the other helpers it took from here are re-exported for their importers.
"""

from __future__ import annotations

import re

from fastrelay import _impl
from fastrelay.delivery import PERM, ConnectError, Hop, RcptResult, Settings, xclient
from fastrelay.delivery.auth import authenticate
from fastrelay.delivery.wire import (
    CONTROL,
    QUIT_TIMEOUT,
    TEXT_CAP,
    Hostile,
    Lost,
    WireSession,
    clean_text,
    connect_session,
    hello_keywords,
    reply_result,
    reply_text,
    tcp_connect,
    temp,
    tls_context,
    want_tls,
)

__all__ = ["QUIT_TIMEOUT", "TEXT_CAP", "SMTPConnection", "clean_text", "connect", "encode_addr", "mail_args",
           "rcpt_args", "reply_result", "tcp_connect", "temp", "tls_context", "want_tls"]

# --- shared with the LMTP client -------------------------------------------------------------------


def encode_addr(addr: str) -> bytes:
    # The address as stored, byte for byte: quoted local parts (`"john..doe"@x`) keep their quotes
    # and case (docs/reliability.md case 19); surrogateescape gives back any byte the intake kept.
    return addr.encode("utf-8", "surrogateescape")


def mail_args(sender: str, mail_params: str, size: int, ext: dict[str, str]) -> list[bytes] | RcptResult:
    """The arguments of MAIL for a next hop offering `ext` (lowercase EHLO keywords; empty after
    HELO), or the result every recipient gets when the message cannot go there at all."""
    args = [b"FROM:<" + encode_addr(sender) + b">"]
    if "size" in ext:
        args.append(b"SIZE=%d" % size)  # the real size, not what the client once announced (RFC 1870)
    if not mail_params:
        return args
    for p in mail_params.split():
        key, _, value = p.partition("=")
        key = key.upper()
        if key == "SIZE":
            continue
        if key == "BODY":
            # RFC 6152: BODY= only to a host offering 8BITMIME. Without it an 8-bit body still goes
            # out as it is (docs/reliability.md case 24: MIME downgrade is out of scope; Postfix notes
            # that strict 7-bit servers are rare). BINARYMIME needs BDAT, which we do not send.
            if "8bitmime" in ext and value.upper() in ("8BITMIME", "7BIT"):
                args.append(p.encode("ascii", "surrogateescape"))
            continue
        if key == "SMTPUTF8":
            if "smtputf8" not in ext:
                # docs/reliability.md case 23 (RFC 6531 §3.2): no silent downgrade of a UTF-8 envelope.
                return RcptResult(PERM, 553, "5.6.7 SMTPUTF8 is required, but was not offered by the host")
            args.append(b"SMTPUTF8")
            continue
        if key in ("RET", "ENVID"):
            if "dsn" in ext:  # RFC 3461
                args.append(p.encode("ascii", "surrogateescape"))
            continue
        if key == "AUTH":
            continue  # RFC 4954 §5: meaningful only in an authenticated session, which this is not
        if key.lower() in ext:  # another extension's parameter, passed on where it is offered
            args.append(p.encode("ascii", "surrogateescape"))
    return args


def rcpt_args(addr: str, params: str, ext: dict[str, str]) -> list[bytes]:
    args = [b"TO:<" + encode_addr(addr) + b">"]
    if params:
        for p in params.split():
            key = p.partition("=")[0].upper()
            if key in ("NOTIFY", "ORCPT"):
                if "dsn" in ext:  # RFC 3461
                    args.append(p.encode("ascii", "surrogateescape"))
            elif key.lower() in ext:
                args.append(p.encode("ascii", "surrogateescape"))
    return args


# --- the SMTP client ---------------------------------------------------------------------------

_RSET = b"RSET\r\n"
_DATA = b"DATA\r\n"
_DOT = b".\r\n"  # an empty message: what encode_data(b"") gives
# docs/reliability.md case 22: a control character in an address or parameter is never sent; the
# address can never be delivered, the session is unharmed.
# A HELO name that may be said again after XCLIENT: printable ASCII, no spaces (RFC 5321 §4.1.1.1).
_HELO_NAME = re.compile(r"[!-~]{1,255}")
_BAD_SENDER = RcptResult(PERM, 501, "5.1.7 Bad sender address (control characters)")
_BAD_RCPT = RcptResult(PERM, 501, "5.1.3 Bad recipient address (control characters)")


class SMTPConnection(WireSession):
    """One SMTP session (a `fastrelay.delivery.Connection`)."""

    __slots__ = ("_auth_failure", "_ehlo", "_helo", "_phase", "_pipelining", "_xclient_sent")

    def __init__(self, hop: Hop, settings: Settings):
        name = settings.helo_name.encode("ascii")  # UnicodeEncodeError (a ValueError) for a non-ASCII name
        if not name or b" " in name or CONTROL.search(name):
            raise ValueError(f"helo_name {settings.helo_name!r} is not a host name")
        super().__init__(hop, settings)
        self._ehlo = b"EHLO " + name + b"\r\n"
        self._helo = b"HELO " + name + b"\r\n"
        self._pipelining = False
        self._phase = "RSET"  # the command whose reply is awaited, for the text of a synthetic 451
        self._xclient_sent: dict[str, str] | None = None  # the XCLIENT attributes in effect
        self._auth_failure: RcptResult | None = None

    async def _open(self, try_tls: bool) -> None:
        await super()._open(try_tls)
        if self._settings.auth is not None:
            # Issue 17: AUTH after the last EHLO (under TLS). A failure stays with the session: it
            # answers each message with it (one AUTH per session, not per message: providers lock
            # accounts that fail too often), and the host is not marked down.
            self._auth_failure = await authenticate(self, self._settings.auth, self._settings.ehlo_timeout)

    # -- session setup (the rest is WireSession's) -----------------------------------------------

    async def _hello(self) -> None:
        s = self._settings
        ext: dict[str, str] = {}
        helo = not s.esmtp
        if s.esmtp:
            code, lines = await self._setup(self._ehlo, s.ehlo_timeout, "EHLO")
            if code == 250:
                ext = hello_keywords(lines)
            elif 500 <= code < 600 and not self._wire.lost:
                # RFC 5321 §4.1.4: a server that refuses EHLO with 5xx may still speak HELO.
                helo = True
            else:
                raise self._refusal(code, lines)
        if helo:
            code, lines = await self._setup(self._helo, s.ehlo_timeout, "HELO")
            if code != 250:
                raise self._refusal(code, lines)
        self._ext = ext  # no extensions after HELO
        self._pipelining = "pipelining" in ext  # RFC 2920

    # -- delivery -----------------------------------------------------------------------------------

    async def deliver(self, sender: str, mail_params: str, rcpts: list[tuple[str, str]],
                      body: bytes, client: dict[str, str] | None = None) -> list[RcptResult]:
        """`client`: the original client's XCLIENT attributes (fastrelay.delivery.xclient), sent
        before the transaction when the XCLIENT option asks for it."""
        n = len(rcpts)
        if self._auth_failure is not None:
            return [self._auth_failure] * n
        if not self.usable or self._wire is None:
            return [temp(f"4.4.2 Connection to {self.remote} is no longer usable")] * n
        if client is not None and self._settings.xclient != "no":
            refused = await self._xclient(client)
            if refused is not None:
                return [refused] * n
        ext = self._ext
        args = mail_args(sender, mail_params, len(body), ext)
        if isinstance(args, RcptResult):
            return [args] * n
        mail = b"MAIL " + b" ".join(args) + b"\r\n"
        search = CONTROL.search
        if search(mail, 0, len(mail) - 2):
            return [_BAD_SENDER] * n  # case 22: nothing is sent
        # Every command line is built and checked before anything is written (case 22): a bad
        # address gets its PERM here and stays out of the group.
        results: list[RcptResult | None] = [None] * n
        lines: list[bytes] = [b""] * n
        todo: list[int] = []
        for i, (addr, params) in enumerate(rcpts):
            if params:
                line = b"RCPT " + b" ".join(rcpt_args(addr, params, ext)) + b"\r\n"
            else:
                line = b"RCPT TO:<" + encode_addr(addr) + b">\r\n"  # byte-exact (case 19)
            if search(line, 0, len(line) - 2):
                results[i] = _BAD_RCPT
            else:
                lines[i] = line
                todo.append(i)
        transaction = self._pipelined if self._pipelining else self._stepwise
        while todo:
            self._dotted = False
            try:
                todo = await transaction(mail, lines, body, todo, results)
            except TimeoutError:
                todo = self._broken(todo, results, self._trouble(
                    self._phase, "4.4.2 Timed out waiting for the reply to {phase} from {remote}"))
            except Lost:
                todo = self._broken(todo, results, self._trouble(
                    self._phase, "4.4.2 Lost connection with {remote} while sending {phase}"))
            except Hostile as e:
                if e.shifted:
                    # Out of step (case 44, unsolicited): with the replies shifted, any result read
                    # in this transaction may belong to another command, so none of them is trusted.
                    for i in todo:
                        results[i] = None
                detail = e.reason.replace("{", "(").replace("}", ")")
                todo = self._broken(todo, results, self._trouble(
                    self._phase, "4.5.0 Bad reply to {phase} from {remote}: " + detail))
        return results  # type: ignore[return-value]  # every slot is filled by now

    async def _pipelined(self, mail: bytes, lines: list[bytes], body: bytes, todo: list[int],
                         results: list[RcptResult | None]) -> list[int]:
        """One MAIL..DATA transaction for the recipients at `todo` as one pipelined group (RFC 2920
        §3.1: DATA last); fills their results and returns the ones to send in another transaction
        (a remote "452 too many recipients", case 42). Every reply of the group is read, in order,
        each with its own phase's timeout (RFC 5321 §4.5.3.2, case 40)."""
        s, wire = self._settings, self._wire
        rset = not self._fresh  # never before the first message
        group = [_RSET, mail] if rset else [mail]
        for i in todo:
            group.append(lines[i])
        group.append(_DATA)
        self._fresh = False
        self._phase = "RSET" if rset else "MAIL FROM"
        wire.send(b"".join(group), len(group))  # one write per message (docs/performance.md: batch writes)
        if rset:
            # RFC 5321 §4.1.1.5: start each message from a clean state, whatever the last one left.
            code, rl = await wire.read(s.rset_timeout)
            if code != 250:
                return self._broken(todo, results, clean_text(f"4.4.2 RSET failed: {code} {reply_text(rl)}"))
        self._phase = "MAIL FROM"
        code, rl = await wire.read(s.mail_timeout)
        failed = code != 250
        if failed:
            if not 400 <= code < 600:  # a 2xx/3xx other than 250: out of step with the server
                raise Hostile(f"unexpected reply {code} to MAIL", True)
            # docs/reliability.md case 41: every recipient of the transaction shares the MAIL result;
            # the replies to the RCPTs and DATA (503s) are read to stay in step, and decide nothing.
            res = self._reply(code, rl)
            for i in todo:
                results[i] = res
            if not self.usable:  # 421: the server is closing (§3.8); nothing more will come
                return []
        self._phase = "RCPT TO"
        timeout = s.rcpt_timeout
        accepted: list[int] = []
        rest: list[int] = []
        for i in todo:
            code, rl = await wire.read(timeout)
            if failed:
                if code == 421:
                    self._drop()
                    return []
            elif 200 <= code < 300:
                accepted.append(i)
            elif code == 452 and accepted:
                # RFC 5321 §4.5.3.1.10: "too many recipients" - this one goes in the next transaction.
                rest.append(i)
            else:
                results[i] = self._reply(code, rl)  # docs/reliability.md case 42
                if not self.usable:  # 421: the server is closing (§3.8); or a 3xx
                    return self._broken(todo, results, f"4.4.2 {self.remote} closed the session")
        self._phase = "DATA"
        code, rl = await wire.read(s.data_timeout)
        if accepted:
            return await self._data(code, rl, body, accepted, rest, results)
        # Nobody was accepted (case 42): RFC 2920 §3.1 has the server refuse DATA (503/554). The
        # next message starts with RSET, so nothing else is needed.
        if code == 354:
            # A server not following RFC 2920: end the empty message at once; its reply decides
            # nothing, every recipient has its result.
            wire.settled()
            wire.want = 1
            wire.write(_DOT)
            code, rl = await wire.read(s.done_timeout)
        elif not 400 <= code < 600:
            raise Hostile(f"unexpected reply {code} to DATA", True)
        wire.settled()
        if code == 421 or 300 <= code < 400:
            self._drop()
        return []

    async def _stepwise(self, mail: bytes, lines: list[bytes], body: bytes, todo: list[int],
                        results: list[RcptResult | None]) -> list[int]:
        """The same transaction without PIPELINING: one command, one reply (RFC 5321 §4.1.1)."""
        s, wire = self._settings, self._wire
        if not self._fresh:
            # RFC 5321 §4.1.1.5: start each message from a clean state, whatever the last one left.
            self._phase = "RSET"
            code, rl = await self._ask(_RSET, s.rset_timeout)
            if code != 250:
                return self._broken(todo, results, clean_text(f"4.4.2 RSET failed: {code} {reply_text(rl)}"))
        self._fresh = False
        self._phase = "MAIL FROM"
        code, rl = await self._ask(mail, s.mail_timeout)
        if code != 250:
            if not 400 <= code < 600:  # a 2xx/3xx other than 250: out of step with the server
                raise Hostile(f"unexpected reply {code} to MAIL", True)
            res = self._reply(code, rl)  # docs/reliability.md case 41: shared by every recipient
            for i in todo:
                results[i] = res
            return []
        self._phase = "RCPT TO"
        accepted: list[int] = []
        rest: list[int] = []
        for k, i in enumerate(todo):
            code, rl = await self._ask(lines[i], s.rcpt_timeout)
            if 200 <= code < 300:
                accepted.append(i)
            elif code == 452 and accepted:
                # RFC 5321 §4.5.3.1.10: "too many recipients" - the rest go in the next transaction.
                rest = todo[k:]
                break
            else:
                results[i] = self._reply(code, rl)  # docs/reliability.md case 42
                if not self.usable:  # 421: the server is closing (§3.8); or a 3xx
                    return self._broken(todo, results, f"4.4.2 {self.remote} closed the session")
        if not accepted:
            # docs/reliability.md case 42: nobody to send to; RSET and no DATA.
            self._phase = "RSET"
            code, rl = await self._ask(_RSET, s.rset_timeout)
            wire.settled()
            if code != 250:
                return self._broken(todo, results, clean_text(f"4.4.2 RSET failed: {code} {reply_text(rl)}"))
            self._fresh = True
            return []
        self._phase = "DATA"
        code, rl = await self._ask(_DATA, s.data_timeout)
        return await self._data(code, rl, body, accepted, rest, results)

    async def _xclient(self, client: dict[str, str]) -> RcptResult | None:
        """Momentum's xclient (Postfix XCLIENT_README) before a message: None to go on, or the
        result every recipient gets. "required" with a next hop that does not offer XCLIENT or
        refuses it is a transient failure (4.7.0); "ifavailable" carries on without."""
        s = self._settings
        required = s.xclient == "required"
        if "xclient" not in self._ext:
            return temp(f"4.7.0 XCLIENT is required, but {self.remote} does not offer it") if required else None
        if client == self._xclient_sent:
            return None  # already in effect on this connection
        line = xclient.command(client, self._ext["xclient"])
        if line is None:
            return temp(f"4.7.0 XCLIENT is required, but {self.remote} takes none of its attributes") \
                if required else None
        try:
            if not self._fresh:
                # XCLIENT_README: not inside a mail transaction; RSET ends whatever the last left.
                self._phase = "RSET"
                code, rl = await self._setup(_RSET, s.rset_timeout, "RSET")
                if code != 250:
                    self._drop()
                    return temp(clean_text(f"4.4.2 RSET failed: {code} {reply_text(rl)}"))
                self._fresh = True
            self._phase = "XCLIENT"
            code, rl = await self._setup(line, s.ehlo_timeout, "XCLIENT")
            if code == 220:
                # The server starts over as if the original client had connected: EHLO again,
                # with the original client's HELO name where it is a usable one, because the new
                # EHLO replaces the HELO attribute (Postfix logs the EHLO's name after XCLIENT).
                self._xclient_sent = client
                helo = client.get("HELO", "")
                if helo != xclient.UNAVAILABLE and _HELO_NAME.fullmatch(helo):
                    self._ehlo = b"EHLO " + helo.encode("ascii") + b"\r\n"
                    self._helo = b"HELO " + helo.encode("ascii") + b"\r\n"
                await self._hello()
                return None
        except ConnectError as e:  # timeout, lost connection, bad reply, EHLO refused
            self._drop()
            return temp(e.text)
        if code == 421 or self._wire is None or self._wire.lost:
            self._drop()
            return temp(clean_text(f"4.4.2 {self.remote} closed the session after XCLIENT: {code} {reply_text(rl)}"))
        if required:
            return temp(clean_text(f"4.7.0 XCLIENT is required, but {self.remote} refused it: "
                                   f"{code} {reply_text(rl)}"))
        return None

    async def _ask(self, line: bytes, timeout: float) -> tuple[int, list[bytes]]:
        wire = self._wire
        wire.send(line, 1)  # refused if anything came after the last reply (case 44)
        return await wire.read(timeout)

    async def _data(self, code: int, rl: list[bytes], body: bytes, accepted: list[int], rest: list[int],
                    results: list[RcptResult | None]) -> list[int]:
        """From the reply to DATA on: the body, the final reply; one outcome for every accepted
        recipient (docs/reliability.md case 43)."""
        wire = self._wire
        if code == 354:
            wire.settled()  # nothing may come with the 354 (case 44): checked before the body goes out
            s = self._settings
            wire.want = 1
            # docs/reliability.md cases 3, 27: CRLF-normalised, dot-stuffed, ending in CRLF.CRLF.
            wire.write(_impl.encode_data(body))
            await wire.drain(s.data_timeout)
            self._dotted = True
            code, rl = await wire.read(s.done_timeout)
        elif not 400 <= code < 600:  # anything but 354 or an error to DATA (a 250, say)
            raise Hostile(f"unexpected reply {code} to DATA", True)
        wire.settled()
        res = self._reply(code, rl)
        for i in accepted:
            results[i] = res
        return rest if self.usable else self._broken(rest, results, "")


async def connect(hop: Hop, settings: Settings) -> SMTPConnection:
    """An SMTP session to `hop`, greeted, EHLO'd and (per policy) under TLS; or ConnectError."""
    return await connect_session(SMTPConnection, hop, settings)
