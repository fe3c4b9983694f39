"""Start the admin listeners of a relay (what Relay._start_admin calls)."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from fastrelay.admin.api import AdminServer

log = logging.getLogger("fastrelay.admin")


def _loopback_only(host: str) -> bool:
    try:
        return bool(host) and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def start_admin(relay: Any) -> list[AdminServer]:
    """One AdminServer per Admin_Listener Listen address; StartupError when one cannot start."""
    from fastrelay.admin import logfmt
    from fastrelay.relay import StartupError

    logfmt.apply(relay.cfg)  # Log_Format: the process log's lines from here on
    out: list[AdminServer] = []
    try:
        for listen in relay.cfg.admin_listens:
            try:
                srv = AdminServer(relay, listen)
            except (OSError, ValueError) as e:
                raise StartupError(f"Admin listener {listen.address}: {e}") from None
            try:
                await srv.start(listen.address.host or None, listen.address.port)
            except OSError as e:
                raise StartupError(f"Admin listener {listen.address}: {e.strerror or e}") from None
            out.append(srv)
            if srv.api.token is None and not _loopback_only(listen.address.host):
                log.warning("Admin listener %s has no Admin_Token: only loopback clients will be served",
                            listen.address)
    except BaseException:
        for srv in out:
            await srv.stop()
        raise
    return out
