"""Resolve a destination into preference-ordered hosts (Gateway, Routes, __mx__, DNS) and pick a
host under its connection limit through the route table (seeds 002 and 004).

A destination is (domain, binding). Its plan is an ordered list of tiers (route entry -> its
hosts grouped by MX preference, seed 004), cached until the shortest TTL among its entries (a
route's own `ttl=`, else the records it was built from). The route table does the counting
(fastrelay._core or its twin) and takes the plan's order as it is; this module builds the order
and maps host ids back to addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from dataclasses import dataclass, replace

from fastrelay import _impl
from fastrelay.config import Config
from fastrelay.config.types import HostPort, Route
from fastrelay.delivery import Hop
from fastrelay.dns import DNSNotFound, DNSTempError, Resolver, is_localhost

log = logging.getLogger("fastrelay.routing")

_rt = __import__(_impl.RouteTable.__module__, fromlist=["NO_SLOT"])
NO_SLOT = _rt.NO_SLOT
ALL_DOWN = _rt.ALL_DOWN

# A plan built only from IP literals never expires on its own; re-read it this often anyway so a
# conf reload or Host limits apply.
STATIC_PLAN_TTL = 300.0
# An entry that gave no host for now (SERVFAIL, timeout, no address) is looked up again this soon
# while the rest of the plan is used.
FAILED_ENTRY_TTL = 60.0


class RouteError(Exception):
    """No usable host for a destination: `permanent` errors bounce, others defer."""

    def __init__(self, permanent: bool, code: int, text: str):
        super().__init__(f"{code} {text}")
        self.permanent = permanent
        self.code = code
        self.text = text


@dataclass(frozen=True)
class Tier:
    """One step of a plan: the route entries it came from and their hosts.

    `groups` are the entries' hosts of equal preference, most preferred first: inside an entry
    that expands to several hosts (`__mx__`, a name with MX records) the MX preference orders
    them; a name with several addresses is one group (spread evenly, seed 004)."""

    entries: tuple[str, ...]  # the Routes entries (as written) this tier came from
    pref: int | None  # their explicit pref=, or None: placed by its position in the list
    groups: tuple[tuple[Hop, ...], ...]


@dataclass
class Plan:
    domain: str  # the routing domain (after reroute_domain)
    binding: str
    site: int
    hops: dict[int, Hop]  # route-table host id -> address
    method: str
    expires: float  # monotonic
    tiers: tuple[Tier, ...] = ()  # the order the route table walks, most preferred first
    failed: tuple[str, ...] = ()  # entries that gave no usable host this time, and why
    sts_enforce: bool = False  # an MTA-STS policy in enforce mode: verified TLS is required


@dataclass
class _Expanded:
    """What one route entry gave: hosts grouped by MX preference, or why it gave none."""

    route: Route
    position: int
    groups: list[list[Hop]]
    ttl: float
    error: RouteError | None = None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def order_entries(routes: list[Route]) -> list[tuple[int | None, list[int]]]:
    """The tier order of a Routes list, as (explicit pref or None, [entry positions]) (seed 004).

    "the routes are listed in preferential order, with the first listed item being attempted
    before any others, unless there is an explicit preference applied to the item": every entry
    without pref= is a tier of its own, in list order. The entries that carry pref= are sorted by
    it (equal values share one tier: "Momentum attempts to open connections to all of them
    evenly") and that sorted block takes the place of the first of them in the list.
    """
    explicit: dict[int, list[int]] = {}
    out: list[tuple[int | None, list[int]]] = []
    block_at = -1
    for i, r in enumerate(routes):
        if r.pref is None:
            out.append((None, [i]))
        else:
            if block_at < 0:
                block_at = len(out)
            explicit.setdefault(r.pref, []).append(i)
    if block_at >= 0:
        out[block_at:block_at] = [(pref, explicit[pref]) for pref in sorted(explicit)]
    return out


def _v6(hop: Hop) -> bool:
    return ":" in hop.ip


def shape_groups(groups: list[list[Hop]], strategy: str, max_mx: int = 0, max_addr: int = 0) -> list[list[Hop]]:
    """One route entry's groups under seed 003's ip-strategy and transport limits.

    - `max_mx`: only the first this many host names (in plan order) are kept ("the maximum number
      of MX hosts to try on each delivery attempt"); 0 keeps all.
    - `strategy`: "ipv4-only"/"ipv6-only" drop the other family; "X-then-Y" puts each group's Y
      addresses in a group of their own after its X ones, so the route table (which walks groups
      in order and skips hosts marked down) reaches Y only when no X address is usable or all of
      them failed ("fallback to IPv4 if unavailable").
    - `max_addr`: of each host name, only the first this many addresses, counted in strategy order
      ("the maximum number of IP addresses to try on each delivery attempt"); 0 keeps all.
    """
    names: list[str] = []
    out: list[list[Hop]] = []
    then = strategy in ("ipv6-then-ipv4", "ipv4-then-ipv6")
    first_v6 = strategy == "ipv6-then-ipv4"
    for group in groups:
        by_name: dict[str, list[Hop]] = {}
        for h in group:
            if h.name not in by_name:
                if h.name not in names:
                    if max_mx and len(names) >= max_mx:
                        continue
                    names.append(h.name)
                by_name[h.name] = []
            by_name[h.name].append(h)
        first: list[Hop] = []
        second: list[Hop] = []
        for hops in by_name.values():
            if strategy == "ipv4-only":
                hops = [h for h in hops if not _v6(h)]
            elif strategy == "ipv6-only":
                hops = [h for h in hops if _v6(h)]
            elif then:
                hops = [h for h in hops if _v6(h) == first_v6] + [h for h in hops if _v6(h) != first_v6]
            if max_addr:
                hops = hops[:max_addr]
            for h in hops:
                (second if then and _v6(h) != first_v6 else first).append(h)
        out.extend(g for g in (first, second) if g)
    return out


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
        # Synthetic destinations whose routes come from the operator, not the conf (a drain to a
        # peer, issue #14): routing domain -> routes.
        self.overrides: dict[str, list[Route]] = {}
        self._pending: dict[tuple[str, str], asyncio.Future] = {}
        self._sts = None  # fastrelay.mta_sts.MTASTS, made when a destination first needs it

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
        if domain in self.overrides:
            return list(self.overrides[domain]), port
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
        if method == "delay_xfer" and any(r.scheme != "xfer" for r in routes):
            raise RouteError(False, 451, f"4.3.5 Delivery_Method delay_xfer for {domain} needs xfer:// routes")
        # Seed 004: one entry that cannot be used does not fail the destination while another
        # can; so each entry is expanded on its own and its failure kept with it.
        expanded = [await self._expand_entry(domain, r, i, method, default_port) for i, r in enumerate(routes)]
        strategy = cfg.get("IP_Strategy", domain, binding)
        max_mx = cfg.get("Max_MX_Hosts", domain, binding)
        max_addr = cfg.get("Max_MX_Addresses", domain, binding)
        if strategy != "any" or max_mx or max_addr:
            for e in expanded:
                if e.groups:
                    e.groups = shape_groups(e.groups, strategy, max_mx, max_addr)
                    if not e.groups:
                        e.error = RouteError(False, 451, f"4.4.4 No address of {e.route.text} fits "
                                                         f"IP_Strategy {strategy}")
        sts_enforce = False
        if method != "delay_xfer" and any(e.route.scheme == "mx" and e.groups for e in expanded) and \
                cfg.get("use_mta_sts", domain, binding):
            sts_enforce = await self._apply_sts(domain, expanded, cfg.get("enable_mta_sts", domain, binding))
        now = time.monotonic()
        t = self.table
        ids: dict[int, Hop] = {}
        groups: list[list[int]] = []
        tiers: list[Tier] = []
        for pref, positions in order_entries(routes):
            members = [expanded[i] for i in positions]
            # Entries sharing an explicit pref are one tier: their first-choice hosts together,
            # then their second choices, and so on.
            merged: list[list[Hop]] = []
            for e in members:
                for k, group in enumerate(e.groups):
                    if k == len(merged):
                        merged.append([])
                    merged[k].extend(group)
            tier_groups: list[tuple[Hop, ...]] = []
            for group in merged:
                hids: list[int] = []
                kept: list[Hop] = []
                for h in group:
                    hid = t.host(f"{h.proto}:{h.ip}:{h.port}")
                    if hid in ids:
                        continue  # the same address reached earlier in the plan: once, first place
                    ids[hid] = h
                    hids.append(hid)
                    kept.append(h)
                    hl = cfg.host_lookup("max_outbound_connections", h.ip) or cfg.host_lookup(
                        "max_outbound_connections", h.name
                    )
                    t.set_host_limit(hid, hl.value if hl is not None else 0)
                if hids:
                    groups.append(hids)
                    tier_groups.append(tuple(kept))
            if tier_groups:
                tiers.append(Tier(tuple(e.route.text for e in members), pref, tuple(tier_groups)))
        failures = [e for e in expanded if e.error is not None]
        if not groups:
            # Defer while any failure may heal; bounce only when every entry failed for good.
            temp = next((e.error for e in failures if not e.error.permanent), None)
            if temp is not None:
                raise temp
            if failures:
                raise failures[0].error
            raise RouteError(False, 451, f"4.4.4 No usable address for any host of {domain}")
        failed = tuple(f"{e.route.text}: {e.error.code} {e.error.text}" for e in failures)
        if failed:
            log.warning("%s: route entries skipped: %s", domain, "; ".join(failed))
        if binding != "default":
            groups.append([self._binding_marker(binding)])
        site = t.site(groups, cfg.get("max_outbound_connections", domain, binding))
        ttl = min((e.ttl for e in expanded), default=STATIC_PLAN_TTL)
        return Plan(domain, binding, site, ids, method, now + ttl, tuple(tiers), failed, sts_enforce)

    def sts(self):
        """The relay's MTA-STS policy cache (fastrelay.mta_sts), made on first use."""
        if self._sts is None:
            from fastrelay.mta_sts import MTASTS

            ca = self.cfg.lookup("MTA_STS_CA")
            path = ca.value
            if path and not os.path.isabs(path) and ca.pos is not None:
                path = os.path.join(os.path.dirname(os.path.abspath(ca.pos.file)), path)
            self._sts = MTASTS(self.dns, self.cfg.get("MTA_STS_Timeout"), path, self.cfg.get("MTA_STS_Port"))
        return self._sts

    async def _apply_sts(self, domain: str, expanded: list[_Expanded], enable: bool = True) -> bool:
        """RFC 8461 §4.1 and §5: in enforce mode keep only the MX hosts the policy names (and say
        so when none is left: 4.7.0, deferred); testing mode (or enable_mta_sts = false) only
        logs. True if enforced."""
        policy = await self.sts().policy(domain)
        if policy is None or policy.mode == "none":
            return False
        mode = policy.mode if enable else "testing"
        for e in expanded:
            if e.route.scheme != "mx" or not e.groups:
                continue
            names = sorted({h.name for g in e.groups for h in g})
            refused = [n for n in names if not policy.allows(n)]
            if not refused:
                continue
            if mode == "testing":
                log.warning("%s: MTA-STS (testing): MX %s not in the policy (%s); delivering anyway",
                            domain, ", ".join(refused), " ".join(policy.mx))
                continue
            e.groups = [kept for g in e.groups if (kept := [h for h in g if policy.allows(h.name)])]
            if not e.groups:
                e.error = RouteError(False, 451, f"4.7.0 MTA-STS policy of {domain} (enforce) allows none of its "
                                                 f"MX hosts ({', '.join(names)}; policy: {' '.join(policy.mx)})")
        return mode == "enforce"

    async def _expand_entry(self, domain: str, r: Route, position: int, method: str,
                            default_port: int) -> _Expanded:
        """One route entry -> its usable hosts by MX preference, its TTL, or its failure."""
        proto = r.scheme if r.scheme in ("lmtp", "xfer") else ("lmtp" if method == "LMTP" else "smtp")
        port = r.port or default_port
        out = _Expanded(r, position, [], STATIC_PLAN_TTL)
        try:
            found = await self._expand(domain, r)
        except RouteError as e:
            out.error, out.ttl = e, FAILED_ENTRY_TTL
            return out
        except DNSNotFound as e:
            if r.scheme == "mx":
                # docs/reliability.md case 46: NXDOMAIN for the recipient domain bounces (5.4.4).
                out.error = RouteError(True, 550, f"5.4.4 Host or domain name not found: {e}")
            else:
                out.error = RouteError(False, 451, f"4.4.4 Route host not found: {e}")
            out.ttl = FAILED_ENTRY_TTL
            return out
        except DNSTempError as e:
            out.error, out.ttl = RouteError(False, 451, f"4.4.3 DNS lookup failed, will retry: {e}"), FAILED_ENTRY_TTL
            return out
        ttls: list[float] = []
        own = prohibited = 0
        temp_errors: list[str] = []
        last_pref = -1
        for pref, name, ips, ttl, trusted, error in found:
            ttls.append(ttl)
            if error is not None:
                temp_errors.append(error)
                continue
            group: list[Hop] = []
            for ip in ips:
                if self._is_self(ip, port):
                    own += 1
                    continue
                # Prohibited_Hosts guards against DNS tricks (Momentum): an address the conf
                # names itself is trusted; one learned from DNS is checked.
                if not trusted and ip.lower() not in self.cfg.hosts and self._prohibited(ip):
                    prohibited += 1
                    continue
                group.append(Hop(ip, port, proto, name, r.pref if r.pref is not None else pref))
            if group:
                if out.groups and last_pref == pref:
                    out.groups[-1].extend(group)  # several MXs of one preference: one group
                else:
                    out.groups.append(group)
                last_pref = pref
        # ttl=T is the entry's time to live as given (seed 004); otherwise the records' own TTL,
        # re-read at least every STATIC_PLAN_TTL so conf and Host limits apply.
        out.ttl = float(r.ttl) if r.ttl is not None else min([*ttls, STATIC_PLAN_TTL])
        if temp_errors:
            # A host of this entry could not be resolved for now: look again soon.
            out.ttl = min(out.ttl, FAILED_ENTRY_TTL)
        if not out.groups:
            if temp_errors:
                out.error = RouteError(False, 451, f"4.4.3 DNS lookup failed, will retry: {temp_errors[0]}")
            elif own:
                out.error = RouteError(True, 554, f"5.4.6 Mail for {domain} loops back to myself")
            elif prohibited:
                out.error = RouteError(
                    True, 554, f"5.4.6 Mail for {domain}: {r.text} resolves only to Prohibited_Hosts addresses"
                )
            else:
                out.error = RouteError(False, 451, f"4.4.4 No usable address for {r.text}")
        return out

    async def _expand(self, domain: str, r: Route) -> list[tuple[int, str, list[str], float, bool, str | None]]:
        """One route entry -> [(MX preference, host name, [ip, ...], ttl, trusted, temp error)],
        lowest preference first. `trusted`: the address is named in the conf, not from DNS."""
        if r.scheme == "mx":
            return await self._mx_hosts(domain, domain)
        if _is_ip(r.host):
            return [(0, r.host, [r.host], STATIC_PLAN_TTL, True, None)]
        if is_localhost(r.host):
            # RFC 6761 §6.3: "localhost" is loopback, never asked of DNS; named in the conf.
            ips, ttl = await self.dns.addresses(r.host)
            return [(0, r.host, ips, STATIC_PLAN_TTL, True, None)]
        if r.lookup == "a":
            ips, ttl = await self.dns.addresses(r.host)
            return [(0, r.host, ips, ttl, False, None)]
        # type=mx, or no type (seed 002: "resolve the gateway using MX records. If there are no
        # MX records, ... as an A record").
        mx, ttl = await self.dns.mx(r.host)
        if mx and mx != [(0, "")]:
            return await self._exchanges(mx, ttl)
        if r.lookup == "mx":
            return []
        ips, attl = await self.dns.addresses(r.host)
        return [(0, r.host, ips, attl, False, None)]

    async def _mx_hosts(self, domain: str, name: str) -> list[tuple[int, str, list[str], float, bool, str | None]]:
        mx, ttl = await self.dns.mx(name)
        if mx == [(0, "")] or any(exch == "" for _, exch in mx):
            # RFC 7505 null MX: the domain accepts no mail; bounce at once, no A fallback.
            raise RouteError(True, 556, f"5.1.10 Domain {domain} does not accept mail (null MX)")
        if not mx:
            # RFC 5321 §5.1: no MX records: the domain itself is the implicit MX.
            ips, attl = await self.dns.addresses(name)
            return [(0, name, ips, attl, False, None)]
        return await self._exchanges(mx, ttl)

    async def _exchanges(self, mx: list[tuple[int, str]], ttl: float) -> list:
        out = []
        for pref, exch in mx:
            # An MX whose name resolves to nothing is skipped (docs/reliability.md case 46); one whose
            # lookup fails for now is skipped too, so the next MX is tried, and noted so that the
            # entry defers rather than bounces when no MX is left.
            try:
                ips, attl = await self.dns.addresses(exch)
            except DNSNotFound:
                out.append((pref, exch, [], FAILED_ENTRY_TTL, False, None))
            except DNSTempError as e:
                out.append((pref, exch, [], FAILED_ENTRY_TTL, False, str(e)))
            else:
                out.append((pref, exch, ips, min(ttl, attl), False, None))
        return out

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

    def _binding_marker(self, binding: str) -> int:
        """Issue #10 (Momentum's max_outbound_connections per binding and domain): each binding
        counts its own connections to an MX set. The route table keys a site by its hosts, so a
        binding's plan gets, as its last group, a host of its own that is never up: the site is
        the binding's, while the real hosts (and their Host limits) stay shared by everyone."""
        hid = self.table.host(f"binding:{binding}")
        self.table.mark_down(hid, float("inf"))
        return hid

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

    def failure_wait(self, plan: Plan, host: int) -> float:
        """host_failure_retry for this host of `plan` (Host scope first)."""
        hop = plan.hops[host]
        s = self.cfg.host_lookup("host_failure_retry", hop.ip)
        return s.value if s is not None else self.cfg.get("host_failure_retry", plan.domain, plan.binding)

    def host_failed(self, plan: Plan, host: int) -> None:
        """Avoid a failing host for host_failure_retry seconds, for every destination."""
        self.table.mark_down(host, time.monotonic() + self.failure_wait(plan, host))

    def without(self, plan: Plan, avoid: set[int]) -> Plan | None:
        """`plan` minus the hosts `avoid` (one destination's own refusals, such as its TLS
        policy), in the same order, on its own route-table site; None if no host is left. Host
        counts and limits are the table's, so they stay shared with every other site."""
        ids = {hop: h for h, hop in plan.hops.items()}
        groups: list[list[int]] = []
        tiers: list[Tier] = []
        for tier in plan.tiers:
            kept = [tuple(hop for hop in g if ids[hop] not in avoid) for g in tier.groups]
            kept = [g for g in kept if g]
            if kept:
                groups.extend([ids[hop] for hop in g] for g in kept)
                tiers.append(replace(tier, groups=tuple(kept)))
        if not groups:
            return None
        if plan.binding != "default":
            groups.append([self._binding_marker(plan.binding)])
        site = self.table.site(groups, self.table.site_limit(plan.site))
        hops = {h: hop for h, hop in plan.hops.items() if h not in avoid}
        return replace(plan, site=site, hops=hops, tiers=tuple(tiers))

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
