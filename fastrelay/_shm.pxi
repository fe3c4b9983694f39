# Shared counters: connection counts that hold across the relay's worker processes (issue 13).
#
# Spec: fastrelay/_purepy/shm.py; this file must behave like it, error messages included. The
# table is one MAP_SHARED | MAP_ANONYMOUS mapping made by the supervisor before it forks, so
# every worker sees the same memory at the same address. Every access to it is a GCC __atomic
# builtin (sequentially consistent): no lock, so a worker killed at any instant cannot leave one
# held; what it held is in its own column, which the supervisor zeroes (sweep) before forking
# its successor.

cimport cython
from libc.stdint cimport uint64_t, int32_t
from cpython.long cimport PyLong_AsLongAndOverflow
from operator import index as _shm_index
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_ANONYMOUS, MAP_FAILED
from fastrelay import limits as _shm_limits

cdef extern from *:
    """
    #include <stdint.h>
    static inline int32_t fr_add32(int32_t *p, int32_t v) {
        return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST);
    }
    static inline int32_t fr_load32(int32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline int32_t fr_xchg32(int32_t *p, int32_t v) {
        return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
    }
    static inline int fr_dec_if_positive32(int32_t *p) {
        int32_t cur = __atomic_load_n(p, __ATOMIC_SEQ_CST);
        while (cur > 0) {
            if (__atomic_compare_exchange_n(p, &cur, cur - 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
                return 1;
        }
        return 0;
    }
    static inline uint64_t fr_load64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    /* Claim a free key slot: 1 if *p was 0 and is now `key`, else 0 (*p holds another key). */
    static inline uint64_t fr_claim64(uint64_t *p, uint64_t key) {
        uint64_t expected = 0;
        if (__atomic_compare_exchange_n(p, &expected, key, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return key;
        return expected;
    }
    """
    int32_t fr_add32(int32_t *p, int32_t v) nogil
    int32_t fr_load32(int32_t *p) nogil
    int32_t fr_xchg32(int32_t *p, int32_t v) nogil
    int fr_dec_if_positive32(int32_t *p) nogil
    uint64_t fr_load64(uint64_t *p) nogil
    uint64_t fr_claim64(uint64_t *p, uint64_t key) nogil


SHM_MAX_SLOTS = 1 << 24
cdef long _SHM_MAX_LIMIT = 2**31 - 1


cpdef uint64_t hash_key(key) except? 0:
    """FNV-1a 64 of the key's UTF-8 bytes; 0 becomes 1 (0 marks a free slot)."""
    if not isinstance(key, str):
        raise TypeError(f"key must be str, not {type(key).__name__}")
    cdef bytes b = (<str>key).encode("utf-8", "surrogatepass")
    cdef const unsigned char *p = b
    cdef Py_ssize_t i, n = len(b)
    cdef uint64_t h = 0xCBF29CE484222325ULL
    for i in range(n):
        h = (h ^ p[i]) * 0x100000001B3ULL
    return h if h != 0 else 1


