"""The router: plans from Gateway/Routes/__mx__ via real DNS, prohibited hosts, slots and failures."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrelay import _impl
from fastrelay.config import loads
from fastrelay.config.types import parse_route
from fastrelay.dns import Resolver
from fastrelay.routing import ALL_DOWN, FAILED_ENTRY_TTL, NO_SLOT, RouteError, Router, order_entries
from tests.support import DNSServer


@pytest.fixture
def server():
    s = DNSServer("127.0.0.1", 0)
    yield s
    s.stop()


@pytest.fixture
def make(server, impl):
    def make(conf: str = "") -> Router:
        cfg = loads('Prohibited_Hosts = ( "0.0.0.0/8" )\n' + conf)
        return Router(cfg, Resolver([server.address], timeout=0.3, tries=1), impl.RouteTable())
    return make


def hops(plan):
    return sorted((h.pref, h.ip, h.port, h.proto, h.name) for h in plan.hops.values())


async def test_mx_plan(server, make):
    server.add_mx("ex.test", 20, "b.ex.test")
    server.add_mx("ex.test", 10, "a.ex.test")
    server.add_a("a.ex.test", "127.0.0.2")
    server.add_a("b.ex.test", "127.0.0.3")
    server.add_a("b.ex.test", "127.0.0.4")
    p = await make().plan("ex.test")
    assert hops(p) == [(10, "127.0.0.2", 25, "smtp", "a.ex.test"), (20, "127.0.0.3", 25, "smtp", "b.ex.test"),
                       (20, "127.0.0.4", 25, "smtp", "b.ex.test")]


async def test_gateway_routes_and_method(server, make):
    r = make('Gateway = 127.0.0.9:2525\nRemote_SMTP_Port = 26\n'
             'Domain l.test { Routes = ( "lmtp://127.0.0.5?port=24" "smtp://127.0.0.6?pref=5" ) }\n'
             'Domain m.test { Delivery_Method = LMTP }\n')
    assert hops(await r.plan("any.test")) == [(0, "127.0.0.9", 2525, "smtp", "127.0.0.9")]
    assert hops(await r.plan("l.test")) == [(0, "127.0.0.5", 24, "lmtp", "127.0.0.5"),
                                            (5, "127.0.0.6", 26, "smtp", "127.0.0.6")]
    assert hops(await r.plan("m.test")) == [(0, "127.0.0.9", 2525, "lmtp", "127.0.0.9")]


async def test_domain_routes_beat_global_gateway_and_domain_gateway_beats_global_routes(server, make):
    r = make('Gateway = 127.0.0.9\nDomain d.test { Routes = ( "127.0.0.5" ) }\n')
    assert [h[1] for h in hops(await r.plan("d.test"))] == ["127.0.0.5"]
    r = make('Routes = ( "127.0.0.9" )\nDomain d.test { Gateway = 127.0.0.5 }\n')
    assert [h[1] for h in hops(await r.plan("d.test"))] == ["127.0.0.5"]


async def test_null_mx_nxdomain_servfail(server, make):
    server.null_mx("nomail.test")
    server.nxdomain("gone.test")
    server.servfail("flaky.test")
    r = make()
    with pytest.raises(RouteError) as e:
        await r.plan("nomail.test")
    assert (e.value.permanent, e.value.code) == (True, 556) and "5.1.10" in e.value.text
    with pytest.raises(RouteError) as e:
        await r.plan("gone.test")
    assert (e.value.permanent, e.value.code) == (True, 550) and "5.4.4" in e.value.text
    with pytest.raises(RouteError) as e:
        await r.plan("flaky.test")
    assert (e.value.permanent, e.value.code) == (False, 451) and "4.4.3" in e.value.text


async def test_prohibited_hosts(server, make):
    server.add_mx("loop.test", 10, "mx.loop.test")
    server.add_a("mx.loop.test", "127.0.0.1")
    with pytest.raises(RouteError) as e:
        await make('Prohibited_Hosts = ( "127.0.0.1" )\n').plan("loop.test")
    assert e.value.permanent and "5.4.6" in e.value.text
    # The default covers all of loopback.
    cfg = loads("")
    router = Router(cfg, Resolver([server.address], timeout=0.3, tries=1))
    with pytest.raises(RouteError):
        await router.plan("loop.test")


async def test_slots_limits_failures_and_balance(server, make):
    for i in range(3):
        server.add_mx("bal.test", 10, f"mx{i}.bal.test")
        server.add_a(f"mx{i}.bal.test", f"127.0.0.{i + 2}")
    r = make("max_outbound_connections = 4\nhost_failure_retry = 100\n")
    p = await r.plan("bal.test")
    held = [r.acquire(p) for _ in range(4)]
    assert sorted(p.hops[h].ip for h in held[:3]) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert r.acquire(p) == NO_SLOT
    for h in held:
        r.release(p, h)
    assert r.total_active() == 0
    for hid in list(p.hops):
        r.host_failed(p, hid)
    assert r.acquire(p) == ALL_DOWN


async def test_domains_sharing_mxs_share_a_site(server, make):
    for d in ("one.test", "two.test"):
        server.add_mx(d, 10, "mx.shared.test")
    server.add_a("mx.shared.test", "127.0.0.2")
    r = make("max_outbound_connections = 1\n")
    p1, p2 = await r.plan("one.test"), await r.plan("two.test")
    assert p1.site == p2.site
    h = r.acquire(p1)
    assert h >= 0 and r.acquire(p2) == NO_SLOT
    r.release(p1, h)


def test_route_table_is_the_chosen_implementation():
    from fastrelay.config import loads as _l

    assert isinstance(Router(_l(""), Resolver()).table, _impl.RouteTable)


async def test_a_route_to_our_own_listener_is_a_loop(server, make):
    r = make('Domain me.test { Routes = ( "smtp://127.0.0.1?port=2525" ) }\n'
             'Domain any.test { Routes = ( "smtp://127.0.0.7?port=2525" ) }\n')
    r.own_addresses.add(("127.0.0.1", 2525))
    with pytest.raises(RouteError) as e:
        await r.plan("me.test")
    assert e.value.permanent and "5.4.6" in e.value.text
    assert [h[1] for h in hops(await r.plan("any.test"))] == ["127.0.0.7"]
    r.own_addresses.add(("0.0.0.0", 2525))  # a wildcard listener also answers on 127.0.0.7
    r.invalidate("any.test")
    with pytest.raises(RouteError):
        await r.plan("any.test")


# -- seed 004: the order of Routes ------------------------------------------------------------------

LISTED = ('"the routes are listed in preferential order, with the first listed item being attempted '
          'before any others, unless there is an explicit preference applied to the item"')


def order(r: Router, plan) -> list[list[str]]:
    """The plan's host groups as the route table walks them, as "ip" or "ip:port" strings."""
    by_id = r.table.site_groups(plan.site)
    # The plan's tiers and the table's site are the same order, group for group.
    assert [[plan.hops[h] for h in g] for g in by_id] == [list(g) for t in plan.tiers for g in t.groups]
    return [[plan.hops[h].ip for h in g] for g in by_id]


