"""A fast SMTP load generator (asyncio Protocol under uvloop, optionally in several processes)."""

# Why a Protocol and not asyncio streams or aiosmtplib: the client must stay far below the relay's
# cost per message or it measures itself (docs/performance.md: smtp-source moves ~10,600 messages/s here).
# One Protocol per connection parses the replies of a whole pipelined group in one data_received
# and wakes one future; the message bytes are prebuilt (only the X-Test-Id line differs).
#
# Latency of a message: from the start of connect (new connection per message) or from the write
# of MAIL (reused connection) to the arrival of the 250 after the final dot.
#
# Outcomes (per X-Test-Id, kept when `record` is on, for the chaos test):
#   acked     the final dot was answered 2xx
#   rejected  MAIL, every RCPT, DATA or the final dot was answered 4xx/5xx
#   unknown   the connection broke or timed out after the final dot was written, before its reply
#   aborted   the connection broke before the final dot was written: the server owes nothing
# With `persist` (chaos), broken connections are reopened until `messages` messages reached the
# dot; aborted ones do not count towards that number.

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastrelay.bench.procs import ROOT, child_env, end_group, track

ACKED, REJECTED, UNKNOWN, ABORTED = "acked", "rejected", "unknown", "aborted"


class ProtocolError(Exception):
    """The server said something a client cannot go on from (bad greeting, garbage reply)."""


@dataclass
class LoadSpec:
    """What to send, where and how."""

    host: str = "127.0.0.1"
    port: int = 25
    messages: int = 1000
    size: int = 4096
    rcpts: int = 1
    rcpts_max: int = 0  # > rcpts: each message gets a random count in [rcpts, rcpts_max]
    concurrency: int = 20
    reuse: bool = False  # one connection per worker for all its messages (smtp-source -d)
    pipelining: bool = True  # EHLO + MAIL/RCPT/DATA in one group; False: HELO, one command at a time
    id_prefix: str = ""
    record: bool = False  # keep per-id outcomes and the sha256 of every message
    persist: bool = False  # reopen broken connections; count only messages that reached the dot
    rate: float = 0.0  # at most this many messages per second (0: as fast as possible)
    timeout: float = 60.0  # per reply
    sender: str = "bench@example.com"
    domain: str = "example.com"
    seed: int = 1


