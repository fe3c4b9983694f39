"""Write the mainlog: one line per reception (R), delivery (D), transient (T) or permanent (P)
failure and XFER transfer (X), with the fields of Momentum's mainlog records.

Format (documented in docs/operations.md): tab-separated fields, the record type second, so
`cut -f` and `awk -F'\\t'` work; Momentum separates with '@', which collides with addresses.

    R  time  R  msgid  recipient  sender  client_ip  size  protocol  binding  auth_user
    D  time  D  msgid  recipient  domain  size  binding  retries  seconds_in_queue  remote_ip  response  tls
    T  (as D)  the response of the transient failure
    P  (as D)  the response of the permanent failure (or the reason: expired, null MX, ...)
    X  time  X  msgid  recipient  domain  size  binding  retries  seconds_in_queue  peer  response

tls (D records only) is "tls=PROTOCOL:CIPHER" when the delivery went over TLS, as Postfix logs
"TLS connection established ... TLSv1.3 with cipher ...", else "tls=none".
time is Unix seconds with milliseconds. Fields are cleaned of tabs and control characters
(docs/reliability.md case 26). Lines are buffered and written once per event-loop tick. Each flush is
one write(2) on an O_APPEND file, so the workers of one relay (fastrelay.supervisor) can share
the file without interleaving inside a line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from fastrelay.limits import MAINLOG_MAX_PENDING
from fastrelay.message import Envelope

log = logging.getLogger("fastrelay.mainlog")
# The process log's one line per message event, for operators who tail it (issue 15): the mainlog
# stays the record. `fastrelay run --quiet-messages` sets this logger to WARNING.
events = logging.getLogger("fastrelay.events")
_EVENT = {"D": "delivered", "T": "deferred", "P": "bounced", "X": "transferred"}

_CLEAN = {c: "?" for c in range(32)} | {127: "?"}
# How long a log line may wait in memory before it is written (lines are flushed on stop too).
FLUSH_INTERVAL = 0.1
# While writes fail (full or read-only disk), how often the records kept in memory are tried again.
RETRY_INTERVAL = 1.0


def _f(v: object) -> str:
    s = str(v)
    return s if s.isprintable() else s.translate(_CLEAN)


class MainLog:
    """Buffered records, written with os.write so that exactly what the kernel took is known.

    A write that fails (ENOSPC, EROFS, EIO, a quota) or writes only part keeps the rest in memory,
    byte-exact: the next flush continues where the kernel stopped, so no record is written twice
    (a buffered file object re-sends its whole buffer after a failed flush) and none is cut. What
    waits is bounded by max_pending bytes: past it the oldest whole records are dropped and counted.
    The failure is logged once, and once more, with the count dropped, when writes work again.
    """

    def __init__(self, path: str | None, max_pending: int = MAINLOG_MAX_PENDING):
        self.path = path
        self.max_pending = max_pending
        self._fd: int | None = None
        self._buf: list[str] = []
        self._pending = bytearray()  # encoded, not yet written (starts mid-record if _partial)
        self._partial = False  # the kernel took the start of _pending's first record already
        self._scheduled = False
        self._failing: OSError | None = None  # the failure logged; None while writes work
        self.dropped = 0  # records dropped (memory bound) since the failure began
        self.stats = {"write_failures": 0, "dropped": 0}
        # Called as fn(kind, env, rcpt) for each record (kind R with rcpt None, once per entry):
        # how /metrics counts receptions and outcomes without a second bookkeeping path.
        self.observers: list[Callable[[str, Envelope, str | None], None]] = []

    def open(self) -> None:
        if self.path is None or self.path == "-":
            self._fd = 2
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def reopen(self) -> None:
        """Close and open the file again by its path (after logrotate renamed it: SIGUSR1).
        Buffered lines go to the old file first, so none is lost or split across the two."""
        self.flush()
        if self._fd is not None and self._fd != 2:
            os.close(self._fd)
        self._fd = None
        self.open()

    def close(self) -> None:
        self.flush()
        if self._pending:
            log.error("mainlog %s: %d records could not be written and are lost",
                      self.path, self._pending.count(b"\n"))
            self._pending.clear()
        if self._fd is not None and self._fd != 2:
            os.close(self._fd)
        self._fd = None

    def _emit(self, line: str) -> None:
        self._buf.append(line)
        if not self._scheduled:
            self._schedule(FLUSH_INTERVAL)

    def _schedule(self, delay: float) -> None:
        self._scheduled = True
        try:
            # One write per FLUSH_INTERVAL, not per event-loop tick: at full load a write per
            # tick was a measurable share of the loop's system calls.
            asyncio.get_running_loop().call_later(delay, self.flush)
        except RuntimeError:
            self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if self._fd is None:
            self._buf.clear()  # not open (or closed): as before, records have nowhere to go
            return
        if self._buf:
            self._pending += "".join(self._buf).encode("utf-8", "replace")
            self._buf.clear()
        pending = self._pending
        try:
            while pending:
                n = os.write(self._fd, pending)
                self._partial = pending[n - 1] != 0x0A
                del pending[:n]
        except OSError as e:
            self.stats["write_failures"] += 1
            if self._failing is None:
                self._failing = e
                log.error("mainlog %s: write failed: %s; records are kept in memory (up to %d bytes) and "
                          "written when it works again; not logged again until then", self.path,
                          e.strerror or e, self.max_pending)
            self._trim()
            try:
                # Try again later even if no new record comes (without a loop: at the next record).
                asyncio.get_running_loop().call_later(RETRY_INTERVAL, self.flush)
                self._scheduled = True
            except RuntimeError:
                pass
            return
        if self._failing is not None:
            self._failing = None
            if self.dropped:
                log.error("mainlog %s: writing again; %d records were dropped meanwhile", self.path, self.dropped)
            else:
                log.warning("mainlog %s: writing again; no record was lost", self.path)
            self.dropped = 0

    def _trim(self) -> None:
        """Drop the oldest whole records past max_pending (the rest of one half written stays)."""
        pending = self._pending
        excess = len(pending) - self.max_pending
        if excess <= 0:
            return
        start = 0
        if self._partial:
            start = pending.find(b"\n") + 1
            if start == 0:
                return  # all there is is the rest of one record: keep it
        end = pending.find(b"\n", start + excess - 1)
        if end < 0:
            end = len(pending) - 1
        lost = pending.count(b"\n", start, end + 1)
        del pending[start:end + 1]
        self.dropped += lost
        self.stats["dropped"] += lost
    def received(self, env: Envelope, size: int) -> None:
        t = f"{time.time():.3f}"
        # auth_user: the SMTP AUTH user (issue 17), empty when the client did not authenticate.
        tail = (f"\t{_f(env.sender)}\t{env.client_ip}\t{size}\t{env.protocol}\t{_f(env.binding)}"
                f"\t{_f(env.meta.get('auth_user', ''))}\n")
        for r in env.recipients:
            self._emit(f"{t}\tR\t{env.msgid}\t{_f(r.address)}{tail}")
        for obs in self.observers:
            obs("R", env, None)
        if events.isEnabledFor(logging.INFO):
            events.info("accepted %s from <%s> for %d recipient%s, %d bytes, client %s", env.msgid,
                        _f(env.sender), len(env.recipients), "" if len(env.recipients) == 1 else "s", size,
                        env.client_ip)

    def outcome(self, kind: str, env: Envelope, rcpt: str, size: int, remote: str, response: str,
                tls: str | None = None) -> None:
        """kind is D, T, P or X; `tls` ("TLSv1.3:CIPHER", "" without TLS) goes on D records."""
        now = time.time()
        tail = f"\ttls={_f(tls) or 'none'}\n" if kind == "D" else "\n"
        if events.isEnabledFor(logging.INFO):
            events.info("%s %s to <%s> via %s: %s", _EVENT.get(kind, kind), env.msgid, _f(rcpt), _f(remote) or "-",
                        _f(response))
        self._emit(
            f"{now:.3f}\t{kind}\t{env.msgid}\t{_f(rcpt)}\t{env.domain}\t{size}\t{_f(env.binding)}\t"
            f"{env.attempts}\t{int(now - env.first_queued)}\t{_f(remote)}\t{_f(response)}{tail}"
        )
        for obs in self.observers:
            obs(kind, env, rcpt)