def picks(r: Router, plan, n: int = 6) -> list[str]:
    """Where n connections in a row go (each released before the next)."""
    out = []
    for _ in range(n):
        h = r.acquire(plan)
        assert h >= 0
        out.append(plan.hops[h].ip)
        r.release(plan, h)
    return out


def _mx_zone(server, pref_a: int = 10, pref_b: int = 20) -> None:
    server.add_mx("dest.test", pref_a, "a.dest.test")
    server.add_mx("dest.test", pref_b, "b.dest.test")
    server.add_a("a.dest.test", "127.0.0.5")
    server.add_a("b.dest.test", "127.0.0.6")
    server.add_mx("mxhost.test", 10, "one.mxhost.test")
    server.add_mx("mxhost.test", 10, "two.mxhost.test")
    server.add_mx("mxhost.test", 30, "three.mxhost.test")
    server.add_a("one.mxhost.test", "127.0.0.7")
    server.add_a("two.mxhost.test", "127.0.0.8")
    server.add_a("three.mxhost.test", "127.0.0.9")
    server.add_a("multi.test", "127.0.0.2")
    server.add_a("multi.test", "127.0.0.4")


# (Routes, MX preferences of dest.test, expected groups in order, where 6 connections go)
_ORDER_ROWS = [
    # __mx__ keeps its place: its MXs (by MX preference) before the smart host listed after it.
    ('"__mx__" "127.0.0.3"', (10, 20), [["127.0.0.5"], ["127.0.0.6"], ["127.0.0.3"]], ["127.0.0.5"] * 6),
    # A name with MX records keeps its place too; inside it, MX preference orders its hosts.
    ('"mxhost.test" "127.0.0.3"', (10, 20), [["127.0.0.7", "127.0.0.8"], ["127.0.0.9"], ["127.0.0.3"]],
     ["127.0.0.7", "127.0.0.8"] * 3),
    # The first entry exclusively, whatever the MX preferences of a later __mx__ (even 0).
    ('"127.0.0.3" "__mx__"', (0, 20), [["127.0.0.3"], ["127.0.0.5"], ["127.0.0.6"]], ["127.0.0.3"] * 6),
    # This is the route list that packed preferences past 16 bits and raised inside the table.
    ('"127.0.0.4" "mxhost.test"', (10, 20), [["127.0.0.4"], ["127.0.0.7", "127.0.0.8"], ["127.0.0.9"]],
     ["127.0.0.4"] * 6),
    # A name with several addresses is one group: spread evenly.
    ('"multi.test" "127.0.0.3"', (10, 20), [["127.0.0.2", "127.0.0.4"], ["127.0.0.3"]],
     ["127.0.0.2", "127.0.0.4"] * 3),
    # Explicit pref= orders the entries that carry it; equal values share one group.
    ('"smtp://127.0.0.3?pref=20" "smtp://127.0.0.4?pref=10"', (10, 20), [["127.0.0.4"], ["127.0.0.3"]],
     ["127.0.0.4"] * 6),
    ('"smtp://127.0.0.3?pref=10" "smtp://127.0.0.4?pref=10" "smtp://127.0.0.2?pref=10"', (10, 20),
     [["127.0.0.3", "127.0.0.4", "127.0.0.2"]], ["127.0.0.3", "127.0.0.4", "127.0.0.2"] * 2),
    # The seed's own example: the smart host with pref=1 first, then the MXs.
    ('"smtp://127.0.0.3?pref=1" "__mx__"', (0, 20), [["127.0.0.3"], ["127.0.0.5"], ["127.0.0.6"]],
     ["127.0.0.3"] * 6),
    # A backup listed last stays last, whatever its pref= says.
    ('"__mx__" "smtp://127.0.0.3?pref=100"', (10, 20), [["127.0.0.5"], ["127.0.0.6"], ["127.0.0.3"]],
     ["127.0.0.5"] * 6),
    # The explicit block (sorted) takes the place of its first entry; unmarked entries keep theirs.
    ('"smtp://127.0.0.3?pref=20" "127.0.0.2" "smtp://127.0.0.4?pref=10"', (10, 20),
     [["127.0.0.4"], ["127.0.0.3"], ["127.0.0.2"]], ["127.0.0.4"] * 6),
    ('"127.0.0.2" "smtp://127.0.0.3?pref=5" "__mx__" "smtp://127.0.0.4?pref=5"', (10, 20),
     [["127.0.0.2"], ["127.0.0.3", "127.0.0.4"], ["127.0.0.5"], ["127.0.0.6"]], ["127.0.0.2"] * 6),
    # The same address reached twice keeps its first place only.
    ('"127.0.0.6" "__mx__"', (10, 20), [["127.0.0.6"], ["127.0.0.5"]], ["127.0.0.6"] * 6),
]


