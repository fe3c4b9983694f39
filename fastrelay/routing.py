"""Resolve a destination into preference-ordered hosts (Gateway, Routes, __mx__, DNS) and pick a
host under its connection limit through the route table (seeds 002 and 004).

A destination is (domain, binding). Its plan (the hosts, their route-table site, the delivery
method) is cached until the shortest TTL among the records it was built from (or a route's own
`ttl=`). The route table does the counting (fastrelay._core or its twin); this module only
builds sites and maps host ids back to addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass

from fastrelay import _impl
from fastrelay.config import Config
from fastrelay.config.types import HostPort, Route
from fastrelay.delivery import Hop
from fastrelay.dns import DNSNotFound, DNSTempError, Resolver

log = logging.getLogger("fastrelay.routing")

_rt = __import__(_impl.RouteTable.__module__, fromlist=["NO_SLOT"])
NO_SLOT = _rt.NO_SLOT
ALL_DOWN = _rt.ALL_DOWN

# A plan built only from IP literals never expires on its own; re-read it this often anyway so a
# conf reload or Host limits apply.
STATIC_PLAN_TTL = 300.0


class RouteError(Exception):
    """No usable host for a destination: `permanent` errors bounce, others defer."""

    def __init__(self, permanent: bool, code: int, text: str):
        super().__init__(f"{code} {text}")
        self.permanent = permanent
        self.code = code
        self.text = text


@dataclass
class Plan:
    domain: str  # the routing domain (after reroute_domain)
    binding: str
    site: int
    hops: dict[int, Hop]  # route-table host id -> address
    method: str
    expires: float  # monotonic


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Router:
    def __init__(self, cfg: Config, resolver: Resolver, table=None, worker: int = 0):
        self.cfg = cfg
        self.dns = resolver
        self.table = table if table is not None else _impl.RouteTable()
        # True when the table's counts are shared with other worker processes: a release there
        # wakes nobody here, so a destination waiting for a slot looks again now and then.
        self.shared = getattr(self.table, "shared", None) is not None
        self.worker = worker  # this process's column in the shared counters
        self._want_slots: dict[int, int] = {}  # site id -> shared slot of "someone waits for it"
        self._wanting: set[int] = set()  # sites this worker marked as waited for
        self.prohibited = tuple(cfg.get("Prohibited_Hosts"))
        # Our own listening (ip, port) pairs, filled in by the relay once its listeners are bound:
        # a route to one of them is a loop whatever Prohibited_Hosts says (case 46, 5.4.6).
        self.own_addresses: set[tuple[str, int]] = set()
        self._plans: dict[tuple[str, str], Plan] = {}
        self._pending: dict[tuple[str, str], asyncio.Future] = {}

    # --- plans --------------------------------------------------------------------------------
    async def plan(self, domain: str, binding: str = "default") -> Plan:
        key = (domain, binding)
        p = self._plans.get(key)
        if p is not None and p.expires > time.monotonic():
            return p
        fut = self._pending.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            p = await self._build(domain, binding)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters re-raise it, nobody else must
            raise
        else:
            self._plans[key] = p
            fut.set_result(p)
            return p
        finally:
            self._pending.pop(key, None)

    def _routes(self, domain: str, binding: str) -> tuple[list[Route], int]:
        """The effective route list and default port. Routes and Gateway override MX lookup;
        when both apply, the one set in the more specific scope wins (Routes on a tie)."""
        cfg = self.cfg
        port = cfg.get("Remote_SMTP_Port", domain, binding)
        routes = cfg.lookup("Routes", domain, binding)
        gateway = cfg.lookup("Gateway", domain, binding)
        if gateway.value is not None and (routes.value is None or _rank(gateway.scope) < _rank(routes.scope)):
            gw: HostPort = gateway.value
            return [Route("smtp", gw.host, gw.port, None, None, None, str(gw))], port
        if routes.value is not None:
            return list(routes.value), port
        return [Route("mx", text="__mx__")], port

    async def _build(self, domain: str, binding: str) -> Plan:
        cfg = self.cfg
        method = cfg.get("Delivery_Method", domain, binding)
        routes, default_port = self._routes(domain, binding)
        ttls: list[float] = []
        hops: list[Hop] = []
        prohibited = 0
        for i, r in enumerate(routes):
            proto = r.scheme if r.scheme in ("lmtp", "xfer") else ("lmtp" if method == "LMTP" else "smtp")
            if method == "delay_xfer" and proto != "xfer":
                raise RouteError(False, 451, f"4.3.5 Delivery_Method delay_xfer for {domain} needs xfer:// routes")
            port = r.port or default_port
            try:
                found = await self._expand(domain, r, i)
            except DNSNotFound as e:
                if r.scheme == "mx":
                    # RELIABILITY.md case 46: NXDOMAIN for the recipient domain bounces (5.4.4).
                    raise RouteError(True, 550, f"5.4.4 Host or domain name not found: {e}") from None
                raise RouteError(False, 451, f"4.4.4 Route host not found: {e}") from None
            except DNSTempError as e:
                raise RouteError(False, 451, f"4.4.3 DNS lookup failed, will retry: {e}") from None
            for pref, name, ips, ttl in found:
                if r.ttl is not None:
                    ttl = float(r.ttl)
                ttls.append(ttl)
                for ip in ips:
                    if self._prohibited(ip) or self._is_self(ip, port):
                        prohibited += 1
                        continue
                    hops.append(Hop(ip, port, proto, name, pref))
        if not hops:
            if prohibited:
                raise RouteError(True, 554, f"5.4.6 Mail for {domain} loops back to myself (Prohibited_Hosts)")
            raise RouteError(False, 451, f"4.4.4 No usable address for any host of {domain}")
        limit = cfg.get("max_outbound_connections", domain, binding)
        t = self.table
        ids: dict[int, Hop] = {}
        groups: dict[int, list[int]] = {}
        for h in sorted(hops, key=lambda h: h.pref):
            hid = t.host(f"{h.proto}:{h.ip}:{h.port}")
            if hid in ids:
                continue  # the same address reached through two names: once is enough
            ids[hid] = h
            groups.setdefault(h.pref, []).append(hid)
            hl = self.cfg.host_lookup("max_outbound_connections", h.ip) or self.cfg.host_lookup(
                "max_outbound_connections", h.name
            )
            t.set_host_limit(hid, hl.value if hl is not None else 0)
        site = t.site(list(groups.values()), limit)
        ttl = min(ttls) if ttls else STATIC_PLAN_TTL
        return Plan(domain, binding, site, ids, method, time.monotonic() + min(ttl, STATIC_PLAN_TTL))

    async def _expand(self, domain: str, r: Route, index: int) -> list[tuple[int, str, list[str], float]]:
        """One route entry -> [(preference, host name, [ip, ...], ttl)]. Seed 004: entries without
        an explicit preference are tried in the order listed."""
        pref = r.pref if r.pref is not None else index
        if r.scheme == "mx":
            return await self._mx_hosts(domain)
        if _is_ip(r.host):
            return [(pref, r.host, [r.host], float("inf"))]
        if r.lookup == "a":
            ips, ttl = await self.dns.addresses(r.host)
            return [(pref, r.host, ips, ttl)]
        # type=mx, or no type (seed 002: "resolve the gateway using MX records. If there are no
        # MX records, ... as an A record").
        mx, ttl = await self.dns.mx(r.host)
        if mx and mx != [(0, "")]:
            out = []
            for mpref, exch in mx:
                ips, attl = await self._addresses_or_empty(exch)
                out.append((pref if r.pref is not None else mpref + index * 65536, exch, ips, min(ttl, attl)))
            return out
        if r.lookup == "mx":
            return []
        ips, attl = await self.dns.addresses(r.host)
        return [(pref, r.host, ips, attl)]

    async def _mx_hosts(self, domain: str) -> list[tuple[int, str, list[str], float]]:
        mx, ttl = await self.dns.mx(domain)
        if mx == [(0, "")] or any(exch == "" for _, exch in mx):
            # RFC 7505 null MX: the domain accepts no mail; bounce at once, no A fallback.
            raise RouteError(True, 556, f"5.1.10 Domain {domain} does not accept mail (null MX)")
        if not mx:
            # RFC 5321 §5.1: no MX records: the domain itself is the implicit MX.
            ips, attl = await self.dns.addresses(domain)
            return [(0, domain, ips, attl)]
        out = []
        for pref, exch in mx:
            # An MX whose name resolves to nothing is skipped (RELIABILITY.md case 46).
            ips, attl = await self._addresses_or_empty(exch)
            out.append((pref, exch, ips, min(ttl, attl)))
        return out

    async def _addresses_or_empty(self, host: str) -> tuple[list[str], float]:
        try:
            return await self.dns.addresses(host)
        except DNSNotFound:
            return [], 60.0

    def _is_self(self, ip: str, port: int) -> bool:
        own = self.own_addresses
        if not own:
            return False
        if (ip, port) in own:
            return True
        # A wildcard listener answers on every local address, loopback included.
        return any(h in ("0.0.0.0", "::") and p == port for h, p in own) and ipaddress.ip_address(ip).is_loopback

    def _prohibited(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return any(addr.version == n.version and addr in n for n in self.prohibited)

    # --- slots ---------------------------------------------------------------------------------
    def acquire(self, plan: Plan) -> int:
        """A host id with a slot reserved, NO_SLOT (all at their limits) or ALL_DOWN."""
        return self.table.acquire(plan.site, time.monotonic())

    def release(self, plan: Plan, host: int) -> None:
        self.table.release(plan.site, host)

    # --- waiting across workers (issue 13) ----------------------------------------------------
    def _want_slot(self, plan: Plan) -> int:
        slot = self._want_slots.get(plan.site)
        if slot is None:
            keys = sorted(self.table.host_key(h) for h in plan.hops)
            slot = self._want_slots[plan.site] = self.table.shared.slot("want:" + "|".join(keys))
        return slot

    def want(self, plan: Plan, on: bool) -> None:
        """Mark (or unmark) that this worker waits for a slot of the plan's site, so the others
        stop keeping idle connections there (the mark is swept with the rest if it dies)."""
        if not self.shared:
            return
        if on and plan.site not in self._wanting:
            self.table.shared.acquire(self._want_slot(plan), self.worker, 0)
            self._wanting.add(plan.site)
        elif not on and plan.site in self._wanting:
            self._wanting.discard(plan.site)
            self.table.shared.release(self._want_slot(plan), self.worker)

    def wanted_elsewhere(self, plan: Plan) -> bool:
        """Another worker waits for a slot of the plan's site."""
        if not self.shared:
            return False
        sh, slot = self.table.shared, self._want_slot(plan)
        return sh.count(slot) > sh.held(slot, self.worker)

    def host_failed(self, plan: Plan, host: int) -> None:
        """Avoid a failing host for host_failure_retry seconds (Host scope first)."""
        hop = plan.hops[host]
        s = self.cfg.host_lookup("host_failure_retry", hop.ip)
        wait = s.value if s is not None else self.cfg.get("host_failure_retry", plan.domain, plan.binding)
        self.table.mark_down(host, time.monotonic() + wait)

    def host_ok(self, plan: Plan, host: int) -> None:
        self.table.mark_up(host)

    def invalidate(self, domain: str, binding: str = "default") -> None:
        self._plans.pop((domain, binding), None)

    def total_active(self) -> int:
        return self.table.total_active()


_SCOPE_RANK_PREFIX = (("Binding ", 0), ("Binding_Group ", 2), ("Domain ", 3), ("global", 4), ("default", 5))


def _rank(scope: str) -> int:
    """Lower is more specific: binding::domain, binding, binding_group, domain, global, default."""
    if "::Domain " in scope:
        return -1
    for prefix, rank in _SCOPE_RANK_PREFIX:
        if scope.startswith(prefix):
            return rank
    return 5
