"""Seeds 000/001 with the receiving node run as 2 workers: the HTTP_Listener is shared like the
ESMTP one, and every transfer A makes is delivered by B's workers (issue 13)."""

from __future__ import annotations

import asyncio

from tests.e2e.conftest import body, drained, records, send
from tests.e2e.test_xfer_two_nodes import node_a_conf, node_b_conf
from tests.support import free_port
from tests.support.workersproc import WorkersProcess


async def test_transfers_to_a_node_with_two_workers(sinks, relay, sink_port, tmp_path):
    (sink_b,) = await sinks(1, first=3)
    http = free_port()
    (tmp_path / "b").mkdir()
    b = WorkersProcess(tmp_path / "b", 'Workers = 2\nProhibited_Hosts = ( "0.0.0.0/8" )\n'
                       + node_b_conf(http, sink_port), hold=False)
    await asyncio.to_thread(b.start)
    try:
        assert f"xfer on 127.0.0.1:{http}" in b.text() and "ready (2 workers" in b.text()
        a = await relay(node_a_conf(http, 'domain gmail.com { reroute_domain = "xfer.test" }\n'), subdir="a")
        for i in range(20):  # A's XFER client opens connections as it needs: B's workers share them
            await send(a, [f"u{i}@gmail.com"], body(f"x{i}"))
        await sink_b.wait_for(20, timeout=30)
        await drained(a)
    finally:
        rc = await asyncio.to_thread(b.stop)
    assert rc == 0
    assert sorted(m.rcpt_tos[0] for m in sink_b.messages) == sorted(f"u{i}@gmail.com" for i in range(20))
    assert len(records(a, "X")) == 20
