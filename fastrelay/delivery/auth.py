"""Client side of SMTP AUTH to a next hop (Momentum's outbound_smtp_auth): PLAIN, LOGIN and XOAUTH2.

The credentials come from the conf (outbound_smtp_auth_user, _pass or _pass_file, _type) for the
message's domain and binding, with the usual fallback. They are sent only under TLS unless
outbound_smtp_auth_allow_plaintext, and never logged. Whatever goes wrong (no AUTH offered, the
mechanism not offered, no TLS, a refusal, a timeout) is a temporary failure of the messages with
the reason, the peer's reply included; the host is not marked down, because the same host may take
other credentials (issue 17).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastrelay.delivery import TEMP, RcptResult
from fastrelay.delivery.wire import Hostile, Lost, clean_text, reply_text

if TYPE_CHECKING:
    from fastrelay.config import Config
    from fastrelay.delivery.wire import WireSession

__all__ = ["OutboundAuth", "authenticate", "outbound_auth"]


@dataclass(frozen=True)
class OutboundAuth:
    """The credentials for one (domain, binding); `error` when they cannot be used (pass file)."""

    user: str
    password: str = field(repr=False)  # never in a repr, a log or a traceback's locals summary
    mech: str | None = None  # PLAIN, LOGIN, XOAUTH2; None: PLAIN if offered, else LOGIN
    allow_plaintext: bool = False
    error: str | None = None


def _path(setting) -> str:
    if os.path.isabs(setting.value) or setting.pos is None:
        return setting.value
    return os.path.join(os.path.dirname(os.path.abspath(setting.pos.file)), setting.value)


def outbound_auth(cfg: Config, domain: str, binding: str) -> OutboundAuth | None:
    """The outbound AUTH settings of mail to `domain` on `binding` (None: no AUTH)."""
    user = cfg.get("outbound_smtp_auth_user", domain, binding)
    if user is None:
        return None
    mech = cfg.get("outbound_smtp_auth_type", domain, binding)
    plain = cfg.get("outbound_smtp_auth_allow_plaintext", domain, binding)
    pf = cfg.lookup("outbound_smtp_auth_pass_file", domain, binding)
    if pf.value is not None:
        path = _path(pf)
        try:
            with open(path, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or str(e)
            return OutboundAuth(user, "", mech, plain, clean_text(
                f"4.3.5 Cannot read outbound_smtp_auth_pass_file {path}: {why}"))
    else:
        password = cfg.get("outbound_smtp_auth_pass", domain, binding)
        if password is None:
            return OutboundAuth(user, "", mech, plain,
                                "4.3.5 outbound_smtp_auth_user is set without outbound_smtp_auth_pass(_file)")
    return OutboundAuth(user, password, mech, plain)


def _offered(ext: dict[str, str]) -> list[str]:
    """The mechanisms an EHLO reply offers: "AUTH PLAIN LOGIN" (RFC 4954 §3), or the old "AUTH=..."."""
    mechs = ext.get("auth", "").upper().split()
    for kw, params in ext.items():
        if kw.startswith("auth="):
            mechs += [kw[5:].upper(), *params.upper().split()]
    return mechs


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


async def authenticate(session: WireSession, auth: OutboundAuth, timeout: float) -> RcptResult | None:
    """AUTH on an open, hello'd session; None on 235, else the temporary failure for its messages."""
    remote = session.remote
    if auth.error is not None:
        return RcptResult(TEMP, 451, auth.error)
    if not session.tls and not auth.allow_plaintext:
        return RcptResult(TEMP, 451, f"4.7.0 Credentials for {remote} are sent only under TLS, and the session "
                                     "is not encrypted (outbound_smtp_auth_allow_plaintext allows it)")
    offered = _offered(session._ext)
    if not offered:
        return RcptResult(TEMP, 451, f"4.7.0 {remote} does not offer AUTH")
    mech = auth.mech or ("PLAIN" if "PLAIN" in offered else "LOGIN")
    if mech not in offered:
        return RcptResult(TEMP, 451, clean_text(f"4.7.0 {remote} does not offer AUTH {mech} (it offers "
                                                f"{' '.join(offered)})"))
    user, pw = auth.user.encode("utf-8"), auth.password.encode("utf-8")
    if mech == "PLAIN":
        if b"\0" in user or b"\0" in pw:
            return RcptResult(TEMP, 451, "4.3.5 outbound_smtp_auth_user or _pass holds a NUL")
        steps = [b"AUTH PLAIN " + _b64(b"\0" + user + b"\0" + pw)]  # RFC 4616, initial response
    elif mech == "LOGIN":
        steps = [b"AUTH LOGIN", _b64(user), _b64(pw)]
    else:
        # XOAUTH2 (Google's and Microsoft's SASL mechanism): user and bearer token in one response.
        steps = [b"AUTH XOAUTH2 " + _b64(b"user=" + user + b"\x01auth=Bearer " + pw + b"\x01\x01")]
    what = f"AUTH {mech} as {auth.user}"
    try:
        for i, line in enumerate(steps):
            code, lines = await session._exchange(line + b"\r\n", timeout)
            if code == 334 and i + 1 < len(steps):
                continue
            if code == 334 and mech == "XOAUTH2":
                # The server's 334 carries a base64 JSON error; an empty line ends the exchange
                # and the final reply (535) follows.
                detail = reply_text(lines)
                code, lines = await session._exchange(b"\r\n", timeout)
                lines = [*lines, b"(" + detail.encode("utf-8", "replace")[:200] + b")"]
            elif code == 334 and mech == "PLAIN":
                # A server that does not take an initial response asks for it (RFC 4954 §4).
                code, lines = await session._exchange(steps[0][len(b"AUTH PLAIN "):] + b"\r\n", timeout)
            break
    except TimeoutError:
        why = f"4.4.2 Timed out waiting for the reply to {what} from {remote}"
    except Lost:
        why = f"4.4.2 Lost connection with {remote} during {what}"
    except Hostile as e:
        why = f"4.5.0 Bad reply from {remote} during {what}: {e.reason}"
    else:
        if code == 235:
            return None
        if code == 334:  # still asking after every step: abandon the exchange (RFC 4954 §4)
            try:
                code, lines = await session._exchange(b"*\r\n", timeout)
            except (TimeoutError, Lost, Hostile):
                pass
        return RcptResult(TEMP, 451, clean_text(f"4.7.0 {what} to {remote} failed: {code} {reply_text(lines)}"))
    if session._wire is not None:
        session._wire.abort()
    return RcptResult(TEMP, 451, clean_text(why))
