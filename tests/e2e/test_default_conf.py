"""The embedded default conf relays for real: `fastrelay run` delivers sink.test to 127.0.0.1:2526."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import aiosmtplib
import pytest

from tests.support import Sink

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def test_default_conf_relays_to_the_demo_sink():
    sink = Sink("127.0.0.1", 2526)
    try:
        await sink.start()
    except OSError:
        pytest.fail("port 2526 is busy: the README demo needs it free")
    proc = subprocess.Popen([sys.executable, "-m", "fastrelay", "run"], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        ready = ""
        while time.monotonic() < deadline and " ready " not in ready:
            ready = await asyncio.to_thread(proc.stderr.readline)
            if not ready:
                break
        assert re.search(r"smtp on 127\.0\.0\.1:2525", ready), ready
        data = b"Subject: README demo\r\nX-Test-Id: default-conf\r\n\r\nhello\r\n"
        errors, _ = await aiosmtplib.send(data, sender="me@example.com", recipients=["you@sink.test"],
                                          hostname="127.0.0.1", port=2525)
        assert errors == {}
        # (The repo's var/spool may still hold mail from an earlier run: wait for this one.)
        got = []
        for _ in range(300):
            got = [m for m in sink.messages if m.test_id == "default-conf"]
            if got:
                break
            await asyncio.sleep(0.05)
        assert got and got[0].data.endswith(data)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        await sink.stop()
