"""Workers = N: a supervisor and N worker processes sharing the listeners, each with its own spool
shard; shards recovered when N shrinks; a worker killed with -9 restarted without loss (issue 13)."""

from __future__ import annotations

import os
import signal
import smtplib
import sqlite3
import time
from pathlib import Path

import pytest

from tests.support import ThreadedSink
from tests.support.workersproc import WorkersProcess


def _send(port: int, n: int, rcpt: str = "u@workers.test", tag: str = "w") -> list[str]:
    """n messages, each on its own connection (as the bench's smtp-source does)."""
    ids = []
    for i in range(n):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            tid = f"{tag}{i}"
            c.sendmail("a@example.com", [rcpt], f"X-Test-Id: {tid}\r\nSubject: {tid}\r\n\r\nhello\r\n")
            ids.append(tid)
    return ids


def _mainlog(tmp: Path, kind: str) -> list[list[str]]:
    path = tmp / "mainlog"
    if not path.exists():
        return []
    return [f for f in (line.rstrip("\n").split("\t") for line in path.read_text().splitlines()) if f[1] == kind]


def _per_shard(spool: Path) -> dict[str, int]:
    """Messages queued in each shard of a spool directory (read after the relay stopped)."""
    out = {}
    for db in [spool / "spool.db", *sorted(spool.glob("shard-*/spool.db"))]:
        if db.exists():
            conn = sqlite3.connect(db)
            out[db.parent.name] = conn.execute("SELECT count(*) FROM msg").fetchone()[0]
            conn.close()
    return out


def _queued(spool: Path) -> int:
    return sum(_per_shard(spool).values())


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def test_two_workers_share_the_listener_and_each_accepts_some(tmp_path):
    """Issue 13: "Listeners are shared with SO_REUSEPORT, or handed over by the supervisor;
    inbound connections spread over the workers." Each worker owns a spool shard, so the shards
    say which worker took each message (delivery is suspended: they stay there)."""
    relay = WorkersProcess(tmp_path, "Workers = 2\n").start()
    try:
        assert sorted(relay.worker_pids()) == [0, 1]
        assert len(_children(relay.proc.pid)) == 2
        ids = _send(relay.port, 40)
    finally:
        rc = relay.stop()
    assert rc == 0
    assert len(_mainlog(tmp_path, "R")) == len(ids)
    shards = _per_shard(tmp_path / "spool")
    assert sorted(shards) == ["shard-1", "spool"]
    assert all(n > 0 for n in shards.values()), f"one worker took every connection: {shards}"
    # Both shards hold what they accepted: nothing lost at the SIGTERM drain.
    assert sum(shards.values()) == len(ids)
    assert "worker 0 (pid" in relay.text() and "worker 1 (pid" in relay.text()


def test_eventloop_spelling_starts_the_workers(tmp_path):
    """Momentum's spelling of the same thing (multi-event-loops.md): an eventloop pool named by
    delivery_pool and by the listener's event_loop."""
    conf = 'eventloop "events_pool" { concurrency = 2 }\ndelivery_pool = "events_pool"\n'
    relay = WorkersProcess(tmp_path, conf)
    relay.conf.write_text(relay.conf.read_text().replace(
        'ESMTP_Listener {', 'ESMTP_Listener { event_loop = "events_pool"\n'))
    relay.start()
    try:
        assert sorted(relay.worker_pids()) == [0, 1]
        assert "ready (2 workers" in relay.text()
    finally:
        assert relay.stop() == 0


def test_one_worker_is_the_single_process_of_before(tmp_path):
    """Issue 13: "N = 1 keeps today's single-process behaviour exactly": no supervisor process,
    the spool in the spool directory itself."""
    relay = WorkersProcess(tmp_path, "Workers = 1\n").start()
    try:
        assert _children(relay.proc.pid) == []
        _send(relay.port, 3)
    finally:
        assert relay.stop() == 0
    assert "supervisor" not in relay.text() and "worker" not in relay.text()
    assert not list((tmp_path / "spool").glob("shard-*"))
    assert _queued(tmp_path / "spool") == 3


def _gateway_conf(port: int) -> str:
    return (
        f'Prohibited_Hosts = ( "0.0.0.0/8" )\nGateway = "127.0.0.2:{port}"\nretry_interval = 1\n'
        "max_retry_interval = 1\nhost_failure_retry = 1\nConnect_Timeout = 2s\n"
    )


