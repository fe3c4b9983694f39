"""Tests for the route table (Momentum MX selection and connection counting) on both implementations."""

from __future__ import annotations

import math
import random
from collections import Counter
from decimal import Decimal
from fractions import Fraction
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from fastrelay import _impl
from fastrelay._purepy import routetable as py_routetable

NOW = 1000.0


def _hosts(rt, n: int, prefix: str = "10.0.0.") -> list[int]:
    return [rt.host(f"{prefix}{i}:25") for i in range(n)]


# -- constants and ids -------------------------------------------------------------------------------


def test_constants_match() -> None:
    assert py_routetable.NO_SLOT == -1
    assert py_routetable.ALL_DOWN == -2
    compiled = None if _impl.NO_EXTENSIONS else _impl.compiled()
    if compiled is not None:
        from fastrelay import _core

        assert _core.NO_SLOT == py_routetable.NO_SLOT
        assert _core.ALL_DOWN == py_routetable.ALL_DOWN
        assert _core.MAX_LIMIT == py_routetable.MAX_LIMIT


def test_host_ids_are_stable_per_key(impl) -> None:
    rt = impl.RouteTable()
    assert rt.host("10.0.0.1:25") == 0
    assert rt.host("lmtp:10.0.0.2:24") == 1
    assert rt.host("10.0.0.1:25") == 0
    assert rt.host("10.0.0.3:25") == 2
    assert rt.host("lmtp:10.0.0.2:24") == 1
    assert [rt.host_key(h) for h in range(3)] == ["10.0.0.1:25", "lmtp:10.0.0.2:24", "10.0.0.3:25"]
    assert rt.host_limit(0) == 0
    assert rt.host_active(0) == 0
    assert rt.down_until(0) == 0.0
    assert rt.is_down(0, NOW) is False
    assert rt.total_active() == 0


def test_many_hosts_and_sites_grow_the_tables(impl) -> None:
    rt = impl.RouteTable()
    hosts = _hosts(rt, 300)
    assert hosts == list(range(300))
    sites = [rt.site([[hosts[i]], [hosts[i + 1]]]) for i in range(299)]
    assert sites == list(range(299))
    assert rt.site_groups(298) == [[298], [299]]
    assert rt.acquire(298, NOW) == 298
    assert rt.host_active(298) == 1
    assert rt.host_key(299) == "10.0.0.299:25"


def test_host_key_must_be_str(impl) -> None:
    rt = impl.RouteTable()
    with pytest.raises(TypeError):
        rt.host(b"10.0.0.1:25")
    with pytest.raises(TypeError):
        rt.host(None)


def test_site_identity(impl) -> None:
    rt = impl.RouteTable()
    a, b, c = _hosts(rt, 3)
    s = rt.site([[a, b], [c]], 5)
    assert s == 0
    assert rt.site_limit(s) == 5
    # The same groups, hosts in another order inside a group: same site, and the limit is
    # updated on each call.
    assert rt.site([[b, a], [c]], 7) == s
    assert rt.site_limit(s) == 7
    assert rt.site(((b, a), (c,))) == s
    assert rt.site_limit(s) == 0
    # The order inside a group is fixed by the first call (first appearance).
    assert rt.site_groups(s) == [[a, b], [c]]
    # Other groups, or the same groups in another order, are another site: the order is the
    # plan's (route entries as listed), so it is part of the identity.
    assert rt.site([[a, b]]) == 1
    assert rt.site([[c], [a, b]]) == 2
    assert rt.site([[a], [b], [c]]) == 3
    assert rt.site([[a, b, c]]) == 4
    assert rt.site([[a, b], [c]]) == s
    rt.set_site_limit(s, 3)
    assert rt.site_limit(s) == 3


