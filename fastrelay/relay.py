"""Compose the relay: listeners, spool, scheduler and delivery, started and stopped together."""

from __future__ import annotations

import asyncio
import logging

from fastrelay.config import Config

log = logging.getLogger("fastrelay.relay")


class StartupError(Exception):
    """The relay cannot start (a listener cannot bind, the spool cannot open)."""


class _NotYet(asyncio.Protocol):
    # Placeholder until the ESMTP server lands: refuse politely (RFC 5321 §3.1: 554 at connect).
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"554 5.3.2 fastrelay is not accepting mail yet\r\n")  # type: ignore[attr-defined]
        transport.close()


class Relay:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.servers: list[tuple[str, asyncio.Server]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for listen in self.cfg.esmtp_listens:
            host = listen.address.host or None
            try:
                srv = await loop.create_server(_NotYet, host, listen.address.port, reuse_address=True)
            except OSError as e:
                raise StartupError(f"ESMTP listener {listen.address}: {e.strerror or e}") from None
            self.servers.append(("smtp", srv))

    def describe_listeners(self) -> list[str]:
        out = []
        for kind, srv in self.servers:
            for sock in srv.sockets:
                addr = sock.getsockname()
                host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
                out.append(f"{kind} on {host}:{addr[1]}")
        return out

    async def stop(self) -> None:
        for _, srv in self.servers:
            srv.close()
        for _, srv in self.servers:
            await srv.wait_closed()
        self.servers.clear()
