"""Write the mainlog: one line per reception (R), delivery (D), transient (T) or permanent (P)
failure and XFER transfer (X), with the fields of Momentum's mainlog records.

Format (documented in docs/operations.md): tab-separated fields, the record type second, so
`cut -f` and `awk -F'\\t'` work; Momentum separates with '@', which collides with addresses.

    R  time  R  msgid  recipient  sender  client_ip  size  protocol  binding
    D  time  D  msgid  recipient  domain  size  binding  retries  seconds_in_queue  remote_ip  response  tls
    T  (as D)  the response of the transient failure
    P  (as D)  the response of the permanent failure (or the reason: expired, null MX, ...)
    X  time  X  msgid  recipient  domain  size  binding  retries  seconds_in_queue  peer  response

tls (D records only) is "tls=PROTOCOL:CIPHER" when the delivery went over TLS, as Postfix logs
"TLS connection established ... TLSv1.3 with cipher ...", else "tls=none".
time is Unix seconds with milliseconds. Fields are cleaned of tabs and control characters
(RELIABILITY.md case 26). Lines are buffered and written once per event-loop tick.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import TextIO

from fastrelay.message import Envelope

_CLEAN = {c: "?" for c in range(32)} | {127: "?"}
# How long a log line may wait in memory before it is written (lines are flushed on stop too).
FLUSH_INTERVAL = 0.1


def _f(v: object) -> str:
    s = str(v)
    return s if s.isprintable() else s.translate(_CLEAN)


class MainLog:
    def __init__(self, path: str | None):
        self.path = path
        self._f: TextIO | None = None
        self._buf: list[str] = []
        self._scheduled = False

    def open(self) -> None:
        if self.path is None or self.path == "-":
            self._f = sys.stderr
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8", errors="replace", buffering=1 << 16)

    def close(self) -> None:
        self.flush()
        if self._f is not None and self._f is not sys.stderr:
            self._f.close()
        self._f = None

    def _emit(self, line: str) -> None:
        self._buf.append(line)
        if not self._scheduled:
            self._scheduled = True
            try:
                # One write per FLUSH_INTERVAL, not per event-loop tick: at full load a write per
                # tick was a measurable share of the loop's system calls.
                asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if self._buf and self._f is not None:
            self._f.write("".join(self._buf))
            self._f.flush()
        self._buf.clear()

    def received(self, env: Envelope, size: int) -> None:
        t = f"{time.time():.3f}"
        tail = f"\t{_f(env.sender)}\t{env.client_ip}\t{size}\t{env.protocol}\t{_f(env.binding)}\n"
        for r in env.recipients:
            self._emit(f"{t}\tR\t{env.msgid}\t{_f(r.address)}{tail}")

    def outcome(self, kind: str, env: Envelope, rcpt: str, size: int, remote: str, response: str,
                tls: str | None = None) -> None:
        """kind is D, T, P or X; `tls` ("TLSv1.3:CIPHER", "" without TLS) goes on D records."""
        now = time.time()
        tail = f"\ttls={_f(tls) or 'none'}\n" if kind == "D" else "\n"
        self._emit(
            f"{now:.3f}\t{kind}\t{env.msgid}\t{_f(rcpt)}\t{env.domain}\t{size}\t{_f(env.binding)}\t"
            f"{env.attempts}\t{int(now - env.first_queued)}\t{_f(remote)}\t{_f(response)}{tail}"
        )
