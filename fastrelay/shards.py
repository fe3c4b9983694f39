"""Spool shards: which directory each worker owns, and adopting the shards no worker owns any more.

Shard 0 is the spool directory itself (so `Workers = 1` reads and writes exactly the files it always
did); shard K >= 1 is <spool>/shard-K. Worker K of N owns shard K. When N shrinks between two runs
(issue 13: "no message is orphaned by a smaller N"), shard J >= N is adopted by worker J mod N, which
moves its messages into its own shard before it recovers: each batch is made durable in the new
shard first and only then removed from the old one, so a crash in between gives a duplicate
delivery, never a lost message (P1/P4). A shard found empty is deleted.

The adopted shard's XFER keys (its xfer_seen table: transfers it stored, by origin node and id,
docs/reliability.md case 36) are copied into the adopting shard first, so that a resend of one of
them is still answered as a duplicate once the shard is gone, with Workers = 1 too (which reads
only its own shard's keys; with Workers > 1 the relay-wide claims know them as well,
fastrelay.xfer.claims).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re

from fastrelay.spool import Spool

log = logging.getLogger("fastrelay.shards")

_SHARD_RE = re.compile(r"shard-([1-9][0-9]*)")
# Messages moved per transaction when a shard is adopted.
MOVE_BATCH = 256
# XFER keys copied per transaction when a shard is adopted (a few hundred KB of memory at most).
KEY_BATCH = 5000
# The files a spool directory holds (fastrelay/spool.py); an emptied shard loses them all.
_SPOOL_FILES = ("spool.db", "spool.db-wal", "spool.db-shm", "spool.reserve", "spool.lock")


def shard_dir(spool_dir: str, k: int) -> str:
    """The directory of shard k."""
    return spool_dir if k == 0 else os.path.join(spool_dir, f"shard-{k}")


def existing_shards(spool_dir: str) -> list[int]:
    """The shard numbers >= 1 that have a spool database under spool_dir, in order."""
    try:
        names = os.listdir(spool_dir)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = _SHARD_RE.fullmatch(name)
        if m and os.path.exists(os.path.join(spool_dir, name, "spool.db")):
            out.append(int(m.group(1)))
    return sorted(out)


def adopted_by(k: int, n: int, spool_dir: str) -> list[int]:
    """The shards J >= n (no worker of this run owns them) that worker k adopts: J mod n == k."""
    return [j for j in existing_shards(spool_dir) if j >= n and j % n == k]


async def adopt(src_dir: str, dest: Spool, *, fsync: bool = True, min_free_bytes: int = 0) -> int:
    """Move every message of the shard in src_dir into `dest` (an open spool); return how many.

    The envelope (msgid, recipients' states, attempts, schedule, first-queued time) moves as it is;
    only the spool-local id changes. The emptied shard's files are removed."""
    src = Spool(src_dir, fsync=fsync, min_free_bytes=min_free_bytes)
    await src.open()
    moved = 0
    try:
        entries = src.recover()  # (this also drops its keys older than XFER_KEY_TTL)
        after = 0
        while True:  # the keys before the messages: a key is never forgotten before its message is moved
            rows = await asyncio.to_thread(src.xfer_keys, after, KEY_BATCH)
            if not rows:
                break
            await dest.add_xfer_keys([r[1:] for r in rows])
            after = rows[-1][0]
        for start in range(0, len(entries), MOVE_BATCH):
            batch = entries[start:start + MOVE_BATCH]
            items = []
            ids = []
            for e in batch:
                loaded = await src.load(e.id)
                if loaded is None:  # corrupt: quarantined in the old shard, where it stays
                    continue
                items.append(loaded)
                ids.append(e.id)
            if not items:
                continue
            await dest.add(items, cache=False)  # durable in the new shard first ...
            for mid in ids:
                await src.remove(mid)  # ... then gone from the old one
            moved += len(items)
        quarantined = src.stats["quarantined"]
    finally:
        await src.close()
    if quarantined == 0 and not _has_quarantine(src_dir):
        for name in _SPOOL_FILES:
            try:
                os.unlink(os.path.join(src_dir, name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(src_dir)
        except OSError:  # something else lives there: leave the directory
            pass
    return moved


def _has_quarantine(src_dir: str) -> bool:
    """True if the shard keeps quarantined entries (they are evidence: never deleted silently, P6)."""
    import sqlite3

    try:
        conn = sqlite3.connect(os.path.join(src_dir, "spool.db"))
        try:
            return conn.execute("SELECT count(*) FROM quarantine").fetchone()[0] > 0
        finally:
            conn.close()
    except sqlite3.Error:
        return True
