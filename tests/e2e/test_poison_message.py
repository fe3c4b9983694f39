"""docs/reliability.md case 50: a message whose delivery always throws is bounced 5.3.0 after a few
tries, and never blocks the queue or kills the worker."""

from __future__ import annotations

from fastrelay.message import Envelope, Recipient
from fastrelay.spool import Spool
from tests.e2e.conftest import body, drained, records, send


async def test_poison_message_is_bounced_and_the_queue_keeps_going(tmp_path, dns, sinks, relay):
    (sink,) = await sinks(1)
    dns.add_mx("p.test", 10, "mx.p.test")
    dns.add_a("mx.p.test", "127.0.0.2")
    # A spool entry the intake would never write (an address that is not a string, as a bug or an
    # old version might leave), put there through the spool's own API before the relay starts.
    (tmp_path / "relay").mkdir()
    sp = Spool(str(tmp_path / "relay" / "spool"))
    await sp.open()
    sp.recover()
    await sp.add([(Envelope("", [Recipient(12345)], "p.test"), b"Subject: poison\r\n\r\nx\r\n")])  # type: ignore[arg-type]
    await sp.close()
    h = await relay()
    await send(h, ["good@p.test"], body("after-poison"))
    (msg,) = await sink.wait_for(1)  # the good message is not held up behind the poison
    assert msg.rcpt_tos == ["good@p.test"]
    await drained(h, 20)
    (p,) = records(h, "P")
    assert p[10].startswith("554 5.3.0")
    assert h.relay.queue.items == {}
