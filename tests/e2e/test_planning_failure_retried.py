"""No message is ever left without a next step: a failure inside planning gives every ready
message a T record and a retry, and after MAX_INTERNAL_ERRORS a bounce (docs/reliability.md case 50)."""

from __future__ import annotations

import asyncio

from fastrelay.queue import MAX_INTERNAL_ERRORS
from fastrelay.routing import Router
from tests.e2e.conftest import body, drained, records, send


class _FailingRouter(Router):
    """The real router, whose plan() raises (a bug stand-in) for the first `fail` calls for a domain."""

    def __init__(self, real: Router, domain: str, fail: int):
        super().__init__(real.cfg, real.dns, real.table)
        self.own_addresses = real.own_addresses
        self.domain, self.fail, self.calls = domain, fail, 0

    async def plan(self, domain: str, binding: str = "default"):
        if domain == self.domain:
            self.calls += 1
            if self.calls <= self.fail:
                raise RuntimeError("planning blew up")
        return await super().plan(domain, binding)


def _inject(h, domain: str, fail: int) -> _FailingRouter:
    q = h.relay.queue
    q.router = _FailingRouter(q.router, domain, fail)
    return q.router


async def _wait(pred, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.05)


async def test_planning_failure_is_logged_and_retried(dns, sinks, relay):
    (sink,) = await sinks(1)
    dns.add_mx("p.test", 10, "mx.p.test")
    dns.add_a("mx.p.test", "127.0.0.2")
    h = await relay()
    router = _inject(h, "p.test", fail=2)
    await send(h, ["a@p.test", "b@p.test"], body("pf"))
    (msg,) = await sink.wait_for(1, timeout=20)
    await drained(h)
    assert sorted(msg.rcpt_tos) == ["a@p.test", "b@p.test"]
    t = records(h, "T")
    # Two failed plannings, each a T record per recipient with a transient internal-error reply.
    assert len(t) == 4 and all(r[10].startswith("451 4.3.0") for r in t)
    assert sorted(r[3] for r in records(h, "D")) == ["a@p.test", "b@p.test"]
    assert router.calls >= 3


async def test_planning_that_always_fails_bounces_after_max_internal_errors(dns, sinks, relay):
    dns.add_mx("p.test", 10, "mx.p.test")
    dns.add_a("mx.p.test", "127.0.0.2")
    h = await relay()
    _inject(h, "p.test", fail=10**6)
    await send(h, ["a@p.test"], body("pb"), sender="")
    await _wait(lambda: not h.relay.queue.items, timeout=30)
    assert len(records(h, "T")) == MAX_INTERNAL_ERRORS - 1
    (p,) = records(h, "P")
    assert p[10].startswith("554 5.3.0")
