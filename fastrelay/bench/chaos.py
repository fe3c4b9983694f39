"""Crash chaos (docs/reliability.md (a)): kill -9 fastrelay at random while injecting; prove no acked mail is lost."""

# The recipe, steps 1-3 and 5:
#   sink      fastrelay.bench.sink with an fsynced ledger (id TAB rcpt TAB sha256 per delivered recipient,
#             written before its 250), in its own process, never killed.
#   relay     fastrelay in its own process group on a fixed port, delivering to the sink with
#             1 s retries; spool_fsync on.
#   injector  fastrelay.bench.client with `persist` and `record`: 20 connections, 1-5 recipients and a
#             unique X-Test-Id per message; per id acked / rejected / unknown (lost after the
#             dot) / aborted (lost before the dot: the relay owes nothing and must deliver nothing).
#   kills     K intervals drawn from U(0.2 s, 3 s); after each, os.killpg(pgid, SIGKILL), then a
#             restart. The injection is paced to last about as long as the kill schedule, so the
#             kills fall during injection (the report says how many did).
#   drain     no kills, until every acked (id, rcpt) is in the ledger and the spool holds nothing
#             (peeked read-only), or the time limit; then a clean SIGTERM stop.
#   check     every acked (id, rcpt) in the ledger at least once (lost = 0); each ledger line's
#             sha256 equals the sha256 of the bytes sent (whole; the sink hashes the body after the
#             relay's Received: header, see fastrelay/bench/sink.py); no rejected or aborted id delivered;
#             duplicates counted; the spool, recovered with fastrelay.spool.Spool after the stop,
#             empty, nothing quarantined, no stray files.

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastrelay.bench.client import ABORTED, ACKED, REJECTED, UNKNOWN, LoadGenerator, LoadSpec
from fastrelay.bench.procs import RelayProcess, SinkProcess, ToolError, child_env, end_all, free_port, relay_conf

SPOOL_FILES = {"spool.db", "spool.db-wal", "spool.db-shm", "spool.lock", "spool.reserve"}


@dataclass
class ChaosSpec:
    messages: int = 3000
    kills: int = 5
    concurrency: int = 20
    rcpts_max: int = 5
    size: int = 2048
    min_interval: float = 0.2
    max_interval: float = 3.0
    drain_timeout: float = 120.0
    reuse: bool = True
    seed: int | None = None
    impl: str | None = None
    sink_tempfail_rate: float = 0.0
    verbose: bool = True
    keep: bool = False  # keep the temp dir even when the run passed
    rate: float | None = None  # messages/s; None: spread over the kill schedule; 0: as fast as possible


@dataclass
class ChaosReport:
    messages: int = 0  # messages that reached the final dot
    acked: int = 0
    rejected: int = 0
    unknown: int = 0
    aborted: int = 0  # broke before the dot (not counted in messages)
    acked_pairs: int = 0
    delivered: int = 0  # acked messages with every acked recipient in the ledger
    lost: int = 0  # acked messages with some acked recipient missing from the ledger
    lost_pairs: int = 0
    duplicated: int = 0  # (id, rcpt) pairs in the ledger more than once
    duplicate_deliveries: int = 0  # ledger lines beyond the first per pair
    rejected_but_delivered: int = 0
    aborted_but_delivered: int = 0
    unknown_delivered: int = 0
    whole: int = 0  # ledger lines whose body hash equals the hash of what was sent
    torn: int = 0  # ledger lines whose body hash differs
    foreign: int = 0  # ledger lines for ids never sent (or without an X-Test-Id: a DSN?)
    ledger_lines: int = 0
    kills: int = 0
    kills_during_injection: int = 0
    restarts_s: list[float] = field(default_factory=list)
    inject_s: float = 0.0
    drain_s: float = 0.0
    drained: bool = False
    relay_exit: int | None = None
    spool_entries: int = -1
    spool_quarantined: int = -1
    stray_files: list[str] = field(default_factory=list)
    spool_empty: bool = False
    seed: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    ok: bool = False

    def verdict(self) -> list[str]:
        """The reasons the run failed (empty: passed)."""
        bad = []
        if self.acked == 0:
            bad.append("no message was acked")
        if self.lost:
            bad.append(f"{self.lost} acked messages lost ({self.lost_pairs} recipients)")
        if self.torn:
            bad.append(f"{self.torn} delivered bodies differ from what was sent")
        if self.rejected_but_delivered:
            bad.append(f"{self.rejected_but_delivered} rejected messages were delivered")
        if self.aborted_but_delivered:
            bad.append(f"{self.aborted_but_delivered} messages cut off before their dot were delivered")
        if self.foreign:
            bad.append(f"{self.foreign} ledger lines for messages that were never sent")
        if not self.spool_empty:
            bad.append(f"spool not empty at the end: {self.spool_entries} entries, {self.spool_quarantined} "
                       f"quarantined, stray files {self.stray_files}")
        if self.relay_exit != 0:
            bad.append(f"the relay's clean stop exited with status {self.relay_exit}")
        return bad


