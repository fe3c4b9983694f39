"""Seeds 000/001 with the receiving node run as 2 workers: the HTTP_Listener is shared like the
ESMTP one, and every transfer A makes is delivered by B's workers (issue 13); a transfer sent again
reaches either worker and is still stored once for the whole relay (case 36, fastrelay.xfer.claims)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastrelay.message import Envelope, Recipient
from fastrelay.xfer import wire
from tests.e2e.conftest import body, drained, records, send
from tests.e2e.test_xfer_two_nodes import SECRET, node_a_conf, node_b_conf
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


# --- one transfer sent again and again: stored once for the whole relay (case 36) ------------------

RESENDS = 20
URI = "/delay_message"


def claims_metrics(admin_port: int) -> dict[str, float]:
    """fastrelay_xfer_claims from the relay's /metrics (worker 0 adds up both workers')."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {s.labels["event"]: s.value for fam in text_string_to_metric_families(text)
            if fam.name == "fastrelay_xfer_claims" for s in fam.samples if s.name.endswith("_total")}


def one_transfer(key: tuple[str, str], rcpt: str = "dedup@gmail.com") -> tuple[bytes, int]:
    """A transfer as node A's XFER client would make it (fastrelay.xfer.wire), from a node that
    is not B (the loop check)."""
    env = Envelope("s@src.test", [Recipient(rcpt)], "gmail.com", client_ip="192.0.2.1", helo="a.test",
                   msgid=f"{key[1]}.{key[0]}", received_at=time.time() - 5)
    return wire.encode_request(env, [0], body("dedup"), key)


async def post_once(http: aiohttp.ClientSession, port: int, payload: bytes, n: int) -> tuple[int, dict]:
    """POST it, signed afresh (a new nonce: a resend, not a replay), on a new connection."""
    digest = wire.content_sha256(payload)
    headers = {"Content-Type": wire.CONTENT_TYPE, wire.H_VERSION: "1", wire.H_ENVELOPE_LENGTH: str(n),
               wire.H_CONTENT_SHA256: digest, "Authorization": wire.authorization(SECRET, "POST", URI, digest)}
    async with http.post(f"http://127.0.0.1:{port}{URI}", data=payload, headers=headers) as r:
        return r.status, json.loads(await r.read())


def new_connections() -> aiohttp.ClientSession:
    # force_close: every request on a new TCP connection, which the kernel gives to either worker.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


def _mainlog(d: Path, kind: str) -> list[list[str]]:
    p = d / "mainlog"
    return [f for f in (line.split("\t") for line in p.read_text().splitlines()) if f[1] == kind] if p.exists() else []


async def _delivered_once(sink, d: Path, msgid: str, received: bool = True) -> None:
    """The sink got it, its D record is written, and no second copy follows. `received`: its R
    record was written too (a worker killed right after the commit loses its buffered lines)."""
    await sink.wait_for(1, timeout=30)
    deadline = time.monotonic() + 15
    while not any(f[2] == msgid for f in _mainlog(d, "D")):
        assert time.monotonic() < deadline, "no D record"
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # a duplicate would be queued already (each 200 follows a commit): give it time
    assert len(sink.messages) == 1, [m.rcpt_tos for m in sink.messages]
    assert [f[2] for f in _mainlog(d, "R")] == ([msgid] if received else [])  # stored once, over both shards
    assert [f[2] for f in _mainlog(d, "D")] == [msgid]


def _start_b(tmp_path: Path, sink_port: int, env: dict | None = None,
             admin_port: int | None = None) -> tuple[WorkersProcess, int]:
    http = free_port()
    d = tmp_path / "b"
    d.mkdir()
    admin = f'Admin_Listener {{ Listen "127.0.0.1:{admin_port}" {{ }} }}\n' if admin_port else ""
    b = WorkersProcess(d, 'Workers = 2\nProhibited_Hosts = ( "0.0.0.0/8" )\n' + admin + node_b_conf(http, sink_port),
                       env=env, hold=False)
    b.start()
    b.wait_log(r"ready \(2 workers")
    return b, http


