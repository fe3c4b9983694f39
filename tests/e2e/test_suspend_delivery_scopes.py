"""suspend_delivery in Momentum's scopes: a Domain, a Binding, a Binding_Group, binding::domain."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.conftest import body, drained, send

ROUTES = """
Domain ok.test {{ Routes = ( "smtp://127.0.0.2?port={port}" ) }}
Domain held.test {{ Routes = ( "smtp://127.0.0.2?port={port}" ) }}
"""


@pytest.mark.parametrize(
    ("conf", "held"),
    [
        ("Domain held.test { suspend_delivery = true }\n", {"held.test"}),
        ("Binding default { Domain held.test { suspend_delivery = true } }\n", {"held.test"}),
        ("Binding default { suspend_delivery = true }\n", {"held.test", "ok.test"}),
        ("Binding_Group g { suspend_delivery = yes\n Binding default { } }\n", {"held.test", "ok.test"}),
        # The innermost scope wins, as for every outbound option.
        ("suspend_delivery = true\nDomain ok.test { suspend_delivery = false }\n", {"held.test"}),
        ("Binding default { suspend_delivery = true\n Domain ok.test { suspend_delivery = false } }\n",
         {"held.test"}),
    ],
    ids=["domain", "binding::domain", "binding", "binding_group", "global-but-domain", "binding-but-domain"],
)
async def test_suspend_delivery_holds_only_its_scope(sinks, relay, sink_port, conf, held):
    """Issue 15: "Scopes Momentum documents and fastrelay refuses: ... `suspend_delivery` in Binding
    and Binding_Group". Held mail stays queued and goes out after a restart without the switch."""
    (sink,) = await sinks(1)
    routes = ROUTES.format(port=sink_port)
    h = await relay(routes + conf, subdir="r")
    await send(h, ["a@held.test"], body("held"))
    await send(h, ["a@ok.test"], body("ok"))
    want = {"ok.test", "held.test"} - held
    for _ in range(200):
        if {m.rcpt_tos[0].split("@")[1] for m in sink.messages} >= want:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # time for a suspended destination to (wrongly) deliver
    got = {m.rcpt_tos[0].split("@")[1] for m in sink.messages}
    assert got == want
    assert len(h.relay.queue.items) == len(held)
    await h.stop()
    h2 = await relay(routes, subdir="r")  # the same spool, the switch off
    await drained(h2)
    assert sorted(m.rcpt_tos[0].split("@")[1] for m in sink.messages) == ["held.test", "ok.test"]
