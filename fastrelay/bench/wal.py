"""WAL size while mail is deferred: the next hop is down while mail keeps coming, then comes back.

The scenario of issue 9: mail arrives at RATE msg/s for SECONDS while its next hop refuses
connections (every message is retried every RETRY s), then the next hop comes up and the queue
drains. The spool's WAL (spool.db-wal) is sampled all along: its peak during the outage, its size
when the queue has drained, and again after IDLE seconds of idleness, beside spool.db's size.

Run: python -m fastrelay.bench.wal [--seconds 120 --rate 150 --retry 5]  (or bench/test_wal_bench.py)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fastrelay.bench.client import LoadSpec, run_load
from fastrelay.bench.procs import RelayProcess, SinkProcess, ToolError, child_env, end_all, free_port, relay_conf

MiB = 1024 * 1024


class _Counter:
    """Counts mainlog records of some kinds (by message id) as the file grows."""

    def __init__(self, path: Path, kinds: tuple[str, ...]) -> None:
        self.path = path
        self.kinds = {f"\t{k}\t".encode() for k in kinds}
        self.offset = 0
        self.rest = b""
        self.ids: set[bytes] = set()

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return len(self.ids)
        self.offset += len(data)
        data = self.rest + data
        cut = data.rfind(b"\n") + 1
        for line in data[:cut].split(b"\n"):
            if any(k in line for k in self.kinds):
                self.ids.add(line.split(b"\t", 3)[2])
        self.rest = data[cut:]
        return len(self.ids)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def run_scenario(seconds: float = 120.0, rate: float = 150.0, retry: str = "5s", size: int = 1024,
                 idle: float = 10.0, timeout: float = 300.0, workdir: Path | None = None,
                 extra: list[str] | None = None) -> dict[str, Any]:
    """Run the outage-then-drain scenario; sizes in bytes. Raises ToolError if it cannot run."""
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="fastrelay-wal-")) if own else Path(workdir)
    relay: RelayProcess | None = None
    sink: SinkProcess | None = None
    try:
        port = free_port("127.0.0.3")  # nothing listens there until the next hop "comes back"
        conf = relay_conf("127.0.0.3", port, retry=retry, host_failure_retry=retry,
                          extra=["message_expiration = 1d", *(extra or [])])
        relay = RelayProcess(work, conf, child_env()).start()
        wal, db = work / "spool" / "spool.db-wal", work / "spool" / "spool.db"
        n = int(seconds * rate)
        spec = LoadSpec(host="127.0.0.1", port=relay.port, messages=n, size=size, concurrency=4, reuse=True,
                        rate=rate, id_prefix="w-", timeout=60)
        result: dict[str, Any] = {}
        load = threading.Thread(target=lambda: result.setdefault("load", run_load(spec)), daemon=True)
        samples: list[tuple[float, int, int]] = []
        t0 = time.monotonic()
        load.start()
        while load.is_alive():
            samples.append((time.monotonic() - t0, _size(wal), _size(db)))
            if not relay.alive():
                raise ToolError(f"the relay died: {relay.last_log_line()}")
            time.sleep(0.25)
        res = result.get("load")
        if res is None or res.accepted < n:
            raise ToolError(f"only {0 if res is None else res.accepted} of {n} messages were accepted")
        outage_peak = max(s[1] for s in samples)
        sink = SinkProcess(f"127.0.0.3:{port}").start()
        done = _Counter(work / "mainlog", ("D",))
        t1 = time.monotonic()
        while done.poll() < n:
            samples.append((time.monotonic() - t0, _size(wal), _size(db)))
            if time.monotonic() - t1 > timeout:
                raise ToolError(f"only {len(done.ids)} of {n} messages were delivered within {timeout:g} s")
            time.sleep(0.25)
        drained_s = time.monotonic() - t1
        wal_drained = _size(wal)
        time.sleep(idle)
        return {
            "messages": n, "rate": rate, "seconds": seconds, "retry": retry,
            "peak_wal": max(s[1] for s in samples), "outage_peak_wal": outage_peak,
            "wal_drained": wal_drained, "wal_idle": _size(wal), "db": _size(db), "drain_s": round(drained_s, 1),
            "samples": [(round(t, 2), w, d) for t, w, d in samples[:: max(1, len(samples) // 200)]],
        }
    finally:
        if sink is not None:
            sink.stop()
        if relay is not None:
            relay.stop(timeout=60)
        if own:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastrelay.bench.wal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=120.0, help="length of the outage (default 120)")
    p.add_argument("--rate", type=float, default=150.0, help="messages per second (default 150)")
    p.add_argument("--retry", default="5s", help="retry_interval and host_failure_retry (default 5s)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--idle", type=float, default=10.0, help="seconds idle after draining (default 10)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    try:
        out = run_scenario(args.seconds, args.rate, args.retry, args.size, args.idle)
    except ToolError as e:
        print(f"wal: {e}", file=sys.stderr)
        return 1
    finally:
        end_all()
    print(f"{out['messages']:,} messages at {args.rate:g}/s, next hop down {args.seconds:g} s, retry {args.retry}")
    print(f"WAL peak {out['peak_wal'] / MiB:.1f} MiB (outage {out['outage_peak_wal'] / MiB:.1f} MiB), "
          f"after draining {out['wal_drained'] / MiB:.1f} MiB, idle {out['wal_idle'] / MiB:.1f} MiB; "
          f"spool.db {out['db'] / MiB:.1f} MiB; drained in {out['drain_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
