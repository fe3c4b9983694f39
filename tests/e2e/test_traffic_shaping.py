"""Throttling and traffic shaping (Momentum 25.4, issue #10): outbound_throttle_messages and
outbound_throttle_connections by reference, the Host-scope connection throttle with MX spillover,
and Server_Max_Outbound_Connections. Generous lower bounds only; no exact timings."""

from __future__ import annotations

import asyncio

from tests.e2e.conftest import body, drained, records, send


async def _send_all(h, rcpts_and_bodies):
    await asyncio.gather(*(send(h, [r], b) for r, b in rcpts_and_bodies))


async def test_thirty_messages_under_ten_per_second(dns, sinks, relay):
    """Issue #10: "30 messages under "10/1" take at least 2 s and arrive complete"; a throttled
    destination waits: no message gets a transient failure or a retry."""
    (sink,) = await sinks(1)
    dns.add_mx("th.test", 10, "mx.th.test")
    dns.add_a("mx.th.test", sink.host)
    h = await relay('Domain "th.test" { outbound_throttle_messages = "10/1" }\n')
    loop = asyncio.get_running_loop()
    start = loop.time()
    await _send_all(h, [(f"r{i}@th.test", body(f"t{i}")) for i in range(30)])
    await sink.wait_for(30, timeout=30)
    took = loop.time() - start
    await drained(h)
    assert took >= 2.0
    assert sorted(m.test_id for m in sink.messages) == sorted(f"t{i}" for i in range(30))
    assert records(h, "T") == []  # waited on a timer, never deferred
    assert len(records(h, "D")) == 30
    # Throttled by message rate, the open connections waited and carried more messages.
    assert max(sink.per_session_messages()) > 1


GROUP = """
Binding_Header = "X-Binding"
Binding_Group "g" {{
  {group}
  Binding "g1" {{ Bind_Address = "127.0.0.6" {each} }}
  Binding "g2" {{ Bind_Address = "127.0.0.7" {each} }}
}}
"""


async def test_two_bindings_under_one_group_throttle_share_the_rate(dns, sinks, relay):
    """ref-outbound-throttle-messages: "A single throttle structure is created in the scope of the
    binding group ... the combined scopes mybinding1, mybinding2 ... may send 10 messages
    cumulatively within a 1 second time period"."""
    (sink,) = await sinks(1)
    dns.add_mx("th.test", 10, "mx.th.test")
    dns.add_a("mx.th.test", sink.host)
    h = await relay(GROUP.format(group='outbound_throttle_messages = "5/1"', each=""))
    loop = asyncio.get_running_loop()
    start = loop.time()
    await _send_all(h, [(f"r{i}@th.test", f"X-Binding: g{1 + i % 2}\r\n".encode() + body(f"s{i}"))
                        for i in range(20)])
    await sink.wait_for(20, timeout=30)
    took = loop.time() - start
    # 20 messages at 5 per second shared: a burst of 5, then 15 more at 0.2 s each.
    assert took >= 3.0
    assert sorted(m.peer[0] for m in sink.messages) == ["127.0.0.6"] * 10 + ["127.0.0.7"] * 10


async def test_throttle_set_again_in_each_binding_is_separate(dns, sinks, relay):
    """ref-outbound-throttle-messages: set again in each binding, the throttles are separate,
    each binding with its own rate; the shared one of the group no longer applies to them."""
    (sink,) = await sinks(1)
    dns.add_mx("th.test", 10, "mx.th.test")
    dns.add_a("mx.th.test", sink.host)
    h = await relay(GROUP.format(group='outbound_throttle_messages = "5/1"',
                                 each='outbound_throttle_messages = "5/1"'))
    shaping = h.relay.queue.shaping
    keys = {shaping.throttle("outbound_throttle_messages", "th.test", b)[0] for b in ("g1", "g2")}
    assert keys == {"outbound_throttle_messages@Binding g1", "outbound_throttle_messages@Binding g2"}
    loop = asyncio.get_running_loop()
    start = loop.time()
    await _send_all(h, [(f"r{i}@th.test", f"X-Binding: g{1 + i % 2}\r\n".encode() + body(f"e{i}"))
                        for i in range(20)])
    await sink.wait_for(20, timeout=30)
    # Each binding: 10 messages at 5 per second, a burst of 5 then 5 at 0.2 s each.
    assert loop.time() - start >= 1.0
    await drained(h)


async def test_connection_throttle_limits_new_connections(dns, sinks, relay):
    """ref-outbound-throttle-connections: "no more than the specified number of connections are
    initiated in a given second"."""
    (sink,) = await sinks(1)
    dns.add_mx("th.test", 10, "mx.th.test")
    dns.add_a("mx.th.test", sink.host)
    h = await relay('Connection_Cache_Time = 0\noutbound_throttle_connections = "2/1"\n')
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(6):  # one at a time, so each needs a new connection
        await send(h, [f"c{i}@th.test"], body(f"c{i}"))
        await sink.wait_for(i + 1, timeout=30)
    assert loop.time() - start >= 2.0  # 2 at once, then one each 0.5 s
    assert len(sink.sessions) == 6
    await drained(h)
    assert records(h, "T") == []


async def test_host_throttle_spills_over_to_a_sibling_mx(dns, sinks, relay):
    """ref-outbound-throttle-connections, host scope: "a saturated host-scoped throttle does not
    immediately defer the delivery attempt ... the weighted random pick spills over to a healthy
    sibling"."""
    a, b = await sinks(2)
    dns.add_mx("th.test", 10, "mxa.th.test")
    dns.add_mx("th.test", 10, "mxb.th.test")
    dns.add_a("mxa.th.test", a.host)
    dns.add_a("mxb.th.test", b.host)
    h = await relay('Connection_Cache_Time = 0\nHost "/^mxa\\.th\\.test$/" { outbound_throttle_connections = "1/60" }\n')
    for i in range(8):
        await send(h, [f"h{i}@th.test"], body(f"h{i}"))
    await drained(h, 30)
    assert len(a.sessions) <= 1  # one connection in the minute
    assert len(a.messages) + len(b.messages) == 8
    assert records(h, "T") == []


