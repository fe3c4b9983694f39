"""Start the admin listeners of a relay (what Relay._start_admin calls)."""

from __future__ import annotations

from typing import Any

from fastrelay.admin.api import AdminServer


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
    except BaseException:
        for srv in out:
            await srv.stop()
        raise
    return out