@cython.final
cdef class SharedCounters:
    """Counters per (key, worker) in memory shared by the relay's processes (see the spec)."""

    cdef uint64_t *_keys
    cdef int32_t *_counts
    cdef size_t _size
    cdef readonly int nworkers
    cdef readonly int nslots
    cdef int _probe

    def __cinit__(self, nworkers, nslots=_shm_limits.SHARED_SLOTS, probe=_shm_limits.SHARED_PROBE):
        self._keys = NULL
        self._counts = NULL
        self._size = 0
        nworkers, nslots, probe = _shm_index(nworkers), _shm_index(nslots), _shm_index(probe)
        if not 1 <= nworkers <= _shm_limits.MAX_WORKERS:
            raise ValueError(f"nworkers must be in 1..{_shm_limits.MAX_WORKERS}, got {nworkers!r}")
        if not 1 <= nslots <= SHM_MAX_SLOTS:
            raise ValueError(f"nslots must be in 1..{SHM_MAX_SLOTS}, got {nslots!r}")
        if probe < 1:
            raise ValueError(f"probe must be at least 1, got {probe!r}")
        self.nworkers = nworkers
        self.nslots = nslots
        self._probe = min(probe, nslots)
        self._size = <size_t>nslots * 8 + <size_t>nslots * nworkers * 4
        cdef void *base = mmap(NULL, self._size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        if base == MAP_FAILED:
            self._size = 0
            raise MemoryError("cannot map the shared counter table")
        self._keys = <uint64_t *>base
        self._counts = <int32_t *>(<char *>base + <size_t>nslots * 8)

    def __dealloc__(self):
        if self._keys != NULL:
            munmap(self._keys, self._size)
            self._keys = NULL

    cdef inline int _slot_id(self, object slot) except -1:
        cdef int overflow = 0
        cdef long i = PyLong_AsLongAndOverflow(slot, &overflow)
        if overflow or i < 0 or i >= self.nslots:
            raise ValueError(f"unknown slot id {_shm_index(slot)!r}")
        return <int>i

    cdef inline int _worker_id(self, object worker) except -1:
        cdef int overflow = 0
        cdef long w = PyLong_AsLongAndOverflow(worker, &overflow)
        if overflow or w < 0 or w >= self.nworkers:
            raise ValueError(f"unknown worker {_shm_index(worker)!r}")
        return <int>w

    # -- the C-level hot path (the route table calls these directly) --------------------------
    cdef int _find(self, uint64_t h) noexcept:
        cdef int home = <int>(h % <uint64_t>self.nslots)
        cdef int i, idx
        cdef uint64_t k
        for i in range(self._probe):
            idx = (home + i) % self.nslots
            k = fr_load64(&self._keys[idx])
            if k == 0:
                k = fr_claim64(&self._keys[idx], h)
            if k == h:
                return idx
        return home

    cdef bint _acquire(self, int s, int w, int limit) noexcept:
        cdef int32_t *row = &self._counts[<size_t>s * self.nworkers]
        cdef int i
        cdef long total = 0
        fr_add32(&row[w], 1)
        if limit == 0:
            return True
        # Add first, then sum: of two racing acquirers the later one sees both adds.
        for i in range(self.nworkers):
            total += fr_load32(&row[i])
        if total > limit:
            fr_add32(&row[w], -1)
            return False
        return True

    cdef bint _release(self, int s, int w) noexcept:
        return fr_dec_if_positive32(&self._counts[<size_t>s * self.nworkers + w]) != 0

    cdef long _count(self, int s) noexcept:
        cdef int32_t *row = &self._counts[<size_t>s * self.nworkers]
        cdef int i
        cdef long total = 0
        for i in range(self.nworkers):
            total += fr_load32(&row[i])
        return total

    # -- Python API ------------------------------------------------------------------------------
    def slot(self, key):
        return self._find(hash_key(key))

    def acquire(self, slot, worker, limit):
        cdef int s = self._slot_id(slot)
        cdef int w = self._worker_id(worker)
        lim = _shm_index(limit)
        if not 0 <= lim <= _SHM_MAX_LIMIT:
            raise ValueError(f"limit must be in 0..{_SHM_MAX_LIMIT}, got {lim!r}")
        return self._acquire(s, w, <int>lim)

    def release(self, slot, worker):
        cdef int s = self._slot_id(slot)
        cdef int w = self._worker_id(worker)
        if not self._release(s, w):
            raise ValueError(f"release without an acquire: slot {s!r}, worker {w!r}")

    def count(self, slot):
        return self._count(self._slot_id(slot))

    def held(self, slot, worker):
        cdef int s = self._slot_id(slot)
        cdef int w = self._worker_id(worker)
        return fr_load32(&self._counts[<size_t>s * self.nworkers + w])

    def sweep(self, worker):
        cdef int w = self._worker_id(worker)
        cdef long total = 0
        cdef int s
        for s in range(self.nslots):
            total += fr_xchg32(&self._counts[<size_t>s * self.nworkers + w], 0)
        return total
