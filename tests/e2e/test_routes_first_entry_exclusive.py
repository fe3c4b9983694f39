"""Seed 004 end to end: `Routes = ( "__mx__" "127.0.0.3" )` sends everything to the MX, and the
listed smart host only while the MX is unavailable."""

from __future__ import annotations

from tests.e2e.conftest import body, drained, send


async def test_mx_listed_first_is_used_exclusively(dns, sinks, relay):
    """Seed 004: "the routes are listed in preferential order, with the first listed item being
    attempted before any others, unless there is an explicit preference applied to the item" and
    "the first item is used exclusively unless it's unavailable, in which case the second item is
    used and so on"."""
    mx, smart = await sinks(2)  # 127.0.0.2 (the MX), 127.0.0.3 (listed second)
    dns.add_mx("dest.test", 10, "mx.dest.test")
    dns.add_a("mx.dest.test", "127.0.0.2")
    dns.add_mx("back.test", 0, "mx.dest.test")
    h = await relay('Domain dest.test { Routes = ( "__mx__" "127.0.0.3" ) }\n'
                    'Domain back.test { Routes = ( "127.0.0.3" "__mx__" ) }\n')
    for i in range(6):
        await send(h, [f"u{i}@dest.test"], body(f"fx{i}"))
    await mx.wait_for(6)
    await drained(h)
    assert len(smart.messages) == 0
    # Listed the other way round, the MX (preference 0) is the fallback, never an equal.
    for i in range(6):
        await send(h, [f"v{i}@back.test"], body(f"bk{i}"))
    await smart.wait_for(6)
    await drained(h)
    assert len(mx.messages) == 6
    # The first entry unavailable: the second takes the mail.
    await mx.stop()
    await send(h, ["w@dest.test"], body("fo"))
    await smart.wait_for(7, timeout=15)
    await drained(h)
