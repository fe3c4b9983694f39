"""A TLS policy failure (TLS = required, next hop without STARTTLS) defers that domain's mail with
the real 4.7.4 reason, in the mainlog and in the DSN, and never marks the shared host down for
other domains."""

from __future__ import annotations

import asyncio

from tests.e2e.conftest import body, drained, records, send


async def _wait(pred, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.05)


async def test_required_tls_failure_is_the_domains_not_the_hosts(dns, sinks, relay):
    """Momentum's TLS: "`required` - Disables the sending of mail unless a successful TLS
    negotiation takes place with the remote mail exchange": the mail waits, the host is fine."""
    mx, senders = await sinks(2)  # 127.0.0.2 serves both domains, without STARTTLS
    for d in ("strict.test", "loose.test"):
        dns.add_mx(d, 10, "mx.shared.test")
    dns.add_a("mx.shared.test", "127.0.0.2")
    dns.add_mx("sender.test", 10, "mx.sender.test")
    dns.add_a("mx.sender.test", "127.0.0.3")
    # host_failure_retry is long: had the host been marked down, loose.test would wait 10 minutes.
    h = await relay("host_failure_retry = 600\n"
                    "Domain strict.test { TLS = required\n  message_expiration = 3 }\n")
    await send(h, ["a@strict.test"], body("strict"), sender="s@sender.test")
    await _wait(lambda: records(h, "T"))
    t = records(h, "T")[0]
    assert t[10] == "451 4.7.4 TLS is required, but STARTTLS was not offered"
    await send(h, ["b@loose.test"], body("loose"))
    (msg,) = await mx.wait_for(1)
    assert msg.rcpt_tos == ["b@loose.test"]
    # strict.test expires (message_expiration = 3): the DSN carries the real reason.
    (dsn,) = await senders.wait_for(1, timeout=20)
    await drained(h, 20)
    (p,) = [r for r in records(h, "P") if r[3] == "a@strict.test"]
    assert "4.7.4 TLS is required" in p[10] or "4.7.4 TLS is required" in dsn.data.decode()
    assert b"4.7.4 TLS is required, but STARTTLS was not offered" in dsn.data
    assert b"all hosts" not in dsn.data.lower()
