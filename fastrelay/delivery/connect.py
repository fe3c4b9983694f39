"""Open a delivery connection to one hop with the client its protocol needs (SMTP, LMTP, XFER)."""

from __future__ import annotations

from fastrelay.delivery import ConnectError, Connection, Hop, Settings, lmtp, smtp


async def connect(hop: Hop, settings: Settings) -> Connection:
    """The scheduler's connector (fastrelay.queue.Connector): a ready session, or ConnectError
    (the host is unusable: docs/reliability.md cases 38, 39, 45)."""
    proto = hop.proto
    if proto == "smtp":
        return await smtp.connect(hop, settings)
    if proto == "lmtp":
        return await lmtp.connect(hop, settings)
    if proto == "xfer":
        from fastrelay.delivery.xfer import connect_xfer  # aiohttp is loaded only where XFER is used

        return await connect_xfer(hop, settings)
    raise ConnectError(451, f"4.3.5 Unknown delivery protocol {proto!r}", hop=hop)
