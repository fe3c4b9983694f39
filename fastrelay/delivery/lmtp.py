"""LMTP delivery client (RFC 2033): one session to a next hop, one reply per accepted recipient after the dot.

aiosmtplib has no LHLO and reads a single reply after the dot (docs/reliability.md case 48), so this is
an own client on the reply wire and session it shares with the SMTP client (`ReplyWire`,
`WireSession`: fastrelay.delivery.wire); what is LMTP's own is LHLO and the transaction. Replies
go through the framing hot path's ReplyParser (bounded memory: a hostile reply is a
`(-1, reason)`, case 44) and the body through encode_data
(CRLF normalisation, dot-stuffing, the final dot: cases 3, 27). Both are looked up on
`fastrelay._impl` at use, so either implementation can be swapped in.
"""

from __future__ import annotations

from fastrelay import _impl
from fastrelay.delivery import PERM, Hop, RcptResult, Settings
from fastrelay.delivery.smtp import mail_args, rcpt_args
from fastrelay.delivery.wire import (
    CONTROL,
    Hostile,
    Lost,
    WireSession,
    clean_text,
    connect_session,
    hello_keywords,
    reply_text,
    temp,
)

__all__ = ["LMTPConnection", "connect"]


class LMTPConnection(WireSession):
    """One LMTP session (a `fastrelay.delivery.Connection`)."""

    __slots__ = ()

    # A refused greeting without text: a ConnectError with empty text (SMTP's says "greeting refused").
    _GREETING_REFUSED = ""

    # -- session setup (the rest is WireSession's) -----------------------------------------------

    async def _exchange(self, line: bytes | None, timeout: float) -> tuple[int, list[bytes]]:
        """Send `line` (None: nothing, for the greeting) and read its one reply. Looser than the
        SMTP client's: only a reply the wire refused counts here (`check`), not bytes left over
        after it (`settled`)."""
        wire = self._wire
        r = await (wire.read(timeout) if line is None else wire.command(line, timeout))
        wire.check()
        return r

    async def _hello(self) -> None:
        s = self._settings
        code, lines = await self._setup(b"LHLO " + s.helo_name.encode("ascii") + b"\r\n", s.ehlo_timeout,
                                        "LHLO")
        if code != 250:
            raise self._refusal(code, lines)
        self._ext = hello_keywords(lines)

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
                res = self._reply(code, lines)  # docs/reliability.md case 41: shared by every recipient
                for i in todo:
                    results[i] = res
                return []
            phase = "RCPT TO"
            rest: list[int] = []
            for k, i in enumerate(todo):
                addr, params = rcpts[i]
                arg = b" ".join(rcpt_args(addr, params, self._ext))
                if CONTROL.search(arg):
                    # docs/reliability.md case 22: never sent; this address can never be delivered.
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
                    results[i] = self._reply(code, lines)  # docs/reliability.md case 42
                    if not self.usable:  # 421: the server is closing (§3.8); or a 3xx
                        return self._broken(todo, results, f"4.4.2 {self.remote} closed the session")
            if not accepted:
                # docs/reliability.md case 42: nobody to send to; no DATA.
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
            # (docs/reliability.md case 48). If the connection goes after k of them, the first k keep
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


async def connect(hop: Hop, settings: Settings) -> LMTPConnection:
    """An LMTP session to `hop`, greeted, LHLO'd and (per policy) under TLS; or ConnectError."""
    return await connect_session(LMTPConnection, hop, settings)
