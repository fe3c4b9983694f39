"""The envelope of a queued message: what the spool stores, the queue schedules and delivery reads."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# Recipient states (docs/reliability.md P3: durable per-recipient progress).
PENDING = 0  # not yet delivered: still to try (never tried, or deferred)
DELIVERED = 1  # the next hop accepted it (2xx)
FAILED = 2  # permanently failed or expired; a DSN was queued if the sender is not <>

FINAL_STATES = frozenset({DELIVERED, FAILED})

# DSN requests (RFC 3461) are kept as the client sent them, in the parameter strings the spool
# already stores (Recipient.params, Envelope.mail_params) and XFER already carries; the accessors
# below read them. So a spool row written before DSN support reads as "no DSN parameters given"
# (the RFC 3461 defaults), and the parameters go on to a next hop exactly as received.
NOTIFY_SUCCESS = "SUCCESS"
NOTIFY_FAILURE = "FAILURE"
NOTIFY_DELAY = "DELAY"
NOTIFY_NEVER = "NEVER"
# RFC 3461 §4.1: without NOTIFY the MTA behaves as for NOTIFY=FAILURE or FAILURE,DELAY, its choice;
# this one (as Postfix) sends delay notices then, when delay_warning_time is on.
DEFAULT_NOTIFY = frozenset({NOTIFY_FAILURE, NOTIFY_DELAY})

_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_UNICODE_ESC = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def param_value(params: str, key: str) -> str | None:
    """The value of ESMTP parameter `key` (uppercase) in a stored parameter string; None if absent."""
    for p in params.split():
        k, eq, v = p.partition("=")
        if k.upper() == key:
            return v if eq else ""
    return None


def xtext_decode(text: str) -> str:
    """RFC 3461 §4: "+HH" is the octet HH; every other character stands for itself."""
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), text)


def utf8_addr_decode(text: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext / -unitext: xtext, plus "\\x{HEX}" for one Unicode character."""
    return _UNICODE_ESC.sub(lambda m: chr(int(m.group(1), 16)), xtext_decode(text))


@dataclass(slots=True)
class Recipient:
    address: str  # as received: the local part's bytes and case kept (docs/reliability.md case 19)
    params: str = ""  # RCPT ESMTP parameters as received (NOTIFY=..., ORCPT=...)
    state: int = PENDING
    detail: str = ""  # the last response about this recipient (for logs and DSNs)

    def to_json(self) -> list:
        return [self.address, self.params, self.state, self.detail]

    @classmethod
    def from_json(cls, v: list) -> Recipient:
        return cls(v[0], v[1], v[2], v[3])

    @property
    def notify(self) -> frozenset[str]:
        """What the sender asked to be told about this recipient (RFC 3461 §4.1): a set of
        SUCCESS/FAILURE/DELAY, empty for NOTIFY=NEVER, DEFAULT_NOTIFY without NOTIFY."""
        v = param_value(self.params, "NOTIFY")
        if v is None:
            return DEFAULT_NOTIFY
        words = frozenset(w.strip().upper() for w in v.split(","))
        return frozenset() if NOTIFY_NEVER in words else words

    @property
    def orcpt(self) -> tuple[str, str] | None:
        """ORCPT (RFC 3461 §4.2) as (address type, decoded address), or None."""
        v = param_value(self.params, "ORCPT")
        if not v or ";" not in v:
            return None
        kind, _, addr = v.partition(";")
        kind = kind.lower()
        try:
            return kind, (utf8_addr_decode(addr) if kind == "utf-8" else xtext_decode(addr))
        except (ValueError, OverflowError):  # not from our intake (which refuses it): keep it as sent
            return kind, addr


@dataclass(slots=True)
class Envelope:
    """One spool entry: a sender, the recipients of ONE destination domain, and their state.

    A message for several domains is split into one entry per domain at reception (as Momentum
    does), so each has its own route, schedule and retries.
    """

    sender: str  # "" is the null sender <>
    recipients: list[Recipient]
    domain: str  # where it goes now (lowercase); a reroute changes it, the recipients keep theirs
    mail_params: str = ""  # MAIL ESMTP parameters as received (SIZE=..., BODY=8BITMIME, SMTPUTF8)
    client_ip: str = ""
    helo: str = ""
    protocol: str = "esmtp"  # esmtp, esmtps, smtp, xfer, local (our own DSNs)
    binding: str = "default"
    msgid: str = ""  # the id announced in "250 ... queued as" and used in every log line
    received_at: float = 0.0  # wall-clock time of reception here
    first_queued: float = 0.0  # wall-clock time it was first queued anywhere (kept by XFER teleport)
    attempts: int = 0
    next_attempt: float = 0.0  # wall-clock time it is due
    meta: dict[str, Any] = field(default_factory=dict)  # context: reroute, XFER origin and hops, ...

    @property
    def ret(self) -> str:
        """RET (RFC 3461 §4.3): "FULL", "HDRS", or "" when the client did not say."""
        return (param_value(self.mail_params, "RET") or "").upper()

    @property
    def envid(self) -> str:
        """ENVID (RFC 3461 §4.4), xtext-decoded; "" when none was given."""
        return xtext_decode(param_value(self.mail_params, "ENVID") or "")

    def pending(self) -> list[int]:
        """Indexes of the recipients not yet final."""
        return [i for i, r in enumerate(self.recipients) if r.state == PENDING]

    def done(self) -> bool:
        return all(r.state in FINAL_STATES for r in self.recipients)

    def to_json(self) -> dict:
        return {
            "v": 1,
            "sender": self.sender,
            "rcpts": [r.to_json() for r in self.recipients],
            "domain": self.domain,
            "mail_params": self.mail_params,
            "client_ip": self.client_ip,
            "helo": self.helo,
            "protocol": self.protocol,
            "binding": self.binding,
            "msgid": self.msgid,
            "received_at": self.received_at,
            "first_queued": self.first_queued,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict) -> Envelope:
        if d.get("v") != 1:
            raise ValueError(f"unknown envelope version {d.get('v')!r}")
        return cls(
            sender=d["sender"],
            recipients=[Recipient.from_json(r) for r in d["rcpts"]],
            domain=d["domain"],
            mail_params=d["mail_params"],
            client_ip=d["client_ip"],
            helo=d["helo"],
            protocol=d["protocol"],
            binding=d["binding"],
            msgid=d["msgid"],
            received_at=d["received_at"],
            first_queued=d["first_queued"],
            attempts=d["attempts"],
            next_attempt=d["next_attempt"],
            meta=d["meta"],
        )


def domain_of(address: str) -> str:
    """The domain of an address, lowercase ("" for an address with no @)."""
    at = address.rfind("@")
    return address[at + 1 :].lower() if at >= 0 else ""
