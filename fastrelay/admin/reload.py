"""Apply a new configuration to a running relay: validate everything first, then switch at once.

Nothing in flight is dropped: SMTP sessions keep their listener (a removed listener stops
accepting and is closed when its last session ends), deliveries keep the plan and slot they
hold, and the queue, router and listeners read the new values from their next decision on.
A configuration that does not load, or asks for what needs a restart, changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastrelay.config import Config, ConfigErrors, load
from fastrelay.dns import dns_servers

log = logging.getLogger("fastrelay.reload")

# How often a removed listener is checked for its last session, and for how long at most.
DRAIN_POLL = 0.2
# Options a running process cannot change: the spool is open, the scheduler is started or not,
# the spool writer's CPU policy was set as it started (fastrelay.cpu).
RESTART_ONLY = ("Spool_Base", "suspend_delivery", "spool_fsync", "Mainlog", "cpu_scheduling")


def _refused(errors: list[str]) -> dict:
    for e in errors:
        log.error("reload refused: %s", e)
    return {"reloaded": False, "errors": errors, "changes": []}


async def reload_relay(relay: Any, new: Config | None = None) -> dict:
    """Re-read the conf file (when `new` is None), validate it and apply it."""
    if new is None:
        path = relay.cfg.files[0] if relay.cfg.files else None
        if path is None:
            return _refused(["the running configuration was not read from a file"])
        try:
            new = load(path)
        except ConfigErrors as e:
            return _refused([str(x) for x in e.errors])
    return await _apply(relay, new)


async def _apply(relay: Any, new: Config) -> dict:
    from fastrelay.bindings import Assigner
    from fastrelay.smtp.server import ListenSettings, SMTPServer

    old: Config = relay.cfg
    errors = []
    for opt in RESTART_ONLY:
        if opt == "Spool_Base":
            if new.spool_dir != old.spool_dir:
                errors.append(f"Spool_Base changed ({old.spool_dir} -> {new.spool_dir}); that needs a restart")
        elif new.get(opt) != old.get(opt):
            errors.append(f"{opt} changed; that needs a restart")
    if new.workers != old.workers:
        # The supervisor forks the workers and splits the spool into shards by their number.
        errors.append(f"Workers changed ({old.workers} -> {new.workers}); that needs a restart")
    if getattr(relay, "worker", None) is not None:
        # With Workers > 1 the supervisor binds every listening socket and hands it down (issue
        # 13); a worker binding one of its own would clash with its siblings.
        def addrs(c: Config) -> list[str]:
            return sorted(str(x.address) for x in (*c.esmtp_listens, *c.http_listens, *c.admin_listens))

        if addrs(new) != addrs(old):
            errors.append("listeners added, removed or moved; with Workers > 1 that needs a restart "
                          "(the supervisor owns the listening sockets)")
        if new.xfer_server_enabled != old.xfer_server_enabled:
            errors.append("the XFER server turned on or off; with Workers > 1 that needs a restart")
    from fastrelay.config.model import check_runnable

    errors += [str(e) for e in check_runnable(new)[0]]  # what `fastrelay run` would refuse
    # Every listener's settings are built before anything changes (a bad TLS file refuses it all).
    settings = {}
    for listen in new.esmtp_listens:
        try:
            settings[str(listen.address)] = (listen, ListenSettings(listen))
        except (OSError, ValueError) as e:
            errors.append(f"ESMTP listener {listen.address}: {e}")
    admin_tokens = {}
    from fastrelay.admin.api import read_token

    for listen in new.admin_listens:
        try:
            admin_tokens[str(listen.address)] = (listen, read_token(listen))
        except (OSError, ValueError) as e:
            errors.append(f"Admin listener {listen.address}: {e}")
    xfer_settings = {}
    if new.xfer_server_enabled:
        from fastrelay.xfer.server import XferServerSettings

        for listen in new.http_listens:
            try:
                xfer_settings[str(listen.address)] = (listen, XferServerSettings.from_listen(listen))
            except (OSError, ValueError) as e:
                errors.append(f"HTTP listener {listen.address}: {e}")
    if errors:
        return _refused(errors)

    changes: list[str] = []
    # Bindings (issue 10): Binding_Header, a listener's Binding/Binding_Group and the bindings'
    # Sender_Domains are read again at the switch; mail already queued keeps its binding.
    binder = Assigner(new)
    # New listeners are bound before the switch, so a port in use refuses the reload whole. With
    # Workers > 1 the addresses did not change (checked above): the supervisor's sockets serve.
    from fastrelay.admin.api import AdminServer
    from fastrelay.xfer.server import XferServer

    def smtp_server(listen: Any, s: Any) -> Any:
        srv = SMTPServer(s, relay)
        srv.binder = binder.for_listener(listen)
        return srv

    current = _match(settings, [srv for srv in relay.smtp_servers if srv.sockets])
    admin_current = _match(admin_tokens, list(relay.admin_servers))
    # XFER (seeds 000/001: HTTP_Listener under `script "msys.xfer.server"`), as for ESMTP.
    xfer_current = _match(xfer_settings, list(relay.xfer_servers))
    bound: list = []  # every server this reload started, stopped again if a later one fails
    started, admin_started, xfer_started = [], [], []
    in_worker = getattr(relay, "worker", None) is not None
    for kind, wanted, running, make, out in (
        ("ESMTP", settings, current, smtp_server, started),
        ("Admin", admin_tokens, admin_current, lambda listen, _tok: AdminServer(relay, listen), admin_started),
        ("HTTP", xfer_settings, xfer_current, lambda listen, xs: XferServer(xs, relay), xfer_started),
    ):
        for key, (listen, what) in wanted.items():
            if in_worker or key in running.values():
                continue
            srv = make(listen, what)
            try:
                await srv.start(listen.address.host or None, listen.address.port)
            except OSError as e:
                for x in bound:
                    await x.stop()
                return _refused([f"{kind} listener {listen.address}: {e.strerror or e}"])
            bound.append(srv)
            out.append(srv)
            changes.append(f"{kind} listener {listen.address} added")

    # --- the switch: no await from here to the end, so nothing sees half of it ---------------------
    relay.cfg = new
    relay.binder = binder
    for srv, key in current.items():
        if key is not None:
            srv.s = settings[key][1]
            srv.binder = binder.for_listener(settings[key][0])
            _refresh_smtp(srv)
        else:
            changes.append(f"ESMTP listener {_bound(srv)} removed (closing after its last session)")
            srv.server.close()  # stop accepting; its sessions finish on their own
            _background(_drain(relay, srv))
    relay.smtp_servers.extend(started)
    for a, key in admin_current.items():
        if key is not None:
            a.api.token = admin_tokens[key][1]
        else:
            relay.admin_servers.remove(a)
            # After this answer went out: the reload may have come in on this very listener.
            asyncio.get_running_loop().call_later(0.5, lambda a=a: _background(a.stop()))
            changes.append(f"Admin listener {_bound(a)} removed")
    relay.admin_servers.extend(admin_started)
    for x, key in xfer_current.items():
        if key is not None:
            x.update(xfer_settings[key][1])
        else:
            relay.xfer_servers.remove(x)
            # Stops accepting now; requests in flight get their SHUTDOWN_TIMEOUT to commit.
            _background(x.stop())
            changes.append(f"HTTP listener {_bound(x)} removed")
    relay.xfer_servers.extend(xfer_started)
    resolver = getattr(relay, "resolver", None)
    if resolver is not None and resolver.reconfigure(dns_servers(new), new.get("DNS_Timeout")):
        changes.append("DNS resolver: new servers or timeout, cache emptied")
    q = relay.queue
    if q is not None:
        router = q.router
        router.cfg = new
        router.prohibited = tuple(new.get("Prohibited_Hosts"))
        for key in list(router._plans):
            router.invalidate(*key)  # the next session plans with the new routes and limits
        for srv in relay.smtp_servers:
            for sock in srv.sockets:
                addr = sock.getsockname()
                router.own_addresses.add((addr[0], addr[1]))
        q.api_reconfigure(new)  # fresh destinations: timeouts, TLS policy and routes read again
    if getattr(relay, "spool", None) is not None:
        relay.spool.commit_delay = new.get("spool_commit_delay")  # from the writer's next batch
        relay.spool.few_clients = new.get("spool_commit_few_clients")
    from fastrelay.admin import logfmt

    logfmt.apply(new)
    changes += config_diff(old, new)
    changes.append("configuration applied (routes, limits, TLS policy, relay_hosts, listeners, DNS)")
    log.info("configuration reloaded from %s: %s", ", ".join(new.files) or "?", "; ".join(changes))
    return {"reloaded": True, "errors": [], "changes": changes}


def _values(sc: Any) -> dict:
    return {k: v for k, (v, _pos) in sc.values.items()}


def config_diff(old: Config, new: Config) -> list[str]:
    """What the operator changed, one line per option or stanza (for the log and the answer)."""
    from fastrelay.config import schema

    out = []

    def opts(where: str, a: dict, b: dict) -> None:
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                opt = schema.BY_KEY.get(k)
                name = opt.name if opt else k
                secret = k in ("admin_token", "xfer_secret", "xfer_token", "xfer_tokens")
                fa = "(unset)" if k not in a else ("(secret)" if secret else opt.format(a[k]) if opt else a[k])
                fb = "(unset)" if k not in b else ("(secret)" if secret else opt.format(b[k]) if opt else b[k])
                out.append(f"{where}{name}: {fa} -> {fb}")

    opts("", _values(old.global_), _values(new.global_))
    for kind, a, b in (("Domain", old.domains, new.domains), ("Host", old.hosts, new.hosts)):
        for name in sorted(set(a) | set(b)):
            if name not in a:
                out.append(f"{kind} {name} added")
            elif name not in b:
                out.append(f"{kind} {name} removed")
            else:
                opts(f"{kind} {name}: ", _values(a[name]), _values(b[name]))
    for name in sorted(set(old.bindings) | set(new.bindings)):
        if name not in old.bindings:
            out.append(f"Binding {name} added")
        elif name not in new.bindings:
            out.append(f"Binding {name} removed")
        else:
            ob, nb = old.bindings[name], new.bindings[name]
            opts(f"Binding {name}: ", _values(ob.scope), _values(nb.scope))
            for d in sorted(set(ob.domains) | set(nb.domains)):
                if d not in ob.domains or d not in nb.domains:
                    out.append(f"Binding {name} Domain {d} {'added' if d not in ob.domains else 'removed'}")
                else:
                    opts(f"Binding {name} Domain {d}: ", _values(ob.domains[d]), _values(nb.domains[d]))
    return out


_TASKS: set[asyncio.Task] = set()


def _background(coro: Any) -> None:
    t = asyncio.ensure_future(coro)
    _TASKS.add(t)
    t.add_done_callback(_TASKS.discard)


def _bound(srv: Any) -> str:
    for sock in srv.sockets:
        host, port = sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "?"


def _match(wanted: dict, servers: list) -> dict:
    """Each running server -> the key of the Listen entry it serves in the new conf, or None.
    A Listen with port 0 matches a server bound on its host (the kernel chose the port); a
    Listen without a host matches a server on the wildcard address."""
    out: dict = {}
    taken: set[str] = set()
    for srv in servers:
        out[srv] = None
        for sock in srv.sockets:
            host, port = sock.getsockname()[:2]
            for key, entry in wanted.items():
                addr = entry[0].address
                if key in taken:
                    continue
                same_host = addr.host == host or (not addr.host and host in ("0.0.0.0", "::"))
                if same_host and addr.port in (port, 0):
                    out[srv] = key
                    taken.add(key)
                    break
            break
    return out


def _refresh_smtp(srv: Any) -> None:
    # The server caches what it derived from its settings.
    for attr in ("_ehlo_cache", "_policy_cache"):
        cache = getattr(srv, attr, None)
        if isinstance(cache, dict):
            cache.clear()
    srv.greeting = f"220 {srv.s.hostname} ESMTP fastrelay\r\n".encode()


async def _drain(relay: Any, srv: Any) -> None:
    try:
        while srv.sessions:
            await asyncio.sleep(DRAIN_POLL)
    finally:
        await srv.stop()
        if srv in relay.smtp_servers:
            relay.smtp_servers.remove(srv)
