"""SIGKILL either XFER node mid-transfer: every message A acknowledged reaches B's sink, whole."""

from __future__ import annotations

import asyncio
import base64
import time

import aiosmtplib

from tests.e2e.test_xfer_two_nodes import node_a_conf, node_b_conf
from tests.support import ThreadedSink, free_port, read_ledger
from tests.support.relayproc import RelayProcess

LOOPBACK_OK = 'Prohibited_Hosts = ( "0.0.0.0/8" )\nretry_interval = 1\n'


def _body(i: int) -> bytes:
    return f"X-Test-Id: k{i}\r\nSubject: xfer crash {i}\r\n\r\n".encode() + (b"xfer body line %d\r\n" % i) * 40


async def _wait(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_sigkill_of_either_node_mid_transfer_loses_nothing(tmp_path, sink_port):
    ledger = tmp_path / "ledger.jsonl"
    sink = ThreadedSink("127.0.0.3", sink_port, ledger_path=str(ledger), ledger_data=True).start()
    http = free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    conf_b = LOOPBACK_OK + node_b_conf(http, sink_port)
    conf_a = LOOPBACK_OK + node_a_conf(http, 'domain gmail.com { reroute_domain = "xfer.test" }\n')
    b = RelayProcess(tmp_path / "b", conf_b, hold=False).start()
    a = RelayProcess(tmp_path / "a", conf_a, hold=False).start()
    try:
        sink.faults.set("dot", delay=0.01)
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=a.port)
        await c.connect()
        n = 150
        for i in range(n):
            errors, _ = await c.sendmail("a@example.com", [f"u{i}@gmail.com"], _body(i))
            assert errors == {}
        await c.quit()

        def got() -> set[str]:
            return {r["test_id"] for r in read_ledger(ledger)}

        assert await _wait(lambda: len(got()) >= 20, 30)
        a.kill()  # the sender, mid-transfer
        a = RelayProcess(tmp_path / "a", conf_a, hold=False).start()
        assert await _wait(lambda: len(got()) >= 60, 30)
        b.kill()  # the receiver, mid-transfer
        b = RelayProcess(tmp_path / "b", conf_b, hold=False).start()
        assert await _wait(lambda: len(got()) >= n, 60), f"missing: {n - len(got())}"
        rows = read_ledger(ledger)
        for r in rows:
            i = int(r["test_id"][1:])
            assert base64.b64decode(r["data_b64"]).endswith(_body(i)), f"{r['test_id']} damaged"
        dups = len(rows) - len({r["test_id"] for r in rows})
        print(f"150 acknowledged, all delivered whole; duplicates {dups}")
        assert a.stop() == 0 and b.stop() == 0
    finally:
        a.kill()
        b.kill()
        sink.stop()
