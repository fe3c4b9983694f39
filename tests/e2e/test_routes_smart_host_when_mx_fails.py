"""Seed 004 end to end: `Routes = ( "smtp://127.0.0.3?pref=1" "__mx__" )` delivers to the smart
host whatever DNS says about the domain's MX (NXDOMAIN, SERVFAIL)."""

from __future__ import annotations

from tests.e2e.conftest import body, drained, records, send


async def test_smart_host_delivers_when_the_mx_entry_cannot_resolve(dns, sinks, relay):
    """Seed 004: `Routes = ( "smtp://my.local.smart.host?pref=1" "__mx__" )` and "the first item is
    used exclusively unless it's unavailable": an unresolvable __mx__ never fails the smart host."""
    (_, smart) = await sinks(2)
    dns.nxdomain("gone.test")
    dns.servfail("flaky.test")
    h = await relay('Domain gone.test { Routes = ( "smtp://127.0.0.3?pref=1" "__mx__" ) }\n'
                    'Domain flaky.test { Routes = ( "smtp://127.0.0.3?pref=1" "__mx__" ) }\n')
    await send(h, ["u@gone.test"], body("nx"))
    await send(h, ["v@flaky.test"], body("sf"))
    await smart.wait_for(2)
    await drained(h)
    assert records(h, "P") == [] and records(h, "T") == []
    assert sorted(r for m in smart.messages for r in m.rcpt_tos) == ["u@gone.test", "v@flaky.test"]
