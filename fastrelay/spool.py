"""The spool: make accepted mail durable before the 250, record per-recipient progress, survive crashes."""

# Durability design (docs/reliability.md part (a), P1-P7)
# ==================================================
#
# Storage is one SQLite database, <directory>/spool.db, in WAL mode. SQLite gives the "one atomic
# commit step after fsync" that Postfix gets from its END record and Exim from rename: a transaction
# is appended to the write-ahead log and becomes visible (to this process and to any process after a
# crash) only once its commit frame is written; a WAL tail without a commit frame is ignored when
# the database is next opened. So a kill -9 at any instant leaves either the whole batch or none of
# it (P2, P5: unacked data leaves nothing behind).
#
# Tables: msg (the envelope as JSON plus the few index columns the queue keeps in memory) and body
# (the content with its length and zlib.crc32) are separate, so recording recipient progress or a
# retry rewrites a small envelope row, never the body. quarantine keeps whatever is readable of a
# torn or corrupt entry with a reason and a time (P6: never delivered truncated, never silently
# deleted). meta holds the node_id made when the spool was created and the id high-water mark.
#
# Group commit (P1 + docs/performance.md: one fsync per message caps near 2,000/s, a group of 100 reaches
# ~154,000 records/s): one writer thread owns the write connection. It blocks for the first queued
# operation, takes everything else waiting (up to max_batch), runs it all in ONE transaction
# (BEGIN IMMEDIATE ... COMMIT, multi-row statements for runs of the same kind), and then wakes every waiting
# asyncio future with ONE loop.call_soon_threadsafe. The futures complete only after COMMIT returned,
# i.e. after the WAL was fsync'd (synchronous=FULL): that is the "commit before ack" of P1. While the
# writer waits for its fsync (the GIL is released), the event loop keeps queueing, so batches grow
# with the load by themselves. If a batch fails (SQLITE_FULL, an I/O error, ...), it is rolled back
# and each operation is retried in its own transaction, so one bad operation cannot fail the others;
# the ones that still fail get SpoolError (SpoolFull for a full disk): "not durable", the SMTP server
# answers 451 4.3.0 and the client keeps its copy. A reader thread with its own connection batches
# loads the same way. The event loop never touches the disk, except for recover() at start and the
# statvfs of space_ok(), cached for a second.
#
# Two levels of durability (P7), stated honestly:
#   * fsync=True (the default; synchronous=FULL): every commit fsyncs the WAL before any caller is
#     told. Safe against a process crash (kill -9, OOM) AND against power loss, provided the disk
#     honours flushes. The directory is fsync'd after spool.db is created; SQLite fsyncs it when it
#     creates the WAL file.
#   * fsync=False (opt-in; synchronous=NORMAL): commits are written to the WAL but not fsync'd (only
#     checkpoints are). Still safe against a process crash, since the data is in the kernel's page
#     cache, but a power loss or kernel crash can lose recently acknowledged mail. Like KumoMTA's
#     flush=false: only for those who accept that.
#
# Duplicate windows (P2): a crash after COMMIT and before the caller is told (crash point
# "spool_after_commit") leaves a message that the client was never acknowledged for; it will be
# delivered and the client may send it again. Cancelling a task awaiting add() does not undo the add.
#
# Ids are allocated on the event-loop side, so add() knows them before the commit (and can derive
# msgid from them). Deviation from "max(id)+1 at open": a high-water mark in meta is advanced in the
# same transaction as each add, so an id (and the msgid derived from it) is never reused after the
# newest message was removed or quarantined and the spool restarted: logs, DSNs and XFER dedupe
# (origin node, origin id: docs/reliability.md case 36) can rely on it.
#
# msgid (when the caller left it empty) is "<id in hex>.<node_id>", unique across nodes too.
#
# spool.db is made whole under another name and renamed into place (_create), so an empty spool.db,
# or a WAL without its spool.db, is damage: open() refuses both with a message instead of starting a
# new, empty spool with a new node id over a queue. Rows whose index columns or body have the wrong
# type are quarantined with the reason at recovery, like torn entries (P6).
#
# One process at a time: open() takes an exclusive flock on <directory>/spool.lock, so a second
# relay on the same directory fails at start instead of allocating the same ids.
#
# Checkpoints (copying the WAL into spool.db) run in a third thread with its own connection, not in
# the writer: SQLite's automatic checkpoint would run inside a COMMIT and make that batch's callers
# wait for it. The writer only steps in when the checkpointer falls too far behind (see below), to
# start the WAL over (_restart: SQLite restarts it only at a write that began with every frame
# already copied, which a checkpointer racing a busy writer never achieves), and when it has been
# idle for a second (_idle: the WAL is copied whole and truncated to 0 bytes).
#
# A full disk (docs/reliability.md recipe step 7, case 17) must not stop the spool: progress updates (P3)
# and removals must still be written, or delivered mail would be sent again and nothing could free
# space. With SQLite in WAL mode that needs care: spool.db never shrinks, and a WAL whose new pages
# cannot be copied into spool.db (which must grow for them) can never restart, so then even a
# removal could not be written. Hence spool.reserve, a file of min_free_bytes/2 (256 KiB..64 MiB)
# made at open: on the first SQLITE_FULL (from a commit or from the checkpointer) it is deleted, the
# checkpoint completes into the space it frees, the WAL restarts and is then written over in place.
# New mail is refused with SpoolFull (adds only; updates and removals go on) until the reserve can
# be made again or spool.db has enough free pages; meanwhile the WAL is restarted after every batch.
# To keep the reserve sufficient, the writer checkpoints itself when the WAL holds more not yet
# checkpointed data than half the reserve. space_ok() counts free pages inside spool.db as free
# space, since new mail fills them before the file grows.
#
# An fsync that fails after SQLite wrote the commit frame is reported as SpoolError, though the
# data may survive in the page cache and show up after a restart: a duplicate (the client got 451
# and sends again), never a loss.
#
# Latency note: the writer needs the GIL between SQLite calls (a few times per batch). When the
# event loop keeps the GIL busy, each hand-over can take up to sys.getswitchinterval() (5 ms); batches
# then grow by themselves, so throughput holds, but an ack may wait some milliseconds more.

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import json
import logging
import math
import os
import queue
import secrets
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastrelay import cpu, limits
from fastrelay.crash import crashpoint
from fastrelay.message import Envelope

log = logging.getLogger("fastrelay.spool")

__all__ = ["IndexEntry", "Spool", "SpoolError", "SpoolFull"]


class SpoolError(Exception):
    """The change is not durable (I/O error, disk full, spool closed): the caller must not ack it."""


class SpoolFull(SpoolError):
    """The disk (or the database's page limit) is full."""


