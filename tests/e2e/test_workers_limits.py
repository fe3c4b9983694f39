"""Connection limits that hold across workers (issue 13): 2 workers, a per-MX limit of 2, the
sink never sees more than 2 sessions; a worker killed with -9 while it holds slots gives them
back, so the limit is fully usable again; the per-IP inbound limit is the relay's."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import time

import pytest

from tests.support import ThreadedSink
from tests.support.workersproc import WorkersProcess


def _conf(port: int, limit: str) -> str:
    return (
        f'Workers = 2\nProhibited_Hosts = ( "0.0.0.0/8" )\nGateway = "127.0.0.2:{port}"\nretry_interval = 1\n'
        "max_retry_interval = 1\nhost_failure_retry = 1\nConnect_Timeout = 2s\n" + limit
    )


LIMITS = {
    # Seed 004 / Momentum: max_outbound_connections in a Host stanza limits that MX ...
    "host": 'max_outbound_connections = 0\nHost "127.0.0.2" { max_outbound_connections = 2 }\n',
    # ... and in the global (or a Domain) scope the destination's set of MX hosts.
    "site": "max_outbound_connections = 2\n",
}


def _send(port: int, n: int, tag: str) -> list[str]:
    ids = []
    for i in range(n):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            tid = f"{tag}{i}"
            c.sendmail("a@example.com", ["u@limits.test"], f"X-Test-Id: {tid}\r\nSubject: {tid}\r\n\r\nhi\r\n")
            ids.append(tid)
    return ids


def _delivered(sink) -> set[str]:
    return {m.test_id for m in sink.snapshot()}


def _wait_delivered(sink, ids, timeout=90.0) -> None:
    deadline = time.monotonic() + timeout
    while not set(ids) <= _delivered(sink):
        assert time.monotonic() < deadline, f"not delivered: {sorted(set(ids) - _delivered(sink))[:10]}"
        time.sleep(0.05)


@pytest.mark.parametrize("kind", sorted(LIMITS))
def test_per_mx_limit_of_two_holds_over_two_workers(tmp_path, sink_port, kind):
    """Issue 13: "2 workers, a per-MX limit of 2, and the sinks' peak concurrency never above 2"."""
    sink = ThreadedSink("127.0.0.2", sink_port).start()
    sink.faults.set("dot", delay=0.05)  # sessions last, so both workers want more than 2
    relay = WorkersProcess(tmp_path, _conf(sink_port, LIMITS[kind]), hold=False).start()
    try:
        ids = _send(relay.port, 80, "m")
        _wait_delivered(sink, ids)
        peak = sink.peak_sessions
    finally:
        rc = relay.stop()
        sink.stop()
    assert rc == 0
    assert peak == 2, f"peak concurrency at the MX was {peak}"


def test_kill_9_while_holding_slots_then_the_limit_is_fully_usable(tmp_path, sink_port):
    """Issue 13: "a kill -9 of a worker while it holds slots, after which the limit is fully
    usable again". The supervisor sweeps the dead worker's counts before its successor starts;
    a leak would leave fewer than 2 usable (or none)."""
    sink = ThreadedSink("127.0.0.2", sink_port).start()
    sink.faults.set("dot", delay=0.3)
    relay = WorkersProcess(tmp_path, _conf(sink_port, LIMITS["host"]), hold=False).start()
    try:
        ids = _send(relay.port, 60, "k")
        # Kill workers while the MX is at its limit until one that held slots was hit (the log
        # says how many counts it held: a site and a host count per connection, one more if it
        # was waiting for a slot).
        released = 0
        for attempt in range(6):
            deadline = time.monotonic() + 30
            while sink.current_sessions < 2:
                assert time.monotonic() < deadline, "the MX never reached its limit"
                time.sleep(0.01)
            w = attempt % 2
            victim = relay.worker_pids()[w]
            os.kill(victim, signal.SIGKILL)
            m = relay.wait_log(rf"worker {w} \(pid {victim}\) killed by signal 9; the (\d+) shared connection counts")
            relay.wait_log(rf"worker {w} of 2 started \(pid (?!{victim}\b)\d+")
            released = int(m[-1].group(1))
            if released >= 2:
                break
        assert released >= 2
        sink.call(lambda s: setattr(s, "peak_sessions", s.current_sessions))  # the peak from now on
        _wait_delivered(sink, ids)
        peak = sink.peak_sessions
    finally:
        rc = relay.stop()
        sink.stop()
    assert rc == 0
    assert peak == 2, f"after the kill the MX got at most {peak} sessions at once"


def test_per_ip_inbound_limit_is_the_relays(tmp_path):
    """Issue 13: "per-IP inbound limits hold for the whole relay, not per worker":
    max_connections_per_ip = 3 with 2 workers admits 3 connections from 127.0.0.1, not 6."""
    relay = WorkersProcess(tmp_path, "Workers = 2\nmax_connections_per_ip = 3\n").start()
    held = []
    try:
        codes = []
        for _ in range(10):
            c = smtplib.SMTP(timeout=20)
            code, _msg = c.connect("127.0.0.1", relay.port)
            codes.append(code)
            held.append(c)
        assert codes.count(220) == 3, codes
        assert codes.count(421) == 7
        for c in held:
            try:
                c.close()
            except OSError:
                pass
        held.clear()
        # Given back when they close: 3 again, whichever worker takes them.
        deadline = time.monotonic() + 10
        while True:
            got = []
            for _ in range(3):
                c = smtplib.SMTP(timeout=20)
                got.append(c.connect("127.0.0.1", relay.port)[0])
                held.append(c)
            if got == [220, 220, 220] or time.monotonic() > deadline:
                break
            for c in held:
                c.close()
            held.clear()
            time.sleep(0.1)
        assert got == [220, 220, 220]
    finally:
        for c in held:
            try:
                c.close()
            except OSError:
                pass
        rc = relay.stop()
    assert rc == 0
    assert re.search(r"worker \d of 2 started", relay.text())


def test_idle_connections_of_one_worker_do_not_hold_the_limit_from_another(tmp_path, sink_port):
    """A destination limited to 1 connection, cached for 60 s after its last message: the worker
    holding it idle gives it up as soon as the other worker has mail for it, instead of making
    that mail wait for the cache time (a single process would simply reuse the connection)."""
    sink = ThreadedSink("127.0.0.2", sink_port).start()
    relay = WorkersProcess(tmp_path, _conf(sink_port, "max_outbound_connections = 1\n"
                                                      "Connection_Cache_Time = 60s\n"), hold=False).start()
    try:
        start = time.monotonic()
        ids = []
        for i in range(12):  # one at a time: each lands on either worker, delivered before the next
            ids += _send(relay.port, 1, f"i{i}")
            _wait_delivered(sink, ids, timeout=30)
        elapsed = time.monotonic() - start
        peak = sink.peak_sessions
    finally:
        rc = relay.stop()
        sink.stop()
    assert rc == 0
    assert peak == 1
    assert elapsed < 30, f"mail waited for another worker's idle connection ({elapsed:.1f}s)"
