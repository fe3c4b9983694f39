"""Run Workers > 1: bind the listeners, fork the worker processes, restart the ones that die.

Momentum runs several event loops in one process (multi-event-loops.md); a Python event loop holds
the GIL, so fastrelay runs them as processes instead. The supervisor is small and synchronous (no
event loop, no threads: it forks): it binds, for every Listen, one SO_REUSEPORT socket per worker
on the same address (the kernel spreads new connections over them; a dead worker's socket stays
open here, so the connections queued on it wait for its successor instead of being reset), makes
the relay-wide shared counters (fastrelay._impl.SharedCounters), forks worker K with its sockets,
and then only waits for signals:

- a worker that dies is logged, its shared slots are swept (its column zeroed: counters may not
  leak) and it is forked again (after a backoff if it keeps dying); the successor opens the same
  spool shard and recovers what was queued there (fastrelay.shards);
- SIGTERM / SIGINT: forwarded to every worker, which drains as a single process does; the
  supervisor exits once all have stopped (they are killed after WORKER_STOP_TIMEOUT);
- SIGHUP: forwarded to every worker.

The admin (fastrelay.admin.workers): each Admin_Listener address is bound here once and handed to
worker 0 only, whose admin is a front over every worker's queue; every other worker serves its
queue API on an internal loopback socket (bound here too, so a restarted worker's successor
answers on the same address), guarded by a secret made for this run.

Workers = 1 never gets here: `fastrelay run` is then the single process it always was.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import select
import signal
import socket
import time

from fastrelay import __version__, _impl, limits
from fastrelay.config import Config
from fastrelay.relay import WorkerInfo

log = logging.getLogger("fastrelay.supervisor")

_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_PR_SET_PDEATHSIG = 1


def bind_shared(host: str, port: int, n: int) -> list[socket.socket]:
    """n listening sockets on the same address with SO_REUSEPORT (port 0: the first one's port).
    An empty host is every address: one dual-stack IPv6 socket where IPv6 works, else 0.0.0.0."""
    if not host:
        if socket.has_ipv6:
            try:
                return _bind_n(socket.AF_INET6, ("::", port), n, dual=True)
            except OSError as e:
                if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    raise
        return _bind_n(socket.AF_INET, ("0.0.0.0", port), n)
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return _bind_n(info[0], info[4], n)


def _bind_n(family: int, addr: tuple, n: int, dual: bool = False) -> list[socket.socket]:
    out: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            out.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if dual:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(addr)
            if addr[1] == 0:
                addr = (addr[0], s.getsockname()[1], *addr[2:])
            s.listen(1024)
            s.setblocking(False)
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


def _describe(kind: str, s: socket.socket) -> str:
    addr = s.getsockname()
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return f"{kind} on {host}:{addr[1]}"


class Supervisor:
    """The parent of N worker processes (see the module docstring)."""

    def __init__(self, cfg: Config, n: int, use_uvloop: bool = True, log_level: str = "info"):
        self.cfg = cfg
        self.n = n
        self.use_uvloop = use_uvloop
        self.log_level = log_level
        self.esmtp: list[list[socket.socket]] = []  # per Listen: one socket per worker
        self.http: list[list[socket.socket]] = []
        self.admin: list[socket.socket] = []  # per Admin_Listener Listen: one socket, for worker 0
        self.peer: list[socket.socket] = []  # per worker: its internal admin socket
        self.peer_names: list[str] = []
        self.secret = secrets.token_urlsafe(32)
        self.shared = None
        self.pids: dict[int, int] = {}  # pid -> worker index
        self.started: dict[int, float] = {}  # worker index -> monotonic start time
        self.delay: dict[int, float] = {}  # worker index -> current restart delay
        self.restart_at: dict[int, float] = {}  # worker index -> when to fork it again
        self.ready: set[int] = set()
        self.announced = False
        self.stopping = False
        self.failed = False  # a worker died before the relay was ever ready
        self._mask: set = set()
        self._ready_r = self._ready_w = -1

    # --- start ----------------------------------------------------------------------------------
    def _bind(self) -> None:
        for listen in self.cfg.esmtp_listens:
            try:
                self.esmtp.append(bind_shared(listen.address.host, listen.address.port, self.n))
            except OSError as e:
                raise OSError(f"ESMTP listener {listen.address}: {e.strerror or e}") from None
        if self.cfg.xfer_server_enabled:
            for listen in self.cfg.http_listens:
                try:
                    self.http.append(bind_shared(listen.address.host, listen.address.port, self.n))
                except OSError as e:
                    raise OSError(f"HTTP listener {listen.address}: {e.strerror or e}") from None
        for listen in self.cfg.admin_listens:
            try:
                self.admin.append(bind_shared(listen.address.host, listen.address.port, 1)[0])
            except OSError as e:
                raise OSError(f"Admin listener {listen.address}: {e.strerror or e}") from None
        if self.admin:
            for _k in range(self.n):
                # Loopback TCP on a port the kernel picks (uvloop cannot reach an abstract unix
                # socket, and a socket file's path may be too long); the secret keeps other
                # local clients out.
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                self.peer.append(s)
                s.bind(("127.0.0.1", 0))
                s.listen(128)
                s.setblocking(False)
                self.peer_names.append(f"127.0.0.1:{s.getsockname()[1]}")

    def _make_shared(self) -> None:
        make = getattr(_impl, "SharedCounters", None)
        if make is not None:
            self.shared = make(self.n, self.cfg.get("shared_counter_slots"))

    def run(self) -> int:
        try:
            self._bind()
            self._make_shared()
        except OSError as e:
            log.error("cannot start: %s", e)
            self._close_sockets()
            return 1
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        try:
            for k in range(self.n):
                self._spawn(k)
            return self._loop()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            os.close(self._ready_r)
            os.close(self._ready_w)
            self._close_sockets()

    def _close_sockets(self) -> None:
        for group in self.esmtp + self.http:
            for s in group:
                s.close()
        for s in self.admin + self.peer:
            s.close()

    def _spawn(self, k: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's code
            rc = 1
            try:
                rc = self._worker(k)
            except BaseException:
                logging.getLogger("fastrelay").exception("worker %d failed", k)
            finally:
                logging.shutdown()
                os._exit(rc)
        self.pids[pid] = k
        self.started[k] = time.monotonic()
        self.restart_at.pop(k, None)

    def _worker(self, k: int) -> int:
        from fastrelay import runner

        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        try:  # a worker whose supervisor is gone (kill -9) stops instead of running on alone
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
        if os.getppid() == 1:
            return 0
        os.close(self._ready_r)
        for group in [*self.esmtp, *self.http, self.peer]:
            for i, s in enumerate(group):
                if i != k:
                    s.close()
        if k != 0:
            for s in self.admin:
                s.close()
        runner.setup_logging(self.log_level, f"fastrelay[w{k}]")
        info = WorkerInfo(k, self.n, [g[k] for g in self.esmtp], [g[k] for g in self.http], self.shared,
                          admin_sockets=list(self.admin) if k == 0 else [],
                          peer_socket=self.peer[k] if self.peer and k != 0 else None,
                          peers=list(self.peer_names), secret=self.secret)
        ready_w = self._ready_w

        def ready() -> None:
            os.write(ready_w, b"%d\n" % k)

        return runner.run_loop(self.cfg, self.use_uvloop, info, ready)

    # --- the wait loop ----------------------------------------------------------------------------
    def _loop(self) -> int:
        deadline = float("inf")
        while True:
            info = signal.sigtimedwait(_SIGNALS, 0.1)
            sig = info.si_signo if info is not None else None
            if sig in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                self._stop()
                deadline = time.monotonic() + self.cfg.get("worker_stop_timeout")
            elif sig == signal.SIGHUP:
                log.info("SIGHUP: forwarded to %d workers", len(self.pids))
                self._signal_all(signal.SIGHUP)
            failed = self._reap()
            if failed:
                self._stop()
                deadline = time.monotonic() + self.cfg.get("worker_stop_timeout")
            self._read_ready()
            if self.stopping:
                if not self.pids:
                    log.info("stopped")
                    return 1 if self.failed else 0
                if time.monotonic() > deadline:
                    log.error("%d workers did not stop in %.0fs: killed", len(self.pids),
                              self.cfg.get("worker_stop_timeout"))
                    self._signal_all(signal.SIGKILL)
                    deadline = float("inf")
                continue
            now = time.monotonic()
            for k, at in list(self.restart_at.items()):
                if at <= now:
                    self._spawn(k)

    def _stop(self) -> None:
        if not self.stopping:
            log.info("stopping %d workers", len(self.pids))
        self.stopping = True
        self.restart_at.clear()
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: int) -> None:
        for pid in list(self.pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _reap(self) -> bool:
        """Collect dead workers; True if one died before the relay was ever ready (a startup
        failure: restarting it would only fail again)."""
        failed = False
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            k = self.pids.pop(pid, None)
            if k is None:
                continue
            self.ready.discard(k)
            how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exited with status {os.WEXITSTATUS(status)}")
            if self.shared is not None:
                swept = self.shared.sweep(k)
            else:
                swept = 0
            if self.stopping:
                log.info("worker %d (pid %d) %s", k, pid, how)
                continue
            if not self.announced:
                log.error("worker %d (pid %d) %s before the relay was ready; stopping", k, pid, how)
                self.failed = failed = True
                continue
            up = time.monotonic() - self.started.get(k, 0.0)
            first = self.cfg.get("worker_restart_delay")
            d = self.delay.get(k, first)
            if up >= limits.WORKER_STABLE_AFTER:
                d = first
            else:  # it keeps dying: back off
                d = min(d * 2, max(first, self.cfg.get("worker_restart_max")))
            self.delay[k] = d
            self.restart_at[k] = time.monotonic() + d
            log.warning("worker %d (pid %d) %s; the %d shared connection counts it held released; restarting it in "
                        "%.1fs (its spool shard is recovered by the new worker)", k, pid, how, swept, d)
        return failed

    def _read_ready(self) -> None:
        r, _, _ = select.select([self._ready_r], [], [], 0)
        if not r:
            return
        try:
            data = os.read(self._ready_r, 4096)
        except BlockingIOError:
            return
        for line in data.split():
            self.ready.add(int(line))
        if not self.announced and len(self.ready) >= self.n:
            self.announced = True
            listeners = ([_describe("smtp", g[0]) for g in self.esmtp] + [_describe("xfer", g[0]) for g in self.http]
                         + [_describe("admin", s) for s in self.admin])
            log.info("fastrelay %s ready (%d workers, %s hot paths, pid %d): %s", __version__, self.n, _impl.IMPL,
                     os.getpid(), ", ".join(listeners) or "no listeners")
