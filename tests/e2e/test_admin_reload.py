"""Issue 12, item 3: reload without a restart, on a real relay under load, with real sinks."""

from __future__ import annotations

import asyncio
import socket

import aiosmtplib

from fastrelay.smtp import replies as R
from tests.e2e.conftest import body, drained, records, send
from tests.e2e.test_admin_api import ADMIN, call, wait_state


def rewrite(h, old: str, new: str) -> None:
    text = h.conf_path.read_text()
    assert old in text
    h.conf_path.write_text(text.replace(old, new))


async def test_route_change_under_load_loses_nothing_and_new_mail_takes_the_new_route(sinks, relay):
    """"Tests: change a route under load and check that nothing is lost and new mail takes the new
    route.\""""
    a, b = await sinks(2)
    h = await relay("Domain r.test { Gateway = 127.0.0.2 }\n" + ADMIN)
    sent: list[str] = []
    stop = asyncio.Event()

    async def load(n: int) -> None:
        i = 0
        while not stop.is_set():
            tid = f"w{n}-{i}"
            await send(h, [f"{tid}@r.test"], body(tid))
            sent.append(tid)
            i += 1

    workers = [asyncio.create_task(load(n)) for n in range(4)]
    while len(sent) < 40:
        await asyncio.sleep(0.01)
    rewrite(h, "Gateway = 127.0.0.2", "Gateway = 127.0.0.3")
    st, r = await call(h, "POST", "/api/v1/reload")
    assert st == 200 and r["reloaded"] is True, r
    assert "Domain r.test: Gateway: 127.0.0.2 -> 127.0.0.3" in r["changes"]
    mark = len(sent)
    while len(sent) < mark + 40:
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*workers)
    after = set(sent[mark + 8:])  # sent after the reload answered (with a margin for sends in flight)
    await drained(h, timeout=60)
    got_a = [m.test_id for m in a.messages]
    got_b = [m.test_id for m in b.messages]
    assert sorted(got_a + got_b) == sorted(sent), "every message delivered exactly once"
    assert after and after <= set(got_b), "new mail takes the new route"
    assert got_a, "mail before the reload went the old way"


async def test_a_broken_reload_changes_nothing(sinks, relay):
    """"A configuration that does not validate is refused, the old one stays in force, and the
    reason is logged and returned.\""""
    a, b = await sinks(2)
    h = await relay("Domain r.test { Gateway = 127.0.0.2 }\n" + ADMIN)
    cfg = h.relay.cfg
    rewrite(h, "Gateway = 127.0.0.2", "Gateway = 127.0.0.3\nretry_interval = soon")
    st, r = await call(h, "POST", "/api/v1/reload")
    assert (st, r["error"]["code"]) == (422, "invalid_config")
    (line,) = r["error"]["errors"]
    assert "relay.conf:" in line and "retry_interval" in line
    assert h.relay.cfg is cfg
    await send(h, ["x@r.test"], body("still-old"))
    await a.wait_for(1)
    await drained(h)
    assert b.messages == []


async def test_reload_refuses_a_listener_it_cannot_bind_and_what_needs_a_restart(relay):
    h = await relay(ADMIN)
    cfg = h.relay.cfg
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        h.conf_path.write_text(h.conf_path.read_text() + f'ESMTP_Listener {{\n Listen "127.0.0.1:{port}" {{ }}\n}}\n')
        r = await h.relay.reload()
    assert r["reloaded"] is False and "address already in use" in r["errors"][0].lower()
    assert h.relay.cfg is cfg and len(h.relay.smtp_servers) == 1
    rewrite(h, 'Spool_Base = "spool"', 'Spool_Base = "elsewhere"')
    r = await h.relay.reload()
    assert r["reloaded"] is False and "Spool_Base changed" in r["errors"][0]
    rewrite(h, 'Spool_Base = "elsewhere"', 'Spool_Base = "spool"\nWorkers = 2')
    r = await h.relay.reload()
    assert r["reloaded"] is False and r["errors"] == ["Workers changed (1 -> 2); that needs a restart"]
    assert h.relay.cfg is cfg


