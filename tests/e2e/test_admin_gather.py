"""Issue 12, item 7: "Shape the API so that a front can gather answers from several workers (each
worker's queue behind the same interface)". Two real relays (two spools, two queues) behind one
admin front serving GatherQueueAPI over each one's LocalQueueAPI."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from fastrelay.admin.api import AdminApp
from fastrelay.admin.queueapi import GatherQueueAPI, LocalQueueAPI
from tests.e2e.conftest import body, drained, send


async def test_a_front_over_two_workers_queues(sinks, relay):
    (sink,) = await sinks(1)
    w0 = await relay("Gateway = 127.0.0.2\n", subdir="w0")
    w1 = await relay("Gateway = 127.0.0.2\n", subdir="w1")
    front = GatherQueueAPI([LocalQueueAPI(w0.relay.queue), LocalQueueAPI(w1.relay.queue)])
    app = AdminApp(w0.relay, None, queue=front)
    runner = web.AppRunner(app.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as s:
            async def call(method, path, **kw):
                async with s.request(method, base + path, **kw) as r:
                    return r.status, await r.json()

            assert (await call("POST", "/api/v1/suspensions", json={"domain": "g.test"}))[0] == 200
            await send(w0, ["a@g.test"], body("g0"))
            for i in range(2):
                await send(w1, [f"b{i}@g.test"], body(f"g1{i}"))
            st, summ = await call("GET", "/api/v1/queue/summary")
            assert summ["total"] == 3 and summ["by_state"]["ready"] == 3
            (row,) = summ["destinations"]
            assert (row["domain"], row["total"]) == ("g.test", 3)
            st, page = await call("GET", "/api/v1/messages")
            ids = sorted(m["id"] for m in page["messages"])
            assert page["total"] == 3 and [i.split(".")[0] for i in ids] == ["0", "1", "1"]
            w1_id = ids[1]
            st, r = await call("POST", f"/api/v1/messages/{w1_id}/hold")
            assert (st, r["id"], r["state"]) == (200, w1_id, "held")
            assert w1.relay.queue.api_state(w1.relay.queue.items[int(w1_id.split(".")[1])], 0) == "held"
            assert (await call("GET", "/api/v1/messages/7.1"))[0] == 404
            assert (await call("DELETE", "/api/v1/suspensions?domain=g.test"))[0] == 200
            await sink.wait_for(2)
            for _ in range(200):  # the sink has them; the relays finish with them a moment later
                st, summ = await call("GET", "/api/v1/queue/summary")
                if summ["total"] == 1:
                    break
                await asyncio.sleep(0.05)
            assert (summ["total"], summ["by_state"]["held"]) == (1, 1)
            assert (await call("POST", f"/api/v1/messages/{w1_id}/release"))[0] == 200
            await sink.wait_for(3)
            await drained(w0)
            await drained(w1)
    finally:
        await runner.cleanup()
        from fastrelay.admin.metrics import release

        release(w0.relay)
