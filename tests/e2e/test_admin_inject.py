"""Issue 12, item 5: the HTTP injection API, end to end: real HTTP in, real spool, real SMTP out."""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.e2e.conftest import drained, records
from tests.e2e.test_admin_api import ADMIN, admin_url, call

MSG = "From: a@example.com\nSubject: injected\nX-Test-Id: {tid}\n\nhello\n"


async def test_json_injection_with_many_recipients_is_delivered(sinks, relay):
    """"POST a message with its envelope (JSON envelope plus an RFC 5322 body ...) ... batches many
    recipients in one call.\""""
    (sink,) = await sinks(1)
    h = await relay("Gateway = 127.0.0.2\n" + ADMIN)
    rcpts = [f"u{i}@d{i % 3}.test" for i in range(30)]
    st, r = await call(h, "POST", "/api/v1/inject",
                       json={"sender": "a@example.com", "recipients": rcpts, "content": MSG.format(tid="inj")})
    assert st == 200 and (r["recipients"], r["entries"]) == (30, 3)
    got = await sink.wait_for(3)
    assert sorted(a for m in got for a in m.rcpt_tos) == sorted(rcpts)
    m = got[0]
    assert m.data.startswith(b"Received: from api ([127.0.0.1])\r\n\tby relay.test (fastrelay) with HTTP id "
                             + r["id"].encode())
    assert m.data.endswith(b"X-Test-Id: inj\r\n\r\nhello\r\n")  # line ends made CRLF
    await drained(h)
    rec = records(h, "R")
    assert len(rec) == 30 and {f[2] for f in rec} == {r["id"]} and {f[7] for f in rec} == {"http"}


async def test_the_200_comes_after_the_spool_commit(relay):
    """"It answers 200 with the message id only after the spool commit (the same durability as
    the SMTP 250).\""""
    h = await relay("Gateway = 127.0.0.9\nretry_interval = 1h\nConnect_Timeout = 1s\n" + ADMIN)
    await call(h, "POST", "/api/v1/suspensions", json={"domain": "kept.test"})
    st, r = await call(h, "POST", "/api/v1/inject", json={
        "sender": "", "recipients": ["x@kept.test"], "content_base64": "U3ViamVjdDogYgoKXzhiaXQg/w=="})
    assert st == 200
    await h.stop()  # what is on disk now is what a crash right after the 200 would leave
    (env, data), = await h.spooled()
    assert (env.msgid, env.sender, env.protocol, [x.address for x in env.recipients]) == \
        (r["id"], "", "http", ["x@kept.test"])
    assert data.endswith(b"Subject: b\r\n\r\n_8bit \xff\r\n")


async def test_multipart_injection(sinks, relay):
    """"... or multipart"."""
    (sink,) = await sinks(1)
    h = await relay("Gateway = 127.0.0.2\n" + ADMIN)
    form = aiohttp.FormData()
    form.add_field("envelope", json.dumps({"sender": "m@example.com", "recipients": ["y@mp.test"]}),
                   content_type="application/json")
    form.add_field("message", MSG.format(tid="mp").encode().replace(b"\n", b"\r\n"), content_type="message/rfc822",
                   filename="m.eml")
    async with aiohttp.ClientSession() as s, s.post(admin_url(h) + "/api/v1/inject", data=form) as resp:
        assert resp.status == 200, await resp.text()
    (m,) = await sink.wait_for(1)
    assert m.rcpt_tos == ["y@mp.test"] and m.mail_from == "m@example.com"
    await drained(h)


REFUSED = [
    # (conf, request json, status, a phrase of the error)
    ("max_message_size = 2k\n", {"sender": "a@x.test", "recipients": ["b@y.test"], "content": "S: x\n\n" + "x" * 3000},
     413, "5.3.4"),
    ("max_recipients_per_message = 3\n", {"sender": "a@x.test", "recipients": [f"r{i}@y.test" for i in range(4)],
                                          "content": "S: x\n\nb\n"}, 400, "max_recipients_per_message"),
    ("", {"sender": "a@x.test", "recipients": ["b@y.test", "not an address", "c@"], "content": "S: x\n\nb\n"},
     400, "recipient 1: bad address"),
    ("", {"sender": "bad sender@", "recipients": ["b@y.test"], "content": "S: x\n\nb\n"}, 400, "bad sender"),
    ("", {"sender": "a@x.test", "recipients": ["b@y.test"], "content": "S: x\n\n" + "y" * 1200 + "\n"}, 400,
     "5.5.2"),
    ("", {"sender": "a@x.test", "recipients": ["b@y.test"], "content": "Received: x\n" * 60 + "\nb\n"}, 400,
     "5.4.0"),
    ("", {"sender": "a@x.test", "recipients": ["b@y.test"]}, 400, "content"),
    ("", {"sender": "a@x.test", "recipients": ["b@y.test"], "content_base64": "***"}, 400, "base64"),
    ("", {"sender": "a@x.test", "recipients": [], "content": "x"}, 400, "recipients"),
    ("", {"sender": "a@x.test", "recipients": ["b@y.test"], "content": "x", "binding": "nope"}, 400,
     "unknown binding"),
    # Relay policy: this client is outside relay_hosts, so only relay_domains may be sent to.
    ('relay_hosts = ( "192.0.2.0/24" )\nrelay_domains = ( "ours.test" )\n',
     {"sender": "a@x.test", "recipients": ["ok@ours.test", "b@far.test"], "content": "S: x\n\nb\n"}, 403,
     "recipient 1: 5.7.1 Relay access denied"),
]


@pytest.mark.parametrize(("conf", "req", "status", "phrase"), REFUSED)
async def test_same_policy_and_limits_as_smtp_and_nothing_queued(relay, conf, req, status, phrase):
    """"It has the same relay policy and size limits as SMTP"; a refused call queues nothing."""
    h = await relay(conf + ADMIN)
    st, r = await call(h, "POST", "/api/v1/inject", json=req)
    assert st == status and phrase in r["error"]["message"], r
    assert h.relay.queue.items == {}


async def test_relay_domains_accepted_from_outside_relay_hosts(sinks, relay):
    (sink,) = await sinks(1)
    h = await relay('Gateway = 127.0.0.2\nrelay_hosts = ( "192.0.2.0/24" )\nrelay_domains = ( "ours.test" )\n'
                    + ADMIN)
    st, _ = await call(h, "POST", "/api/v1/inject",
                       json={"sender": "a@x.test", "recipients": ["ok@ours.test"], "content": MSG.format(tid="rd")})
    assert st == 200
    await sink.wait_for(1)
    await drained(h)