def test_fewer_workers_after_a_restart_deliver_every_shard(tmp_path, sink_port):
    """Issue 13: "At start the shards are recovered even if N changed since the last run: no
    message is orphaned by a smaller N." Mail queued by 2 workers while the next hop is down is
    all delivered by 1 worker once the hop is back."""
    relay = WorkersProcess(tmp_path, "Workers = 2\n" + _gateway_conf(sink_port), hold=False).start()
    try:
        ids = _send(relay.port, 30)
        # Every message had its failed attempt (the hop is down): queued for a retry in its shard.
        deadline = time.monotonic() + 30
        while len({f[2] for f in _mainlog(tmp_path, "T")}) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        assert relay.stop() == 0
    shards = _per_shard(tmp_path / "spool")
    assert len(shards) == 2 and all(n > 0 for n in shards.values()), shards
    assert sum(shards.values()) == len(ids)
    sink = ThreadedSink("127.0.0.2", sink_port).start()
    try:
        relay = WorkersProcess(tmp_path, "Workers = 1\n" + _gateway_conf(sink_port), hold=False).start()
        try:
            sink.wait_for(len(ids), timeout=60)
        finally:
            assert relay.stop() == 0
        got = sorted(m.test_id for m in sink.snapshot())
    finally:
        sink.stop()
    assert got == sorted(ids)
    assert "adopted spool shard 1" in relay.text()
    assert not (tmp_path / "spool" / "shard-1").exists()
    assert _queued(tmp_path / "spool") == 0


def test_killed_worker_is_restarted_and_its_shard_recovered(tmp_path, sink_port):
    """Issue 13: "A worker that dies is restarted by the supervisor, and its shard is recovered
    by its successor: a kill -9 of one worker loses nothing and is logged." Then SIGHUP reaches
    every worker, and SIGTERM drains them all."""
    relay = WorkersProcess(tmp_path, "Workers = 2\n" + _gateway_conf(sink_port), hold=False).start()
    sink = None
    try:
        ids = _send(relay.port, 30)
        victim = relay.worker_pids()[1]
        os.kill(victim, signal.SIGKILL)
        relay.wait_log(rf"worker 1 \(pid {victim}\) killed by signal 9")
        relay.wait_log(r"worker 1 of 2 started", count=2)
        assert relay.worker_pids()[1] != victim
        sink = ThreadedSink("127.0.0.2", sink_port).start()
        sink.wait_for(len(ids), timeout=60)
        assert sorted({m.test_id for m in sink.snapshot()}) == sorted(ids)
        # Connections still reach both workers after the restart.
        more = _send(relay.port, 20, tag="after")
        sink.wait_for(len(ids) + len(more), timeout=60)
        os.kill(relay.proc.pid, signal.SIGHUP)
        relay.wait_log(r"SIGHUP: configuration reloaded", count=2)  # each worker reloads
        assert relay.proc.poll() is None
    finally:
        rc = relay.stop()
        if sink is not None:
            sink.stop()
    assert rc == 0
    # One D record per message, each with its own msgid (the killed worker's unflushed R records
    # may be missing: the mainlog is a log, the spool is what is durable).
    assert len({f[2] for f in _mainlog(tmp_path, "D")}) == len(ids) + len(more)
    assert relay.text().count("fastrelay: stopped") == 2


@pytest.mark.parametrize("conf, message", [
    ('Workers = 2\neventloop "p" { concurrency = 3 }\ndelivery_pool = "p"\n', "has concurrency = 3"),
    ('delivery_pool = "nope"\n', "names eventloop 'nope', which is not defined"),
])
def test_conflicting_worker_settings_are_refused(tmp_path, conf, message):
    import subprocess
    import sys

    (tmp_path / "r.conf").write_text(conf)
    p = subprocess.run([sys.executable, "-m", "fastrelay", "run", "-c", str(tmp_path / "r.conf")],
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 2
    assert message in p.stderr and "Traceback" not in p.stderr


def test_a_listener_that_cannot_bind_stops_the_start_cleanly(tmp_path):
    """Exit 1 with one clear line (the address), no traceback and no worker left running."""
    import socket
    import subprocess
    import sys

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        (tmp_path / "r.conf").write_text(
            f'Workers = 2\nSpool_Base = "spool"\nESMTP_Listener {{ Listen "127.0.0.1:{port}" {{ }} }}\n')
        p = subprocess.run([sys.executable, "-m", "fastrelay", "run", "-c", str(tmp_path / "r.conf")],
                           capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    finally:
        taken.close()
    assert p.returncode == 1
    assert f"cannot start: ESMTP listener 127.0.0.1:{port}: Address already in use" in p.stderr
    assert "Traceback" not in p.stderr and "worker" not in p.stderr


def test_a_worker_that_cannot_start_stops_the_relay(tmp_path):
    """A worker whose spool cannot open (its shard directory is a file) exits 1; the supervisor
    does not restart it forever: it stops the others and exits 1."""
    import subprocess
    import sys

    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "shard-1").write_text("not a directory")
    (tmp_path / "r.conf").write_text(
        'Workers = 2\nSpool_Base = "spool"\nsuspend_delivery = 1\nESMTP_Listener { Listen "127.0.0.1:0" { } }\n')
    p = subprocess.run([sys.executable, "-m", "fastrelay", "run", "-c", str(tmp_path / "r.conf")],
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 1, p.stderr
    assert "cannot start: spool" in p.stderr
    assert "worker 1 (pid" in p.stderr and "before the relay was ready; stopping" in p.stderr
    assert "Traceback" not in p.stderr
