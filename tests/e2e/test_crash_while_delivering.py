"""SIGKILL the relay while it delivers, restart it: every accepted message reaches the sink at
least once, with the same body (docs/reliability.md P2, at-least-once after the 250)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time

import aiosmtplib

from tests.support import DNSServer, ThreadedSink, read_ledger
from tests.support.relayproc import RelayProcess


def _body(i: int) -> bytes:
    return f"X-Test-Id: c{i}\r\nSubject: crash {i}\r\n\r\n".encode() + (b"line of the body %d\r\n" % i) * 30


async def test_sigkill_mid_delivery_loses_nothing(tmp_path, sink_port):
    ledger = tmp_path / "ledger.jsonl"
    dns = DNSServer("127.0.0.1", 0)
    sink = ThreadedSink("127.0.0.2", sink_port, ledger_path=str(ledger), ledger_data=True).start()
    try:
        dns.add_mx("crash.test", 10, "mx.crash.test")
        dns.add_a("mx.crash.test", "127.0.0.2")
        sink.faults.set("dot", delay=0.01)  # deliveries in flight at the kill
        conf = (
            f'DNS_Servers = ( "{dns.address}" )\nProhibited_Hosts = ( "0.0.0.0/8" )\n'
            f"Remote_SMTP_Port = {sink_port}\nretry_interval = 1\nhost_failure_retry = 1\n"
        )
        acked: dict[str, str] = {}
        relay = RelayProcess(tmp_path, conf, hold=False).start()
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port)
        await c.connect()
        for i in range(300):
            data = _body(i)
            errors, _ = await c.sendmail("a@example.com", [f"r{i}@crash.test"], data)
            assert errors == {}
            acked[f"c{i}"] = hashlib.sha256(data).hexdigest()
        await c.quit()
        # Some have gone out, some not: kill it mid-delivery.
        deadline = time.monotonic() + 10
        while len(sink.snapshot()) < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        relay.kill()
        delivered_before = len(sink.snapshot())
        assert 0 < delivered_before < 300, "the kill did not land mid-delivery"
        relay = RelayProcess(tmp_path, conf, hold=False).start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = {r["test_id"] for r in read_ledger(ledger)}
            if set(acked) <= got:
                break
            await asyncio.sleep(0.1)
        assert relay.stop() == 0
        entries = read_ledger(ledger)
        seen: dict[str, int] = {}
        for r in entries:
            tid = r["test_id"]
            seen[tid] = seen.get(tid, 0) + 1
            # Whole: the sink's body ends with exactly what we sent (after our Received: header).
            data = base64.b64decode(r["data_b64"])
            assert data.endswith(_body(int(tid[1:]))), f"{tid} arrived damaged"
        missing = set(acked) - set(seen)
        assert not missing, f"lost after the 250: {sorted(missing)[:10]}"
        dups = sum(n - 1 for n in seen.values())
        print(f"delivered before the kill {delivered_before}, duplicates {dups}")
    finally:
        sink.stop()
        dns.stop()