@dataclass
class LoadResult:
    """What happened; `latencies` are seconds, `outcomes` maps X-Test-Id -> [state, acked rcpts,
    rejected rcpts, sha256 hex]."""

    messages: int = 0  # messages with an outcome (acked + rejected + unknown + failed)
    accepted: int = 0
    rejected: int = 0
    unknown: int = 0
    failed: int = 0  # broke before the dot (counted only without persist)
    aborted: int = 0
    rcpts_accepted: int = 0
    start: float = 0.0  # time.monotonic() of the first connect
    end: float = 0.0  # time.monotonic() of the last reply
    cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    outcomes: dict[str, list] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def elapsed(self) -> float:
        return max(self.end - self.start, 1e-9)

    @property
    def accepted_per_s(self) -> float:
        return self.accepted / self.elapsed

    def percentile_ms(self, q: float) -> float | None:
        return percentile_ms(sorted(self.latencies), q)

    def summary(self) -> dict[str, Any]:
        """The numbers, without the per-message lists."""
        return {
            "messages": self.messages, "accepted": self.accepted, "rejected": self.rejected,
            "unknown": self.unknown, "failed": self.failed, "aborted": self.aborted,
            "rcpts_accepted": self.rcpts_accepted, "elapsed_s": round(self.elapsed, 4),
            "accepted_per_s": round(self.accepted_per_s, 1),
            "latency_p50_ms": _r(self.percentile_ms(50)), "latency_p99_ms": _r(self.percentile_ms(99)),
            "cpu_s": round(self.cpu_s, 3), "errors": self.errors,
        }

    def to_json(self, full: bool = False) -> str:
        return json.dumps(asdict(self) if full else self.summary())

    def merge(self, other: LoadResult) -> None:
        for k in ("messages", "accepted", "rejected", "unknown", "failed", "aborted", "rcpts_accepted", "cpu_s"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.start = min(self.start, other.start) if self.start else other.start
        self.end = max(self.end, other.end)
        self.latencies.extend(other.latencies)
        self.outcomes.update(other.outcomes)
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def percentile_ms(sorted_secs: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted latencies (seconds), in milliseconds."""
    if not sorted_secs:
        return None
    k = max(0, min(len(sorted_secs) - 1, math.ceil(q / 100 * len(sorted_secs)) - 1))
    return sorted_secs[k] * 1000


class _Conn(asyncio.Protocol):
    """Collects complete replies as (code, text, arrival time); wakes one waiter per group."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.replies: list[tuple[int, bytes, float]] = []
        self.want = 0
        self.waiter: asyncio.Future | None = None
        self.exc: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        now = time.perf_counter()
        pos = rstart = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            if nl - pos >= 4 and buf[pos + 3] == 0x2D:  # "250-...": the reply goes on
                pos = nl + 1
                continue
            head = bytes(buf[pos:pos + 3])
            code = int(head) if head.isdigit() else 0
            self.replies.append((code, bytes(buf[rstart:nl + 1]), now))
            pos = rstart = nl + 1
        if rstart:
            del buf[:rstart]
        if len(buf) > 65536:
            self._fail(ProtocolError("reply line too long"))
        elif self.waiter is not None and len(self.replies) >= self.want and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("connection closed by the server"))

    def _fail(self, exc: BaseException) -> None:
        if self.exc is None:
            self.exc = exc
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.exc)
        if self.transport is not None:
            self.transport.abort()

    def _timed_out(self) -> None:
        self._fail(TimeoutError(f"no reply within {self.timeout:g} s"))

    async def exchange(self, data: bytes | None, n: int) -> list[tuple[int, bytes, float]]:
        """Write `data` (if any) and wait for `n` complete replies."""
        if self.exc is not None:
            raise self.exc
        if data:
            self.transport.write(data)  # type: ignore[union-attr]
        if len(self.replies) < n:
            self.want = n
            self.waiter = self.loop.create_future()
            h = self.loop.call_later(self.timeout, self._timed_out)
            try:
                await self.waiter
            finally:
                h.cancel()
                self.waiter = None
        out = self.replies[:n]
        del self.replies[:n]
        return out

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Messages:
    """Prebuilt wire bytes: everything but the X-Test-Id line is made once."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.id_width = 9
        sample_id = f"{spec.id_prefix}{0:0{self.id_width}d}"
        head = (f"From: <{spec.sender}>\r\nTo: <rcpt1@{spec.domain}>\r\nSubject: fastrelay bench\r\n"
                f"Message-ID: <bench@{spec.domain}>\r\nMIME-Version: 1.0\r\n"
                "Content-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
        first = len(b"X-Test-Id: ") + len(sample_id) + 2
        fill = max(0, spec.size - first - len(head))
        line = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyz"[:76]
        body = bytearray()
        while len(body) + len(line) + 2 <= fill:
            body += line + b"\r\n"
        rest = fill - len(body)
        if rest >= 3:
            body += line[:rest - 2] + b"\r\n"
        elif not body:
            body += b"x\r\n"
        self.rest = head + bytes(body)
        self.mail = f"MAIL FROM:<{spec.sender}>\r\n".encode()
        self.rcpt_lines = [f"RCPT TO:<rcpt{j}@{spec.domain}>\r\n".encode() for j in range(1, 101)]
        self.groups = {}
        for k in range(1, max(spec.rcpts, spec.rcpts_max, 1) + 1):
            self.groups[k] = self.mail + b"".join(self.rcpt_line(j) for j in range(1, k + 1)) + b"DATA\r\n"

    def rcpt_line(self, j: int) -> bytes:
        if j <= len(self.rcpt_lines):
            return self.rcpt_lines[j - 1]
        return f"RCPT TO:<rcpt{j}@{self.spec.domain}>\r\n".encode()

    def rcpt_addr(self, j: int) -> str:
        return f"rcpt{j}@{self.spec.domain}"

    def make(self, idx: int) -> tuple[str, bytes]:
        tid = f"{self.spec.id_prefix}{idx:0{self.id_width}d}"
        return tid, b"X-Test-Id: " + tid.encode() + b"\r\n" + self.rest


class LoadGenerator:
    """Runs one LoadSpec in the current event loop. `progress` may be read from other threads."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.msgs = _Messages(spec)
        self.result = LoadResult()
        self.progress = 0  # messages with an outcome so far
        self._claimed = 0  # messages taken by workers and not given back
        self._next = 0  # next message index (never reused, so ids stay unique)
        self._connecting = 0  # workers connecting for a message they have not claimed yet
        self._rng = random.Random(spec.seed)
        self._t0 = 0.0
        self._stop = False

    def stop(self) -> None:
        """Finish the messages in flight, start no more."""
        self._stop = True

    def _claim(self) -> int | None:
        if self._stop or self._claimed >= self.spec.messages:
            return None
        self._claimed += 1
        self._next += 1
        return self._next - 1

    def _error(self, e: BaseException) -> None:
        key = f"{type(e).__name__}: {e}"[:120]
        self.result.errors[key] = self.result.errors.get(key, 0) + 1

    async def run(self) -> LoadResult:
        spec = self.spec
        cpu0 = time.process_time()
        loop = asyncio.get_running_loop()
        self.result.start = time.monotonic()
        self._t0 = time.perf_counter()
        # perf_counter for latencies (same clock as the replies' stamps); monotonic for start/end
        # (CLOCK_MONOTONIC: comparable with the sink's timestamps in another process).
        workers = [loop.create_task(self._worker()) for _ in range(max(1, spec.concurrency))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
        if not self.result.end:  # else: the last outcome's time, not the closing QUITs'
            self.result.end = time.monotonic()
        self.result.cpu_s = time.process_time() - cpu0
        return self.result

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Conn(loop, self.spec.timeout), self.spec.host,
                                               self.spec.port)
        try:
            (code, text, _), = await conn.exchange(None, 1)
            if code != 220:
                raise ProtocolError(f"greeting {text.decode('utf-8', 'replace').strip()!r}")
            hello = b"EHLO bench.test\r\n" if self.spec.pipelining else b"HELO bench.test\r\n"
            (code, text, _), = await conn.exchange(hello, 1)
            if code != 250:
                raise ProtocolError(f"{hello[:4].decode()} answered {text.decode('utf-8', 'replace').strip()!r}")
            if self.spec.pipelining and b"PIPELINING" not in text.upper():
                raise ProtocolError("the server does not offer PIPELINING (use --no-pipelining)")
        except BaseException:
            conn.close()
            raise
        return conn

    async def _pace(self, idx: int) -> None:
        if self.spec.rate > 0:
            due = self._t0 + idx / self.spec.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _worker(self) -> None:
        spec = self.spec
        conn: _Conn | None = None
        while not self._stop and self._claimed < spec.messages:
            t0 = time.perf_counter()
            try:
                if conn is None:
                    if self._claimed + self._connecting >= spec.messages:
                        break  # the workers already connecting will take what is left
                    if spec.rate > 0 and not spec.reuse:
                        await self._pace(self._next)  # before connecting: the pause is no latency
                        t0 = time.perf_counter()
                    self._connecting += 1
                    try:
                        conn = await self._connect()
                    finally:
                        self._connecting -= 1
            except (OSError, ProtocolError, TimeoutError) as e:
                conn = None
                self._error(e)
                if spec.persist:
                    await asyncio.sleep(0.05)  # the server restarts: try again shortly
                    continue
                idx = self._claim()  # without persist a failed connect costs one message
                if idx is None:
                    break
                self._outcome(idx, ABORTED, [], [], "")
                continue
            idx = self._claim()
            if idx is None:
                break
            await self._pace(idx)
            if spec.reuse:
                t0 = time.perf_counter()
            last = not spec.reuse
            try:
                await self._send(conn, idx, t0, quit_after=last)
            except (OSError, ProtocolError, TimeoutError) as e:
                self._error(e)
                conn.close()
                conn = None
                if spec.persist:
                    await asyncio.sleep(0.02)
                continue
            if last:
                conn.close()
                conn = None
        if conn is not None:
            try:
                await conn.exchange(b"QUIT\r\n", 1)
            except (OSError, ProtocolError, TimeoutError):
                pass
            conn.close()

    async def _send(self, conn: _Conn, idx: int, t0: float, quit_after: bool) -> None:
        spec, m = self.spec, self.msgs
        k = spec.rcpts if spec.rcpts_max <= spec.rcpts else self._rng.randint(spec.rcpts, spec.rcpts_max)
        tid, data = m.make(idx)
        sha = hashlib.sha256(data).hexdigest() if spec.record else ""
        if b"\r\n." in data or data.startswith(b"."):  # dot-stuffing (RFC 5321 §4.5.2)
            wire = (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:]
        else:
            wire = data
        wire += b".\r\n"
        dot_written = recorded = False
        try:
            if spec.pipelining:
                replies = await conn.exchange(m.groups[k], k + 2)
            else:
                replies = await conn.exchange(m.mail, 1)
                if replies[0][0] == 250:
                    for j in range(1, k + 1):
                        replies += await conn.exchange(m.rcpt_line(j), 1)
                    if any(r[0] == 250 for r in replies[1:]):
                        replies += await conn.exchange(b"DATA\r\n", 1)
            ok_rcpts = [m.rcpt_addr(j) for j in range(1, k + 1) if len(replies) > j and replies[j][0] == 250]
            bad_rcpts = [m.rcpt_addr(j) for j in range(1, k + 1) if not (len(replies) > j and replies[j][0] == 250)]
            if len(replies) < k + 2 or replies[-1][0] != 354:
                self._outcome(idx, REJECTED, [], bad_rcpts + ok_rcpts, sha, tid)
                recorded = True
                if replies and replies[0][0] == 250:
                    await conn.exchange(b"RSET\r\n", 1)  # end the half-open transaction
                if quit_after:
                    await conn.exchange(b"QUIT\r\n", 1)
                return
            # RFC 2920: the message content may be followed by QUIT in the same group.
            pipelined_quit = quit_after and spec.pipelining
            dot_written = True
            # Wait for the dot's reply alone, so a connection lost before the 221 cannot turn an
            # acked message into an unknown one.
            (code, _, t), = await conn.exchange(wire + b"QUIT\r\n" if pipelined_quit else wire, 1)
            if 200 <= code < 300:
                self.result.latencies.append(t - t0)
                self._outcome(idx, ACKED, ok_rcpts, bad_rcpts, sha, tid)
            else:
                self._outcome(idx, REJECTED, [], bad_rcpts + ok_rcpts, sha, tid)
            recorded = True
            if quit_after:
                await conn.exchange(None if pipelined_quit else b"QUIT\r\n", 1)
        except (OSError, ProtocolError, TimeoutError):
            if not recorded:  # a failed RSET/QUIT after the outcome changes nothing
                self._outcome(idx, UNKNOWN if dot_written else ABORTED, [], [], sha, tid)
            raise

    def _outcome(self, idx: int, state: str, ok: list[str], bad: list[str], sha: str, tid: str | None = None) -> None:
        r = self.result
        if state == ABORTED:
            r.aborted += 1
            if self.spec.persist:
                self._claimed -= 1  # give the slot back: it did not reach the dot
            else:
                r.failed += 1
                r.messages += 1
                self.progress += 1
        else:
            r.messages += 1
            self.progress += 1
            if state == ACKED:
                r.accepted += 1
                r.rcpts_accepted += len(ok)
            elif state == REJECTED:
                r.rejected += 1
            else:
                r.unknown += 1
        r.end = time.monotonic()
        if self.spec.record:
            r.outcomes[tid or f"{self.spec.id_prefix}{idx:0{self.msgs.id_width}d}"] = [state, ok, bad, sha]


