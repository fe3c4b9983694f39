"""The embedded default conf relays for real: `fastrelay run`, from a directory that is not the
clone and with no -c, delivers mail for the demo domain sink.test to a sink."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import aiosmtplib

from tests.support import Sink

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def start_relay(argv: list[str], cwd: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """Start `argv` (a `fastrelay run`), wait for its ready line; (process, SMTP port)."""
    proc = subprocess.Popen(argv, cwd=cwd, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 60
    ready = ""
    while time.monotonic() < deadline and " ready " not in ready:
        ready = await asyncio.to_thread(proc.stderr.readline)
        if not ready:
            break
    m = re.search(r"smtp on 127\.0\.0\.1:(\d+)", ready)
    assert m, ready
    return proc, int(m.group(1))


async def relay_one(port: int, sink: Sink, test_id: str) -> None:
    """Send one message for sink.test through the relay on `port` and wait for the sink to get it."""
    data = f"Subject: README demo\r\nX-Test-Id: {test_id}\r\n\r\nhello\r\n".encode()
    errors, _ = await aiosmtplib.send(data, sender="me@example.com", recipients=["you@sink.test"],
                                      hostname="127.0.0.1", port=port)
    assert errors == {}
    got = []
    for _ in range(600):
        got = [m for m in sink.messages if m.test_id == test_id]
        if got:
            break
        await asyncio.sleep(0.05)
    assert got and got[0].data.endswith(data)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


async def test_default_conf_relays_to_the_demo_sink(tmp_path):
    """Issue 15: "After `pip install .`, `fastrelay run` from any directory other than the clone
    fails"; and "`fastrelay run --listen ADDR:PORT --spool DIR` override the conf for quick
    trials". Free ports only: the relay listens on port 0, the sink's port is given with --route."""
    sink = Sink("127.0.0.1", 0)
    await sink.start()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    spool = tmp_path / "trial-spool"
    proc, port = await start_relay(
        [sys.executable, "-m", "fastrelay", "run", "--listen", "127.0.0.1:0", "--spool", str(spool),
         "--route", f"sink.test=smtp://127.0.0.1?port={sink.port}"],
        cwd=str(elsewhere), env={"XDG_STATE_HOME": str(tmp_path / "state")})
    try:
        await relay_one(port, sink, "default-conf")
    finally:
        stop(proc)
        await sink.stop()
    assert (spool / "spool.db").exists() or any(spool.iterdir()), "the spool is where --spool said"
    assert not (elsewhere / "var").exists(), "nothing is written under the current directory"
    # Issue 15: "At INFO, the process log says one line per message event (accepted, delivered, ...)".
    events = [line.split(": ", 1)[1] for line in proc.stderr.read().splitlines() if "fastrelay.events" in line]
    assert len(events) == 2, events
    assert re.fullmatch(r"accepted \S+ from <me@example.com> for 1 recipient, \d+ bytes, client 127.0.0.1",
                        events[0]), events
    assert re.fullmatch(r"delivered \S+ to <you@sink.test> via 127.0.0.1:\d+: 250 .*", events[1]), events


async def test_quiet_messages_keeps_the_process_log_to_the_relay_itself(tmp_path):
    """"... or stays quiet with a switch": the mainlog still has every record."""
    sink = Sink("127.0.0.1", 0)
    await sink.start()
    proc, port = await start_relay(
        [sys.executable, "-m", "fastrelay", "run", "--quiet-messages", "--listen", "127.0.0.1:0",
         "--spool", str(tmp_path / "spool"), "--route", f"sink.test=smtp://127.0.0.1?port={sink.port}"],
        cwd=str(tmp_path))
    try:
        await relay_one(port, sink, "quiet")
    finally:
        stop(proc)
        await sink.stop()
    assert "fastrelay.events" not in proc.stderr.read()
    kinds = [line.split("\t")[1] for line in (tmp_path / "mainlog").read_text().splitlines()]
    assert kinds == ["R", "D"]
