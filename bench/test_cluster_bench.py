"""Benchmark of a cluster-wide decision (Redis lease, GCRA throttle) against a local one."""

from __future__ import annotations

import asyncio

import pytest

from fastrelay import _impl
from fastrelay.cluster import ClusterLimits, Rate
from tests.support.redis import RedisServer

OPS = 200  # decisions per benchmark round


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield srv.url
    finally:
        srv.stop()


@pytest.fixture
def cluster(redis_url):
    loop = asyncio.new_event_loop()
    c = ClusterLimits(redis_url, "bench")
    loop.run_until_complete(c.start())
    try:
        yield loop, c
    finally:
        loop.run_until_complete(c.close())
        loop.close()


def test_cluster_lease_pair(benchmark, cluster):
    """One connection slot taken and given back through Redis (two round trips)."""
    loop, c = cluster

    async def pairs() -> None:
        for _ in range(OPS):
            lease = await c.acquire("conn:bench", 1_000_000)
            await c.release(lease)

    benchmark.extra_info["ops_per_round"] = OPS
    benchmark(lambda: loop.run_until_complete(pairs()))
    assert c.held() == 0


def test_cluster_throttle_decision(benchmark, cluster):
    """One throttle decision through the GCRA script (one round trip)."""
    loop, c = cluster
    rate = Rate(10_000_000, 1.0)

    async def decisions() -> None:
        for _ in range(OPS):
            await c.throttle("bench", rate)

    benchmark.extra_info["ops_per_round"] = OPS
    benchmark(lambda: loop.run_until_complete(decisions()))


def test_local_route_table_pair(benchmark):
    """The same decision without a cluster: one acquire/release pair in the route table."""
    rt = _impl.ACTIVE.RouteTable()
    hosts = [rt.host(f"192.0.2.{i}:25") for i in range(4)]
    s = rt.site([hosts], 0)  # one group of four equal-preference MXs

    def pairs() -> None:
        acquire, release = rt.acquire, rt.release
        for _ in range(OPS):
            release(s, acquire(s, 1000.0))

    benchmark.extra_info["ops_per_round"] = OPS
    benchmark(pairs)
    assert rt.total_active() == 0
