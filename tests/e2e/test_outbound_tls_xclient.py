"""Through a whole relay (issue #10): the mainlog D record says whether TLS was used, with protocol
and cipher; XCLIENT carries the original client's address and HELO to the next hop."""

from __future__ import annotations

import aiosmtplib

from tests.e2e.conftest import body, drained, records, send
from tests.support import tls_pair


async def test_d_record_says_tls_protocol_and_cipher(dns, sinks, relay):
    """Issue #10: "The mainlog D record says whether the delivery used TLS, with protocol and
    cipher (as Postfix logs `TLS connection established`)"."""
    (tls_sink,) = await sinks(1, tls_context=tls_pair().server)
    (plain,) = await sinks(1, first=3)
    dns.add_mx("tls.test", 10, "mx.tls.test")
    dns.add_a("mx.tls.test", tls_sink.host)
    dns.add_mx("plain.test", 10, "mx.plain.test")
    dns.add_a("mx.plain.test", plain.host)
    h = await relay("")
    await send(h, ["a@tls.test"], body("t1"))
    await send(h, ["b@plain.test"], body("t2"))
    await drained(h)
    d = {f[3]: f for f in records(h, "D")}
    proto, _, cipher = d["a@tls.test"][11].removeprefix("tls=").partition(":")
    assert proto.startswith("TLSv1.") and cipher
    assert d["b@plain.test"][11] == "tls=none"
    assert d["a@tls.test"][10].startswith("250 ")  # the response keeps its place


async def test_xclient_carries_the_original_client(dns, sinks, relay):
    """ref-xclient: "information regarding the original sending host (such as the connecting IP
    address) [is] communicated with the next hop"; Postfix XCLIENT_README attributes."""
    (sink,) = await sinks(1, xclient=True)
    dns.add_mx("xc.test", 10, "mx.xc.test")
    dns.add_a("mx.xc.test", sink.host)
    h = await relay('XCLIENT = "required"\n')
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port, timeout=10, local_hostname="origin.example")
    await c.connect()
    try:
        await c.sendmail("a@example.com", ["x@xc.test"], body("xc"))
    finally:
        await c.quit()
    await drained(h)
    (m,) = sink.messages
    assert m.xclient == {"NAME": "[UNAVAILABLE]", "ADDR": "127.0.0.1", "PROTO": "ESMTP", "HELO": "origin.example"}
    assert m.ehlo == "origin.example"  # EHLO again after the 220, with the original HELO name
