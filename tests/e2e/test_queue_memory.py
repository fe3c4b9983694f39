"""Issue 13: a million queued messages in under 1 GB. What keeps a queued message small: the
queue's items share one str per domain and binding, and the heap's tie-breaker is the item's
own id; a restart recovers them sharing the same way."""

from __future__ import annotations

import asyncio

from fastrelay.queue import Item
from tests.e2e.conftest import body, send, until_records
from tests.support import free_port


async def test_deferred_items_share_their_domain_and_binding_strings(relay):
    dead = free_port("127.0.0.3")  # nothing listens: every attempt fails and is deferred
    h = await relay(f'Domain down.test {{ Routes = ( "smtp://127.0.0.3?port={dead}" ) }}\n'
                    "host_failure_retry = 1d\nretry_interval = 1d\nmax_retry_interval = 1d\n")
    for i in range(6):
        await send(h, [f"u{i}@down.test"], body(f"m{i}"))
    await until_records(h, "T", 6)
    q = h.relay.queue
    for _ in range(100):  # the T record is written before the reschedule is saved
        if len(q._heap) >= 6:
            break
        await asyncio.sleep(0.05)
    items = list(q.items.values())
    assert len(items) == 6
    assert len({id(it.domain) for it in items}) == 1, "one str for the domain, however many items"
    assert len({id(it.binding) for it in items}) == 1
    # The heap holds (due, id, item): the id object is the item's own, not another int.
    assert all(entry[1] is entry[2].id for entry in q._heap)
    # Recovered into a fresh process's queue the same way.
    await h.stop()
    await h.start()
    items = list(h.relay.queue.items.values())
    assert len(items) == 6 and len({id(it.domain) for it in items}) == 1


def test_items_compare_without_raising_for_a_tie():
    """Two heap entries (due, id, item) equal up to the item (a stale entry of a rescheduled
    item) must still order: heapq compares the items then."""
    a = Item(7, "d.test", "default", 1.0, 0, 1.0, 10)
    b = Item(7, "d.test", "default", 1.0, 0, 1.0, 10)
    assert (a < b) != (b < a)
