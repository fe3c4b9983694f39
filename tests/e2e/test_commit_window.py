"""The group commit window through the whole relay: a client alone is not made to wait for it, a
few clients wait only for each other, and the rest keep the window (fastrelay.spool.Spool._window,
Relay.clients_sending)."""

from __future__ import annotations

import asyncio

import aiosmtplib

from tests.e2e.conftest import body, drained

# The longest window the conf allows, so that waiting for it or not is plain at a glance.
CONF = "spool_commit_delay = 1s\n"


async def _session(h, n: int, tid: str) -> float:
    """Send n messages one after another on one session; the seconds that took."""
    loop = asyncio.get_running_loop()
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port, timeout=10)
    await c.connect()
    try:
        t0 = loop.time()
        for i in range(n):
            resp = await c.sendmail("a@example.com", ["b@example.net"], body(f"{tid}-{i}"))
            assert resp[0] == {}, resp  # no recipient refused
        return loop.time() - t0
    finally:
        await c.quit()


async def test_a_client_alone_does_not_wait_for_the_window(dns, sinks, relay):
    """"With one client alone, its message cannot share a commit with its own next one, which it
    sends only after this 250: so its add commits at once." With a 1 s window, 4 messages one
    after another took at least 4 s before."""
    (sink,) = await sinks(1)
    dns.add_mx("example.net", 10, "mx.example.net")
    dns.add_a("mx.example.net", "127.0.0.2")
    h = await relay(CONF)
    stats = h.relay.spool.stats
    before = dict(stats)
    took = await _session(h, 4, "alone")
    assert took < 2.5, f"4 messages took {took:.2f} s: each waited for the 1 s window"
    await sink.wait_for(4)
    await drained(h)
    # Whether a delivery's removal reaches the writer before the client's next message is a
    # race here; tests/test_spool.py's table checks that an add cuts a removal's window.
    assert stats["windows_skipped"] - before["windows_skipped"] >= 1, stats


async def test_a_second_client_connected_keeps_the_window(dns, sinks, relay):
    """"With a few clients, it ends as soon as the batch holds one add per client": while a second
    session is open but sends nothing, a message's 250 waits for the window, which the other's
    message may still share."""
    (sink,) = await sinks(1)
    dns.add_mx("example.net", 10, "mx.example.net")
    dns.add_a("mx.example.net", "127.0.0.2")
    h = await relay(CONF)
    other = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port, timeout=10)
    await other.connect()
    try:
        assert h.relay.clients_sending() == 1
        send = asyncio.ensure_future(_session(h, 1, "together"))
        await asyncio.sleep(0.5)
        assert not send.done(), "acknowledged before the window closed, with another client connected"
        assert h.relay.clients_sending() == 2
        assert await send >= 0.9
    finally:
        await other.quit()
    await sink.wait_for(1)
    await drained(h)
    assert h.relay.clients_sending() == 0


async def _two_sessions(dns, sinks, relay, conf: str) -> tuple[float, float]:
    (sink,) = await sinks(1)
    dns.add_mx("example.net", 10, "mx.example.net")
    dns.add_a("mx.example.net", "127.0.0.2")
    h = await relay(conf)
    took = await asyncio.gather(_session(h, 4, "one"), _session(h, 4, "two"))
    await sink.wait_for(8)
    await drained(h)
    assert h.relay.clients_sending() == 0
    return took


async def test_two_clients_sending_wait_only_for_each_other(dns, sinks, relay):
    """"With a few clients, it ends as soon as the batch holds one add per client: each has at most
    one message waiting for its 250 ... so nothing else can come." Two sessions sending 4 messages
    each at once: with the whole 1 s window each round took at least 1 s, 4 s in all."""
    took = await _two_sessions(dns, sinks, relay, CONF)
    assert max(took) < 2.5, f"4 messages each took {took[0]:.2f} and {took[1]:.2f} s: each waited out the window"


async def test_more_clients_than_few_clients_keep_the_window(dns, sinks, relay):
    """"Above it, the spool writer sleeps through the whole window" (spool_commit_few_clients): with
    it at 1, two sessions sending together wait for the 1 s window at each message."""
    took = await _two_sessions(dns, sinks, relay, CONF + "spool_commit_few_clients = 1\n")
    # 4 rounds of about 1 s each (a delivery's removal may open a round's window a little before
    # the next message comes); ended early, the 4 would take well under 0.5 s.
    assert min(took) >= 2.5, f"4 messages each took {took[0]:.2f} and {took[1]:.2f} s: the window was cut"
