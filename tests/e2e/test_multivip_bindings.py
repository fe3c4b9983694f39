"""MultiVIP (Momentum 25.3, issue #10): each binding connects from its Bind_Address and says its
EHLO_Hostname; mail is assigned by listener option, by a trusted Binding_Header, or by group;
suspend_delivery holds one binding's mail; a bind that fails is a clear transient failure."""

from __future__ import annotations

import asyncio

from tests.e2e.conftest import body, drained, records, send

BINDINGS = """
Bind_Address = "127.0.0.5"
EHLO_Hostname = "default.vip.test"
Binding_Header = "X-Binding"
Binding "b1" { Bind_Address = "127.0.0.3" EHLO_Hostname = "b1.vip.test" }
Binding "b2" { Bind_Address = "127.0.0.4" EHLO_Hostname = "b2.vip.test" }
Binding_Group "g" {
  EHLO_Hostname = "group.vip.test"
  Binding "g1" { Bind_Address = "127.0.0.6" }
}
Binding_Group "g" {
  Binding "g2" { Bind_Address = "127.0.0.7" }
  Binding "g3" { Bind_Address = "127.0.0.8" suspend_delivery = true }
}
"""


def tagged(tid: str, binding: str | None) -> bytes:
    extra = f"X-Binding: {binding}\r\n".encode() if binding else b""
    return extra + body(tid)


async def test_each_binding_has_its_source_address_and_ehlo_name(dns, sinks, relay):
    """ref-bind-address: "When specified in a Binding stanza, the source IP for that binding will
    be configured"; ref-ehlo-hostname; ref-binding-group: "you can specify the same group
    multiple times". The sink sees the peer address and the EHLO name of each binding."""
    (sink,) = await sinks(1)
    dns.add_mx("vip.test", 10, "mx.vip.test")
    dns.add_a("mx.vip.test", sink.host)
    h = await relay(BINDINGS)
    rows = [("m-b1", "b1"), ("m-b2", "b2"), ("m-default", None), ("m-unknown", "nosuch"), ("m-explicit", "default")]
    for tid, b in rows:
        await send(h, [f"{tid}@vip.test"], tagged(tid, b))
    await drained(h)
    want = {
        "m-b1": ("127.0.0.3", "b1.vip.test", "b1"),
        "m-b2": ("127.0.0.4", "b2.vip.test", "b2"),
        "m-default": ("127.0.0.5", "default.vip.test", "default"),
        "m-unknown": ("127.0.0.5", "default.vip.test", "default"),  # unknown name: default
        "m-explicit": ("127.0.0.5", "default.vip.test", "default"),
    }
    got = {m.test_id: (m.peer[0], m.ehlo) for m in sink.messages}
    assert got == {k: v[:2] for k, v in want.items()}
    for m in sink.messages:
        assert b"x-binding" not in m.data.lower()  # removed before delivery
    # The binding is in the mainlog's R and D records.
    by_rcpt = {f[3].split("@")[0]: f for f in records(h, "D")}
    assert {k: by_rcpt[k][6] for k in want} == {k: v[2] for k, v in want.items()}
    r_bind = {f[3].split("@")[0]: f[8] for f in records(h, "R")}
    assert r_bind == {k: v[2] for k, v in want.items()}


async def test_group_spreads_over_bindings_that_are_not_suspended(dns, sinks, relay):
    """Issue #10: "a message assigned to a group gets one of the group's bindings that is not
    suspended, spread evenly"; the group's options apply to its bindings (EHLO_Hostname)."""
    (sink,) = await sinks(1)
    dns.add_mx("vip.test", 10, "mx.vip.test")
    dns.add_a("mx.vip.test", sink.host)
    h = await relay(BINDINGS)
    for i in range(10):
        await send(h, [f"g{i}@vip.test"], tagged(f"g{i}", "g"))
    await drained(h)
    peers = [m.peer[0] for m in sink.messages]
    assert sorted(peers) == ["127.0.0.6"] * 5 + ["127.0.0.7"] * 5
    assert {m.ehlo for m in sink.messages} == {"group.vip.test"}


async def test_header_is_ignored_from_clients_outside_relay_hosts(dns, sinks, relay):
    """Issue #10: the Binding_Header "is honoured only from clients in relay_hosts and removed
    before delivery"."""
    (sink,) = await sinks(1)
    dns.add_mx("vip.test", 10, "mx.vip.test")
    dns.add_a("mx.vip.test", sink.host)
    h = await relay(BINDINGS + 'relay_hosts = ( "10.0.0.0/8" )\nrelay_domains = ( "vip.test" )\n')
    await send(h, ["out@vip.test"], tagged("out", "b1"))
    await drained(h)
    (m,) = sink.messages
    assert (m.peer[0], m.ehlo) == ("127.0.0.5", "default.vip.test")
    assert b"x-binding" not in m.data.lower()


async def test_listener_binding_option(dns, sinks, relay):
    """Issue #10: "a Binding or Binding_Group option in ESMTP_Listener or Listen scope assigns
    all mail received there" (here it falls back from the Listen to the global scope); a
    trusted header still names another binding."""
    (sink,) = await sinks(1)
    dns.add_mx("vip.test", 10, "mx.vip.test")
    dns.add_a("mx.vip.test", sink.host)
    h = await relay(BINDINGS + 'Binding = "b2"\n')
    await send(h, ["l1@vip.test"], body("l1"))
    await send(h, ["l2@vip.test"], tagged("l2", "b1"))
    await drained(h)
    assert {m.test_id: m.peer[0] for m in sink.messages} == {"l1": "127.0.0.4", "l2": "127.0.0.3"}


