"""LMTP delivery client (RFC 2033): one session to a next hop, one reply per accepted recipient after the dot.

aiosmtplib has no LHLO and reads a single reply after the dot (RELIABILITY.md case 48), so this is
an own client on the reply wire it shares with the SMTP client (fastrelay.delivery.wire). Replies
go through the framing hot path's ReplyParser (bounded memory: a hostile reply is a
`(-1, reason)`, case 44) and the body through encode_data
(CRLF normalisation, dot-stuffing, the final dot: cases 3, 27). Both are looked up on
`fastrelay._impl` at use, so either implementation can be swapped in.
"""

from __future__ import annotations

import asyncio
import ssl

from fastrelay import _impl
from fastrelay.delivery import PERM, ConnectError, Hop, RcptResult, Settings
from fastrelay.delivery.smtp import (
    QUIT_TIMEOUT,
    clean_text,
    mail_args,
    rcpt_args,
    reply_result,
    tcp_connect,
    temp,
    tls_context,
    want_tls,
)
from fastrelay.delivery.wire import CONTROL, Hostile, Lost, ReplyWire, reply_text

__all__ = ["LMTPConnection", "connect"]

class _TLSFailed(Exception):
    """The STARTTLS handshake failed: under "ifavailable" connect() retries in plaintext."""


