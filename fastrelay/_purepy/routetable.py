"""Pure-Python twin of the route table: per-MX connection counting and host selection.

SPEC (the Cython version in fastrelay/_routetable.pxi must match it exactly). Sans-I/O: plain
values in, results out; time is passed in as `now` (seconds, float). Seed 004 (routes): "Momentum
never uses a higher preference MX if a lower preference MX is below its connection limit and is
considered reachable. If there are several MXs of the same (lowest available) preference, Momentum
attempts to open connections to all of them evenly, but when it hits a limit with a specific MX,
it will stop opening connections to that MX." KumoMTA keys limits by the set of MX hosts (a "site").

Module constants: NO_SLOT = -1 (every usable host, or the site, is at its limit: wait for a
release), ALL_DOWN = -2 (no host of the site is up: defer).

class RouteTable()
  host(key: str) -> int                 id of the host with this key ("ip:port", "lmtp:ip:port", ...),
                                        created on first use (ids are 0, 1, 2, ... in creation order)
  host_key(h: int) -> str
  set_host_limit(h: int, limit: int)    per-host connection limit (Host scope
                                        max_outbound_connections); 0 = unlimited (the default)
  site(groups: Sequence[Sequence[int]], limit: int = 0) -> int
        id of the site whose hosts are `groups`: the plan's tiers, already in order, most
        preferred first; each group is a list of host ids of equal preference (fastrelay.routing
        decides the order: route entries as listed, MX preference inside an entry, explicit
        pref=). The table never reorders groups and knows nothing of preference numbers. The
        same groups (same hosts in the same groups, groups in the same order; the order inside a
        group does not matter) give the same id, so domains that share MXs share limits. Sets
        the site's limit to `limit` (0 = unlimited) each call. Inside a group, hosts keep their
        order of first appearance in the call that made the site (the round-robin order).
  set_site_limit(s: int, limit: int)
  acquire(s: int, now: float) -> int    a host id, NO_SLOT or ALL_DOWN; on success the site's and the
                                        host's active counts go up by one
  release(s: int, h: int) -> None       give the slot back; ValueError if h is not in site s or a
                                        count would go below zero (a release without an acquire)
  mark_down(h: int, until: float)       avoid h until `until` (host_failure_retry)
  mark_up(h: int)
  is_down(h: int, now: float) -> bool   down_until(h) > now
  down_until(h: int) -> float           0.0 if never marked
  active(s: int) -> int; host_active(h: int) -> int; total_active() -> int (sum over hosts)
  shared                                the SharedCounters given, or None (see the end of this doc)
  shared_active(s: int) -> int; shared_host_active(h: int) -> int
  site_groups(s: int) -> list[list[int]]   the site's host ids, group by group, in its order
  site_limit(s: int) -> int; host_limit(h: int) -> int

acquire(s, now):
  1. If the site's limit > 0 and its active count >= limit: NO_SLOT.
  2. Walk the groups in the site's order (most preferred first). In a group, a host is up if not
     is_down(h, now); it is usable if up and (its limit is 0 or host_active(h) < its limit).
     In the first group that has a usable host, pick the usable host with the fewest active
     connections; break ties round-robin: the site remembers the position (in its host order) of
     the host it last picked, and among the tied hosts takes the first one after that position,
     wrapping around. Count it and return its id.
  3. If no group has a usable host: NO_SLOT if any host of the site is up, else ALL_DOWN.

Resolved details (both implementations follow them; the tests pin them down):
  - "Fewest active connections" compares host_active(h), the host's count over all sites: a
    connection to an MX is a connection whichever domain it carries.
  - Before a site's first pick its remembered position is -1, so the first tie goes to the first
    tied host in the site's order.
  - `now` and `until` are compared exactly as written (`down_until(h) > now`), so a NaN `now`
    or `until` means "up"; `now` is expected to be a monotonic clock reading >= 0.
  - release(s, h) needs a slot acquired *on site s* for host h that is still held (the table
    counts slots per (site, host) pair), so a release through another site that shares h is a
    ValueError even when h's own count is above zero.
  - Times (`now`, `until`) are converted like a C double argument, before anything else is
    checked: float, int or anything with __float__; else TypeError ("must be real number, ...").
  - Ids are ints (operator.index: bool counts as int; float or str is a TypeError). An id that
    names no host or site (negative, or >= the number created) raises ValueError, whatever its
    size. The error messages are part of the spec (the twins are compared message for message).
  - host(key) takes a str (else TypeError); a limit is an int in 0..MAX_LIMIT, else ValueError.
  - site(): `groups` is an iterable of iterables of host ids (lists, tuples, generators). A host
    given twice in one group counts once; a host in two groups is a ValueError (release(s, h)
    must name one slot list, and "which tier is it in" must have one answer). An empty group is
    a ValueError (a tier with no host is the caller's bug, not "skip it"). Checks run in this
    order: limit, then each group in turn (each host id in turn: the id, then a clash with an
    earlier group; then the group's emptiness), then "no group at all". A call that raises
    changes nothing.
  - release(s, h) checks the site id, then the host id, then membership, then the held count.

Shared counting across worker processes (issue 13): RouteTable(shared, worker) with a
SharedCounters (fastrelay/_purepy/shm.py) and this process's worker number makes every limit hold
for the whole relay. Each host gets the shared slot of "h:" + its key, each site the slot of "s:" +
its groups' host keys (sorted inside a group, groups in order, "," and "|" between), so the same
site in two workers (whose host ids differ) shares one count. Then acquire() follows the same rules
with the relay-wide counts in place of this table's: step 1 takes a site slot from the shared
table (refused: NO_SLOT); step 2 reads shared.count() for "usable" and "fewest" and takes the
picked host's shared slot (limit = its limit); if another worker took the last one meanwhile, the
group is looked at again with fresh counts, at most RACE_RETRIES times, then NO_SLOT (a later
group is never taken because of a race: the caller retries); with no pick the site slot is given
back. release() gives both shared slots back. active(), host_active(), total_active() stay this
process's counts; shared_active(s) and shared_host_active(h) are the relay's (0 without sharing).
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import index

NO_SLOT = -1
ALL_DOWN = -2

#: Largest accepted connection limit (the C version keeps limits and counts in C ints).
MAX_LIMIT = 2**31 - 1
#: With shared counters: how often acquire() looks at a group again after losing a race.
RACE_RETRIES = 8


def _check_limit(limit: object) -> int:
    value = index(limit)
    if not 0 <= value <= MAX_LIMIT:
        raise ValueError(f"limit must be in 0..{MAX_LIMIT}, got {value!r}")
    return value


def _as_float(value: object) -> float:
    """A time as a float, accepting what a C double argument accepts (float, int, __float__)."""
    kind = type(value)
    if kind is float:
        return value  # type: ignore[return-value]
    if hasattr(kind, "__float__") or hasattr(kind, "__index__"):
        return float(value)  # type: ignore[arg-type]
    raise TypeError(f"must be real number, not {kind.__name__}")


def _normalise_groups(groups: Iterable[Iterable[int]], n_hosts: int) -> list[list[int]]:
    """The site's groups with each host once, in order of first appearance, validated."""
    out: list[list[int]] = []
    group_of: dict[int, int] = {}
    for g, group in enumerate(groups):
        hosts: list[int] = []
        for h_obj in group:
            h = index(h_obj)
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


