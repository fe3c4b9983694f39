"""Open a delivery connection to one hop with the client its protocol needs (SMTP, LMTP, XFER)."""

from __future__ import annotations

from fastrelay.delivery import ConnectError, Connection, Hop, Settings, lmtp, smtp


async def connect(hop: Hop, settings: Settings) -> Connection:
    """The scheduler's connector (fastrelay.queue.Connector): a ready session, or ConnectError
    (the host is unusable: RELIABILITY.md cases 38, 39, 45)."""
    proto = hop.proto
    if proto == "smtp":
        return await smtp.connect(hop, settings)
    if proto == "lmtp":
        return await lmtp.connect(hop, settings)
    if proto == "xfer":
        # Added by the XFER part later; until then the host is unusable, not the message.
        raise ConnectError(451, "4.3.5 XFER delivery not available", hop=hop)
    raise ConnectError(451, f"4.3.5 Unknown delivery protocol {proto!r}", hop=hop)
