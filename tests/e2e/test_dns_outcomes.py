"""docs/reliability.md case 46: null MX, NXDOMAIN, SERVFAIL, implicit MX, CNAME, MX to loopback."""

from __future__ import annotations

from tests.e2e.conftest import body, drained, records, send


async def test_null_mx_bounces_at_once(dns, sinks, relay):
    (senders,) = await sinks(1)
    dns.null_mx("nomail.test")
    dns.add_mx("sender.test", 10, "mx.sender.test")
    dns.add_a("mx.sender.test", "127.0.0.2")
    h = await relay()
    await send(h, ["x@nomail.test"], body("nm"), sender="s@sender.test")
    (dsn,) = await senders.wait_for(1)
    await drained(h)
    (p,) = records(h, "P")
    assert p[10].startswith("556 5.1.10") and records(h, "T") == []
    assert b"Status: 5.1.10" in dsn.data


async def test_nxdomain_bounces(dns, sinks, relay):
    h = await relay()
    dns.nxdomain("gone.test")
    await send(h, ["x@gone.test"], body("nx"), sender="")
    await drained(h)
    (p,) = records(h, "P")
    assert p[10].startswith("550 5.4.4")


async def test_servfail_defers_then_delivers(dns, sinks, relay):
    (sink,) = await sinks(1)
    dns.servfail("flaky.test")
    h = await relay()
    await send(h, ["x@flaky.test"], body("sf"))
    import asyncio

    for _ in range(100):
        if records(h, "T"):
            break
        await asyncio.sleep(0.05)
    (t,) = records(h, "T")[:1]
    assert t[10].startswith("451 4.4.3")
    dns.heal("flaky.test")
    dns.add_mx("flaky.test", 10, "mx.flaky.test", ttl=0)
    dns.add_a("mx.flaky.test", "127.0.0.2", ttl=0)
    await sink.wait_for(1, timeout=15)
    await drained(h)


async def test_implicit_mx_and_cname(dns, sinks, relay):
    a, b = await sinks(2)
    dns.add_a("plain.test", "127.0.0.2")  # no MX: the domain itself (RFC 5321 §5.1)
    dns.add_mx("alias.test", 10, "mx-alias.alias.test")
    dns.add_cname("mx-alias.alias.test", "real.alias.test")
    dns.add_a("real.alias.test", "127.0.0.3")
    h = await relay()
    await send(h, ["x@plain.test"], body("im"))
    await send(h, ["y@alias.test"], body("cn"))
    await a.wait_for(1)
    await b.wait_for(1)
    await drained(h)


async def test_mx_pointing_at_a_prohibited_host(dns, relay):
    dns.add_mx("loop.test", 10, "mx.loop.test")
    dns.add_a("mx.loop.test", "127.0.0.2")
    h = await relay('Prohibited_Hosts = ( "127.0.0.2" )\n')
    await send(h, ["x@loop.test"], body("lp"), sender="")
    await drained(h)
    (p,) = records(h, "P")
    assert p[10].startswith("554 5.4.6")
