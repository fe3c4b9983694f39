"""An MX whose address lookup gets SERVFAIL is skipped and the next MX takes the mail, instead of
the whole domain being deferred (docs/reliability.md case 46 applies per MX host)."""

from __future__ import annotations

from tests.e2e.conftest import body, drained, records, send


async def test_servfail_on_the_first_mx_address_goes_to_the_second_mx(dns, sinks, relay):
    """Seed 004: "the first item is used exclusively unless it's unavailable, in which case the
    second item is used and so on"; an MX that cannot be resolved now is unavailable."""
    (_, backup) = await sinks(2)
    dns.add_mx("dest.test", 10, "primary.dest.test")
    dns.add_mx("dest.test", 20, "backup.dest.test")
    dns.servfail("primary.dest.test")
    dns.add_a("backup.dest.test", "127.0.0.3")
    h = await relay()
    await send(h, ["u@dest.test"], body("sf-mx"))
    (msg,) = await backup.wait_for(1)
    await drained(h)
    assert msg.rcpt_tos == ["u@dest.test"]
    assert records(h, "T") == []