def test_site_keeps_the_callers_group_order(impl) -> None:
    """Seed 004: "the routes are listed in preferential order, with the first listed item being
    attempted before any others": the table takes the plan's order as it is and never sorts it."""
    rt = impl.RouteTable()
    h = _hosts(rt, 5)
    s = rt.site([[h[3], h[0]], [h[1], h[2]], [h[4]]])
    assert rt.site_groups(s) == [[h[3], h[0]], [h[1], h[2]], [h[4]]]
    assert rt.acquire(s, NOW) == h[3]
    assert rt.acquire(s, NOW) == h[0]
    rt.mark_down(h[3], NOW + 10)
    rt.mark_down(h[0], NOW + 10)
    assert rt.acquire(s, NOW) == h[1]
    assert rt.acquire(s, NOW) == h[2]


def test_many_groups_no_preference_range(impl) -> None:
    """A plan of many tiers (route entries x MX preferences) is not squeezed into 16 bits: the
    table has no preference numbers at all, so any number of groups is fine."""
    rt = impl.RouteTable()
    hosts = _hosts(rt, 70)
    s = rt.site([[h] for h in hosts])
    assert len(rt.site_groups(s)) == 70
    for h in hosts[:69]:
        rt.mark_down(h, NOW + 1)
    assert rt.acquire(s, NOW) == hosts[69]


def test_site_duplicate_hosts_in_a_group_count_once(impl) -> None:
    rt = impl.RouteTable()
    a, b = _hosts(rt, 2)
    s = rt.site([[a, b, a]])
    assert rt.site_groups(s) == [[a, b]]
    assert rt.site([[b, a]]) == s


def test_site_errors(impl) -> None:
    rt = impl.RouteTable()
    a, b = _hosts(rt, 2)
    with pytest.raises(ValueError, match=r"^a site needs at least one host$"):
        rt.site([])
    with pytest.raises(ValueError, match=r"^group 1 has no host$"):
        rt.site([[a], []])
    with pytest.raises(ValueError, match=r"^group 0 has no host$"):
        rt.site([[]])
    with pytest.raises(ValueError, match=r"^unknown host id 2$"):
        rt.site([[a, 2]])
    with pytest.raises(ValueError, match=r"^unknown host id -1$"):
        rt.site([[-1]])
    with pytest.raises(ValueError, match=r"^host id 0 given in groups 0 and 1$"):
        rt.site([[a], [b, a]])
    with pytest.raises(ValueError, match="limit"):
        rt.site([[a]], -1)
    with pytest.raises(TypeError):
        rt.site([[1.5]])
    with pytest.raises(TypeError):
        rt.site([a, b])  # groups, not bare ids
    # Nothing was created by the failed calls, and a failed call on an existing site keeps its limit.
    assert rt.site([[a, b]], 4) == 0
    with pytest.raises(ValueError):
        rt.site([[b, a]], -3)
    assert rt.site_limit(0) == 4
    assert rt.site([[a], [b]]) == 1
    # Checks run in order: the limit first, then group by group.
    with pytest.raises(ValueError, match="limit"):
        rt.site([[]], -1)
    with pytest.raises(ValueError, match=r"^unknown host id 9$"):
        rt.site([[a], [b, 9], []])
    with pytest.raises(ValueError, match=r"^group 1 has no host$"):
        rt.site([[a], [], [9]])


# (method, arguments with ID standing for the bad id, "host" or "site": which kind of id is bad)
ID = object()
_ID_CALLS = [
    ("host_key", (ID,), "host"),
    ("set_host_limit", (ID, 1), "host"),
    ("host_limit", (ID,), "host"),
    ("host_active", (ID,), "host"),
    ("mark_down", (ID, NOW), "host"),
    ("mark_up", (ID,), "host"),
    ("is_down", (ID, NOW), "host"),
    ("down_until", (ID,), "host"),
    ("release", (0, ID), "host"),
    ("set_site_limit", (ID, 1), "site"),
    ("site_limit", (ID,), "site"),
    ("site_groups", (ID,), "site"),
    ("active", (ID,), "site"),
    ("acquire", (ID, NOW), "site"),
    ("release", (ID, 0), "site"),
]


