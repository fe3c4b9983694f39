"""A fast counting SMTP sink (asyncio Protocol under uvloop) with an optional fsynced delivery ledger."""

# Why not aiosmtpd: it builds a coroutine, a StreamReader and several objects per command and
# inspects its own handler methods per connection; at a few thousand messages a second the sink
# becomes the bottleneck and the benchmark measures the sink. This is one Protocol whose
# data_received parses whatever arrived, answers a whole pipelined group with one transport.write,
# and finds the end of DATA with one bytes search per read.
#
# The ledger (for the crash-chaos test, docs/reliability.md (a)): one line per delivered recipient,
#     <X-Test-Id> <TAB> <recipient> <TAB> <sha256 hex>\n
# written and fsync'd BEFORE the 250 to the final dot, so a line in the ledger means "this sink
# took responsibility". fsyncs are grouped: every message that ended in the same event-loop tick
# (or while the previous fsync ran) shares one write+fsync in a helper thread.
#
# What the sha256 covers: the message as the sink received it, dot-unstuffed, ending with the
# CRLF before the final dot, MINUS every leading "Received:" header field (with its folded
# continuation lines). Each relay prepends one Received: field; the bench client never writes one,
# so the hash equals sha256 of exactly the bytes the client sent, however many relays the message
# passed. (A message without an X-Test-Id header gets "-" as its id.)

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MAX_LINE = 4096  # a command line longer than this is answered 500 and the connection closed
SIZE_LIMIT = 100 * 1024 * 1024


def strip_received(body: bytes) -> bytes:
    """`body` without its leading Received: header fields (folded lines included)."""
    pos = 0
    n = len(body)
    while pos < n and body[pos:pos + 9].lower() == b"received:":
        end = body.find(b"\r\n", pos)
        # A field continues on lines that start with a space or a tab (RFC 5322 folding).
        while end >= 0 and end + 2 < n and body[end + 2] in (0x20, 0x09):
            end = body.find(b"\r\n", end + 2)
        if end < 0:
            return b""
        pos = end + 2
    return body[pos:] if pos else body


def find_test_id(body: bytes) -> str:
    """The X-Test-Id header's value, searched in the header section only; "-" if absent."""
    head_end = body.find(b"\r\n\r\n")
    head = body if head_end < 0 else body[:head_end + 2]
    low = head.lower()
    i = 0 if low.startswith(b"x-test-id:") else low.find(b"\r\nx-test-id:")
    if i < 0:
        return "-"
    start = i + (10 if i == 0 else 12)
    end = head.find(b"\r\n", start)
    return head[start:end if end >= 0 else len(head)].strip().decode("ascii", "replace") or "-"


def _path_arg(arg: bytes) -> str:
    """The address between <...> of a MAIL/RCPT argument (after the colon), without params."""
    lt = arg.find(b"<")
    gt = arg.find(b">", lt + 1)
    if lt >= 0 and gt > lt:
        return arg[lt + 1:gt].decode("utf-8", "replace")
    return arg.strip().split(b" ", 1)[0].decode("utf-8", "replace") if arg.strip() else ""


