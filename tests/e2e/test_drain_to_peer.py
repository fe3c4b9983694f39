"""Drain a node's queue into a peer over XFER (issue #14, part 2): everything arrives once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import aiosmtplib

from fastrelay.spool import Spool
from tests.support import ThreadedSink, free_port, read_ledger
from tests.support.relayproc import ROOT, RelayProcess

SECRET = "drain-secret-of-both-nodes"


def _body(i: int) -> bytes:
    return f"X-Test-Id: d{i}\r\nSubject: drained {i}\r\n\r\n".encode() + b"drained body line\r\n" * 20


def _peer_conf(http: int, sink_port: int) -> str:
    return f"""Prohibited_Hosts = ( "0.0.0.0/8" )
retry_interval = 1
scriptlet "scriptlet" {{ script xfer_server {{ source = "msys.xfer.server" }} }}
HTTP_Listener {{ Listen "127.0.0.1:{http}" {{}} }}
xfer_secret = "{SECRET}"
Domain far.test {{ Routes = ( "smtp://127.0.0.3?port={sink_port}" ) }}
"""


def _node_conf(dead: int, extra: str = "") -> str:
    # far.test's own next hop is down, so the mail waits here until it is drained. Short retries:
    # the schedule travels with each message, and the peer keeps it.
    return f"""Prohibited_Hosts = ( "0.0.0.0/8" )
retry_interval = 1
max_retry_interval = 1
host_failure_retry = 1
Connect_Timeout = 1s
scriptlet "scriptlet" {{ script xfer_client {{ source = "msys.xfer.client" }} }}
xfer_secret = "{SECRET}"
Domain far.test {{ Routes = ( "smtp://127.0.0.4?port={dead}" ) }}
{extra}"""


async def _queue(port: int, n: int) -> None:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
    await c.connect()
    for i in range(n):
        errors, _ = await c.sendmail("a@example.com", [f"u{i}@far.test"], _body(i))
        assert errors == {}
    await c.quit()


def _wait(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _drain_cmd(conf, http: int) -> list[str]:
    return [sys.executable, "-m", "fastrelay", "drain", "-c", str(conf), "--to", f"xfer://127.0.0.1?port={http}",
            "--timeout", "60"]


def _left_in_spool(dir) -> int:
    async def count() -> int:
        sp = Spool(str(dir / "spool"))
        await sp.open()
        try:
            return len(sp.recover())
        finally:
            await sp.close()

    return asyncio.run(count())


def test_drain_cut_by_kill_9_and_run_again_delivers_each_once(tmp_path, sink_port):
    """Issue #14: "`fastrelay drain --to PEER` ... moves every queued message to a peer over XFER,
    with its schedule, attempts and binding intact. It uses XFER's idempotency, so a drain
    interrupted by kill -9 and run again delivers each message once." """
    ledger = tmp_path / "ledger.jsonl"
    sink = ThreadedSink("127.0.0.3", sink_port, ledger_path=str(ledger)).start()
    http, dead = free_port(), free_port("127.0.0.4")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    b = RelayProcess(tmp_path / "b", _peer_conf(http, sink_port), hold=False).start()
    a = RelayProcess(tmp_path / "a", _node_conf(dead), hold=False).start()
    n = 120
    try:
        sink.faults.set("dot", delay=0.01)
        asyncio.run(_queue(a.port, n))
        assert a.stop() == 0  # the node is taken down with its queue on disk
        assert _left_in_spool(tmp_path / "a") == n

        def delivered() -> Counter:
            return Counter(r["test_id"] for r in read_ledger(ledger))

        first = subprocess.Popen(_drain_cmd(a.conf, http), cwd=ROOT, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        try:
            assert _wait(lambda: len(delivered()) >= 15, 60), "the drain moved nothing"
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
        assert len(delivered()) < n, "the drain finished before it could be cut short"
        second = subprocess.run(_drain_cmd(a.conf, http), cwd=ROOT, capture_output=True, text=True, timeout=90)
        assert second.returncode == 0, second.stderr
        assert "Traceback" not in second.stderr
        assert _wait(lambda: len(delivered()) >= n, 60), f"missing: {n - len(delivered())}"
        time.sleep(1.0)  # anything sent twice would arrive now
        counts = delivered()
        assert set(counts) == {f"d{i}" for i in range(n)}
        assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]
        assert _left_in_spool(tmp_path / "a") == 0
        assert b.stop() == 0
    finally:
        a.kill()
        b.kill()
        sink.stop()


def test_drain_on_shutdown(tmp_path, sink_port):
    """Drain_On_Shutdown: SIGTERM moves the queue to the peer before the node exits."""
    ledger = tmp_path / "ledger.jsonl"
    sink = ThreadedSink("127.0.0.3", sink_port, ledger_path=str(ledger)).start()
    http, dead = free_port(), free_port("127.0.0.4")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    b = RelayProcess(tmp_path / "b", _peer_conf(http, sink_port), hold=False).start()
    a = RelayProcess(tmp_path / "a", _node_conf(dead, f'Drain_On_Shutdown = "xfer://127.0.0.1?port={http}"\n'),
                     hold=False).start()
    try:
        asyncio.run(_queue(a.port, 30))
        assert a.stop() == 0
        assert any("draining the queue" in line for line in a.log)
        assert _left_in_spool(tmp_path / "a") == 0
        assert _wait(lambda: len(read_ledger(ledger)) >= 30, 30)
        assert sorted(r["test_id"] for r in read_ledger(ledger)) == sorted(f"d{i}" for i in range(30))
        assert b.stop() == 0
    finally:
        a.kill()
        b.kill()
        sink.stop()


def test_drain_refuses_a_non_xfer_peer_and_a_running_node(tmp_path):
    (tmp_path / "a").mkdir()
    a = RelayProcess(tmp_path / "a", _node_conf(free_port()), hold=True).start()
    try:
        bad = subprocess.run([sys.executable, "-m", "fastrelay", "drain", "-c", str(a.conf), "--to",
                              "smtp://127.0.0.1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "expected an XFER peer" in bad.stderr
        busy = subprocess.run(_drain_cmd(a.conf, free_port()), cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert busy.returncode == 1 and "cannot drain" in busy.stderr and "Traceback" not in busy.stderr
    finally:
        a.stop()