@pytest.mark.parametrize(("method", "args", "kind"), _ID_CALLS, ids=[f"{m}-{k}" for m, _, k in _ID_CALLS])
def test_out_of_range_ids_raise_value_error(impl, method: str, args: tuple, kind: str) -> None:
    rt = impl.RouteTable()
    (a,) = _hosts(rt, 1)
    rt.site([[a]])
    call = getattr(rt, method)
    for bad in (-1, 1, 2**40, 2**80, -(2**80)):
        with pytest.raises(ValueError, match=f"^unknown {kind} id {bad}$"):
            call(*(bad if arg is ID else arg for arg in args))
    with pytest.raises(TypeError):
        call(*(0.0 if arg is ID else arg for arg in args))
    with pytest.raises(TypeError):
        call(*("0" if arg is ID else arg for arg in args))
    assert rt.total_active() == 0
    assert (rt.host_limit(a), rt.down_until(a), rt.site_limit(0)) == (0, 0.0, 0)


def test_limits_are_validated(impl) -> None:
    rt = impl.RouteTable()
    (a,) = _hosts(rt, 1)
    s = rt.site([[a]])
    rt.set_host_limit(a, py_routetable.MAX_LIMIT)
    assert rt.host_limit(a) == 2**31 - 1
    for bad in (-1, 2**31, 2**80):
        with pytest.raises(ValueError, match="limit"):
            rt.set_host_limit(a, bad)
        with pytest.raises(ValueError, match="limit"):
            rt.set_site_limit(s, bad)
    assert rt.host_limit(a) == 2**31 - 1
    assert rt.site_limit(s) == 0


# -- selection ---------------------------------------------------------------------------------------


def test_lowest_preference_first(impl) -> None:
    rt = impl.RouteTable()
    primary, backup = _hosts(rt, 2)
    s = rt.site([[primary], [backup]])
    # Up and unlimited: every acquisition goes to the pref-10 host.
    assert [rt.acquire(s, NOW) for _ in range(5)] == [primary] * 5
    assert (rt.host_active(primary), rt.host_active(backup), rt.active(s)) == (5, 0, 5)
    # At its host limit: the pref-20 host is used.
    rt.set_host_limit(primary, 6)
    assert rt.acquire(s, NOW) == primary
    assert rt.acquire(s, NOW) == backup
    assert rt.acquire(s, NOW) == backup
    assert (rt.host_active(primary), rt.host_active(backup), rt.active(s)) == (6, 2, 8)
    # A slot frees up on the primary: it is preferred again.
    rt.release(s, primary)
    assert rt.acquire(s, NOW) == primary
    for _ in range(6):
        rt.release(s, primary)
    for _ in range(2):
        rt.release(s, backup)
    assert rt.total_active() == 0
    # Marked down: the pref-20 host is used until the down time passes.
    rt.mark_down(primary, NOW + 60.0)
    assert rt.down_until(primary) == NOW + 60.0
    assert rt.is_down(primary, NOW) is True
    assert rt.acquire(s, NOW) == backup
    assert rt.acquire(s, NOW + 59.5) == backup
    # down_until(h) > now is "down", so at exactly `until` the host is up again.
    assert rt.is_down(primary, NOW + 60.0) is False
    assert rt.acquire(s, NOW + 60.0) == primary
    assert rt.acquire(s, NOW + 61.0) == primary
    assert (rt.host_active(primary), rt.host_active(backup)) == (2, 2)
    # mark_up clears the mark at once.
    rt.mark_down(primary, NOW + 3600.0)
    assert rt.acquire(s, NOW + 62.0) == backup
    rt.mark_up(primary)
    assert rt.down_until(primary) == 0.0
    assert rt.acquire(s, NOW + 62.0) == primary


def test_even_spreading_one_at_a_time(impl) -> None:
    rt = impl.RouteTable()
    hosts = _hosts(rt, 5)
    s = rt.site([hosts])
    picks = []
    for _ in range(1000):
        h = rt.acquire(s, NOW)
        picks.append(h)
        rt.release(s, h)
    assert Counter(picks) == {h: 200 for h in hosts}
    # Round-robin in the site's order, starting at its first host.
    assert picks[:10] == hosts + hosts
    assert rt.total_active() == 0