async def test_listeners_added_and_removed_without_dropping_a_session(sinks, relay):
    """"bindings and listeners added or removed"; "Connections and messages in flight are not
    dropped.\""""
    (sink,) = await sinks(1)
    h = await relay("Gateway = 127.0.0.2\n" + ADMIN)
    old_port = h.port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        new_port = s.getsockname()[1]
    # A session open on the old listener, mid-transaction, while the reload removes that listener.
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=old_port, timeout=10)
    await c.connect()
    await c.ehlo()
    assert (await c.execute_command(b"MAIL", b"FROM:<a@example.com>")).code == 250
    # The harness's ESMTP listener is the last stanza (the admin one is also on "127.0.0.1:0").
    head, _, _ = h.conf_path.read_text().rpartition('ESMTP_Listener {')
    h.conf_path.write_text(head + f'ESMTP_Listener {{\n  Listen "127.0.0.1:{new_port}" {{ }}\n}}\n')
    r = await h.relay.reload()
    assert r["reloaded"] is True, r
    assert any(f"ESMTP listener 127.0.0.1:{new_port} added" == x for x in r["changes"]), r["changes"]
    assert any(f"ESMTP listener 127.0.0.1:{old_port} removed" in x for x in r["changes"]), r["changes"]
    assert (await c.execute_command(b"RCPT", b"TO:<x@old-session.test>")).code == 250
    assert (await c.data(body("old-session"))).code == 250
    await c.quit()
    # The old port no longer accepts; the new one does.
    await asyncio.sleep(0.5)
    try:
        await aiosmtplib.SMTP(hostname="127.0.0.1", port=old_port, timeout=3).connect()
        raise AssertionError("the removed listener still accepts")
    except (aiosmtplib.SMTPConnectError, OSError):
        pass
    errors, _ = await aiosmtplib.send(body("new-listener"), sender="a@example.com", recipients=["y@new.test"],
                                      hostname="127.0.0.1", port=new_port)
    assert errors == {}
    got = await sink.wait_for(2)
    assert sorted(m.test_id for m in got) == ["new-listener", "old-session"]
    await drained(h)


async def test_relay_hosts_change_applies_to_new_sessions(relay):
    """"routes, limits, throttles, TLS policy, relay_hosts ..." are applied by the reload."""
    h = await relay('relay_hosts = ( "127.0.0.0/8" )\n' + ADMIN)
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port, timeout=10)
    await c.connect()
    assert (await c.execute_command(b"MAIL", b"FROM:<a@example.com>")).code == 250
    assert (await c.execute_command(b"RCPT", b"TO:<x@far.test>")).code == 250
    await c.quit()
    rewrite(h, 'relay_hosts = ( "127.0.0.0/8" )', 'relay_hosts = ( "192.0.2.0/24" )')
    assert (await h.relay.reload())["reloaded"] is True
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port, timeout=10)
    await c.connect()
    assert (await c.execute_command(b"MAIL", b"FROM:<a@example.com>")).code == 250
    resp = await c.execute_command(b"RCPT", b"TO:<x@far.test>")
    assert (resp.code, resp.message.split()[0]) == (R.RELAY_DENIED.code, R.RELAY_DENIED.esc)
    await c.quit()


async def test_a_limit_change_applies_to_the_next_sessions(sinks, relay):
    """Limits are reloaded too: max_outbound_connections 1 -> 4 (sink session peaks)."""
    (a,) = await sinks(1)
    a.faults.set("dot", delay=0.05)
    h = await relay("Domain lim.test { Gateway = 127.0.0.2\n max_outbound_connections = 1 }\n"
                    "Connection_Cache_Time = 0\n" + ADMIN)
    await asyncio.gather(*(send(h, [f"r{i}@lim.test"], body(f"l{i}")) for i in range(12)))
    await drained(h, 30)
    assert a.peak_sessions == 1
    rewrite(h, "max_outbound_connections = 1", "max_outbound_connections = 4")
    assert (await h.relay.reload())["reloaded"] is True
    a.reset()
    await asyncio.gather(*(send(h, [f"s{i}@lim.test"], body(f"m{i}")) for i in range(40)))
    await drained(h, 30)
    assert len(a.messages) == 40
    assert 1 < a.peak_sessions <= 4