@pytest.mark.parametrize(("routes", "prefs", "groups", "where"), _ORDER_ROWS, ids=[r[0] for r in _ORDER_ROWS])
async def test_routes_are_tried_in_listed_order(server, make, routes, prefs, groups, where):
    """Seed 004: "the routes are listed in preferential order, with the first listed item being
    attempted before any others, unless there is an explicit preference applied to the item" and
    "the first item is used exclusively unless it's unavailable, in which case the second item is
    used and so on"."""
    _mx_zone(server, *prefs)
    r = make(f"Domain dest.test {{ Routes = ( {routes} ) }}\n")
    p = await r.plan("dest.test")
    assert order(r, p) == groups
    assert picks(r, p) == where


async def test_next_entry_only_when_the_first_is_unavailable(server, make):
    """Seed 004: "the first item is used exclusively unless it's unavailable, in which case the
    second item is used and so on"."""
    _mx_zone(server)
    r = make('host_failure_retry = 100\nDomain dest.test { Routes = ( "__mx__" "127.0.0.3" ) }\n')
    p = await r.plan("dest.test")
    ids = {hop.ip: h for h, hop in p.hops.items()}
    r.host_failed(p, ids["127.0.0.5"])
    assert picks(r, p, 3) == ["127.0.0.6"] * 3
    r.host_failed(p, ids["127.0.0.6"])
    assert picks(r, p, 3) == ["127.0.0.3"] * 3
    r.host_ok(p, ids["127.0.0.5"])
    assert picks(r, p, 3) == ["127.0.0.5"] * 3


