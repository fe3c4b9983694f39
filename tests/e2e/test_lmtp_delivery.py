"""LMTP delivery (RFC 2033): Delivery_Method = LMTP and lmtp:// routes; one reply per recipient."""

from __future__ import annotations

from tests.e2e.conftest import body, drained, records, send


async def test_lmtp_route_per_recipient_results(dns, sinks, relay, sink_port):
    (store,) = await sinks(1, lmtp=True)
    h = await relay(f'Domain store.test {{ Routes = ( "lmtp://127.0.0.2?port={sink_port}" ) }}\n')
    await send(h, ["a@store.test", "data-tempfail@store.test", "data-permfail@store.test"], body("l1"))
    (_msg,) = await store.wait_for(1)
    await _settle(h)
    # (The DSN for the permanent failure goes to a@example.com, which bounces here too: no DNS.)
    d = {r[3] for r in records(h, "D") if r[4] == "store.test"}
    p = {r[3] for r in records(h, "P") if r[4] == "store.test"}
    t = {r[3] for r in records(h, "T") if r[4] == "store.test"}
    assert d == {"a@store.test"} and p == {"data-permfail@store.test"} and "data-tempfail@store.test" in t
    assert any(c.startswith("LHLO") for c in store.sessions[0].commands)


async def test_delivery_method_lmtp_with_gateway(sinks, relay):
    (store,) = await sinks(1, lmtp=True)
    # Seed 002: Gateway plus Delivery_Method = LMTP.
    h = await relay("Domain local.example.com {\n  Gateway = 127.0.0.2\n  Delivery_Method = LMTP\n}\n")
    await send(h, ["u@local.example.com"], body("l2"))
    (msg,) = await store.wait_for(1)
    await drained(h)
    assert msg.rcpt_tos == ["u@local.example.com"]


async def _settle(h) -> None:
    import asyncio

    for _ in range(100):
        if len(records(h, "D")) + len(records(h, "P")) >= 2 and records(h, "T"):
            return
        await asyncio.sleep(0.05)
