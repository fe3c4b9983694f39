"""The relay-wide XFER claims (fastrelay.xfer.claims) with real SQLite files and real spools: a key is
stored at most once over every shard, a crash between claim and done is settled at start, stale
claims are checked against their holder's shard, keys are imported and pruned."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from fastrelay import shards
from fastrelay.message import Envelope, Recipient
from fastrelay.spool import XFER_KEY_TTL, Spool, SpoolFull
from fastrelay.xfer.claims import CLAIMS_FILE, ClaimTable, TransferInProgress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(os.path.dirname(__file__), "xfer_claims_child.py")
KEY = ("node-a", "17")


def item(tag: str = "m") -> tuple[Envelope, bytes]:
    return Envelope("a@x.test", [Recipient(f"{tag}@y.test")], "y.test"), f"body {tag}\r\n".encode()


@pytest.fixture
def base(tmp_path):
    d = tmp_path / "spool"
    d.mkdir()
    return str(d)


@pytest.fixture
async def tables(base):
    made: list[ClaimTable] = []

    async def make(k: int, n: int = 2, **kw) -> ClaimTable:
        t = ClaimTable(base, k, n, **kw)
        await t.open()
        made.append(t)
        return t

    yield make
    for t in made:
        await t.close()


@pytest.fixture
async def spools(base):
    made: list[Spool] = []

    async def make(k: int) -> Spool:
        sp = Spool(shards.shard_dir(base, k), min_free_bytes=1 << 20)
        await sp.open()
        sp.recover()
        made.append(sp)
        return sp

    yield make
    for sp in made:
        await sp.close()


def storer(sp: Spool, tag: str = "m"):
    """What Relay._store_transfer does, minus the mainlog and the queue."""

    async def store() -> tuple[str, bool]:
        items = [item(tag)]
        _entries, dup = await sp.add_once(items, KEY)
        return (dup, True) if dup is not None else (items[0][0].msgid, False)

    return store


def rows(base: str) -> list[tuple]:
    conn = sqlite3.connect(os.path.join(base, CLAIMS_FILE))
    try:
        return conn.execute("SELECT node, origin, shard, msgid, at FROM claims ORDER BY node, origin").fetchall()
    finally:
        conn.close()


def put_row(base: str, key: tuple[str, str], shard: int, msgid: str | None, at: float) -> None:
    conn = sqlite3.connect(os.path.join(base, CLAIMS_FILE))
    try:
        conn.execute("INSERT OR REPLACE INTO claims(node, origin, shard, msgid, at) VALUES (?, ?, ?, ?, ?)",
                     (*key, shard, msgid, at))
        conn.commit()
    finally:
        conn.close()


# --- claim / pending / done / release --------------------------------------------------------------


async def test_claim_pending_done_duplicate(tables, base):
    w0, w1 = await tables(0), await tables(1)
    assert await w0.claim(KEY) is None
    with pytest.raises(TransferInProgress) as e:
        await w1.claim(KEY)  # pending, held by worker 0: a retry-later (503)
    assert e.value.holder == 0 and e.value.retry_after > 0
    await w0.done(KEY, "M1")
    assert await w1.claim(KEY) == "M1"
    assert await w0.claim(KEY) == "M1"
    assert await w1.claim(("node-b", "17")) is None  # another origin node is another key
    assert [(r[0], r[1], r[2], r[3]) for r in rows(base)] == [("node-a", "17", 0, "M1"), ("node-b", "17", 1, None)]


async def test_release_frees_the_key_for_any_worker(tables):
    w0, w1 = await tables(0), await tables(1)
    assert await w0.claim(KEY) is None
    await w0.release(KEY)
    assert await w1.claim(KEY) is None


async def test_a_release_never_deletes_a_done_claim(tables):
    w0, w1 = await tables(0), await tables(1)
    assert await w0.claim(KEY) is None
    await w0.done(KEY, "M1")
    await w0.release(KEY)
    assert await w1.claim(KEY) == "M1"


# --- store_once: the protocol the relay runs ---------------------------------------------------------


async def test_store_once_over_two_shards_stores_once(tables, spools):
    w0, w1 = await tables(0), await tables(1)
    sp0, sp1 = await spools(0), await spools(1)
    msgid, dup = await w0.store_once(KEY, storer(sp0, "first"))
    assert not dup and msgid.endswith(sp0.node_id)
    assert await w1.store_once(KEY, storer(sp1, "resend")) == (msgid, True)
    assert await w0.store_once(KEY, storer(sp0, "resend")) == (msgid, True)
    assert len(sp0.recover()) == 1 and sp1.recover() == []


async def test_concurrent_resends_to_both_workers_store_once(tables, spools):
    w0, w1 = await tables(0), await tables(1)
    sp0, sp1 = await spools(0), await spools(1)
    calls = [(w0, sp0), (w1, sp1)] * 10
    results = await asyncio.gather(*(w.store_once(KEY, storer(sp, f"r{i}")) for i, (w, sp) in enumerate(calls)),
                                   return_exceptions=True)
    stored = [r for r in results if isinstance(r, tuple) and not r[1]]
    busy = [r for r in results if isinstance(r, TransferInProgress)]
    assert len(stored) == 1, results
    assert all(isinstance(r, tuple | TransferInProgress) for r in results), results
    msgid = stored[0][0]
    assert {r[0] for r in results if isinstance(r, tuple)} == {msgid}
    # The sender tries the refused ones again: now all duplicates of the one stored.
    for i in range(len(busy)):
        w, sp = calls[i % 2]
        assert await w.store_once(KEY, storer(sp, "again")) == (msgid, True)
    assert len(sp0.recover()) + len(sp1.recover()) == 1


async def test_a_store_the_shard_refuses_frees_the_claim(tables, spools):
    w0, w1 = await tables(0), await tables(1)
    sp1 = await spools(1)

    async def full() -> tuple[str, bool]:
        raise SpoolFull("disk full")

    with pytest.raises(SpoolFull):
        await w0.store_once(KEY, full)
    assert rows(w0.spool_base) == []
    _msgid, dup = await w1.store_once(KEY, storer(sp1))  # the resend is stored elsewhere, once
    assert not dup and len(sp1.recover()) == 1


async def test_a_store_that_fails_unexpectedly_keeps_the_claim(tables):
    # Whether it was committed is unknown: the claim stays pending (settled from the shard later).
    w0, w1 = await tables(0), await tables(1)

    async def bug() -> tuple[str, bool]:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        await w0.store_once(KEY, bug)
    with pytest.raises(TransferInProgress):
        await w1.claim(KEY)


async def test_a_request_that_goes_away_still_finishes_its_claim(tables, spools):
    w0, w1 = await tables(0), await tables(1)
    sp0 = await spools(0)
    gate = asyncio.Event()
    inner = storer(sp0)

    async def slow() -> tuple[str, bool]:
        await gate.wait()
        return await inner()

    req = asyncio.ensure_future(w0.store_once(KEY, slow))
    await asyncio.sleep(0.05)
    req.cancel()  # the HTTP request is cancelled (the client went away, shutdown)
    with pytest.raises(asyncio.CancelledError):
        await req
    gate.set()
    for _ in range(100):
        if rows(w0.spool_base)[0][3] is not None:
            break
        await asyncio.sleep(0.02)
    msgid = rows(w0.spool_base)[0][3]
    assert msgid is not None and await w1.claim(KEY) == msgid


async def test_same_key_twice_in_one_worker_waits_its_turn(tables, spools):
    w0 = await tables(0)
    sp0 = await spools(0)
    results = await asyncio.gather(*(w0.store_once(KEY, storer(sp0, f"r{i}")) for i in range(5)))
    assert sum(1 for _m, dup in results if not dup) == 1 and len({m for m, _d in results}) == 1
    assert w0.stats["in_progress"] == 0 and len(sp0.recover()) == 1


# --- two processes racing for the same keys --------------------------------------------------------


def child(*args: str, crashpoint: str = "") -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FASTRELAY_CRASHPOINT", None)
    if crashpoint:
        env["FASTRELAY_CRASHPOINT"] = crashpoint
    return subprocess.Popen([sys.executable, CHILD, *args], stdout=subprocess.PIPE, text=True, env=env)


def test_two_processes_racing_for_the_same_keys_exactly_one_wins_each(base, tmp_path):
    keys = 200
    go = str(tmp_path / "go")
    procs = [child("race", base, str(k), "2", str(keys), go) for k in (0, 1)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    with open(go + ".tmp", "w") as f:
        f.write(str(time.time() + 0.3))  # both claim each key at the same moment
    os.rename(go + ".tmp", go)
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0 and out.rstrip().endswith("end")
        outs.append(out.split("\n"))
    winners: dict[int, list[int]] = {}
    dups: dict[int, str] = {}
    for k, lines in enumerate(outs):
        for line in lines:
            f = line.split()
            if f and f[0] == "won":
                winners.setdefault(int(f[1]), []).append(k)
            elif f and f[0] == "dup":
                dups[int(f[1]) * 2 + k] = f[2]
    assert sorted(winners) == list(range(keys)) and all(len(w) == 1 for w in winners.values())
    for slot, msgid in dups.items():
        i, k = divmod(slot, 2)
        assert winners[i] == [1 - k] and msgid == f"w{1 - k}-{i}"  # the loser got the winner's id
    # Both processes really raced (each won some keys), so the test cannot pass by taking turns.
    assert {w[0] for w in winners.values()} == {0, 1}


# --- crash between claim and done, settled at start (a real spool, a real exit) -------------------------


async def successor(base: str, k: int, n: int = 2) -> tuple[Spool, ClaimTable]:
    """What Relay.start does for worker k: open its shard, import the keys, settle its claims."""
    sp = Spool(shards.shard_dir(base, k), min_free_bytes=1 << 20)
    await sp.open()
    t = ClaimTable(base, k, n)
    await t.open()
    await t.import_shards([(j, shards.shard_dir(base, j)) for j in range(n)])
    await t.settle(sp.directory)
    sp.recover()
    return sp, t


@pytest.mark.parametrize("point", ["xfer_after_claim", "xfer_before_done"])
async def test_worker_killed_between_claim_and_done_is_settled_by_its_successor(base, point):
    p = await asyncio.to_thread(child, "store", base, "1", "2", *KEY, crashpoint=point)
    out, _ = await asyncio.to_thread(p.communicate, timeout=60)
    assert p.returncode == 137 and "stored" not in out  # died inside store_once, nothing answered
    (row,) = rows(base)
    assert row[2] == 1 and row[3] is None  # its claim is left pending

    other = ClaimTable(base, 0, 2)
    await other.open()
    try:
        with pytest.raises(TransferInProgress):  # worker 0 leaves it to worker 1's successor
            await other.claim(KEY)
        sp1, w1 = await successor(base, 1)
        try:
            stored = sp1.recover()
            if point == "xfer_after_claim":
                # Never stored: the claim is freed, and a resend is stored once, by any worker.
                assert stored == [] and rows(base) == [] and w1.stats["settled_deleted"] == 1
                assert await other.claim(KEY) is None
            else:
                # Stored in shard 1: the claim is done with that msgid; resends anywhere are duplicates.
                (e,) = stored
                msgid = (await sp1.load(e.id))[0].msgid
                assert rows(base)[0][3] == msgid and w1.stats["settled_done"] == 1
                assert await other.claim(KEY) == msgid
                assert await w1.store_once(KEY, storer(sp1)) == (msgid, True)
        finally:
            await sp1.close()
            await w1.close()
    finally:
        await other.close()


async def test_pending_claims_of_an_adopted_shard_are_settled_by_its_adopter(base, spools, tables):
    # The last run had 3 workers; this one has 2: shard 2 is adopted by worker 0 (2 mod 2).
    sp2 = await spools(2)
    await sp2.add_once([item()], KEY)
    w1 = await tables(1)
    put_row(base, KEY, 2, None, time.time() - 3600)  # worker 2 died before marking it done
    put_row(base, ("node-a", "18"), 2, None, time.time() - 3600)  # and before storing this one
    with pytest.raises(TransferInProgress):  # no worker of this run owns shard 2: never "stale"
        await w1.claim(KEY)
    await sp2.close()
    sp0 = await spools(0)
    await shards.adopt(shards.shard_dir(base, 2), sp0)
    w0 = await tables(0)
    assert await w0.settle(sp0.directory) == (1, 1)
    msgid = rows(base)[0][3]
    assert msgid is not None and await w1.claim(KEY) == msgid
    assert await w1.claim(("node-a", "18")) is None


# --- stale claims ---------------------------------------------------------------------------------


async def test_a_stale_claim_is_answered_from_its_holders_shard(base, spools, tables):
    sp1 = await spools(1)
    _e, _ = await sp1.add_once([item()], KEY)
    (stored,) = sp1.recover()
    msgid = (await sp1.load(stored.id))[0].msgid
    w0 = await tables(0, stale_after=60)
    old = time.time() - 1000
    put_row(base, KEY, 1, None, old)  # worker 1 stored it, and could not mark it done
    put_row(base, ("node-a", "99"), 1, None, old)  # never stored by worker 1
    assert await w0.claim(KEY) == msgid
    assert await w0.claim(("node-a", "99")) is None  # taken over
    assert w0.stats["stale_found"] == 1 and w0.stats["taken_over"] == 1
    assert [(r[2], r[3]) for r in rows(base)] == [(1, msgid), (0, None)]
    w1 = await tables(1, stale_after=60)
    with pytest.raises(TransferInProgress):  # now fresh, held by worker 0
        await w1.claim(("node-a", "99"))


async def test_a_fresh_claim_is_not_stale(base, tables):
    w0 = await tables(0, stale_after=60)
    put_row(base, KEY, 1, None, time.time() - 5)
    with pytest.raises(TransferInProgress):
        await w0.claim(KEY)


# --- import of the shards' own keys, and pruning --------------------------------------------------------


async def test_keys_stored_with_one_worker_are_known_to_every_worker_after(base, spools, tables):
    sp0 = await spools(0)  # a run with Workers = 1 stored a transfer: no claims were kept
    await sp0.add_once([item()], KEY)
    (e,) = sp0.recover()
    msgid = (await sp0.load(e.id))[0].msgid
    # Now Workers = 2: worker 1 may start, and take the resend, before worker 0 has: it imports
    # every shard's keys itself.
    w1 = await tables(1)
    assert await w1.import_shards([(0, sp0.directory), (1, shards.shard_dir(base, 1))]) == 1
    assert await w1.claim(KEY) == msgid
    # The next import of shard 0 starts near the last one: nothing is read twice.
    await sp0.add_once([item("later")], ("node-a", "18"))
    assert await w1.import_shards([(0, sp0.directory)]) == 1
    assert await w1.claim(("node-a", "18")) is not None


async def test_import_never_overwrites_a_pending_claim(base, spools, tables):
    sp0 = await spools(0)
    w0, w1 = await tables(0), await tables(1)
    assert await w0.claim(KEY) is None  # worker 0 has claimed it and is committing it
    await sp0.add_once([item()], KEY)
    assert await w1.import_shards([(0, sp0.directory)]) == 0
    assert rows(base)[0][2:4] == (0, None)


async def test_old_claims_are_pruned(base, tables):
    w0 = await tables(0)
    put_row(base, KEY, 0, "M-old", time.time() - XFER_KEY_TTL - 10)
    put_row(base, ("node-a", "18"), 0, "M-new", time.time() - 10)
    await w0.settle(shards.shard_dir(base, 0))
    assert [r[1] for r in rows(base)] == ["18"]
    assert await w0.claim(KEY) is None  # forgotten after the TTL, as a shard's xfer_seen forgets it
