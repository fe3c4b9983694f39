"""teleport_enabled, seed 000's meaning: after a temporary XFER failure the message stays loaded
(body and envelope in memory, bounded by teleport_memory_limit) for its quick retry."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import body, drained, send, until_records
from tests.e2e.test_xfer_two_nodes import SECRET, node_a_conf, node_b_conf
from tests.support import free_port

REROUTE = 'domain gmail.com { reroute_domain = "xfer.test" }\n'


@pytest.mark.parametrize("teleport, failure", [
    (1, "peer down"), (1, "peer refuses (401)"), (0, "peer down"),
])
async def test_a_temporary_xfer_failure_keeps_the_message_loaded(sinks, relay, sink_port, teleport, failure):
    """Seed 000: "don't swap out xfer message context if there is a temporary xfer failure:
    teleport_enabled = 1". The quick retries read nothing back from the spool."""
    (sink_b,) = await sinks(1, first=3)
    http = free_port()
    b = None
    if failure == "peer refuses (401)":
        b = await relay(node_b_conf(http, sink_port).replace(SECRET, "another-secret"), subdir="b-wrong")
    a = await relay(node_a_conf(http, REROUTE).replace("teleport_enabled = 1", f"teleport_enabled = {teleport}"),
                    subdir="a")
    data = body("tp1", (b"x" * 70 + b"\r\n") * 70 + b"\r\n")
    await send(a, ["held@gmail.com"], data)
    await until_records(a, "T", 3)  # the first attempt and two quick retries failed
    q = a.relay.queue
    if teleport:
        assert a.relay.spool.stats["loads"] == 0  # every retry used the loaded copy
        assert q.counts()["held"] == 1
    else:
        assert a.relay.spool.stats["loads"] >= 2  # each retry read the message back from disk
        assert q.counts()["held"] == 0
    if b is not None:
        await b.stop()
    await relay(node_b_conf(http, sink_port), subdir="b")
    (msg,) = await sink_b.wait_for(1, timeout=15)
    await drained(a)
    assert msg.data.endswith(data)  # the copy kept in memory is the message, byte for byte
    assert q.counts()["held"] == 0 and q.counts()["held_bytes"] == 0


async def test_memory_kept_loaded_is_bounded(relay):
    """teleport_memory_limit bounds the bodies kept loaded; the oldest go back to disk only."""
    http = free_port()
    a = await relay(node_a_conf(http, REROUTE + "teleport_memory_limit = 16k\n"), subdir="a")
    for i in range(8):
        await send(a, [f"m{i}@gmail.com"], body(f"b{i}", (b"y" * 70 + b"\r\n") * 70 + b"\r\n"))
    await until_records(a, "T", 24)
    c = a.relay.queue.counts()
    assert 0 < c["held_bytes"] <= 16 * 1024 and c["held"] < 8
    assert a.relay.spool.stats["loads"] > 0  # those not held were read back for their retry
