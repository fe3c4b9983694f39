# The route table: per-MX connection counting and host selection in C structs.
#
# Spec: fastrelay/_purepy/routetable.py (Momentum semantics, seed 004); this file must behave
# exactly like it, error messages included. Hosts and sites live in malloc'd arrays so that
# acquire()/release() touch only C ints and doubles; the Python dicts (host key -> id, groups ->
# site id) are used only by host() and site().

cimport cython
from libc.stdlib cimport malloc, realloc, free
from cpython.long cimport PyLong_AsLongAndOverflow
from operator import index as _rt_index

NO_SLOT = -1
ALL_DOWN = -2

cdef enum:
    _RT_NO_SLOT = -1
    _RT_ALL_DOWN = -2

#: Largest accepted connection limit (limits and counts are C ints here).
MAX_LIMIT = 2**31 - 1
#: With shared counters: how often acquire() looks at a group again after losing a race.
RACE_RETRIES = 8
cdef int _RT_RACE_RETRIES = 8


cdef struct _rt_host:
    int active
    int limit             # 0 = unlimited
    double down_until     # 0.0 = never marked
    int slot              # its slot in the shared counters (-1: none)


cdef struct _rt_slot:
    int host              # host id
    int tier              # index of its group in the site's order (0 = most preferred)
    int held              # slots held on this site for this host, for release() checks


cdef struct _rt_site:
    _rt_slot *slots       # in the site's order: group by group, first appearance inside one
    int n
    int last              # position of the last pick; round-robin starts after it
    int limit             # 0 = unlimited
    int active
    int slot              # its slot in the shared counters (-1: none)


cdef object _rt_check_limit(object limit):
    value = _rt_index(limit)
    if not 0 <= value <= MAX_LIMIT:
        raise ValueError(f"limit must be in 0..{MAX_LIMIT}, got {value!r}")
    return value


cdef list _rt_normalise_groups(object groups, Py_ssize_t n_hosts):
    """The site's groups with each host once, in order of first appearance, validated."""
    out = []
    group_of = {}
    for g, group in enumerate(groups):
        hosts = []
        for h_obj in group:
            h = _rt_index(h_obj)
            if not 0 <= h < n_hosts:
                raise ValueError(f"unknown host id {h!r}")
            seen = group_of.get(h)
            if seen is None:
                group_of[h] = g
                hosts.append(h)
            elif seen != g:
                raise ValueError(f"host id {h!r} given in groups {seen!r} and {g!r}")
        if not hosts:
            raise ValueError(f"group {g!r} has no host")
        out.append(hosts)
    if not out:
        raise ValueError("a site needs at least one host")
    return out


cdef inline Py_ssize_t _rt_id(object obj, Py_ssize_t n, str what) except -1:
    """obj as an id in 0..n-1; ValueError (like the twin) for any other int, however large."""
    cdef int overflow = 0
    cdef long i = PyLong_AsLongAndOverflow(obj, &overflow)
    if overflow or i < 0 or i >= n:
        raise ValueError(f"unknown {what} id {_rt_index(obj)!r}")
    return i


