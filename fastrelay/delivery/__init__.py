"""Delivery: run SMTP, LMTP and XFER sessions and report per-recipient outcomes (no spool access).

The scheduler (fastrelay.queue) calls `connect(hop, settings)` for a connection slot the router
gave it, then `conn.deliver(...)` once per message, then `conn.close()`. What a next hop said
about each recipient comes back as a `RcptResult`; trouble with the host itself (refused,
timeout, 4xx/5xx greeting, TLS required but failed) is a `ConnectError`, so the scheduler can
mark the host down and try the next one (docs/reliability.md cases 38, 39, 45).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from fastrelay.delivery.auth import OutboundAuth
    from fastrelay.message import Envelope

# Recipient outcomes.
OK = 0  # accepted by the next hop (2xx)
TEMP = 1  # transient failure: defer (4xx, timeout, connection lost before the final reply)
PERM = 2  # permanent failure: bounce (5xx)


class RcptResult(NamedTuple):
    status: int  # OK, TEMP or PERM
    code: int  # the SMTP reply code (or a synthetic one: 451 for a lost connection)
    text: str  # the reply text, enhanced status code first when there is one; cleaned, capped

    @property
    def response(self) -> str:
        return f"{self.code} {self.text}"


class Hop(NamedTuple):
    """One host a connection can go to."""

    ip: str
    port: int
    proto: str  # "smtp", "lmtp" or "xfer"
    name: str  # the host name it came from (MX exchange, route host), for logs and TLS SNI
    pref: int


@dataclass(frozen=True)
class Settings:
    """How to talk to a destination, resolved from the conf for its (domain, binding)."""

    helo_name: str = "localhost"
    esmtp: bool = True  # False for Delivery_Method = SMTP: HELO, no extensions
    connect_timeout: float = 30.0
    greeting_timeout: float = 300.0
    ehlo_timeout: float = 300.0
    tls_timeout: float = 120.0
    mail_timeout: float = 300.0
    rcpt_timeout: float = 300.0
    data_timeout: float = 120.0  # DATA until 354, and each block of the body
    done_timeout: float = 600.0  # after the final dot (body_timeout)
    xfer_timeout: float = 5.0  # for an XFER response (Delivery_Response_Timeout)
    rset_timeout: float = 120.0
    tls: str = "ifavailable"  # "ifavailable" (opportunistic), "required" or "no" ("disabled" too)
    tls_verify: str | bool = "no"  # "no", "ca" (the chain) or "host" (chain and name); True = "host"
    tls_fallback: bool = True  # TLS_Ifavailable_Fallback: plaintext at once after a failed handshake
    tls_ca: str | None = None  # extra CA file to trust
    tls_cert: str | None = None  # TLS_Certificate: client certificate (PEM; may hold the key too)
    tls_key: str | None = None  # TLS_Key
    tls_protocols: str | None = None  # TLS_Protocols, normalised ("+ALL:-TLSv1.0")
    tls_ciphers: str | None = None  # TLS_Ciphers (OpenSSL cipher list)
    # MultiVIP (issue #10): the binding's source address, bound before connect; None: the kernel's.
    bind_address: str | tuple[str, ...] | None = None  # a list: one at random per connection, by family
    tls_implicit: bool = False  # RFC 8314: TLS from the first byte (SMTPS/LMTPS), no STARTTLS
    session_timeout: float = 0.0  # one bound for a whole session (Stalwart's remote timeout); 0: none
    binding: str = "default"  # for failure texts
    xclient: str = "no"  # XCLIENT: "no", "ifavailable" or "required" (Postfix XCLIENT_README)
    # XFER (seeds 000/001)
    http_uri: str = "/delay_message"
    http_method: str = "POST"
    http_host: str | None = None
    teleport: bool = False  # teleport_enabled: send the message's context along
    xfer_secret: str | None = None
    xfer_token: str | None = None
    auth: OutboundAuth | None = None  # SMTP AUTH to the next hop (fastrelay.delivery.auth, issue 17)
    extra: dict = field(default_factory=dict)


class ConnectError(Exception):
    """The host could not be used: the message was not tried there. `permanent` only for a 5xx
    greeting from the only host of a destination is decided by the scheduler, not here."""

    def __init__(self, code: int, text: str, *, hop: Hop | None = None, policy: bool = False):
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text
        self.hop = hop
        # The destination's own TLS policy refused this host (4.7.x): the host itself works, so
        # it stays usable for other destinations.
        self.policy = policy


class Connection(Protocol):
    usable: bool  # False once the connection cannot carry another message
    remote: str  # "ip:port" for logs

    async def deliver(self, sender: str, mail_params: str, rcpts: list[tuple[str, str]],
                      body: bytes) -> list[RcptResult]:
        """One transaction; one result per recipient, in order. Never raises for what the next
        hop answers or for a lost connection: those become TEMP/PERM results (and usable=False)."""
        ...

    async def close(self) -> None:
        """QUIT politely if possible, then close; never raises."""
        ...


class Transferring(Protocol):
    """An XFER connection (hop.proto == "xfer"): it needs the whole envelope, not just the
    addresses, so the scheduler calls `transfer` instead of `deliver`."""

    usable: bool
    remote: str

    async def transfer(self, env: Envelope, idx: list[int], body: bytes, key: tuple[str, str]) -> list[RcptResult]:
        """Send the recipients `idx` of `env` with `body` to the XFER peer; `key` is (origin node,
        origin id) for the peer's idempotency. One result per index: OK only after the peer's
        200 carrying its own durable id (docs/reliability.md P4)."""
        ...

    async def close(self) -> None: ...
