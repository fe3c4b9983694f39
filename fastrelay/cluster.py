"""Limits shared by the nodes of a cluster through Redis: connection leases and rate throttles.

KumoMTA's model, on an existing engine rather than a home-made one (issue #14):
- A connection slot is a *lease*: a member of a sorted set per limit key, scored by its expiry time
  on the Redis server's clock. The holder renews it while the connection is open; a node that dies
  stops renewing, and its slots come back by themselves within one lease time.
- A throttle ("N" per second, or "N/S": N per S seconds, Momentum's
  Cluster_Outbound_Throttle_Messages / _Connections) is GCRA without burst, as the local throttles
  of fastrelay.shaping (one event every S/N), in one server-side script: one round trip per
  decision, no clock of ours involved.
- When Redis is unreachable the node keeps delivering under a conservative local share: the limit
  divided by the number of nodes it last saw alive (at least 1). It logs that once, reports it in
  `health()`, and goes back to Redis when Redis answers again.

Sans-policy: this module knows nothing of domains or MX hosts. Callers name a limit by a key
(e.g. "conn:domain:example.com") and pass the limit and the rate they read from the conf.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from dataclasses import dataclass

from fastrelay.config.types import Rate
from fastrelay.limits import CLUSTER_LEASE_TIME
from fastrelay.shaping import LocalShaper

__all__ = ["ClusterLimits", "Lease", "Rate"]

log = logging.getLogger("fastrelay.cluster")

#: Held leases are renewed, and this node's heartbeat refreshed, this many times per lease time.
RENEWALS_PER_LEASE = 3
#: A node not heard from for this many lease times no longer counts as alive for the local share.
NODE_LEASES = 3
#: Seconds one Redis command may take before the node falls back to its local share.
REDIS_TIMEOUT = 1.0
#: While in fallback, how often Redis is tried again.
RECONNECT_INTERVAL = 2.0
#: A destination refused a cluster slot asks again after this long (another node's release is not
#: announced to us; a lease frees at the latest when it expires).
SLOT_POLL = 0.1

# KEYS[1] = the lease set; ARGV = limit, lease id, ttl ms. Expired leases are dropped first, so a
# dead node's slots are free again without anybody's help. Returns 1 (granted) or 0 (at limit).
_ACQUIRE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
return 1
"""

# KEYS = lease sets, ARGV[1] = ttl ms, ARGV[2..] = the lease ids (one per key). Renews only
# leases that still exist (XX): a lease that expired meanwhile is not resurrected over the limit.
# Returns how many were renewed.
_RENEW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[1])
local n = 0
for i, key in ipairs(KEYS) do
  n = n + redis.call('ZADD', key, 'XX', 'CH', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl * 2)
end
return n
"""

# GCRA (generic cell rate algorithm) with no burst tolerance, as the local throttles of
# fastrelay.shaping: a rate of N per S lets one event through every S/N, so no window of S holds
# more than N, what Momentum's throttles promise ("no more than the specified number ... in a given
# second"). KEYS[1] = the throttle's theoretical arrival time (ms); ARGV = count, period ms.
# Returns 0 if the event may pass now (and counts it), else the ms to wait.
_THROTTLE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local interval = tonumber(ARGV[2]) / tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat > now then return math.ceil(tat - now) end
redis.call('SET', KEYS[1], tostring(now + interval), 'PX', math.ceil(interval) + 1000)
return 0
"""


@dataclass
class Lease:
    """One connection slot held under a limit key; give it back with `ClusterLimits.release`."""

    key: str
    id: str
    local: bool  # taken from the local share while Redis was unreachable
    released: bool = False