def test_order_entries_explicit_and_implicit():
    """Seed 004: "the first listed item being attempted before any others, unless there is an
    explicit preference applied to the item": unmarked entries keep their place, the marked ones
    are sorted by pref= into one block at the place of the first of them."""
    def tiers(*texts: str):
        return order_entries([parse_route(t) for t in texts])

    assert tiers("a", "b", "c") == [(None, [0]), (None, [1]), (None, [2])]
    assert tiers("smtp://a?pref=9", "b", "smtp://c?pref=1", "smtp://d?pref=9") == [
        (1, [2]), (9, [0, 3]), (None, [1])]
    assert tiers("a", "smtp://b?pref=3", "__mx__") == [(None, [0]), (3, [1]), (None, [2])]


# -- seed 004: one entry failing does not fail the destination --------------------------------------

@pytest.mark.parametrize("trouble", ["nxdomain", "servfail"])
async def test_smart_host_used_when_mx_lookup_fails(server, make, trouble):
    """Seed 004: `Routes = ( "smtp://my.local.smart.host?pref=1" "__mx__" )`; "the first item is
    used exclusively unless it's unavailable": an __mx__ that cannot be resolved never stops the
    smart host from being used."""
    getattr(server, trouble)("dest.test")
    r = make('Domain dest.test { Routes = ( "smtp://127.0.0.3?pref=1" "__mx__" ) }\n')
    p = await r.plan("dest.test")
    assert order(r, p) == [["127.0.0.3"]]
    assert len(p.failed) == 1 and "__mx__" in p.failed[0]
    # The failed entry is looked up again soon, not only when the smart host's plan expires.
    assert p.expires - time.monotonic() <= FAILED_ENTRY_TTL


# (Routes, DNS troubles, permanent?, enhanced code of the RouteError)
_FAIL_ROWS = [
    ('"__mx__"', {"dest.test": "nxdomain"}, True, "5.4.4"),
    ('"__mx__"', {"dest.test": "null_mx"}, True, "5.1.10"),
    ('"__mx__"', {"dest.test": "servfail"}, False, "4.4.3"),
    # Every entry permanently unresolvable: bounce (the first entry's reason).
    ('"__mx__" "__mx__"', {"dest.test": "nxdomain"}, True, "5.4.4"),
    # None usable and one failure temporary: defer.
    ('"smtp://gone.test?pref=1" "__mx__"', {"gone.test": "servfail", "dest.test": "nxdomain"}, False, "4.4.3"),
    ('"__mx__" "flaky.test"', {"dest.test": "null_mx", "flaky.test": "servfail"}, False, "4.4.3"),
    ('"__mx__" "flaky.test"', {"dest.test": "nxdomain", "flaky.test": "timeout"}, False, "4.4.3"),
]


@pytest.mark.parametrize(("routes", "troubles", "permanent", "status"), _FAIL_ROWS,
                         ids=[f"{r[0]}-{r[1]}" for r in _FAIL_ROWS])
