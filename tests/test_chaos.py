"""The kill -9 chaos test of docs/reliability.md (a), short form: nothing acked is lost, nothing torn."""

from __future__ import annotations

import pytest

from fastrelay.bench.chaos import ChaosSpec, format_report, run_chaos


@pytest.mark.slow
def test_chaos_short(tmp_path):
    spec = ChaosSpec(messages=600, kills=3, concurrency=20, rcpts_max=5, verbose=False)
    rep = run_chaos(spec, workdir=tmp_path)
    text = format_report(rep)
    assert rep.kills == 3, text
    assert rep.messages >= 600 and rep.acked > 0, text
    assert rep.lost == 0 and rep.lost_pairs == 0, text
    assert rep.torn == 0 and rep.whole == rep.ledger_lines, text
    assert rep.rejected_but_delivered == 0 and rep.aborted_but_delivered == 0 and rep.foreign == 0, text
    assert rep.delivered == rep.acked, text
    assert rep.spool_empty and rep.spool_entries == 0 and rep.spool_quarantined == 0, text
    assert rep.relay_exit == 0, text
    assert rep.ok, text