class ClusterLimits:
    """Leases and throttles in Redis, with a conservative local share when Redis is unreachable."""

    def __init__(self, url: str, node: str | None = None, *, prefix: str = "fastrelay:",
                 lease_ttl: float = CLUSTER_LEASE_TIME, timeout: float = REDIS_TIMEOUT, workers: int = 1):
        import redis.asyncio as aioredis

        self.url = url
        self.node = node or socket.gethostname()
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        # Worker processes of this node (issue 13), each with its own ClusterLimits: in fallback
        # the node's share is split between them, so the node as a whole keeps to its share.
        self.workers = max(1, workers)
        self.timeout = timeout
        self._redis = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                        retry_on_timeout=False)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._throttle = self._redis.register_script(_THROTTLE)
        self._ids = itertools.count(1)
        self._pid = os.getpid()
        self._held: dict[str, Lease] = {}  # lease id -> lease, renewed while held
        self._local_active: dict[str, int] = {}  # key -> slots taken from the local share
        self._local_throttles = LocalShaper()  # the fallback share's throttles: the same GCRA
        self._live_nodes = 1
        self._fallback_since: float | None = None
        self._next_retry = 0.0
        self._task: asyncio.Task | None = None
        self.stats = {"redis_errors": 0, "fallback_decisions": 0, "leases_lost": 0}

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self._heartbeat()
        self._task = asyncio.ensure_future(self._renew_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            held = [lease for lease in self._held.values() if not lease.local]
            if held:
                pipe = self._redis.pipeline(transaction=False)
                for lease in held:
                    pipe.zrem(self._k(lease.key), lease.id)
                await asyncio.wait_for(pipe.execute(), self.timeout)
            await asyncio.wait_for(self._redis.zrem(self._k("nodes"), self.node), self.timeout)
        except Exception:  # Redis gone: the leases expire on their own
            pass
        self._held.clear()
        await self._redis.aclose()

    # --- state --------------------------------------------------------------------------------
    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and decisions use the local share."""
        return self._fallback_since is not None

    @property
    def live_nodes(self) -> int:
        return self._live_nodes

    def health(self) -> dict:
        return {
            "redis": "unreachable" if self.degraded else "ok",
            "node": self.node,
            "live_nodes": self._live_nodes,
            "leases_held": len(self._held),
            **self.stats,
        }

    def local_share(self, limit: int) -> int:
        """What this process may use of a cluster-wide `limit` on its own: the node's share (the
        limit over the live nodes) over its worker processes, at least 1."""
        return max(1, limit // (max(1, self._live_nodes) * self.workers))

    def _k(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def _redis_down(self, e: BaseException) -> None:
        self.stats["redis_errors"] += 1
        if self._fallback_since is None:
            self._fallback_since = time.monotonic()
            log.warning("cluster: Redis at %s is unreachable (%s); using a local share of each limit "
                        "(1/%d) until it answers", self.url, type(e).__name__, self._live_nodes)
        self._next_retry = time.monotonic() + RECONNECT_INTERVAL

    def _redis_up(self) -> None:
        if self._fallback_since is not None:
            log.warning("cluster: Redis at %s answers again after %.0f s; shared limits restored",
                        self.url, time.monotonic() - self._fallback_since)
            self._fallback_since = None

    def _use_redis(self) -> bool:
        return self._fallback_since is None or time.monotonic() >= self._next_retry

    async def _call(self, coro):
        return await asyncio.wait_for(coro, self.timeout)

    # --- connection leases --------------------------------------------------------------------
    async def acquire(self, key: str, limit: int) -> Lease | None:
        """A lease under `key`'s cluster-wide `limit`, or None when the cluster is at the limit.
        A limit <= 0 means unlimited (Momentum's -1): a local lease that counts nothing."""
        # Unique across the processes of one node too (worker processes share the node name).
        lease_id = f"{self.node}:{self._pid}:{next(self._ids)}"
        if limit <= 0:
            return Lease(key, lease_id, local=True, released=True)
        if self._use_redis():
            try:
                ok = await self._call(self._acquire(keys=[self._k(key)],
                                                    args=[limit, lease_id, int(self.lease_ttl * 1000)]))
            except Exception as e:
                self._redis_down(e)
            else:
                self._redis_up()
                if not ok:
                    return None
                lease = Lease(key, lease_id, local=False)
                self._held[lease_id] = lease
                return lease
        # Fallback: never more than this node's share of the limit (issue #14).
        self.stats["fallback_decisions"] += 1
        active = self._local_active.get(key, 0)
        if active >= self.local_share(limit):
            return None
        self._local_active[key] = active + 1
        return Lease(key, lease_id, local=True)

    async def release(self, lease: Lease) -> None:
        """Give the slot back (idempotent). If Redis is unreachable the lease simply expires."""
        if lease.released:
            return
        lease.released = True
        if lease.local:
            n = self._local_active.get(lease.key, 0) - 1
            if n > 0:
                self._local_active[lease.key] = n
            else:
                self._local_active.pop(lease.key, None)
            return
        self._held.pop(lease.id, None)
        try:
            await self._call(self._redis.zrem(self._k(lease.key), lease.id))
        except Exception as e:
            self._redis_down(e)

    def held(self) -> int:
        """Leases (Redis and local) this node holds now; 0 at teardown."""
        return len(self._held) + sum(self._local_active.values())

    # --- throttles ----------------------------------------------------------------------------
    async def throttle(self, key: str, rate: Rate) -> float:
        """0.0 if one event may pass now under `key`'s cluster-wide rate (it is counted), else the
        seconds to wait before asking again. In fallback each node gets rate/live_nodes."""
        if self._use_redis():
            try:
                wait_ms = await self._call(self._throttle(keys=[self._k("rate:" + key)],
                                                          args=[rate.count, int(rate.period * 1000)]))
            except Exception as e:
                self._redis_down(e)
            else:
                self._redis_up()
                return int(wait_ms) / 1000.0
        self.stats["fallback_decisions"] += 1
        share = Rate(self.local_share(rate.count), rate.period)
        return self._local_throttles.take(key, share, time.monotonic())

    async def wait_throttle(self, key: str, rate: Rate) -> float:
        """Wait until `key`'s throttle lets one event pass; returns the seconds waited."""
        waited = 0.0
        while True:
            wait = await self.throttle(key, rate)
            if wait <= 0:
                return waited
            await asyncio.sleep(wait)
            waited += wait

    # --- renewal and liveness -----------------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Say this node is alive and count the nodes heard from within NODE_LEASES lease times."""
        nodes = self._k("nodes")
        try:
            pipe = self._redis.pipeline(transaction=False)
            now = time.time()
            pipe.zadd(nodes, {self.node: now})
            pipe.zremrangebyscore(nodes, "-inf", now - NODE_LEASES * self.lease_ttl)
            pipe.zcard(nodes)
            _, _, n = await self._call(pipe.execute())
        except Exception as e:
            self._redis_down(e)
            return
        self._redis_up()
        self._live_nodes = max(1, int(n))

    async def renew(self) -> None:
        """Renew every held lease in one round trip (batched)."""
        held = [lease for lease in self._held.values() if not lease.released and not lease.local]
        if not held:
            return
        try:
            renewed = await self._call(self._renew(keys=[self._k(lease.key) for lease in held],
                                                   args=[int(self.lease_ttl * 1000)] + [lease.id for lease in held]))
        except Exception as e:
            self._redis_down(e)
            return
        self._redis_up()
        if int(renewed) < len(held):
            # A lease expired before it was renewed (Redis was away longer than its TTL): the
            # connection goes on, but the cluster no longer counts it. Say so; never hide it.
            self.stats["leases_lost"] += len(held) - int(renewed)
            log.warning("cluster: %d connection lease(s) expired before renewal", len(held) - int(renewed))

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / RENEWALS_PER_LEASE)
            await self._heartbeat()
            await self.renew()