async def test_resends_over_both_workers_are_stored_once(sinks, sink_port, tmp_path):
    """A transfer sent RESENDS times on new connections (a sender whose 200s keep getting lost):
    the SO_REUSEPORT listener spreads them over both workers, and every answer is 200 with the same
    id, duplicate from the second on; the sink gets the message once."""
    (sink_b,) = await sinks(1, first=3)
    admin_port = free_port()
    b, http = await asyncio.to_thread(_start_b, tmp_path, sink_port, None, admin_port)
    key = ("node-e2e-a", "4242")
    payload, n = one_transfer(key)
    try:
        answers = []
        async with new_connections() as session:
            for _ in range(RESENDS):
                answers.append(await post_once(session, http, payload, n))
        assert all(status == 200 for status, _ in answers), answers
        msgid = answers[0][1]["id"]
        assert [doc["duplicate"] for _, doc in answers] == [False] + [True] * (RESENDS - 1), answers
        assert {doc["id"] for _, doc in answers} == {msgid}
        # Both workers answered (each its own shard, whose node id the answer carries; and the log
        # says which worker took each), so this cannot pass by all landing on one worker.
        assert len({doc["node"] for _, doc in answers}) == 2, answers
        lines = b.wait_log(rf"fastrelay\[w(\d)\] INFO fastrelay\.xfer: XFER: (?:accepted|duplicate) transfer "
                           rf"{key[0]}/{key[1]} ", count=RESENDS)
        assert {m.group(1) for m in lines} == {"0", "1"}
        # /metrics for the whole relay: one claim, the resends found done in the claim table.
        m = await asyncio.to_thread(claims_metrics, admin_port)
        assert (m["claimed"], m["duplicates"], m["in_progress"]) == (1, RESENDS - 1, 0), m
        await _delivered_once(sink_b, tmp_path / "b", msgid)
    finally:
        rc = await asyncio.to_thread(b.stop)
    assert rc == 0


async def test_concurrent_resends_over_both_workers_are_stored_once(sinks, sink_port, tmp_path):
    """The same, all at once: a worker asked while the other stores it answers 503 in_progress (a
    retry-later); the sender's next try gets the duplicate answer. Never two copies."""
    (sink_b,) = await sinks(1, first=3)
    admin_port = free_port()
    b, http = await asyncio.to_thread(_start_b, tmp_path, sink_port, None, admin_port)
    key = ("node-e2e-a", "4343")
    payload, n = one_transfer(key)
    try:
        answers: list[tuple[int, dict]] = []
        async with new_connections() as session:

            async def sender() -> None:
                for _ in range(50):
                    status, doc = await post_once(session, http, payload, n)
                    answers.append((status, doc))
                    if status == 200:
                        return
                    assert status == 503 and doc["error"] == "in_progress", (status, doc)
                    await asyncio.sleep(0.05)
                raise AssertionError("no 200 after 50 tries")

            await asyncio.gather(*(sender() for _ in range(RESENDS)))
        ok = [doc for status, doc in answers if status == 200]
        assert len(ok) == RESENDS and len({doc["id"] for doc in ok}) == 1
        assert sum(1 for doc in ok if not doc["duplicate"]) == 1
        assert len({doc["node"] for doc in ok}) == 2, answers  # both workers answered
        # Every 503 was counted, on whichever worker gave it; one claim in all.
        m = await asyncio.to_thread(claims_metrics, admin_port)
        refused = sum(1 for status, _ in answers if status == 503)
        assert (m["claimed"], m["in_progress"]) == (1, refused), (m, refused)
        await _delivered_once(sink_b, tmp_path / "b", ok[0]["id"])
    finally:
        rc = await asyncio.to_thread(b.stop)
    assert rc == 0


async def test_worker_killed_after_its_commit_before_its_claim_is_done(sinks, sink_port, tmp_path):
    """kill -9 of the worker at the exact point (FASTRELAY_CRASHPOINT=xfer_before_done): its shard
    has the transfer, its claim is still pending. The other worker answers 503 in_progress meanwhile;
    the successor settles the claim from its shard at start; every resend is then a duplicate of the
    stored copy, which is delivered once."""
    (sink_b,) = await sinks(1, first=3)
    b, http = await asyncio.to_thread(_start_b, tmp_path, sink_port, {"FASTRELAY_CRASHPOINT": "xfer_before_done"})
    key = ("node-e2e-a", "4444")
    payload, n = one_transfer(key)
    try:
        async with new_connections() as session:
            with pytest.raises(aiohttp.ClientError):  # the worker died before it could answer
                await post_once(session, http, payload, n)
            m = (await asyncio.to_thread(b.wait_log, r"worker (\d) \(pid \d+\) exited with status 137"))[0]
            dead = m.group(1)
            answers = []
            deadline = time.monotonic() + 30
            while sum(1 for s, _ in answers if s == 200) < RESENDS:
                assert time.monotonic() < deadline, answers
                try:
                    status, doc = await post_once(session, http, payload, n)
                except aiohttp.ClientError:
                    continue
                answers.append((status, doc))
                if status != 200:
                    assert status == 503 and doc["error"] == "in_progress", (status, doc)
                    await asyncio.sleep(0.1)
        ok = [doc for status, doc in answers if status == 200]
        assert all(doc["duplicate"] for doc in ok) and len({doc["id"] for doc in ok}) == 1, answers
        assert len({doc["node"] for doc in ok}) == 2, answers
        assert re.search(rf"XFER claims left pending by a previous worker {dead}: 1 were stored", b.text())
        await _delivered_once(sink_b, tmp_path / "b", ok[0]["id"], received=False)
    finally:
        rc = await asyncio.to_thread(b.stop)
    assert rc == 0
