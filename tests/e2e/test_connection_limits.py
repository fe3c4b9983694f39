"""max_outbound_connections per destination and per Host is never exceeded (sink session peaks)."""

from __future__ import annotations

import asyncio

from tests.e2e.conftest import body, drained, send


async def test_domain_limit_is_never_exceeded(dns, sinks, relay):
    a, b = await sinks(2)
    for i, s in enumerate((a, b)):
        dns.add_mx("lim.test", 10, f"mx{i}.lim.test")
        dns.add_a(f"mx{i}.lim.test", s.host)
        s.faults.set("dot", delay=0.05)
    h = await relay("Domain lim.test { max_outbound_connections = 3 }\n")
    await asyncio.gather(*(send(h, [f"r{i}@lim.test"], body(f"l{i}")) for i in range(60)))
    await drained(h, 30)
    assert len(a.messages) + len(b.messages) == 60
    assert a.peak_sessions + b.peak_sessions <= 3
    assert a.peak_sessions >= 1 and b.peak_sessions >= 1


async def test_host_limit_and_shared_site(dns, sinks, relay):
    a, b = await sinks(2)
    # Two domains with the same MX set share one limit (the "site" is keyed by its hosts).
    for dom in ("one.test", "two.test"):
        dns.add_mx(dom, 10, "mxa.shared.test")
        dns.add_mx(dom, 10, "mxb.shared.test")
    dns.add_a("mxa.shared.test", "127.0.0.2")
    dns.add_a("mxb.shared.test", "127.0.0.3")
    for s in (a, b):
        s.faults.set("dot", delay=0.05)
    # Cached connections (idle_timeout) keep their slots, as in production, but for 500 ms, not 5 s:
    # the other domain's mail waits for them.
    h = await relay("idle_timeout = 500ms\nmax_outbound_connections = 4\n"
                    "Host 127.0.0.2 { max_outbound_connections = 1 }\n")
    rcpts = [f"r{i}@{'one' if i % 2 else 'two'}.test" for i in range(60)]
    await asyncio.gather(*(send(h, [r], body(r)) for r in rcpts))
    await drained(h, 30)
    assert len(a.messages) + len(b.messages) == 60
    assert a.peak_sessions == 1  # the Host limit
    assert a.peak_sessions + b.peak_sessions <= 4  # the shared site limit
