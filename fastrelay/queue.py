"""Decide what is due and where it goes next: ready queues, retries with backoff, expiry,
reroutes and bounces. It opens no sockets: delivery sessions run through fastrelay.delivery.

Each spool entry has a small in-memory `Item` (the body stays on disk until it is sent). Due
items wait in the ready queue of their destination, (routing domain, binding); later ones wait
in a heap ordered by due time. A destination opens sessions while the router grants connection
slots; a session takes messages from its destination's ready queue one after another over the
same connection (RSET between them), so connections are reused while there is work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from fastrelay import delivery as D
from fastrelay import limits
from fastrelay.bounce import DELAYED as DELAYED_ACTION
from fastrelay.bounce import DELIVERED as DELIVERED_ACTION
from fastrelay.bounce import FAILED as FAILED_ACTION
from fastrelay.bounce import RELAYED as RELAYED_ACTION
from fastrelay.bounce import make_dsn, mta_name
from fastrelay.config import Config
from fastrelay.crash import crashpoint
from fastrelay.delivery.xclient import client_of
from fastrelay.mainlog import MainLog
from fastrelay.message import DELIVERED, FAILED, PENDING, Envelope
from fastrelay.routing import ALL_DOWN, NO_SLOT, Plan, RouteError, Router
from fastrelay.shaping import OutboundShaping, has_host_throttles
from fastrelay.spool import SpoolError

log = logging.getLogger("fastrelay.queue")

# The routing domain of a drain to a peer (issue #14): every message goes there, over XFER.
DRAIN_DOMAIN = "__drain__"

# A message whose delivery crashed the worker this many times is quarantined rather than
# retried forever (docs/reliability.md case 50: poison message).
MAX_INTERNAL_ERRORS = 3
# How many distinct domain and binding names the queue shares between its items before it starts
# its table over (memory per item, not a limit on domains: an unshared name only costs its copy).
MAX_SHARED_NAMES = 100_000


class Item:
    """The in-memory record of one spool entry.

    Kept small (issue 13: a million queued messages in under 1 GB): slots, domain and binding
    strings shared between items (Queue._name), and the item's own id as the heap's tie-breaker."""

    __slots__ = ("attempts", "binding", "busy", "domain", "due", "errors", "first_queued", "id", "saving", "size",
                 "unsaved")

    def __init__(self, id: int, domain: str, binding: str, due: float, attempts: int, first_queued: float,
                 size: int):
        self.id = id
        self.domain = domain  # the domain the message is queued for (env.domain)
        self.binding = binding
        self.due = due
        self.attempts = attempts
        self.first_queued = first_queued
        self.size = size
        self.busy = False  # in a session, or being rescheduled: never on two paths at once
        self.errors = 0
        # A removal the spool could not take: retried when due; meanwhile the item is busy, so no
        # session takes it (see Queue._save_later).
        self.unsaved: Any = None
        self.saving = False

    def __lt__(self, other: Item) -> bool:
        # Only reached for two heap entries with the same due time and id (a stale entry of an
        # item pushed again): any fixed order will do, as long as it never raises.
        return id(self) < id(other)


class Dest:
    """A destination: (routing domain, binding), its ready queue and its open sessions."""

    __slots__ = ("avoid", "binding", "connecting", "domain", "idle", "paused", "pumping", "ready", "sessions",
                 "settings", "shaping_hold", "token_waits")

    def __init__(self, domain: str, binding: str):
        self.domain = domain
        self.binding = binding
        self.ready: deque[Item] = deque()
        self.sessions = 0
        self.connecting = 0  # sessions started (or woken from idle) that have not taken a message yet
        self.idle: deque[asyncio.Future] = deque()  # open connections waiting for more mail
        self.pumping = False
        self.settings: D.Settings | None = None
        # Set while the cluster said "not yet" (a shared limit full, or a throttle): no new
        # connection is tried until it fires, so a refusal never turns into a busy loop.
        self.paused: asyncio.TimerHandle | None = None
        # Hosts this destination's own TLS policy refused: route-table host id -> (monotonic
        # until, code, text). Other destinations still use them (the host itself is fine).
        self.avoid: dict[int, tuple[float, int, str]] = {}
        # Why the destination is held by local traffic shaping ("throttle", "limit"), for stats.
        self.shaping_hold = ""
        self.token_waits = 0  # sessions holding a message while they wait for a throttle token


Connector = Callable[[D.Hop, D.Settings], Awaitable[D.Connection]]


def _expire_idle(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(False)


class _Slot:
    """A connection slot the router granted for one session; `release` is idempotent."""

    __slots__ = ("dest", "host", "is_connecting", "leases", "plan", "q", "released", "shaped")

    def __init__(self, q: Queue, dest: Dest, plan: Plan, host: int, leases: list | None = None,
                 shaped: tuple[str, ...] = ()):
        self.q, self.dest, self.plan, self.host = q, dest, plan, host
        self.leases = leases  # cluster-wide slots (fastrelay.cluster) held with this one
        self.shaped = shaped  # Server_Max_Outbound_Connections slots (fastrelay.shaping)
        self.released = False
        self.is_connecting = True
        dest.sessions += 1
        dest.connecting += 1

    def connected(self) -> None:
        if self.is_connecting:
            self.is_connecting = False
            self.dest.connecting -= 1

    def release(self, _task: object = None) -> None:
        if self.released:
            return
        self.released = True
        q, d = self.q, self.dest
        q._free_slot(self.plan, self.host)
        if self.shaped:
            q.shaping.close_connection(self.shaped)
        if self.leases:
            q._spawn(q.cluster.release(self.leases))
        self.connected()
        d.sessions -= 1
        q._kick(d)


class Queue:
    def __init__(self, cfg: Config, spool, router: Router, mainlog: MainLog, connect: Connector,
                 submit: Callable[[list[tuple[Envelope, bytes]]], Awaitable[Any]] | None = None,
                 hostname: str = "localhost", cluster=None, shaping: OutboundShaping | None = None):
        self.cfg = cfg
        self.cluster = cluster  # fastrelay.cluster.ClusterGate when Cluster_Redis is set
        # Local throttles and the server-wide connection cap (issue #10); its backend may be
        # shared between processes without the scheduler knowing.
        self.shaping = shaping if shaping is not None else OutboundShaping(cfg)
        self._host_throttled = has_host_throttles(cfg)
        self.spool = spool
        self.router = router
        self.mainlog = mainlog
        self.connect = connect
        self.submit = submit  # how DSNs are queued (the relay's intake)
        self.hostname = hostname
        self.items: dict[int, Item] = {}
        self.dests: dict[tuple[str, str], Dest] = {}
        self._heap: list[tuple[float, int, Item]] = []
        # One str object per domain and binding name, however many items carry it (see Item).
        self._names: dict[str, str] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        # Destinations that found no free slot, by the site and hosts they wait for: a release
        # there wakes them (domains sharing MXs share limits, so one's release is another's slot).
        self._blocked_site: dict[int, set[Dest]] = {}
        self._blocked_host: dict[int, set[Dest]] = {}
        self.stats = {"delivered": 0, "deferred": 0, "bounced": 0, "sessions": 0, "dsns": 0, "spool_failures": 0}
        self.draining: dict | None = None  # {"to": route text, "since": time} during a drain
        self._polling: set[Dest] = set()  # destinations with a _poll_later timer armed
        # The last connect failure of each host (code, text), so that "every host is down" can
        # say why (the mainlog and the DSN carry the real reason).
        self._host_errors: dict[int, tuple[int, str]] = {}
        self._spool_failing = False  # a spool failure was logged and no spool write has worked since
        # teleport_enabled (seed 000): messages kept loaded after a transient failure, for their quick
        # retry; insertion order is age, the oldest go back to disk only past the memory limit.
        self._held: dict[int, tuple[Envelope, bytes]] = {}
        # Envelopes whose last outcome the spool did not take (see _unsaved_env), until one is written.
        self._unsaved: dict[int, Envelope] = {}
        self._held_bytes = 0
        self.held_limit = int(cfg.get("teleport_memory_limit"))
        self.spool_failure_retry = float(cfg.get("spool_failure_retry"))
        self.stats["held_hits"] = 0

    # --- intake -------------------------------------------------------------------------------
    def enqueue(self, entries: list) -> None:
        """Add spool entries (IndexEntry records) from reception or recovery."""
        now = time.time()
        name = self._name
        for e in entries:
            it = Item(e.id, name(e.domain), name(e.binding), e.next_attempt, e.attempts, e.first_queued, e.size)
            self.items[e.id] = it
            self._schedule(it, now)

    def _name(self, s: str) -> str:
        """The queue's one copy of a domain or binding name (a deferred item lives for days)."""
        if len(self._names) > MAX_SHARED_NAMES:
            self._names.clear()  # a flood of distinct domains: start over rather than grow
        return self._names.setdefault(s, s)

    def _schedule(self, it: Item, now: float) -> None:
        # A drain moves everything now: the schedule travels with the message (teleport).
        if it.due <= now or self.draining is not None:
            d = self._dest(it)
            d.ready.append(it)
            self._kick(d)
        else:
            heapq.heappush(self._heap, (it.due, it.id, it))
            if it.due < self._timer_at:
                self._arm()

    def _dest(self, it: Item) -> Dest:
        if self.draining is not None:
            target = DRAIN_DOMAIN
        else:
            # reroute_domain: all of a domain's mail goes through the named domain's settings.
            target = self.cfg.reroute_target("reroute_domain", it.domain, it.binding) or it.domain
        key = (target, it.binding)
        d = self.dests.get(key)
        if d is None:
            d = self.dests[key] = Dest(target, it.binding)
        return d

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = float("inf")
        if not self._heap or self._stopping:
            return
        at = self._heap[0][0]
        loop = asyncio.get_running_loop()
        self._timer_at = at
        self._timer = loop.call_at(loop.time() + max(0.0, at - time.time()), self._due)

    def _due(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        now = time.time()
        while self._heap and self._heap[0][0] <= now:
            _, _, it = heapq.heappop(self._heap)
            if it.unsaved is not None and not it.saving and it.due <= now and self.items.get(it.id) is it:
                it.saving = True
                self._spawn(self._save(it))
            elif self.items.get(it.id) is it and not it.busy and it.due <= now:
                d = self._dest(it)
                d.ready.append(it)
                self._kick(d)
        self._arm()

    # --- dispatch -----------------------------------------------------------------------------
    def _kick(self, d: Dest) -> None:
        if self._suspensions and self._suspended(d):
            return  # suspended by the operator (queue API): no new session, no idle one woken
        # An idle open connection takes new mail before any new connection is opened.
        while d.idle and len(d.ready) > d.connecting:
            waiter = d.idle.popleft()
            if not waiter.done():
                waiter.set_result(True)
                d.connecting += 1
        if not d.pumping and d.ready and not self._stopping and d.paused is None and not self._suspended(d):
            d.pumping = True
            self._spawn(self._pump(d))

    def _suspended(self, d: Dest) -> bool:
        """suspend_delivery set for this destination (Momentum: binding, binding_group, domain or
        global): its mail stays queued, untouched, until a restart without it. A drain moves
        everything regardless, as `fastrelay drain` does for the global switch."""
        return self.draining is None and bool(self.cfg.get("suspend_delivery", d.domain, d.binding))

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def _pump(self, d: Dest) -> None:
        """Open sessions for `d` while it has ready messages and the router grants slots."""
        try:
            # Open a session only for ready messages no starting session will take.
            if self.cfg.get("suspend_delivery", d.domain, d.binding):
                return  # suspended for this binding (or binding::domain): the mail stays queued
            while len(d.ready) > d.connecting and not self._stopping:
                wait = self.shaping.message_wait(d.domain, d.binding)
                if wait > 0:
                    # No message may go yet: a new connection would only wait. The open ones
                    # (if any) take the next token; new ones open when the timer fires.
                    d.shaping_hold = "throttle"
                    self._pause(d, wait)
                    return
                if (d.token_waits or d.connecting) and self.shaping.has_message_throttle(d.domain, d.binding):
                    # Under a message throttle the sessions already open (or opening) take the next
                    # tokens on their connections (Momentum 25.4: connections stay open while
                    # throttled); another connection would only wait beside them. Their end, or
                    # new mail while they are busy delivering, runs this pump again.
                    return
                try:
                    plan = self._narrow(d, await self.router.plan(d.domain, d.binding))
                    if self._host_throttled:
                        plan = self._unthrottled(d, plan)
                        if plan is None:
                            return  # held until the first Host throttle lets a connection through
                    host = self.router.acquire(plan)
                except RouteError as e:
                    await self._route_failed(d, e)
                    continue
                except Exception:
                    # A bug or an unexpected failure while planning must not strand the ready
                    # messages (case 50): each gets a T record and a retry, then is bounced.
                    log.exception("internal error planning %s (binding %s)", d.domain, d.binding)
                    await self._destination_error(d, "routing")
                    continue
                if host == NO_SLOT:
                    self._blocked_site.setdefault(plan.site, set()).add(d)
                    for h in plan.hops:
                        self._blocked_host.setdefault(h, set()).add(d)
                    if self.router.shared:
                        self.router.want(plan, True)
                        self._poll_later(d, plan)
                    return  # a release on this site or one of its hosts kicks the pump again
                if host == ALL_DOWN:
                    code, text = self._down_reason(plan)
                    await self._defer_ready(d, code, text)
                    continue
                if self.router.shared:
                    self.router.want(plan, False)
                hop = plan.hops[host]
                adm = self.shaping.open_connection(d.domain, d.binding, [hop.name, hop.ip])
                if adm.retry_in > 0:
                    # Momentum 25.4: a throttled destination waits on a timer; no retry is
                    # scheduled and no slot or worker is held meanwhile.
                    self._free_slot(plan, host)
                    d.shaping_hold = adm.reason
                    self._pause(d, adm.retry_in)
                    return
                leases = None
                if self.cluster is not None:
                    try:
                        cadm = await self.cluster.open_connection(d.domain, d.binding, plan.hops[host].name)
                    except BaseException:
                        self._free_slot(plan, host)
                        self.shaping.close_connection(adm.slots)
                        raise
                    if cadm.retry_in > 0:
                        # A cluster-wide limit is full or the connection throttle waits: give the
                        # local slot back and ask again later, holding no worker meanwhile.
                        self._free_slot(plan, host)
                        self.shaping.close_connection(adm.slots)
                        self._pause(d, cadm.retry_in)
                        return
                    leases = cadm.leases
                # Reserve and release in pairs: the slot goes back when the session task ends,
                # however it ends (even cancelled before its first step, when no `finally` runs).
                slot = _Slot(self, d, plan, host, leases, adm.slots)
                self.stats["sessions"] += 1
                self._spawn(self._session(slot)).add_done_callback(slot.release)
        finally:
            d.pumping = False

    def _free_slot(self, plan: Plan, host: int) -> None:
        """Give a route-table slot back and wake the destinations waiting for its site or host
        (domains sharing MXs share limits, so one's release is another's slot)."""
        self.router.release(plan, host)
        for waiting in (self._blocked_site.pop(plan.site, ()), self._blocked_host.pop(host, ())):
            for w in waiting:
                self._kick(w)

    def _pause(self, d: Dest, seconds: float) -> None:
        """No new connection for `d` for `seconds` (the cluster said "not yet")."""
        if d.paused is None and not self._stopping:
            d.paused = asyncio.get_running_loop().call_later(seconds, self._unpause, d)

    def _unpause(self, d: Dest) -> None:
        d.paused = None
        d.shaping_hold = ""
        self._kick(d)

    def _poll_later(self, d: Dest, plan: Plan) -> None:
        """With workers (issue 13) the slot this destination waits for may be freed by another
        process, whose release kicks nobody here: look again after SHARED_POLL_INTERVAL."""
        if d in self._polling or self._stopping:
            return
        self._polling.add(d)

        def poll() -> None:
            self._polling.discard(d)
            if not d.ready:  # nothing waits any more: other workers may keep their idle connections
                self.router.want(plan, False)
            self._kick(d)

        asyncio.get_running_loop().call_later(limits.SHARED_POLL_INTERVAL, poll)

    def _unthrottled(self, d: Dest, plan: Plan) -> Plan | None:
        """Momentum's Host-scope outbound_throttle_connections: a throttled MX is skipped for a
        sibling (same preference first, then the next level, as for a host at its connection
        limit); with every host throttled, the destination waits for the first one's next token
        (None: held), not for retry_interval."""
        waits = {h: self.shaping.host_wait([hop.name, hop.ip], d.binding) for h, hop in plan.hops.items()}
        throttled = {h for h, w in waits.items() if w > 0}
        if not throttled:
            return plan
        narrowed = self.router.without(plan, throttled)
        if narrowed is None:
            d.shaping_hold = "host throttle"
            self._pause(d, min(waits.values()))
        return narrowed

    def _narrow(self, d: Dest, plan: Plan) -> Plan:
        """The plan without the hosts this destination's TLS policy refused lately; a RouteError
        with the policy's reason (4.7.x) when no host is left."""
        if not d.avoid:
            return plan
        now = time.monotonic()
        for h in [h for h, (until, _, _) in d.avoid.items() if until <= now]:
            del d.avoid[h]
        avoid = {h for h in d.avoid if h in plan.hops}
        if not avoid:
            return plan
        narrowed = self.router.without(plan, avoid)
        if narrowed is None:
            _, code, text = max(d.avoid[h] for h in avoid)  # the latest refusal
            raise RouteError(False, code, text)
        return narrowed

    def _down_reason(self, plan: Plan) -> tuple[int, str]:
        """Why no host of `plan` is up: the last failure seen on one of them, if any."""
        for h in plan.hops:
            err = self._host_errors.get(h)
            if err is not None:
                code, text = err
                return code, f"{text} (all hosts for this destination are unavailable)"
        return 451, "4.4.1 All hosts for this destination are unavailable"

    async def _route_failed(self, d: Dest, e: RouteError) -> None:
        await self._finish_ready(d, FAILED if e.permanent else PENDING, e.code, e.text)

    async def _finish_ready(self, d: Dest, state: int, code: int, text: str) -> None:
        """Every ready message of `d` gets this outcome without a delivery attempt."""
        for it in self._drain(d):
            await self._guarded(it, self._finish_all(it, state, code, text, remote=""))

    async def _destination_error(self, d: Dest, where: str) -> None:
        for it in self._drain(d):
            it.errors += 1
            await self._internal_error(it, where)

    def _drain(self, d: Dest) -> list[Item]:
        items = []
        while d.ready:
            it = d.ready.popleft()
            if self.items.get(it.id) is it and not it.busy:
                it.busy = True
                items.append(it)
        return items

    async def _defer_ready(self, d: Dest, code: int, text: str) -> None:
        """Every ready message of `d` gets a transient failure and a later retry."""
        await self._finish_ready(d, PENDING, code, text)

    async def _guarded(self, it: Item, step: Awaitable[None]) -> None:
        """Run one outcome step for a message this task took (drained ones are all busy): however
        it fails, the message ends released with a retry, so one failure strands no one (neither
        this message nor the others drained with it, which the caller handles next)."""
        try:
            await step
        except SpoolError as e:
            self._retry_later(it, e)
        except Exception:
            # docs/reliability.md case 50: a bug must not lose the message nor kill the scheduler.
            it.errors += 1
            log.exception("internal error handling message %d (%d/%d)", it.id, it.errors, MAX_INTERNAL_ERRORS)
            await self._internal_error(it)

    def _settings(self, d: Dest) -> D.Settings:
        if d.settings is None:
            d.settings = delivery_settings(self.cfg, d.domain, d.binding, self.hostname)
            if d.domain == DRAIN_DOMAIN:
                # A drained message keeps its schedule, attempts and first-queued time on the
                # peer (seed 000's teleport), and its binding (always carried).
                d.settings = dataclasses.replace(d.settings, teleport=True)
        return d.settings

    async def _session(self, slot: _Slot) -> None:
        d, plan, host = slot.dest, slot.plan, slot.host
        hop = plan.hops[host]
        conn: D.Connection | None = None
        settings = self._settings(d)
        if plan.sts_enforce and hop.proto == "smtp":
            # RFC 8461 §5: a policy in enforce mode needs TLS with a certificate valid for the MX.
            settings = dataclasses.replace(settings, tls="required", tls_verify="host", tls_fallback=False)
        try:
            try:
                conn = await self.connect(hop, settings)
            except D.ConnectError as e:
                log.info("%s: host %s:%s unusable: %s %s", d.domain, hop.ip, hop.port, e.code, e.text)
                if e.policy:
                    # This destination's TLS policy refused the host: only this destination
                    # avoids it (for host_failure_retry); other domains keep using it.
                    d.avoid[host] = (time.monotonic() + self.router.failure_wait(plan, host), e.code, e.text)
                    return
                # docs/reliability.md cases 38-39: this host is avoided for a while; the messages stay
                # ready and the next session tries another host (or finds ALL_DOWN and defers).
                self._host_errors[host] = (e.code, e.text)
                self.router.host_failed(plan, host)
                return
            except Exception:
                # Not a host answer but a failure of ours: treated like one (the host is avoided
                # for a while) so the pump does not spin on it; the messages stay ready.
                log.exception("%s: internal error connecting to %s:%s", d.domain, hop.ip, hop.port)
                self.router.host_failed(plan, host)
                return
            self.router.host_ok(plan, host)
            slot.connected()
            keep = self.cfg.get("idle_timeout", d.domain, d.binding)
            throttled = self.shaping.has_message_throttle(d.domain, d.binding)
            while conn.usable and not self._stopping:
                it = self._take(d)
                if it is None:
                    if not await self._idle(d, keep, plan):
                        break
                    d.connecting -= 1  # woken for a message: it takes one now (or finds none)
                    continue
                wait = self.shaping.before_message(d.domain, d.binding, [hop.name, hop.ip])
                if 0 < wait <= keep:
                    d.token_waits += 1
                    try:
                        while 0 < wait <= keep and conn.usable and not self._stopping:
                            # Throttled by message rate: the connection stays open for a wait
                            # within idle_timeout (no retry scheduled, the message stays taken).
                            await asyncio.sleep(wait)
                            wait = self.shaping.before_message(d.domain, d.binding, [hop.name, hop.ip])
                    finally:
                        d.token_waits -= 1
                if wait > 0:
                    # A longer wait: the message goes back to the front of the ready queue, the
                    # connection closes, and the destination waits on a timer.
                    it.busy = False
                    d.ready.appendleft(it)
                    d.shaping_hold = "throttle"
                    self._pause(d, wait)
                    break
                if self.cluster is not None:
                    await self.cluster.before_message(d.domain, d.binding)
                await self._deliver_one(it, conn, hop)
                if throttled and not d.token_waits and len(d.ready) > d.connecting:
                    # The token was there without waiting: the throttle is not what limits this
                    # destination now, so the pump may open another connection (see _pump).
                    self._kick(d)
        finally:
            if conn is not None:
                try:
                    await conn.close()
                except Exception:  # close never matters to the outcome
                    log.debug("close failed", exc_info=True)
            slot.release()

    async def _idle(self, d: Dest, keep: float, plan: Plan | None = None) -> bool:
        """Keep an open connection for `keep` seconds in case more mail comes for its destination
        (Momentum's outbound idle_timeout): a new connection costs a handshake, a
        greeting and an EHLO. True if woken for a message, False when the time is up. With
        workers, also False as soon as another worker waits for a slot of this site: an idle
        connection here must not keep the relay-wide limit from its mail."""
        if keep <= 0 or self._stopping:
            return False
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        d.idle.append(waiter)
        timer = loop.call_later(keep, _expire_idle, waiter)
        try:
            if plan is None or not self.router.shared:
                return await waiter
            while True:
                await asyncio.wait((waiter,), timeout=limits.SHARED_POLL_INTERVAL)
                if waiter.done():
                    return waiter.result()
                if self.router.wanted_elsewhere(plan):
                    return False
        finally:
            timer.cancel()
            if not waiter.done():
                waiter.cancel()
            # Usually a waker popped it already. Not remove() and catch ValueError: deque's
            # ValueError message is built with the future's repr, a measurable cost per message.
            if waiter in d.idle:
                d.idle.remove(waiter)

    def _take(self, d: Dest) -> Item | None:
        if self._suspensions and self._suspended(d):
            return None  # an open session of a suspended destination takes nothing more
        while d.ready:
            it = d.ready.popleft()
            if self.items.get(it.id) is it and not it.busy:
                it.busy = True
                return it
        return None

    async def _deliver_one(self, it: Item, conn: D.Connection, hop: D.Hop) -> None:
        try:
            loaded = await self._load(it)
            if loaded is None:  # removed, or quarantined as corrupt (P6)
                self.items.pop(it.id, None)
                return
            env, body = loaded
            idx = env.pending()
            if not idx:
                await self._done(it, env)
                return
            if hop.proto == "xfer":
                # XFER is one more delivery method behind the same scheduler; the peer dedupes on
                # (this spool's node, this entry's id) if a lost 200 makes us send it again.
                results = await conn.transfer(env, idx, body, (self.spool.node_id, str(it.id)))
            else:
                # XCLIENT (issue #10): the original client goes along where the option asks.
                kw = {"client": client_of(env)} if hop.proto == "smtp" and \
                    self._settings(self._dest(it)).xclient != "no" else {}
                results = await conn.deliver(
                    env.sender, env.mail_params,
                    [(env.recipients[i].address, env.recipients[i].params) for i in idx], body, **kw,
                )
            crashpoint("after_remote_ok")
            # A next hop that took the DSN parameters reports success itself (RFC 3461 §5.2.1);
            # XFER carries them to the peer. Otherwise NOTIFY=SUCCESS is answered here.
            success = None if hop.proto == "xfer" or getattr(conn, "takes_dsn", True) else \
                (DELIVERED_ACTION if hop.proto == "lmtp" else RELAYED_ACTION)
            await self._apply(it, env, body, idx, results, f"{hop.ip}:{hop.port}",
                              ok_kind="X" if hop.proto == "xfer" else "D", mta=mta_name(hop), success=success,
                              tls=getattr(conn, "tls_info", None))
        except SpoolError as e:
            # The spool could not read or write this message now: not the message's fault, so it
            # does not count towards quarantine; nothing changed on disk, so it is simply tried again.
            self._retry_later(it, e)
        except Exception:
            # A bug or an unexpected failure must not kill the worker or lose the message
            # (docs/reliability.md case 50): retry later; quarantine a message that keeps failing.
            it.errors += 1
            log.exception("internal error delivering message %d (%d/%d)", it.id, it.errors, MAX_INTERNAL_ERRORS)
            conn.usable = False
            await self._internal_error(it)

    async def _internal_error(self, it: Item, where: str = "delivering") -> None:
        """A message hit an unexpected failure: a T record and a retry, or after MAX_INTERNAL_ERRORS
        a bounce (5.3.0), or quarantine when even that fails. Never raises: it is the last step of
        every failure path, so the message always has a next step."""
        final = it.errors >= MAX_INTERNAL_ERRORS
        try:
            if final:
                loaded = await self._load(it)
                if loaded is None:
                    self.items.pop(it.id, None)
                    return
                await self._finish_all(it, FAILED, 554, f"5.3.0 Internal error {where} this message", "", loaded)
            else:
                await self._finish_all(it, PENDING, 451, f"4.3.0 Internal error {where} this message, will retry",
                                       "")
        except SpoolError as e:
            self._retry_later(it, e)
        except Exception:
            if not final:
                log.exception("could not record the internal error of message %d", it.id)
                self._retry_later(it)
                return
            log.exception("message %d: the failure path failed too; quarantining it", it.id)
            try:
                await self.spool.quarantine(it.id, f"internal error {MAX_INTERNAL_ERRORS} times")
                self.items.pop(it.id, None)
            except SpoolError as e:
                self._retry_later(it, e)

    # --- spool failures -----------------------------------------------------------------------
    # A spool that cannot read or write for a while (full or failing disk, exhausted quota) must not
    # strand what the scheduler took: every path releases the message with a retry, and the trouble
    # is logged once per episode, not once per message and retry.

    def _spool_failed(self, e: SpoolError) -> None:
        self.stats["spool_failures"] += 1
        if not self._spool_failing:
            self._spool_failing = True
            log.error("queue: spool write failed (%s); the messages concerned stay queued and are retried "
                      "(logged once until the spool works again)", e)

    def _spool_ok(self) -> None:
        if self._spool_failing:
            self._spool_failing = False
            log.warning("queue: the spool works again (%d operations had failed)", self.stats["spool_failures"])

    def _retry_delay(self, it: Item) -> float:
        od = self.cfg.delivery_domain(it.domain, it.binding)
        return min(float(self.cfg.get("retry_interval", od, it.binding)), self.spool_failure_retry)

    def _retry_later(self, it: Item, e: SpoolError | None = None) -> None:
        """Nothing was written for this attempt (the spool failed, or even recording an outcome
        failed): try the message again later, from what the spool holds."""
        if e is not None:
            self._spool_failed(e)
        self._unhold(it.id)  # the next attempt starts from what the spool holds
        now = time.time()
        it.busy = False
        it.due = now + self._retry_delay(it)
        self._schedule(it, now)

    def _unsaved_env(self, it: Item, env: Envelope, e: SpoolError) -> None:
        """A reschedule (or progress) the spool did not take: the envelope in memory is now the
        truth (recipients delivered or failed, attempts). The message goes on to its next attempt
        with it, and that attempt's outcome writes it (so a recipient already delivered is not sent
        again, unless the relay stops before any write succeeds: then a duplicate, never a loss)."""
        self._spool_failed(e)
        self._unsaved[it.id] = env
        it.domain = self._name(env.domain)
        it.attempts = env.attempts
        it.busy = False
        it.due = env.next_attempt  # its own schedule: the next outcome written makes it durable
        self._schedule(it, time.time())

    def _save_later(self, it: Item, unsaved: Any, e: SpoolError) -> None:
        """The message is done but the spool did not take its removal: keep it busy and write the
        removal again when due (not the delivery: a message delivered is not sent twice for this)."""
        self._spool_failed(e)
        now = time.time()
        it.busy = True
        it.unsaved = unsaved
        it.saving = False
        it.due = now + self._retry_delay(it)
        heapq.heappush(self._heap, (it.due, it.id, it))
        if it.due < self._timer_at:
            self._arm()

    async def _save(self, it: Item) -> None:
        unsaved = it.unsaved
        try:
            await self.spool.remove(it.id)
        except SpoolError as e:
            self._save_later(it, unsaved, e)
            return
        except BaseException:
            it.saving = False  # cancelled (stop): the write is retried at the next start from disk
            raise
        self._spool_ok()
        it.unsaved = None
        it.saving = False
        self.items.pop(it.id, None)
        self._unsaved.pop(it.id, None)

    # --- outcomes -----------------------------------------------------------------------------
    async def _apply(self, it: Item, env: Envelope, body: bytes, idx: list[int], results: list, remote: str,
                     ok_kind: str = "D", mta: str = "", success: str | None = None,
                     tls: str | None = None) -> None:
        """`remote` (ip:port) is for the mainlog; `mta` (the host's name) for DSNs' Remote-MTA;
        `success` the DSN action (delivered, relayed) owed to NOTIFY=SUCCESS, None if none is."""
        size = len(body)
        failed: list[int] = []
        ok: list[int] = []
        temp = False
        for i, res in zip(idx, results, strict=True):
            r = env.recipients[i]
            r.detail = res.response
            if res.status == D.OK:
                r.state = DELIVERED
                ok.append(i)
                self.stats["delivered"] += 1
                self.mainlog.outcome(ok_kind, env, r.address, size, remote, res.response, tls=tls)
            elif res.status == D.PERM:
                r.state = FAILED
                failed.append(i)
                self.stats["bounced"] += 1
                self.mainlog.outcome("P", env, r.address, size, remote, res.response)
            else:
                temp = True
                self.mainlog.outcome("T", env, r.address, size, remote, res.response)
        if failed:
            await self._bounce(env, body, failed, mta)
        if ok and success is not None:
            await self._bounce(env, body, ok, mta, action=success)
        if temp:
            await self._retry_or_expire(it, env, body)
        else:
            await self._done(it, env)

    async def _finish_all(self, it: Item, state: int, code: int, text: str, remote: str,
                          loaded: tuple[Envelope, bytes] | None = None) -> None:
        """Give every pending recipient of `it` the same outcome without a delivery attempt
        (route errors, all hosts down, poison messages)."""
        if loaded is None:
            loaded = await self._load(it)
        if loaded is None:
            self.items.pop(it.id, None)
            return
        env, body = loaded
        idx = env.pending()
        status = D.PERM if state == FAILED else D.TEMP
        await self._apply(it, env, body, idx, [D.RcptResult(status, code, text)] * len(idx), remote)

    async def _retry_or_expire(self, it: Item, env: Envelope, body: bytes) -> None:
        now = time.time()
        cfg = self.cfg
        env.attempts += 1
        # Seed 000: mail rerouted to another domain (reroute_domain = "xfer.test" on gmail.com) is
        # retried and expired by that domain's options ("retry xfer messages quicker").
        od = cfg.delivery_domain(env.domain, env.binding)
        expiration = cfg.get("message_expiration", od, env.binding)
        max_retries = cfg.get("max_retries", od, env.binding)
        if now - env.first_queued >= expiration or (max_retries and env.attempts > max_retries):
            # RFC 5321 §4.5.4.1: give up, and tell the sender.
            why = "5.4.7 Delivery time expired" if now - env.first_queued >= expiration else \
                "5.4.7 Too many delivery attempts"
            idx = env.pending()
            for i in idx:
                r = env.recipients[i]
                r.state = FAILED
                r.detail = f"{r.detail} ({why})" if r.detail else why
                self.stats["bounced"] += 1
                self.mainlog.outcome("P", env, r.address, len(body), "", why)
            await self._bounce(env, body, idx, "")
            await self._done(it, env)
            return
        target = cfg.reroute_target("delayed_reroute_domain", od, env.binding)
        if target and target not in (env.domain, od) and not env.meta.get("delayed_rerouted"):
            # Seeds 000/001: after its first transient failure, the message moves to the named
            # (XFER) domain and goes out from there at once.
            env.meta["delayed_rerouted"] = True
            env.meta.setdefault("rerouted_from", env.domain)
            env.domain = target
            env.next_attempt = now
        else:
            base = cfg.get("retry_interval", od, env.binding)
            cap = cfg.get("max_retry_interval", od, env.binding)
            env.next_attempt = now + min(cap, base * (2 ** min(env.attempts - 1, 30)))
        warn = cfg.get("delay_warning_time", env.domain, env.binding)
        if warn and now - env.first_queued >= warn and not env.meta.get("delay_warned"):
            # RFC 3461 §5.2.5, Postfix's delay_warning_time: one notice per message (the flag is saved with the
            # reschedule below; a crash in between gives a second notice, never none).
            await self._bounce(env, body, env.pending(), "", action=DELAYED_ACTION,
                               retry_until=env.first_queued + expiration)
            env.meta["delay_warned"] = True
        self.stats["deferred"] += 1
        crashpoint("mid_reschedule")
        try:
            await self.spool.reschedule(it.id, env)
        except SpoolError as e:
            self._unsaved_env(it, env, e)
            return
        self._spool_ok()
        self._unsaved.pop(it.id, None)
        if cfg.get("teleport_enabled", od, env.binding):
            self._hold(it.id, env, body)
        self._rescheduled(it, env)

    # --- teleport_enabled: kept loaded for the quick retry ------------------------------------
    async def _load(self, it: Item) -> tuple[Envelope, bytes] | None:
        held = self._held.pop(it.id, None)
        if held is not None:
            self._held_bytes -= len(held[1])
            self.stats["held_hits"] += 1
            return held
        loaded = await self.spool.load(it.id)
        env = self._unsaved.get(it.id)
        if loaded is None or env is None:
            return loaded
        # The spool has not taken this envelope's last outcome yet. A copy: an attempt that fails
        # half way (a DSN not queued) must not leave its changes in the one true envelope.
        return Envelope.from_json(env.to_json()), loaded[1]

    def _hold(self, id: int, env: Envelope, body: bytes) -> None:
        """Keep a message loaded (the same envelope as just made durable, the same body): its next
        attempt needs no read. Bounded by teleport_memory_limit; the oldest go back to disk only."""
        if len(body) > self.held_limit:
            return
        self._unhold(id)
        self._held[id] = (env, body)
        self._held_bytes += len(body)
        while self._held_bytes > self.held_limit:
            self._unhold(next(iter(self._held)))

    def _unhold(self, id: int) -> None:
        held = self._held.pop(id, None)
        if held is not None:
            self._held_bytes -= len(held[1])

    def _rescheduled(self, it: Item, env: Envelope) -> None:
        it.domain = self._name(env.domain)
        it.attempts = env.attempts
        it.due = env.next_attempt
        it.busy = False
        self._schedule(it, time.time())

    async def _done(self, it: Item, env: Envelope) -> None:
        if env.done():
            # P4: the local copy goes only when every recipient is final.
            try:
                await self.spool.remove(it.id)
            except SpoolError as e:
                self._save_later(it, "remove", e)
                return
            self._spool_ok()
            self.items.pop(it.id, None)
            self._unhold(it.id)
            self._unsaved.pop(it.id, None)
        else:  # pragma: no cover - callers only get here with every recipient final
            try:
                await self.spool.mark_recipients(it.id, env)
            except SpoolError as e:
                self._unsaved_env(it, env, e)
                return
            self._unsaved.pop(it.id, None)
            it.busy = False

    async def _bounce(self, env: Envelope, body: bytes, idx: list[int], mta: str, action: str = FAILED_ACTION,
                      retry_until: float | None = None) -> None:
        """A DSN to the sender for these recipients (a failure unless `action` says otherwise),
        for those whose NOTIFY asks for it; never for the null sender (RFC 5321 §6.1,
        docs/reliability.md case 18). It is durable before the recipients are marked failed, so a
        crash in between gives a duplicate DSN, never a lost one."""
        if not env.sender or not idx or self.submit is None:
            return
        items = make_dsn(env, body, idx, self.hostname, mta, action=action, retry_until=retry_until)
        if not items:
            return
        await self.submit(items)
        self.stats["dsns"] += 1

    # --- drain to a peer (issue #14) ------------------------------------------------------------
    def drain_to(self, route) -> int:
        """Move every queued message to the XFER peer `route` (an xfer:// Route), keeping its
        schedule, attempts and binding. The peer dedupes on (this node, this id), so a drain cut
        short by kill -9 and run again delivers each message once (docs/reliability.md case 36).
        Returns how many messages are queued to go."""
        self.router.overrides[DRAIN_DOMAIN] = [route]
        self.draining = {"to": route.text, "since": time.time(), "queued_at_start": len(self.items)}
        now = time.time()
        for it in list(self.items.values()):
            if not it.busy:  # a busy one comes here when its session ends (_schedule)
                it.due = min(it.due, now)
                self._schedule(it, now)
        return len(self.items)

    def drain_status(self) -> dict | None:
        if self.draining is None:
            return None
        return {**self.draining, "remaining": len(self.items)}

    # --- lifecycle ----------------------------------------------------------------------------
    async def stop(self) -> None:
        self._stopping = True
        for d in self.dests.values():
            if d.paused is not None:
                d.paused.cancel()
                d.paused = None
            while d.idle:
                w = d.idle.popleft()
                if not w.done():
                    w.set_result(False)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def counts(self) -> dict[str, int]:
        return {
            "queued": len(self.items),
            "ready": sum(len(d.ready) for d in self.dests.values()),
            "sessions": sum(d.sessions for d in self.dests.values()),
            "waiting": len(self._heap),
            "held": len(self._held),  # kept loaded by teleport_enabled
            "held_bytes": self._held_bytes,
        }

    # --- queue API (admin, XFER drain) ---------------------------------------------------------
    # What the admin API (fastrelay.admin) and the XFER drain see and steer, and ALL they touch:
    # they never read the spool's files. Values in and JSON-ready dicts out; a refusal raises
    # fastrelay.admin.queueapi.QueueAPIError with an HTTP status (404 unknown, 409 in flight).
    # A message in a session (Item.busy) is never changed, so it is never on two paths at once.
    # Held messages are due at HELD_UNTIL: the hold survives a restart with no schema change.
    HELD_UNTIL = 253402300799.0  # 9999-12-31T23:59:59Z
    # Operator suspensions: (domain or None, binding or None) -> expiry (wall clock) or None. The
    # class default is empty and never written: api_suspend gives the instance its own dict.
    _suspensions: dict[tuple[str | None, str | None], float | None] = {}
    _suspend_timer: asyncio.TimerHandle | None = None

    def _suspended(self, d: Dest) -> bool:
        now = time.time()
        for key in ((d.domain, d.binding), (d.domain, None), (None, d.binding)):
            exp = self._suspensions.get(key, 0.0)
            if exp is None or exp > now:
                return True
        return False

    def api_state(self, it: Item, now: float) -> str:
        if it.due >= self.HELD_UNTIL:
            return "held"
        if it.busy:
            return "in_delivery"
        return "ready" if it.due <= now else "deferred"

    def _api_item(self, id: int | str) -> Item:
        from fastrelay.admin.queueapi import QueueAPIError

        try:
            key = int(id)
        except (TypeError, ValueError):
            raise QueueAPIError(404, "not_found", f"no queued message {id!r}") from None
        it = self.items.get(key)
        if it is None:
            raise QueueAPIError(404, "not_found", f"no queued message {id}")
        return it

    def _api_claim(self, it: Item, what: str) -> None:
        """Take a message for an admin change, or refuse with 409 when delivery has it."""
        from fastrelay.admin.queueapi import QueueAPIError

        if it.busy:
            raise QueueAPIError(409, "in_delivery", f"message {it.id} is being delivered; {what} it when the "
                                                    "attempt is over")
        it.busy = True

    def _api_unready(self, it: Item) -> None:
        d = self.dests.get((self._dest(it).domain, it.binding))
        for dest in ([d] if d is not None else []) + list(self.dests.values()):
            try:
                dest.ready.remove(it)
            except ValueError:
                continue
            return

    def _api_row(self, it: Item, now: float) -> dict:
        return {"id": str(it.id), "domain": it.domain, "binding": it.binding, "state": self.api_state(it, now),
                "age": max(0.0, round(now - it.first_queued, 3)), "attempts": it.attempts,
                "next_attempt": None if it.due >= self.HELD_UNTIL else it.due, "size": it.size}

    async def api_summary(self) -> dict:
        """Counts by state, and per (binding, domain) by state and by qshape age bucket."""
        from fastrelay.admin.queueapi import AGE_BUCKETS, STATES, age_bucket

        now = time.time()
        total = dict.fromkeys(STATES, 0)
        per: dict[tuple[str, str], dict] = {}
        for it in self.items.values():
            st = self.api_state(it, now)
            total[st] += 1
            row = per.get((it.binding, it.domain))
            if row is None:
                row = per[(it.binding, it.domain)] = {
                    "domain": it.domain, "binding": it.binding, "total": 0, "size": 0,
                    "by_state": dict.fromkeys(STATES, 0), "by_age": [0] * len(AGE_BUCKETS)}
            row["total"] += 1
            row["size"] += it.size
            row["by_state"][st] += 1
            row["by_age"][age_bucket(now - it.first_queued)] += 1
        rows = sorted(per.values(), key=lambda r: (-r["total"], r["domain"], r["binding"]))
        return {"total": len(self.items), "by_state": total, "age_buckets": list(AGE_BUCKETS),
                "destinations": rows, "suspended": self.api_suspensions(), "drain": self.drain_status()}

    async def api_list(self, domain: str | None = None, binding: str | None = None, state: str | None = None,
                       sender: str | None = None, recipient: str | None = None, min_age: float | None = None,
                       max_age: float | None = None, offset: int = 0, limit: int = 100) -> dict:
        """Messages in id order matching every filter given, one page of them. Sender and recipient
        filters read envelopes (case-insensitive substring), at most limits.ADMIN_SCAN_MAX of them."""
        from fastrelay import limits

        now = time.time()
        dom = domain.lower() if domain else None
        cands = []
        for it in self.items.values():
            if dom is not None and it.domain != dom:
                continue
            if binding is not None and it.binding != binding:
                continue
            if state is not None and self.api_state(it, now) != state:
                continue
            age = now - it.first_queued
            if (min_age is not None and age < min_age) or (max_age is not None and age > max_age):
                continue
            cands.append(it)
        cands.sort(key=lambda i: i.id)
        truncated = False
        if sender is not None or recipient is not None:
            s_low, r_low = (sender or "").lower(), (recipient or "").lower()
            if len(cands) > limits.ADMIN_SCAN_MAX:
                cands, truncated = cands[: limits.ADMIN_SCAN_MAX], True
            kept = []
            for it in cands:
                loaded = await self.spool.load(it.id)
                if loaded is None:
                    continue
                env = loaded[0]
                if sender is not None and s_low not in env.sender.lower():
                    continue
                if recipient is not None and not any(r_low in r.address.lower() for r in env.recipients):
                    continue
                kept.append(it)
            cands = kept
        page = cands[offset: offset + limit]
        out = []
        for it in page:
            row = self._api_row(it, now)
            loaded = await self.spool.load(it.id)
            if loaded is not None:
                row["sender"] = loaded[0].sender
                row["recipients"] = [r.address for r in loaded[0].recipients]
                row["msgid"] = loaded[0].msgid
            out.append(row)
        return {"total": len(cands), "offset": offset, "limit": limit, "truncated": truncated, "messages": out}

    async def api_show(self, id: int | str, body: bool = False) -> dict:
        """One message: envelope, per-recipient state, attempts, last error, next attempt,
        headers, and the body when asked."""
        from fastrelay.admin.queueapi import RCPT_STATES, QueueAPIError, split_headers

        it = self._api_item(id)
        loaded = await self.spool.load(it.id)
        if loaded is None:
            raise QueueAPIError(404, "not_found", f"message {id} is gone")
        env, data = loaded
        now = time.time()
        row = self._api_row(it, now)
        errors = [r.detail for r in env.recipients if r.detail and r.state != DELIVERED]
        row.update({
            "msgid": env.msgid, "sender": env.sender, "mail_params": env.mail_params, "client_ip": env.client_ip,
            "helo": env.helo, "protocol": env.protocol, "received_at": env.received_at,
            "first_queued": env.first_queued,
            "recipients": [{"address": r.address, "params": r.params, "state": RCPT_STATES[r.state],
                            "detail": r.detail} for r in env.recipients],
            "last_error": errors[-1] if errors else None,
            "meta": {k: v for k, v in env.meta.items() if isinstance(v, str | int | float | bool)},
            "headers": split_headers(data),
        })
        if body:
            row["body"] = data.decode("utf-8", "replace")
        return row

    async def api_delete(self, id: int | str, dsn: bool = False) -> dict:
        """Remove a message; with dsn, its pending recipients fail and the sender gets a DSN."""
        it = self._api_item(id)
        self._api_claim(it, "delete")
        try:
            loaded = await self.spool.load(it.id)
            if loaded is not None:
                env, data = loaded
                idx = env.pending()
                why = "5.0.0 Deleted by the administrator" if dsn else "5.0.0 Deleted by the administrator (no DSN)"
                for i in idx:
                    r = env.recipients[i]
                    r.state = FAILED
                    r.detail = why
                    self.mainlog.outcome("P", env, r.address, len(data), "", why)
                if dsn:
                    await self._bounce(env, data, idx, "")
            await self.spool.remove(it.id)
        except BaseException:
            it.busy = False
            raise
        self.items.pop(it.id, None)
        self._api_unready(it)
        return {"id": str(it.id), "result": "bounced" if dsn else "deleted"}

    async def _api_persist_due(self, it: Item, due: float, held: bool) -> None:
        loaded = await self.spool.load(it.id)
        if loaded is None:
            return
        env = loaded[0]
        env.next_attempt = due
        if held:
            env.meta["held"] = True
        else:
            env.meta.pop("held", None)
        await self.spool.reschedule(it.id, env)

    async def api_hold(self, id: int | str) -> dict:
        """Postfix's postsuper -h: the message stays queued and is not tried until released."""
        it = self._api_item(id)
        if it.due >= self.HELD_UNTIL:
            return {"id": str(it.id), "state": "held"}
        self._api_claim(it, "hold")
        try:
            await self._api_persist_due(it, self.HELD_UNTIL, True)
            self._api_unready(it)
            it.due = self.HELD_UNTIL
        finally:
            it.busy = False
        return {"id": str(it.id), "state": "held"}

    async def api_release(self, id: int | str) -> dict:
        """Postfix's postsuper -H: a held message is due now."""
        from fastrelay.admin.queueapi import QueueAPIError

        it = self._api_item(id)
        if it.due < self.HELD_UNTIL:
            raise QueueAPIError(409, "not_held", f"message {it.id} is not held")
        self._api_claim(it, "release")
        now = time.time()
        try:
            await self._api_persist_due(it, now, False)
        finally:
            it.busy = False
        it.due = now
        self._schedule(it, now)
        return {"id": str(it.id), "state": self.api_state(it, now)}

    def _api_due_now(self, it: Item, now: float) -> bool:
        if it.busy or it.due >= self.HELD_UNTIL:
            return False
        if it.due > now:  # already-ready ones are in a ready queue: not twice
            it.due = now
            self._schedule(it, now)
        return True

    async def api_flush_one(self, id: int | str) -> dict:
        """Retry one message now (postqueue -i)."""
        from fastrelay.admin.queueapi import QueueAPIError

        it = self._api_item(id)
        if it.due >= self.HELD_UNTIL:
            raise QueueAPIError(409, "held", f"message {it.id} is held; release it to retry it")
        if it.busy:
            raise QueueAPIError(409, "in_delivery", f"message {it.id} is being delivered now")
        self._api_due_now(it, time.time())
        return {"id": str(it.id), "flushed": 1}

    async def api_flush(self, domain: str | None = None) -> dict:
        """Retry now every deferred message (postqueue -f), or those of one domain (-s)."""
        now = time.time()
        dom = domain.lower() if domain else None
        n = 0
        for it in list(self.items.values()):
            if (dom is None or it.domain == dom) and self._api_due_now(it, now):
                n += 1
        return {"flushed": n, "domain": dom}

    def api_suspensions(self) -> list[dict]:
        now = time.time()
        return [{"domain": k[0], "binding": k[1], "until": exp}
                for k, exp in sorted(self._suspensions.items(), key=lambda kv: (kv[0][0] or "", kv[0][1] or ""))
                if exp is None or exp > now]

    async def api_suspend(self, domain: str | None = None, binding: str | None = None,
                          seconds: float | None = None) -> dict:
        """Stop new deliveries to a domain, a binding or binding::domain, until resumed or until
        `seconds` pass. Sessions already delivering finish their current message."""
        from fastrelay.admin.queueapi import QueueAPIError

        if not domain and not binding:
            raise QueueAPIError(400, "bad_request", "suspend needs a domain, a binding or both")
        if seconds is not None and not seconds > 0:
            raise QueueAPIError(400, "bad_request", "the suspension time must be more than 0 seconds")
        if not self._suspensions:
            self._suspensions = {}  # this instance's own dict (the class default is shared and empty)
        until = None if seconds is None else time.time() + seconds
        key = (domain.lower() if domain else None, binding or None)
        self._suspensions[key] = until
        self._api_arm_suspensions()
        return {"domain": key[0], "binding": key[1], "until": until}

    async def api_resume(self, domain: str | None = None, binding: str | None = None) -> dict:
        from fastrelay.admin.queueapi import QueueAPIError

        key = (domain.lower() if domain else None, binding or None)
        if key not in self._suspensions:
            raise QueueAPIError(404, "not_found", "no such suspension")
        del self._suspensions[key]
        self._api_kick_all()
        return {"domain": key[0], "binding": key[1], "resumed": True}

    def _api_kick_all(self) -> None:
        for d in list(self.dests.values()):
            if d.ready:
                self._kick(d)

    def _api_arm_suspensions(self) -> None:
        if self._suspend_timer is not None:
            self._suspend_timer.cancel()
            self._suspend_timer = None
        times = [t for t in self._suspensions.values() if t is not None]
        if times and not self._stopping:
            self._suspend_timer = asyncio.get_running_loop().call_later(
                max(0.0, min(times) - time.time()) + 0.01, self._api_expire_suspensions)

    def _api_expire_suspensions(self) -> None:
        self._suspend_timer = None
        now = time.time()
        for k, t in list(self._suspensions.items()):
            if t is not None and t <= now:
                del self._suspensions[k]
        self._api_kick_all()
        self._api_arm_suspensions()

    async def api_reroute(self, src: str, dst: str, dry_run: bool = False) -> dict:
        """Momentum's `reroute queue`: the queued mail of domain `src` goes to domain `dst`'s route
        (the recipients keep their addresses). Messages in delivery are left and listed."""
        from fastrelay.admin.queueapi import QueueAPIError

        src, dst = src.lower().rstrip("."), dst.lower().rstrip(".")
        if not src or not dst:
            raise QueueAPIError(400, "bad_request", "reroute needs two domains")
        its = sorted((i for i in self.items.values() if i.domain == src), key=lambda i: i.id)
        busy = [str(i.id) for i in its if i.busy]
        todo = [i for i in its if not i.busy] if src != dst else []  # A to A: nothing to move
        if dry_run:
            return {"from": src, "to": dst, "dry_run": True, "moved": 0, "would_move": len(todo),
                    "ids": [str(i.id) for i in todo], "in_delivery": busy}
        moved = []
        now = time.time()
        for it in todo:
            if it.busy or self.items.get(it.id) is not it:
                continue
            it.busy = True
            try:
                loaded = await self.spool.load(it.id)
                if loaded is None:
                    continue
                env = loaded[0]
                env.meta.setdefault("rerouted_from", env.domain)
                env.domain = dst
                await self.spool.reschedule(it.id, env)
                self._api_unready(it)
                it.domain = self._name(dst)
                moved.append(str(it.id))
            finally:
                it.busy = False
            if self.items.get(it.id) is it and it.due <= now:
                self._schedule(it, now)  # ready: into the new destination's ready queue now
        return {"from": src, "to": dst, "dry_run": False, "moved": len(moved), "would_move": len(moved),
                "ids": moved, "in_delivery": busy}

    def api_reconfigure(self, cfg: Config) -> None:
        """A reload: every decision from now on reads `cfg`. Destinations are replaced by fresh
        ones (their settings and plans are read again), their ready mail moves over, and open
        sessions of the old ones finish the message they hold, find nothing more and close: so
        new mail takes the new route at once, and nothing in flight is cut."""
        self.cfg = cfg
        # Throttles and Server_Max_Outbound_Connections as the new conf says (issue 10), on the
        # same backend: slots held now are released where they were taken, and a throttle keeps
        # its place in time (no free burst from a reload).
        self.shaping = OutboundShaping(cfg, self.shaping.backend, self.shaping.clock)
        self._host_throttled = has_host_throttles(cfg)
        if self.cluster is not None:
            self.cluster.cfg = cfg  # Cluster_* limits and throttles as the new conf says (issue 14)
        old = self.dests
        self.dests = {}
        for d in old.values():
            while d.idle:  # idle cached connections close now
                w = d.idle.popleft()
                if not w.done():
                    w.set_result(False)
        moved: set[int] = set()
        now = time.time()
        for d in old.values():
            while d.ready:
                it = d.ready.popleft()
                if self.items.get(it.id) is it and not it.busy and it.due <= now and it.id not in moved:
                    moved.add(it.id)
                    self._dest(it).ready.append(it)
        self._blocked_site.clear()
        self._blocked_host.clear()
        self._api_kick_all()


def _path(cfg: Config, option: str, domain: str, binding: str) -> str | None:
    """A file option, relative to the directory of the conf file that set it."""
    s = cfg.lookup(option, domain, binding)
    if s.value is None or s.value == "none" or os.path.isabs(s.value) or s.pos is None:
        return s.value
    return os.path.join(os.path.dirname(os.path.abspath(s.pos.file)), s.value)


def delivery_settings(cfg: Config, domain: str, binding: str, hostname: str) -> D.Settings:
    from fastrelay.delivery.auth import outbound_auth

    g = cfg.get
    ehlo = g("EHLO_Hostname", domain, binding)
    return D.Settings(
        # Momentum's ehlo_hostname: "__hostname__" is this relay's name. "__message__" (the
        # sender's domain) cannot be per message on a shared connection: the relay's name too.
        helo_name=hostname if ehlo in ("__hostname__", "__message__") else ehlo,
        bind_address=g("Bind_Address", domain, binding),
        tls_implicit=g("TLS_Implicit", domain, binding),
        session_timeout=g("Session_Timeout", domain, binding),
        binding=binding,
        xclient=g("XCLIENT", domain, binding),
        tls_cert=_path(cfg, "TLS_Certificate", domain, binding),
        tls_key=_path(cfg, "TLS_Key", domain, binding),
        tls_protocols=g("TLS_Protocols", domain, binding),
        tls_ciphers=g("TLS_Ciphers", domain, binding),
        esmtp=g("Delivery_Method", domain, binding) != "SMTP",
        connect_timeout=g("Connect_Timeout", domain, binding),
        greeting_timeout=g("Greeting_Timeout", domain, binding),
        ehlo_timeout=g("EHLO_Timeout", domain, binding),
        tls_timeout=g("TLS_Timeout", domain, binding),
        mail_timeout=g("mailfrom_timeout", domain, binding),
        rcpt_timeout=g("rcptto_timeout", domain, binding),
        data_timeout=g("Data_Timeout", domain, binding),
        # Momentum: body_timeout is the wait for the reply after an SMTP/LMTP final dot,
        # delivery_response_timeout the wait for an HTTP delivery's response (XFER).
        done_timeout=g("body_timeout", domain, binding),
        xfer_timeout=g("Delivery_Response_Timeout", domain, binding),
        rset_timeout=g("RSET_Timeout", domain, binding),
        tls=g("TLS", domain, binding),
        tls_verify=g("TLS_Verify", domain, binding),
        tls_fallback=g("TLS_Ifavailable_Fallback", domain, binding),
        tls_ca=_path(cfg, "TLS_CA", domain, binding),
        http_uri=g("HTTP_URI", domain, binding),
        http_method=g("HTTP_METHOD", domain, binding),
        http_host=g("HTTP_HOST", domain, binding),
        teleport=g("teleport_enabled", domain, binding),
        xfer_secret=g("xfer_secret", domain, binding),
        xfer_token=g("xfer_token", domain, binding),
        auth=outbound_auth(cfg, domain, binding),
    )
