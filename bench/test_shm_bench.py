"""Benchmark of the shared counters (issue 13): one acquire/release pair on the relay-wide table,
and a route-table acquire/release pair with and without sharing; twin versus Cython."""

from __future__ import annotations

import pytest

from bench.test_routetable_bench import NOW, PAIRS, make_workload, pair_loop
from fastrelay import _impl

_COMPILED = None if _impl.NO_EXTENSIONS else _impl.compiled()
IMPLS = [pytest.param(_impl.PY, id="py")]
if _COMPILED is not None:
    IMPLS.append(pytest.param(_COMPILED, id="c"))

WORKERS = 8  # a mid-size machine: acquire sums one row of this many columns


def _per_pair(benchmark) -> None:
    if benchmark.stats is not None:  # None under --benchmark-disable
        stats = benchmark.stats.stats
        benchmark.extra_info["ns_per_pair"] = round(stats.mean / PAIRS * 1e9, 1)
        benchmark.extra_info["ns_per_pair_min"] = round(stats.min / PAIRS * 1e9, 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_shared_acquire_release(benchmark, impl: _impl.Impl) -> None:
    t = impl.SharedCounters(WORKERS)
    s = t.slot("h:smtp:192.0.2.1:25")
    for w in range(WORKERS):  # other workers hold some
        t.acquire(s, w, 0)
    acquire, release = t.acquire, t.release

    def run() -> bool:
        ok = False
        for _ in range(PAIRS):
            ok = acquire(s, 3, 100)
            release(s, 3)
        return ok

    benchmark.group = "shared counters acquire+release"
    assert benchmark(run)
    assert t.count(s) == WORKERS
    _per_pair(benchmark)


@pytest.mark.parametrize("shared", [False, True], ids=["local", "shared"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_routetable_pair_shared(benchmark, impl: _impl.Impl, shared: bool) -> None:
    """The route table's acquire/release pair of bench/test_routetable_bench.py, counted in a
    shared table (site and host counts relay-wide) or only locally."""
    if shared:
        counters = impl.SharedCounters(WORKERS)
        rt = impl.RouteTable(counters, 0)
        hosts = [rt.host(f"192.0.2.{i}:25") for i in range(6)]
        for h in hosts:
            rt.set_host_limit(h, 20)
        s = rt.site([hosts[:4], hosts[4:]], 200)
        for _ in range(8):
            assert rt.acquire(s, NOW) >= 0
        rt.mark_down(hosts[5], NOW + 300.0)
    else:
        rt, s, hosts = make_workload(impl)
    benchmark.group = "routetable acquire+release, local vs shared"
    last = benchmark(pair_loop(rt, s))
    assert last[0] in hosts[:4]
    assert rt.active(s) == 8
    _per_pair(benchmark)
