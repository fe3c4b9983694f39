"""WAL size while mail is deferred (issue 9's scenario): next hop down for SECONDS at RATE msg/s,
retried every RETRY, then back up; reports the peak WAL size, and its size drained and idle.

Run: PYTHONPATH=. python -m pytest bench/test_wal_bench.py --benchmark-enable -p no:cacheprovider -s
(FASTRELAY_WAL_SECONDS, FASTRELAY_WAL_RATE and FASTRELAY_WAL_RETRY change the load; 120, 150, 5s.)
Goal: the WAL stays under 64 MiB during the outage and under journal_size_limit (16 MiB) when idle.
"""

from __future__ import annotations

import os

import pytest

from fastrelay.bench.wal import MiB, run_scenario


@pytest.mark.timeout(1200)
def test_bench_wal_while_deferring(benchmark, tmp_path):
    seconds = float(os.environ.get("FASTRELAY_WAL_SECONDS", "120"))
    rate = float(os.environ.get("FASTRELAY_WAL_RATE", "150"))
    retry = os.environ.get("FASTRELAY_WAL_RETRY", "5s")
    out: dict = {}
    benchmark.pedantic(lambda: out.update(run_scenario(seconds, rate, retry, idle=5, workdir=tmp_path / "w")),
                       rounds=1, iterations=1)
    for k in ("peak_wal", "outage_peak_wal", "wal_drained", "wal_idle", "db"):
        benchmark.extra_info[k + "_mib"] = round(out[k] / MiB, 1)
    benchmark.extra_info["messages"] = out["messages"]
    print(f"\nWAL peak {out['peak_wal'] / MiB:.1f} MiB (outage {out['outage_peak_wal'] / MiB:.1f}), drained "
          f"{out['wal_drained'] / MiB:.1f} MiB, idle {out['wal_idle'] / MiB:.1f} MiB; "
          f"spool.db {out['db'] / MiB:.1f} MiB")
    assert out["peak_wal"] < 64 * MiB and out["wal_idle"] < 16 * MiB
