"""/metrics in Prometheus format (prometheus_client), and the recent history the status page draws.

One registry per relay (not the process-global one), so several relays in one process (tests)
never mix. Counts come from the mainlog's records (fastrelay.mainlog.MainLog.observers): the one
place every reception and outcome is already written, so the numbers agree with the log.

Domain labels are bounded (issue 12: "top N plus other, so label cardinality cannot explode"):
at each scrape, free label slots (Admin_Domain_Labels of them) go to the busiest domains not yet
labelled, and a labelled domain keeps its label for the life of the process, so its counter never
goes backwards; everything else is summed under domain="other". Exact per-domain counts are kept
for at most DOMAIN_TRACK_FACTOR times as many domains; beyond that, new domains count as other
from the start.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import time
import weakref
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fastrelay.admin.queueapi import STATES

OTHER = "other"
DOMAIN_TRACK_FACTOR = 20
EVENTS = {"R": "received", "D": "delivered", "T": "deferred", "P": "bounced", "X": "transferred"}
# The status page's history: one sample every SAMPLE_EVERY seconds, HISTORY samples (10 minutes).
SAMPLE_EVERY = 5.0
HISTORY = 120
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)

_BY_RELAY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class DomainCounts:
    """Counts per (event, binding, domain), with at most `labels` domains named in the output."""

    def __init__(self, labels: int):
        self.labels = labels
        self.track = labels * DOMAIN_TRACK_FACTOR
        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.per_domain: collections.Counter[str] = collections.Counter()
        self.labelled: set[str] = set()

    def add(self, event: str, binding: str, domain: str) -> None:
        if domain not in self.per_domain and len(self.per_domain) >= self.track:
            domain = OTHER
        self.per_domain[domain] += 1
        self.counts[(event, binding, domain)] += 1

    def rows(self) -> dict[tuple[str, str, str], int]:
        free = self.labels - len(self.labelled)
        if free > 0:
            for d, _ in self.per_domain.most_common():
                if free <= 0:
                    break
                if d != OTHER and d not in self.labelled:
                    self.labelled.add(d)
                    free -= 1
        out: dict[tuple[str, str, str], int] = collections.defaultdict(int)
        for (ev, b, d), n in self.counts.items():
            out[(ev, b, d if d in self.labelled else OTHER)] += n
        return out


class RelayMetrics:
    def __init__(self, relay: Any):
        self.relay = weakref.proxy(relay)
        self.registry = CollectorRegistry(auto_describe=False)
        self.events = DomainCounts(relay.cfg.get("Admin_Domain_Labels"))
        self.spool_commit = Histogram("fastrelay_spool_commit_seconds", "Time to make received mail durable "
                                      "(one group commit, fsync included)", registry=self.registry,
                                      buckets=LATENCY_BUCKETS)
        self.delivery = Histogram("fastrelay_delivery_latency_seconds", "From reception to delivery (or "
                                  "transfer) of each recipient", registry=self.registry, buckets=DELIVERY_BUCKETS)
        self.dns_errors = Counter("fastrelay_dns_errors", "DNS lookups that failed, by kind (temporary: "
                                  "SERVFAIL or timeout; notfound: NXDOMAIN)", ["kind"], registry=self.registry)
        self.throttle_wait = Histogram("fastrelay_throttle_wait_seconds", "Time deliveries waited for a rate "
                                       "throttle", registry=self.registry, buckets=LATENCY_BUCKETS)
        self.registry.register(_Collector(self))
        self.history: collections.deque[dict] = collections.deque(maxlen=HISTORY)
        self._totals = collections.Counter()
        self._last = collections.Counter()
        self._timer: asyncio.TimerHandle | None = None
        self.users = 0
        relay.mainlog.observers.append(self.observe)
        self._wrap_spool(relay)
        self._wrap_dns(relay)
        self._sample()

    # --- feeds ---------------------------------------------------------------------------------
    def observe(self, kind: str, env: Any, rcpt: str | None) -> None:
        ev = EVENTS.get(kind)
        if ev is None:
            return
        self.events.add(ev, env.binding, env.domain)
        self._totals[(ev, env.binding)] += 1
        if kind in ("D", "X") and env.received_at:
            self.delivery.observe(max(0.0, time.time() - env.received_at))

    def _wrap_spool(self, relay: Any) -> None:
        spool = relay.spool
        for name in ("add", "add_once"):
            inner = getattr(spool, name, None)
            if inner is None or getattr(inner, "_metered", False):
                continue

            async def timed(*a: Any, _inner: Any = inner, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return await _inner(*a, **kw)
                finally:
                    self.spool_commit.observe(time.perf_counter() - t0)

            timed._metered = True  # type: ignore[attr-defined]
            setattr(spool, name, timed)

    def _wrap_dns(self, relay: Any) -> None:
        from fastrelay.dns import DNSNotFound, DNSTempError

        res = relay.resolver
        if res is None:
            return
        for name in ("mx", "addresses"):
            inner = getattr(res, name, None)
            if inner is None or getattr(inner, "_metered", False):
                continue

            async def counted(*a: Any, _inner: Any = inner, **kw: Any) -> Any:
                try:
                    return await _inner(*a, **kw)
                except DNSNotFound:
                    self.dns_errors.labels("notfound").inc()
                    raise
                except DNSTempError:
                    self.dns_errors.labels("temporary").inc()
                    raise

            counted._metered = True  # type: ignore[attr-defined]
            setattr(res, name, counted)

    # --- state read at scrape time ---------------------------------------------------------------
    def queue_states(self) -> dict[str, int]:
        q = getattr(self.relay, "queue", None)
        out = dict.fromkeys(STATES, 0)
        if q is None:
            return out
        now = time.time()
        for it in q.items.values():
            out[q.api_state(it, now)] += 1
        return out

    def connections(self) -> dict[str, int]:
        q = getattr(self.relay, "queue", None)
        return {"inbound": sum(len(s.sessions) for s in self.relay.smtp_servers),
                "outbound": sum(d.sessions for d in q.dests.values()) if q is not None else 0}

    def spool_disk(self) -> dict[str, int]:
        d = self.relay.cfg.spool_dir
        try:
            du = shutil.disk_usage(d)
        except OSError:
            return {"spool_bytes": 0, "free_bytes": 0, "total_bytes": 0}
        used = 0
        try:
            for e in os.scandir(d):
                if e.is_file(follow_symlinks=False):
                    used += e.stat().st_size
        except OSError:
            pass
        return {"spool_bytes": used, "free_bytes": du.free, "total_bytes": du.total}

    def _sample(self) -> None:
        """One history point: queue by state and the events since the last point."""
        try:
            delta = {k: n - self._last[k] for k, n in self._totals.items() if n != self._last[k]}
            self._last = collections.Counter(self._totals)
            events = dict.fromkeys(EVENTS.values(), 0)
            bindings: dict[str, dict[str, int]] = {}
            for (ev, b), n in delta.items():
                events[ev] += n
                bindings.setdefault(b, dict.fromkeys(EVENTS.values(), 0))[ev] += n
            self.history.append({"t": round(time.time(), 3), "queue": self.queue_states(), "events": events,
                                 "bindings": bindings, "interval": SAMPLE_EVERY})
            self._timer = asyncio.get_running_loop().call_later(SAMPLE_EVERY, self._sample)
        except (RuntimeError, ReferenceError):  # no loop any more, or the relay is gone
            self._timer = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self.relay.mainlog.observers.remove(self.observe)
        except (ValueError, ReferenceError, AttributeError):
            pass


class _Collector:
    """What is read from the relay at each scrape rather than counted as it happens."""

    def __init__(self, m: RelayMetrics):
        self.m = m

    def collect(self) -> Any:
        m = self.m
        c = CounterMetricFamily("fastrelay_messages", "Receptions (per spool entry) and outcomes (per recipient) "
                                "by event, binding and domain (busiest domains by name, the rest as other)",
                                labels=["event", "binding", "domain"])
        for (ev, b, d), n in sorted(m.events.rows().items()):
            c.add_metric([ev, b, d], n)
        yield c
        g = GaugeMetricFamily("fastrelay_queue_messages", "Queued messages by state", labels=["state"])
        for st, n in m.queue_states().items():
            g.add_metric([st], n)
        yield g
        g = GaugeMetricFamily("fastrelay_connections", "Open SMTP connections: inbound sessions and outbound "
                              "delivery sessions", labels=["direction"])
        for k, n in m.connections().items():
            g.add_metric([k], n)
        yield g
        c = CounterMetricFamily("fastrelay_connections_opened", "Connections opened since start",
                                labels=["direction"])
        q = getattr(m.relay, "queue", None)
        c.add_metric(["inbound"], sum(s.stats.get("connections", 0) for s in m.relay.smtp_servers))
        c.add_metric(["outbound"], q.stats.get("sessions", 0) if q is not None else 0)
        yield c
        disk = m.spool_disk()
        g = GaugeMetricFamily("fastrelay_spool_bytes", "Size of the spool's files")
        g.add_metric([], disk["spool_bytes"])
        yield g
        g = GaugeMetricFamily("fastrelay_spool_free_bytes", "Free space on the spool's filesystem")
        g.add_metric([], disk["free_bytes"])
        yield g
        claims = getattr(m.relay, "claims", None)
        if claims is not None:  # Workers > 1 with XFER (fastrelay.xfer.claims): what the claim table decided
            c = CounterMetricFamily("fastrelay_xfer_claims", "XFER transfers claimed relay-wide before they are "
                                    "stored (Workers > 1), keys found already done, transfers refused 503 "
                                    "in_progress while another worker stored them, and what start-up settled",
                                    labels=["event"])
            for ev, n in claims.stats.items():
                c.add_metric([ev], n)
            yield c
        cluster = getattr(m.relay, "cluster", None)
        if cluster is not None:  # docs/cluster.md: Redis unreachable = the local share is in force
            h = cluster.health()
            g = GaugeMetricFamily("fastrelay_cluster_redis_up", "1 while the cluster's Redis answers, 0 while "
                                  "limits use this node's local share")
            g.add_metric([], 0 if cluster.degraded else 1)
            yield g
            g = GaugeMetricFamily("fastrelay_cluster_live_nodes", "Cluster nodes heard from lately")
            g.add_metric([], h["live_nodes"])
            yield g
            g = GaugeMetricFamily("fastrelay_cluster_leases", "Cluster connection leases this node holds")
            g.add_metric([], h["leases_held"])
            yield g
            c = CounterMetricFamily("fastrelay_cluster_events", "Redis errors, decisions made on the local "
                                    "share, and leases that expired before renewal", labels=["event"])
            for ev in ("redis_errors", "fallback_decisions", "leases_lost"):
                c.add_metric([ev], h[ev])
            yield c


def metrics_for(relay: Any) -> RelayMetrics:
    """The relay's metrics, shared by its admin listeners (each holds a reference until it stops)."""
    m = _BY_RELAY.get(relay)
    if m is None:
        m = _BY_RELAY[relay] = RelayMetrics(relay)
        m.users = 0
    m.users += 1
    return m


def release(relay: Any) -> None:
    m = _BY_RELAY.get(relay)
    if m is None:
        return
    m.users -= 1
    if m.users <= 0:
        m.close()
        del _BY_RELAY[relay]


def add_routes(admin: Any) -> None:
    relay = admin.relay
    if getattr(relay, "mainlog", None) is None or getattr(relay, "spool", None) is None:
        return  # not a started relay (API unit tests)
    m = metrics_for(relay)

    async def h_metrics(request: web.Request) -> web.Response:
        body = generate_latest(m.registry)
        if getattr(admin, "front", None) is not None:  # Workers > 1: every worker's, added up
            body = await admin.front.metrics(body)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    admin.app.router.add_get("/metrics", h_metrics)
    admin.metrics = m
