"""Compose the relay: spool, mainlog, queue and listeners, started and stopped together."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from fastrelay import _impl, shards
from fastrelay.bindings import Assigner
from fastrelay.config import Config
from fastrelay.mainlog import MainLog
from fastrelay.message import Envelope
from fastrelay.smtp.server import ListenSettings, SMTPServer
from fastrelay.spool import Spool, SpoolError

log = logging.getLogger("fastrelay.relay")


class StartupError(Exception):
    """The relay cannot start (a listener cannot bind, the spool cannot open)."""


@dataclass
class WorkerInfo:
    """What a worker process gets from its supervisor (fastrelay.supervisor): its number, how many
    workers there are, its listening sockets (one per Listen, in conf order) and the
    relay-wide shared counters. The admin (fastrelay.admin.workers): worker 0 gets the
    Admin_Listener sockets; every other worker its internal admin socket (peer_socket); all of
    them every worker's internal socket address (peers, by index) and the run's secret."""

    index: int
    count: int
    esmtp_sockets: list[socket.socket] = field(default_factory=list)
    http_sockets: list[socket.socket] = field(default_factory=list)
    shared: Any = None
    admin_sockets: list[socket.socket] = field(default_factory=list)
    peer_socket: socket.socket | None = None
    peers: list[str] = field(default_factory=list)
    secret: str = ""


class Relay:
    """Everything one `fastrelay run` process holds (or one worker of it). Receiving goes through
    `submit`."""

    def __init__(self, cfg: Config, worker: WorkerInfo | None = None, drain_to=None):
        self.cfg = cfg
        self.worker = worker
        # `fastrelay drain --to`: no listeners, delivery on even if suspended, every message to
        # this XFER peer (a config.types.Route).
        self.drain_to = drain_to
        # Shard k of n (fastrelay.shards); a single process is shard 0 of 1: the spool directory.
        self.shard, self.shards = (worker.index, worker.count) if worker is not None else (0, 1)
        self.spool_dir = shards.shard_dir(cfg.spool_dir, self.shard)
        self.spool: Spool | None = None
        self.mainlog: MainLog | None = None
        self.queue = None  # the scheduler (fastrelay.queue), when delivery is enabled
        self.smtp_servers: list[SMTPServer] = []
        self.xfer_servers: list = []
        self.admin_servers: list = []  # fastrelay.admin: the admin API on each Admin_Listener address
        self.internal_admin = None  # Workers > 1, worker K >= 1: its queue API for worker 0's front
        self.recovered = 0
        self.resolver = None
        self.cluster = None  # fastrelay.cluster.ClusterLimits when Cluster_Redis is set
        self.claims = None  # Workers > 1 with XFER: the relay-wide claims (fastrelay.xfer.claims)
        self.hostname = cfg.get("Hostname") or socket.gethostname()
        self.binder = Assigner(cfg)  # binding assignment (issue #10), shared by the listeners
        self._memtrim: asyncio.Future | None = None  # fastrelay.memtrim's task
        self._prebound: dict[int, socket.socket] = {}  # listener sockets bound before a privilege drop

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        self._check_config()
        # Security { User Group } (Momentum): bind every listener as root, then drop to the user
        # before the spool and the mainlog are opened, so their files belong to that user. A worker
        # (issue 13) drops too; its listener sockets were bound by the supervisor.
        user = cfg.security.get("user")
        if user is not None and self.drain_to is None:
            from fastrelay import privileges

            group = cfg.security.get("group")
            if self.worker is None:
                self._prebind()
            try:
                privileges.drop(user[0], group[0] if group else None)
            except (privileges.PrivilegeError, OSError) as e:
                self._close_prebound()
                raise StartupError(str(e)) from None
        self.spool = Spool(self.spool_dir, fsync=cfg.get("spool_fsync"), min_free_bytes=cfg.get("spool_min_free"),
                           commit_delay=cfg.get("spool_commit_delay"),
                           few_clients=cfg.get("spool_commit_few_clients"),
                           cpu_scheduling=cfg.get("cpu_scheduling"))
        self.spool.sources = self.clients_sending
        try:
            await self.spool.open()
            await self._open_claims()
            await self._adopt_shards()
            await self._settle_claims()
            entries = self.spool.recover()
        except (SpoolError, OSError) as e:
            raise StartupError(f"spool {self.spool_dir}: {e}") from None
        self.recovered = len(entries)
        if entries:
            log.info("recovered %d queued messages from %s", len(entries), self.spool_dir)
        self.mainlog = MainLog(self._mainlog_path(), max_pending=cfg.get("mainlog_max_pending"))
        try:
            self.mainlog.open()
        except OSError as e:
            raise StartupError(f"mainlog {self.mainlog.path}: {e.strerror or e}") from None
        await self._start_delivery(entries)
        if entries and cfg.get("memory_trim_interval") > 0:
            # Recovery built a record per queued message and let them go: hand that back now
            # rather than at the first memory_trim_interval (a million messages: ~0.2 GB).
            del entries
            from fastrelay import memtrim

            await asyncio.to_thread(memtrim.trim)
        if self.drain_to is not None:
            self.queue.drain_to(self.drain_to)
            return
        await self._start_xfer_server()
        for i, listen in enumerate(cfg.esmtp_listens):
            try:
                settings = ListenSettings(listen)
            except (OSError, ValueError) as e:
                raise StartupError(f"ESMTP listener {listen.address}: {e}") from None
            srv = SMTPServer(settings, self)
            if self.worker is not None and self.worker.shared is not None:
                srv.share(self.worker.shared, self.worker.index, str(listen.address))
            srv.binder = self.binder.for_listener(listen)
            try:
                if self.worker is not None:  # sockets bound by the supervisor (SO_REUSEPORT)
                    await srv.start(None, 0, sock=self.worker.esmtp_sockets[i])
                else:
                    await srv.start(listen.address.host or None, listen.address.port,
                                    sock=self._prebound.pop(id(listen), None))
            except OSError as e:
                raise StartupError(f"ESMTP listener {listen.address}: {e.strerror or e}") from None
            self.smtp_servers.append(srv)
        if self.queue is not None:
            for srv in self.smtp_servers:
                for sock in srv.sockets:
                    addr = sock.getsockname()
                    self.queue.router.own_addresses.add((addr[0], addr[1]))
        await self._start_admin()
        self._start_memtrim()

    def _start_memtrim(self) -> None:
        from fastrelay import memtrim

        self._memtrim = asyncio.ensure_future(memtrim.run(self.cfg.get("memory_trim_interval")))

    async def _start_admin(self) -> None:
        """Issue 12: the admin API, /metrics and the status page on each Admin_Listener address."""
        from fastrelay.admin.server import start_admin, start_internal

        self.admin_servers = await start_admin(self)
        self.internal_admin = await start_internal(self)

    async def reload(self, new_cfg: Config | None = None) -> dict:
        """Validate and apply a configuration (re-read from the conf file when None) without a
        restart; one that does not validate changes nothing. What SIGHUP and the API call."""
        from fastrelay.admin.reload import reload_relay

        return await reload_relay(self, new_cfg)

    def _prebind(self) -> None:
        """Bind (and listen on) every listener's socket now, while still root (port 25)."""
        listens = list(self.cfg.esmtp_listens) + (list(self.cfg.http_listens) if self.cfg.xfer_server_enabled else [])
        for listen in listens:
            host, port = listen.address.host, listen.address.port
            try:
                if not host and socket.has_dualstack_ipv6():
                    sock = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                                backlog=1024, reuse_port=False)
                else:
                    family = socket.AF_INET6 if ":" in (host or "") else socket.AF_INET
                    sock = socket.create_server((host or "", port), family=family, backlog=1024)
            except OSError as e:
                self._close_prebound()
                raise StartupError(f"listener {listen.address}: {e.strerror or e}") from None
            self._prebound[id(listen)] = sock

    def _close_prebound(self) -> None:
        for sock in self._prebound.values():
            sock.close()
        self._prebound.clear()

    def _check_config(self) -> None:
        """The whole-conf checks `check-config` makes (fastrelay.config.model.check_runnable), so a
        Relay started from code refuses what the CLI refuses; warnings go to the log."""
        from fastrelay.config.model import check_runnable

        errors, warnings = check_runnable(self.cfg)
        if errors:
            raise StartupError("; ".join(str(e) for e in errors))
        for w in [*self.cfg.warnings, *warnings]:
            log.warning("config: %s:%d:%d: %s", w.file, w.line, w.col, w.message)

    async def _adopt_shards(self) -> None:
        """Move the messages of shards no worker of this run owns (the previous run had more
        workers) into ours: no message is orphaned by a smaller Workers (issue 13)."""
        cfg = self.cfg
        for j in shards.adopted_by(self.shard, self.shards, cfg.spool_dir):
            src = shards.shard_dir(cfg.spool_dir, j)
            n = await shards.adopt(src, self.spool, fsync=cfg.get("spool_fsync"),
                                   min_free_bytes=cfg.get("spool_min_free"))
            log.info("adopted spool shard %d (%s): %d queued messages moved into shard %d",
                     j, src, n, self.shard)

    async def _open_claims(self) -> None:
        """Workers > 1 with an XFER server: open the relay-wide claims and import every shard's
        XFER keys into them before this worker serves (fastrelay.xfer.claims). Workers = 1 keeps
        its shard's own keys only, as it always did."""
        cfg = self.cfg
        if self.shards <= 1 or not cfg.xfer_server_enabled:
            return
        from fastrelay.xfer.claims import ClaimTable

        claims = ClaimTable(cfg.spool_dir, self.shard, self.shards)
        await claims.open()
        self.claims = claims
        # This run's shards, and the ones this worker adopts (imported before they are emptied).
        todo = [*range(self.shards), *shards.adopted_by(self.shard, self.shards, cfg.spool_dir)]
        n = await claims.import_shards([(k, shards.shard_dir(cfg.spool_dir, k)) for k in todo])
        if n:
            log.info("XFER claims: %d keys imported from the spool shards' own tables", n)

    async def _settle_claims(self) -> None:
        """The claims this worker's predecessor (or an adopted shard's worker) left pending."""
        if self.claims is None:
            return
        done, deleted = await self.claims.settle(self.spool_dir)
        if done or deleted:
            log.info("XFER claims left pending by a previous worker %d: %d were stored (now done), %d were not "
                     "(freed)", self.shard, done, deleted)

    async def _start_delivery(self, entries: list) -> None:
        """Start the scheduler. suspend_delivery is the queue's to apply per destination (a Domain
        may set it off under a global on, Momentum's fallback): accepted mail just stays queued."""
        cfg = self.cfg
        if cfg.get("suspend_delivery") and self.drain_to is None:
            log.info("delivery is suspended (suspend_delivery): mail is accepted and queued only, except "
                     "for scopes that set it off")
        from fastrelay.delivery.connect import connect
        from fastrelay.dns import Resolver, dns_servers
        from fastrelay.queue import Queue
        from fastrelay.routing import Router

        self.resolver = Resolver(dns_servers(cfg), timeout=cfg.get("DNS_Timeout"))
        table = None
        w = self.worker
        if w is not None and w.shared is not None:
            # Issue 13: connection limits hold for the whole relay, not per worker.
            table = _impl.RouteTable(w.shared, w.index)
        router = Router(cfg, self.resolver, table, worker=w.index if w is not None else 0)
        gate = None
        if cfg.get("Cluster_Redis"):
            from fastrelay.cluster import ClusterGate, ClusterLimits

            # A node starts even if Redis is down: it delivers under its local share meanwhile.
            self.cluster = ClusterLimits(cfg.get("Cluster_Redis"), cfg.get("Cluster_Node"),
                                         lease_ttl=cfg.get("Cluster_Lease_Time"), workers=self.shards)
            await self.cluster.start()
            gate = ClusterGate(cfg, self.cluster)
        self.queue = Queue(cfg, self.spool, router, self.mainlog, connect, submit=self.submit,
                           hostname=self.hostname, cluster=gate)
        self.queue.enqueue(entries)

    async def _start_xfer_server(self) -> None:
        """Seeds 000/001: `script ... { source = "msys.xfer.server" }` plus HTTP_Listener."""
        cfg = self.cfg
        if not cfg.xfer_server_enabled:
            return
        from fastrelay.xfer.server import XferServer, XferServerSettings

        # No HTTP_Listener, or no authentication with a non-loopback xfer_allowed_clients, were
        # dealt with by _check_config (an error; a warning naming the risk). With no xfer_secret
        # or xfer_tokens the server accepts from xfer_allowed_clients only: network
        # authentication, as relay_hosts is for SMTP (docs/xfer.md).
        for i, listen in enumerate(cfg.http_listens):
            settings = XferServerSettings.from_listen(listen)
            srv = XferServer(settings, self)
            try:
                if self.worker is not None:
                    await srv.start(None, 0, sock=self.worker.http_sockets[i])
                else:
                    await srv.start(listen.address.host or None, listen.address.port,
                                    sock=self._prebound.pop(id(listen), None))
            except OSError as e:
                raise StartupError(f"HTTP listener {listen.address}: {e.strerror or e}") from None
            self.xfer_servers.append(srv)

    def _mainlog_path(self) -> str:
        return self.cfg.mainlog_path

    def describe_listeners(self) -> list[str]:
        out = []
        for srv in self.smtp_servers:
            for sock in srv.sockets:
                addr = sock.getsockname()
                host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
                out.append(f"smtp on {host}:{addr[1]}")
        for xsrv in self.xfer_servers:
            for sock in xsrv.sockets:
                addr = sock.getsockname()
                host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
                out.append(f"xfer on {host}:{addr[1]}")
        for asrv in self.admin_servers:
            for sock in asrv.sockets:
                addr = sock.getsockname()
                host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
                out.append(f"admin on {host}:{addr[1]}")
        return out

    async def drain(self, route, timeout: float) -> int:
        """Stop taking mail, move every queued message to the XFER peer `route`, and wait up to
        `timeout` seconds; returns how many messages are left in the spool."""
        for srv in self.smtp_servers:
            await srv.stop()
        self.smtp_servers.clear()
        for xsrv in self.xfer_servers:
            await xsrv.stop()
        self.xfer_servers.clear()
        if self.queue is None:  # delivery suspended: start it for the drain
            self.drain_to = route
            await self._start_delivery(self.spool.recover())
        self.queue.drain_to(route)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.queue.items and loop.time() < end:
            await asyncio.sleep(0.05)
        return len(self.queue.items)

    async def stop(self) -> None:
        if self._memtrim is not None:
            self._memtrim.cancel()
            self._memtrim = None
        for asrv in self.admin_servers:
            await asrv.stop()
        self.admin_servers.clear()
        self._close_prebound()  # a start that failed after binding them
        if self.internal_admin is not None:
            await self.internal_admin.stop()
            self.internal_admin = None
        for srv in self.smtp_servers:
            await srv.stop()
        self.smtp_servers.clear()
        for xsrv in self.xfer_servers:
            await xsrv.stop()
        self.xfer_servers.clear()
        if self.queue is not None:
            await self.queue.stop()
        if self.resolver is not None:
            await self.resolver.close()
        if self.cluster is not None:
            await self.cluster.close()
        if self.cfg.xfer_client_enabled or self.queue is not None:
            from fastrelay.delivery.xfer import close_sessions

            await close_sessions()
        if self.spool is not None:
            await self.spool.close()
        if self.claims is not None:
            await self.claims.close()  # after the spool: a store in flight finishes with both
        if self.mainlog is not None:
            self.mainlog.close()

    # --- intake (what the SMTP server hands complete messages to) --------------------------------
    def clients_sending(self) -> int:
        """Clients that may hand this process a message soon: open SMTP sessions and XFER requests
        being handled (the spool's group commit window waits only when another may come). Called
        from the spool's writer thread; it only reads sizes."""
        return sum(len(srv.sessions) for srv in self.smtp_servers) + \
            sum(xsrv.in_flight for xsrv in self.xfer_servers)

    def space_ok(self, need: int = 0) -> bool:
        return self.spool.space_ok(need)

    async def submit(self, items: list[tuple[Envelope, bytes]]) -> list:
        """Make a message durable (P1), log its reception, and hand it to the scheduler."""
        entries = await self.spool.add(items)
        for env, body in items:
            self.mainlog.received(env, len(body))
        if self.queue is not None:
            self.queue.enqueue(entries)
        return entries

    # --- XFER intake (what the XFER server hands transfers to) ----------------------------------
    @property
    def node_id(self) -> str:
        return self.spool.node_id

    async def submit_transfer(self, items: list[tuple[Envelope, bytes]], key: tuple[str, str]) -> tuple[str, bool]:
        """Make a transfer durable at most once per (origin node, origin id) (docs/reliability.md case
        36); returns (our msgid, duplicate). Only then may the XFER server answer 200 (P1). With
        Workers > 1 the key is claimed relay-wide first (a resend may reach another worker);
        fastrelay.xfer.claims.TransferInProgress (a SpoolError: a 503) while another worker stores it."""
        if self.claims is not None:
            return await self.claims.store_once(key, lambda: self._store_transfer(items, key))
        return await self._store_transfer(items, key)

    async def _store_transfer(self, items: list[tuple[Envelope, bytes]], key: tuple[str, str]) -> tuple[str, bool]:
        """Into this process's own shard, once per key there (Spool.add_once)."""
        entries, dup = await self.spool.add_once(items, key)
        if dup is not None:
            return dup, True
        for env, body in items:
            self.mainlog.received(env, len(body))
        if self.queue is not None:
            self.queue.enqueue(entries)
        return items[0][0].msgid, False