class _Ledger:
    """Reads the sink's ledger as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""
        self.lines: list[tuple[str, str, str]] = []
        self.pairs: Counter[tuple[str, str]] = Counter()

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        *lines, self.rest = (self.rest + data).split(b"\n")
        for raw in lines:
            parts = raw.decode("utf-8", "replace").split("\t")
            if len(parts) == 3:
                self.lines.append((parts[0], parts[1], parts[2]))
                self.pairs[(parts[0], parts[1])] += 1


def _spool_peek(db: Path) -> int | None:
    """Messages in the running relay's spool (a read-only look; None if it cannot be read now)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(conn.execute("SELECT count(*) FROM msg").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return None


async def _spool_check(spool_dir: Path) -> tuple[int, int, list[str]]:
    """(entries, quarantined, stray files) of a stopped relay's spool, read with fastrelay's Spool."""
    from fastrelay.spool import Spool

    sp = Spool(str(spool_dir), fsync=False, min_free_bytes=0)
    await sp.open()
    try:
        entries = sp.recover()
    finally:
        await sp.close()
    conn = sqlite3.connect(f"file:{spool_dir / 'spool.db'}?mode=ro", uri=True)
    try:
        quarantined = int(conn.execute("SELECT count(*) FROM quarantine").fetchone()[0])
    finally:
        conn.close()
    stray = sorted(p.name for p in spool_dir.iterdir() if p.name not in SPOOL_FILES)
    return len(entries), quarantined, stray


def _say(spec: ChaosSpec, msg: str) -> None:
    if spec.verbose:
        print(f"chaos: {msg}", file=sys.stderr, flush=True)


