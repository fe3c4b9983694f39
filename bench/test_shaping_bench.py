"""Benchmark of a throttle decision (issue #10): LocalShaper.take and OutboundShaping.before_message,
the per-message cost of outbound_throttle_messages in the scheduler."""

from __future__ import annotations

from fastrelay.config import loads
from fastrelay.config.types import Rate
from fastrelay.shaping import LocalShaper, OutboundShaping

DECISIONS = 1000  # throttle decisions per benchmark round


def test_gcra_take(benchmark):
    """One GCRA decision on a throttle that always lets the event through (the common case)."""
    s = LocalShaper()
    rate = Rate(1_000_000_000, 1.0)

    def run():
        now = 1000.0
        take = s.take
        for i in range(DECISIONS):
            take("outbound_throttle_messages@global", rate, now + i * 1e-3)

    benchmark(run)


def test_gcra_refused(benchmark):
    """One decision on a saturated throttle (a wait is computed, nothing taken)."""
    s = LocalShaper()
    rate = Rate(1, 3600.0)
    s.take("k", rate, 0.0)

    def run():
        take = s.take
        for i in range(DECISIONS):
            take("k", rate, 1.0 + i * 1e-6)

    benchmark(run)


def test_before_message_with_scoped_throttles(benchmark):
    """What the scheduler pays per message: the conf lookups (cached) for the binding/domain
    throttle and the Host throttle, and one GCRA take."""
    cfg = loads('Binding_Group g { outbound_throttle_messages = "1000000000/1" Binding b { } }\n'
                'Host "/^mx[0-9]+\\.example$/" { outbound_throttle_messages = "1000000000/1" }\n')
    sh = OutboundShaping(cfg, clock=lambda: 1000.0)

    def run():
        bm = sh.before_message
        for _ in range(DECISIONS):
            bm("example.com", "b", ["mx1.example", "192.0.2.1"])

    benchmark(run)
