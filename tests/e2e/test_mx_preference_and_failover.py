"""Seed 004: the lowest preference MX is used while reachable; when it is down, the next one."""

from __future__ import annotations

import asyncio

from tests.e2e.conftest import body, drained, records, send


async def test_lowest_preference_first(dns, sinks, relay):
    primary, backup = await sinks(2)
    dns.add_mx("pref.test", 20, "backup.pref.test")
    dns.add_mx("pref.test", 10, "primary.pref.test")
    dns.add_a("primary.pref.test", "127.0.0.2")
    dns.add_a("backup.pref.test", "127.0.0.3")
    h = await relay()
    await asyncio.gather(*(send(h, [f"r{i}@pref.test"], body(f"p{i}")) for i in range(20)))
    await drained(h)
    assert (len(primary.messages), len(backup.messages)) == (20, 0)


async def test_failover_when_the_primary_is_down(dns, sinks, relay):
    primary, backup = await sinks(2)
    dns.add_mx("pref.test", 10, "primary.pref.test")
    dns.add_mx("pref.test", 20, "backup.pref.test")
    dns.add_a("primary.pref.test", "127.0.0.2")
    dns.add_a("backup.pref.test", "127.0.0.3")
    await primary.stop()  # refused
    h = await relay()
    await asyncio.gather(*(send(h, [f"r{i}@pref.test"], body(f"f{i}")) for i in range(10)))
    await drained(h)
    assert len(backup.messages) == 10
    assert records(h, "T") == []  # failing over is not a delivery failure


async def test_greeting_421_moves_on_to_the_next_mx(dns, sinks, relay):
    primary, backup = await sinks(2)
    dns.add_mx("pref.test", 10, "primary.pref.test")
    dns.add_mx("pref.test", 20, "backup.pref.test")
    dns.add_a("primary.pref.test", "127.0.0.2")
    dns.add_a("backup.pref.test", "127.0.0.3")
    primary.faults.set("greeting", reply="421 4.3.2 go away")
    h = await relay()
    await send(h, ["x@pref.test"], body("g1"))
    await drained(h)
    assert len(backup.messages) == 1 and primary.messages == []