async def test_destination_bounces_only_when_every_entry_fails_for_good(server, make, routes, troubles,
                                                                        permanent, status):
    """Seed 004: "the first item is used exclusively unless it's unavailable, in which case the
    second item is used and so on": a destination bounces only when every entry is permanently
    unresolvable, and defers when none is usable and some failure is temporary."""
    for name, what in troubles.items():
        getattr(server, what)(name)
    r = make(f"Domain dest.test {{ Routes = ( {routes} ) }}\n")
    with pytest.raises(RouteError) as e:
        await r.plan("dest.test")
    assert e.value.permanent is permanent
    assert e.value.text.startswith(status)


@pytest.mark.parametrize("trouble", ["servfail", "timeout"])
async def test_mx_host_lookup_failure_moves_to_the_next_mx(server, make, trouble):
    """Seed 004: "the first item is used exclusively unless it's unavailable, in which case the
    second item is used and so on": an MX whose address lookup fails for now is skipped."""
    server.add_mx("dest.test", 10, "a.dest.test")
    server.add_mx("dest.test", 20, "b.dest.test")
    getattr(server, trouble)("a.dest.test")
    server.add_a("b.dest.test", "127.0.0.6")
    r = make()
    p = await r.plan("dest.test")
    assert order(r, p) == [["127.0.0.6"]]
    # Only MX left unresolvable for now: defer, never bounce.
    server.remove("b.dest.test")
    getattr(server, trouble)("b.dest.test")
    r = make()
    with pytest.raises(RouteError) as e:
        await r.plan("dest.test")
    assert not e.value.permanent and e.value.text.startswith("4.4.3")


@pytest.mark.parametrize("ttl", [5, 3600, 86400])
async def test_route_ttl_is_the_entrys_time_to_live_as_given(server, make, ttl):
    """Seed 004: "`T` is the effective time-to-live for the entry in seconds"; not capped."""
    r = make(f'Domain dest.test {{ Routes = ( "smtp://127.0.0.3?ttl={ttl}" ) }}\n')
    before = time.monotonic()
    p = await r.plan("dest.test")
    assert before + ttl <= p.expires <= time.monotonic() + ttl
    server.add_a("named.test", "127.0.0.4", ttl=30)
    r = make(f'Domain dest.test {{ Routes = ( "smtp://named.test?ttl={ttl}&type=a" ) }}\n')
    p = await r.plan("dest.test")
    assert p.expires - time.monotonic() > ttl - 5


# -- Prohibited_Hosts guards against DNS tricks ------------------------------------------------------

_PROHIBITED_ROWS = [
    # An address named literally in Routes or Gateway is the operator's choice: trusted.
    ('Domain dest.test { Routes = ( "127.0.0.1" ) }', ["127.0.0.1"]),
    ('Domain dest.test { Routes = ( "lmtp://127.0.0.1?port=24" ) }', ["127.0.0.1"]),
    ('Domain dest.test { Gateway = 127.0.0.1:2525 }', ["127.0.0.1"]),
    # localhost is loopback by definition (RFC 6761), never a DNS answer.
    ('Domain dest.test { Routes = ( "lmtp://localhost?port=24" ) }', ["127.0.0.1"]),
    # An address learned from DNS is checked ...
    ('Domain dest.test { Routes = ( "trick.test" ) }', None),
    ('Domain dest.test { Routes = ( "__mx__" ) }', None),
    # ... unless a Host stanza names it.
    ('Host 127.0.0.1 { max_outbound_connections = 2 }\nDomain dest.test { Routes = ( "__mx__" ) }', ["127.0.0.1"]),
    # A trusted literal and a DNS trick in one list: the literal is used, the trick skipped.
    ('Domain dest.test { Routes = ( "__mx__" "127.0.0.3" ) }', ["127.0.0.3"]),
]


