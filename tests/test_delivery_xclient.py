"""Outbound XCLIENT (Momentum's xclient, Postfix XCLIENT_README; issue #10) against a sink that
speaks it: attributes xtext-encoded, the 220 after it and the EHLO again, ifavailable/required."""

from __future__ import annotations

import dataclasses

import pytest

from fastrelay.config import loads
from fastrelay.delivery import OK, TEMP, Hop, Settings
from fastrelay.delivery.connect import connect
from fastrelay.delivery.xclient import command, unxtext, xtext
from fastrelay.queue import delivery_settings
from tests.support import Sink

FAST = Settings(helo_name="relay.test", connect_timeout=2, greeting_timeout=2, ehlo_timeout=2, tls="no",
                mail_timeout=2, rcpt_timeout=2, data_timeout=2, done_timeout=2, rset_timeout=2)
CLIENT = {"NAME": "[UNAVAILABLE]", "ADDR": "192.0.2.7", "PROTO": "ESMTP", "HELO": "client.example", "LOGIN": "joe"}
BODY = b"Subject: x\r\n\r\nhello\r\n"


@pytest.mark.parametrize(("raw", "encoded"), [
    ("client.example", "client.example"),
    ("a b", "a+20b"),
    ("a+b=c", "a+2Bb+3Dc"),  # RFC 3461 §4: "+" and "=" are always encoded
    ("h\u00e9", "h+C3+A9"),
    ("[UNAVAILABLE]", "[UNAVAILABLE]"),
])
def test_xtext(raw, encoded):
    assert xtext(raw) == encoded
    assert unxtext(encoded) == raw


def test_command_sends_only_offered_attributes():
    """XCLIENT_README: the server lists the attributes it takes in its EHLO reply."""
    line = command({**CLIENT, "HELO": "bad helo"}, "NAME ADDR HELO")
    assert line == b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 HELO=bad+20helo\r\n"
    assert command(CLIENT, "DESTADDR") is None


def test_xclient_option_in_momentum_scopes():
    """ref-xclient: `Binding customer-1 { xclient = "ifavailable" Domain relay.example.com {
    xclient = "required" } }`."""
    cfg = loads('Binding customer-1 { xclient = "ifavailable"\n'
                '  Domain relay.example.com { xclient = "required" } }\n')
    assert delivery_settings(cfg, "relay.example.com", "customer-1", "h").xclient == "required"
    assert delivery_settings(cfg, "other.example", "customer-1", "h").xclient == "ifavailable"
    assert delivery_settings(cfg, "other.example", "default", "h").xclient == "no"


async def _deliver(sink, mode, clients):
    s = dataclasses.replace(FAST, xclient=mode)
    conn = await connect(Hop(sink.host, sink.port, "smtp", "sink.test", 10), s)
    try:
        out = []
        for i, c in enumerate(clients):
            out.append(await conn.deliver("a@example.com", "", [(f"r{i}@d.test", "")], BODY, client=c))
        return out
    finally:
        await conn.close()


async def test_attributes_reach_the_next_hop_and_ehlo_follows():
    """XCLIENT_README: after XCLIENT the server "sends a 220 greeting"; the client says EHLO again.
    The same client on the next message needs no second XCLIENT; another client does."""
    async with Sink(host="127.0.0.3", xclient=True) as sink:
        other = {**CLIENT, "ADDR": "IPV6:2001:db8::7"}
        res = await _deliver(sink, "ifavailable", [CLIENT, CLIENT, other])
        assert [r[0].status for r in res] == [OK, OK, OK]
        assert [m.xclient for m in sink.messages] == [CLIENT, CLIENT, other]
        cmds = [c.split()[0].upper() for c in sink.sessions[0].commands]
        assert cmds.count("XCLIENT") == 2
        i = cmds.index("XCLIENT")
        assert cmds[i + 1] == "EHLO"
        # EHLO again with the original client's HELO name, so the next hop logs that name.
        assert {m.ehlo for m in sink.messages} == {"client.example"}


@pytest.mark.parametrize(("mode", "offered", "reply", "outcome"), [
    ("required", False, None, "4.7.0 XCLIENT is required, but 127.0.0.3:{port} does not offer it"),
    ("required", True, "550 5.7.0 Error: insufficient authorization", "4.7.0 XCLIENT is required, but"),
    ("ifavailable", True, "550 5.7.0 Error: insufficient authorization", "delivered"),
    ("ifavailable", False, None, "delivered"),
    ("required", True, None, "delivered"),
])
async def test_ifavailable_and_required(mode, offered, reply, outcome):
    """ref-xclient: "If it is required then outbound mail will be transiently failed if the remote
    mail exchange does not support and accept the xclient negotiation"."""
    async with Sink(host="127.0.0.3", xclient=offered, xclient_reply=reply) as sink:
        (res,) = await _deliver(sink, mode, [CLIENT])
        if outcome == "delivered":
            assert res[0].status == OK
            assert len(sink.messages) == 1
            assert sink.messages[0].xclient == (CLIENT if offered and reply is None else None)
        else:
            assert res[0].status == TEMP and res[0].code == 451
            assert res[0].text.startswith(outcome.format(port=sink.port))
            assert sink.messages == []
