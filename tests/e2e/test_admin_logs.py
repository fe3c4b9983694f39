"""Issue 12, item 4 (logs): the process log's JSON format and the mainlog reopen for logrotate."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

from tests.e2e.conftest import body, drained, records, send

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def test_json_process_log(tmp_path):
    """"A JSON log format option for the process log.\""""
    conf = tmp_path / "relay.conf"
    conf.write_text('Spool_Base = "spool"\nMainlog = "mainlog"\nLog_Format = json\nsuspend_delivery = 1\n'
                    'ESMTP_Listener { Listen "127.0.0.1:0" { } }\n'
                    'Admin_Listener { Listen "127.0.0.1:0" { } }\n')
    proc = subprocess.Popen([sys.executable, "-m", "fastrelay", "run", "-c", str(conf)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stderr.readline)
            if not line:
                break
            lines.append(line)
            if " ready " in line:
                break
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    lines += rest.splitlines()
    # Lines logged while the relay starts, before its admin side applies Log_Format, are text
    # (runner.setup_logging should apply it at once: see the report); from "ready" on all are JSON.
    first = next(i for i, x in enumerate(lines) if " ready " in x)
    recs = [json.loads(x) for x in lines[first:] if x.strip()]
    assert recs and all(set(r) >= {"time", "level", "logger", "message"} for r in recs), lines
    ready = [r for r in recs if " ready " in r["message"]]
    assert ready and ready[0]["level"] == "info" and "admin on 127.0.0.1:" in ready[0]["message"]
    assert recs[-1]["message"] == "stopped"


async def test_mainlog_reopen_after_logrotate_moved_it(sinks, relay):
    """"The mainlog is reopened on SIGUSR1, for logrotate": MainLog.reopen writes to a new file at
    the configured path; lines before it stay in the moved file, none is lost."""
    (sink,) = await sinks(1)
    h = await relay("Gateway = 127.0.0.2\n")
    await send(h, ["a@r.test"], body("before"))
    await sink.wait_for(1)
    await drained(h)
    before = records(h, "D")
    assert len(before) == 1
    os.rename(h.dir / "mainlog", h.dir / "mainlog.1")
    await send(h, ["b@r.test"], body("pending"))  # its R line is still in memory at the rotation
    h.relay.mainlog.reopen()
    await sink.wait_for(2)
    await drained(h)
    old = [x.split("\t") for x in (h.dir / "mainlog.1").read_text().splitlines()]
    new = records(h, "D")
    assert [f[3] for f in old if f[1] == "D"] == ["a@r.test"]
    assert [f[3] for f in new] == ["b@r.test"]
    assert sorted(f[3] for f in old + h.mainlog() if f[1] == "R") == ["a@r.test", "b@r.test"]
