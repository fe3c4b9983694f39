"""The spool's WAL stays bounded while mail is deferred, and is emptied when the spool is idle."""

from __future__ import annotations

import pytest

from fastrelay.bench.wal import MiB, run_scenario

# spool.py's journal_size_limit: the WAL file is cut back to this at a restart.
JOURNAL_SIZE_LIMIT = 16 * MiB


@pytest.mark.slow
def test_wal_stays_bounded_while_deferring_and_empties_when_idle(tmp_path):
    """Issue 9: with the next hop down and mail retried every few seconds the WAL grew without bound
    (467 MiB beside a 79 MiB database) and stayed large after the queue drained. Scaled down here:
    15 s at 150 msg/s, retried every second (more rewrites per second than the issue's 5-10 s)."""
    out = run_scenario(seconds=15, rate=150, retry="1s", idle=3, timeout=60, workdir=tmp_path)
    assert out["peak_wal"] < 40 * MiB, out
    assert out["wal_idle"] < JOURNAL_SIZE_LIMIT, out
