"""Relay-wide XFER de-duplication with Workers > 1: one claim per (origin node, origin id) over all shards.

Why (docs/reliability.md case 36). With `Workers = N > 1` each worker owns a spool shard (its own
SQLite file, fastrelay.shards) and the HTTP_Listener is shared (SO_REUSEPORT), so a sender's resend
after a lost 200 may reach another worker than the first attempt. A shard's `xfer_seen` table
(fastrelay.spool, `add_once`) only knows the keys stored in that shard: the resend would be stored
a second time, a duplicate delivery. This module adds the one thing the shards cannot give: a
table every worker sees, `Spool_Base/xfer_claims.db` (SQLite, WAL mode), used only when N > 1.
N = 1 never opens it; its shard's own `xfer_seen` is the whole de-duplication, as before.

The table: claims(node, origin, shard, msgid, at). msgid NULL is a *pending* claim: worker `shard`
is storing that key right now. msgid set is *done*: the key was stored, as msgid.

One transfer (`store_once`):

1. Requests for the same key inside this worker wait for each other (one at a time per key), so
   a worker never races itself: its own pending claim always belongs to the one request running.
2. Claim, in one BEGIN IMMEDIATE transaction on the claims db:
   - done: answer as a duplicate with that msgid (what a shard's xfer_seen answers today);
   - pending, held by another worker: TransferInProgress, answered 503 with Retry-After (the sender
     tries again; by then it is done). Not a wait here: the holder may take seconds (a slow disk) or
     be dead (its successor settles it, see 5), and an HTTP request should not hang on that;
   - pending, older than CLAIM_STALE_AFTER, held by a worker of this run: stale (its holder died
     and its successor has not started, or marking it done failed). The holder's shard is the truth:
     if its xfer_seen has the key, the claim becomes done with that msgid (a duplicate answer);
     if not, this worker takes the claim over. Held by a shard no worker of this run owns (the
     previous run had more workers): never stale, its adopter settles it at its start (see 5);
   - pending, held by this worker: left by a claim of this worker whose done or release failed; the
     shard's add_once (same shard) decides, so go on;
   - absent: insert a pending claim held by this worker.
3. Store in this worker's own shard with `add_once`, exactly as N = 1 does: the message and the
   shard's xfer_seen row are one commit, so the shard stays the durable record of the key.
4. Mark the claim done with the msgid, and only then answer (the 200 itself follows the shard's
   commit, P1). If the shard refused (SpoolError: nothing was committed), delete the claim so a
   resend can go anywhere. Any other failure (a bug, a cancellation at shutdown) leaves the claim
   pending: whether the shard committed is unknown, and 5 settles it from the shard.
   The store runs in a task shielded from the request's cancellation, so a client that goes away
   cannot leave a claim half handled.
5. Crash safety. A worker killed between 2 and 4 leaves its pending claims. When a worker starts
   (a successor after a crash, or the next run), before it serves, it settles the pending claims
   of its own shard and of the shards it adopts (J >= N with J mod N = K): a key in its shard's
   xfer_seen becomes done with that msgid, the others are deleted (never stored: the dead worker
   never answered 200 for them).

Why the claims db may use synchronous=NORMAL (no fsync per commit) and never needs a backup: it is
a lock and an index over the shards' xfer_seen tables, which stay the durable truth (spool_fsync).
At each start a worker imports into it the xfer_seen rows of every shard of this run and of the
shards it adopts (INSERT OR IGNORE: never over a pending claim), from a little before the last
import of that shard (a marker per shard's node id; IMPORT_CLOCK_SLACK covers a clock stepped
back). That covers three cases: keys stored while the relay ran with Workers = 1 (no claims were
kept), commits a power loss took from the claims db (SQLite's WAL keeps a prefix of the
transactions: a surviving marker implies every claim committed before it survived), and a deleted
claims db (no marker: a full import). Every worker imports every shard itself, so none has to wait
for its siblings, and a resend reaching a worker that started first is still recognised.

Shard adoption (a smaller N, fastrelay.shards): the adopter imports the adopted shard's keys before
it moves the messages, and shards.adopt copies the xfer_seen rows into the adopter's shard, so a
later run with Workers = 1 (which reads no claims) still knows them.

Rows older than XFER_KEY_TTL (fastrelay.spool, as for xfer_seen) are pruned at each start and then
every CLAIM_PRUNE_INTERVAL.

Threads: one thread owns the claims connection and runs the queued operations in batches, one
transaction each (group commit, as the spool's writer), so SQLite never blocks the event loop: a
transaction may wait up to CLAIM_BUSY_TIMEOUT for another worker's lock.

What is left (a duplicate, never a loss): a worker stalled in its shard commit for longer than
CLAIM_STALE_AFTER, whose claim another worker then takes over; and the shard's own window of an
fsync that fails after the commit frame was written (fastrelay.spool), when the claim is deleted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import pathlib
import queue
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastrelay import shards as _shards
from fastrelay.crash import crashpoint
from fastrelay.spool import XFER_KEY_TTL, SpoolError, _batches, rollback

log = logging.getLogger("fastrelay.xfer.claims")

__all__ = ["CLAIMS_FILE", "ClaimError", "ClaimTable", "TransferInProgress"]

# The claims database, in Spool_Base (beside shard 0's spool.db).
CLAIMS_FILE = "xfer_claims.db"
# A pending claim older than this is stale (see the module docstring, 2). Far longer than a shard
# commit takes even on a slow disk (the spool waits at most 30 s for its own lock), so a live
# holder is not overtaken; short enough that a claim left pending does not refuse its key for long.
CLAIM_STALE_AFTER = 600.0
# The Retry-After (seconds) of the 503 for a transfer another worker is storing now: by then it is
# done, and the resend gets the duplicate answer.
IN_PROGRESS_RETRY_AFTER = 10
# How long one claims transaction waits for another worker's (SQLite busy_timeout); then the
# transfer gets a 503 and is sent again. Claims transactions last microseconds each.
CLAIM_BUSY_TIMEOUT = 10.0
# Operations run in one claims transaction at most (group commit).
CLAIM_BATCH = 512
# Claims older than XFER_KEY_TTL are deleted at every start and then this often.
CLAIM_PRUNE_INTERVAL = 3600.0
# A shard's keys are imported again from this long before its last import: a clock stepped back
# must not hide rows written after that import.
IMPORT_CLOCK_SLACK = 600.0
# At stop, how long stores in flight get to finish (their shard commit and claim update).
CLOSE_TIMEOUT = 10.0

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS claims(node TEXT NOT NULL, origin TEXT NOT NULL, shard INTEGER NOT NULL,"
    " msgid TEXT, at REAL NOT NULL, PRIMARY KEY(node, origin)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS claims_at ON claims(at)",
    # The pending claims of a shard, for the settling at start (few rows: a partial index).
    "CREATE INDEX IF NOT EXISTS claims_pending ON claims(shard) WHERE msgid IS NULL",
    "CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v)",
)
_SEL = "SELECT shard, msgid, at FROM claims WHERE node = ? AND origin = ?"
_INS = "INSERT INTO claims(node, origin, shard, msgid, at) VALUES (?, ?, ?, NULL, ?)"
_TAKE = "UPDATE claims SET shard = ?, at = ? WHERE node = ? AND origin = ?"
_DONE = "UPDATE claims SET msgid = ? WHERE node = ? AND origin = ? AND shard = ? AND msgid IS NULL"
_DONE_INS = "INSERT OR IGNORE INTO claims(node, origin, shard, msgid, at) VALUES (?, ?, ?, ?, ?)"
_SET_MSGID = "UPDATE claims SET msgid = ? WHERE node = ? AND origin = ?"
_RELEASE = "DELETE FROM claims WHERE node = ? AND origin = ? AND shard = ? AND msgid IS NULL"
_PRUNE = "DELETE FROM claims WHERE at < ?"
# A shard's spool.db attached read-only as `s` (fastrelay.spool's xfer_seen and meta tables).
_SHARD_KEY = "SELECT msgid FROM s.xfer_seen WHERE node = ? AND origin = ?"
_IMPORT = (
    "INSERT OR IGNORE INTO claims(node, origin, shard, msgid, at)"
    " SELECT node, origin, ?, msgid, at FROM s.xfer_seen WHERE at >= ? AND msgid IS NOT NULL"
)
# The pending claims this worker settles: its own shard's, and those of the shards it adopts.
_MINE = "msgid IS NULL AND (shard = :k OR (shard >= :n AND shard % :n = :k))"
_SETTLE_DONE = (
    "UPDATE claims SET shard = :k, msgid = (SELECT x.msgid FROM s.xfer_seen x WHERE x.node = claims.node"
    " AND x.origin = claims.origin) WHERE " + _MINE + " AND EXISTS (SELECT 1 FROM s.xfer_seen x"
    " WHERE x.node = claims.node AND x.origin = claims.origin AND x.msgid IS NOT NULL)"
)
_SETTLE_DELETE = "DELETE FROM claims WHERE " + _MINE

_CLAIM, _MARK, _FREE, _CALL = range(4)


class ClaimError(SpoolError):
    """The claims database could not be read or written: the transfer is not taken (a 503)."""


class TransferInProgress(SpoolError):
    """Another worker holds a pending claim on this key: the sender should try again shortly."""

    def __init__(self, key: tuple[str, str], holder: int, retry_after: int = IN_PROGRESS_RETRY_AFTER):
        super().__init__(f"transfer {key[0]}/{key[1]} is being stored by worker {holder}")
        self.key = key
        self.holder = holder
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class _Stale:
    holder: int
    at: float


def _uri(path: str, readonly: bool = False) -> str:
    # as_uri percent-encodes the path (a space or '?' in Spool_Base must not end the file name).
    uri = pathlib.Path(os.path.abspath(path)).as_uri()
    return uri + "?mode=ro" if readonly else uri


class ClaimTable:
    """Worker `shard` of `shards`'s view of the relay-wide claims (see the module docstring)."""

    def __init__(self, spool_base: str, shard: int, shards: int, *, stale_after: float = CLAIM_STALE_AFTER,
                 busy_timeout: float = CLAIM_BUSY_TIMEOUT):
        self.spool_base = spool_base
        self.path = os.path.join(spool_base, CLAIMS_FILE)
        self.shard = shard
        self.shards = shards
        self.stale_after = stale_after
        self.busy_timeout = busy_timeout
        self.stats: dict[str, int] = {
            "claimed": 0,  # claims made (then stored, or released)
            "duplicates": 0,  # keys found done
            "in_progress": 0,  # refused: another worker's pending claim
            "taken_over": 0,  # stale claims taken over (the key was not in the holder's shard)
            "stale_found": 0,  # stale claims whose key was in the holder's shard: made done
            "released": 0,  # claims deleted after the shard refused the store
            "imported": 0,  # keys imported from shards' xfer_seen at start
            "settled_done": 0,  # pending claims found stored at start
            "settled_deleted": 0,  # pending claims found not stored at start
        }
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._done: concurrent.futures.Future = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self._closed = False
        self._prune_at = 0.0
        self._busy: dict[tuple[str, str], asyncio.Future] = {}  # key -> the request storing it here
        self._tasks: set[asyncio.Task] = set()

    # --- open / close ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Open (or create) the claims db in its own thread; ClaimError if it cannot be used."""
        if self._open or self._closed:
            raise ClaimError("claims already opened")
        self._loop = asyncio.get_running_loop()
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="xfer-claims", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(ready)
        self._open = True

    async def close(self) -> None:
        """Let the stores in flight finish (up to CLOSE_TIMEOUT), then stop the thread."""
        if not self._open or self._closed:
            return
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_TIMEOUT)
        self._closed = True
        self._q.put(None)
        await asyncio.wrap_future(self._done)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(_uri(self.path), uri=True, isolation_level=None, timeout=self.busy_timeout)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            # Workers open it at once on the first run: switching to WAL needs a moment alone.
            deadline = time.monotonic() + self.busy_timeout
            while True:
                try:
                    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            if mode.lower() != "wal":
                raise ClaimError(f"{self.path}: cannot use WAL mode (got {mode})")
            # No fsync per commit: the shards are the durable record (see the module docstring).
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA:
                conn.execute(stmt)
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

    # --- the claims thread ----------------------------------------------------------------------
    def _main(self, ready: concurrent.futures.Future) -> None:
        try:
            try:
                conn = self._connect()
            except (sqlite3.Error, OSError, ClaimError) as e:
                ready.set_exception(e if isinstance(e, ClaimError) else ClaimError(f"{self.path}: {e}"))
                return
            ready.set_result(None)
            try:
                for batch in _batches(self._q, CLAIM_BATCH):
                    self._run(conn, batch)
            finally:
                conn.close()
        finally:
            self._done.set_result(None)

    def _run(self, conn: sqlite3.Connection, batch: list) -> None:
        results: list = []
        i, n = 0, len(batch)
        while i < n:
            if batch[i][0] == _CALL:  # a start-up step, alone (it attaches a shard)
                fn = batch[i][2]
                try:
                    results.append(fn(conn))
                except Exception as e:  # any failure must reach its caller, never stop the thread
                    rollback(conn)
                    results.append(e if isinstance(e, ClaimError) else ClaimError(f"{self.path}: {e}"))
                i += 1
                continue
            j = i
            while j < n and batch[j][0] != _CALL:
                j += 1
            results += self._ops(conn, batch[i:j])
            i = j
        try:
            self._loop.call_soon_threadsafe(_resolve, batch, results)  # type: ignore[union-attr]
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    def _ops(self, conn: sqlite3.Connection, ops: list) -> list:
        """Claims, dones and releases in one transaction; alone each if that fails."""
        try:
            out = self._txn(conn, ops)
        except Exception:
            rollback(conn)
            out = []
            for op in ops:  # one that cannot be written must not fail the others
                try:
                    out += self._txn(conn, [op])
                except Exception as e:
                    rollback(conn)
                    out.append(ClaimError(f"{self.path}: {e}"))
        for k, res in enumerate(out):
            if isinstance(res, _Stale):
                try:
                    out[k] = self._takeover(conn, ops[k][2], res)
                except Exception as e:
                    rollback(conn)
                    out[k] = ClaimError(f"{self.path}: {e}")
        return out

    def _txn(self, conn: sqlite3.Connection, ops: list) -> list:
        execute = conn.execute
        execute("BEGIN IMMEDIATE")
        now = time.time()
        out: list = []
        for kind, _fut, key, arg in ops:
            if kind == _CLAIM:
                out.append(self._claim(conn, key, now))
            elif kind == _MARK:
                if execute(_DONE, (arg, key[0], key[1], self.shard)).rowcount == 0:
                    # Not pending under this worker any more: gone (made again, done), found in this
                    # shard by a worker that thought it stale (done already), or taken over by one
                    # (it stores a copy: nothing better is left to do).
                    row = execute(_SEL, key).fetchone()
                    if row is None:
                        execute(_DONE_INS, (key[0], key[1], self.shard, arg, now))
                    elif row[1] != arg:
                        log.warning("XFER claim %s/%s was taken over by worker %d while this one stored it as "
                                    "%s: a duplicate delivery is possible", key[0], key[1], row[0], arg)
                out.append(None)
            else:  # _FREE
                execute(_RELEASE, (key[0], key[1], self.shard))
                out.append(None)
        prune = now >= self._prune_at
        if prune:
            execute(_PRUNE, (now - XFER_KEY_TTL,))
        execute("COMMIT")
        if prune:
            self._prune_at = now + CLAIM_PRUNE_INTERVAL
        return out

    def _claim(self, conn: sqlite3.Connection, key: tuple[str, str], now: float, stale_ok: bool = True) -> Any:
        """None: claimed (store it, then done/release). str: stored before as that msgid.
        TransferInProgress: another worker's pending claim. _Stale: see _takeover."""
        row = conn.execute(_SEL, key).fetchone()
        if row is None:
            conn.execute(_INS, (key[0], key[1], self.shard, now))
            return None
        holder, msgid, at = row
        if msgid is not None:
            return msgid
        if holder == self.shard:
            conn.execute(_TAKE, (self.shard, now, key[0], key[1]))
            return None
        if stale_ok and holder < self.shards and now - at >= self.stale_after:
            return _Stale(holder, at)
        return TransferInProgress(key, holder)

    def _takeover(self, conn: sqlite3.Connection, key: tuple[str, str], stale: _Stale) -> Any:
        """A stale pending claim: its holder's shard says whether the key was stored."""
        found = self._shard_lookup(conn, stale.holder, key)
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = time.time()
            row = conn.execute(_SEL, key).fetchone()
            if row is None or tuple(row) != (stale.holder, None, stale.at):
                res = self._claim(conn, key, now, stale_ok=False)  # it changed meanwhile
            elif found is not None:
                conn.execute(_SET_MSGID, (found, key[0], key[1]))
                self.stats["stale_found"] += 1
                log.warning("XFER claim %s/%s of worker %d was stale (%.0f s); its shard has it stored as %s",
                            key[0], key[1], stale.holder, now - stale.at, found)
                res = found
            else:
                conn.execute(_TAKE, (self.shard, now, key[0], key[1]))
                self.stats["taken_over"] += 1
                log.warning("XFER claim %s/%s of worker %d was stale (%.0f s) and is not in its shard: taken over",
                            key[0], key[1], stale.holder, now - stale.at)
                res = None
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
        return res

    def _attach(self, conn: sqlite3.Connection, directory: str) -> bool:
        """Attach a shard's spool.db read-only as `s`; False if it has none. Read-only never
        creates a file (an empty spool.db would be taken for damage by its owner)."""
        db = os.path.join(directory, "spool.db")
        if not os.path.exists(db):
            return False
        conn.execute("ATTACH ? AS s", (_uri(db, readonly=True),))
        return True

    @staticmethod
    def _detach(conn: sqlite3.Connection) -> None:
        try:
            conn.execute("DETACH s")
        except sqlite3.Error:
            pass

    def _shard_lookup(self, conn: sqlite3.Connection, holder: int, key: tuple[str, str]) -> str | None:
        directory = _shards.shard_dir(self.spool_base, holder)
        try:
            if not self._attach(conn, directory):
                return None
        except sqlite3.Error as e:
            log.warning("XFER claims: cannot read shard %d (%s): %s", holder, directory, e)
            return None
        try:
            row = conn.execute(_SHARD_KEY, key).fetchone()
            return None if row is None else str(row[0])
        except sqlite3.Error as e:
            # Unreadable: the claim is taken over (a possible duplicate) rather than refused for
            # ever, which would end in the sender giving the message up.
            log.warning("XFER claims: cannot read shard %d (%s): %s", holder, directory, e)
            return None
        finally:
            self._detach(conn)

    def _import(self, conn: sqlite3.Connection, index: int, directory: str) -> int:
        """Import a shard's xfer_seen rows written since its last import (see the module docstring)."""
        if not self._attach(conn, directory):
            return 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT v FROM s.meta WHERE k = 'node_id'").fetchone()
                if row is None:
                    conn.execute("COMMIT")
                    return 0
                mark = f"imported:{row[0]}"
                now = time.time()
                prev = conn.execute("SELECT v FROM meta WHERE k = ?", (mark,)).fetchone()
                since = now - XFER_KEY_TTL
                if prev is not None:
                    since = max(since, float(prev[0]) - IMPORT_CLOCK_SLACK)
                n = conn.execute(_IMPORT, (index, since)).rowcount
                conn.execute("INSERT INTO meta(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = max(v, excluded.v)",
                             (mark, now))
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                raise
        finally:
            self._detach(conn)
        self.stats["imported"] += n
        return n

    def _settle(self, conn: sqlite3.Connection, directory: str) -> tuple[int, int]:
        """At start: this worker's pending claims (its shard's, its adopted shards') become done
        if its shard has the key, and are deleted otherwise."""
        attached = self._attach(conn, directory)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                args = {"k": self.shard, "n": self.shards}
                done = conn.execute(_SETTLE_DONE, args).rowcount if attached else 0
                deleted = conn.execute(_SETTLE_DELETE, args).rowcount
                now = time.time()
                conn.execute(_PRUNE, (now - XFER_KEY_TTL,))
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                raise
        finally:
            if attached:
                self._detach(conn)
        self._prune_at = now + CLAIM_PRUNE_INTERVAL
        self.stats["settled_done"] += done
        self.stats["settled_deleted"] += deleted
        return done, deleted


    # --- event-loop side ------------------------------------------------------------------------
    def _submit(self, kind: int, key: Any, arg: Any = None) -> asyncio.Future:
        if not self._open or self._closed:
            raise ClaimError("xfer claims are closed" if self._closed else "xfer claims are not open")
        fut = self._loop.create_future()  # type: ignore[union-attr]
        self._q.put((kind, fut, key, arg))
        return fut

    async def import_shards(self, dirs: list[tuple[int, str]]) -> int:
        """At start, before serving: import the keys of these shards (index, directory). A shard
        other than this worker's own that cannot be read is logged and skipped."""
        total = 0
        for index, directory in dirs:
            try:
                total += await self._call(lambda conn, i=index, d=directory: self._import(conn, i, d))
            except ClaimError as e:
                if index == self.shard:
                    raise
                log.warning("XFER claims: cannot import the keys of shard %d (%s): %s", index, directory, e)
        return total

    async def settle(self, directory: str) -> tuple[int, int]:
        """At start, after adopting shards and before serving: settle this worker's pending
        claims against its shard in `directory`; returns (made done, deleted)."""
        return await self._call(lambda conn: self._settle(conn, directory))

    def _call(self, fn: Callable[[sqlite3.Connection], Any]) -> asyncio.Future:
        if not self._open or self._closed:
            raise ClaimError("xfer claims are closed" if self._closed else "xfer claims are not open")
        fut = self._loop.create_future()  # type: ignore[union-attr]
        self._q.put((_CALL, fut, fn, None))
        return fut

    async def claim(self, key: tuple[str, str]) -> str | None:
        """None: this worker now holds the key (store it, then done() or release()); a msgid: the
        key was stored before. TransferInProgress: another worker is storing it now."""
        res = await self._submit(_CLAIM, key)
        if res is None:
            self.stats["claimed"] += 1
        else:
            self.stats["duplicates"] += 1
        return res

    async def done(self, key: tuple[str, str], msgid: str) -> None:
        """The key is stored as msgid."""
        await self._submit(_MARK, key, msgid)

    async def release(self, key: tuple[str, str]) -> None:
        """The store failed (nothing committed): free the key for any worker."""
        await self._submit(_FREE, key)
        self.stats["released"] += 1

    async def store_once(self, key: tuple[str, str],
                         store: Callable[[], Awaitable[tuple[str, bool]]]) -> tuple[str, bool]:
        """Run `store` (this worker's shard's add_once and what follows it) at most once per key
        over the whole relay; returns (msgid, duplicate). See the module docstring, 1-4."""
        task = asyncio.ensure_future(self._store_once(key, store))
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a request that went away leaves no "never retrieved" warning

    async def _store_once(self, key: tuple[str, str],
                          store: Callable[[], Awaitable[tuple[str, bool]]]) -> tuple[str, bool]:
        while (prev := self._busy.get(key)) is not None:
            await asyncio.wait([prev])  # the same key, already being handled in this worker
        mine = self._loop.create_future()  # type: ignore[union-attr]
        self._busy[key] = mine
        try:
            try:
                dup = await self.claim(key)
            except TransferInProgress:
                self.stats["in_progress"] += 1
                raise
            if dup is not None:
                return dup, True
            crashpoint("xfer_after_claim")
            try:
                msgid, duplicate = await store()
            except SpoolError:
                try:
                    await self.release(key)
                except ClaimError as e:  # left pending under us: settled later (see _claim, _takeover)
                    log.warning("XFER claim %s/%s could not be released: %s", key[0], key[1], e)
                raise
            crashpoint("xfer_before_done")
            try:
                await self.done(key, msgid)
            except ClaimError as e:
                # Stored (the shard has the key): the 200 is right. The claim stays pending under
                # this worker: its resends here are decided by the shard, elsewhere refused until
                # the claim is stale and then found in this shard.
                log.warning("XFER claim %s/%s could not be marked done (%s): %s", key[0], key[1], msgid, e)
            return msgid, duplicate
        finally:
            del self._busy[key]
            mine.set_result(None)


def _resolve(batch: list, results: list) -> None:
    for op, res in zip(batch, results, strict=True):
        fut = op[1]
        if fut.done():
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)