async def test_server_max_outbound_connections_caps_all_connections(dns, sinks, relay):
    """ref-server-max-outbound-connections: "Limits the number of total connections that will be
    established concurrently within Momentum, irrespective of bindings"."""
    a, b = await sinks(2)
    for i, s in enumerate((a, b)):
        dns.add_mx(f"d{i}.test", 10, f"mx.d{i}.test")
        dns.add_a(f"mx.d{i}.test", s.host)
        s.faults.set("dot", delay=0.05)
    # Cached connections keep their slots (idle_timeout), for 500 ms rather than 5 s: the other
    # destination's mail waits for them.
    h = await relay("idle_timeout = 500ms\nServer_Max_Outbound_Connections = 2\n")
    peak = 0
    done = False

    async def watch():
        nonlocal peak
        while not done:  # connections open at once, both sinks together
            peak = max(peak, a.current_sessions + b.current_sessions)
            await asyncio.sleep(0.002)

    w = asyncio.ensure_future(watch())
    await _send_all(h, [(f"r{i}@d{i % 2}.test", body(f"x{i}")) for i in range(30)])
    await drained(h, 30)
    done = True
    await w
    assert len(a.messages) + len(b.messages) == 30
    assert peak == 2  # two destinations of 20 connections each, two at a time in all
    assert a.peak_sessions >= 1 and b.peak_sessions >= 1
    shaper = h.relay.queue.shaping.backend
    await h.stop()
    assert shaper.held() == 0  # every slot back once the cached connections are closed


async def test_a_wait_longer_than_the_cache_time_closes_and_waits_on_a_timer(dns, sinks, relay):
    """Issue #10: "Connections stay open within Connection_Cache_Time when throttled by message
    rate"; beyond it the message goes back to the ready queue (not retried: no T record) and the
    destination waits on a timer with no connection open."""
    (sink,) = await sinks(1)
    dns.add_mx("th.test", 10, "mx.th.test")
    dns.add_a("mx.th.test", sink.host)
    h = await relay('Connection_Cache_Time = 100ms\noutbound_throttle_messages = "2/1"\n')
    loop = asyncio.get_running_loop()
    start = loop.time()
    await _send_all(h, [(f"w{i}@th.test", body(f"w{i}")) for i in range(6)])
    await sink.wait_for(6, timeout=30)
    assert loop.time() - start >= 2.0  # one each 0.5 s
    await drained(h)
    assert records(h, "T") == [] and len(records(h, "D")) == 6
    # Each 0.5 s wait is longer than the 0.1 s cache time: the connection was closed for it.
    assert max(sink.per_session_messages()) == 1


async def test_binding_host_throttle_is_the_bindings_own(dns, sinks, relay):
    """ref-outbound-throttle-connections: "connections opened to the resolved MX host ... are
    limited to 5 every 10 seconds by default, but the vip binding may open up to 30 new
    connections per second to the same host"."""
    (sink,) = await sinks(1)
    dns.add_mx("th.test", 10, "mx.th.test")
    dns.add_a("mx.th.test", sink.host)
    h = await relay('Connection_Cache_Time = 0\nBinding_Header = "X-Binding"\n'
                    'Host "mx.th.test" { outbound_throttle_connections = "1/60" }\n'
                    'Binding "vip" { Bind_Address = "127.0.0.6"\n'
                    '  Host "mx.th.test" { outbound_throttle_connections = "30" } }\n'
                    'Binding "other" { Bind_Address = "127.0.0.7" }\n')
    for i in range(4):
        await send(h, [f"v{i}@th.test"], b"X-Binding: vip\r\n" + body(f"v{i}"))
        await sink.wait_for(i + 1, timeout=10)  # one at a time: a new connection each
    for i in range(3):
        await send(h, [f"o{i}@th.test"], b"X-Binding: other\r\n" + body(f"o{i}"))
    await sink.wait_for(5, timeout=10)
    await asyncio.sleep(0.5)
    by_peer = {}
    for s in sink.sessions:
        by_peer[s.peer[0]] = by_peer.get(s.peer[0], 0) + 1
    assert by_peer["127.0.0.6"] == 4  # vip: its own throttle, 30 per second
    assert by_peer["127.0.0.7"] == 1  # other: the Host stanza's, one a minute
    assert len(sink.messages) + len(h.relay.queue.items) == 7  # whatever did not go yet waits
    assert records(h, "T") == []


async def test_a_throttle_that_does_not_bind_still_opens_connections(dns, sinks, relay):
    """A message throttle keeps the connections it needs, no more (see the 10/1 test), but one
    that the rate does not bind (1000/1 against a sink taking 50 ms a message) must not hold the
    destination to one connection: more open while their tokens come without waiting."""
    (sink,) = await sinks(1)
    sink.faults.set("dot", delay=0.05)
    dns.add_mx("fast.test", 10, "mx.fast.test")
    dns.add_a("mx.fast.test", sink.host)
    h = await relay('Domain "fast.test" { outbound_throttle_messages = "1000/1"\n max_outbound_connections = 8 }\n')
    await _send_all(h, [(f"r{i}@fast.test", body(f"f{i}")) for i in range(40)])
    await sink.wait_for(40, timeout=30)
    await drained(h)
    assert records(h, "T") == []
    assert 1 < sink.peak_sessions <= 8