async def test_the_commit_window_options_apply_to_the_running_spool(relay):
    """spool_commit_delay and spool_commit_few_clients are read by the spool writer per batch, so a
    reload sets them on the running spool (fastrelay.admin.reload)."""
    h = await relay("spool_commit_delay = 5ms\nspool_commit_few_clients = 2\n" + ADMIN)
    assert (h.relay.spool.commit_delay, h.relay.spool.few_clients) == (0.005, 2)
    rewrite(h, "spool_commit_few_clients = 2", "spool_commit_few_clients = 0")
    rewrite(h, "spool_commit_delay = 5ms", "spool_commit_delay = 0")
    assert (await h.relay.reload())["reloaded"] is True
    assert (h.relay.spool.commit_delay, h.relay.spool.few_clients) == (0.0, 0)
    await send(h, ["x@example.net"], body("after"))  # the writer still commits with the new ones


async def test_a_tls_policy_change_applies_to_queued_mail(sinks, relay):
    """TLS policy is reloaded: a sink without STARTTLS under TLS = required defers; after a reload
    to ifavailable the queued message goes out on the next try."""
    (a,) = await sinks(1)
    a.faults.hide.add("STARTTLS")
    h = await relay("Domain tls.test { Gateway = 127.0.0.2\n TLS = required }\nretry_interval = 1h\n" + ADMIN)
    await send(h, ["x@tls.test"], body("tls"))
    await wait_state(h, {"deferred": 1})
    assert a.messages == []
    rewrite(h, "TLS = required", "TLS = ifavailable")
    assert (await h.relay.reload())["reloaded"] is True
    assert (await call(h, "POST", "/api/v1/flush"))[1]["flushed"] == 1
    (m,) = await a.wait_for(1)
    assert m.test_id == "tls"
    await drained(h)


async def test_bindings_and_throttles_are_reloaded(sinks, relay):
    """Issue 12: reload applies "throttles ... bindings": a Binding with its Bind_Address and a
    Binding_Header added by a reload assign new mail; a message throttle added by a reload paces
    the next mail (generous bound, no exact timing)."""
    import time

    (a,) = await sinks(1)
    h = await relay("Domain b.test { Gateway = 127.0.0.2 }\n#BINDINGS\n" + ADMIN)
    await send(h, ["x@b.test"], b"X-Binding: vip\r\n" + body("before"))
    await drained(h)
    assert [(m.test_id, m.peer[0]) for m in a.messages] == [("before", "127.0.0.1")]
    rewrite(h, "#BINDINGS", 'Binding_Header = "X-Binding"\nBinding "vip" { Bind_Address = "127.0.0.5" }\n'
                            'Domain t.test { Gateway = 127.0.0.2\n outbound_throttle_messages = "2/1" }')
    r = await h.relay.reload()
    assert r["reloaded"] is True, r
    await send(h, ["x@b.test"], b"X-Binding: vip\r\n" + body("after"))
    await drained(h)
    (m,) = [m for m in a.messages if m.test_id == "after"]
    assert m.peer[0] == "127.0.0.5" and b"x-binding" not in m.data.lower()
    start = time.monotonic()
    await asyncio.gather(*(send(h, [f"t{i}@t.test"], body(f"t{i}")) for i in range(5)))
    await drained(h, 30)
    assert len([m for m in a.messages if m.test_id.startswith("t")]) == 5
    assert time.monotonic() - start >= 1.8  # 5 at 2 a second: one every 0.5 s


