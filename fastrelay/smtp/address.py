"""Parse MAIL FROM / RCPT TO arguments: the path (RFC 5321 §4.1.2) and the ESMTP parameters.

No `email` package on this hot path (docs/performance.md: the stdlib header parser cost a naive relay 10% of
its time): a compiled regular expression takes the common `<user@example.com>` form, and a small
scanner handles quoted local parts, source routes and address literals.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

from fastrelay.message import NOTIFY_DELAY, NOTIFY_FAILURE, NOTIFY_NEVER, NOTIFY_SUCCESS, utf8_addr_decode, xtext_decode
from fastrelay.smtp import replies as R

# RFC 5321 §4.5.3.1.1 and .2: local part 64 octets, domain 255 octets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_LDH = r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_FAST = re.compile(rf"<([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@({_LDH}(?:\.{_LDH})*)>")
_DOT_ATOM = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*")
# Labels: letters, digits, hyphen (and underscore, which real MTAs accept); U-labels with SMTPUTF8.
_LABEL = re.compile(r"[A-Za-z0-9_\u0080-\U0010ffff](?:[A-Za-z0-9_\u0080-\U0010ffff-]*[A-Za-z0-9_\u0080-\U0010ffff])?")
_CTRL = re.compile(r"[\x00-\x1f\x7f]")
_PARAM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_PARAM_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+")
# RFC 3461 §4: xtext = *( xchar / "+" 2HEXUPPER ), xchar = "!".."~" except "+" and "=".
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")
# RFC 6533 §3: utf-8-addr-xtext adds "\x{HEX}"; utf-8-addr-unitext (SMTPUTF8 only) adds raw UTF-8.
_UTF8_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]|\+[0-9A-F]{2}|\\x\{[0-9A-Fa-f]{1,6}\})+")
_UTF8_UNITEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e\u0080-\U0010ffff]|\+[0-9A-F]{2}|"
                           r"\\x\{[0-9A-Fa-f]{1,6}\})+")
_ADDR_TYPE = re.compile(rf"[{_ATEXT}]+")
# RFC 3461 §4.4: ENVID at most 100 characters; §4.2: an ORCPT parameter at most 500.
MAX_ENVID = 100
MAX_ORCPT = 500
_NOTIFY_WORDS = frozenset({NOTIFY_SUCCESS, NOTIFY_FAILURE, NOTIFY_DELAY})


class AddressError(Exception):
    """A path or parameter that must be refused with `reply`."""

    def __init__(self, reply: R.Reply):
        super().__init__(reply.text)
        self.reply = reply


class Path(NamedTuple):
    address: str  # local@domain as written (quotes of a quoted local part kept); "" for <>
    local: str
    domain: str  # as written; address literals keep their brackets
    quoted: bool  # the local part is a quoted string
    literal: bool  # the domain is an address literal [...]
    utf8: bool  # non-ASCII somewhere (needs SMTPUTF8, RFC 6531)


NULL_PATH = Path("", "", "", False, False, False)


def parse_path(arg: str, bad: R.Reply, allow_null: bool) -> tuple[Path, str]:
    """Split `<path> params` into a Path and the parameter text; AddressError(bad) if malformed."""
    s = arg.lstrip(" ")  # "MAIL FROM: <a@b>" is common and harmless; accept it
    m = _FAST.match(s)
    if m is not None:
        local, domain = m.group(1), m.group(2)
        if len(local) > MAX_LOCAL_PART or len(domain) > MAX_DOMAIN:
            raise AddressError(bad)
        return Path(f"{local}@{domain}", local, domain, False, False, False), s[m.end():]
    return _parse_slow(s, bad, allow_null)


def _parse_slow(s: str, bad: R.Reply, allow_null: bool) -> tuple[Path, str]:
    if not s.startswith("<"):
        raise AddressError(bad)  # docs/reliability.md case 20: no brackets
    if s.startswith("<>"):
        if not allow_null:
            raise AddressError(bad)
        return NULL_PATH, s[2:]
    i = 1
    n = len(s)
    # A source route (A-d-l, RFC 5321 §4.1.2 / appendix C): accept and ignore it (case 21).
    if s.startswith("<@"):
        colon = s.find(":", i)
        if colon < 0:
            raise AddressError(bad)
        for hop in s[1:colon].split(","):
            if not hop.startswith("@") or not _valid_domain(hop[1:]):
                raise AddressError(bad)
        i = colon + 1
    if i < n and s[i] == '"':
        j = i + 1
        while j < n:
            c = s[j]
            if c == "\\":
                if j + 1 >= n or not (" " <= s[j + 1] <= "~" or s[j + 1] >= "\x80"):
                    raise AddressError(bad)
                j += 2
                continue
            if c == '"':
                break
            if c < " " or c == "\x7f":
                raise AddressError(bad)
            j += 1
        else:
            raise AddressError(bad)  # unbalanced quote
        local = s[i : j + 1]
        quoted = True
        i = j + 1
    else:
        at = s.find("@", i)
        if at < 0:
            raise AddressError(bad)  # unqualified or missing '@'
        local = s[i:at]
        if not _DOT_ATOM.fullmatch(local):
            raise AddressError(bad)
        quoted = False
        i = at
    if i >= n or s[i] != "@":
        raise AddressError(bad)
    close = s.find(">", i)
    if close < 0:
        raise AddressError(bad)
    domain = s[i + 1 : close]
    literal = domain.startswith("[")
    if literal:
        if not _valid_literal(domain):
            raise AddressError(bad)
    elif not _valid_domain(domain):
        raise AddressError(bad)  # <a@b:25>, <a@@b>, empty, bad labels
    if len(local.encode()) > MAX_LOCAL_PART or len(domain.encode()) > MAX_DOMAIN:
        raise AddressError(bad)
    address = f"{local}@{domain}"
    utf8 = not address.isascii()
    return Path(address, local, domain, quoted, literal, utf8), s[close + 1 :]


def _valid_domain(d: str) -> bool:
    if not d or len(d) > MAX_DOMAIN:
        return False
    return all(_LABEL.fullmatch(label) and len(label.encode()) <= 63 for label in d.rstrip(".").split("."))


def _valid_literal(d: str) -> bool:
    if not d.endswith("]"):
        return False
    inner = d[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def parse_params(text: str, bad: R.Reply) -> dict[str, str | None]:
    """ESMTP parameters `KEY[=VALUE] ...` (RFC 5321 §4.1.2 esmtp-param); keys uppercased."""
    out: dict[str, str | None] = {}
    if not text:
        return out
    if text[0] != " ":
        raise AddressError(bad)  # `<a@b>X`: junk glued to the path
    for part in text.split(" "):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not _PARAM_KEY.fullmatch(key) or (eq and not _PARAM_VALUE.fullmatch(value)):
            raise AddressError(R.SYNTAX)
        key = key.upper()
        if key in out:
            raise AddressError(R.SYNTAX)  # RFC 3461 §4.1-4.4 (and 1870, 6152): each at most once
        out[key] = value if eq else None
    return out


# --- DSN parameters (RFC 3461, RFC 6533) ------------------------------------------------------------


def valid_ret(value: str | None) -> bool:
    """RET=FULL|HDRS (RFC 3461 §4.3), any case."""
    return value is not None and value.upper() in ("FULL", "HDRS")


def valid_envid(value: str | None) -> bool:
    """ENVID=xtext (RFC 3461 §4.4): at most 100 characters, printable US-ASCII once decoded."""
    if value is None or len(value) > MAX_ENVID or not _XTEXT.fullmatch(value):
        return False
    return all(" " <= c <= "~" for c in xtext_decode(value))


def valid_notify(value: str | None) -> bool:
    """NOTIFY=NEVER or a comma list of SUCCESS, FAILURE, DELAY, each once (RFC 3461 §4.1)."""
    if not value:
        return False
    words = value.upper().split(",")
    if words == [NOTIFY_NEVER]:
        return True
    return len(set(words)) == len(words) and all(w in _NOTIFY_WORDS for w in words)


def valid_orcpt(value: str | None, smtputf8: bool) -> bool:
    """ORCPT=addr-type;xtext (RFC 3461 §4.2); for addr-type utf-8 the RFC 6533 §3 forms (raw UTF-8
    only in an SMTPUTF8 transaction). The decoded address must not be empty or hold controls."""
    if not value or len(value) > MAX_ORCPT - len("ORCPT="):
        return False
    kind, semi, addr = value.partition(";")
    if not semi or not _ADDR_TYPE.fullmatch(kind):
        return False
    if kind.lower() == "utf-8":
        if not (_UTF8_UNITEXT if smtputf8 else _UTF8_XTEXT).fullmatch(addr):
            return False
        try:
            decoded = utf8_addr_decode(addr)
        except (ValueError, OverflowError):  # \x{110000} and beyond are no characters
            return False
    else:
        if not _XTEXT.fullmatch(addr):
            return False
        decoded = xtext_decode(addr)
    return bool(decoded) and not has_control(decoded)


def check_rcpt_params(params: dict[str, str | None], smtputf8: bool) -> R.Reply | None:
    """The reply refusing RCPT parameters, or None: NOTIFY and ORCPT (DSN) are the only ones."""
    for key, value in params.items():
        if key == "NOTIFY":
            if not valid_notify(value):
                return R.BAD_DSN_PARAM
        elif key == "ORCPT":
            if not valid_orcpt(value, smtputf8):
                return R.BAD_DSN_PARAM
        else:
            return R.UNKNOWN_PARAM
    return None


def has_control(text: str) -> bool:
    return _CTRL.search(text) is not None
