"""Pure-Python twin of the shared counters: connection counts that hold across worker processes.

SPEC (the Cython version in fastrelay/_shm.pxi must match it exactly). The table lives in a
MAP_SHARED mapping made before the workers are forked, so every worker (and the supervisor) sees
the same memory. Issue 13: per-MX, per-site and per-client-IP limits "hold for the whole relay,
not per worker"; "a worker that dies with slots held gives them back (a lease or a sweep):
counters may not leak".

class SharedCounters(nworkers: int, nslots: int = limits.SHARED_SLOTS, probe: int = limits.SHARED_PROBE)
  nworkers, nslots                      as given (1..MAX_WORKERS, 1..2**24), else ValueError
  slot(key: str) -> int                 the slot of `key`: found, or claimed on first use (in any
                                        process). Keys are hashed (hash_key); a key keeps its slot
                                        for the life of the table. When `probe` slots from the
                                        key's home slot (hash % nslots) all belong to other keys,
                                        the home slot is returned: the key then shares counts with
                                        another key, which makes both limits stricter, never looser.
  acquire(slot: int, worker: int, limit: int) -> bool
        count one more for `worker` unless the slot's total (all workers) would go above `limit`
        (0 = no limit: always counted). Atomic across processes: the relay-wide count never
        exceeds the limit. (Under a race two acquirers may both be refused when only one would
        have fit: a refusal means "try again later", never an over-limit grant.)
  release(slot: int, worker: int) -> None
        one less for `worker`; ValueError if `worker` holds none there.
  count(slot: int) -> int               total over all workers
  held(slot: int, worker: int) -> int   what `worker` holds there
  sweep(worker: int) -> int             zero every count of `worker` (it died; the supervisor calls
                                        this before forking its successor, which gets the same
                                        column) and return how many slots' worth it held
  Ids (slot, worker) out of range raise ValueError("unknown slot id ..." / "unknown worker ...");
  key must be a str (else TypeError); limit an int in 0..2**31-1 (else ValueError).

hash_key(key: str) -> int               FNV-1a 64 of the key's UTF-8 bytes; 0 becomes 1 (0 marks a
                                        free slot)

Layout (both implementations): nslots uint64 keys, then nslots rows of nworkers int32 counts.
The C version uses GCC __atomic builtins (CAS to claim a key; add-then-check to acquire: each
worker adds to its own column, then sums the row, and takes its add back if the sum is above the
limit; with sequentially consistent atomics the later of two racing acquirers always sees both
adds, so the total cannot pass the limit). This twin takes a POSIX record lock (lockf) on the
table's memfd around each operation instead; record locks belong to a process, so forked
workers exclude each other.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from operator import index

from fastrelay import limits

MAX_SLOTS = 1 << 24
MAX_LIMIT = 2**31 - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


def hash_key(key: str) -> int:
    if not isinstance(key, str):
        raise TypeError(f"key must be str, not {type(key).__name__}")
    h = _FNV_OFFSET
    for b in key.encode("utf-8", "surrogatepass"):
        h = ((h ^ b) * _FNV_PRIME) & _MASK
    return h or 1


class SharedCounters:
    """Counters per (key, worker) in memory shared by the relay's processes (see the module doc)."""

    def __init__(self, nworkers: int, nslots: int = limits.SHARED_SLOTS, probe: int = limits.SHARED_PROBE):
        nworkers, nslots, probe = index(nworkers), index(nslots), index(probe)
        if not 1 <= nworkers <= limits.MAX_WORKERS:
            raise ValueError(f"nworkers must be in 1..{limits.MAX_WORKERS}, got {nworkers!r}")
        if not 1 <= nslots <= MAX_SLOTS:
            raise ValueError(f"nslots must be in 1..{MAX_SLOTS}, got {nslots!r}")
        if probe < 1:
            raise ValueError(f"probe must be at least 1, got {probe!r}")
        self.nworkers = nworkers
        self.nslots = nslots
        self.probe = min(probe, nslots)
        size = nslots * 8 + nslots * nworkers * 4
        self._fd = os.memfd_create("fastrelay-shared", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mv = memoryview(self._map)
        self._keys = mv[: nslots * 8].cast("Q")
        self._counts = mv[nslots * 8:].cast("i")

    # -- locking -------------------------------------------------------------------------------
    def _lock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _slot(self, slot: object) -> int:
        i = index(slot)
        if not 0 <= i < self.nslots:
            raise ValueError(f"unknown slot id {i!r}")
        return i

    def _worker(self, worker: object) -> int:
        w = index(worker)
        if not 0 <= w < self.nworkers:
            raise ValueError(f"unknown worker {w!r}")
        return w

    # -- API -----------------------------------------------------------------------------------
    def slot(self, key: str) -> int:
        h = hash_key(key)
        home = h % self.nslots
        keys = self._keys
        self._lock()
        try:
            for i in range(self.probe):
                idx = (home + i) % self.nslots
                k = keys[idx]
                if k == h:
                    return idx
                if k == 0:
                    keys[idx] = h
                    return idx
            return home
        finally:
            self._unlock()

    def acquire(self, slot: int, worker: int, limit: int) -> bool:
        s, w = self._slot(slot), self._worker(worker)
        limit = index(limit)
        if not 0 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be in 0..{MAX_LIMIT}, got {limit!r}")
        row = s * self.nworkers
        counts = self._counts
        self._lock()
        try:
            if limit and sum(counts[row:row + self.nworkers]) >= limit:
                return False
            counts[row + w] += 1
            return True
        finally:
            self._unlock()

    def release(self, slot: int, worker: int) -> None:
        s, w = self._slot(slot), self._worker(worker)
        i = s * self.nworkers + w
        self._lock()
        try:
            if self._counts[i] <= 0:
                raise ValueError(f"release without an acquire: slot {s!r}, worker {w!r}")
            self._counts[i] -= 1
        finally:
            self._unlock()

    def count(self, slot: int) -> int:
        row = self._slot(slot) * self.nworkers
        return sum(self._counts[row:row + self.nworkers])

    def held(self, slot: int, worker: int) -> int:
        return self._counts[self._slot(slot) * self.nworkers + self._worker(worker)]

    def sweep(self, worker: int) -> int:
        w = self._worker(worker)
        counts = self._counts
        n = self.nworkers
        total = 0
        self._lock()
        try:
            for i in range(w, self.nslots * n, n):
                c = counts[i]
                if c:
                    total += c
                    counts[i] = 0
        finally:
            self._unlock()
        return total
