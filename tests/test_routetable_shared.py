"""The route table counting in shared counters: two workers' tables, one relay-wide limit, and
seed 004's selection rules over the relay's counts (issue 13), on both implementations."""

from __future__ import annotations

import random

import pytest

from fastrelay import _impl

NO_SLOT, ALL_DOWN = -1, -2


def _pair(impl, nworkers=2):
    shared = impl.SharedCounters(nworkers, 256, 16)
    return shared, [impl.RouteTable(shared, w) for w in range(nworkers)]


def _site(t, groups, limit=0, host_limits=None):
    """The same site in a worker's table (its own host ids) -> (site id, {key: host id})."""
    ids = {}
    for group in groups:
        for key in group:
            ids[key] = t.host(key)
            t.set_host_limit(ids[key], (host_limits or {}).get(key, 0))
    return t.site([[ids[k] for k in g] for g in groups], limit), ids


def test_site_limit_holds_across_workers(impl):
    """max_outbound_connections for a destination is the relay's, not each worker's."""
    _, (t0, t1) = _pair(impl)
    # Different creation order: the workers' host ids differ, the shared site is the same.
    t1.host("smtp:127.0.0.9:25")
    s0, _ = _site(t0, [["smtp:127.0.0.2:25", "smtp:127.0.0.3:25"]], limit=2)
    s1, _ = _site(t1, [["smtp:127.0.0.3:25", "smtp:127.0.0.2:25"]], limit=2)
    h0 = t0.acquire(s0, 1.0)
    h1 = t1.acquire(s1, 1.0)
    assert h0 >= 0 and h1 >= 0
    assert t0.acquire(s0, 1.0) == NO_SLOT and t1.acquire(s1, 1.0) == NO_SLOT
    assert (t0.shared_active(s0), t0.active(s0)) == (2, 1)
    t1.release(s1, h1)
    assert t0.acquire(s0, 1.0) >= 0


def test_per_mx_limit_and_preference_across_workers(impl):
    """Seed 004: "Momentum never uses a higher preference MX if a lower preference MX is below
    its connection limit" - with the limit counted over every worker."""
    _, (t0, t1) = _pair(impl)
    groups = [["smtp:127.0.0.2:25"], ["smtp:127.0.0.3:25"]]
    limits = {"smtp:127.0.0.2:25": 2}
    s0, ids0 = _site(t0, groups, host_limits=limits)
    s1, ids1 = _site(t1, groups, host_limits=limits)
    best0, best1 = ids0["smtp:127.0.0.2:25"], ids1["smtp:127.0.0.2:25"]
    assert t0.acquire(s0, 1.0) == best0
    assert t1.acquire(s1, 1.0) == best1
    # The best MX is at its limit relay-wide: the next one, in either worker, goes to the backup.
    assert t1.acquire(s1, 1.0) == ids1["smtp:127.0.0.3:25"]
    assert t0.shared_host_active(best0) == 2
    t0.release(s0, best0)
    # Below its limit again: back to the best MX, whichever worker asks.
    assert t1.acquire(s1, 1.0) == best1


def test_equal_preferences_spread_evenly_over_the_relay(impl):
    """Seed 004: "attempts to open connections to all of them evenly": the fewest connections
    relay-wide, not in this worker."""
    _, (t0, t1) = _pair(impl)
    groups = [["smtp:127.0.0.2:25", "smtp:127.0.0.3:25", "smtp:127.0.0.4:25"]]
    s0, _ = _site(t0, groups)
    s1, _ = _site(t1, groups)
    picks = []
    for i in range(6):
        t, s = (t0, s0) if i % 2 == 0 else (t1, s1)
        h = t.acquire(s, 1.0)
        picks.append(t.host_key(h))
    counts = {k: picks.count(k) for k in groups[0]}
    assert counts == {k: 2 for k in groups[0]}