async def _run(spec: ChaosSpec, workdir: Path, rep: ChaosReport) -> dict[str, list]:
    loop = asyncio.get_running_loop()
    rng = random.Random(rep.seed)
    env = child_env()
    if spec.impl == "python":
        env = child_env({"FASTRELAY_NO_EXTENSIONS": "1"})
    elif spec.impl == "cython":
        env = child_env({"FASTRELAY_REQUIRE_EXTENSIONS": "1"}, drop=("FASTRELAY_NO_EXTENSIONS",))
    ledger_path = workdir / "ledger"
    sink = SinkProcess("127.0.0.2:0", ledger=ledger_path, tempfail_rate=spec.sink_tempfail_rate,
                       status_interval=0.5, log=workdir / "sink.log")
    relay: RelayProcess | None = None
    try:
        await loop.run_in_executor(None, sink.start)
        port = free_port("127.0.0.1")  # fixed: the injector must find the relay again after each restart
        conf = relay_conf(sink.host, sink.port, listen=f"127.0.0.1:{port}", retry="1s", host_failure_retry="1s")
        relay = RelayProcess(workdir / "relay", conf, env)
        await loop.run_in_executor(None, relay.start)
        intervals = [rng.uniform(spec.min_interval, spec.max_interval) for _ in range(spec.kills)]
        restart_guess = 0.3  # seconds a restart takes here (python start + recovery), for the pacing
        span = sum(intervals) + spec.kills * restart_guess
        rate = spec.rate if spec.rate is not None else (spec.messages / span if span else 0.0)
        gen = LoadGenerator(LoadSpec(
            host="127.0.0.1", port=port, messages=spec.messages, size=spec.size, rcpts=1,
            rcpts_max=spec.rcpts_max, concurrency=spec.concurrency, reuse=spec.reuse, pipelining=True,
            id_prefix=f"c{rep.seed}-", record=True, persist=True, rate=rate,
            timeout=30.0, seed=rep.seed,
        ))
        _say(spec, f"{spec.messages} messages, {spec.kills} kills over ~{span:.0f} s (seed {rep.seed}); "
                   f"relay on 127.0.0.1:{port}, sink on {sink.addr}, dir {workdir}")
        inject = loop.create_task(gen.run())
        for i, iv in enumerate(intervals):
            await asyncio.sleep(iv)
            during = not inject.done()
            await loop.run_in_executor(None, relay.kill)
            rep.kills += 1
            rep.kills_during_injection += during
            t = time.monotonic()
            await loop.run_in_executor(None, relay.start)
            rep.restarts_s.append(round(time.monotonic() - t, 3))
            r = gen.result
            _say(spec, f"kill {i + 1}/{spec.kills} after {iv:.2f} s{'' if during else ' (after injection)'}: "
                       f"{r.accepted} acked, {r.unknown} unknown so far; restarted in {rep.restarts_s[-1]:.2f} s"
                       + (f", recovered {relay.recovered}" if relay.recovered else ""))
        result = await inject
        rep.inject_s = round(result.end - result.start, 2)
        outcomes = result.outcomes
        rep.messages, rep.acked, rep.rejected = result.messages, result.accepted, result.rejected
        rep.unknown, rep.aborted = result.unknown, result.aborted
        acked_pairs = {(tid, rc) for tid, (st, ok, _, _) in outcomes.items() if st == ACKED for rc in ok}
        rep.acked_pairs = len(acked_pairs)
        _say(spec, f"injection done in {rep.inject_s} s: {rep.acked} acked, {rep.rejected} rejected, "
                   f"{rep.unknown} unknown, {rep.aborted} aborted; draining")
        # Drain: no kills until every acked pair is in the ledger and the spool is empty.
        ledger = _Ledger(ledger_path)
        t1 = time.monotonic()
        db = relay.dir / "spool" / "spool.db"
        while True:
            ledger.poll()
            missing = sum(1 for p in acked_pairs if p not in ledger.pairs)
            left = _spool_peek(db) if missing == 0 else None  # the spool matters once the ledger is complete
            if missing == 0 and left == 0:
                rep.drained = True
                break
            if time.monotonic() - t1 > spec.drain_timeout:
                _say(spec, f"drain timed out: {missing} acked recipients not delivered, spool holds {left}")
                break
            await asyncio.sleep(0.25)
        rep.drain_s = round(time.monotonic() - t1, 2)
        rep.relay_exit = await loop.run_in_executor(None, relay.stop)
        relay = None
        entries, quarantined, stray = await _spool_check(workdir / "relay" / "spool")
        rep.spool_entries, rep.spool_quarantined, rep.stray_files = entries, quarantined, stray
        rep.spool_empty = entries == 0 and quarantined == 0 and not stray
        await loop.run_in_executor(None, sink.stop)
        ledger.poll()
        return _analyse(rep, outcomes, acked_pairs, ledger)
    finally:
        if relay is not None:
            relay.kill()
        sink.stop()


def _analyse(rep: ChaosReport, outcomes: dict[str, list], acked_pairs: set[tuple[str, str]],
             ledger: _Ledger) -> dict[str, list]:
    ex: dict[str, list] = {"lost": [], "torn": [], "rejected_delivered": [], "aborted_delivered": [],
                           "foreign": [], "duplicated": []}
    rep.ledger_lines = len(ledger.lines)
    for tid, rcpt, sha in ledger.lines:
        o = outcomes.get(tid)
        if o is None:
            rep.foreign += 1
            ex["foreign"].append(f"{tid} {rcpt}")
            continue
        if sha == o[3]:
            rep.whole += 1
        else:
            rep.torn += 1
            ex["torn"].append(f"{tid} {rcpt}")
    delivered_ids = {tid for tid, _ in ledger.pairs}
    lost_ids = {tid for tid, rc in acked_pairs if (tid, rc) not in ledger.pairs}
    rep.lost_pairs = sum(1 for p in acked_pairs if p not in ledger.pairs)
    rep.lost = len(lost_ids)
    ex["lost"] = sorted(lost_ids)
    rep.delivered = rep.acked - rep.lost
    for tid, (state, _, _, _) in outcomes.items():
        if tid in delivered_ids:
            if state == REJECTED:
                rep.rejected_but_delivered += 1
                ex["rejected_delivered"].append(tid)
            elif state == ABORTED:
                rep.aborted_but_delivered += 1
                ex["aborted_delivered"].append(tid)
            elif state == UNKNOWN:
                rep.unknown_delivered += 1
    dups = [(p, n) for p, n in ledger.pairs.items() if n > 1]
    rep.duplicated = len(dups)
    rep.duplicate_deliveries = sum(n - 1 for _, n in dups)
    ex["duplicated"] = [f"{t} {r} x{n}" for (t, r), n in dups]
    rep.examples = {k: v[:10] for k, v in ex.items() if v}
    return ex