@pytest.mark.parametrize(("conf", "ips"), _PROHIBITED_ROWS, ids=[r[0] for r in _PROHIBITED_ROWS])
async def test_prohibited_hosts_checks_only_addresses_from_dns(server, conf, ips):
    """Momentum's prohibited_hosts: "Some providers use DNS tricks to deter systems ... One
    technique is to return a loopback or other local address to you when you query their MX
    records." The guard is for what DNS says, not for what the operator wrote."""
    server.add_mx("dest.test", 10, "mx.dest.test")
    server.add_a("mx.dest.test", "127.0.0.1")
    server.add_a("trick.test", "127.0.0.1")
    r = Router(loads(conf + "\n"), Resolver([server.address], timeout=0.3, tries=1))  # default: loopback
    if ips is None:
        with pytest.raises(RouteError) as e:
            await r.plan("dest.test")
        assert e.value.permanent and "Prohibited_Hosts" in e.value.text and "loops back" not in e.value.text
    else:
        p = await r.plan("dest.test")
        assert [ip for g in order(r, p) for ip in g] == ips


async def test_loops_back_to_myself_only_for_our_own_listener(server, make):
    """docs/reliability.md case 46: "loops back to myself" names a real loop: one of our listeners."""
    r = make('Domain lmtp.test { Routes = ( "lmtp://localhost?port=24" ) }\n'
             'Domain me.test { Routes = ( "smtp://localhost?port=2525" ) }\n')
    r.own_addresses.add(("0.0.0.0", 2525))
    p = await r.plan("lmtp.test")
    assert [(h.ip, h.port) for h in p.hops.values()] == [("127.0.0.1", 24)]
    with pytest.raises(RouteError) as e:
        await r.plan("me.test")
    assert e.value.permanent and "loops back to myself" in e.value.text


async def test_plan_without_some_hosts_keeps_the_order_and_shares_counts(server, make):
    """One destination's own refusals (its TLS policy) narrow its plan only: "the first item is
    used exclusively unless it's unavailable, in which case the second item is used and so on"."""
    _mx_zone(server)
    r = make('Domain dest.test { Routes = ( "mxhost.test" "127.0.0.3" ) }\n')
    p = await r.plan("dest.test")
    ids = {hop.ip: h for h, hop in p.hops.items()}
    q = r.without(p, {ids["127.0.0.7"], ids["127.0.0.8"]})
    assert order(r, q) == [["127.0.0.9"], ["127.0.0.3"]]
    assert q.site != p.site and picks(r, q, 2) == ["127.0.0.9"] * 2
    h = r.acquire(q)
    assert r.table.host_active(h) == 1  # the host's count is the one every site sees
    r.release(q, h)
    assert r.without(p, set(p.hops)) is None
    assert order(r, p) == [["127.0.0.7", "127.0.0.8"], ["127.0.0.9"], ["127.0.0.3"]]


@given(st.lists(st.one_of(st.none(), st.integers(0, 5)), max_size=12))
@settings(max_examples=300, deadline=None)
def test_order_entries_properties(prefs):
    """Seed 004: "the routes are listed in preferential order, with the first listed item being
    attempted before any others, unless there is an explicit preference applied to the item"."""
    routes = [parse_route(f"smtp://10.0.0.{i}" + ("" if p is None else f"?pref={p}")) for i, p in enumerate(prefs)]
    tiers = order_entries(routes)
    # Every entry exactly once.
    assert sorted(i for _, members in tiers for i in members) == list(range(len(prefs)))
    implicit = [members for pref, members in tiers if pref is None]
    explicit = [(pref, members) for pref, members in tiers if pref is not None]
    # Unmarked entries: one tier each, in list order.
    assert implicit == [[i] for i, p in enumerate(prefs) if p is None]
    # Marked entries: one contiguous block, sorted by pref, equal prefs together in list order,
    # standing where the first marked entry stood among the unmarked ones.
    assert [p for p, _ in explicit] == sorted({p for p in prefs if p is not None})
    for p, members in explicit:
        assert members == [i for i, q in enumerate(prefs) if q == p]
    if explicit:
        first = next(i for i, p in enumerate(prefs) if p is not None)
        at = sum(1 for p in prefs[:first] if p is None)
        assert [pref for pref, _ in tiers[at:at + len(explicit)]] == [p for p, _ in explicit]
