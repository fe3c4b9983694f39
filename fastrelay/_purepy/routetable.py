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
"""

from __future__ import annotations

NO_SLOT = -1
ALL_DOWN = -2


class RouteTable:
    def __init__(self) -> None:
        raise NotImplementedError("RouteTable: not written yet")
