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
    worker = getattr(relay, "worker", None)
    front = None
    if worker is not None:
        # Workers > 1 (fastrelay.admin.workers): only worker 0 serves the Admin_Listener, on the
        # sockets the supervisor bound, as a front over every worker's queue.
        if worker.index != 0 or not worker.admin_sockets:
            return out
        from fastrelay.admin.workers import WorkerFront

        front = WorkerFront(relay, worker.peers, worker.secret)
    try:
        for i, listen in enumerate(relay.cfg.admin_listens):
            try:
                srv = AdminServer(relay, listen, front=front)
            except (OSError, ValueError) as e:
                raise StartupError(f"Admin listener {listen.address}: {e}") from None
            try:
                if front is not None:
                    await srv.start(None, 0, sock=worker.admin_sockets[i])
                else:
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


async def start_internal(relay: Any) -> Any:
    """Workers > 1: the internal admin endpoint of a worker other than 0 (None otherwise)."""
    worker = getattr(relay, "worker", None)
    if worker is None or worker.index == 0 or worker.peer_socket is None:
        return None
    from fastrelay.admin.workers import InternalServer

    srv = InternalServer(relay, worker.peer_socket, worker.secret)
    await srv.start()
    return srv
