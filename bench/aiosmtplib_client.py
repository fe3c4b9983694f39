"""The replaced aiosmtplib SMTP delivery client (fastrelay/delivery/smtp.py before the own pipelining
client), kept verbatim for bench/test_delivery_bench.py's before/after comparison only; nothing
in fastrelay imports it.

Original docstring: SMTP delivery client: one aiosmtplib session to a next hop, one result per
recipient per message. Also holds what the LMTP client shares with it: the TCP connect, TLS
contexts, MAIL/RCPT parameter filtering and the mapping of replies to `RcptResult`s.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import aiosmtplib
from aiosmtplib import (
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import SMTPProtocol

from fastrelay.delivery import OK, PERM, TEMP, ConnectError, Hop, RcptResult, Settings

__all__ = ["SMTPConnection", "clean_text", "connect", "reply_result", "tcp_connect", "tls_context"]

# Remote reply text goes into logs and DSNs: no control characters, bounded (RELIABILITY.md case 26).
TEXT_CAP = 500
# QUIT is a courtesy; a peer that does not answer it quickly is simply dropped.
QUIT_TIMEOUT = 2.0

# --- shared with the LMTP client -------------------------------------------------------------------


def clean_text(text: str) -> str:
    """Reply text fit for a log line or a DSN: control characters (line breaks of a multi-line
    reply included) become spaces, length capped (RELIABILITY.md case 26)."""
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


async def tcp_connect(hop: Hop, timeout: float) -> socket.socket:
    """A connected non-blocking socket to `hop`, or ConnectError (refused, unreachable, no SYN-ACK
    within `timeout`: RELIABILITY.md case 38). Done here rather than by aiosmtplib so that the
    TCP connect and the greeting each get their own timeout (RFC 5321 §4.5.3.2)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in hop.ip else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


_contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The client context for STARTTLS, built once per (verify, CA file): loading the system store
    costs milliseconds, too much per connection."""
    key = (settings.tls_verify, settings.tls_ca)
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if settings.tls_verify:
            if settings.tls_ca:
                ctx.load_verify_locations(cafile=settings.tls_ca)  # trusted in addition to the system store
        else:
            # Opportunistic TLS (RFC 7435): encrypt without authenticating, as MTAs do by default.
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        _contexts[key] = ctx
    return ctx


def encode_addr(addr: str) -> bytes:
    # The address as stored, byte for byte: quoted local parts (`"john..doe"@x`) keep their quotes
    # and case (RELIABILITY.md case 19); surrogateescape gives back any byte the intake kept.
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
            # out as it is (RELIABILITY.md case 24: MIME downgrade is out of scope; Postfix notes
            # that strict 7-bit servers are rare). BINARYMIME needs BDAT, which we do not send.
            if "8bitmime" in ext and value.upper() in ("8BITMIME", "7BIT"):
                args.append(p.encode("ascii", "surrogateescape"))
            continue
        if key == "SMTPUTF8":
            if "smtputf8" not in ext:
                # RELIABILITY.md case 23 (RFC 6531 §3.2): no silent downgrade of a UTF-8 envelope.
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


def want_tls(settings: Settings) -> bool:
    return settings.tls != "disabled"


# --- the SMTP client ---------------------------------------------------------------------------


class _TLSFailed(Exception):
    """The STARTTLS handshake failed: under "ifavailable" connect() retries in plaintext."""


class _OutOfStep(Exception):
    """Reply bytes arrived that no command asked for (RELIABILITY.md case 44, "unsolicited").
    aiosmtplib drops data that arrives while no command waits, but keeps what comes in the same
    read as a real reply and hands it to the NEXT command, shifting every later reply by one.
    Without PIPELINING nothing may follow a reply (RFC 5321 §4.1.1), so bytes left in its buffer
    after a reply mean the peer is out of step."""


class SMTPConnection:
    """One SMTP session (a `fastrelay.delivery.Connection`)."""

    __slots__ = ("_data_step", "_ext", "_fresh", "_hop", "_proto", "_settings", "_smtp", "remote",
                 "tls", "usable")

    def __init__(self, hop: Hop, settings: Settings):
        self._hop = hop
        self._settings = settings
        self._smtp: aiosmtplib.SMTP | None = None
        self._proto: SMTPProtocol | None = None
        self._ext: dict[str, str] = {}
        self._fresh = True  # no transaction started since the greeting or the last RSET
        self._data_step = 0
        self.remote = f"{hop.ip}:{hop.port}"
        self.usable = False
        self.tls = False

    # -- session setup ---------------------------------------------------------------------------

    async def _open(self, try_tls: bool) -> None:
        hop, s = self._hop, self._settings
        sock = await tcp_connect(hop, s.connect_timeout)
        try:
            smtp = aiosmtplib.SMTP(hostname=hop.name or hop.ip, sock=sock, local_hostname=s.helo_name,
                                   start_tls=False, timeout=s.greeting_timeout)
        except BaseException:  # a helo_name aiosmtplib refuses (whitespace, control characters)
            sock.close()
            raise
        try:
            try:
                await smtp.connect(timeout=s.greeting_timeout)
            except SMTPConnectResponseError as e:
                # RELIABILITY.md case 39: a 4xx/5xx greeting makes the host unusable, never a
                # per-recipient result (Postfix smtp_skip_5xx_greeting).
                code = e.code if 400 <= e.code < 600 else 451
                raise ConnectError(code, clean_text(e.message or "greeting refused"), hop=hop) from None
            except SMTPConnectTimeoutError:
                raise ConnectError(451, f"4.4.2 No greeting from {self.remote} in time", hop=hop) from None
            except SMTPResponseException as e:  # -1: a hostile greeting (case 44)
                raise ConnectError(451, clean_text(f"4.5.0 Bad greeting: {e.message}"), hop=hop) from None
            except (SMTPException, OSError) as e:
                raise ConnectError(451, clean_text(f"4.4.2 Connection lost before the greeting: {e}"),
                                   hop=hop) from None
            self._smtp = smtp
            self._proto = smtp.protocol
            await self._hello()
            if try_tls and want_tls(s):
                await self._starttls()
        except BaseException:
            smtp.close()
            self._smtp = None
            raise
        self._ext = smtp.esmtp_extensions
        self.usable = True

    async def _hello(self) -> None:
        smtp, s, hop = self._smtp, self._settings, self._hop
        try:
            helo = not s.esmtp
            if s.esmtp:
                try:
                    await smtp.ehlo(timeout=s.ehlo_timeout)
                except SMTPHeloError as e:
                    # RFC 5321 §4.1.4: a server that refuses EHLO with 5xx may still speak HELO.
                    if not (500 <= e.code < 600 and smtp.is_connected):
                        raise
                    helo = True
            if helo:
                await smtp.helo(timeout=s.ehlo_timeout)
        except SMTPResponseException as e:
            code = e.code if 400 <= e.code < 600 else 451
            raise ConnectError(code, clean_text(e.message or "EHLO/HELO refused"), hop=hop) from None
        except (SMTPException, OSError) as e:
            raise ConnectError(451, clean_text(f"4.4.2 Lost connection during EHLO: {e}"), hop=hop) from None
        if self._proto._buffer:  # see _OutOfStep
            raise ConnectError(451, f"4.5.0 Unsolicited reply data from {self.remote} after EHLO", hop=hop)

    async def _starttls(self) -> None:
        """RELIABILITY.md case 45, RFC 3207."""
        smtp, s, hop = self._smtp, self._settings, self._hop
        required = s.tls == "required"
        if "starttls" not in smtp.esmtp_extensions:
            if required:
                raise ConnectError(451, "4.7.4 TLS is required, but STARTTLS was not offered", hop=hop)
            return
        try:
            ctx = tls_context(s)
        except (OSError, ValueError) as e:
            raise ConnectError(451, clean_text(f"4.7.5 Cannot load the TLS CA file: {e}"), hop=hop) from None
        try:
            await smtp.starttls(server_hostname=hop.name or hop.ip, tls_context=ctx, timeout=s.tls_timeout)
        except SMTPResponseException as e:
            if e.code < 0:  # hostile reply to STARTTLS
                raise ConnectError(451, clean_text(f"4.5.0 Bad reply to STARTTLS: {e.message}"),
                                   hop=hop) from None
            if not smtp.is_connected:  # a 421: the server closed
                raise ConnectError(451, clean_text(f"4.4.2 STARTTLS answered {e.code} {e.message}"),
                                   hop=hop) from None
            if required:
                raise ConnectError(451, clean_text(f"4.7.4 TLS is required, but STARTTLS was refused: "
                                                   f"{e.code} {e.message}"), hop=hop) from None
            return  # 454 under "ifavailable": carry on in plaintext on this connection
        except (ssl.SSLError, SMTPException, OSError) as e:
            # A failed handshake or an untrusted certificate: the connection is gone (or unusable).
            smtp.close()
            if required:
                raise ConnectError(451, clean_text(f"4.7.5 TLS handshake failed: {e}"), hop=hop) from None
            raise _TLSFailed(str(e)) from None
        self.tls = True
        # RFC 3207 §4.2: forget what was learnt before TLS and ask again.
        await self._hello()

    # -- delivery -----------------------------------------------------------------------------------

    async def deliver(self, sender: str, mail_params: str, rcpts: list[tuple[str, str]],
                      body: bytes) -> list[RcptResult]:
        n = len(rcpts)
        if not self.usable or self._smtp is None:
            return [temp(f"4.4.2 Connection to {self.remote} is no longer usable")] * n
        args = mail_args(sender, mail_params, len(body), self._ext)
        if isinstance(args, RcptResult):
            return [args] * n
        results: list[RcptResult | None] = [None] * n
        todo = range(n)
        while todo:
            todo = await self._transaction(args, rcpts, body, todo, results)
        return results  # type: ignore[return-value]  # every slot is filled by _transaction

    async def _transaction(self, args: list[bytes], rcpts: list[tuple[str, str]], body: bytes,
                           todo: range | list[int], results: list[RcptResult | None]) -> list[int]:
        """One MAIL..DATA transaction for the recipients at `todo`; fills their results and returns
        the ones to send in another transaction (a remote "452 too many recipients", case 42)."""
        s, proto = self._settings, self._proto
        execute = self._smtp.execute_command
        phase = "RSET"
        accepted: list[int] = []
        try:
            if not self._fresh:
                # RFC 5321 §4.1.1.5: start each message from a clean state, whatever the last one left.
                r = await execute(b"RSET", timeout=s.rset_timeout)
                if proto._buffer:
                    raise _OutOfStep
                if r.code != 250:
                    return self._broken(todo, results, clean_text(f"4.4.2 RSET failed: {r.code} {r.message}"))
            self._fresh = False
            phase = "MAIL FROM"
            # MAIL and RCPT through execute_command, not mail()/rcpt(): those re-quote the address
            # through the email package, which mangles `"john..doe"@x` (RELIABILITY.md case 19).
            try:
                r = await execute(b"MAIL", *args, timeout=s.mail_timeout)
            except ValueError:
                # A control character in the sender or a parameter (RELIABILITY.md case 22),
                # refused by aiosmtplib before sending: the session is still clean.
                self._fresh = True
                bad = RcptResult(PERM, 501, "5.1.7 Bad sender address (control characters)")
                for i in todo:
                    results[i] = bad
                return []
            if proto._buffer:
                raise _OutOfStep
            if r.code != 250:
                if not 400 <= r.code < 600:  # a 2xx/3xx other than 250: out of step with the server
                    raise _OutOfStep
                # RELIABILITY.md case 41: every recipient of the transaction shares the MAIL result.
                res = self._reply(r.code, r.message)
                for i in todo:
                    results[i] = res
                return []
            phase = "RCPT TO"
            rest: list[int] = []
            for k, i in enumerate(todo):
                addr, params = rcpts[i]
                try:
                    r = await execute(b"RCPT", *rcpt_args(addr, params, self._ext), timeout=s.rcpt_timeout)
                except ValueError:
                    # aiosmtplib refuses control characters (RELIABILITY.md case 22) before sending
                    # anything: this address can never be delivered; the session is unharmed.
                    results[i] = RcptResult(PERM, 501, "5.1.3 Bad recipient address (control characters)")
                    continue
                if proto._buffer:
                    raise _OutOfStep
                code = r.code
                if 200 <= code < 300:
                    accepted.append(i)
                elif code == 452 and accepted:
                    # RFC 5321 §4.5.3.1.10: "too many recipients" - the rest go in the next transaction.
                    rest = list(todo[k:])
                    break
                else:
                    results[i] = self._reply(code, r.message)  # RELIABILITY.md case 42
                    if not self.usable:  # 421: the server is closing (§3.8); or a 3xx
                        return self._broken(todo, results, f"4.4.2 {self.remote} closed the session")
            if not accepted:
                # RELIABILITY.md case 42: nobody to send to; no DATA.
                phase = "RSET"
                r = await execute(b"RSET", timeout=s.rset_timeout)
                if proto._buffer:
                    raise _OutOfStep
                if r.code != 250:
                    return self._broken(todo, results, clean_text(f"4.4.2 RSET failed: {r.code} {r.message}"))
                self._fresh = True
                return []
            phase = "DATA"
            res = await self._data(body)
            for i in accepted:
                results[i] = res  # RELIABILITY.md case 43: one outcome for the whole transaction
            return rest if self.usable else self._broken(rest, results, "")
        except SMTPTimeoutError:
            why = self._trouble(phase, "4.4.2 Timed out waiting for the reply to {phase} from {remote}")
            return self._broken(todo, results, why)
        except _OutOfStep:
            # An unsolicited reply line (case 44): with the replies out of step, any result read
            # in this transaction may belong to another command, so none of them is trusted.
            for i in todo:
                results[i] = None
            why = self._trouble(phase, "4.5.0 Unsolicited reply data from {remote} after {phase}")
            return self._broken(todo, results, why)
        except SMTPResponseException as e:  # -1: over-long, endless or malformed reply (case 44)
            detail = e.message[:200].replace("{", "(").replace("}", ")")
            why = self._trouble(phase, "4.5.0 Bad reply to {phase} from {remote}: " + detail)
            return self._broken(todo, results, why)
        except (SMTPException, OSError):
            why = self._trouble(phase, "4.4.2 Lost connection with {remote} while sending {phase}")
            return self._broken(todo, results, why)

    async def _data(self, body: bytes) -> RcptResult:
        """DATA, the body and the final reply, through aiosmtplib's data(): it turns bare CR and LF
        into CRLF and dot-stuffs (RELIABILITY.md cases 3, 27)."""
        proto = self._proto
        self._data_step = 0
        # data() waits for the 354 and for the reply after the dot with ONE timeout, and its errors
        # do not say which wait failed. Shadowing the protocol's read_response for the call gives
        # each wait its own timeout (data_timeout, done_timeout: RFC 5321 §4.5.3.2, RELIABILITY.md
        # case 40) and counts the replies, so a failure after the dot is known as one.
        proto.read_response = self._read_data_reply
        try:
            r = await self._smtp.data(body, timeout=self._settings.done_timeout)
        except SMTPDataError as e:
            if self._data_step == 1 and not 400 <= e.code < 600:
                raise _OutOfStep from None  # anything but 354 or an error to DATA (a 250, say)
            return self._reply(e.code, e.message)
        finally:
            proto.__dict__.pop("read_response", None)
        return self._reply(r.code, r.message)

    async def _read_data_reply(self, timeout: float | None = None) -> aiosmtplib.SMTPResponse:
        step = self._data_step = self._data_step + 1
        s, proto = self._settings, self._proto
        r = await SMTPProtocol.read_response(proto, s.data_timeout if step == 1 else s.done_timeout)
        if proto._buffer:
            raise _OutOfStep  # before the body goes out, if it came with the 354
        return r

    def _trouble(self, phase: str, template: str) -> str:
        """The text of a synthetic 451; `template` has {phase} and {remote}."""
        if phase == "DATA" and self._data_step == 2:
            # RFC 5321 §3.8 / §4.5.3.2, RELIABILITY.md case 40: the message may have been taken;
            # retry, knowing it may arrive twice (Postfix: "message may be sent more than once").
            return clean_text(template.format(phase="end of data", remote=self.remote)
                              + "; the message may have been delivered (possible duplicate)")
        return clean_text(template.format(phase=phase, remote=self.remote))

    def _reply(self, code: int, text: str) -> RcptResult:
        res = reply_result(code, text)
        if code == 421 or not (200 <= code < 600) or 300 <= code < 400:
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
        if self._smtp is not None:
            self._smtp.close()  # also stops the flood of a hostile peer at once

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            if self.usable and smtp.is_connected:
                await smtp.execute_command(b"QUIT", timeout=min(QUIT_TIMEOUT, self._settings.rset_timeout))
        except Exception:
            pass  # QUIT is a courtesy; the session is over either way
        finally:
            self.usable = False
            try:
                smtp.close()
            except Exception:
                pass


async def connect(hop: Hop, settings: Settings) -> SMTPConnection:
    """An SMTP session to `hop`, greeted, EHLO'd and (per policy) under TLS; or ConnectError."""
    conn = SMTPConnection(hop, settings)
    try:
        await conn._open(try_tls=True)
    except _TLSFailed:
        # RELIABILITY.md case 45: opportunistic TLS that fails in the handshake retries once in
        # plaintext on a new connection ("required" raised ConnectError instead).
        await conn._open(try_tls=False)
    return conn
