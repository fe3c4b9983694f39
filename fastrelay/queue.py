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
from fastrelay.config import Config
from fastrelay.crash import crashpoint
from fastrelay.mainlog import MainLog
from fastrelay.message import DELIVERED, FAILED, PENDING, Envelope
from fastrelay.routing import ALL_DOWN, NO_SLOT, Plan, RouteError, Router

log = logging.getLogger("fastrelay.queue")

# The routing domain of a drain to a peer (issue #14): every message goes there, over XFER.
DRAIN_DOMAIN = "__drain__"

# A message whose delivery crashed the worker this many times is quarantined rather than
# retried forever (RELIABILITY.md case 50: poison message).
MAX_INTERNAL_ERRORS = 3


class Item:
    """The in-memory record of one spool entry."""

    __slots__ = ("attempts", "binding", "busy", "domain", "due", "errors", "first_queued", "id", "size")

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


class Dest:
    """A destination: (routing domain, binding), its ready queue and its open sessions."""

    __slots__ = ("binding", "connecting", "domain", "held", "idle", "pumping", "ready", "sessions", "settings")

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
        self.held: asyncio.TimerHandle | None = None


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
        self.stats = {"delivered": 0, "deferred": 0, "bounced": 0, "sessions": 0, "dsns": 0}
        self.draining: dict | None = None  # {"to": route text, "since": time} during a drain

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
            if self.items.get(it.id) is it and not it.busy and it.due <= now:
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
        if not d.pumping and d.ready and not self._stopping and d.held is None:
            d.pumping = True
            self._spawn(self._pump(d))

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
                    plan = await self.router.plan(d.domain, d.binding)
                except RouteError as e:
                    await self._route_failed(d, e)
                    continue
                host = self.router.acquire(plan)
                if host == NO_SLOT:
                    self._blocked_site.setdefault(plan.site, set()).add(d)
                    for h in plan.hops:
                        self._blocked_host.setdefault(h, set()).add(d)
                    return  # a release on this site or one of its hosts kicks the pump again
                if host == ALL_DOWN:
                    await self._defer_ready(d, 451, "4.4.1 All hosts for this destination are unavailable")
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
                        self._hold(d, adm.retry_in)
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

    def _hold(self, d: Dest, seconds: float) -> None:
        if d.held is None and not self._stopping:
            d.held = asyncio.get_running_loop().call_later(seconds, self._unhold, d)

    def _unhold(self, d: Dest) -> None:
        d.held = None
        self._kick(d)

    async def _route_failed(self, d: Dest, e: RouteError) -> None:
        if e.permanent:
            items = self._drain(d)
            for it in items:
                await self._finish_all(it, FAILED, e.code, e.text, remote="")
        else:
            await self._defer_ready(d, e.code, e.text)

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
        for it in self._drain(d):
            await self._finish_all(it, PENDING, code, text, remote="")

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
                # RELIABILITY.md cases 38-39: this host is avoided for a while; the messages stay
                # ready and the next session tries another host (or finds ALL_DOWN and defers).
                log.info("%s: host %s:%s unusable: %s %s", d.domain, hop.ip, hop.port, e.code, e.text)
                self.router.host_failed(plan, host)
                return
            self.router.host_ok(plan, host)
            slot.connected()
            keep = self.cfg.get("Connection_Cache_Time", d.domain, d.binding)
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
        (Postfix's smtp_connection_cache_time_limit): a new connection costs a handshake, a
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
            loaded = await self.spool.load(it.id)
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
            await self._apply(it, env, body, idx, results, f"{hop.ip}:{hop.port}",
                              ok_kind="X" if hop.proto == "xfer" else "D")
        except Exception:
            # A bug or an unexpected failure must not kill the worker or lose the message
            # (RELIABILITY.md case 50): retry later; quarantine a message that keeps failing.
            it.errors += 1
            log.exception("internal error delivering message %d (%d/%d)", it.id, it.errors, MAX_INTERNAL_ERRORS)
            conn.usable = False
            await self._internal_error(it)

    async def _internal_error(self, it: Item) -> None:
        if it.errors >= MAX_INTERNAL_ERRORS:
            loaded = await self.spool.load(it.id)
            if loaded is not None:
                await self._finish_all(it, FAILED, 554, "5.3.0 Internal error delivering this message", "", loaded)
            return
        it.busy = False
        it.due = time.time() + self.cfg.get("retry_interval", it.domain, it.binding)
        self._schedule(it, time.time())

    # --- outcomes -----------------------------------------------------------------------------
    async def _apply(self, it: Item, env: Envelope, body: bytes, idx: list[int], results: list, remote: str,
                     ok_kind: str = "D") -> None:
        size = len(body)
        failed: list[int] = []
        temp = False
        for i, res in zip(idx, results, strict=True):
            r = env.recipients[i]
            r.detail = res.response
            if res.status == D.OK:
                r.state = DELIVERED
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
            await self._bounce(env, body, failed, remote)
        if temp:
            await self._retry_or_expire(it, env, body)
        else:
            await self._done(it, env)

    async def _finish_all(self, it: Item, state: int, code: int, text: str, remote: str,
                          loaded: tuple[Envelope, bytes] | None = None) -> None:
        """Give every pending recipient of `it` the same outcome without a delivery attempt
        (route errors, all hosts down, poison messages)."""
        if loaded is None:
            loaded = await self.spool.load(it.id)
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
        expiration = cfg.get("message_expiration", env.domain, env.binding)
        max_retries = cfg.get("max_retries", env.domain, env.binding)
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
        target = cfg.reroute_target("delayed_reroute_domain", env.domain, env.binding)
        if target and target != env.domain and not env.meta.get("delayed_rerouted"):
            # Seeds 000/001: after its first transient failure, the message moves to the named
            # (XFER) domain and goes out from there at once.
            env.meta["delayed_rerouted"] = True
            env.meta.setdefault("rerouted_from", env.domain)
            env.domain = target
            env.next_attempt = now
        else:
            base = cfg.get("retry_interval", env.domain, env.binding)
            cap = cfg.get("max_retry_interval", env.domain, env.binding)
            env.next_attempt = now + min(cap, base * (2 ** min(env.attempts - 1, 30)))
        self.stats["deferred"] += 1
        crashpoint("mid_reschedule")
        await self.spool.reschedule(it.id, env)
        it.domain = env.domain
        it.attempts = env.attempts
        it.due = env.next_attempt
        it.busy = False
        self._schedule(it, now)

    async def _done(self, it: Item, env: Envelope) -> None:
        if env.done():
            # P4: the local copy goes only when every recipient is final.
            await self.spool.remove(it.id)
            self.items.pop(it.id, None)
        else:  # pragma: no cover - callers only get here with every recipient final
            await self.spool.mark_recipients(it.id, env)
            it.busy = False

    async def _bounce(self, env: Envelope, body: bytes, idx: list[int], remote: str) -> None:
        """A failure DSN to the sender for these recipients; never for the null sender
        (RFC 5321 §6.1, RELIABILITY.md case 18). It is durable before the recipients are
        marked failed, so a crash in between gives a duplicate DSN, never a lost one."""
        if not env.sender or not idx or self.submit is None:
            return
        from fastrelay.bounce import make_dsn

        items = make_dsn(env, body, idx, self.hostname, remote)
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
            if d.held is not None:
                d.held.cancel()
                d.held = None
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
        }


