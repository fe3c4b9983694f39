"""Seed 004: new connections are spread evenly over equal-preference MXs (message counts)."""

from __future__ import annotations

import asyncio

from tests.e2e.conftest import body, drained, send


async def test_equal_preference_mxs_share_the_load(dns, sinks, relay):
    ss = await sinks(4)
    for i, _ in enumerate(ss):
        dns.add_mx("spread.test", 10, f"mx{i}.spread.test")
        dns.add_a(f"mx{i}.spread.test", f"127.0.0.{i + 2}")
    for s in ss:
        s.faults.set("dot", delay=0.02)  # each message takes a moment, so sessions overlap
    h = await relay("max_outbound_connections = 4\n")
    await asyncio.gather(*(send(h, [f"r{i}@spread.test"], body(f"b{i}")) for i in range(120)))
    await drained(h, 30)
    counts = [len(s.messages) for s in ss]
    assert sum(counts) == 120
    # Four sessions, one per MX (the route table opens to the least loaded equal-preference
    # host), each taking messages from the same ready queue: no MX is left idle or swamped.
    assert min(counts) >= 15, counts
    assert [s.sessions_total >= 1 for s in ss] == [True] * 4
