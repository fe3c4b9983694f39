"""Shared counters (fastrelay/_purepy/shm.py and fastrelay/_shm.pxi): limits that hold across
worker processes, and a dead worker's counts swept back (issue 13), on both implementations."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from fastrelay import _impl


def _table(impl, nworkers=2, nslots=64, probe=8):
    return impl.SharedCounters(nworkers, nslots, probe)


def test_acquire_up_to_the_limit_across_workers(impl):
    """Issue 13: limits "hold for the whole relay, not per worker"."""
    t = _table(impl)
    s = t.slot("h:smtp:127.0.0.2:25")
    assert t.slot("h:smtp:127.0.0.2:25") == s
    assert t.acquire(s, 0, 2) and t.acquire(s, 1, 2)
    assert not t.acquire(s, 0, 2) and not t.acquire(s, 1, 2)
    assert (t.count(s), t.held(s, 0), t.held(s, 1)) == (2, 1, 1)
    t.release(s, 1)
    assert t.acquire(s, 0, 2)
    assert (t.held(s, 0), t.held(s, 1)) == (2, 0)


@pytest.mark.parametrize("limit, grants", [(0, 10), (1, 1), (3, 3), (10, 10)])
def test_limit_zero_is_no_limit(impl, limit, grants):
    t = _table(impl)
    s = t.slot("k")
    assert sum(t.acquire(s, i % 2, limit) for i in range(10)) == grants
    assert t.count(s) == grants


def test_keys_get_their_own_slots_until_the_probe_is_full(impl):
    """Past the probe a key shares its home slot: stricter, never looser."""
    t = _table(impl, nslots=4, probe=4)
    slots = {t.slot(f"k{i}") for i in range(4)}
    assert slots == {0, 1, 2, 3}
    extra = t.slot("another")
    assert extra == impl.hash_key("another") % 4
    assert t.slot("another") == extra  # and the same one every time


def test_sweep_gives_back_what_a_dead_worker_held(impl):
    """Issue 13: "A worker that dies with slots held gives them back (a lease or a sweep):
    counters may not leak"."""
    t = _table(impl, nworkers=3)
    a, b = t.slot("a"), t.slot("b")
    for _ in range(3):
        t.acquire(a, 1, 0)
    t.acquire(b, 1, 5)
    t.acquire(b, 2, 5)
    assert t.sweep(1) == 4
    assert (t.count(a), t.count(b), t.held(b, 2)) == (0, 1, 1)
    assert t.sweep(1) == 0


@pytest.mark.parametrize("call, args, error, message", [
    ("release", (0, 0), ValueError, "release without an acquire: slot 0, worker 0"),
    ("acquire", (64, 0, 1), ValueError, "unknown slot id 64"),
    ("acquire", (-1, 0, 1), ValueError, "unknown slot id -1"),
    ("acquire", (0, 2, 1), ValueError, "unknown worker 2"),
    ("acquire", (0, 0, -1), ValueError, "limit must be in 0..2147483647, got -1"),
    ("acquire", (0, 0, 2**31), ValueError, "limit must be in 0..2147483647, got 2147483648"),
    ("acquire", (0.5, 0, 1), TypeError, "'float' object cannot be interpreted as an integer"),
    ("count", (2**70,), ValueError, "unknown slot id"),
    ("held", (0, -1), ValueError, "unknown worker -1"),
    ("sweep", (5,), ValueError, "unknown worker 5"),
    ("slot", (b"bytes",), TypeError, "key must be str, not bytes"),
])
def test_bad_calls_get_clear_errors(impl, call, args, error, message):
    t = _table(impl)
    with pytest.raises(error, match=message.replace("(", r"\(")):
        getattr(t, call)(*args)


@pytest.mark.parametrize("args, message", [
    ((0, 64), "nworkers must be in 1..256, got 0"),
    ((2, 0), "nslots must be in 1..16777216, got 0"),
    ((2, 64, 0), "probe must be at least 1, got 0"),
])
def test_bad_tables_are_refused(impl, args, message):
    with pytest.raises(ValueError, match=message):
        impl.SharedCounters(*args)


def _hammer(t, w, slot, holders, limit, rounds, seed):
    """In a forked child: acquire/release in a loop; exit 1 if ever more than `limit` held."""
    rnd = random.Random(seed)
    bad = 0
    for _ in range(rounds):
        if t.acquire(slot, w, limit):
            t.acquire(holders, 0, 0)  # one word counting holders: read exactly by count()
            if t.count(holders) > limit:
                bad = 1
            if rnd.random() < 0.3:
                time.sleep(0)
            t.release(holders, 0)
            t.release(slot, w)
    return bad


def test_never_above_the_limit_across_processes(impl):
    """Four forked workers race for 3 slots: the relay-wide count never passes 3, and at the end
    every count is back to zero."""
    t = _table(impl, nworkers=4)
    slot, holders = t.slot("site"), t.slot("holders")
    pids = []
    for w in range(4):
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                code = _hammer(t, w, slot, holders, 3, 3000, w)
            finally:
                os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    assert codes == [0, 0, 0, 0]
    assert t.count(slot) == 0 and t.count(holders) == 0


def test_a_killed_process_leaks_nothing_after_the_sweep(impl):
    t = _table(impl)
    s = t.slot("h:mx")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            t.acquire(s, 1, 2)
            t.acquire(s, 1, 2)
            os.write(w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.read(r, 1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(r)
    os.close(w)
    assert not t.acquire(s, 0, 2)  # the dead process still holds both
    assert t.sweep(1) == 2
    assert t.acquire(s, 0, 2) and t.acquire(s, 0, 2)  # the limit is fully usable again


def _program(seed: int, steps: int = 400):
    rnd = random.Random(seed)
    keys = [f"k{i}" for i in range(12)]
    ops = []
    for _ in range(steps):
        r = rnd.random()
        if r < 0.2:
            ops.append(("slot", rnd.choice(keys)))
        elif r < 0.6:
            ops.append(("acquire", rnd.randrange(9), rnd.randrange(3), rnd.choice([0, 1, 2, 3])))
        elif r < 0.85:
            ops.append(("release", rnd.randrange(9), rnd.randrange(3)))
        elif r < 0.95:
            ops.append(("count", rnd.randrange(9)))
        else:
            ops.append(("sweep", rnd.randrange(3)))
    return ops


def _run(t, ops):
    out = []
    for op in ops:
        try:
            out.append(("ok", getattr(t, op[0])(*op[1:])))
        except (ValueError, TypeError) as e:
            out.append((type(e).__name__, str(e)))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_agrees_with_the_twin(impl, seed):
    """The same random program gives the same results, error messages included, on `impl` and on
    the twin (the spec)."""
    ops = _program(seed)
    assert _run(_table(impl, nworkers=3, nslots=8, probe=3), ops) == \
        _run(_table(_impl.PY, nworkers=3, nslots=8, probe=3), ops)


def test_hash_is_the_same_in_both(impl):
    for key in ["", "a", "h:smtp:127.0.0.2:25", "ip:127.0.0.1:0:::1", "é✓", "\udcff"]:
        assert impl.hash_key(key) == _impl.PY.hash_key(key)
