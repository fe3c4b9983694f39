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
  site(hosts: Sequence[tuple[int, int]], limit: int = 0) -> int
        id of the site made of these (host id, preference) pairs; the same set of pairs, in any
        order, gives the same id (domains that share MXs share limits). Sets the site's limit to
        `limit` (0 = unlimited) each call. Within a site, hosts are ordered by preference (lower
        first), then by the order of first appearance in the first call that made the site.
        An empty list or an unknown host id raises ValueError.
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
  site_hosts(s: int) -> list[tuple[int, int]]   (host id, preference) in the site's order
  site_limit(s: int) -> int; host_limit(h: int) -> int

acquire(s, now):
  1. If the site's limit > 0 and its active count >= limit: NO_SLOT.
  2. Walk the preference groups, lowest preference first. In a group, a host is up if not
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
  - host(key) takes a str (else TypeError); a limit is an int in 0..MAX_LIMIT and a preference an
    int in 0..MAX_PREFERENCE (the 16-bit MX preference field), else ValueError.
  - site(): identical pairs given twice count once; one host with two different preferences in
    one site is a ValueError (release(s, h) must name one slot list). Checks run in this order:
    limit, then each pair in turn (host id, then preference, then a clash with an earlier pair),
    then "empty". A call that raises changes nothing.
  - release(s, h) checks the site id, then the host id, then membership, then the held count.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import index

NO_SLOT = -1
ALL_DOWN = -2

#: Largest accepted connection limit (the C version keeps limits and counts in C ints).
MAX_LIMIT = 2**31 - 1
#: Largest accepted preference: MX preference is a 16-bit field (RFC 1035 3.3.9).
MAX_PREFERENCE = 65535


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


def _normalise_pairs(hosts: Iterable[tuple[int, int]], n_hosts: int) -> list[tuple[int, int]]:
    """The site's distinct (host id, preference) pairs in order of first appearance, validated."""
    pairs: list[tuple[int, int]] = []
    pref_of: dict[int, int] = {}
    for h_obj, pref_obj in hosts:
        h = index(h_obj)
        pref = index(pref_obj)
        if not 0 <= h < n_hosts:
            raise ValueError(f"unknown host id {h!r}")
        if not 0 <= pref <= MAX_PREFERENCE:
            raise ValueError(f"preference must be in 0..{MAX_PREFERENCE}, got {pref!r}")
        seen = pref_of.get(h)
        if seen is None:
            pref_of[h] = pref
            pairs.append((h, pref))
        elif seen != pref:
            raise ValueError(f"host id {h!r} given twice with preferences {seen!r} and {pref!r}")
    if not pairs:
        raise ValueError("a site needs at least one host")
    return pairs


class _Host:
    __slots__ = ("active", "down_until", "key", "limit")

    def __init__(self, key: str) -> None:
        self.key = key
        self.limit = 0
        self.active = 0
        self.down_until = 0.0


class _Site:
    __slots__ = ("active", "groups", "held", "hosts", "last", "limit", "position", "prefs")

    def __init__(self, pairs: list[tuple[int, int]], limit: int) -> None:
        # Stable sort: equal preferences keep their order of first appearance (the spec's order).
        ordered = sorted(pairs, key=lambda pair: pair[1])
        self.hosts = [h for h, _ in ordered]
        self.prefs = [pref for _, pref in ordered]
        self.position = {h: pos for pos, h in enumerate(self.hosts)}
        self.held = [0] * len(ordered)  # slots held per position, for release() checks
        self.limit = limit
        self.active = 0
        self.last = -1  # position of the last pick: round-robin starts after it
        # Preference groups as (start, end) position ranges, lowest preference first.
        self.groups: list[tuple[int, int]] = []
        start = 0
        for pos in range(1, len(ordered) + 1):
            if pos == len(ordered) or self.prefs[pos] != self.prefs[start]:
                self.groups.append((start, pos))
                start = pos


class RouteTable:
    """Hosts, sites (sets of MX hosts sharing a limit) and their active connection counts."""

    def __init__(self) -> None:
        self._hosts: list[_Host] = []
        self._host_ids: dict[str, int] = {}
        self._sites: list[_Site] = []
        self._site_ids: dict[frozenset[tuple[int, int]], int] = {}

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
            self._hosts.append(_Host(key))
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

    def site(self, hosts: Iterable[tuple[int, int]], limit: int = 0) -> int:
        limit = _check_limit(limit)
        pairs = _normalise_pairs(hosts, len(self._hosts))
        key = frozenset(pairs)
        s = self._site_ids.get(key)
        if s is None:
            s = len(self._sites)
            self._sites.append(_Site(pairs, limit))
            self._site_ids[key] = s
        else:
            self._sites[s].limit = limit
        return s

    def set_site_limit(self, s: int, limit: int) -> None:
        site = self._site(s)
        site.limit = _check_limit(limit)

    def site_limit(self, s: int) -> int:
        return self._site(s).limit

    def site_hosts(self, s: int) -> list[tuple[int, int]]:
        site = self._site(s)
        return list(zip(site.hosts, site.prefs, strict=True))

    def active(self, s: int) -> int:
        return self._site(s).active

    def total_active(self) -> int:
        return sum(host.active for host in self._hosts)

    # -- the hot path ----------------------------------------------------------------------------

    def acquire(self, s: int, now: float) -> int:
        now = _as_float(now)
        site = self._site(s)
        if site.limit and site.active >= site.limit:
            return NO_SLOT
        any_up = False
        for start, end in site.groups:
            # Momentum: never go to a higher preference while this one has a usable host.
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
