"""Damaged spool rows at start: each bad row is quarantined with its reason and the rest is delivered;
an empty spool.db is refused loudly instead of being silently replaced by a new spool."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

import pytest

from fastrelay.message import Envelope, Recipient
from fastrelay.relay import StartupError
from fastrelay.spool import Spool, SpoolError
from tests.support import Sink
from tests.support.relay import RelayHarness

GOOD = 200

# (how the row is damaged, SQL applied to message ?, words of the reason it is quarantined with)
DAMAGE = [
    ("next_attempt is text", "UPDATE msg SET next_attempt = 'x' WHERE id = ?", "next_attempt is 'x'"),
    ("first_queued is NULL", "UPDATE msg SET first_queued = NULL WHERE id = ?", "first_queued is None"),
    ("attempts is text", "UPDATE msg SET attempts = 'many' WHERE id = ?", "attempts is 'many'"),
    ("domain is a blob", "UPDATE msg SET domain = x'ff00' WHERE id = ?", "domain is b'\\xff\\x00'"),
    ("body is text", "UPDATE body SET data = CAST(data AS TEXT) WHERE id = ?", "body stored as text"),
    ("body is text, not UTF-8", "UPDATE body SET data = CAST(x'ff41ff' AS TEXT), len = 3 WHERE id = ?",
     "body stored as text"),
]


def _env(i: int) -> Envelope:
    return Envelope("from@src.test", [Recipient(f"r{i}@dst.test")], "dst.test", client_ip="192.0.2.1")


async def _fill_spool(directory: str, n: int) -> list[int]:
    sp = Spool(directory)
    await sp.open()
    try:
        entries = await sp.add([(_env(i), f"X-Test-Id: t{i}\r\n\r\nbody {i}\r\n".encode()) for i in range(n)])
        return [e.id for e in entries]
    finally:
        await sp.close()


async def _until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_each_bad_row_is_quarantined_and_the_rest_delivered(tmp_path, caplog):
    """Issue 9: one corrupt index column (next_attempt = 'x') stopped the whole relay from starting,
    and a body stored as TEXT was neither delivered nor quarantined, with repeating tracebacks."""
    caplog.set_level(logging.INFO)
    ids = await _fill_spool(str(tmp_path / "spool"), GOOD + len(DAMAGE))
    bad_ids = ids[GOOD:]
    with sqlite3.connect(tmp_path / "spool" / "spool.db") as c:
        for mid, (_what, sql, _why) in zip(bad_ids, DAMAGE, strict=True):
            c.execute(sql, (mid,))
    sink = await Sink("127.0.0.2").start()
    h = RelayHarness(tmp_path, f"""
        Prohibited_Hosts = ( "0.0.0.0/8" )
        Routes = ( "smtp://127.0.0.2?port={sink.port}" )
        TLS = disabled
        retry_interval = 1
        """)
    try:
        await h.start()
        assert await _until(lambda: len(sink.messages) >= GOOD, 30), len(sink.messages)
        await asyncio.sleep(0.3)
        got = sorted(m.rcpt_tos[0] for m in sink.messages)
        assert got == sorted(f"r{i}@dst.test" for i in range(GOOD))
    finally:
        await h.stop()
        await sink.stop()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    with sqlite3.connect(tmp_path / "spool" / "spool.db") as c:
        quarantined = dict(c.execute("SELECT id, reason FROM quarantine").fetchall())
        assert c.execute("SELECT count(*) FROM msg").fetchone()[0] == 0
        kept = dict(c.execute("SELECT id, data IS NOT NULL FROM quarantine").fetchall())
    assert set(quarantined) == set(bad_ids)
    for mid, (what, _sql, why) in zip(bad_ids, DAMAGE, strict=True):
        assert why in quarantined[mid], (what, quarantined[mid])
        assert kept[mid], f"{what}: the body was not kept in quarantine"
        assert f"message {mid} quarantined" in caplog.text


async def test_an_empty_spool_db_is_refused_not_replaced(tmp_path):
    """Issue 9: a zero-length spool.db silently started a new empty spool with a new node id."""
    await _fill_spool(str(tmp_path / "spool"), 3)
    db = tmp_path / "spool" / "spool.db"
    db.write_bytes(b"")
    with pytest.raises(SpoolError, match=r"is empty \(0 bytes\).*would lose the queue"):
        await Spool(str(tmp_path / "spool")).open()
    assert db.stat().st_size == 0  # left as found, for the operator
    h = RelayHarness(tmp_path, "suspend_delivery = 1\n")
    with pytest.raises(StartupError, match=r"is empty \(0 bytes\)"):
        await h.start()


async def test_a_wal_without_its_database_is_refused(tmp_path):
    """spool.db gone but spool.db-wal there: the newest part of a queue; never started over silently."""
    d = tmp_path / "spool"
    d.mkdir()
    (d / "spool.db-wal").write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 4092)
    with pytest.raises(SpoolError, match=r"is missing but its write-ahead log .* is there"):
        await Spool(str(d)).open()
    assert not (d / "spool.db").exists()


async def test_a_new_spool_is_made_whole_before_it_is_named_spool_db(tmp_path):
    """The reason an empty spool.db can be refused: a spool is created under another name and renamed."""
    d = tmp_path / "spool"
    d.mkdir()
    (d / "spool.db.new").write_bytes(b"left by a crash while creating")
    sp = Spool(str(d))
    await sp.open()
    try:
        assert sp.node_id and sp.recover() == []
    finally:
        await sp.close()
    assert not (d / "spool.db.new").exists()
    sp = Spool(str(d))
    await sp.open()
    node = sp.node_id
    await sp.close()
    sp = Spool(str(d))
    await sp.open()
    try:
        assert sp.node_id == node
    finally:
        await sp.close()
