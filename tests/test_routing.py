"""The router: plans from Gateway/Routes/__mx__ via real DNS, prohibited hosts, slots and failures."""

from __future__ import annotations

import pytest

from fastrelay import _impl
from fastrelay.config import loads
from fastrelay.dns import Resolver
from fastrelay.routing import ALL_DOWN, NO_SLOT, RouteError, Router
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
