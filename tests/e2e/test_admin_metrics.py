"""Issue 12, item 4: /metrics in Prometheus format, with bounded domain labels, on a real relay."""

from __future__ import annotations

import aiohttp
import aiosmtplib
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import body, drained, send
from tests.e2e.test_admin_api import ADMIN, admin_url, call, wait_state


async def scrape(h) -> dict[str, list]:
    async with aiohttp.ClientSession() as s, s.get(admin_url(h) + "/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out.setdefault(smp.name, []).append((smp.labels, smp.value))
    return out


def value(m: dict, name: str, **labels) -> float:
    return sum(v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


async def test_counters_with_bounded_domain_labels(dns, sinks, relay):
    """"counters of received, delivered, deferred, bounced and transferred messages (by binding and by
    a bounded set of domain labels: top N plus "other", so label cardinality cannot explode)"."""
    (sink,) = await sinks(1)
    h = await relay("Gateway = 127.0.0.2\nAdmin_Domain_Labels = 2\n" + ADMIN)
    plan = {"a.test": 3, "b.test": 2, "c.test": 1, "d.test": 1}
    for dom, n in plan.items():
        for i in range(n):
            await send(h, [f"u{i}@{dom}"], body(f"{dom}{i}"))
    await sink.wait_for(7)
    await drained(h)
    m = await scrape(h)
    delivered = {lab["domain"]: v for lab, v in m["fastrelay_messages_total"] if lab["event"] == "delivered"}
    assert delivered == {"a.test": 3, "b.test": 2, "other": 2}
    assert value(m, "fastrelay_messages_total", event="received") == 7
    assert {lab["binding"] for lab, _ in m["fastrelay_messages_total"]} == {"default"}
    # Once labelled, a domain keeps its label: more mail elsewhere still counts as other.
    for i in range(5):
        await send(h, [f"v{i}@e.test"], body(f"e{i}"))
    await sink.wait_for(12)
    await drained(h)
    m = await scrape(h)
    delivered = {lab["domain"]: v for lab, v in m["fastrelay_messages_total"] if lab["event"] == "delivered"}
    assert delivered == {"a.test": 3, "b.test": 2, "other": 7}
    assert value(m, "fastrelay_delivery_latency_seconds_count") == 12
    assert value(m, "fastrelay_spool_commit_seconds_count") >= 12


async def test_deferred_bounced_queue_states_and_connections(dns, sinks, relay):
    """"queue sizes by state; inbound and outbound connections; spool commit latency and delivery
    latency histograms; DNS errors"."""
    (sink,) = await sinks(1)
    h = await relay('Domain gw.test { Gateway = 127.0.0.2 }\nretry_interval = 1h\n' + ADMIN)
    sink.faults.set("rcpt", reply="451 4.3.0 later", times=1)
    await send(h, ["t@gw.test"], body("t"))
    await send(h, ["p@nxdomain.test"], body("p"), sender="")  # no DNS records: bounced, no DSN (null sender)
    await wait_state(h, {"deferred": 1})
    await call(h, "POST", "/api/v1/suspensions", json={"domain": "gw.test"})
    await send(h, ["r@gw.test"], body("r"))
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port, timeout=10)
    await c.connect()
    try:
        m = await scrape(h)
    finally:
        await c.quit()
    assert value(m, "fastrelay_queue_messages", state="deferred") == 1
    assert value(m, "fastrelay_queue_messages", state="ready") == 1
    assert value(m, "fastrelay_connections", direction="inbound") == 1
    assert value(m, "fastrelay_connections_opened_total", direction="inbound") == 4
    assert value(m, "fastrelay_messages_total", event="deferred", domain="gw.test") == 1
    assert value(m, "fastrelay_messages_total", event="bounced", domain="nxdomain.test") == 1
    assert value(m, "fastrelay_dns_errors_total", kind="notfound") >= 1
    assert value(m, "fastrelay_spool_bytes") > 0 and value(m, "fastrelay_spool_free_bytes") > 0
    await call(h, "DELETE", "/api/v1/suspensions?domain=gw.test")
    await call(h, "POST", "/api/v1/flush")
    await drained(h)