def test_even_spreading_concurrent_holds(impl) -> None:
    rt = impl.RouteTable()
    hosts = _hosts(rt, 5)
    s = rt.site([hosts])
    held = [rt.acquire(s, NOW) for _ in range(10)]
    assert held == hosts + hosts
    assert [rt.host_active(h) for h in hosts] == [2, 2, 2, 2, 2]
    # Fewest connections wins over round-robin: free two slots on one host, it gets both back.
    rt.release(s, hosts[3])
    rt.release(s, hosts[3])
    assert rt.acquire(s, NOW) == hosts[3]
    assert rt.acquire(s, NOW) == hosts[3]
    # All tied at 3 now: round-robin goes on after the last pick (position 3).
    assert rt.acquire(s, NOW) == hosts[4]
    assert rt.acquire(s, NOW) == hosts[0]


def test_even_spreading_with_one_host_limited(impl) -> None:
    rt = impl.RouteTable()
    hosts = _hosts(rt, 5)
    rt.set_host_limit(hosts[2], 1)
    s = rt.site([hosts])
    held = [rt.acquire(s, NOW) for _ in range(9)]
    assert [rt.host_active(h) for h in hosts] == [2, 2, 1, 2, 2]
    assert Counter(held) == {hosts[0]: 2, hosts[1]: 2, hosts[2]: 1, hosts[3]: 2, hosts[4]: 2}
    assert rt.active(s) == 9


def test_round_robin_skips_down_and_full_hosts(impl) -> None:
    rt = impl.RouteTable()
    hosts = _hosts(rt, 4)
    s = rt.site([hosts])
    rt.mark_down(hosts[1], NOW + 10.0)
    picks = []
    for _ in range(6):
        picks.append(rt.acquire(s, NOW))
        rt.release(s, picks[-1])
    assert picks == [hosts[0], hosts[2], hosts[3], hosts[0], hosts[2], hosts[3]]


# -- limits, down hosts, release ---------------------------------------------------------------------


def test_site_limit(impl) -> None:
    rt = impl.RouteTable()
    a, b = _hosts(rt, 2)
    s = rt.site([[a, b]], 3)
    assert [rt.acquire(s, NOW) for _ in range(3)] == [a, b, a]
    assert rt.acquire(s, NOW) == py_routetable.NO_SLOT
    assert rt.active(s) == 3
    rt.release(s, b)
    assert rt.acquire(s, NOW) == b
    assert rt.acquire(s, NOW) == py_routetable.NO_SLOT
    # The site limit applies even when every host is down: the site is full first.
    rt.mark_down(a, NOW + 10)
    rt.mark_down(b, NOW + 10)
    assert rt.acquire(s, NOW) == py_routetable.NO_SLOT
    # Raising the limit (0 = unlimited) opens it again.
    rt.mark_up(a)
    rt.set_site_limit(s, 0)
    assert rt.acquire(s, NOW) == a
    assert rt.active(s) == 4


def test_host_limit_is_shared_by_sites_sharing_the_host(impl) -> None:
    rt = impl.RouteTable()
    shared, only_x, only_y = _hosts(rt, 3)
    rt.set_host_limit(shared, 2)
    x = rt.site([[shared], [only_x]])
    y = rt.site([[shared], [only_y]])
    assert rt.acquire(x, NOW) == shared
    assert rt.acquire(y, NOW) == shared
    # The shared host is full (one connection per site): both sites fall back to their backups.
    assert rt.acquire(x, NOW) == only_x
    assert rt.acquire(y, NOW) == only_y
    assert (rt.host_active(shared), rt.active(x), rt.active(y)) == (2, 2, 2)
    rt.release(x, shared)
    assert rt.acquire(y, NOW) == shared
    assert rt.acquire(x, NOW) == only_x
    assert (rt.host_active(shared), rt.active(x), rt.active(y), rt.total_active()) == (2, 2, 3, 5)


