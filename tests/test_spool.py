"""The spool: round trips, atomic adds, progress across restarts, recovery and quarantine, group commit,
failures (a real full disk on a 2 MiB tmpfs), close. Real SQLite files on disk, no mocks.

Each async test runs under the default asyncio loop and under uvloop (the `both_loops` decorator).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import sqlite3
import zlib

import pytest
import uvloop

from fastrelay import limits
from fastrelay.message import DELIVERED, FAILED, PENDING, Envelope, Recipient
from fastrelay.spool import IndexEntry, Spool, SpoolError, SpoolFull

_FACTORIES = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def both_loops(fn):
    """Run an async test once on each event loop implementation."""

    @pytest.mark.parametrize("loop_kind", list(_FACTORIES))
    @functools.wraps(fn)
    def wrapper(loop_kind, *args, **kwargs):
        with asyncio.Runner(loop_factory=_FACTORIES[loop_kind]) as runner:
            return runner.run(fn(*args, **kwargs))

    sig = inspect.signature(fn)
    loop_kind = inspect.Parameter("loop_kind", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [loop_kind, *sig.parameters.values()]
    wrapper.__signature__ = sig.replace(parameters=params)
    return wrapper


def envelope(i: int = 0, domain: str = "dest.example", n_rcpts: int = 1) -> Envelope:
    return Envelope(
        sender=f"sender{i}@src.example",
        recipients=[Recipient(f"r{k}.{i}@{domain}") for k in range(n_rcpts)],
        domain=domain,
    )


def body(i: int, size: int = 4096) -> bytes:
    head = f"Subject: message {i}\r\n\r\n".encode()
    return head + os.urandom(max(0, size - len(head)))


async def opened(directory, **kw) -> Spool:
    sp = Spool(str(directory), **kw)
    await sp.open()
    return sp


def db(directory) -> sqlite3.Connection:
    """A side connection for checking or tampering with the database directly."""
    return sqlite3.connect(os.path.join(str(directory), "spool.db"), isolation_level=None)


# ---------------------------------------------------------------------------------------- round trip


@both_loops
async def test_round_trip_of_everything(tmp_path):
    sp = await opened(tmp_path)
    try:
        full = Envelope(
            sender="",  # the null sender <>
            recipients=[
                Recipient('"john..doe"@Dest.Example', "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y", PENDING),
                Recipient("Ünïcode@dest.example", "", DELIVERED, "250 2.0.0 ok"),
                Recipient("raw\udcff@dest.example", "", FAILED, "550 5.1.1 no such user"),  # surrogateescape
            ],
            domain="dest.example",
            mail_params="SIZE=1000 BODY=8BITMIME SMTPUTF8",
            client_ip="2001:db8::1",
            helo="client.example",
            protocol="esmtps",
            binding="outbound-2",
            msgid="",
            received_at=0.0,
            first_queued=1_700_000_000.25,
            attempts=3,
            next_attempt=1_700_000_600.5,
            meta={"reroute": "a.example", "xfer": {"origin": "n1", "hops": [1, 2]}, "x": None},
        )
        nul = b"\x00\x01line with bare LF\nand bare CR\r.\r\n\x00\xff" * 3
        big = os.urandom(1024 * 1024)
        entries = await sp.add([(full, nul), (envelope(1), big), (envelope(2), b"")])
        assert [e.id for e in entries] == [entries[0].id + k for k in range(3)]
        e0 = entries[0]
        assert isinstance(e0, IndexEntry)
        assert (e0.domain, e0.binding, e0.attempts, e0.next_attempt, e0.size) == (
            "dest.example", "outbound-2", 3, 1_700_000_600.5, len(nul))
        assert e0.first_queued == 1_700_000_000.25  # kept (XFER teleport keeps it)
        assert full.msgid and full.received_at > 0  # filled in by add

        env, data = await sp.load(e0.id)
        assert env == full and data == nul
        env1, data1 = await sp.load(entries[1].id)
        assert data1 == big and env1.first_queued == env1.received_at > 0
        env2, data2 = await sp.load(entries[2].id)
        assert data2 == b""
        assert len({env.msgid, env1.msgid, env2.msgid}) == 3
        assert await sp.load(10**9) is None
    finally:
        await sp.close()


@both_loops
async def test_add_is_one_transaction_and_all_or_nothing(tmp_path):
    sp = await opened(tmp_path)
    try:
        before = sp.stats["commits"]
        entries = await sp.add([(envelope(i, f"d{i}.example"), body(i)) for i in range(3)])
        assert sp.stats["commits"] == before + 1
        assert len(entries) == 3
    finally:
        await sp.close()
    # A trigger makes every body of length 666 fail: an add holding one fails whole, and the adds that
    # shared its batch still succeed (the batch is retried one operation per transaction).
    with db(tmp_path) as c:
        c.execute("CREATE TRIGGER boom BEFORE INSERT ON body WHEN NEW.len = 666"
                  " BEGIN SELECT RAISE(ABORT, 'boom'); END")
    sp = await opened(tmp_path)
    try:
        good = [sp.add([(envelope(i), body(i))]) for i in range(10)]
        bad = sp.add([(envelope(100), body(100)), (envelope(101), body(101, 666)), (envelope(102), b"x")])
        results = await asyncio.gather(*good, bad, return_exceptions=True)
        assert isinstance(results[-1], SpoolError) and not isinstance(results[-1], SpoolFull)
        ok = [r[0] for r in results[:-1]]
        assert all(isinstance(r, IndexEntry) for r in ok)
        for e in ok:
            assert await sp.load(e.id) is not None
        index = sp.recover()
        assert sorted(e.id for e in index) == sorted([*(e.id for e in entries), *(e.id for e in ok)])
        assert sp.stats["batch_failures"] >= 1
    finally:
        await sp.close()


@both_loops
async def test_ids_increase_across_reopen_and_node_id_is_stable(tmp_path):
    sp = await opened(tmp_path / "a")
    node = sp.node_id
    assert node
    a = await sp.add([(envelope(i), body(i)) for i in range(5)])
    await sp.remove(a[-1].id)  # the newest goes: its id must still never come back
    await sp.close()
    sp = await opened(tmp_path / "a")
    try:
        assert sp.node_id == node
        b = await sp.add([(envelope(9), body(9))])
        assert b[0].id > a[-1].id
    finally:
        await sp.close()
    other = await opened(tmp_path / "b")
    try:
        assert other.node_id != node
    finally:
        await other.close()


# ---------------------------------------------------------------------------------------- progress


@both_loops
async def test_progress_persists_across_reopen(tmp_path):
    sp = await opened(tmp_path)
    env = envelope(1, n_rcpts=3)
    (e,) = await sp.add([(env, body(1))])
    (gone,) = await sp.add([(envelope(2), body(2))])
    env.recipients[0].state = DELIVERED
    env.recipients[0].detail = "250 ok"
    env.recipients[2].state = FAILED
    await sp.mark_recipients(e.id, env)
    env.attempts = 4
    env.next_attempt = 1_800_000_000.0
    env.domain = "rerouted.example"
    env.meta["reroute"] = "dest.example"
    await sp.reschedule(e.id, env)
    await sp.remove(gone.id)
    assert await sp.load(gone.id) is None
    await sp.remove(gone.id)  # removing twice is harmless
    await sp.close()

    sp = await opened(tmp_path)
    try:
        index = sp.recover()
        assert [(x.id, x.domain, x.attempts, x.next_attempt) for x in index] == [
            (e.id, "rerouted.example", 4, 1_800_000_000.0)]
        env2, _ = await sp.load(e.id)
        assert [r.state for r in env2.recipients] == [DELIVERED, PENDING, FAILED]
        assert env2.pending() == [1]
        assert env2.meta == {"reroute": "dest.example"}
        assert await sp.load(gone.id) is None
        with db(tmp_path) as c:
            assert c.execute("SELECT count(*) FROM body WHERE id=?", (gone.id,)).fetchone()[0] == 0
    finally:
        await sp.close()


@both_loops
async def test_updates_in_one_batch_keep_their_order(tmp_path):
    sp = await opened(tmp_path)
    try:
        env = envelope(1)
        (e,) = await sp.add([(env, body(1))])
        futs = []
        for k in range(1, 51):
            env.attempts = k
            futs.append(sp.reschedule(e.id, env))  # each call snapshots the envelope at the call
        await asyncio.gather(*futs)
        env2, _ = await sp.load(e.id)
        assert env2.attempts == 50
    finally:
        await sp.close()


# ---------------------------------------------------------------------------------------- recovery


@both_loops
async def test_recover_returns_every_unfinished_message(tmp_path):
    sp = await opened(tmp_path)
    added = []
    for i in range(20):
        added += await sp.add([(envelope(i, f"d{i % 3}.example"), body(i))])
    for e in added[::4]:
        await sp.remove(e.id)
    await sp.close()
    sp = await opened(tmp_path)
    try:
        want = [e for k, e in enumerate(added) if k % 4]
        assert sp.recover() == want
    finally:
        await sp.close()


@both_loops
async def test_torn_and_corrupt_entries_are_quarantined(tmp_path, caplog):
    sp = await opened(tmp_path)
    entries = await sp.add([(envelope(i), body(i)) for i in range(6)])
    await sp.close()
    ids = [e.id for e in entries]
    with db(tmp_path) as c:
        c.execute("UPDATE msg SET env=? WHERE id=?", ('{"v": 1, "sender": "trunc', ids[0]))  # bad JSON
        c.execute("UPDATE body SET len=len+1 WHERE id=?", (ids[1],))  # length mismatch
        c.execute("UPDATE body SET data=substr(data, 1, 100) WHERE id=?", (ids[2],))  # truncated body
        c.execute("DELETE FROM body WHERE id=?", (ids[3],))  # body row missing
        c.execute("UPDATE body SET data=zeroblob(len) WHERE id=?", (ids[4],))  # same length, crc fails
        c.execute("INSERT INTO body(id, data, len, crc) VALUES (?, x'00', 1, 0)", (10**6,))  # orphan body

    caplog.set_level(logging.ERROR, logger="fastrelay.spool")
    sp = await opened(tmp_path)
    try:
        index = sp.recover()
        # The crc is checked when the body is read (load), not at recovery.
        assert [e.id for e in index] == [ids[4], ids[5]]
        logged = caplog.text
        for mid in ids[:4]:
            assert f"message {mid} quarantined" in logged
        assert "does not parse" in logged and "length mismatch" in logged and "body row missing" in logged
        assert "body without envelope" in logged
        for mid in ids[:4]:
            assert await sp.load(mid) is None
        caplog.clear()
        assert await sp.load(ids[4]) is None  # crc mismatch: never handed out
        assert f"message {ids[4]} is corrupt" in caplog.text and "checksum" in caplog.text
        env, data = await sp.load(ids[5])
        assert data and env.recipients
        assert sp.stats["quarantined"] == 6
    finally:
        await sp.close()

    with db(tmp_path) as c:
        rows = c.execute("SELECT id, reason, at, env IS NOT NULL, data IS NOT NULL FROM quarantine")
        got = {r[0]: r for r in rows}
        assert set(got) == {*ids[:5], 10**6}
        assert all(r[2] > 0 and r[1] for r in got.values())
        assert got[ids[0]][3] and got[ids[0]][4]  # what was readable is kept
        assert got[ids[3]][3] and not got[ids[3]][4]
        assert got[10**6][4] and not got[10**6][3]
        assert c.execute("SELECT count(*) FROM msg").fetchone()[0] == 1
    sp = await opened(tmp_path)
    try:
        assert [e.id for e in sp.recover()] == [ids[5]]
        (new,) = await sp.add([(envelope(7), body(7))])
        assert new.id > 10**6  # quarantined ids are not reused either
    finally:
        await sp.close()


# ---------------------------------------------------------------------------------------- group commit


@both_loops
async def test_group_commit_groups(tmp_path):
    sp = await opened(tmp_path)
    try:
        entries = await asyncio.gather(*(sp.add([(envelope(i), body(i))]) for i in range(200)))
        assert len({e[0].id for e in entries}) == 200
        assert sp.stats["items"] == 200
        assert sp.stats["commits"] <= 20, sp.stats
        assert sp.stats["largest_batch"] >= 10
        loaded = await asyncio.gather(*(sp.load(e[0].id) for e in entries))
        assert all(x is not None for x in loaded)
        assert sp.stats["load_batches"] <= 20, sp.stats
    finally:
        await sp.close()


@both_loops
async def test_commit_delay_gathers_writes_that_arrive_within_the_window(tmp_path):
    """spool_commit_delay: writes submitted one after another, while the first waits in its
    window, share its one commit; none is acknowledged before that commit."""
    sp = await opened(tmp_path, commit_delay=1.0)
    try:
        first = asyncio.ensure_future(sp.add([(envelope(0), body(0))]))
        later = []
        for i in range(1, 5):
            await asyncio.sleep(0.02)  # each one well after the last: no batch without the window
            later.append(asyncio.ensure_future(sp.add([(envelope(i), body(i))])))
        assert not first.done(), "acknowledged before the window closed"
        await asyncio.gather(first, *later)
        assert sp.stats["items"] == 5 and sp.stats["commits"] == 1, sp.stats
        sp.commit_delay = 0.0  # what a reload does: the next batch commits at once
        await sp.add([(envelope(9), body(9))])
        assert sp.stats["commits"] == 2
    finally:
        await sp.close()


# The commit window and how many clients could send (Spool.sources, Spool._window). The rule, from
# the docstring: "With none sending (a queue draining ...) or many (under load ...), it is the
# configured one, as before. With a few clients, it ends as soon as the batch holds one add per
# client ... A batch that begins with a removal or an update waits the same way for the clients'
# next messages." and, for one client, "its add commits at once".
# Each row: clients the relay reports (None: a spool on its own; "error": the count raises),
# spool_commit_few_clients, the operations submitted 20 ms apart, whether the first add is
# acknowledged well before the window (1.5 s here) is over, the commits the operations take, and
# the windows skipped and cut. The window's logic runs in the writer thread, whatever the event
# loop, so these run on the default loop only.
WINDOW = 1.5
F = limits.SPOOL_COMMIT_FEW_CLIENTS
WINDOW_ROWS = [
    # clients, few_clients, operations, add acked early, commits, skipped, cut
    (None, F, ["add", "add", "add"], False, 1, 0, 0),  # a spool on its own: the window as configured
    ("error", F, ["add", "add", "add"], False, 1, 0, 0),  # the count fails: the window as configured
    (1, F, ["add"], True, 1, 1, 0),  # a client alone: its add commits at once
    (1, F, ["remove", "remove", "add"], True, 1, 0, 1),  # removals wait, until the client's next add joins
    (1, F, ["remove", "add", "remove"], True, 2, 0, 1),  # the add ends the window; the removal after: next
    (2, F, ["add", "add"], True, 1, 0, 1),  # two clients: ends once the second's message joins
    (2, F, ["add"], False, 1, 0, 0),  # two clients, one message: the other may still send, so wait
    (2, F, ["remove", "add"], False, 1, 0, 0),  # two clients: one add is not one from each
    (2, F, ["remove", "add", "add"], True, 1, 0, 1),  # a removal first, then one add from each
    (2, F, ["add", "remove", "add"], True, 1, 0, 1),  # a removal between does not count as a client's
    (3, F, ["add", "add", "add"], True, 1, 0, 1),
    (F, F, ["add"] * F, True, 1, 0, 1),  # as many clients as few_clients: still ends early
    (F, F, ["add"] * (F - 1), False, 1, 0, 0),  # one of them has not sent: the whole window
    (F + 1, F, ["add"] * (F + 1), False, 1, 0, 0),  # more than few_clients: asleep for the window
    (1, 0, ["add"], False, 1, 0, 0),  # few_clients 0: the whole window always, even for one client
    (1, 1, ["add"], True, 1, 1, 0),  # few_clients 1: a client alone still commits at once
    (2, 1, ["add", "add"], False, 1, 0, 0),  # few_clients 1, two clients: the whole window
    (0, F, ["add", "add"], False, 1, 0, 0),  # no client (DSNs while draining): nobody waits, gather
    (0, F, ["remove", "remove", "add"], False, 1, 0, 0),  # a drain's removals gather for the whole window
]


@pytest.mark.parametrize("clients,few,ops,early,commits,skipped,cut", WINDOW_ROWS)
async def test_commit_window_by_clients_sending(tmp_path, clients, few, ops, early, commits, skipped, cut):
    sp = await opened(tmp_path, few_clients=few)
    try:
        ids = [e.id for e in await sp.add([(envelope(i), body(i)) for i in range(ops.count("remove"))])] \
            if "remove" in ops else []
        if clients == "error":
            sp.sources = lambda: 1 // 0
        elif clients is not None:
            sp.sources = lambda: clients
        sp.commit_delay = WINDOW
        before = dict(sp.stats)
        futs = []
        for k, op in enumerate(ops):
            if k:
                await asyncio.sleep(0.02)
            futs.append(asyncio.ensure_future(sp.add([(envelope(100 + k), body(k))]) if op == "add"
                                              else sp.remove(ids.pop(0))))
        add = futs[ops.index("add")]
        if early:
            # Well before the window ends (it would be WINDOW - 0.02 * len(ops) seconds from here).
            await asyncio.wait_for(asyncio.shield(add), WINDOW / 2)
        else:
            await asyncio.sleep(0.3)
            assert not add.done(), "acknowledged before the window closed"
        await asyncio.gather(*futs)
        assert sp.stats["commits"] - before["commits"] == commits, sp.stats
        assert sp.stats["windows_skipped"] - before["windows_skipped"] == skipped, sp.stats
        assert sp.stats["windows_cut"] - before["windows_cut"] == cut, sp.stats
    finally:
        await sp.close()


@both_loops
async def test_fsync_off_works_the_same(tmp_path):
    sp = await opened(tmp_path, fsync=False)
    (e,) = await sp.add([(envelope(1), body(1))])
    await sp.close()
    sp = await opened(tmp_path, fsync=False)
    try:
        assert [x.id for x in sp.recover()] == [e.id]
    finally:
        await sp.close()


# ---------------------------------------------------------------------------------------- open / close


@both_loops
async def test_close_finishes_operations_in_flight(tmp_path):
    sp = await opened(tmp_path)
    (first,) = await sp.add([(envelope(0), body(0))])
    tasks = [asyncio.ensure_future(sp.add([(envelope(i), body(i))])) for i in range(1, 101)]
    tasks.append(asyncio.ensure_future(sp.remove(first.id)))
    await asyncio.sleep(0)  # let the tasks queue their operations
    await sp.close()
    results = await asyncio.gather(*tasks)
    assert len(results) == 101
    for coro in (sp.add([(envelope(1), body(1))]), sp.load(1), sp.remove(1), sp.reschedule(1, envelope(1))):
        with pytest.raises(SpoolError):
            await coro
    await sp.close()  # twice is fine
    sp = await opened(tmp_path)
    try:
        assert len(sp.recover()) == 100
    finally:
        await sp.close()


@both_loops
async def test_open_errors(tmp_path):
    sp = await opened(tmp_path)
    try:
        with pytest.raises(SpoolError, match="in use"):
            await opened(tmp_path)  # one process, one spool
    finally:
        await sp.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpoolError):
        await opened(tmp_path / "file")
    (tmp_path / "notdb").mkdir()
    (tmp_path / "notdb" / "spool.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(SpoolError):
        await opened(tmp_path / "notdb")
    with pytest.raises(SpoolError):
        await Spool(str(tmp_path / "x")).add([(envelope(1), b"")])  # not opened


# ---------------------------------------------------------------------------------------- a full disk




@both_loops
async def test_disk_full_loses_nothing_and_recovers(tiny_fs, caplog):
    caplog.set_level(logging.WARNING, logger="fastrelay.spool")
    sp = await opened(tiny_fs / "spool", min_free_bytes=256 * 1024)
    try:
        assert sp.space_ok()
        stored: dict[int, bytes] = {}
        refused: list[bytes] = []
        full = 0
        i = 0
        while full < 3 and i < 1000:
            # Several writers at once, so that failures also hit batches holding good operations.
            items = [(envelope(i + k), body(i + k, 12_000 + 997 * k)) for k in range(4)]
            i += 4
            results = await asyncio.gather(*(sp.add([it]) for it in items), return_exceptions=True)
            for (_, data), res in zip(items, results, strict=True):
                if isinstance(res, SpoolError):
                    assert isinstance(res, SpoolFull), res
                    refused.append(data)
                    full += 1
                else:
                    stored[res[0].id] = data
        assert full >= 3 and len(stored) > 20, (full, len(stored))
        sp._space_at = -1.0  # no waiting for the 1 s cache
        assert not sp.space_ok()
        assert sp.stats["disk_full"] >= 1
        assert "disk full" in caplog.text

        # Every add that returned is whole; none that raised is there.
        for mid, data in stored.items():
            env, got = await sp.load(mid)
            assert got == data
        present = {row[0] for row in _bodies(tiny_fs / "spool")}
        assert set(stored) <= present
        for data in refused:
            assert zlib.crc32(data) not in {row[1] for row in _bodies(tiny_fs / "spool")}

        # Progress and removals still work on the full disk; then new mail is accepted again.
        some = sorted(stored)[: len(stored) // 2]
        for mid in some:
            env, _ = await sp.load(mid)
            env.recipients[0].state = DELIVERED
            await sp.mark_recipients(mid, env)
            await sp.remove(mid)
            del stored[mid]
        again = []
        for k in range(5):
            (e,) = await sp.add([(envelope(5000 + k), body(5000 + k, 12_000))])
            again.append(e.id)
        assert len(again) == 5
        sp._space_at = -1.0
        assert sp.space_ok()  # free pages inside spool.db count: they take new mail first
    finally:
        await sp.close()
    sp = await opened(tiny_fs / "spool", min_free_bytes=256 * 1024)
    try:
        assert {e.id for e in sp.recover()} == set(stored) | set(again)
    finally:
        await sp.close()


def _bodies(directory):
    with db(directory) as c:
        return c.execute("SELECT id, crc FROM body").fetchall()


def test_space_ok_follows_free_space(tiny_fs):
    async def main():
        sp = await opened(tiny_fs / "spool", min_free_bytes=512 * 1024)
        try:
            assert sp.space_ok()
            filler = tiny_fs / "filler"
            with open(filler, "wb") as f:
                try:
                    f.write(b"\0" * (2 * 1024 * 1024))
                except OSError:
                    pass
            assert sp.space_ok()  # cached for 1 s
            sp._space_at = -1.0
            assert not sp.space_ok()
            filler.unlink()
            sp._space_at = -1.0
            assert sp.space_ok()
        finally:
            await sp.close()

    asyncio.run(main())
