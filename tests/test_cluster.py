"""Cluster-wide connection leases and throttles against a real redis-server (issue #14)."""

from __future__ import annotations

import asyncio
import time

import pytest

from fastrelay.cluster import ClusterLimits, Rate
from tests.support.redis import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    srv = RedisServer(tmp_path).start()
    try:
        yield srv
    finally:
        srv.stop()


async def _node(url: str, name: str, **kw) -> ClusterLimits:
    c = ClusterLimits(url, name, **kw)
    await c.start()
    return c


@pytest.mark.parametrize(("text", "count", "period"), [("1", 1, 1.0), ("50/1", 50, 1.0), ("1/60", 1, 60.0)])
def test_rate_parses_momentum_forms(text, count, period):
    """Momentum: "If a single integer parameter is provided ... no more than the specified number
    ... in a given second ... a proper fraction ... the numerator over the time window in seconds"."""
    assert Rate.parse(text) == Rate(count, period)


@pytest.mark.parametrize("text", ["", "0", "5/0", "x", "1/x", "²", "-1", "1.5"])
def test_rate_rejects_bad_forms(text):
    with pytest.raises(ValueError):
        Rate.parse(text)


async def test_leases_hold_a_limit_across_nodes(redis_server):
    a = await _node(redis_server.url, "a")
    b = await _node(redis_server.url, "b")
    try:
        got = [await a.acquire("conn:x", 3), await b.acquire("conn:x", 3), await a.acquire("conn:x", 3)]
        assert all(got)
        assert await b.acquire("conn:x", 3) is None  # the cluster is at its limit
        assert await a.acquire("conn:x", 3) is None
        await a.release(got[0])
        again = await b.acquire("conn:x", 3)
        assert again is not None
        await a.release(got[0])  # idempotent: a second release frees nothing more
        assert await a.acquire("conn:x", 3) is None
        for lease in (got[1], got[2], again):
            await (a if lease.id.startswith("a:") else b).release(lease)
        assert a.held() == 0 and b.held() == 0
        assert a.live_nodes == 1  # counted at its own start, before b existed
        await a._heartbeat()
        assert a.live_nodes == 2
    finally:
        await a.close()
        await b.close()


async def test_unlimited_counts_nothing(redis_server):
    a = await _node(redis_server.url, "a")
    try:
        leases = [await a.acquire("conn:y", 0) for _ in range(5)]
        assert all(leases) and a.held() == 0
    finally:
        await a.close()


async def test_dead_nodes_slots_come_back_within_the_lease_time(redis_server):
    """Issue #14: "connection slots are leases with a time to live, renewed while held, so a dead
    node's slots come back by themselves"."""
    dead = await _node(redis_server.url, "dead", lease_ttl=1.0)
    live = await _node(redis_server.url, "live", lease_ttl=1.0)
    try:
        assert await dead.acquire("conn:z", 2) and await dead.acquire("conn:z", 2)
        # The node dies: no release, no renewal.
        dead._task.cancel()
        await asyncio.gather(dead._task, return_exceptions=True)
        dead._task = None
        assert await live.acquire("conn:z", 2) is None
        deadline = time.monotonic() + 10
        lease = None
        while lease is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            lease = await live.acquire("conn:z", 2)
        assert lease is not None, "a dead node's lease never expired"
        await live.release(lease)
    finally:
        dead._held.clear()
        await dead.close()
        await live.close()


async def test_renewal_keeps_a_held_lease_alive(redis_server):
    a = await _node(redis_server.url, "a", lease_ttl=1.0)
    b = await _node(redis_server.url, "b", lease_ttl=1.0)
    try:
        lease = await a.acquire("conn:r", 1)
        assert lease is not None
        for _ in range(8):  # 2.4 s: more than twice the TTL, renewed every TTL/3
            await asyncio.sleep(0.3)
            assert await b.acquire("conn:r", 1) is None
        await a.release(lease)
        lease_b = await b.acquire("conn:r", 1)
        assert lease_b is not None
        await b.release(lease_b)
        assert a.stats["leases_lost"] == 0
    finally:
        await a.close()
        await b.close()


async def test_throttle_is_shared_by_all_nodes(redis_server):
    """50 events under a cluster-wide "10/1" from two nodes: one every 100 ms whoever asks (no
    burst, as the local throttles: never more than 10 in any second), so the whole takes 4.9 s."""
    a = await _node(redis_server.url, "a")
    b = await _node(redis_server.url, "b")
    try:
        rate = Rate.parse("10/1")
        start = time.monotonic()
        await asyncio.gather(*(n.wait_throttle("t", rate) for n in [a, b] * 25))
        assert time.monotonic() - start >= 4.8
        assert await a.throttle("t", rate) > 0  # the next one waits its interval
    finally:
        await a.close()
        await b.close()


async def test_throttles_with_different_keys_are_separate(redis_server):
    a = await _node(redis_server.url, "a")
    try:
        rate = Rate.parse("1/60")
        assert await a.throttle("one", rate) == 0
        assert await a.throttle("one", rate) > 50  # about 60 s to wait
        assert await a.throttle("two", rate) == 0
    finally:
        await a.close()


async def test_redis_outage_falls_back_to_the_local_share(redis_server):
    """Issue #14: "When Redis is unreachable, the relay keeps delivering under a conservative local
    share (limit divided by the number of live nodes last seen), logs it once and reports it"."""
    a = await _node(redis_server.url, "a", timeout=0.5)
    b = await _node(redis_server.url, "b", timeout=0.5)
    try:
        await a._heartbeat()
        assert a.live_nodes == 2
        redis_server.stop()
        got = [await a.acquire("conn:f", 4) for _ in range(3)]
        assert got[0] is not None and got[1] is not None and got[2] is None  # 4 // 2 nodes
        assert a.degraded and a.health()["redis"] == "unreachable"
        assert all(lease.local for lease in got[:2])
        # Throttle share: "10/1" over 2 nodes = 5 a second here, one every 200 ms (no burst).
        rate = Rate.parse("10/1")
        passes = [await a.throttle("fb", rate) == 0 for _ in range(3)]
        assert passes == [True, False, False]
        wait = await a.throttle("fb", rate)
        assert 0.15 < wait <= 0.2
        await asyncio.sleep(wait)
        assert await a.throttle("fb", rate) == 0
        for lease in got[:2]:
            await a.release(lease)
        assert a.held() == 0
        redis_server.start()
        a._next_retry = 0.0
        lease = await a.acquire("conn:f", 4)
        assert lease is not None and not lease.local and not a.degraded
        await a.release(lease)
    finally:
        await a.close()
        await b.close()