def test_all_down_versus_no_slot(impl) -> None:
    rt = impl.RouteTable()
    a, b, c = _hosts(rt, 3)
    s = rt.site([[a, b], [c]])
    for h in (a, b, c):
        rt.mark_down(h, NOW + 30)
    assert rt.acquire(s, NOW) == py_routetable.ALL_DOWN
    assert (rt.active(s), rt.total_active()) == (0, 0)
    # One host up but at its limit: wait for a release, don't defer.
    rt.mark_up(c)
    rt.set_host_limit(c, 1)
    assert rt.acquire(s, NOW) == c
    assert rt.acquire(s, NOW) == py_routetable.NO_SLOT
    rt.mark_down(c, NOW + 30)
    assert rt.acquire(s, NOW) == py_routetable.ALL_DOWN
    # Time passes: everyone is up again.
    assert rt.acquire(s, NOW + 30) == a


def test_release_errors_leave_counts_unchanged(impl) -> None:
    rt = impl.RouteTable()
    a, b, other = _hosts(rt, 3)
    s = rt.site([[a], [b]])
    t = rt.site([[a], [other]])
    assert rt.acquire(s, NOW) == a

    def counts() -> tuple:
        return (rt.active(s), rt.active(t), rt.host_active(a), rt.host_active(b),
                rt.host_active(other), rt.total_active())

    before = counts()
    assert before == (1, 0, 1, 0, 0, 1)
    with pytest.raises(ValueError, match="not in site"):
        rt.release(s, other)
    with pytest.raises(ValueError, match="release without an acquire"):
        rt.release(s, b)
    # a's count is above zero, but that slot was acquired through site s, not t.
    with pytest.raises(ValueError, match="release without an acquire"):
        rt.release(t, a)
    assert counts() == before
    rt.release(s, a)
    with pytest.raises(ValueError, match="release without an acquire"):
        rt.release(s, a)
    assert counts() == (0, 0, 0, 0, 0, 0)


def test_counters_back_to_zero_after_random_mix(impl) -> None:
    rng = random.Random(4)
    rt = impl.RouteTable()
    hosts = _hosts(rt, 8)
    for h in hosts[:4]:
        rt.set_host_limit(h, rng.randint(1, 4))
    sites = [
        rt.site([[hosts[0], hosts[1]], [hosts[2]]], 6),
        rt.site([[hosts[1]], [hosts[3], hosts[4]]]),
        rt.site([[hosts[5], hosts[6], hosts[7]], [hosts[0]]], 3),
    ]
    held: list[tuple[int, int]] = []
    got = 0
    for step in range(3000):
        now = float(step)
        if rng.random() < 0.02:
            h = rng.choice(hosts)
            rt.mark_down(h, now + rng.uniform(0, 50))
        if held and rng.random() < 0.45:
            s, h = held.pop(rng.randrange(len(held)))
            rt.release(s, h)
        else:
            s = rng.choice(sites)
            h = rt.acquire(s, now)
            if h >= 0:
                got += 1
                held.append((s, h))
                limit = rt.host_limit(h)
                assert limit == 0 or rt.host_active(h) <= limit
        assert rt.total_active() == len(held)
    assert got > 500
    for s, h in held:
        rt.release(s, h)
    assert rt.total_active() == 0
    assert [rt.active(s) for s in sites] == [0, 0, 0]
    assert [rt.host_active(h) for h in hosts] == [0] * 8


def test_times_are_converted_like_c_doubles(impl) -> None:
    rt = impl.RouteTable()
    (a,) = _hosts(rt, 1)
    s = rt.site([[a]], 1)
    rt.mark_down(a, 2000)  # an int is fine
    assert type(rt.down_until(a)) is float
    assert rt.down_until(a) == 2000.0
    assert rt.is_down(a, Decimal("1999.5")) is True
    for bad in ("1", None, b"1"):
        with pytest.raises(TypeError, match="must be real number"):
            rt.acquire(s, bad)
        with pytest.raises(TypeError, match="must be real number"):
            rt.mark_down(a, bad)
        with pytest.raises(TypeError, match="must be real number"):
            rt.is_down(a, bad)
        # The time is checked first, as a C double argument is, even with a bad id.
        with pytest.raises(TypeError, match="must be real number"):
            rt.acquire(99, bad)
    assert rt.down_until(a) == 2000.0
    assert rt.acquire(s, Fraction(4001, 2)) == a
    # The site is full: NO_SLOT, yet a bad time is still a TypeError.
    with pytest.raises(TypeError):
        rt.acquire(s, "later")


