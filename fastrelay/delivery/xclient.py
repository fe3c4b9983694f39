"""Outbound XCLIENT (Momentum 25.6, Postfix XCLIENT_README): the original client's attributes in one command.

    XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PROTO=ESMTP HELO=client.example LOGIN=user

The next hop offers it in its EHLO reply ("250-XCLIENT NAME ADDR PROTO HELO LOGIN ..."), listing
the attributes it takes; only those are sent. A 220 greeting follows a successful XCLIENT: the
server starts over as if that client had connected, so the client says EHLO again (and starts
no transaction before it). The value "[UNAVAILABLE]" stands for an attribute that is not known.
"""

from __future__ import annotations

from typing import Any

# XCLIENT_README: attribute values are xtext (RFC 3461 §4); the server's line limit is 2048 in
# Postfix, so values are capped to keep the command within the 512 of RFC 5321 §4.5.3.1.4.
MAX_VALUE = 255
UNAVAILABLE = "[UNAVAILABLE]"
# The order the attributes are sent in.
ATTRIBUTES = ("NAME", "ADDR", "PROTO", "HELO", "LOGIN")


def xtext(value: str) -> str:
    """RFC 3461 §4: printable US-ASCII other than "+" and "=" as is, every other byte as +HH."""
    out = []
    for b in value.encode("utf-8", "surrogateescape"):
        if 33 <= b <= 126 and b not in (43, 61):
            out.append(chr(b))
        else:
            out.append(f"+{b:02X}")
    return "".join(out)


def unxtext(value: str) -> str:
    """The inverse of `xtext` (for tests and sinks); malformed escapes are kept as they are."""
    out = bytearray()
    i = 0
    while i < len(value):
        c = value[i]
        hexpair = value[i + 1:i + 3]
        if c == "+" and len(hexpair) == 2 and all(x in "0123456789ABCDEFabcdef" for x in hexpair):
            out.append(int(value[i + 1:i + 3], 16))
            i += 3
        else:
            out += c.encode()
            i += 1
    return out.decode("utf-8", "replace")


def client_of(env: Any) -> dict[str, str]:
    """The original client of a queued message as XCLIENT attributes (unknown ones unavailable)."""
    ip = env.client_ip or ""
    if ip and ":" in ip:
        addr = "IPV6:" + ip  # XCLIENT_README: an IPv6 address carries the IPV6: prefix
    else:
        addr = ip or UNAVAILABLE
    proto = (env.protocol or "").upper()
    login = getattr(env, "auth_user", None) or env.meta.get("auth_user") or env.meta.get("login")
    attrs = {
        "NAME": UNAVAILABLE,  # no verified reverse name is kept with the message
        "ADDR": addr,
        "PROTO": "ESMTP" if proto.startswith("ESMTP") else ("SMTP" if proto.startswith("SMTP") else UNAVAILABLE),
        "HELO": env.helo or UNAVAILABLE,
    }
    if login:
        attrs["LOGIN"] = login
    return attrs


def command(attrs: dict[str, str], offered: str) -> bytes | None:
    """The XCLIENT line for `attrs`, restricted to the attributes the server lists in `offered`
    (the EHLO keyword's parameters); None if it takes none of them."""
    names = {w.upper() for w in offered.split()}
    parts = []
    for name in ATTRIBUTES:
        if name in attrs and name in names:
            v = attrs[name]
            v = v if v == UNAVAILABLE else xtext(v[:MAX_VALUE])
            parts.append(f"{name}={v}")
    if not parts:
        return None
    return ("XCLIENT " + " ".join(parts) + "\r\n").encode("ascii")