class LMTPConnection:
    """One LMTP session (a `fastrelay.delivery.Connection`)."""

    __slots__ = ("_dotted", "_ext", "_fresh", "_hop", "_settings", "_wire", "remote", "tls", "usable")

    def __init__(self, hop: Hop, settings: Settings):
        self._hop = hop
        self._settings = settings
        self._wire: ReplyWire | None = None
        self._ext: dict[str, str] = {}
        self._fresh = True  # no transaction started since LHLO or the last RSET
        self._dotted = False  # the final dot of the current message has gone out
        self.remote = f"{hop.ip}:{hop.port}"
        self.usable = False
        self.tls = False

    # -- session setup ---------------------------------------------------------------------------

    async def _open(self, try_tls: bool) -> None:
        hop, s = self._hop, self._settings
        sock = await tcp_connect(hop, s.connect_timeout)
        loop = asyncio.get_running_loop()
        try:
            _, wire = await loop.create_connection(lambda: ReplyWire(loop), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._wire = wire
        try:
            code, lines = await self._setup(None, s.greeting_timeout, "the greeting")
            if code != 220:
                # RELIABILITY.md case 39: the host is unusable, never a per-recipient result.
                raise ConnectError(code if 400 <= code < 600 else 451, clean_text(reply_text(lines)), hop=hop)
            await self._lhlo()
            if try_tls and want_tls(s):
                await self._starttls()
        except BaseException:
            wire.abort()
            self._wire = None
            raise
        self.usable = True

    async def _setup(self, line: bytes | None, timeout: float, what: str) -> tuple[int, list[bytes]]:
        """One exchange before any message: every failure is a ConnectError (cases 38, 39, 44)."""
        wire, hop = self._wire, self._hop
        try:
            r = await (wire.read(timeout) if line is None else wire.command(line, timeout))
            wire.check()
            return r
        except TimeoutError:
            why = f"4.4.2 Timed out waiting for {what} from {self.remote}"
        except Lost:
            why = f"4.4.2 Lost connection with {self.remote} during {what}"
        except Hostile as e:
            why = clean_text(f"4.5.0 Bad reply from {self.remote} during {what}: {e.reason}")
        raise ConnectError(451, why, hop=hop)

    async def _lhlo(self) -> None:
        s, hop = self._settings, self._hop
        code, lines = await self._setup(b"LHLO " + s.helo_name.encode("ascii") + b"\r\n", s.ehlo_timeout,
                                        "LHLO")
        if code != 250:
            raise ConnectError(code if 400 <= code < 600 else 451, clean_text(reply_text(lines)), hop=hop)
        ext = {}
        for ln in lines[1:]:  # the first line is the server's name (RFC 5321 §4.1.1.1)
            kw, _, params = ln.decode("ascii", "replace").strip().partition(" ")
            ext[kw.lower()] = params
        self._ext = ext

    async def _starttls(self) -> None:
        """RELIABILITY.md case 45, RFC 3207: the same policy as the SMTP client."""
        s, hop, wire = self._settings, self._hop, self._wire
        required = s.tls == "required"
        if "starttls" not in self._ext:
            if required:
                raise ConnectError(451, "4.7.4 TLS is required, but STARTTLS was not offered", hop=hop)
            return
        try:
            ctx = tls_context(s)
        except (OSError, ValueError) as e:
            raise ConnectError(451, clean_text(f"4.7.5 Cannot load the TLS CA file: {e}"), hop=hop) from None
        code, lines = await self._setup(b"STARTTLS\r\n", s.tls_timeout, "STARTTLS")
        if code != 220:
            if wire.lost or code == 421:
                raise ConnectError(451, clean_text(f"4.4.2 STARTTLS answered {code} {reply_text(lines)}"), hop=hop)
            if required:
                raise ConnectError(451, clean_text(f"4.7.4 TLS is required, but STARTTLS was refused: "
                                                   f"{code} {reply_text(lines)}"), hop=hop)
            return  # 454 under "ifavailable": carry on in plaintext on this connection
        wire.reset_parser()
        loop = asyncio.get_running_loop()
        try:
            wire.transport = await loop.start_tls(wire.transport, wire, ctx,
                                                  server_hostname=hop.name or hop.ip,
                                                  ssl_handshake_timeout=s.tls_timeout)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError, RuntimeError) as e:
            wire.abort()
            if required:
                raise ConnectError(451, clean_text(f"4.7.5 TLS handshake failed: {e}"), hop=hop) from None
            raise _TLSFailed(str(e)) from None
        self.tls = True
        # RFC 3207 §4.2: forget what was learnt before TLS and ask again.
        await self._lhlo()

    # -- delivery -----------------------------------------------------------------------------------

    async def deliver(self, sender: str, mail_params: str, rcpts: list[tuple[str, str]],
                      body: bytes) -> list[RcptResult]:
        n = len(rcpts)
        if not self.usable or self._wire is None:
            return [temp(f"4.4.2 Connection to {self.remote} is no longer usable")] * n
        args = mail_args(sender, mail_params, len(body), self._ext)
        if isinstance(args, RcptResult):
            return [args] * n
        if CONTROL.search(b"".join(args)):  # a control character in the sender (case 22)
            return [RcptResult(PERM, 501, "5.1.7 Bad sender address (control characters)")] * n
        mail = b"MAIL " + b" ".join(args) + b"\r\n"
        results: list[RcptResult | None] = [None] * n
        todo = range(n)
        while todo:
            todo = await self._transaction(mail, rcpts, body, todo, results)
        return results  # type: ignore[return-value]  # every slot is filled by _transaction

    async def _transaction(self, mail: bytes, rcpts: list[tuple[str, str]], body: bytes,
                           todo: range | list[int], results: list[RcptResult | None]) -> list[int]:
        """One MAIL..DATA transaction for the recipients at `todo`; fills their results and returns
        the ones to send in another transaction (a remote "452 too many recipients", case 42)."""
        s, wire = self._settings, self._wire
        phase = "RSET"
        self._dotted = False
        accepted: list[int] = []
        try:
            if not self._fresh:
                # RFC 5321 §4.1.1.5: start each message from a clean state, whatever the last one left.
                code, lines = await wire.command(b"RSET\r\n", s.rset_timeout)
                if code != 250:
                    why = clean_text(f"4.4.2 RSET failed: {code} {reply_text(lines)}")
                    return self._broken(todo, results, why)
            self._fresh = False
            phase = "MAIL FROM"
            code, lines = await wire.command(mail, s.mail_timeout)
            if code != 250:
                if not 400 <= code < 600:
                    raise Hostile(f"unexpected reply {code}", True)
                res = self._reply(code, lines)  # RELIABILITY.md case 41: shared by every recipient
                for i in todo:
                    results[i] = res
                return []
            phase = "RCPT TO"
            rest: list[int] = []
            for k, i in enumerate(todo):
                addr, params = rcpts[i]
                arg = b" ".join(rcpt_args(addr, params, self._ext))
                if CONTROL.search(arg):
                    # RELIABILITY.md case 22: never sent; this address can never be delivered.
                    results[i] = RcptResult(PERM, 501, "5.1.3 Bad recipient address (control characters)")
                    continue
                code, lines = await wire.command(b"RCPT " + arg + b"\r\n", s.rcpt_timeout)
                if 200 <= code < 300:
                    accepted.append(i)
                elif code == 452 and accepted:
                    # RFC 5321 §4.5.3.1.10: "too many recipients" - the rest go in the next transaction.
                    rest = list(todo[k:])
                    break
                else:
                    results[i] = self._reply(code, lines)  # RELIABILITY.md case 42
                    if not self.usable:  # 421: the server is closing (§3.8); or a 3xx
                        return self._broken(todo, results, f"4.4.2 {self.remote} closed the session")
            if not accepted:
                # RELIABILITY.md case 42: nobody to send to; no DATA.
                phase = "RSET"
                code, lines = await wire.command(b"RSET\r\n", s.rset_timeout)
                wire.check()
                if code != 250:
                    why = clean_text(f"4.4.2 RSET failed: {code} {reply_text(lines)}")
                    return self._broken(todo, results, why)
                self._fresh = True
                return []
            phase = "DATA"
            code, lines = await wire.command(b"DATA\r\n", s.data_timeout)
            if code != 354:
                if not 400 <= code < 600:
                    raise Hostile(f"unexpected reply {code} to DATA", True)
                res = self._reply(code, lines)
                for i in accepted:
                    results[i] = res
                return rest if self.usable else self._broken(rest, results, "")
            wire.check()
            wire.want = len(accepted)
            wire.write(_impl.encode_data(body))
            await wire.drain(s.data_timeout)
            self._dotted = True
            # RFC 2033 §4.2: one reply per accepted recipient, in RCPT order, each on its own
            # (RELIABILITY.md case 48). If the connection goes after k of them, the first k keep
            # their results and the rest are deferred below (they may be delivered twice).
            for i in accepted:
                code, lines = await wire.read(s.done_timeout)
                results[i] = self._reply(code, lines)
            wire.check()
            return rest if self.usable else self._broken(rest, results, "")
        except TimeoutError:
            why = self._trouble(phase, "4.4.2 Timed out waiting for the reply to {phase} from {remote}")
            return self._broken(todo, results, why)
        except Lost:
            why = self._trouble(phase, "4.4.2 Lost connection with {remote} while sending {phase}")
            return self._broken(todo, results, why)
        except Hostile as e:
            if e.shifted:
                # Out of step (case 44, unsolicited): no result read in this transaction is trusted.
                for i in todo:
                    results[i] = None
            detail = e.reason.replace("{", "(").replace("}", ")")
            why = self._trouble(phase, "4.5.0 Bad reply to {phase} from {remote}: " + detail)
            return self._broken(todo, results, why)

    def _trouble(self, phase: str, template: str) -> str:
        """The text of a synthetic 451; `template` has {phase} and {remote}."""
        if self._dotted:
            # RFC 5321 §3.8, RELIABILITY.md cases 40, 48: what was not answered may have been
            # delivered all the same; retry, knowing it may arrive twice.
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
            self._wire.abort()

    async def close(self) -> None:
        wire, self._wire = self._wire, None
        if wire is None:
            return
        try:
            if self.usable and not wire.lost:
                await wire.command(b"QUIT\r\n", min(QUIT_TIMEOUT, self._settings.rset_timeout))
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


async def connect(hop: Hop, settings: Settings) -> LMTPConnection:
    """An LMTP session to `hop`, greeted, LHLO'd and (per policy) under TLS; or ConnectError."""
    conn = LMTPConnection(hop, settings)
    try:
        await conn._open(try_tls=True)
    except _TLSFailed:
        # RELIABILITY.md case 45: opportunistic TLS that fails in the handshake retries once in
        # plaintext on a new connection ("required" raised ConnectError instead).
        await conn._open(try_tls=False)
    return conn
