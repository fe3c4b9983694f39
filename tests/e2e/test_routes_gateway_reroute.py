"""Seeds 002 and 004: Gateway and Routes in their forms, Remote_SMTP_Port, reroute_domain."""

from __future__ import annotations

from tests.e2e.conftest import body, drained, send


async def test_global_gateway_and_domain_override(dns, sinks, relay):
    smart, local = await sinks(2)
    h = await relay("Gateway = 127.0.0.2\nDomain local.test { Gateway = 127.0.0.3 }\n")
    await send(h, ["x@anywhere.test"], body("gw1"))
    await send(h, ["y@local.test"], body("gw2"))
    assert [m.rcpt_tos for m in await smart.wait_for(1)] == [["x@anywhere.test"]]
    assert [m.rcpt_tos for m in await local.wait_for(1)] == [["y@local.test"]]
    await drained(h)


async def test_routes_url_with_port_and_preference(sinks, relay, sink_port):
    a, b = await sinks(2)
    h = await relay(
        f'Domain r.test {{ Routes = ( "smtp://127.0.0.3?pref=20&port={sink_port}" '
        f'"smtp://127.0.0.2?pref=10&port={sink_port}" ) }}\n'
    )
    await send(h, ["x@r.test"], body("rt"))
    await a.wait_for(1)
    await drained(h)
    assert b.messages == []


async def test_routes_hostname_resolved_as_a(dns, sinks, relay):
    (a,) = await sinks(1)
    dns.add_a("smart.host.test", "127.0.0.2")
    h = await relay('Routes = ( "smart.host.test" )\n')
    await send(h, ["x@whatever.test"], body("sh"))
    await a.wait_for(1)
    await drained(h)


async def test_reroute_domain_uses_the_other_domains_settings(sinks, relay):
    a, b = await sinks(2)
    h = await relay(
        "Domain gmail.test { reroute_domain = \"hub.test\" }\n"
        "Domain hub.test { Gateway = 127.0.0.3 reroute_domain = \"disabled\" }\n"
    )
    await send(h, ["x@gmail.test"], body("rr"))
    (m,) = await b.wait_for(1)
    await drained(h)
    assert m.rcpt_tos == ["x@gmail.test"] and a.messages == []


async def test_remote_smtp_port_is_the_default_port(dns, sinks, relay):
    (a,) = await sinks(1)
    dns.add_mx("p.test", 10, "mx.p.test")
    dns.add_a("mx.p.test", "127.0.0.2")
    h = await relay()  # the base conf sets Remote_SMTP_Port to the sinks' port
    await send(h, ["x@p.test"], body("port"))
    await a.wait_for(1)
    await drained(h)
