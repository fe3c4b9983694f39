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
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from fastrelay import delivery as D
from fastrelay.bounce import DELAYED as DELAYED_ACTION
from fastrelay.bounce import DELIVERED as DELIVERED_ACTION
from fastrelay.bounce import FAILED as FAILED_ACTION
from fastrelay.bounce import RELAYED as RELAYED_ACTION
from fastrelay.bounce import make_dsn, mta_name
from fastrelay.config import Config
from fastrelay.crash import crashpoint
from fastrelay.mainlog import MainLog
from fastrelay.message import DELIVERED, FAILED, PENDING, Envelope
from fastrelay.routing import ALL_DOWN, NO_SLOT, Plan, RouteError, Router
from fastrelay.spool import SpoolError

log = logging.getLogger("fastrelay.queue")

# The routing domain of a drain to a peer (issue #14): every message goes there, over XFER.
DRAIN_DOMAIN = "__drain__"

# A message whose delivery crashed the worker this many times is quarantined rather than
# retried forever (RELIABILITY.md case 50: poison message).
MAX_INTERNAL_ERRORS = 3


class Item:
    """The in-memory record of one spool entry."""

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


class Dest:
    """A destination: (routing domain, binding), its ready queue and its open sessions."""

    __slots__ = ("avoid", "binding", "connecting", "domain", "idle", "paused", "pumping", "ready", "sessions",
                 "settings")

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


Connector = Callable[[D.Hop, D.Settings], Awaitable[D.Connection]]