def delivery_settings(cfg: Config, domain: str, binding: str, hostname: str) -> D.Settings:
    from fastrelay.delivery.auth import outbound_auth

    g = cfg.get
    return D.Settings(
        helo_name=hostname,
        esmtp=g("Delivery_Method", domain, binding) != "SMTP",
        connect_timeout=g("Connect_Timeout", domain, binding),
        greeting_timeout=g("Greeting_Timeout", domain, binding),
        ehlo_timeout=g("EHLO_Timeout", domain, binding),
        tls_timeout=g("TLS_Timeout", domain, binding),
        mail_timeout=g("Mail_From_Timeout", domain, binding),
        rcpt_timeout=g("Rcpt_To_Timeout", domain, binding),
        data_timeout=g("Data_Timeout", domain, binding),
        done_timeout=g("Delivery_Response_Timeout", domain, binding),
        rset_timeout=g("RSET_Timeout", domain, binding),
        tls=g("TLS", domain, binding),
        tls_verify=g("TLS_Verify", domain, binding),
        tls_ca=g("TLS_CA", domain, binding),
        http_uri=g("HTTP_URI", domain, binding),
        http_method=g("HTTP_METHOD", domain, binding),
        http_host=g("HTTP_HOST", domain, binding),
        teleport=g("teleport_enabled", domain, binding),
        xfer_secret=g("xfer_secret", domain, binding),
        xfer_token=g("xfer_token", domain, binding),
        auth=outbound_auth(cfg, domain, binding),
    )
