"""Workers = 2 with an Admin_Listener: one admin for the whole relay (issue 13, item 4), a real
`fastrelay run` with its supervisor, mail taken by both workers, steered over HTTP and the CLI."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_workers_process import _send
from tests.support import ThreadedSink
from tests.support.workersproc import WorkersProcess

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "workers.test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(sink_port: int, admin_port: int) -> str:
    return (
        f'Workers = 2\nProhibited_Hosts = ( "0.0.0.0/8" )\nGateway = "127.0.0.2:{sink_port}"\nretry_interval = 1\n'
        "max_retry_interval = 1\nConnect_Timeout = 2s\n"
        f'Admin_Listener {{ Listen "127.0.0.1:{admin_port}" {{ }} }}\n'
    )


class Admin:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metrics(self) -> dict[tuple[str, tuple], float]:
        with urllib.request.urlopen(self.base + "/metrics", timeout=30) as r:
            text = r.read().decode()
        out: dict[tuple[str, tuple], float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


def _event(metrics: dict, event: str) -> float:
    return sum(v for (name, labels), v in metrics.items()
               if name == "fastrelay_messages_total" and ("event", event) in labels)


def _cli(conf: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastrelay", *args, "-c", str(conf)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def _wait(cond, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_one_admin_answers_for_both_workers(tmp_path, sink_port):
    """Issue 13: "Whatever admin and metrics exist when you take this issue answer for the whole
    relay: the queue summary and /metrics add up over all workers." With Workers = 2 the admin
    listener starts (the supervisor binds it once); mail taken by both workers is counted in the
    summary and in /metrics; a suspension, a hold and a release reach the worker that has the
    message (its id names its shard); a reload over the API reaches every worker; the CLI works
    as with one process."""
    admin_port = _free_port()
    relay = WorkersProcess(tmp_path, _conf(sink_port, admin_port), hold=False).start()
    sink = ThreadedSink("127.0.0.2", sink_port).start()
    api = Admin(admin_port)
    try:
        assert re.search(rf"ready \(2 workers.*admin on 127\.0\.0\.1:{admin_port}", relay.text())
        st, r = api.call("POST", "/api/v1/suspensions", {"domain": DOMAIN})
        assert st == 200, r
        ids = _send(relay.port, 40, rcpt=f"u@{DOMAIN}")

        st, summ = api.call("GET", "/api/v1/queue/summary")
        assert st == 200 and summ["total"] == len(ids), summ
        (row,) = summ["destinations"]
        assert (row["domain"], row["total"]) == (DOMAIN, len(ids))
        st, page = api.call("GET", "/api/v1/messages?limit=1000")
        assert page["total"] == len(ids)
        shards = {m["id"].split(".")[0] for m in page["messages"]}
        assert shards == {"0", "1"}, f"one worker took every connection: {shards}"
        m = api.metrics()
        assert _event(m, "received") == len(ids)
        assert m[("fastrelay_queue_messages", (("state", "ready"),))] + \
            m[("fastrelay_queue_messages", (("state", "deferred"),))] == len(ids)
        assert m[("fastrelay_admin_workers_unreachable", ())] == 0

        # A message of worker 1, held with the unchanged CLI, shown through the front.
        w1 = next(m["id"] for m in page["messages"] if m["id"].startswith("1."))
        p = _cli(relay.conf, "queue", "hold", w1)
        assert p.returncode == 0, p.stdout + p.stderr
        st, shown = api.call("GET", f"/api/v1/messages/{w1}")
        assert (st, shown["id"], shown["state"]) == (200, w1, "held")
        p = _cli(relay.conf, "queue", "summary", "--json")
        assert p.returncode == 0 and json.loads(p.stdout)["total"] == len(ids), p.stdout + p.stderr

        st, r = api.call("POST", "/api/v1/reroute", {"from": DOMAIN, "to": "elsewhere.test", "dry_run": True})
        assert st == 200 and r["would_move"] == len(ids) and r["moved"] == 0, r
        assert {i.split(".")[0] for i in r["ids"]} == {"0", "1"}
        p = _cli(relay.conf, "resume", DOMAIN)
        assert p.returncode == 0, p.stdout + p.stderr
        sink.wait_for(len(ids) - 1, timeout=60)

        def only_the_held_one() -> bool:
            return api.call("GET", "/api/v1/queue/summary")[1]["total"] == 1
        _wait(only_the_held_one, what="the summary to count only the held message")
        summ = api.call("GET", "/api/v1/queue/summary")[1]
        assert summ["by_state"]["held"] == 1
        assert sorted(m.test_id for m in sink.snapshot()) != sorted(ids)  # the held one is still here

        st, r = api.call("POST", f"/api/v1/messages/{w1}/release")
        assert st == 200, r
        sink.wait_for(len(ids), timeout=60)
        assert sorted(m.test_id for m in sink.snapshot()) == sorted(ids)
        _wait(lambda: _event(api.metrics(), "delivered") == len(ids), what="delivered == queued in /metrics")
        assert api.call("GET", "/api/v1/messages/7.1")[0] == 404

        st, r = api.call("POST", "/api/v1/reload")
        assert st == 200 and r["reloaded"], r
        assert r["workers"] == [{"worker": 0, "reloaded": True}, {"worker": 1, "reloaded": True}]
        relay.wait_log(r"fastrelay\.reload: configuration reloaded", count=2)  # each worker's own line
    finally:
        rc = relay.stop()
        sink.stop()
    assert rc == 0
    assert "Address already in use" not in relay.text() and "Traceback" not in relay.text()
