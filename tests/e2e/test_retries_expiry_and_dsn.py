"""Retries with backoff, expiry, and RFC 3464 DSNs to the sender (never to the null sender)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import itertools

from tests.e2e.conftest import body, drained, records, send


def _mx(dns, domain: str, ip: str) -> None:
    dns.add_mx(domain, 10, f"mx.{domain}")
    dns.add_a(f"mx.{domain}", ip)


async def test_transient_failure_is_retried_then_delivered(dns, sinks, relay):
    (sink,) = await sinks(1)
    _mx(dns, "retry.test", "127.0.0.2")
    sink.faults.set("rcpt", reply="451 4.3.0 try later", times=2)
    h = await relay()
    await send(h, ["x@retry.test"], body("r1"))
    (_msg,) = await sink.wait_for(1, timeout=15)
    await drained(h)
    t = records(h, "T")
    assert len(t) == 2 and all(r[10].startswith("451 4.3.0") for r in t)
    d = records(h, "D")
    assert len(d) == 1 and d[0][7] == "2"  # delivered on the third attempt: two retries


async def test_permanent_failure_bounces_a_dsn_to_the_sender(dns, sinks, relay):
    dest, senders = await sinks(2)
    _mx(dns, "dest.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    h = await relay()
    await send(h, ["permfail@dest.test", "ok@dest.test"], body("p1"), sender="someone@sender.test")
    (delivered,) = await dest.wait_for(1)
    assert delivered.rcpt_tos == ["ok@dest.test"]
    (dsn,) = await senders.wait_for(1)
    await drained(h)
    assert dsn.mail_from == "<>"  # DSNs go out with the null sender
    assert dsn.rcpt_tos == ["someone@sender.test"]
    m = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert m.get_content_type() == "multipart/report"
    assert m.get_param("report-type") == "delivery-status"
    parts = list(m.iter_parts())
    status = parts[1].as_bytes().decode()
    assert "Final-Recipient: rfc822; permfail@dest.test" in status
    assert "Action: failed" in status and "Status: 5." in status
    assert "ok@dest.test" not in status
    assert b"X-Test-Id: p1" in parts[2].as_bytes()
    assert len(records(h, "P")) == 1


async def test_no_dsn_for_the_null_sender(dns, sinks, relay):
    dest, senders = await sinks(2)
    _mx(dns, "dest.test", "127.0.0.2")
    h = await relay()
    await send(h, ["permfail@dest.test"], body("n1"), sender="")
    await drained(h)
    await asyncio.sleep(0.3)
    assert dest.messages == [] and senders.messages == []
    assert len(records(h, "P")) == 1


async def test_expiry_bounces_after_message_expiration(dns, sinks, relay):
    dest, senders = await sinks(2)
    _mx(dns, "slow.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    dest.faults.set("rcpt", reply="450 4.2.0 mailbox busy")
    h = await relay("Domain slow.test { message_expiration = 2 }\n")
    await send(h, ["x@slow.test"], body("x1"), sender="s@sender.test")
    (dsn,) = await senders.wait_for(1, timeout=15)
    await drained(h)
    assert b"Status: 5.4.7" in dsn.data or b"Status: 5.2.0" in dsn.data
    assert b"Delivery time expired" in dsn.data
    assert len(records(h, "T")) >= 1 and len(records(h, "P")) == 1


async def test_max_retries(dns, sinks, relay):
    dest, senders = await sinks(2)
    _mx(dns, "slow.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    dest.faults.set("rcpt", reply="450 4.2.0 mailbox busy")
    h = await relay("Domain slow.test { max_retries = 1 }\n")
    await send(h, ["x@slow.test"], body("m1"), sender="s@sender.test")
    (dsn,) = await senders.wait_for(1, timeout=15)
    await drained(h)
    assert len(records(h, "T")) == 2  # the first attempt and one retry
    assert b"Too many delivery attempts" in dsn.data


async def test_backoff_doubles_up_to_max_retry_interval(dns, sinks, relay):
    (dest,) = await sinks(1)
    _mx(dns, "slow.test", "127.0.0.2")
    dest.faults.set("rcpt", reply="450 4.2.0 busy")
    h = await relay("Domain slow.test { retry_interval = 1 max_retry_interval = 2 }\n")
    await send(h, ["x@slow.test"], body("bo"))
    # Four attempts (about 0, 1, 3 and 5 s): the first gap, one doubled, one capped.
    loop = asyncio.get_running_loop()
    end = loop.time() + 20
    while len(records(h, "T")) < 4:
        assert loop.time() < end, records(h, "T")
        await asyncio.sleep(0.05)
    times = [float(r[0]) for r in records(h, "T")]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) >= 2
    assert 0.8 <= gaps[0] <= 1.6  # retry_interval
    assert all(1.8 <= g <= 2.6 for g in gaps[1:])  # doubled, capped at max_retry_interval