def _site_key(groups: list[list[int]]) -> tuple[frozenset[int], ...]:
    return tuple(frozenset(group) for group in groups)


class _Host:
    __slots__ = ("active", "down_until", "key", "limit", "slot")

    def __init__(self, key: str) -> None:
        self.key = key
        self.limit = 0
        self.active = 0
        self.down_until = 0.0
        self.slot = -1  # its slot in the shared counters, if any


class _Site:
    __slots__ = ("active", "groups", "held", "hosts", "last", "limit", "position", "slot")

    def __init__(self, groups: list[list[int]], limit: int) -> None:
        # Flattened in the caller's order: group 0's hosts, then group 1's, ...
        self.hosts = [h for group in groups for h in group]
        self.position = {h: pos for pos, h in enumerate(self.hosts)}
        self.held = [0] * len(self.hosts)  # slots held per position, for release() checks
        self.limit = limit
        self.active = 0
        self.last = -1  # position of the last pick: round-robin starts after it
        self.slot = -1  # its slot in the shared counters, if any
        # Groups as (start, end) position ranges, most preferred first.
        self.groups: list[tuple[int, int]] = []
        start = 0
        for group in groups:
            self.groups.append((start, start + len(group)))
            start += len(group)


class RouteTable:
    """Hosts, sites (sets of MX hosts sharing a limit) and their active connection counts."""

    def __init__(self, shared=None, worker: int = 0) -> None:
        if shared is not None:
            worker = index(worker)
            if not 0 <= worker < shared.nworkers:
                raise ValueError(f"unknown worker {worker!r}")
        self._shared = shared
        self._worker = worker
        self._hosts: list[_Host] = []
        self._host_ids: dict[str, int] = {}
        self._sites: list[_Site] = []
        self._site_ids: dict[tuple[frozenset[int], ...], int] = {}

    # -- lookups ---------------------------------------------------------------------------------

    def _host(self, h: object) -> _Host:
        i = index(h)
        if not 0 <= i < len(self._hosts):
            raise ValueError(f"unknown host id {i!r}")
        return self._hosts[i]

    def _site(self, s: object) -> _Site:
        i = index(s)
        if not 0 <= i < len(self._sites):
            raise ValueError(f"unknown site id {i!r}")
        return self._sites[i]

    # -- hosts -----------------------------------------------------------------------------------

    def host(self, key: str) -> int:
        if not isinstance(key, str):
            raise TypeError(f"host key must be str, not {type(key).__name__}")
        h = self._host_ids.get(key)
        if h is None:
            h = len(self._hosts)
            host = _Host(key)
            if self._shared is not None:
                host.slot = self._shared.slot("h:" + key)
            self._hosts.append(host)
            self._host_ids[key] = h
        return h

    def host_key(self, h: int) -> str:
        return self._host(h).key

    def set_host_limit(self, h: int, limit: int) -> None:
        host = self._host(h)
        host.limit = _check_limit(limit)

    def host_limit(self, h: int) -> int:
        return self._host(h).limit

    def host_active(self, h: int) -> int:
        return self._host(h).active

    def mark_down(self, h: int, until: float) -> None:
        until = _as_float(until)
        self._host(h).down_until = until

    def mark_up(self, h: int) -> None:
        self._host(h).down_until = 0.0

    def is_down(self, h: int, now: float) -> bool:
        now = _as_float(now)
        return self._host(h).down_until > now

    def down_until(self, h: int) -> float:
        return self._host(h).down_until

    # -- sites -----------------------------------------------------------------------------------

    def site(self, groups: Iterable[Iterable[int]], limit: int = 0) -> int:
        limit = _check_limit(limit)
        normal = _normalise_groups(groups, len(self._hosts))
        key = _site_key(normal)
        s = self._site_ids.get(key)
        if s is None:
            s = len(self._sites)
            site = _Site(normal, limit)
            if self._shared is not None:
                site.slot = self._shared.slot(self._shared_site_key(normal))
            self._sites.append(site)
            self._site_ids[key] = s
        else:
            self._sites[s].limit = limit
        return s

    def _shared_site_key(self, groups: list[list[int]]) -> str:
        return "s:" + "|".join(",".join(sorted(self._hosts[h].key for h in group)) for group in groups)

    @property
    def shared(self):
        """The SharedCounters this table counts in, or None."""
        return self._shared

    def shared_active(self, s: int) -> int:
        site = self._site(s)
        return self._shared.count(site.slot) if self._shared is not None else 0

    def shared_host_active(self, h: int) -> int:
        host = self._host(h)
        return self._shared.count(host.slot) if self._shared is not None else 0

    def set_site_limit(self, s: int, limit: int) -> None:
        site = self._site(s)
        site.limit = _check_limit(limit)

    def site_limit(self, s: int) -> int:
        return self._site(s).limit

    def site_groups(self, s: int) -> list[list[int]]:
        site = self._site(s)
        return [site.hosts[start:end] for start, end in site.groups]

    def active(self, s: int) -> int:
        return self._site(s).active

    def total_active(self) -> int:
        return sum(host.active for host in self._hosts)

    # -- the hot path ----------------------------------------------------------------------------

    def acquire(self, s: int, now: float) -> int:
        now = _as_float(now)
        site = self._site(s)
        if self._shared is not None:
            return self._acquire_shared(site, now)
        if site.limit and site.active >= site.limit:
            return NO_SLOT
        any_up = False
        for start, end in site.groups:
            # Momentum: never go to a later group (higher preference) while this one has a
            # usable host.
            usable = []
            for pos in range(start, end):
                host = self._hosts[site.hosts[pos]]
                if host.down_until > now:
                    continue
                any_up = True
                if host.limit == 0 or host.active < host.limit:
                    usable.append(pos)
            if not usable:
                continue
            # Momentum: spread evenly over equal preferences: fewest connections first, ties
            # round-robin from just after the site's last pick.
            fewest = min(self._hosts[site.hosts[pos]].active for pos in usable)
            tied = [pos for pos in usable if self._hosts[site.hosts[pos]].active == fewest]
            pick = next((pos for pos in tied if pos > site.last), tied[0])
            site.last = pick
            site.active += 1
            site.held[pick] += 1
            h = site.hosts[pick]
            self._hosts[h].active += 1
            return h
        return NO_SLOT if any_up else ALL_DOWN

    def _acquire_shared(self, site: _Site, now: float) -> int:
        """acquire() with the relay-wide counts (see the module doc)."""
        sh, w = self._shared, self._worker
        if not sh.acquire(site.slot, w, site.limit):
            return NO_SLOT
        any_up = False
        races = 0
        for start, end in site.groups:
            while True:
                usable = []
                counts = {}
                for pos in range(start, end):
                    host = self._hosts[site.hosts[pos]]
                    if host.down_until > now:
                        continue
                    any_up = True
                    c = sh.count(host.slot)
                    if host.limit == 0 or c < host.limit:
                        usable.append(pos)
                        counts[pos] = c
                if not usable:
                    break
                fewest = min(counts.values())
                tied = [pos for pos in usable if counts[pos] == fewest]
                pick = next((pos for pos in tied if pos > site.last), tied[0])
                h = site.hosts[pick]
                host = self._hosts[h]
                if sh.acquire(host.slot, w, host.limit):
                    site.last = pick
                    site.active += 1
                    site.held[pick] += 1
                    host.active += 1
                    return h
                races += 1  # another worker took its last slot meanwhile: look again
                if races > RACE_RETRIES:
                    sh.release(site.slot, w)
                    return NO_SLOT
        sh.release(site.slot, w)
        return NO_SLOT if any_up else ALL_DOWN

    def release(self, s: int, h: int) -> None:
        site = self._site(s)
        host = self._host(h)
        pos = site.position.get(index(h))
        if pos is None:
            raise ValueError(f"host id {index(h)!r} is not in site {index(s)!r}")
        if site.held[pos] <= 0 or site.active <= 0 or host.active <= 0:
            raise ValueError(f"release without an acquire: host id {index(h)!r} on site {index(s)!r}")
        site.held[pos] -= 1
        site.active -= 1
        host.active -= 1
        if self._shared is not None:
            self._shared.release(site.slot, self._worker)
            self._shared.release(host.slot, self._worker)
