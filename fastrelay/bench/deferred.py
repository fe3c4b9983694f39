"""Memory and restart cost of a big deferred queue: queue N undeliverable messages, measure RSS and recovery."""

# The scenario: every message is routed to 127.0.0.3 on a port where nothing listens, so its first
# attempt is refused and it is deferred with a one-day retry (it stays queued for the whole test).
# We wait until the mainlog holds a T (transient failure) record for every message, read the
# relay's RSS, stop it with SIGTERM and start it again on the same spool, timing the start: to the
# "recovered N queued messages" log line and to the "ready" line, which the relay logs after it
# has put every recovered message in its queue and bound its listeners.

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastrelay.bench.client import LoadSpec, run_load_procs
from fastrelay.bench.e2e import Progress, command_line, machine_info
from fastrelay.bench.procs import RelayProcess, ToolError, child_env, end_all, fastrelay_version, free_port, relay_conf


def _files(path: Path) -> dict[str, int]:
    """Bytes per file of the spool directory (spool.db, its WAL, the reserve file, ...)."""
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


class _TCounter:
    """Counts T records in the mainlog as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.count = 0
        self.rest = b""

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.count
        self.offset += len(data)
        data = self.rest + data
        cut = data.rfind(b"\n") + 1
        self.count += data.count(b"\tT\t", 0, cut)
        self.rest = data[cut:]
        return self.count


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = child_env()
    if args.impl == "python":
        env = child_env({"FASTRELAY_NO_EXTENSIONS": "1"})
    elif args.impl == "cython":
        env = child_env({"FASTRELAY_REQUIRE_EXTENSIONS": "1"}, drop=("FASTRELAY_NO_EXTENSIONS",))
    line, version, impl = fastrelay_version(env)
    out: dict[str, Any] = {
        "tool": "fastrelay deferred-queue bench", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command_line(), "machine": machine_info(line, version, impl),
        "load": {"messages": args.messages, "size": args.size, "concurrency": args.concurrency, "procs": args.procs},
        "relay_options": list(args.relay_option),
    }
    progress = Progress(args.progress if args.progress is not None else sys.stderr.isatty())
    workdir = Path(tempfile.mkdtemp(prefix="fastrelay-deferred-"))
    relay: RelayProcess | None = None
    try:
        dead_port = free_port("127.0.0.3")  # bound and let go: nothing listens there
        conf = relay_conf("127.0.0.3", dead_port, retry="1d", host_failure_retry="1d",
                          fsync=args.fsync, extra=["message_expiration = 7d", *args.relay_option])
        relay = RelayProcess(workdir, conf, env).start()
        out["rss_empty_mb"] = _mb(relay.rss_kb())
        spec = LoadSpec(host="127.0.0.1", port=relay.port, messages=args.messages, size=args.size, rcpts=1,
                        concurrency=args.concurrency, reuse=True, pipelining=True, id_prefix="d-", timeout=120)
        done = [0]
        progress.start("queueing", args.messages, lambda: done[0], "accepted")
        try:
            res = run_load_procs(spec, args.procs, done)
        finally:
            progress.stop()
        out["inject"] = {"accepted": res.accepted, "seconds": round(res.elapsed, 2),
                         "accepted_per_s": round(res.accepted_per_s, 1)}
        if res.accepted < args.messages:
            raise ToolError(f"only {res.accepted} of {args.messages} messages were accepted "
                            f"({next(iter(res.errors), 'no error')})")
        tcount = _TCounter(workdir / "mainlog")
        t0 = time.monotonic()
        progress.start("deferring", args.messages, lambda: tcount.count, "deferred")
        try:
            while tcount.poll() < args.messages:
                if time.monotonic() - t0 > args.timeout:
                    raise ToolError(f"only {tcount.count} of {args.messages} messages were deferred "
                                    f"within {args.timeout:g} s")
                if not relay.alive():
                    raise ToolError(f"the relay died: {relay.last_log_line()}")
                time.sleep(0.2)
        finally:
            progress.stop()
        out["deferred_after_s"] = round(time.monotonic() - t0, 2)
        time.sleep(1.0)  # let the last batch of spool writes and frees settle
        out["queued"] = {"rss_mb": _mb(relay.rss_kb()), "peak_rss_mb": _mb(relay.peak_rss_kb()),
                         "cpu_s": relay.cpu(), "spool_files": _files(workdir / "spool")}
        out["queued"]["spool_bytes"] = sum(out["queued"]["spool_files"].values())
        t = time.monotonic()
        rc = relay.stop(timeout=args.timeout)
        out["stop_s"] = round(time.monotonic() - t, 2)
        if rc != 0:
            raise ToolError(f"the relay exited with status {rc} on SIGTERM")
        relay.start(timeout=args.timeout, poll=0.005)
        rec = {
            "to_recovered_line_s": round(relay.t_recovered - relay.t_start, 3) if relay.t_recovered else None,
            "to_ready_s": round(relay.t_ready - relay.t_start, 3),
            "recovered": relay.recovered,
            "cpu_s": relay.cpu(),
        }
        time.sleep(1.0)
        rec["rss_mb"] = _mb(relay.rss_kb())
        rec["peak_rss_mb"] = _mb(relay.peak_rss_kb())
        out["restart"] = rec
        if relay.recovered != args.messages:
            raise ToolError(f"the restarted relay recovered {relay.recovered} of {args.messages} messages")
        relay.stop(timeout=args.timeout)
        relay = None
        return out
    finally:
        progress.stop()
        if relay is not None:
            relay.stop(timeout=30)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastrelay.bench.deferred", description=__doc__)
    p.add_argument("--messages", type=int, default=200_000, help="deferred messages to queue (default 200000)")
    p.add_argument("--size", type=int, default=1024, help="message size in bytes (default 1024)")
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--procs", type=int, default=1, help="client processes")
    p.add_argument("--no-fsync", dest="fsync", action="store_false", help="spool_fsync = 0 (faster queueing)")
    p.add_argument("--impl", choices=["cython", "python"])
    p.add_argument("--relay-option", action="append", default=[], metavar="'NAME = VALUE'",
                   help="an extra conf line for the relay, e.g. 'Workers = 2' (repeatable)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for each phase")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = p.parse_args(argv)
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        out = run(args)
    except ToolError as e:
        print(f"deferred: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deferred: interrupted", file=sys.stderr)
        return 130
    finally:
        end_all()
        signal.signal(signal.SIGTERM, old)
    q, r, i = out["queued"], out["restart"], out["inject"]
    n = args.messages
    print(f"{out['machine']['fastrelay_version_line']}; {n:,} deferred messages of {args.size:,} bytes")
    print(f"queueing        {i['seconds']} s ({i['accepted_per_s']:,.0f}/s); "
          f"all deferred {out['deferred_after_s']} s later")
    print(f"RSS, empty      {out['rss_empty_mb']} MB")
    print(f"RSS, queued     {q['rss_mb']} MB (peak {q['peak_rss_mb']} MB; "
          f"{(q['rss_mb'] - out['rss_empty_mb']) * 1024 * 1024 / n:,.0f} bytes per message); "
          f"spool {q['spool_bytes'] / 1e6:,.0f} MB on disk ("
          + ", ".join(f"{k} {v / 1e6:,.0f} MB" for k, v in q["spool_files"].items() if v > 1e6) + ")")
    print(f"stop (SIGTERM)  {out['stop_s']} s")
    print(f"restart         recovered line after {r['to_recovered_line_s']} s, ready after {r['to_ready_s']} s "
          f"({r['recovered']:,} recovered); RSS {r['rss_mb']} MB (peak {r['peak_rss_mb']} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
