"""Bind_Address before connect for every delivery client (issue #10: "That covers SMTP, LMTP and
the XFER client"), and a bind failure as a clear transient failure of the binding."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from fastrelay.delivery import OK, ConnectError, Hop, Settings
from fastrelay.delivery.connect import connect
from fastrelay.delivery.xfer import close_sessions
from fastrelay.xfer.server import XferServer, XferServerSettings
from tests.support import Sink
from tests.test_xfer_server import SpoolIntake, open_spool, spooled

FAST = Settings(helo_name="b1.vip.test", connect_timeout=2, greeting_timeout=2, ehlo_timeout=2, tls="no",
                mail_timeout=2, rcpt_timeout=2, data_timeout=2, done_timeout=2, rset_timeout=2,
                xfer_secret="s3cret")
BODY = b"Subject: bind\r\n\r\nhi\r\n"


@pytest.mark.parametrize("lmtp", [False, True])
@pytest.mark.parametrize("source", ["127.0.0.3", "127.0.0.8", "localhost"])
async def test_smtp_and_lmtp_connect_from_the_bind_address(lmtp, source):
    """ref-bind-address: "Configures the source address that Momentum uses for outbound
    connections"; a local host name is resolved."""
    async with Sink(host="127.0.0.2", lmtp=lmtp) as sink:
        s = dataclasses.replace(FAST, bind_address=source)
        conn = await connect(Hop(sink.host, sink.port, "lmtp" if lmtp else "smtp", "sink.test", 0), s)
        try:
            (r,) = await conn.deliver("a@example.com", "", [("x@d.test", "")], BODY)
        finally:
            await conn.close()
        assert r.status == OK
        peer = sink.messages[0].peer[0]
        if source == "localhost":
            assert ipaddress.ip_address(peer).is_loopback
        else:
            assert peer == source
        assert sink.messages[0].ehlo == "b1.vip.test"


@pytest.mark.parametrize(("source", "why"), [
    ("192.0.2.1", "Cannot assign requested address"),  # TEST-NET-1: on no interface here
    ("::1", "it is an IPv6 address and the next hop is not"),
])
async def test_bind_failure_is_transient_and_says_why(source, why):
    async with Sink(host="127.0.0.2") as sink:
        s = dataclasses.replace(FAST, bind_address=source, binding="b9")
        with pytest.raises(ConnectError) as e:
            await connect(Hop(sink.host, sink.port, "smtp", "sink.test", 0), s)
        assert sink.sessions == []  # nothing was sent anywhere
    err = e.value
    assert err.code == 451 and err.policy  # the binding's trouble, not the host's
    assert err.text.startswith(f"4.4.1 Cannot bind to Bind_Address {source} of binding b9")
    assert why in err.text


async def test_xfer_client_connects_from_the_bind_address(tmp_path):
    """The XFER peer takes transfers only from 127.0.0.3: with the binding's Bind_Address the
    transfer goes through, from elsewhere it is refused."""
    from fastrelay.message import Envelope, Recipient

    sp = await open_spool(tmp_path / "recv")
    srv = XferServer(XferServerSettings(secret="s3cret", allowed_clients=(ipaddress.ip_network("127.0.0.3/32"),)),
                     SpoolIntake(sp))
    await srv.start("127.0.0.2", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        env = Envelope(sender="s@a.test", recipients=[Recipient("r@d.test")], domain="d.test", client_ip="192.0.2.9",
                       helo="c.test", msgid="1.x", binding="b1")
        hop = Hop("127.0.0.2", port, "xfer", "peer.test", 0)
        ok = await connect(hop, dataclasses.replace(FAST, bind_address="127.0.0.3"))
        (r,) = await ok.transfer(env, [0], BODY, ("node-a", "1"))
        assert r.status == OK
        (got, _), = await spooled(sp)
        assert got.binding == "b1"  # the binding travels with the message
        other = await connect(hop, FAST)
        (r2,) = await other.transfer(env, [0], BODY, ("node-a", "2"))
        assert r2.status != OK and "403 forbidden: this client address may not transfer" in r2.text
    finally:
        await close_sessions()
        await srv.stop()
        await sp.close()