def run_load(spec: LoadSpec, progress: list[int] | None = None) -> LoadResult:
    """Run `spec` in a fresh uvloop event loop of this thread (blocking)."""
    import uvloop

    gen = LoadGenerator(spec)
    stop = threading.Event()
    if progress is not None:
        def mirror() -> None:
            while not stop.wait(0.1):
                progress[0] = gen.progress
        threading.Thread(target=mirror, daemon=True).start()
    try:
        return uvloop.run(gen.run())
    finally:
        stop.set()
        if progress is not None:
            progress[0] = gen.progress


def run_load_procs(spec: LoadSpec, procs: int, progress: list[int] | None = None) -> LoadResult:
    """Split `spec` over `procs` processes (messages and connections), start them together, merge.

    Each child gets its own id prefix so X-Test-Ids stay unique. The children are in their own
    process group each and are killed on any error or interrupt.
    """
    if procs <= 1:
        return run_load(spec, progress)
    children: list[subprocess.Popen] = []
    lines: list[list[dict]] = []
    done = [0] * procs
    try:
        for i in range(procs):
            share = spec.messages // procs + (1 if i < spec.messages % procs else 0)
            conc = max(1, spec.concurrency // procs + (1 if i < spec.concurrency % procs else 0))
            sub = LoadSpec(**{**asdict(spec), "messages": share, "concurrency": conc,
                              "id_prefix": f"{spec.id_prefix}p{i}-", "seed": spec.seed + i,
                              "rate": spec.rate / procs})
            children.append(track(subprocess.Popen(
                [sys.executable, "-m", "fastrelay.bench.client", "--child", json.dumps(asdict(sub))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT,
                start_new_session=True,
            )))
            lines.append([])
        for ch in children:  # wait until every child has its loop up and its message built
            line = ch.stdout.readline()  # type: ignore[union-attr]
            if not line or json.loads(line).get("event") != "ready":
                raise RuntimeError("a client process did not start")

        def reader(i: int, ch: subprocess.Popen) -> None:
            for line in ch.stdout:  # type: ignore[union-attr]
                d = json.loads(line)
                if d.get("event") == "progress":
                    done[i] = d["done"]
                    if progress is not None:
                        progress[0] = sum(done)
                else:
                    lines[i].append(d)

        threads = [threading.Thread(target=reader, args=(i, ch), daemon=True) for i, ch in enumerate(children)]
        for t in threads:
            t.start()
        for ch in children:
            ch.stdin.write("go\n")  # type: ignore[union-attr]
            ch.stdin.flush()  # type: ignore[union-attr]
        for ch in children:
            ch.wait()
        for t in threads:
            t.join()
        total = LoadResult()
        for i, ch in enumerate(children):
            res = [d for d in lines[i] if d.get("event") == "result"]
            if ch.returncode != 0 or not res:
                raise RuntimeError(f"client process {i} failed (exit {ch.returncode})")
            d = res[0]["result"]
            total.merge(LoadResult(**d))
        return total
    finally:
        for ch in children:
            end_group(ch)


def _child_main(spec_json: str) -> int:
    import uvloop

    spec = LoadSpec(**json.loads(spec_json))

    async def go() -> LoadResult:
        gen = LoadGenerator(spec)
        loop = asyncio.get_running_loop()
        sys.stdout.write('{"event": "ready"}\n')
        sys.stdout.flush()
        await loop.run_in_executor(None, sys.stdin.readline)

        async def report() -> None:
            while True:
                await asyncio.sleep(0.2)
                sys.stdout.write(json.dumps({"event": "progress", "done": gen.progress}) + "\n")
                sys.stdout.flush()

        rep = loop.create_task(report())
        try:
            return await gen.run()
        finally:
            rep.cancel()

    res = uvloop.run(go())
    sys.stdout.write(json.dumps({"event": "result", "result": asdict(res)}) + "\n")
    sys.stdout.flush()
    return 0


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    host, _, port = args.target.rpartition(":")
    return LoadSpec(host=host.strip("[]") or "127.0.0.1", port=int(port), messages=args.messages, size=args.size,
                    rcpts=args.rcpts, concurrency=args.concurrency, reuse=args.reuse,
                    pipelining=args.pipelining, timeout=args.timeout)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        return _child_main(argv[1])
    p = argparse.ArgumentParser(prog="python -m fastrelay.bench.client", description=__doc__)
    p.add_argument("target", help="HOST:PORT of the SMTP server")
    p.add_argument("--messages", type=int, default=10000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rcpts", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--reuse", action="store_true", help="reuse connections (smtp-source -d)")
    p.add_argument("--pipelining", action=argparse.BooleanOptionalAction, default=True,
                   help="EHLO and RFC 2920 pipelining (default), or HELO and one command at a time")
    p.add_argument("--procs", type=int, default=1, help="client processes")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply")
    p.add_argument("--json", help="write the summary as JSON to this file")
    args = p.parse_args(argv)
    try:
        res = run_load_procs(spec_from_args(args), args.procs)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"client: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    s = res.summary()
    print(json.dumps(s, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2) + "\n")
    return 0 if res.accepted == res.messages else 1


if __name__ == "__main__":
    sys.exit(main())