def test_nan_times_mean_up(impl) -> None:
    rt = impl.RouteTable()
    (a,) = _hosts(rt, 1)
    s = rt.site([[a]])
    rt.mark_down(a, math.nan)
    assert rt.is_down(a, NOW) is False
    assert rt.acquire(s, NOW) == a
    rt.mark_down(a, NOW + 10)
    assert rt.is_down(a, math.nan) is False


# -- both implementations agree: a random program of operations --------------------------------------

_COMPILED = None if _impl.NO_EXTENSIONS else _impl.compiled()

_KEYS = [f"10.0.0.{i}:25" for i in range(6)] + ["lmtp:10.0.1.1:24", "lmtp:10.0.1.2:24"]
_limits = st.integers(0, 4)
_times = st.one_of(st.integers(0, 40).map(float), st.floats(0.0, 40.0, allow_nan=False))


def _outcome(call):
    try:
        return ("ok", call())
    except (ValueError, TypeError) as exc:
        return (type(exc).__name__, str(exc))


def _id(n: int) -> st.SearchStrategy[int]:
    """Mostly valid ids (0..n-1), sometimes ones that name nothing."""
    bad = st.sampled_from([-1, n, n + 1, 2**40])
    if n == 0:
        return bad
    good = st.integers(0, n - 1)
    return st.one_of(good, good, good, bad)