def _expire_idle(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(False)


class _Slot:
    """A connection slot the router granted for one session; `release` is idempotent."""

    __slots__ = ("dest", "host", "is_connecting", "leases", "plan", "q", "released")

    def __init__(self, q: Queue, dest: Dest, plan: Plan, host: int, leases: list | None = None):
        self.q, self.dest, self.plan, self.host = q, dest, plan, host
        self.leases = leases  # cluster-wide slots (fastrelay.cluster) held with this one
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
        if self.leases:
            q._spawn(q.cluster.release(self.leases))
        self.connected()
        d.sessions -= 1
        q._kick(d)


class Queue:
    def __init__(self, cfg: Config, spool, router: Router, mainlog: MainLog, connect: Connector,
                 submit: Callable[[list[tuple[Envelope, bytes]]], Awaitable[Any]] | None = None,
                 hostname: str = "localhost", cluster=None):
        self.cfg = cfg
        self.cluster = cluster  # fastrelay.cluster.ClusterGate when Cluster_Redis is set
        self.spool = spool
        self.router = router
        self.mainlog = mainlog
        self.connect = connect
        self.submit = submit  # how DSNs are queued (the relay's intake)
        self.hostname = hostname
        self.items: dict[int, Item] = {}
        self.dests: dict[tuple[str, str], Dest] = {}
        self._heap: list[tuple[float, int, Item]] = []
        self._seq = itertools.count()
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
        for e in entries:
            it = Item(e.id, e.domain, e.binding, e.next_attempt, e.attempts, e.first_queued, e.size)
            self.items[e.id] = it
            self._schedule(it, now)

    def _schedule(self, it: Item, now: float) -> None:
        # A drain moves everything now: the schedule travels with the message (teleport).
        if it.due <= now or self.draining is not None:
            d = self._dest(it)
            d.ready.append(it)
            self._kick(d)
        else:
            heapq.heappush(self._heap, (it.due, next(self._seq), it))
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
            while len(d.ready) > d.connecting and not self._stopping:
                try:
                    plan = self._narrow(d, await self.router.plan(d.domain, d.binding))
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
                    return  # a release on this site or one of its hosts kicks the pump again
                if host == ALL_DOWN:
                    code, text = self._down_reason(plan)
                    await self._defer_ready(d, code, text)
                    continue
                leases = None
                if self.cluster is not None:
                    try:
                        adm = await self.cluster.open_connection(d.domain, d.binding, plan.hops[host].name)
                    except BaseException:
                        self._free_slot(plan, host)
                        raise
                    if adm.retry_in > 0:
                        # A cluster-wide limit is full or the connection throttle waits: give the
                        # local slot back and ask again later, holding no worker meanwhile.
                        self._free_slot(plan, host)
                        self._pause(d, adm.retry_in)
                        return
                    leases = adm.leases
                # Reserve and release in pairs: the slot goes back when the session task ends,
                # however it ends (even cancelled before its first step, when no `finally` runs).
                slot = _Slot(self, d, plan, host, leases)
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
        self._kick(d)

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
            # RELIABILITY.md case 50: a bug must not lose the message nor kill the scheduler.
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
        try:
            try:
                conn = await self.connect(hop, self._settings(d))
            except D.ConnectError as e:
                log.info("%s: host %s:%s unusable: %s %s", d.domain, hop.ip, hop.port, e.code, e.text)
                if e.policy:
                    # This destination's TLS policy refused the host: only this destination
                    # avoids it (for host_failure_retry); other domains keep using it.
                    d.avoid[host] = (time.monotonic() + self.router.failure_wait(plan, host), e.code, e.text)
                    return
                # RELIABILITY.md cases 38-39: this host is avoided for a while; the messages stay
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
            while conn.usable and not self._stopping:
                it = self._take(d)
                if it is None:
                    if not await self._idle(d, keep):
                        break
                    d.connecting -= 1  # woken for a message: it takes one now (or finds none)
                    continue
                if self.cluster is not None:
                    await self.cluster.before_message(d.domain, d.binding)
                await self._deliver_one(it, conn, hop)
        finally:
            if conn is not None:
                try:
                    await conn.close()
                except Exception:  # close never matters to the outcome
                    log.debug("close failed", exc_info=True)
            slot.release()

    async def _idle(self, d: Dest, keep: float) -> bool:
        """Keep an open connection for `keep` seconds in case more mail comes for its destination
        (Momentum's outbound idle_timeout): a new connection costs a handshake, a
        greeting and an EHLO. True if woken for a message, False when the time is up."""
        if keep <= 0 or self._stopping:
            return False
        waiter = asyncio.get_running_loop().create_future()
        d.idle.append(waiter)
        timer = asyncio.get_running_loop().call_later(keep, _expire_idle, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            if not waiter.done():
                waiter.cancel()
            try:
                d.idle.remove(waiter)
            except ValueError:
                pass

    def _take(self, d: Dest) -> Item | None:
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
                results = await conn.deliver(
                    env.sender, env.mail_params,
                    [(env.recipients[i].address, env.recipients[i].params) for i in idx], body,
                )
            crashpoint("after_remote_ok")
            # A next hop that took the DSN parameters reports success itself (RFC 3461 §5.2.1);
            # XFER carries them to the peer. Otherwise NOTIFY=SUCCESS is answered here.
            success = None if hop.proto == "xfer" or getattr(conn, "takes_dsn", True) else \
                (DELIVERED_ACTION if hop.proto == "lmtp" else RELAYED_ACTION)
            await self._apply(it, env, body, idx, results, f"{hop.ip}:{hop.port}",
                              ok_kind="X" if hop.proto == "xfer" else "D", mta=mta_name(hop), success=success)
        except SpoolError as e:
            # The spool could not read or write this message now: not the message's fault, so it
            # does not count towards quarantine; nothing changed on disk, so it is simply tried again.
            self._retry_later(it, e)
        except Exception:
            # A bug or an unexpected failure must not kill the worker or lose the message
            # (RELIABILITY.md case 50): retry later; quarantine a message that keeps failing.
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
        it.domain = env.domain
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
        heapq.heappush(self._heap, (it.due, next(self._seq), it))
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
                     ok_kind: str = "D", mta: str = "", success: str | None = None) -> None:
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
                self.mainlog.outcome(ok_kind, env, r.address, size, remote, res.response)
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
        it.domain = env.domain
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
        RELIABILITY.md case 18). It is durable before the recipients are marked failed, so a
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
        short by kill -9 and run again delivers each message once (RELIABILITY.md case 36).
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


def delivery_settings(cfg: Config, domain: str, binding: str, hostname: str) -> D.Settings:
    g = cfg.get
    return D.Settings(
        helo_name=hostname,
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
        tls_ca=g("TLS_CA", domain, binding),
        # Momentum: TLS_Certificate/TLS_Key in an outbound scope is the client certificate presented.
        tls_cert=cfg.conf_path(cfg.lookup("TLS_Certificate", domain, binding)),
        tls_key=cfg.conf_path(cfg.lookup("TLS_Key", domain, binding)),
        http_uri=g("HTTP_URI", domain, binding),
        http_method=g("HTTP_METHOD", domain, binding),
        http_host=g("HTTP_HOST", domain, binding),
        teleport=g("teleport_enabled", domain, binding),
        xfer_secret=g("xfer_secret", domain, binding),
        xfer_token=g("xfer_token", domain, binding),
    )