def test_a_dead_workers_slots_come_back_with_the_sweep(impl):
    """Issue 13: "a kill -9 of a worker while it holds slots, after which the limit is fully
    usable again" (the supervisor sweeps the dead worker's column)."""
    shared, (t0, t1) = _pair(impl)
    groups = [["smtp:127.0.0.2:25"]]
    s0, _ = _site(t0, groups, limit=2)
    s1, _ = _site(t1, groups, limit=2)
    assert t1.acquire(s1, 1.0) >= 0 and t1.acquire(s1, 1.0) >= 0
    assert t0.acquire(s0, 1.0) == NO_SLOT
    shared.sweep(1)  # worker 1 died holding both
    assert t0.acquire(s0, 1.0) >= 0 and t0.acquire(s0, 1.0) >= 0
    assert t0.acquire(s0, 1.0) == NO_SLOT


def test_down_hosts_and_no_pick_give_the_site_slot_back(impl):
    _, (t0, t1) = _pair(impl)
    groups = [["smtp:127.0.0.2:25"]]
    s0, ids0 = _site(t0, groups, limit=1)
    t0.mark_down(ids0["smtp:127.0.0.2:25"], 10.0)
    assert t0.acquire(s0, 1.0) == ALL_DOWN
    assert t0.shared_active(s0) == 0
    s1, _ = _site(t1, groups, limit=1)
    assert t1.acquire(s1, 1.0) >= 0


def test_without_sharing_nothing_changes(impl):
    t = impl.RouteTable()
    assert t.shared is None
    s, ids = _site(t, [["a"]], limit=1)
    assert t.acquire(s, 1.0) == ids["a"] and t.shared_active(s) == 0


@pytest.mark.parametrize("bad, error", [(2, ValueError), (-1, ValueError)])
def test_bad_worker_number(impl, bad, error):
    with pytest.raises(error, match="unknown worker"):
        impl.RouteTable(impl.SharedCounters(2, 16, 4), bad)


def _run(impl, seed: int, steps: int = 300) -> list:
    rnd = random.Random(seed)
    shared, tables = _pair(impl, 3)
    keys = [f"smtp:127.0.0.{i}:25" for i in range(2, 7)]
    sites = []
    for t in tables:
        per = []
        for shape in ([[keys[0], keys[1]], [keys[2]]], [[keys[1], keys[2], keys[3]]], [[keys[4]], [keys[0]]]):
            per.append(_site(t, shape, limit=3, host_limits={keys[0]: 1, keys[2]: 2})[0])
        sites.append(per)
    held: list[tuple[int, int, int]] = []
    out = []
    for _ in range(steps):
        w = rnd.randrange(3)
        t = tables[w]
        r = rnd.random()
        if r < 0.5:
            si = rnd.randrange(3)
            h = t.acquire(sites[w][si], rnd.choice([1.0, 5.0]))
            out.append(("acquire", w, si, h if h < 0 else t.host_key(h)))
            if h >= 0:
                held.append((w, si, h))
        elif r < 0.85 and held:
            w2, si, h = held.pop(rnd.randrange(len(held)))
            tables[w2].release(sites[w2][si], h)
            out.append(("release", w2, si))
        elif r < 0.95:
            k = rnd.choice(keys)
            t.mark_down(t.host(k), rnd.choice([0.0, 3.0]))
            out.append(("down", w, k))
        else:
            out.append(("sweep", w, shared.sweep(w)))
            held = [x for x in held if x[0] != w]
            tables[w] = impl.RouteTable(shared, w)  # the successor starts with a fresh table
            sites[w] = [_site(tables[w], shape, limit=3, host_limits={keys[0]: 1, keys[2]: 2})[0]
                        for shape in ([[keys[0], keys[1]], [keys[2]]], [[keys[1], keys[2], keys[3]]],
                                      [[keys[4]], [keys[0]]])]
        out.append(("counts", [shared.count(shared.slot("h:" + k)) for k in keys]))
    return out


@pytest.mark.parametrize("seed", range(15))
def test_agrees_with_the_twin_on_random_programs(impl, seed):
    """Three workers' tables over one shared table: the same picks, counts and sweeps on `impl`
    as on the twin; and no limit is ever passed."""
    got = _run(impl, seed)
    assert got == _run(_impl.PY, seed)
    for entry in got:
        if entry[0] == "counts":
            assert entry[1][0] <= 1 and entry[1][2] <= 2