def run_chaos(spec: ChaosSpec, workdir: Path | None = None) -> ChaosReport:
    """Run the whole test (blocking); the report says whether it passed (`ok`)."""
    import uvloop

    rep = ChaosReport(seed=spec.seed if spec.seed is not None else random.randrange(1 << 30))
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="fastrelay-chaos-")) if workdir is None else Path(workdir)
    try:
        uvloop.run(_run(spec, wd, rep))
    finally:
        if own and not rep.verdict() and not spec.keep:
            shutil.rmtree(wd, ignore_errors=True)
        elif own:
            _say(spec, f"kept {wd} (logs, ledger, spool)")
    rep.ok = not rep.verdict()
    return rep


def format_report(rep: ChaosReport) -> str:
    lines = [
        f"messages (reached the dot) {rep.messages}: acked {rep.acked}, rejected {rep.rejected}, "
        f"unknown {rep.unknown} (aborted before the dot: {rep.aborted})",
        f"kills                      {rep.kills} ({rep.kills_during_injection} during injection), restarts took "
        f"{min(rep.restarts_s, default=0):.2f}-{max(rep.restarts_s, default=0):.2f} s",
        f"delivered (acked, whole)   {rep.delivered} of {rep.acked} ({rep.acked_pairs} recipients)",
        f"lost                       {rep.lost} ({rep.lost_pairs} recipients)",
        f"duplicated                 {rep.duplicated} recipients ({rep.duplicate_deliveries} extra deliveries)",
        f"rejected-but-delivered     {rep.rejected_but_delivered}",
        f"aborted-but-delivered      {rep.aborted_but_delivered}",
        f"unknown, delivered         {rep.unknown_delivered} of {rep.unknown}",
        f"bodies whole / torn        {rep.whole} / {rep.torn} (of {rep.ledger_lines} ledger lines; "
        f"{rep.foreign} foreign)",
        f"spool at the end           {'empty' if rep.spool_empty else 'NOT EMPTY'} ({rep.spool_entries} entries, "
        f"{rep.spool_quarantined} quarantined, stray files: {rep.stray_files or 'none'}); clean stop exit "
        f"{rep.relay_exit}",
        f"time                       injection {rep.inject_s} s, drain {rep.drain_s} s; seed {rep.seed}",
    ]
    bad = rep.verdict()
    lines.append("PASS" if not bad else "FAIL: " + "; ".join(bad))
    for k, v in rep.examples.items():
        if k != "duplicated" or bad:
            lines.append(f"  e.g. {k}: {' '.join(v[:5])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastrelay.bench.chaos", description=__doc__)
    p.add_argument("--long", action="store_true", help="the long form: 10,000 messages, 30 kills")
    p.add_argument("--messages", type=int, help="messages that must reach the dot (short 3000, long 10000)")
    p.add_argument("--kills", type=int, help="kill -9 cycles (short 5, long 30)")
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--rcpts-max", type=int, default=5, help="1..N recipients per message (default 5)")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--min-interval", type=float, default=0.2)
    p.add_argument("--max-interval", type=float, default=3.0)
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--no-reuse", dest="reuse", action="store_false", help="a new connection per message")
    p.add_argument("--sink-tempfail-rate", type=float, default=0.0, help="the sink answers this share 451")
    p.add_argument("--rate", type=float, help="messages/s (default: spread over the kill schedule; 0: no limit,"
                   " so later kills fall in the delivery phase)")
    p.add_argument("--seed", type=int)
    p.add_argument("--impl", choices=["cython", "python"])
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    spec = ChaosSpec(
        messages=a.messages or (10000 if a.long else 3000),
        kills=a.kills if a.kills is not None else (30 if a.long else 5),
        concurrency=a.concurrency, rcpts_max=a.rcpts_max, size=a.size, min_interval=a.min_interval,
        max_interval=a.max_interval, drain_timeout=a.drain_timeout, reuse=a.reuse, seed=a.seed, impl=a.impl,
        sink_tempfail_rate=a.sink_tempfail_rate, verbose=not a.quiet, keep=a.keep,
        rate=a.rate,
    )
    old = signal.signal(signal.SIGTERM, _raise_interrupt)  # a SIGTERM ends it as Ctrl-C does
    try:
        rep = run_chaos(spec)
    except ToolError as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("chaos: interrupted", file=sys.stderr)
        return 130
    finally:
        end_all()
        signal.signal(signal.SIGTERM, old)
    print(format_report(rep))
    if a.json:
        d: dict[str, Any] = asdict(rep)
        d["failures"] = rep.verdict()
        Path(a.json).write_text(json.dumps(d, indent=2) + "\n")
    return 0 if rep.ok else 1


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