async def test_suspend_delivery_per_binding_and_binding_domain(dns, sinks, relay):
    """Issue #10: "suspend_delivery works per binding and per binding::domain": that mail stays
    in the spool with its binding; the rest goes out."""
    (sink,) = await sinks(1)
    for dom in ("vip.test", "other.test"):
        dns.add_mx(dom, 10, f"mx.{dom}")
        dns.add_a(f"mx.{dom}", sink.host)
    h = await relay(BINDINGS + 'Binding "s" { Bind_Address = "127.0.0.9" suspend_delivery = true }\n'
                    'Binding "b1" { Domain "other.test" { suspend_delivery = true } }\n')
    await send(h, ["held@vip.test"], tagged("held", "s"))
    await send(h, ["held2@other.test"], tagged("held2", "b1"))
    await send(h, ["goes@vip.test"], tagged("goes", "b1"))
    await send(h, ["goes2@other.test"], tagged("goes2", "b2"))
    await sink.wait_for(2)
    await asyncio.sleep(0.5)
    assert sorted(m.test_id for m in sink.messages) == ["goes", "goes2"]
    assert len(h.relay.queue.items) == 2
    await h.stop()
    left = sorted((env.recipients[0].address, env.binding) for env, _ in await h.spooled())
    assert left == [("held2@other.test", "b1"), ("held@vip.test", "s")]


async def test_bind_failure_is_a_transient_failure_with_the_reason(dns, sinks, relay):
    """Issue #10: "A bind failure is a temporary failure with a clear reason"; the host stays
    usable for the other bindings."""
    (sink,) = await sinks(1)
    dns.add_mx("vip.test", 10, "mx.vip.test")
    dns.add_a("mx.vip.test", sink.host)
    # 192.0.2.1 (TEST-NET-1) is on no interface here: the bind fails before any packet is sent.
    h = await relay(BINDINGS + 'Binding "bad" { Bind_Address = "192.0.2.1" }\n')
    await send(h, ["nobind@vip.test"], tagged("nobind", "bad"))
    await send(h, ["fine@vip.test"], tagged("fine", "b1"))
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while not records(h, "T") and loop.time() < end:
        await asyncio.sleep(0.05)
    (t,) = records(h, "T")[:1]
    assert t[3] == "nobind@vip.test" and t[6] == "bad"
    assert "4.4.1 Cannot bind to Bind_Address 192.0.2.1 of binding bad" in t[10]
    await sink.wait_for(1)
    assert [m.test_id for m in sink.messages] == ["fine"]


def _peak_by_peer(sink) -> dict[str, int]:
    """Connections open at once per source address, from the sink's session times."""
    events = []
    for s in sink.sessions:
        events.append((s.opened_at, 1, s.peer[0]))
        events.append((s.closed_at if s.closed_at is not None else float("inf"), -1, s.peer[0]))
    now: dict[str, int] = {}
    peak: dict[str, int] = {}
    for _, delta, peer in sorted(events, key=lambda e: (e[0], e[1])):
        now[peer] = now.get(peer, 0) + delta
        peak[peer] = max(peak.get(peer, 0), now[peer])
    return peak


async def test_connection_limits_follow_the_binding(dns, sinks, relay):
    """ref-max-outbound-connections: "When connecting to example.com from the example binding,
    Max_Outbound_Connections will be 15, when connecting from another binding in the group1
    group it will be 5" - each binding counts its own connections to the same MX."""
    (sink,) = await sinks(1)
    dns.add_mx("vip.test", 10, "mx.vip.test")
    dns.add_a("mx.vip.test", sink.host)
    sink.faults.set("dot", delay=0.05)
    h = await relay(BINDINGS + 'Binding "b1" { max_outbound_connections = 2 }\n'
                    'Binding "b2" { Domain "vip.test" { max_outbound_connections = 3 } }\n')
    await asyncio.gather(*(send(h, [f"c{i}@vip.test"], tagged(f"c{i}", f"b{1 + i % 2}")) for i in range(60)))
    await drained(h, 30)
    assert len(sink.messages) == 60
    peak = _peak_by_peer(sink)
    assert peak["127.0.0.3"] <= 2  # b1
    assert peak["127.0.0.4"] <= 3  # b2
    # Each binding has its own count: together they have more open than either limit allows.
    assert sink.peak_sessions >= 4


async def test_a_domain_inside_a_binding_group_routes_that_groups_mail(dns, sinks, relay):
    """Momentum's binding_group::domain ("Value given in a domain stanza within a binding_group"):
    mail of the group's bindings to gd.test takes the group's Domain route; the same domain on
    another binding takes the global Domain's."""
    group_sink, global_sink = await sinks(2)
    conf = f"""
Binding_Header = "X-Binding"
Domain gd.test {{ Routes = ( "smtp://{global_sink.host}?port={global_sink.port}" ) }}
Binding_Group "g" {{
  Domain gd.test {{ Routes = ( "smtp://{group_sink.host}?port={group_sink.port}" ) }}
  Binding "g1" {{ }}
}}
Binding "b1" {{ }}
"""
    h = await relay(conf)
    for tid, b in [("m-g1", "g1"), ("m-group", "g"), ("m-b1", "b1"), ("m-none", None)]:
        await send(h, [f"{tid}@gd.test"], tagged(tid, b))
    await drained(h)
    assert sorted(m.test_id for m in group_sink.messages) == ["m-g1", "m-group"]
    assert sorted(m.test_id for m in global_sink.messages) == ["m-b1", "m-none"]