async def test_xfer_listeners_added_moved_and_removed_by_reload(sinks, relay, sink_port):
    """Issue 12: reload applies "listeners added or removed", the XFER ones (seeds 000/001's
    HTTP_Listener) too: node B gains its XFER server by a reload and A's queued transfer goes
    through; B's listener then moves to another port, the old one stops answering, the new one
    takes the next transfer."""
    from tests.e2e.test_xfer_two_nodes import node_a_conf, node_b_conf
    from tests.support import free_port

    (sink_b,) = await sinks(1, first=3)
    http1, http2 = free_port(), free_port()
    b = await relay(ADMIN + "#XFER\n", subdir="b")
    a = await relay(node_a_conf(http1, 'domain gmail.com { reroute_domain = "xfer.test" }\n') + ADMIN,
                    subdir="a")
    await send(a, ["one@gmail.com"], body("x-before"))
    for _ in range(100):  # B has no XFER server yet: A's transfer fails and is retried
        if records(a, "T"):
            break
        await asyncio.sleep(0.1)
    assert records(a, "T") and sink_b.messages == []
    rewrite(b, "#XFER\n", node_b_conf(http1, sink_port))
    r = await b.relay.reload()
    assert r["reloaded"] is True, r
    assert f"HTTP listener 127.0.0.1:{http1} added" in r["changes"]
    (m1,) = await sink_b.wait_for(1, timeout=15)
    assert m1.test_id == "x-before"
    await drained(a)
    # Move B's listener; A follows with its own reload.
    rewrite(b, f'Listen "127.0.0.1:{http1}"', f'Listen "127.0.0.1:{http2}"')
    r = await b.relay.reload()
    assert r["reloaded"] is True, r
    assert f"HTTP listener 127.0.0.1:{http2} added" in r["changes"]
    assert f"HTTP listener 127.0.0.1:{http1} removed" in r["changes"]
    await asyncio.sleep(0.3)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", http1)) != 0, "the removed XFER listener still accepts"
    text = a.conf_path.read_text()
    a.conf_path.write_text(text.replace(f"port={http1}", f"port={http2}"))
    assert (await a.relay.reload())["reloaded"] is True
    await send(a, ["two@gmail.com"], body("x-after"))
    got = await sink_b.wait_for(2, timeout=15)
    assert sorted(m.test_id for m in got) == ["x-after", "x-before"]
    await drained(a)
    await drained(b)
    # And a reload that drops the XFER server closes its listener.
    rewrite(b, 'source = "msys.xfer.server"', 'source = "msys.xfer.client"')
    r = await b.relay.reload()
    assert r["reloaded"] is True and f"HTTP listener 127.0.0.1:{http2} removed" in r["changes"], r
    assert b.relay.xfer_servers == []


async def test_an_xfer_setting_change_applies_to_the_running_listener(relay, sink_port):
    """A reload that keeps the HTTP_Listener's address updates its settings in place: a new
    xfer_secret is what the next request must be signed with."""
    from tests.e2e.test_xfer_two_nodes import SECRET, node_b_conf
    from tests.support import free_port

    http = free_port()
    b = await relay(node_b_conf(http, sink_port) + ADMIN, subdir="b")
    (srv,) = b.relay.xfer_servers
    rewrite(b, f'xfer_secret = "{SECRET}"', 'xfer_secret = "rotated-secret"')
    r = await b.relay.reload()
    assert r["reloaded"] is True, r
    assert b.relay.xfer_servers == [srv], "the same listener, not a new one"
    assert srv.s.secret == "rotated-secret"
    assert any("xfer_secret: (secret) -> (secret)" in c for c in r["changes"]), r["changes"]


async def test_dns_servers_change_applies_to_the_next_lookups(sinks, relay, dns):
    """Issue 12: a reload applies DNS_Servers: with the route's MX answered differently by a
    second DNS server, mail after the reload goes where the new server says."""
    from tests.support import DNSServer

    a, b = await sinks(2)
    dns.add_mx("d.test", 10, "mx.d.test")
    dns.add_a("mx.d.test", "127.0.0.2")
    other = DNSServer("127.0.0.1", 0)
    try:
        other.add_mx("d.test", 10, "mx.d.test")
        other.add_a("mx.d.test", "127.0.0.3")
        h = await relay(ADMIN)
        await send(h, ["x@d.test"], body("old-dns"))
        await a.wait_for(1)
        await drained(h)
        rewrite(h, f'DNS_Servers = ( "{dns.address}" )', f'DNS_Servers = ( "{other.address}" )')
        r = await h.relay.reload()
        assert r["reloaded"] is True, r
        assert "DNS resolver: new servers or timeout, cache emptied" in r["changes"]
        await send(h, ["y@d.test"], body("new-dns"))
        (m,) = await b.wait_for(1)
        assert m.test_id == "new-dns" and [x.test_id for x in a.messages] == ["old-dns"]
        assert other.queries[("mx.d.test", "A")] >= 1
        await drained(h)
        # A reload that changes nothing about DNS keeps the resolver's cache.
        cached = set(h.relay.resolver._cache)
        assert ("mx.d.test", 1) in cached  # T_A of the new server's answer
        r = await h.relay.reload()
        assert r["reloaded"] is True and not any(c.startswith("DNS resolver") for c in r["changes"])
        assert set(h.relay.resolver._cache) == cached
    finally:
        other.stop()
