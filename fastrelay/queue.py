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

    __slots__ = ("binding", "connecting", "domain", "idle", "pumping", "ready", "sessions", "settings")

    def __init__(self, domain: str, binding: str):
        self.domain = domain
        self.binding = binding
        self.ready: deque[Item] = deque()
        self.sessions = 0
        self.connecting = 0  # sessions started (or woken from idle) that have not taken a message yet
        self.idle: deque[asyncio.Future] = deque()  # open connections waiting for more mail
        self.pumping = False
        self.settings: D.Settings | None = None


Connector = Callable[[D.Hop, D.Settings], Awaitable[D.Connection]]


def _expire_idle(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(False)


class _Slot:
    """A connection slot the router granted for one session; `release` is idempotent."""

    __slots__ = ("dest", "host", "is_connecting", "plan", "q", "released")

    def __init__(self, q: Queue, dest: Dest, plan: Plan, host: int):
        self.q, self.dest, self.plan, self.host = q, dest, plan, host
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
        q.router.release(self.plan, self.host)
        self.connected()
        d.sessions -= 1
        q._kick(d)
        for waiting in (q._blocked_site.pop(self.plan.site, ()), q._blocked_host.pop(self.host, ())):
            for w in waiting:
                q._kick(w)


class Queue:
    def __init__(self, cfg: Config, spool, router: Router, mainlog: MainLog, connect: Connector,
                 submit: Callable[[list[tuple[Envelope, bytes]]], Awaitable[Any]] | None = None,
                 hostname: str = "localhost"):
        self.cfg = cfg
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

    # --- intake -------------------------------------------------------------------------------
    def enqueue(self, entries: list) -> None:
        """Add spool entries (IndexEntry records) from reception or recovery."""
        now = time.time()
        for e in entries:
            it = Item(e.id, e.domain, e.binding, e.next_attempt, e.attempts, e.first_queued, e.size)
            self.items[e.id] = it
            self._schedule(it, now)

    def _schedule(self, it: Item, now: float) -> None:
        if it.due <= now:
            d = self._dest(it)
            d.ready.append(it)
            self._kick(d)
        else:
            heapq.heappush(self._heap, (it.due, next(self._seq), it))
            if it.due < self._timer_at:
                self._arm()

    def _dest(self, it: Item) -> Dest:
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
        if self._suspensions and self._suspended(d):
            return  # suspended by the operator (queue API): no new session, no idle one woken
        # An idle open connection takes new mail before any new connection is opened.
        while d.idle and len(d.ready) > d.connecting:
            waiter = d.idle.popleft()
            if not waiter.done():
                waiter.set_result(True)
                d.connecting += 1
        if not d.pumping and d.ready and not self._stopping:
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
                # Reserve and release in pairs: the slot goes back when the session task ends,
                # however it ends (even cancelled before its first step, when no `finally` runs).
                slot = _Slot(self, d, plan, host)
                self.stats["sessions"] += 1
                self._spawn(self._session(slot)).add_done_callback(slot.release)
        finally:
            d.pumping = False

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

    # --- lifecycle ----------------------------------------------------------------------------
    async def stop(self) -> None:
        self._stopping = True
        for d in self.dests.values():
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
                "destinations": rows, "suspended": self.api_suspensions()}

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
                it.domain = dst
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


def delivery_settings(cfg: Config, domain: str, binding: str, hostname: str) -> D.Settings:
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
    )