class TwinsAgree(RuleBasedStateMachine):
    """Runs each operation on the twin and on the Cython table and compares the outcomes."""

    def __init__(self) -> None:
        super().__init__()
        self.py = _impl.PY.RouteTable()
        self.c = _COMPILED.RouteTable()
        self.n_hosts = 0
        self.n_sites = 0
        self.held: list[tuple[int, int]] = []

    def both(self, name: str, *args):
        py = _outcome(lambda: getattr(self.py, name)(*args))
        c = _outcome(lambda: getattr(self.c, name)(*args))
        assert py == c, (name, args)
        return py

    @initialize(n=st.integers(1, 6), data=st.data())
    def some_hosts_and_a_site(self, n: int, data) -> None:
        for key in _KEYS[:n]:
            self.host(key)
        self.site(data, 0)

    @rule(key=st.sampled_from(_KEYS))
    def host(self, key: str) -> None:
        kind, h = self.both("host", key)
        assert kind == "ok"
        self.n_hosts = max(self.n_hosts, h + 1)

    @rule(data=st.data(), limit=st.one_of(_limits, st.just(-1)))
    def set_host_limit(self, data, limit: int) -> None:
        self.both("set_host_limit", data.draw(_id(self.n_hosts)), limit)

    @rule(data=st.data(), limit=_limits)
    def site(self, data, limit: int) -> None:
        hosts = data.draw(st.lists(st.integers(0, self.n_hosts - 1), min_size=1, max_size=6, unique=True))
        cuts = sorted(data.draw(st.sets(st.integers(1, len(hosts) - 1))) if len(hosts) > 1 else set())
        bounds = [0, *cuts, len(hosts)]
        groups = [hosts[a:b] for a, b in pairwise(bounds)]
        if data.draw(st.integers(0, 3)) == 0:  # now and then a repeat inside a group (counts once)
            groups[-1] = [*groups[-1], groups[-1][0]]
        if data.draw(st.integers(0, 4)) == 0:  # now and then a bad list
            groups = data.draw(st.sampled_from([
                [], [*groups, []], [*groups, [self.n_hosts]], [[-1], *groups], [*groups, [groups[0][0]]],
            ]))
        kind, s = self.both("site", groups, limit)
        if kind == "ok":
            self.n_sites = max(self.n_sites, s + 1)

    @rule(data=st.data(), limit=_limits)
    def set_site_limit(self, data, limit: int) -> None:
        self.both("set_site_limit", data.draw(_id(self.n_sites)), limit)

    def _usable(self, h: int, now: float) -> bool:
        limit = self.py.host_limit(h)
        return not self.py.is_down(h, now) and (limit == 0 or self.py.host_active(h) < limit)

    @rule(data=st.data(), now=_times, repeat=st.integers(1, 4))
    def acquire(self, data, now: float, repeat: int) -> None:
        s = data.draw(_id(self.n_sites))
        for _ in range(repeat):
            self._acquire_once(s, now)

    def _acquire_once(self, s: int, now: float) -> None:
        if not 0 <= s < self.n_sites:
            kind, _ = self.both("acquire", s, now)
            assert kind == "ValueError"
            return
        # What the Momentum rules allow, worked out from the observable state before the call.
        pairs = [(h, tier) for tier, group in enumerate(self.py.site_groups(s)) for h in group]
        site_full = 0 < self.py.site_limit(s) <= self.py.active(s)
        usable = [(h, tier) for h, tier in pairs if self._usable(h, now)]
        any_up = any(not self.py.is_down(h, now) for h, _ in pairs)
        before = {h: self.py.host_active(h) for h, _ in pairs}

        kind, h = self.both("acquire", s, now)
        assert kind == "ok"
        if site_full:
            assert h == py_routetable.NO_SLOT
        elif not usable:
            assert h == (py_routetable.NO_SLOT if any_up else py_routetable.ALL_DOWN)
        else:
            best = min(tier for _, tier in usable)
            group = [u for u, tier in usable if tier == best]
            # Never a later group while an earlier one is usable; fewest connections first.
            assert h in group
            assert before[h] == min(before[u] for u in group)
            assert self.py.host_active(h) == before[h] + 1
            host_limit = self.py.host_limit(h)
            assert host_limit == 0 or self.py.host_active(h) <= host_limit
            site_limit = self.py.site_limit(s)
            assert site_limit == 0 or self.py.active(s) <= site_limit
            self.held.append((s, h))

    @rule(data=st.data())
    def release_held(self, data) -> None:
        if not self.held:
            return
        s, h = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        assert self.both("release", s, h) == ("ok", None)

    @rule(data=st.data())
    def release_any(self, data) -> None:
        s = data.draw(_id(self.n_sites))
        h = data.draw(_id(self.n_hosts))
        kind, _ = self.both("release", s, h)
        if kind == "ok":
            self.held.remove((s, h))
        else:
            assert kind == "ValueError"

    @rule(data=st.data(), until=_times)
    def mark_down(self, data, until: float) -> None:
        self.both("mark_down", data.draw(_id(self.n_hosts)), until)

    @rule(data=st.data())
    def mark_up(self, data) -> None:
        self.both("mark_up", data.draw(_id(self.n_hosts)))

    @invariant()
    def same_state(self) -> None:
        assert self.both("total_active") == ("ok", len(self.held))
        for h in range(self.n_hosts):
            for name in ("host_key", "host_limit", "host_active", "down_until"):
                self.both(name, h)
            assert self.py.host_active(h) == sum(1 for _, held in self.held if held == h)
        for s in range(self.n_sites):
            for name in ("site_groups", "site_limit", "active"):
                self.both(name, s)
            assert self.py.active(s) == sum(1 for site, _ in self.held if site == s)

    def teardown(self) -> None:
        for s, h in self.held:
            self.both("release", s, h)
        assert self.both("total_active") == ("ok", 0)


@pytest.mark.skipif(_COMPILED is None, reason="needs the compiled extension to compare against")
def test_twins_agree_on_random_programs() -> None:
    run_state_machine_as_test(
        TwinsAgree,
        settings=settings(
            max_examples=300,
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