@cython.final
cdef class RouteTable:
    """Hosts, sites (sets of MX hosts sharing a limit) and their active connection counts."""

    cdef _rt_host *_hosts
    cdef Py_ssize_t _n_hosts, _cap_hosts
    cdef _rt_site *_sites
    cdef Py_ssize_t _n_sites, _cap_sites
    cdef long _total
    cdef list _host_keys
    cdef dict _host_ids
    cdef dict _site_ids
    cdef SharedCounters _shared   # None: this process's counts only
    cdef int _worker

    def __init__(self, shared=None, worker=0):
        if shared is not None:
            if not isinstance(shared, SharedCounters):
                raise TypeError(f"shared must be a fastrelay._core.SharedCounters, not {type(shared).__name__}")
            worker = _rt_index(worker)
            if not 0 <= worker < (<SharedCounters>shared).nworkers:
                raise ValueError(f"unknown worker {worker!r}")
            self._shared = shared
            self._worker = worker

    def __cinit__(self):
        self._shared = None
        self._worker = 0
        self._hosts = NULL
        self._sites = NULL
        self._n_hosts = self._cap_hosts = 0
        self._n_sites = self._cap_sites = 0
        self._total = 0
        self._host_keys = []
        self._host_ids = {}
        self._site_ids = {}

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self._sites != NULL:
            for i in range(self._n_sites):
                free(self._sites[i].slots)
            free(self._sites)
            self._sites = NULL
        free(self._hosts)
        self._hosts = NULL

    # -- lookups ---------------------------------------------------------------------------------

    cdef inline Py_ssize_t _host_id(self, object h) except -1:
        return _rt_id(h, self._n_hosts, "host")

    cdef inline Py_ssize_t _site_id(self, object s) except -1:
        return _rt_id(s, self._n_sites, "site")

    # -- hosts -----------------------------------------------------------------------------------

    def host(self, key):
        cdef Py_ssize_t cap
        cdef _rt_host *grown
        if not isinstance(key, str):
            raise TypeError(f"host key must be str, not {type(key).__name__}")
        found = self._host_ids.get(key)
        if found is not None:
            return found
        if self._n_hosts == self._cap_hosts:
            cap = self._cap_hosts * 2 if self._cap_hosts else 16
            grown = <_rt_host *>realloc(self._hosts, cap * sizeof(_rt_host))
            if grown == NULL:
                raise MemoryError()
            self._hosts = grown
            self._cap_hosts = cap
        h = self._n_hosts
        self._hosts[h].active = 0
        self._hosts[h].limit = 0
        self._hosts[h].down_until = 0.0
        self._hosts[h].slot = self._shared.slot("h:" + key) if self._shared is not None else -1
        self._host_keys.append(key)
        self._host_ids[key] = h
        self._n_hosts += 1
        return h

    def host_key(self, h):
        return self._host_keys[self._host_id(h)]

    def set_host_limit(self, h, limit):
        cdef Py_ssize_t i = self._host_id(h)
        self._hosts[i].limit = _rt_check_limit(limit)

    def host_limit(self, h):
        return self._hosts[self._host_id(h)].limit

    def host_active(self, h):
        return self._hosts[self._host_id(h)].active

    def mark_down(self, h, double until):
        self._hosts[self._host_id(h)].down_until = until

    def mark_up(self, h):
        self._hosts[self._host_id(h)].down_until = 0.0

    def is_down(self, h, double now):
        return self._hosts[self._host_id(h)].down_until > now

    def down_until(self, h):
        return self._hosts[self._host_id(h)].down_until

    # -- sites -----------------------------------------------------------------------------------

    def site(self, groups, limit=0):
        cdef Py_ssize_t cap, pos, n, tier
        cdef _rt_site *grown
        cdef _rt_site *site
        cdef _rt_slot *slots
        cdef int c_limit = _rt_check_limit(limit)
        normal = _rt_normalise_groups(groups, self._n_hosts)
        key = tuple([frozenset(group) for group in normal])
        found = self._site_ids.get(key)
        if found is not None:
            self._sites[<Py_ssize_t>found].limit = c_limit
            return found
        n = 0
        for group in normal:
            n += len(group)
        if self._n_sites == self._cap_sites:
            cap = self._cap_sites * 2 if self._cap_sites else 16
            grown = <_rt_site *>realloc(self._sites, cap * sizeof(_rt_site))
            if grown == NULL:
                raise MemoryError()
            self._sites = grown
            self._cap_sites = cap
        slots = <_rt_slot *>malloc(n * sizeof(_rt_slot))
        if slots == NULL:
            raise MemoryError()
        # Flattened in the caller's order: group 0's hosts, then group 1's, ...
        pos = 0
        tier = 0
        for group in normal:
            for h in group:
                slots[pos].host = h
                slots[pos].tier = <int>tier
                slots[pos].held = 0
                pos += 1
            tier += 1
        s = self._n_sites
        site = &self._sites[s]
        site.slots = slots
        site.n = <int>n
        site.last = -1
        site.limit = c_limit
        site.active = 0
        site.slot = -1
        if self._shared is not None:
            site.slot = self._shared.slot(
                "s:" + "|".join([",".join(sorted([self._host_keys[h] for h in group])) for group in normal]))
        self._n_sites += 1
        self._site_ids[key] = s
        return s

    def set_site_limit(self, s, limit):
        cdef Py_ssize_t i = self._site_id(s)
        self._sites[i].limit = _rt_check_limit(limit)

    def site_limit(self, s):
        return self._sites[self._site_id(s)].limit

    def site_groups(self, s):
        # Only site() grows the sites array, so the slots pointer stays valid while lists are made.
        cdef Py_ssize_t si = self._site_id(s)
        cdef _rt_slot *slots = self._sites[si].slots
        cdef int pos, n = self._sites[si].n
        out = []
        group = None
        for pos in range(n):
            # (No out[-1]: the module is compiled with wraparound=False.)
            if pos == 0 or slots[pos].tier != slots[pos - 1].tier:
                group = []
                out.append(group)
            group.append(slots[pos].host)
        return out

    def active(self, s):
        return self._sites[self._site_id(s)].active

    def total_active(self):
        return self._total

    @property
    def shared(self):
        """The SharedCounters this table counts in, or None."""
        return self._shared

    def shared_active(self, s):
        cdef Py_ssize_t si = self._site_id(s)
        return self._shared._count(self._sites[si].slot) if self._shared is not None else 0

    def shared_host_active(self, h):
        cdef Py_ssize_t hi = self._host_id(h)
        return self._shared._count(self._hosts[hi].slot) if self._shared is not None else 0

    # -- the hot path ----------------------------------------------------------------------------

    cdef int _acquire(self, Py_ssize_t s, double now) noexcept:
        """acquire() for a valid site id: one pass over the site's slots, no Python objects."""
        cdef _rt_site *site = &self._sites[s]
        cdef _rt_slot *slots = site.slots
        cdef _rt_host *host
        cdef int n = site.n, last = site.last
        cdef int i = 0, j, tier, pick, fewest = 0, first_any, first_after
        cdef bint any_up = False
        if site.limit > 0 and site.active >= site.limit:
            return _RT_NO_SLOT
        while i < n:
            # Momentum: never go to a later group (higher preference) while this one has a
            # usable host.
            tier = slots[i].tier
            first_any = -1      # first usable position with the fewest connections
            first_after = -1    # ... and the first one after `last` (round-robin)
            j = i
            while j < n and slots[j].tier == tier:
                host = &self._hosts[slots[j].host]
                # Written as the spec's `not (down_until > now)` so NaN compares the same way.
                if not (host.down_until > now):
                    any_up = True
                    if host.limit == 0 or host.active < host.limit:
                        if first_any < 0 or host.active < fewest:
                            fewest = host.active
                            first_any = j
                            first_after = j if j > last else -1
                        elif host.active == fewest and first_after < 0 and j > last:
                            first_after = j
                j += 1
            if first_any >= 0:
                # Momentum: spread evenly: fewest connections, ties round-robin after `last`.
                pick = first_after if first_after >= 0 else first_any
                site.last = pick
                site.active += 1
                slots[pick].held += 1
                self._hosts[slots[pick].host].active += 1
                self._total += 1
                return slots[pick].host
            i = j
        return _RT_NO_SLOT if any_up else _RT_ALL_DOWN

    cdef int _acquire_shared(self, Py_ssize_t s, double now) noexcept:
        """acquire() with the relay-wide counts of the shared table (spec: the twin's doc)."""
        cdef SharedCounters sh = self._shared
        cdef int w = self._worker
        cdef _rt_site *site = &self._sites[s]
        cdef _rt_slot *slots = site.slots
        cdef _rt_host *host
        cdef int n = site.n, last = site.last
        cdef int i = 0, j, end, tier, pick, first_any, first_after, races = 0
        cdef long fewest = 0, c
        cdef bint any_up = False
        if not sh._acquire(site.slot, w, site.limit):
            return _RT_NO_SLOT
        while i < n:
            tier = slots[i].tier
            end = i
            while end < n and slots[end].tier == tier:
                end += 1
            while True:
                first_any = -1
                first_after = -1
                for j in range(i, end):
                    host = &self._hosts[slots[j].host]
                    if not (host.down_until > now):
                        any_up = True
                        c = sh._count(host.slot)
                        if host.limit == 0 or c < host.limit:
                            if first_any < 0 or c < fewest:
                                fewest = c
                                first_any = j
                                first_after = j if j > last else -1
                            elif c == fewest and first_after < 0 and j > last:
                                first_after = j
                if first_any < 0:
                    break
                pick = first_after if first_after >= 0 else first_any
                host = &self._hosts[slots[pick].host]
                if sh._acquire(host.slot, w, host.limit):
                    site.last = pick
                    site.active += 1
                    slots[pick].held += 1
                    host.active += 1
                    self._total += 1
                    return slots[pick].host
                races += 1  # another worker took its last slot meanwhile: look again
                if races > _RT_RACE_RETRIES:
                    sh._release(site.slot, w)
                    return _RT_NO_SLOT
            i = end
        sh._release(site.slot, w)
        return _RT_NO_SLOT if any_up else _RT_ALL_DOWN

    cdef int _release(self, Py_ssize_t s, Py_ssize_t h) noexcept:
        """release() for valid ids: 0 on success, -1 if h is not in s, -2 if nothing is held."""
        cdef _rt_site *site = &self._sites[s]
        cdef _rt_host *host = &self._hosts[h]
        cdef int pos
        for pos in range(site.n):
            if site.slots[pos].host == h:
                if site.slots[pos].held <= 0 or site.active <= 0 or host.active <= 0:
                    return -2
                site.slots[pos].held -= 1
                site.active -= 1
                host.active -= 1
                self._total -= 1
                if self._shared is not None:
                    self._shared._release(site.slot, self._worker)
                    self._shared._release(host.slot, self._worker)
                return 0
        return -1

    def acquire(self, s, double now):
        if self._shared is not None:
            return self._acquire_shared(_rt_id(s, self._n_sites, "site"), now)
        return self._acquire(_rt_id(s, self._n_sites, "site"), now)

    def release(self, s, h):
        cdef Py_ssize_t si = _rt_id(s, self._n_sites, "site")
        cdef Py_ssize_t hi = _rt_id(h, self._n_hosts, "host")
        cdef int rc = self._release(si, hi)
        if rc == -1:
            raise ValueError(f"host id {hi!r} is not in site {si!r}")
        if rc == -2:
            raise ValueError(f"release without an acquire: host id {hi!r} on site {si!r}")