@dataclass(slots=True)
class IndexEntry:
    """The small record the queue keeps in memory per message."""

    id: int
    domain: str
    binding: str
    next_attempt: float
    attempts: int
    first_queued: float
    size: int


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS msg(id INTEGER PRIMARY KEY, domain TEXT, binding TEXT,"
    " next_attempt REAL, attempts INTEGER, first_queued REAL, size INTEGER, env TEXT)",
    "CREATE TABLE IF NOT EXISTS body(id INTEGER PRIMARY KEY, data BLOB, len INTEGER, crc INTEGER)",
    "CREATE TABLE IF NOT EXISTS quarantine(qid INTEGER PRIMARY KEY, id INTEGER, reason TEXT, at REAL,"
    " domain TEXT, env TEXT, data BLOB, len INTEGER, crc INTEGER)",
    "CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v)",
    # XFER idempotency (docs/reliability.md case 36): a transfer already taken, by (origin node, origin id).
    "CREATE TABLE IF NOT EXISTS xfer_seen(node TEXT, origin TEXT, msgid TEXT, at REAL, PRIMARY KEY(node, origin))",
)
_SEL_XFER = "SELECT msgid FROM xfer_seen WHERE node = ? AND origin = ?"
_INS_XFER = "INSERT INTO xfer_seen(node, origin, msgid, at) VALUES (?, ?, ?, ?)"
_PRUNE_XFER = "DELETE FROM xfer_seen WHERE at < ?"
# Keys copied from a shard being adopted (fastrelay.shards): a key this shard has already keeps its own.
_COPY_XFER = "INSERT OR IGNORE INTO xfer_seen(node, origin, msgid, at) VALUES (?, ?, ?, ?)"
_PAGE_XFER = "SELECT rowid, node, origin, msgid, at FROM xfer_seen WHERE rowid > ? ORDER BY rowid LIMIT ?"
# How long a transfer's key is remembered: far longer than any sender retries a lost 200.
XFER_KEY_TTL = 14 * 86400.0
# Bodies of just-committed messages kept in memory for their first load (the delivery that
# usually follows at once); bounded, so memory stays small however much is queued.
RECENT_CACHE_BYTES = 32 * 1024 * 1024

_INS_MSG = (
    "INSERT INTO msg(id, domain, binding, next_attempt, attempts, first_queued, size, env)"
    " VALUES (?,?,?,?,?,?,?,?)"
)
_INS_BODY = "INSERT INTO body(id, data, len, crc) VALUES (?,?,?,?)"
_UPD_HWM = "UPDATE meta SET v = max(v, ?) WHERE k = 'next_id'"
_UPD_ENV = "UPDATE msg SET domain=?, binding=?, next_attempt=?, attempts=?, env=? WHERE id=?"
_DEL_MSG = "DELETE FROM msg WHERE id=?"
_DEL_BODY = "DELETE FROM body WHERE id=?"

# Runs of inserts and removals go to SQLite as multi-row statements of up to _CHUNK rows: one
# sqlite3_step each instead of one per row. The writer drops the GIL for every step and must get it
# back afterwards, which can take up to the switch interval (5 ms) when the event loop is busy, so
# fewer steps per batch is lower ack latency under load (see the latency note above).
_CHUNK = 64
_MULTI: dict[tuple[str, int], str] = {}


def _multi_sql(kind: str, n: int) -> str:
    sql = _MULTI.get((kind, n))
    if sql is None:
        if kind == "msg":
            sql = _INS_MSG.replace("(?,?,?,?,?,?,?,?)", ",".join(["(?,?,?,?,?,?,?,?)"] * n))
        elif kind == "body":
            sql = _INS_BODY.replace("(?,?,?,?)", ",".join(["(?,?,?,?)"] * n))
        else:  # "del_msg" / "del_body"
            sql = f"DELETE FROM {kind[4:]} WHERE id IN ({','.join(['?'] * n)})"
        _MULTI[(kind, n)] = sql
    return sql


def _multi(execute: Any, kind: str, rows: list) -> None:
    for k in range(0, len(rows), _CHUNK):
        chunk = rows[k : k + _CHUNK]
        execute(_multi_sql(kind, len(chunk)), [v for row in chunk for v in row])
# Keep what is readable of an entry (the envelope row, the body row, or both) with a reason (P6).
_INS_QUAR = (
    "INSERT INTO quarantine(id, reason, at, domain, env, data, len, crc)"
    " SELECT k.id, ?, ?, m.domain, m.env, b.data, b.len, b.crc FROM (SELECT ? AS id) k"
    " LEFT JOIN msg m ON m.id = k.id LEFT JOIN body b ON b.id = k.id"
)
_SEL_LOAD = (
    "SELECT CAST(m.env AS BLOB), b.data, b.len, b.crc, b.id FROM msg m LEFT JOIN body b ON b.id = m.id"
    " WHERE m.id = ?"
)

# Operation kinds for the writer thread.
_ADD, _UPDATE, _REMOVE, _QUARANTINE, _XFER_KEYS = range(5)

# Envelope JSON: compact, ASCII-escaped (an address decoded with surrogateescape still round-trips
# and still encodes as UTF-8 for SQLite), no circular check (envelopes are trees).
_dumps = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_loads = json.loads
_crc32 = zlib.crc32

_SQLITE_FULL = 13

# The WAL file is truncated back to this size when it restarts.
_WAL_LIMIT = 16 * 1024 * 1024
# The writer starts the WAL over once this much was written since the last time (see _restart):
# the WAL file stays near this size under any load. Smaller costs more tail checkpoints.
_WAL_RESTART_AFTER = _WAL_LIMIT
# With nothing to write for this long, the WAL is checkpointed whole and truncated (see _idle).
_IDLE_CHECKPOINT = 1.0
_PAGE = 4096


def _spool_error(e: BaseException, what: str) -> SpoolError:
    """Map a database or OS error to SpoolError / SpoolFull."""
    code = getattr(e, "sqlite_errorcode", None)
    if (code is not None and code & 0xFF == _SQLITE_FULL) or (
        isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    ):
        err: SpoolError = SpoolFull(f"{what}: {e}")
    else:
        err = SpoolError(f"{what}: {e}")
    err.__cause__ = e
    return err


