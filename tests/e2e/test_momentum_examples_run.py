"""Momentum's outbound-chapter examples in conf/examples/ run as written (issue #10): a relay
started on each delivers through the bindings it declares, under its throttles and XCLIENT."""

from __future__ import annotations

import os

from tests.e2e.conftest import body, drained, records, send

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def example(name: str) -> str:
    with open(os.path.join(ROOT, "conf", "examples", name)) as f:
        # The example's own listener port is the documentation's; the test takes a free one.
        return f.read().replace("127.0.0.1:2525", "127.0.0.1:0")


def tagged(tid: str, binding: str) -> bytes:
    return f"X-Binding: {binding}\r\n".encode() + body(tid)


async def test_traffic_shaping_example(dns, sinks, relay):
    """outbound-mail-traffic-shaping: "limit customer-1 to sending 60 messages every 3 seconds"."""
    (sink,) = await sinks(1)
    dns.add_mx("example.com", 10, "mx.example.com")
    dns.add_a("mx.example.com", sink.host)
    h = await relay(example("momentum_traffic_shaping.conf") + 'Binding_Header = "X-Binding"\n')
    for i in range(4):
        await send(h, [f"c{i}@example.com"], tagged(f"c{i}", f"customer-{1 + i % 2}"))
    await drained(h)
    assert sorted((m.test_id, m.peer[0]) for m in sink.messages) == [
        ("c0", "127.0.0.3"), ("c1", "127.0.0.4"), ("c2", "127.0.0.3"), ("c3", "127.0.0.4")]
    cfg = h.relay.cfg
    assert cfg.get("max_outbound_connections", "example.com", "customer-2") == 40
    assert cfg.get("max_outbound_connections", "other.com", "customer-2") == 20
    assert str(cfg.get("outbound_throttle_messages", "example.com", "customer-1")) == "60/3"


async def test_binding_examples(dns, sinks, relay):
    """ref-binding and ref-binding-group: source IPs and EHLO names; the listener's
    Binding_Group spreads over example and example2."""
    (sink,) = await sinks(1)
    dns.add_mx("vip.test", 10, "mx.vip.test")
    dns.add_a("mx.vip.test", sink.host)
    h = await relay(example("momentum_binding.conf"))
    await send(h, ["a@vip.test"], tagged("a", "my_binding-1"))
    await send(h, ["b@vip.test"], tagged("b", "my_binding-2"))
    await send(h, ["c@vip.test"], body("c"))
    await drained(h)
    assert sorted((m.test_id, m.peer[0], m.ehlo) for m in sink.messages) == [
        ("a", "127.0.0.3", "my_name-1.com"), ("b", "127.0.0.4", "my_name-2.com"), ("c", "127.0.0.2", "example.com")]
    sink.messages.clear()
    g = await relay(example("momentum_binding_group.conf"), subdir="group")
    for i in range(4):
        await send(g, [f"g{i}@vip.test"], body(f"g{i}"))
    await drained(g)
    assert sorted(m.peer[0] for m in sink.messages) == ["127.0.0.5", "127.0.0.5", "127.0.0.6", "127.0.0.6"]
    assert {f[6] for f in records(g, "D")} == {"example", "example2"}


async def test_xclient_example(dns, sinks, relay):
    """outbound-mail-outbound-xclient: customer-1 uses XCLIENT where offered, and requires it
    for relay.example.com."""
    (plain,) = await sinks(1)
    (xc,) = await sinks(1, first=3, xclient=True)
    dns.add_mx("relay.example.com", 10, "mx.relay.example.com")
    dns.add_a("mx.relay.example.com", plain.host)
    dns.add_mx("other.example.com", 10, "mx.other.example.com")
    dns.add_a("mx.other.example.com", xc.host)
    h = await relay(example("momentum_xclient.conf") + 'Binding = "customer-1"\nmax_retries = 1\n')
    await send(h, ["r@relay.example.com"], body("req"))
    await send(h, ["o@other.example.com"], body("opt"))
    await drained(h, 30)
    assert plain.messages == []  # required, not offered: never delivered there
    assert any("4.7.0 XCLIENT is required" in f[10] for f in records(h, "T"))
    (m,) = xc.messages
    assert m.xclient is not None and m.xclient["ADDR"] == "127.0.0.1"
