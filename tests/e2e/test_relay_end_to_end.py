"""A message in, through __mx__ DNS routing, out to the sink; logs, Received and bytes exact."""

from __future__ import annotations

from tests.e2e.conftest import body, drained, records, send


async def test_delivered_by_mx(dns, sinks, relay):
    (sink,) = await sinks(1)
    dns.add_mx("example.net", 10, "mx.example.net")
    dns.add_a("mx.example.net", "127.0.0.2")
    h = await relay()
    data = body("e2e-1", b"..starts with a dot\r\n.\r\n\r\n")
    resp = await send(h, ["b@example.net", "c@example.net"], data)
    (msg,) = await sink.wait_for(1)
    assert sorted(msg.rcpt_tos) == ["b@example.net", "c@example.net"]
    assert msg.mail_from == "a@example.com"
    # The sink gets our body byte for byte after our Received: header (dot-stuffing round trip,
    # docs/reliability.md case 27).
    assert msg.data.startswith(b"Received: from ")
    assert msg.data.endswith(data)
    await drained(h)
    d = records(h, "D")
    assert sorted(r[3] for r in d) == ["b@example.net", "c@example.net"]
    msgid = resp.split()[-1]
    for r in d:
        # time D msgid rcpt domain size binding retries seconds remote response
        assert r[2] == msgid and r[4] == "example.net" and r[6] == "default" and r[7] == "0"
        assert r[9] == f"127.0.0.2:{sink.port}" and r[10].startswith("250")


async def test_messages_for_two_domains_split(dns, sinks, relay):
    a, b = await sinks(2)
    dns.add_mx("one.test", 10, "mx.one.test")
    dns.add_a("mx.one.test", "127.0.0.2")
    dns.add_mx("two.test", 10, "mx.two.test")
    dns.add_a("mx.two.test", "127.0.0.3")
    h = await relay()
    await send(h, ["x@one.test", "y@two.test"], body("split"))
    (ma,) = await a.wait_for(1)
    (mb,) = await b.wait_for(1)
    assert ma.rcpt_tos == ["x@one.test"] and mb.rcpt_tos == ["y@two.test"]


async def test_quoted_local_part_reaches_the_sink_byte_exact(dns, sinks, relay):
    (sink,) = await sinks(1)
    dns.add_mx("example.net", 10, "mx.example.net")
    dns.add_a("mx.example.net", "127.0.0.2")
    h = await relay()
    import aiosmtplib

    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port)
    await c.connect()
    await c.execute_command(b"MAIL", b'FROM:<a@example.com>')
    resp = await c.execute_command(b"RCPT", b'TO:<"john..doe"@example.net>')
    assert resp.code == 250
    await c.data(body("quoted"))
    await c.quit()
    await sink.wait_for(1)
    # aiosmtpd unquotes local parts in its envelope; the command line is the wire bytes.
    assert 'RCPT TO:<"john..doe"@example.net>' in sink.sessions[0].commands