def rollback(conn: sqlite3.Connection) -> None:
    """End the open transaction, if any, whatever state the connection is in."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # SQLite may have rolled back by itself (SQLITE_FULL, IOERR)


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable storage of queued messages; see the module comment for the guarantees."""

    def __init__(
        self,
        directory: str,
        *,
        fsync: bool = True,
        min_free_bytes: int = 64 * 1024 * 1024,
        max_batch: int = 4096,
        commit_delay: float = 0.0,
        few_clients: int = limits.SPOOL_COMMIT_FEW_CLIENTS,
        cpu_scheduling: str = cpu.INHERIT,
    ) -> None:
        self.directory = directory
        # The writer thread's CPU policy (fastrelay.cpu: why SCHED_BATCH), set as it starts.
        self.cpu_scheduling = cpu_scheduling
        # Group commit window (spool_commit_delay): the writer waits this long after the first
        # operation of a batch for others to join it. Measured (docs in bench/RESULTS.md): with
        # 20 sessions, a fast fsync (~0.2 ms) left 2.5 operations per transaction, so each message
        # paid for its own transaction's locks, page writes, fsync and GIL hand-overs between
        # the writer and the event loop (21 futex calls a message); 1 ms cut relay CPU by ~17%.
        self.commit_delay = max(0.0, commit_delay)
        # How many clients could send a message now (inbound SMTP sessions, XFER requests in
        # flight), set by the relay; None (a spool on its own) keeps the window always. Read by
        # the writer thread at the start of each batch (see _window).
        self.sources: Callable[[], int] | None = None
        # Up to this many clients, the window ends once each has a message in the batch (each
        # wake-up of the writer costs; beyond a few, it sleeps through the window, see _window).
        self.few_clients = few_clients
        self.path = os.path.join(directory, "spool.db")
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.max_batch = max(1, max_batch)
        self.node_id: str = ""
        self.stats: dict[str, Any] = {
            "commits": 0,  # transactions committed by the writer (one fsync each with fsync on)
            "ops": 0,  # write operations committed (add/mark/reschedule/remove/quarantine)
            "items": 0,  # messages added
            "batches": 0,  # writer batches run
            "largest_batch": 0,  # most operations in one batch
            "batch_failures": 0,  # batches rolled back and retried one operation at a time
            "op_failures": 0,  # operations that failed alone (their caller got SpoolError)
            "loads": 0,
            "load_batches": 0,
            "quarantined": 0,
            "checkpoints": 0,
            "wal_restarts": 0,  # times the writer started the WAL over after the checkpointer's work
            "disk_full": 0,  # times a write failed for lack of space (the reserve was released)
            "windows_skipped": 0,  # adds committed at once: no other client could join (_window)
            "windows_cut": 0,  # windows ended early: an add from each client had joined (_window)
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_id = 1
        self._recent: dict[int, tuple[Envelope, bytes]] = {}
        self._recent_bytes = 0
        self._open = False
        self._closed = False
        self._wq_closed = False  # the writer's stop marker is queued: nothing may follow it
        self._lock_fd: int | None = None
        self._wq: queue.SimpleQueue = queue.SimpleQueue()
        self._rq: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self._writer_done: concurrent.futures.Future = concurrent.futures.Future()
        self._reader_done: concurrent.futures.Future = concurrent.futures.Future()
        self._space_at = -1.0
        self._ckpt_event = threading.Event()
        self._ckpt_stop = False
        self._ckpt_full = False  # the checkpointer hit a full disk (read by the writer)
        # One checkpoint at a time (writer or checkpointer); reentrant: the writer holds it through a
        # restart batch (_restart), whose backlog check may checkpoint again.
        self._ckpt_lock = threading.RLock()
        # The reader's batch, or a writer step that needs no reader inside a transaction (reentrant:
        # the writer may take it for a batch and again for a RESTART within it).
        self._read_lock = threading.RLock()
        self._restartable = False  # a checkpoint completed: the writer may start the WAL over (_restart)
        self._since_restart = 0  # bytes (estimated) written to the WAL since it last started over
        self._idle_mark = 0  # _written when the idle checkpoint last emptied the WAL
        self._wal_bytes = 0  # written to the WAL since the last checkpoint was asked for (estimate)
        # The reserve (see _disk_full) and the checkpoint thresholds scale with min_free_bytes, so
        # that the WAL never holds more new pages than the reserve can absorb.
        self._reserve_path = os.path.join(directory, "spool.reserve")
        self._reserve_size = min(max(min_free_bytes // 2, 256 * 1024), 64 * 1024 * 1024)
        self._ckpt_bytes = min(max(self._reserve_size // 8, 32 * 1024), 4 * 1024 * 1024)
        # Bytes (estimated) the writer has put in the WAL in all, and how many of them were surely
        # copied into spool.db by a complete checkpoint: their difference must stay within the
        # reserve, or a full disk could leave a WAL that no checkpoint can finish.
        self._written = 0
        self._ckpt_mark = 0
        self._backlog_limit = self._reserve_size // 2
        self._reserve_held = False
        self._accepting = True  # False while the disk is full: adds are refused
        self._resume_at = 0.0
        self._freed = False  # a removal was committed since the last resume attempt
        self._batch_freed = False  # a removal was committed since freelist_count was last read
        self._page_size = _PAGE
        self._db_free = 0  # bytes of free pages inside spool.db (reused before the file grows)
        self._freelist_at = 0.0
        self._free = 0  # free bytes at the last statvfs, spool.db's free pages included
        self._added = 0  # bytes of mail added since that statvfs (they count against it)
        self._failing = False  # a write failure was logged and no batch has committed since

    # ------------------------------------------------------------------ open / close

    async def open(self) -> None:
        """Create the directory and database if needed, start the writer and reader threads."""
        if self._open or self._closed:
            raise SpoolError("spool already opened")
        self._loop = asyncio.get_running_loop()
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._writer = threading.Thread(
            target=self._writer_main, args=(ready,), name="spool-writer", daemon=True
        )
        self._writer.start()
        try:
            self.node_id, self._next_id = await asyncio.wrap_future(ready)
        except SpoolError:
            await asyncio.wrap_future(self._writer_done)
            self._release_lock()
            raise
        rready: concurrent.futures.Future = concurrent.futures.Future()
        self._reader = threading.Thread(
            target=self._reader_main, args=(rready,), name="spool-reader", daemon=True
        )
        self._reader.start()
        try:
            await asyncio.wrap_future(rready)
        except SpoolError:
            self._wq.put(None)
            await asyncio.wrap_future(self._writer_done)
            await asyncio.wrap_future(self._reader_done)
            self._release_lock()
            raise
        self._open = True

    async def close(self) -> None:
        """Finish the operations already queued, stop the threads, close the connections."""
        if not self._open:
            return
        if not self._closed:
            self._closed = True
            # Stop the reader first: a load it finishes may still queue a quarantine for the writer.
            self._rq.put(None)
            await asyncio.wrap_future(self._reader_done)
            await asyncio.sleep(0)
            self._wq_closed = True
            self._wq.put(None)
        await asyncio.wrap_future(self._writer_done)
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0, cached_statements=512
        )
        conn.execute("PRAGMA busy_timeout=30000")
        # TEXT that is not UTF-8 (a damaged or hand-edited row) reads as a str with surrogates, to
        # be found bad and quarantined by its reader, instead of failing the whole query.
        conn.text_factory = _text
        return conn

    def _setup(self) -> tuple[sqlite3.Connection, str, int]:
        """Writer thread: lock, create or open the database, read node_id and the next id."""
        try:
            new_dir = not os.path.isdir(self.directory)
            os.makedirs(self.directory, exist_ok=True)
            if new_dir:
                _fsync_dir(os.path.dirname(os.path.abspath(self.directory)))
            fd = os.open(os.path.join(self.directory, "spool.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise SpoolError(f"spool {self.directory} is in use by another process") from None
            self._lock_fd = fd
            created = not os.path.exists(self.path)
            wal = self.path + "-wal"
            if created and os.path.exists(wal) and os.path.getsize(wal) > 0:
                # A WAL left without its database: the newest part of a queue. A new spool.db would
                # take it for its own WAL (or lose it): refuse, as for an empty spool.db.
                raise SpoolError(
                    f"spool {self.path} is missing but its write-ahead log {wal} ({os.path.getsize(wal)} bytes) "
                    "is there: refusing to start a new, empty spool beside it; restore spool.db, or move both "
                    "away to start a new spool")
            if created:
                self._create()
            elif os.path.getsize(self.path) == 0:
                # spool.db is only ever made whole (see _create), so an empty one is damage (a failed
                # copy, a truncation): starting over on it would lose the queue without a word.
                raise SpoolError(
                    f"spool {self.path} is empty (0 bytes): it is not a spool this relay made, and starting a "
                    "new, empty spool over it would lose the queue it held; restore it from a backup, or "
                    "move it away to start a new spool (with a new node id)")
            conn = self._connect()
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise SpoolError(f"spool {self.path}: cannot use WAL mode (got {mode})")
                conn.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
                # No checkpoints in the writer: they would run inside a COMMIT and hold up every
                # caller of that batch. A checkpointer thread runs them beside the writer instead.
                # The WAL is truncated back to 16 MiB when it restarts, so it does not keep disk space.
                conn.execute("PRAGMA wal_autocheckpoint=0")
                conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
                conn.execute("PRAGMA cache_size=-16384")
                # Debian builds SQLite with SECURE_DELETE, which zeroes every freed page through the
                # WAL: remove() of a message would write its whole body again. FAST clears deleted
                # data only where that costs no extra write.
                conn.execute("PRAGMA secure_delete=FAST")
                conn.execute("BEGIN IMMEDIATE")
                for stmt in _SCHEMA:
                    conn.execute(stmt)
                row = conn.execute("SELECT v FROM meta WHERE k='node_id'").fetchone()
                if row is None:
                    node_id = secrets.token_hex(8)
                    conn.execute("INSERT INTO meta(k, v) VALUES ('node_id', ?)", (node_id,))
                    log.error("spool %s had no node id (damaged?): made a new one, %s; XFER peers see this "
                              "node as a new one", self.path, node_id)
                else:
                    node_id = str(row[0])
                conn.execute("INSERT OR IGNORE INTO meta(k, v) VALUES ('next_id', 1)")
                hwm = conn.execute("SELECT v FROM meta WHERE k='next_id'").fetchone()[0]
                top = conn.execute(
                    "SELECT max(coalesce((SELECT max(id) FROM msg), 0), coalesce((SELECT max(id) FROM body),"
                    " 0), coalesce((SELECT max(id) FROM quarantine), 0))"
                ).fetchone()[0]
                conn.execute("COMMIT")
                self._page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                self._db_free = conn.execute("PRAGMA freelist_count").fetchone()[0] * self._page_size
            except BaseException:
                conn.close()
                raise
            self._reserve_held = self._make_reserve()
            if not self._reserve_held:
                log.warning("spool: cannot make the %d-byte reserve file %s (disk nearly full?)",
                            self._reserve_size, self._reserve_path)
            return conn, node_id, max(int(hwm), int(top) + 1)
        except SpoolError:
            self._release_lock()
            raise
        except (sqlite3.Error, OSError) as e:
            self._release_lock()
            raise SpoolError(f"spool {self.directory} is unusable: {e}") from e

    def _create(self) -> None:
        """Make a new spool.db whole under another name, then rename it into place: so spool.db is
        never seen empty or half made, and an empty spool.db is always damage (see _setup)."""
        tmp = self.path + ".new"
        for p in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):
            try:
                os.unlink(p)  # left by a crash during an earlier creation
            except FileNotFoundError:
                pass
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            # 4 KiB pages, measured best for 4 KB bodies: with 8 KiB pages only one such row fits a
            # page, doubling the bytes written to the WAL (and fsync'd).
            conn.execute("PRAGMA page_size=4096")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA:
                conn.execute(stmt)
            conn.execute("INSERT INTO meta(k, v) VALUES ('node_id', ?)", (secrets.token_hex(8),))
            conn.execute("INSERT INTO meta(k, v) VALUES ('next_id', 1)")
            conn.execute("COMMIT")
        finally:
            conn.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        # The new file's directory entry must be durable too (Exim's order, P1).
        _fsync_dir(self.directory)

    # ------------------------------------------------------------------ space

    def space_ok(self, need: int = 0) -> bool:
        """True if the spool's filesystem would still have min_free_bytes free after `need` more
        bytes. statvfs is cached for a second, but mail added since counts against the cached
        figure, and near the limit it is read again on every call: a fast client filled a small
        disk within the cached second, and MAIL got 250 with 1.1 MiB free for a 4 MiB limit (issue
        9). Far from the limit the cache saves a syscall per MAIL."""
        now = time.monotonic()
        est = self._free - self._added - need
        if now - self._space_at >= 1.0 or est < 2 * self.min_free_bytes:
            try:
                st = os.statvfs(self.directory)
                # Free pages inside spool.db count too: new messages reuse them before it grows.
                self._free = st.f_bavail * st.f_frsize + self._db_free
            except OSError:
                self._free = -1
            self._added = 0
            self._space_at = now
            est = self._free - need
        return self._accepting and self._free >= 0 and est >= self.min_free_bytes

    # ------------------------------------------------------------------ recover

    def recover(self) -> list[IndexEntry]:
        """Every message still in the spool, checked; corrupt ones are quarantined, not returned.

        Checks (P6): the envelope JSON parses into an Envelope, the body row exists and its stored
        len equals length(data) (SQLite reads a blob's length without reading the blob). The crc is
        checked by load(), before a body is handed out. Bodies without an envelope are quarantined
        too. Runs synchronously at start, on a connection of its own.
        """
        if not self._open or self._closed:
            raise SpoolError("spool is not open")
        conn = self._connect()
        try:
            out: list[IndexEntry] = []
            bad: list[tuple[int, str]] = []
            rows = conn.execute(
                "SELECT m.id, m.domain, m.binding, m.next_attempt, m.attempts, m.first_queued, m.size,"
                " CAST(m.env AS BLOB), b.id, b.len, length(b.data), typeof(b.data)"
                " FROM msg m LEFT JOIN body b ON b.id = m.id ORDER BY m.id"
            )
            for mid, domain, binding, nxt, attempts, fq, size, env, bid, blen, dlen, dtype in rows:
                why = _index_problem(domain, binding, nxt, attempts, fq, size)
                if why is not None:
                    # One bad row must not stop the relay (its values reach the scheduler's heap).
                    bad.append((mid, why))
                    continue
                if bid is None:
                    bad.append((mid, "body row missing"))
                    continue
                if dtype != "blob":
                    bad.append((mid, f"body stored as {dtype}, not as a blob"))
                    continue
                if blen != dlen or dlen is None:
                    bad.append((mid, f"body length mismatch: stored {blen}, data {dlen}"))
                    continue
                try:
                    Envelope.from_json(_loads(env))
                except Exception as e:  # any parse failure: JSON, version, missing key, wrong type
                    bad.append((mid, f"envelope does not parse: {type(e).__name__}: {e}"))
                    continue
                out.append(IndexEntry(mid, domain, binding, nxt, attempts, fq, size))
            for (bid,) in conn.execute(
                "SELECT b.id FROM body b LEFT JOIN msg m ON m.id = b.id WHERE m.id IS NULL"
            ).fetchall():
                bad.append((bid, "body without envelope"))
            if bad:
                now = time.time()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for mid, reason in bad:
                        self._quarantine_rows(conn, mid, reason, now)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                for mid, reason in bad:
                    log.error("spool: message %d quarantined at recovery: %s", mid, reason)
                self.stats["quarantined"] += len(bad)
            conn.execute(_PRUNE_XFER, (time.time() - XFER_KEY_TTL,))
            return out
        except sqlite3.Error as e:
            raise _spool_error(e, "spool recovery failed") from e
        finally:
            conn.close()

    @staticmethod
    def _quarantine_rows(conn: sqlite3.Connection, mid: int, reason: str, now: float) -> None:
        conn.execute(_INS_QUAR, (reason, now, mid))
        conn.execute(_DEL_MSG, (mid,))
        conn.execute(_DEL_BODY, (mid,))

    # ------------------------------------------------------------------ writes (event-loop side)

    def _submit(self, op: list) -> asyncio.Future:
        if not self._open or self._closed:
            raise SpoolError("spool is closed" if self._closed else "spool is not open")
        fut = self._loop.create_future()  # type: ignore[union-attr]
        op[1] = fut
        self._wq.put(op)
        return fut

    async def add(self, items: list[tuple[Envelope, bytes]], cache: bool = True) -> list[IndexEntry]:
        """Store messages in ONE transaction; return once it is durable (fsync'd commit).

        Sets env.msgid (if empty) from the id, and env.first_queued / env.received_at if they are 0.
        Raises SpoolError (SpoolFull for a full disk): then none of the items is stored.
        `cache=False`: not kept for a first load (messages moved between shards, most of them
        deferred, would only push out what was just received).
        """
        entries, _ = await self._add(items, None, cache)
        return entries

    async def add_once(self, items: list[tuple[Envelope, bytes]],
                       key: tuple[str, str]) -> tuple[list[IndexEntry], str | None]:
        """As add(), but at most once per `key` (origin node, origin id): the check and the insert
        are one transaction. Returns (entries, None) when stored now, or ([], msgid) with the msgid
        given the first time when the key was seen before (docs/reliability.md case 36)."""
        return await self._add(items, key)

    async def _add(self, items: list[tuple[Envelope, bytes]],
                   key: tuple[str, str] | None, cache: bool = True) -> tuple[list[IndexEntry], str | None]:
        if not self._open or self._closed:
            raise SpoolError("spool is closed" if self._closed else "spool is not open")
        if not items:
            return [], None
        now = time.time()
        mid = self._next_id
        self._next_id = mid + len(items)
        node = self.node_id
        msg_rows = []
        body_rows = []
        entries = []
        wal = _PAGE * len(items)
        try:
            for env, data in items:
                if not env.msgid:
                    env.msgid = f"{mid:X}.{node}"
                if not env.received_at:
                    env.received_at = now
                if not env.first_queued:
                    env.first_queued = env.received_at
                size = len(data)
                wal += size
                msg_rows.append(
                    (mid, env.domain, env.binding, env.next_attempt, env.attempts, env.first_queued, size,
                     _dumps(env.to_json()))
                )
                body_rows.append((mid, data, size, _crc32(data)))
                entries.append(
                    IndexEntry(mid, env.domain, env.binding, env.next_attempt, env.attempts, env.first_queued,
                               size)
                )
                mid += 1
        except (TypeError, ValueError) as e:
            raise SpoolError(f"cannot serialize envelope: {e}") from e
        # [kind, future, msg rows, body rows, id high-water mark, WAL bytes, XFER key, result, msgid]
        dup = await self._submit([_ADD, None, msg_rows, body_rows, mid, wal, key, None, items[0][0].msgid])
        if dup is not None:
            return [], dup
        self._added += wal  # for space_ok() until its next statvfs
        if cache:
            self._remember(entries, items)
        return entries, None

    def xfer_keys(self, after: int = 0, limit: int = 10000) -> list[tuple[int, str, str, str, float]]:
        """Up to `limit` XFER keys (rowid, origin node, origin id, msgid, time) with a rowid above
        `after`, in rowid order: a page of what add_once remembers. Reads on a connection of its
        own, synchronously (run it in a thread)."""
        if not self._open or self._closed:
            raise SpoolError("spool is not open")
        try:
            conn = self._connect()
            try:
                return conn.execute(_PAGE_XFER, (after, limit)).fetchall()
            finally:
                conn.close()
        except sqlite3.Error as e:
            raise _spool_error(e, "spool read failed") from e

    async def add_xfer_keys(self, rows: list[tuple[str, str, str, float]]) -> None:
        """Remember XFER keys (origin node, origin id, msgid, time) stored elsewhere: a shard being
        adopted (fastrelay.shards), so add_once still answers its resends as duplicates. A key
        already known keeps its msgid."""
        if rows:
            await self._submit([_XFER_KEYS, None, rows])

    async def _update(self, id: int, env: Envelope) -> None:
        self._forget_recent(id)
        try:
            js = _dumps(env.to_json())
        except (TypeError, ValueError) as e:
            raise SpoolError(f"cannot serialize envelope: {e}") from e
        await self._submit([_UPDATE, None, (env.domain, env.binding, env.next_attempt, env.attempts, js, id)])

    async def mark_recipients(self, id: int, env: Envelope) -> None:
        """Persist the recipients' states (P3); the envelope is snapshotted at the call."""
        await self._update(id, env)

    async def reschedule(self, id: int, env: Envelope) -> None:
        """Persist attempts / next_attempt / domain / meta (and the rest of the envelope)."""
        await self._update(id, env)

    async def remove(self, id: int) -> None:
        """Delete the message and its body (P4: the caller decides when)."""
        self._forget_recent(id)
        await self._submit([_REMOVE, None, (id,)])

    def _forget_recent(self, id: int) -> None:
        hit = self._recent.pop(id, None)
        if hit is not None:
            self._recent_bytes -= len(hit[1])

    def _remember(self, entries: list[IndexEntry], items: list[tuple[Envelope, bytes]]) -> None:
        """Keep what was just committed for its first load; bounded by RECENT_CACHE_BYTES, oldest
        out first. Only for the first load: after that the database is the one copy that counts."""
        recent = self._recent
        for e, (env, data) in zip(entries, items, strict=True):
            recent[e.id] = (env, data)
            self._recent_bytes += len(data)
        while self._recent_bytes > RECENT_CACHE_BYTES and recent:
            old = next(iter(recent))
            self._recent_bytes -= len(recent.pop(old)[1])

    async def quarantine(self, id: int, reason: str) -> None:
        """Move a message out of the queue with a reason, keeping whatever is readable of it (P6)."""
        if not self._open or self._closed:
            raise SpoolError("spool is closed" if self._closed else "spool is not open")
        self._forget_recent(id)
        await self._quarantine(id, reason)

    async def _quarantine(self, id: int, reason: str) -> None:
        # Internal: allowed while closing too (a load finished by the reader may need it).
        if not self._open or self._wq_closed:
            raise SpoolError("spool is closed")
        fut = self._loop.create_future()  # type: ignore[union-attr]
        self._wq.put([_QUARANTINE, fut, id, reason])
        await fut

    # ------------------------------------------------------------------ writer thread

    def _writer_main(self, ready: concurrent.futures.Future) -> None:
        try:
            try:
                cpu.name_thread("spool-writer")
                ok, what = cpu.apply(self.cpu_scheduling)  # before the checkpointer starts: it inherits it
                log.log(logging.INFO if ok else logging.WARNING, "spool writer CPU scheduling: %s", what)
                conn, node_id, next_id = self._setup()
            except BaseException as e:
                ready.set_exception(e if isinstance(e, SpoolError) else SpoolError(str(e)))
                return
            ckpt = threading.Thread(target=self._checkpointer_main, name="spool-checkpointer", daemon=True)
            ckpt.start()
            ready.set_result((node_id, next_id))
            try:
                self._writer_loop(conn)
            finally:
                self._ckpt_stop = True
                self._ckpt_event.set()
                ckpt.join()
                # The last connection to close checkpoints the WAL into spool.db and deletes it.
                conn.close()
        finally:
            self._writer_done.set_result(None)

    def _writer_loop(self, conn: sqlite3.Connection) -> None:
        stats = self.stats
        for batch in _batches(self._wq, self.max_batch, lambda: self._idle(conn), _IDLE_CHECKPOINT,
                              self._window):
            stats["batches"] += 1
            if len(batch) > stats["largest_batch"]:
                stats["largest_batch"] = len(batch)
            self._wake(batch, self._process(conn, batch))

    def _window(self, first: list) -> CommitWindow:
        """The group commit window of a batch that begins with `first`.

        The window is worth its wait only while another write may still come in it. With none
        sending (a queue draining: nobody waits for a 250, and the removals of concurrent
        deliveries share commits) or many (under load: the writer sleeps through the window and
        takes all that came at one wake-up), it is the configured one, as before. With a few
        clients, it ends as soon as the batch holds one add per client: each has at most one
        message waiting for its 250 (an SMTP session sends the next only after it, an XFER request
        carries one), so nothing else can come. Measured: one smtplib session, 1.9-2.0 ms a
        message with the 1 ms window, 1.0-1.4 ms without (bench/RESULTS.md 2026-12-04); two
        sessions 2.0 and 1.3. A batch that begins with a removal or an update (a delivery's
        outcome) waits the same way for the clients' next messages, which would otherwise wait
        out the rest of the window."""
        delay = self.commit_delay
        if delay <= 0:
            return _NO_WINDOW
        sources = self.sources
        if sources is None:
            return CommitWindow(delay)
        try:
            clients = sources()
        except Exception:  # a relay stopping while the writer asks: keep the configured window
            return CommitWindow(delay)
        if clients < 1 or clients > self.few_clients:
            return CommitWindow(delay)
        if clients == 1 and first[0] == _ADD:
            self.stats["windows_skipped"] += 1
            return _NO_WINDOW
        return CommitWindow(delay, counts=_is_add, needed=clients, ended_early=self._window_cut)

    def _window_cut(self) -> None:
        self.stats["windows_cut"] += 1

    def _process(self, conn: sqlite3.Connection, batch: list) -> list | None:
        """Run a batch; return None if all went well, else one error (or None) per operation."""
        if self._ckpt_full:
            # The checkpointer could not grow spool.db: the disk is full even if the WAL still took
            # the last commits. Stop now, while the reserve still covers what the WAL holds.
            self._ckpt_full = False
            if self._accepting:
                self._disk_full(conn)
        if not self._accepting and not self._try_resume(conn, batch):
            # Disk full and the reserve is spent: refuse new mail, keep recording progress and removals.
            errors: list = [None] * len(batch)
            todo = []
            for i, op in enumerate(batch):
                if op[0] == _ADD:
                    errors[i] = SpoolFull("spool disk is full")
                else:
                    todo.append(i)
        else:
            try:
                if not (self._restartable and self._since_restart >= _WAL_RESTART_AFTER and self._restart(conn, batch)):
                    self._run_batch(conn, batch)
                self._after_commit(conn)
                if self._failing:
                    self._failing = False
                    log.warning("spool: writes succeed again (%d batches had failed)", self.stats["batch_failures"])
                return None
            except Exception as e:
                self.stats["batch_failures"] += 1
                if not self._failing:
                    # Once per episode: a failing disk fails every batch, and a line each would bury
                    # the log (the callers get SpoolError and log or answer it themselves).
                    self._failing = True
                    log.warning("spool: batch of %d operations failed (%s); retrying one by one; further "
                                "failures are not logged until a write succeeds", len(batch), e)
                self._rollback(conn)
                if isinstance(_spool_error(e, ""), SpoolFull):
                    self._disk_full(conn)
                errors = [None] * len(batch)
                todo = list(range(len(batch)))
        # One transaction per operation, so one that cannot be written does not fail the others.
        for i in todo:
            op = batch[i]
            if op[0] == _ADD and not self._accepting:
                errors[i] = SpoolFull("spool disk is full")
                continue
            try:
                self._run_batch(conn, [op])
            except Exception as e:
                self._rollback(conn)
                self.stats["op_failures"] += 1
                err = _spool_error(e, "spool write failed")
                errors[i] = err
                if isinstance(err, SpoolFull) and self._accepting:
                    self._disk_full(conn)
        self._after_commit(conn)
        return errors

    def _restart(self, conn: sqlite3.Connection, batch: list) -> bool:
        """Start the WAL over at this batch; False (nothing run) if a checkpoint is running now.

        SQLite restarts the WAL at a write only if that write's transaction began with every frame
        already in spool.db, and no reader then holds a snapshot of it. A PASSIVE checkpoint in the
        checkpointer completes only the frames there were when it began: under a steady load the
        writer has always added some by the time it writes again, so the WAL never restarted and
        grew without bound (measured: 120 MiB in 30 s of deferrals at 150 msg/s, beside an 8 MiB
        spool.db, and it stayed that size when idle). So here, once the checkpointer has done the
        bulk, the writer copies the few frames since (the tail) itself, with the reader held off, and
        its next transaction restarts the WAL; journal_size_limit then trims the file.
        """
        if not self._ckpt_lock.acquire(blocking=False):
            return False  # the checkpointer is running: it sets _restartable again when it is done
        try:
            self._restartable = False
            with self._read_lock:
                mark = self._written
                try:
                    busy, nlog, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.stats["checkpoints"] += 1
                except sqlite3.Error as e:
                    log.warning("spool: checkpoint failed: %s", e)
                    busy = 1
                if busy == 0 and nlog == done:
                    self._ckpt_mark = mark
                    self._since_restart = 0
                    self.stats["wal_restarts"] += 1
                self._run_batch(conn, batch)
            return True
        finally:
            self._ckpt_lock.release()

    def _idle(self, conn: sqlite3.Connection) -> None:
        """Nothing to write for a while: put the whole WAL into spool.db and truncate it to 0 bytes,
        so an idle spool keeps no WAL (journal_size_limit only trims the file at a restart)."""
        if self._written == self._idle_mark:
            return
        with self._ckpt_lock, self._read_lock:
            try:
                busy, nlog, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                self.stats["checkpoints"] += 1
            except sqlite3.Error as e:
                if not self._failing:
                    self._failing = True  # logged once; a batch that commits logs the recovery
                    log.warning("spool: idle checkpoint failed: %s", e)
                return
            if busy == 0 and nlog == done:
                self._idle_mark = self._ckpt_mark = self._written
                self._since_restart = 0

    def _after_commit(self, conn: sqlite3.Connection) -> None:
        if not self._reserve_held:
            # No reserve left (the disk filled up): restart the WAL after every batch, so that the
            # next one is written over the WAL file's existing space instead of needing more.
            self._checkpoint(conn, "RESTART")
            now = time.monotonic()
            if self._accepting and now >= self._resume_at:
                self._resume_at = now + 1.0
                if self._make_reserve():
                    self._reserve_held = True
                    log.warning("spool: reserve restored")
        # Note how much free space spool.db holds inside (pages freed by remove(), reused by later
        # adds: the file never shrinks), for space_ok(): after removals, else once a second.
        now = time.monotonic()
        if now >= self._freelist_at or self._batch_freed:
            self._batch_freed = False
            self._freelist_at = now + 1.0
            try:
                self._db_free = conn.execute("PRAGMA freelist_count").fetchone()[0] * self._page_size
            except sqlite3.Error:
                pass

    # Disk full. SQLite cannot shrink spool.db, and a WAL whose frames cannot be copied into spool.db
    # (which must grow for new pages) can never restart: then even remove() could not be written, and
    # the spool would be stuck. So a reserve file (spool.reserve) holds back some space: on the first
    # SQLITE_FULL it is deleted, the checkpoint completes into the space it leaves, the WAL restarts
    # and its file is reused in place, so progress updates and removals keep working. New mail is
    # refused (SpoolFull) until the reserve can be made again or spool.db has enough free pages.

    def _make_reserve(self) -> bool:
        try:
            fd = os.open(self._reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self._reserve_size)
            finally:
                os.close(fd)
        except OSError:
            try:
                os.unlink(self._reserve_path)
            except OSError:
                pass
            return False
        return True

    def _disk_full(self, conn: sqlite3.Connection) -> None:
        self._accepting = False
        self._resume_at = time.monotonic() + 1.0
        self.stats["disk_full"] += 1
        if self._reserve_held:
            self._reserve_held = False
            try:
                os.unlink(self._reserve_path)
            except OSError:
                pass
            log.error("spool: disk full; reserve released, new mail refused until space is freed")
        else:
            log.error("spool: disk full and no reserve left; new mail refused until space is freed")
        self._checkpoint(conn, "RESTART")

    def _try_resume(self, conn: sqlite3.Connection, batch: list) -> bool:
        """While refusing new mail: try again after removals, or once a second."""
        now = time.monotonic()
        if now < self._resume_at and not self._freed:
            return False
        self._freed = False
        self._resume_at = now + 1.0
        if not self._checkpoint(conn, "RESTART"):
            return False
        if self._make_reserve():
            self._reserve_held = True
        else:
            try:
                free = conn.execute("PRAGMA freelist_count").fetchone()[0] * self._page_size
            except sqlite3.Error:
                return False
            if free < self._reserve_size // 2:
                return False
        self._accepting = True
        log.warning("spool: space available again (reserve %s), accepting new mail",
                    "restored" if self._reserve_held else "not restored, using free pages in spool.db")
        return True

    def _checkpoint(self, conn: sqlite3.Connection, mode: str, wait: bool = True) -> bool:
        """Run a checkpoint; True if the whole WAL is now in spool.db (so the WAL can restart).

        wait: first wait for a checkpoint running in the checkpointer (it would make this one BUSY).
        """
        try:
            if wait:
                with self._ckpt_lock:
                    busy, nlog, done = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            else:
                busy, nlog, done = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            self.stats["checkpoints"] += 1
            return busy == 0 and nlog == done
        except sqlite3.Error as e:
            log.warning("spool: %s checkpoint failed: %s", mode, e)
            return False

    def _checkpointer_main(self) -> None:
        """Checkpoint beside the writer, so that commits (and the acks waiting on them) never wait for one.

        PASSIVE copies what it can without taking any lock the writer needs. Under a steady load it
        never quite catches up with the writer, so the WAL would only grow: the writer itself runs a
        RESTART (copying the few frames left, then the WAL starts over) when the backlog passes
        _backlog_limit. A RESTART here would hold the writer off for its whole duration instead.
        """
        cpu.name_thread("spool-ckpt")
        try:
            conn = self._connect()
        except sqlite3.Error as e:
            log.error("spool: checkpointer cannot connect, WAL will grow until close: %s", e)
            return
        try:
            while True:
                self._ckpt_event.wait()
                self._ckpt_event.clear()
                if self._ckpt_stop:
                    break
                try:
                    mark = self._written
                    with self._ckpt_lock:
                        busy, nlog, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if busy == 0 and nlog == done:
                        self._ckpt_mark = mark  # all that was written before `mark` is in spool.db
                        self._restartable = True
                    self.stats["checkpoints"] += 1
                except sqlite3.Error as e:
                    log.warning("spool: checkpoint failed: %s", e)
                    if isinstance(_spool_error(e, ""), SpoolFull):
                        self._ckpt_full = True
        finally:
            conn.close()

    _rollback = staticmethod(rollback)

    def _run_batch(self, conn: sqlite3.Connection, batch: list) -> None:
        """Run the operations in order, in one transaction; consecutive ones of a kind share a statement."""
        execute = conn.execute
        executemany = conn.executemany
        execute("BEGIN IMMEDIATE")
        n = len(batch)
        i = 0
        quarantined = 0
        items = 0
        wal_bytes = 0
        freed = False
        while i < n:
            kind = batch[i][0]
            j = i + 1
            while j < n and batch[j][0] == kind:
                j += 1
            if kind == _ADD and any(batch[k][6] is not None for k in range(i, j)):
                # Keyed (XFER) adds one by one: each checks its key in this same transaction.
                now = time.time()
                for k in range(i, j):
                    op = batch[k]
                    op[7] = None
                    wal_bytes += op[5]
                    if op[6] is not None:
                        row = execute(_SEL_XFER, op[6]).fetchone()
                        if row is not None:
                            op[7] = row[0]
                            continue
                        execute(_INS_XFER, (op[6][0], op[6][1], op[8], now))
                    _multi(execute, "msg", op[2])
                    _multi(execute, "body", op[3])
                    execute(_UPD_HWM, (op[4],))
                    items += len(op[2])
            elif kind == _ADD:
                if j - i == 1:
                    op = batch[i]
                    msg_rows, body_rows, hwm = op[2], op[3], op[4]
                    wal_bytes += op[5]
                else:
                    msg_rows = []
                    body_rows = []
                    hwm = 0
                    for k in range(i, j):
                        op = batch[k]
                        msg_rows += op[2]
                        body_rows += op[3]
                        wal_bytes += op[5]
                        if op[4] > hwm:
                            hwm = op[4]
                _multi(execute, "msg", msg_rows)
                _multi(execute, "body", body_rows)
                execute(_UPD_HWM, (hwm,))
                items += len(msg_rows)
            elif kind == _UPDATE:
                executemany(_UPD_ENV, [batch[k][2] for k in range(i, j)])
                wal_bytes += (j - i) * _PAGE
            elif kind == _REMOVE:
                keys = [batch[k][2] for k in range(i, j)]
                _multi(execute, "del_msg", keys)
                _multi(execute, "del_body", keys)
                wal_bytes += (j - i) * _PAGE
                freed = True
            elif kind == _XFER_KEYS:
                for k in range(i, j):
                    executemany(_COPY_XFER, batch[k][2])
                    wal_bytes += 128 * len(batch[k][2])
            else:  # _QUARANTINE
                now = time.time()
                for k in range(i, j):
                    self._quarantine_rows(conn, batch[k][2], batch[k][3], now)
                    quarantined += 1
                freed = True
            i = j
        crashpoint("spool_after_write")
        execute("COMMIT")
        crashpoint("spool_after_commit")
        stats = self.stats
        stats["commits"] += 1
        stats["ops"] += n
        stats["items"] += items
        stats["quarantined"] += quarantined
        if freed:
            self._freed = self._batch_freed = True
        self._wal_bytes += wal_bytes
        self._written += wal_bytes
        self._since_restart += wal_bytes
        if self._wal_bytes >= self._ckpt_bytes:
            self._wal_bytes = 0
            self._ckpt_event.set()
        backlog = self._written - self._ckpt_mark
        if backlog > self._backlog_limit:
            # The WAL holds more than the reserve could absorb if the disk filled up now: finish the
            # checkpoint here so the WAL restarts. At first without waiting for a PASSIVE one
            # running in the checkpointer (this one is then BUSY and tried after the next batch);
            # under a steady load the checkpointer is nearly always running, so past twice the
            # limit the writer waits for it: a short stall now and then instead of a WAL that
            # grows without bound (seen: 1.9 GB of WAL for 200,000 deferred messages).
            mark = self._written
            # Hold the reader off for the RESTART: with no read transaction open it completes, and
            # the WAL starts over (journal_size_limit then trims the file).
            with self._read_lock:
                done = self._checkpoint(conn, "RESTART", wait=backlog > 2 * self._backlog_limit)
            if done:
                self._ckpt_mark = mark
                self._since_restart = 0

    def _wake(self, batch: list, errors: list | None) -> None:
        """Resolve the batch's futures with one call into the event loop."""
        try:
            self._loop.call_soon_threadsafe(_resolve_writes, batch, errors)  # type: ignore[union-attr]
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    # ------------------------------------------------------------------ loads

    async def load(self, id: int) -> tuple[Envelope, bytes] | None:
        """The envelope and body of a message; None if it is gone or was found corrupt.

        A body whose crc or length does not match is quarantined with a log line and None is
        returned: a truncated body is never handed out (P6).
        """
        if not self._open or self._closed:
            raise SpoolError("spool is closed" if self._closed else "spool is not open")
        hit = self._recent.pop(id, None)
        if hit is not None:
            # Just committed and not yet loaded: the same bytes the database holds, without a read
            # and a hop through the reader thread (most mail goes out moments after its 250).
            self._recent_bytes -= len(hit[1])
            return hit
        fut = self._loop.create_future()  # type: ignore[union-attr]
        self._rq.put((fut, id))
        res = await fut
        if res is None or type(res) is tuple:
            return res
        # res is the reason the entry is corrupt.
        log.error("spool: message %d is corrupt, quarantined: %s", id, res)
        try:
            await self._quarantine(id, res)
        except SpoolError as e:
            log.error("spool: could not quarantine message %d: %s", id, e)
        return None

    def _reader_main(self, ready: concurrent.futures.Future) -> None:
        cpu.name_thread("spool-reader")
        try:
            try:
                conn = self._connect()
                conn.execute("PRAGMA query_only=1")
            except (sqlite3.Error, OSError) as e:
                ready.set_exception(SpoolError(f"spool {self.path}: cannot open reader: {e}"))
                return
            ready.set_result(None)
            try:
                self._reader_loop(conn)
            finally:
                conn.close()
        finally:
            self._reader_done.set_result(None)

    def _reader_loop(self, conn: sqlite3.Connection) -> None:
        stats = self.stats
        for batch in _batches(self._rq, self.max_batch):
            results: list = []
            try:
                # The read lock keeps this snapshot out of the way of the writer's RESTART
                # checkpoint (see _run_batch): a reader always inside a transaction starves it.
                with self._read_lock:
                    conn.execute("BEGIN")  # one read snapshot for the batch
                    try:
                        for _fut, mid in batch:
                            results.append(self._load_one(conn, mid))
                    finally:
                        conn.execute("COMMIT")
            except Exception as e:
                err = _spool_error(e, "spool read failed")
                results = [err] * len(batch)
            stats["loads"] += len(batch)
            stats["load_batches"] += 1
            try:
                self._loop.call_soon_threadsafe(_resolve_loads, batch, results)  # type: ignore[union-attr]
            except RuntimeError:
                pass

    @staticmethod
    def _load_one(conn: sqlite3.Connection, mid: int) -> Any:
        try:
            rows = conn.execute(_SEL_LOAD, (mid,)).fetchall()
        except (sqlite3.DataError, ValueError, UnicodeError) as e:  # a value Python cannot take
            return f"row does not read: {type(e).__name__}: {e}"
        if not rows:
            return None
        env_js, data, blen, crc, bid = rows[0]
        if bid is None:
            return "body row missing"
        if not isinstance(data, bytes):
            return f"body stored as {type(data).__name__}, not as a blob"
        if data is None or blen != len(data):
            return f"body length mismatch: stored {blen}, data {None if data is None else len(data)}"
        if _crc32(data) != crc:
            return "body checksum mismatch"
        try:
            env = Envelope.from_json(_loads(env_js))
        except Exception as e:
            return f"envelope does not parse: {type(e).__name__}: {e}"
        return (env, data)


def _index_problem(domain: Any, binding: Any, nxt: Any, attempts: Any, fq: Any, size: Any) -> str | None:
    """Why a msg row's index columns cannot be used (None if they can): the queue compares and
    sorts them, so a wrong type would fail far from here, for every message."""
    for name, v in (("domain", domain), ("binding", binding)):
        if type(v) is not str:
            return f"index column {name} is {v!r}, not a string"
    for name, v in (("next_attempt", nxt), ("first_queued", fq)):
        if type(v) not in (int, float) or not math.isfinite(v):
            return f"index column {name} is {v!r}, not a time"
    for name, v in (("attempts", attempts), ("size", size)):
        if type(v) is not int or v < 0:
            return f"index column {name} is {v!r}, not a count"
    return None


@dataclass(frozen=True)
class CommitWindow:
    """How the writer gathers a batch after its first request (spool_commit_delay)."""

    delay: float  # seconds to wait for more requests; 0: take what is queued now and commit
    # Stop waiting as soon as the batch holds `needed` requests for which `counts` is true, the
    # first one included (None: wait the whole delay, asleep).
    counts: Callable[[Any], bool] | None = None
    needed: int = 0
    ended_early: Callable[[], None] | None = None  # called when the wait ends before the delay


_NO_WINDOW = CommitWindow(0.0)


def _is_add(op: list) -> bool:
    return op[0] == _ADD


def _batches(q: queue.SimpleQueue, max_batch: int, idle: Any = None, idle_after: float = 1.0,
             gather: Any = None):
    """Block for the first queued request, then take everything else waiting (up to max_batch):
    one batch per wake-up is what makes group commit (and batched reads) work. A None in the
    queue ends the stream after the requests before it. idle() is called once the queue has been
    empty for idle_after seconds (and again after each later batch). gather(first request) is the
    batch's CommitWindow: wait that long before taking the rest (spool_commit_delay; asked per
    batch, so a reload changes it)."""
    get, get_nowait = q.get, q.get_nowait
    monotonic = time.monotonic
    while True:
        if idle is None:
            req = get()
        else:
            try:
                req = get(timeout=idle_after)
            except queue.Empty:
                idle()
                req = get()
        if req is None:
            return
        batch = [req]
        win = gather(req) if gather is not None else _NO_WINDOW
        counts = win.counts
        have = 0
        deadline = 0.0  # while set, wait up to it for the requests the window counts
        if win.delay > 0 and counts is None:
            time.sleep(win.delay)  # requests that arrive meanwhile do not wake this thread
        elif win.delay > 0:
            # Each request that arrives wakes this thread, so that the window ends once the ones
            # it waits for are in (only with a few clients: few come, see Spool._window).
            have = 1 if counts(req) else 0
            if have < win.needed:
                deadline = monotonic() + win.delay
        while len(batch) < max_batch:
            try:
                if deadline:
                    left = deadline - monotonic()
                    if left > 0:
                        req = get(timeout=left)
                    else:
                        deadline = 0.0  # the window ran out: take only what is queued already
                        req = get_nowait()
                else:
                    req = get_nowait()
            except queue.Empty:
                break
            if req is None:
                yield batch
                return
            batch.append(req)
            if deadline and counts(req):
                have += 1
                if have >= win.needed:
                    deadline = 0.0  # take only what is queued already
                    if win.ended_early is not None:
                        win.ended_early()
        yield batch


def _resolve_writes(batch: list, errors: list | None) -> None:
    # An add's result is the msgid of an earlier transfer with the same key, or None.
    if errors is None:
        for op in batch:
            fut = op[1]
            if not fut.done():
                fut.set_result(op[7] if op[0] == _ADD else None)
    else:
        for op, err in zip(batch, errors, strict=True):
            fut = op[1]
            if not fut.done():
                if err is None:
                    fut.set_result(op[7] if op[0] == _ADD else None)
                else:
                    fut.set_exception(err)


def _resolve_loads(batch: list, results: list) -> None:
    for (fut, _), res in zip(batch, results, strict=True):
        if not fut.done():
            if isinstance(res, SpoolError):
                fut.set_exception(res)
            else:
                fut.set_result(res)