@dataclass
class Admission:
    """The cluster's answer for one new connection: admitted with these leases (retry_in == 0),
    or not yet (retry_in > 0 seconds), because a limit is full or the connection throttle waits."""

    leases: list[Lease]
    retry_in: float
    reason: str = ""  # "", "limit" or "throttle"


class ClusterGate:
    """What the scheduler asks before a connection and before each message: the conf's Cluster_*
    options (Momentum's names and precedence) turned into lease keys and throttle keys."""

    def __init__(self, cfg, limits: ClusterLimits):
        self.cfg = cfg
        self.limits = limits

    def _limits_for(self, domain: str, binding: str, mx: str) -> list[tuple[str, int]]:
        out = []
        host = self.cfg.host_lookup("Cluster_Max_Outbound_Connections", mx) if mx else None
        if host is not None and host.value > 0:
            # In Host scope it limits connections *to* that MX, whoever's mail they carry.
            out.append((f"conn:host:{mx.lower().rstrip('.')}", host.value))
        limit = self.cfg.get("Cluster_Max_Outbound_Connections", domain, binding)
        if limit > 0:
            out.append((f"conn:{binding}::{domain}", limit))
        return out

    def _throttle(self, option: str, domain: str, binding: str) -> tuple[str, Rate] | None:
        s = self.cfg.lookup(option, domain, binding)
        if s.value is None:
            return None
        # By reference: the throttle is the scope that sets it, so every domain falling back to a
        # global throttle shares it, and a Domain's own throttle is its own.
        return f"{option.lower()}:{s.scope}", s.value

    async def open_connection(self, domain: str, binding: str, mx: str) -> Admission:
        """Leases for one new connection to MX `mx` for (domain, binding), under every cluster
        limit that applies, and one token of the connection throttle; all or nothing."""
        leases: list[Lease] = []
        for key, limit in self._limits_for(domain, binding, mx):
            lease = await self.limits.acquire(key, limit)
            if lease is None:
                await self.release(leases)
                return Admission([], SLOT_POLL, "limit")
            leases.append(lease)
        th = self._throttle("Cluster_Outbound_Throttle_Connections", domain, binding)
        if th is not None:
            wait = await self.limits.throttle(*th)
            if wait > 0:
                await self.release(leases)
                return Admission([], wait, "throttle")
        return Admission(leases, 0.0)

    async def before_message(self, domain: str, binding: str) -> float:
        """Wait for the message throttle of (domain, binding); returns the seconds waited."""
        th = self._throttle("Cluster_Outbound_Throttle_Messages", domain, binding)
        if th is None:
            return 0.0
        return await self.limits.wait_throttle(*th)

    async def release(self, leases: list[Lease]) -> None:
        for lease in leases:
            await self.limits.release(lease)


# --- drain to a peer ------------------------------------------------------------------------------
def drain(cfg, route, timeout: float, use_uvloop: bool = True) -> int:
    """`fastrelay drain --to PEER`: open this node's spool (the relay must be stopped: the spool's
    lock says so otherwise), move every queued message to the XFER peer `route`, and exit.
    0 when the spool is empty, 1 when messages are left (they stay queued here)."""
    from fastrelay.relay import Relay, StartupError

    async def go() -> int:
        relay = Relay(cfg, drain_to=route)
        try:
            await relay.start()
        except StartupError as e:
            log.error("cannot drain: %s", e)
            await relay.stop()
            return 1
        total = len(relay.queue.items)
        log.info("draining %d messages to %s", total, route.text)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        try:
            while relay.queue.items and loop.time() < end:
                await asyncio.sleep(0.05)
            left = len(relay.queue.items)
        finally:
            await relay.stop()
        if left:
            log.error("drain to %s: %d of %d messages moved; %d left in the spool (run it again)",
                      route.text, total - left, total, left)
            return 1
        log.info("drain to %s: all %d messages moved", route.text, total)
        return 0

    if use_uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(go())
    finally:
        loop.close()