class Counters:
    """What the sink reports (also the JSON status line's fields)."""

    __slots__ = ("active", "bytes", "connections", "first", "last", "ledger_lines", "messages",
                 "rcpts", "tempfailed")

    def __init__(self) -> None:
        self.messages = 0  # messages answered 250 (after the ledger fsync when there is a ledger)
        self.rcpts = 0  # recipients of those messages
        self.bytes = 0  # their size as received (dot-stuffed, incl. the final CRLF, excl. the dot)
        self.connections = 0  # connections accepted, in all
        self.active = 0  # connections open now
        self.tempfailed = 0  # messages answered 451 by --tempfail-rate
        self.ledger_lines = 0
        self.first = 0.0  # time.monotonic() of the first 250 (CLOCK_MONOTONIC: same in every process)
        self.last = 0.0  # ... of the latest 250

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class _Ledger:
    """Group-committed, fsynced ledger: lines are written and fsync'd before their 250s go out."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.loop = loop
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        self.lines: list[bytes] = []
        self.waiters: list[Callable[[], None]] = []
        self.busy = False
        self.scheduled = False

    def add(self, lines: list[bytes], done: Callable[[], None]) -> None:
        self.lines.extend(lines)
        self.waiters.append(done)
        if not self.busy and not self.scheduled:
            # call_soon: the other sessions' data_received of this tick join the same fsync.
            self.scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.scheduled = False
        if self.busy or not self.waiters:
            return
        self.busy = True
        data, waiters = b"".join(self.lines), self.waiters
        self.lines, self.waiters = [], []
        fut = self.loop.run_in_executor(self.pool, self._write, data)
        fut.add_done_callback(lambda f: self._written(f, waiters))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)

    def _written(self, fut: asyncio.Future, waiters: list[Callable[[], None]]) -> None:
        self.busy = False
        if fut.exception() is not None:  # a sink that cannot record must not say 250
            print(f"sink: ledger write failed: {fut.exception()}", file=sys.stderr, flush=True)
            os._exit(3)
        for w in waiters:
            w()
        if self.waiters:
            self._flush()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        os.close(self.fd)


_EHLO = b"250-%s\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE %d\r\n250 ENHANCEDSTATUSCODES\r\n"
R_OK = b"250 2.0.0 Ok\r\n"
R_MAIL = b"250 2.1.0 Ok\r\n"
R_RCPT = b"250 2.1.5 Ok\r\n"
R_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
R_QUEUED = b"250 2.0.0 Ok: queued\r\n"
R_TEMPFAIL = b"451 4.3.0 Temporary failure (test sink)\r\n"
R_BYE = b"221 2.0.0 Bye\r\n"
R_NO_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
R_NO_RCPT = b"503 5.5.1 Error: need RCPT command\r\n"
R_NESTED = b"503 5.5.1 Error: nested MAIL command\r\n"
R_UNKNOWN = b"502 5.5.2 Error: command not recognized\r\n"
R_TOO_LONG = b"500 5.5.2 Error: line too long\r\n"


class Session(asyncio.Protocol):
    """One SMTP connection. Not a coroutine: everything happens in data_received."""

    __slots__ = ("buf", "data_mode", "mail", "rcpts", "scan", "sink", "transport", "waiting")

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.data_mode = False
        self.scan = 0  # in DATA mode: where the next search for CRLF.CRLF starts
        self.mail: str | None = None
        self.rcpts: list[str] = []
        self.waiting = False  # a 250 is waiting for the ledger's fsync: read on, answer nothing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        c = self.sink.counters
        c.connections += 1
        c.active += 1
        transport.write(self.sink.banner)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink.counters.active -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.waiting:
            self._process()

    def _process(self) -> None:
        buf = self.buf
        out: list[bytes] = []
        pos = 0
        sink = self.sink
        while True:
            if self.data_mode:
                # buf[pos:pos+2] is the CRLF that ended the DATA line (kept on purpose), so a
                # message that is just "." (empty) or starts with ".." is found by the same search.
                end = buf.find(b"\r\n.\r\n", max(pos, self.scan))
                if end < 0:
                    self.scan = max(pos, len(buf) - 4)
                    break
                raw = bytes(buf[pos:end + 2])  # CRLF + content incl. its last CRLF
                pos = end + 5
                self.data_mode = False
                reply = self._message(raw)
                if reply is None:  # waiting for the ledger: stop here, keep the rest of buf
                    self.waiting = True
                    break
                out.append(reply)
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if len(buf) - pos > MAX_LINE:
                    out.append(R_TOO_LONG)
                    self._close_after(out)
                    return
                break
            line = bytes(buf[pos:eol])
            verb = line[:4].upper()
            if verb == b"MAIL":
                if self.mail is not None:
                    out.append(R_NESTED)
                else:
                    self.mail = _path_arg(line[line.find(b":") + 1:]) if sink.keep_envelope else ""
                    out.append(R_MAIL)
            elif verb == b"RCPT":
                if self.mail is None:
                    out.append(R_NO_MAIL)
                else:
                    self.rcpts.append(_path_arg(line[line.find(b":") + 1:]) if sink.keep_envelope else "")
                    out.append(R_RCPT)
            elif verb == b"DATA":
                if not self.rcpts:
                    out.append(R_NO_RCPT if self.mail is not None else R_NO_MAIL)
                else:
                    out.append(R_DATA)
                    self.data_mode = True
                    pos = eol  # keep the CRLF: see above
                    self.scan = eol
                    continue
            elif verb == b"EHLO":
                self.mail, self.rcpts = None, []
                out.append(sink.ehlo)
            elif verb == b"HELO":
                self.mail, self.rcpts = None, []
                out.append(sink.helo)
            elif verb == b"RSET":
                self.mail, self.rcpts = None, []
                out.append(R_OK)
            elif verb == b"NOOP":
                out.append(R_OK)
            elif verb == b"QUIT":
                out.append(R_BYE)
                self._close_after(out)
                return
            else:
                out.append(R_UNKNOWN)
            pos = eol + 2
        if pos:
            del buf[:pos]
            if self.data_mode:
                self.scan -= pos
        if out and self.transport is not None:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _close_after(self, out: list[bytes]) -> None:
        if self.transport is not None:
            self.transport.write(b"".join(out))
            self.transport.close()  # the server closes first: TIME_WAIT stays here, not at the client
        self.buf.clear()

    def _message(self, raw: bytes) -> bytes | None:
        """Account for one message (raw = CRLF + stuffed content); the reply, or None if deferred."""
        sink = self.sink
        rcpts, mail = self.rcpts, self.mail
        self.mail, self.rcpts = None, []
        if sink.tempfail_rate and random.random() < sink.tempfail_rate:
            sink.counters.tempfailed += 1
            return R_TEMPFAIL
        size = len(raw) - 2
        if sink.ledger is None and not sink.print_messages:
            sink.count(len(rcpts), size)  # counting only: no unstuffing needed
            return R_QUEUED
        body = (raw.replace(b"\r\n..", b"\r\n.") if b"\r\n.." in raw else raw)[2:]
        if sink.print_messages:
            sink.print_message(mail or "", rcpts, body)
        if sink.ledger is None:
            sink.count(len(rcpts), size)
            return R_QUEUED
        own = strip_received(body)  # what the first client sent: see the module comment
        tid = find_test_id(own).replace("\t", " ")
        digest = hashlib.sha256(own).hexdigest()
        lines = [f"{tid}\t{r}\t{digest}\n".encode("utf-8", "replace") for r in rcpts]
        sink.ledger.add(lines, lambda: self._logged(len(rcpts), size, len(lines)))
        return None

    def _logged(self, nrcpts: int, size: int, nlines: int) -> None:
        self.sink.count(nrcpts, size)
        self.sink.counters.ledger_lines += nlines
        self.waiting = False
        if self.transport is None or self.transport.is_closing():
            return  # recorded but the client is gone: it may send again (an accepted duplicate)
        self.transport.write(R_QUEUED)
        if self.buf:
            self._process()


class Sink:
    """The server: counters, optional ledger and printing. Use start()/stop() in a running loop."""

    def __init__(self, ledger: str | None = None, print_messages: bool = False, tempfail_rate: float = 0.0,
                 hostname: str = "sink.test") -> None:
        self.counters = Counters()
        self.ledger_path = ledger
        self.ledger: _Ledger | None = None
        self.print_messages = print_messages
        self.tempfail_rate = tempfail_rate
        self.keep_envelope = bool(ledger or print_messages)
        self.banner = b"220 %s ESMTP bench sink\r\n" % hostname.encode()
        self.ehlo = _EHLO % (hostname.encode(), SIZE_LIMIT)
        self.helo = b"250 %s\r\n" % hostname.encode()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    def count(self, nrcpts: int, size: int) -> None:
        c = self.counters
        c.messages += 1
        c.rcpts += nrcpts
        c.bytes += size
        c.last = time.monotonic()
        if not c.first:
            c.first = c.last

    def print_message(self, mail: str, rcpts: list[str], body: bytes) -> None:
        n = self.counters.messages + 1
        sys.stdout.write(f"--- message {n}: from <{mail}> to {', '.join(f'<{r}>' for r in rcpts)},"
                         f" {len(body)} bytes\n")
        sys.stdout.write(body.decode("utf-8", "replace").replace("\r\n", "\n"))
        sys.stdout.write("--- end\n")
        sys.stdout.flush()

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        if self.ledger_path:
            self.ledger = _Ledger(self.ledger_path, loop)
        self.server = await loop.create_server(lambda: Session(self), host, port, backlog=1024,
                                               reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.ledger is not None:
            # Let a group fsync in flight finish (its 250s go out) before closing the file.
            for _ in range(200):
                if not self.ledger.busy and not self.ledger.waiters:
                    break
                await asyncio.sleep(0.01)
            self.ledger.close()
            self.ledger = None


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def status_line(sink: Sink, event: str) -> str:
    d = sink.counters.as_dict()
    d.update(event=event, now=time.monotonic(), cpu=round(_cpu_seconds(), 3), pid=os.getpid())
    return json.dumps(d)


async def _serve(args: argparse.Namespace) -> int:
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    sink = Sink(ledger=args.ledger, print_messages=args.print, tempfail_rate=args.tempfail_rate)
    try:
        port_n = await sink.start(host, int(port))
    except OSError as e:
        print(f"sink: cannot listen on {args.listen}: {e.strerror or e}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # With --print, stdout is the messages alone (a person reads them): the JSON status lines go
    # to stderr, and only on SIGUSR1 and at exit unless --status-interval asks for more.
    status_out = sys.stderr if args.print else sys.stdout

    def emit(event: str) -> None:
        status_out.write(status_line(sink, event) + "\n")
        status_out.flush()

    # SIGUSR1: a status line now (the bench asks for a baseline before each run).
    loop.add_signal_handler(signal.SIGUSR1, emit, "status")
    status_out.write(json.dumps({"event": "listening", "host": host, "port": port_n, "pid": os.getpid()}) + "\n")
    status_out.flush()
    if not args.print:
        print(f"sink listening on {host}:{port_n}", file=sys.stderr, flush=True)
    interval = args.status_interval
    if interval is None:
        interval = 0.0 if args.print else 1.0
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval if interval > 0 else None)
            except TimeoutError:
                emit("status")
    finally:
        await sink.stop()
        emit("final")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastrelay.bench.sink", description=__doc__)
    p.add_argument("--listen", default="127.0.0.2:2526", help="ADDR:PORT (port 0 picks a free one)")
    p.add_argument("--ledger", help="append 'id TAB rcpt TAB sha256' per delivered recipient, fsynced before the 250")
    p.add_argument("--print", action="store_true",
                   help="print every message on stdout (the JSON status lines then go to stderr)")
    p.add_argument("--tempfail-rate", type=float, default=0.0, help="answer this share of messages with 451")
    p.add_argument("--status-interval", type=float, default=None,
                   help="seconds between JSON status lines (0: only on SIGUSR1 and at exit; default 1, "
                        "or 0 with --print)")
    args = p.parse_args(argv)
    try:
        import uvloop

        return uvloop.run(_serve(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
