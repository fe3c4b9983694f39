"""Whole-relay scenarios: a real relay, real sinks on 127.0.0.2-9, a real DNS server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest

from tests.support import DNSServer, Sink
from tests.support.relay import RelayHarness


def pytest_collection_modifyitems(items):
    # Every e2e scenario is a slow test: CI still runs them (pytest runs every marker by default);
    # `-m "not slow"` skips them for a quick local run.
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.slow)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What a clone may hold that is not source: never copied into a build.
_NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "var", "__pycache__", "*.egg-info",
                                     "*.so", "*.c", ".pytest_cache", ".ruff_cache", ".hypothesis")


def pip(python: str, *args: str, cwd: str | None = None) -> None:
    out = subprocess.run([python, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    """`pip wheel .` of a copy of the source tree, built once per session (a build takes 20-30 s):
    test_install.py checks what the wheel holds, test_privilege_drop.py installs it."""
    base = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, base / "src", ignore=_NOT_SOURCE)
    pip(sys.executable, "wheel", "--no-deps", "-q", "-w", str(base / "dist"), ".", cwd=str(base / "src"))
    (wheel,) = (base / "dist").glob("*.whl")
    return wheel


def _port_free_on_all(port: int, hosts: list[str]) -> bool:
    for h in hosts:
        with socket.socket() as s:
            try:
                s.bind((h, port))
            except OSError:
                return False
    return True


@pytest.fixture
def sink_port() -> int:
    """One port free on 127.0.0.2-9: MX records cannot carry ports, so all sinks share it."""
    hosts = [f"127.0.0.{i}" for i in range(2, 10)]
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
            port = s.getsockname()[1]
        if _port_free_on_all(port, hosts):
            return port
    raise RuntimeError("no port free on all of 127.0.0.2-9")


@pytest.fixture
async def dns():
    server = DNSServer("127.0.0.1", 0)
    yield server
    server.stop()


@pytest.fixture
async def sinks(sink_port):
    """sinks(n, **kw) -> [Sink on 127.0.0.2, 127.0.0.3, ...], all on sink_port."""
    made: list[Sink] = []

    async def make(n: int = 1, first: int = 2, **kw) -> list[Sink]:
        out = []
        for i in range(first, first + n):
            s = Sink(f"127.0.0.{i}", sink_port, **kw)
            await s.start()
            made.append(s)
            out.append(s)
        return out

    yield make
    for s in made:
        await s.stop()


# Retries every second (the conf's minimum), with no backoff: the scenarios wait for attempts, not
# for a schedule; test_backoff_doubles_up_to_max_retry_interval sets its own to check the backoff.
BASE = """
DNS_Servers = ( "{dns}" )
Prohibited_Hosts = ( "0.0.0.0/8" )
Remote_SMTP_Port = {port}
retry_interval = 1
max_retry_interval = 1
host_failure_retry = 1
Connect_Timeout = 2s
Greeting_Timeout = 3s
mailfrom_timeout = 3s
rcptto_timeout = 3s
Data_Timeout = 3s
body_timeout = 3s
Delivery_Response_Timeout = 3s
max_connections_per_ip = 1000
"""


@pytest.fixture
async def relay(tmp_path, dns, sink_port):
    """relay(conf) -> a started RelayHarness delivering via the test DNS to the sinks' port."""
    made: list[RelayHarness] = []

    async def make(conf: str = "", subdir: str = "relay") -> RelayHarness:
        d = tmp_path / subdir
        d.mkdir(exist_ok=True)
        h = RelayHarness(d, BASE.format(dns=dns.address, port=sink_port) + conf)
        await h.start()
        made.append(h)
        return h

    yield make
    for h in made:
        await h.stop()


def body(tid: str, extra: bytes = b"") -> bytes:
    return f"From: a@example.com\r\nX-Test-Id: {tid}\r\nSubject: {tid}\r\n\r\n".encode() + extra + b"hello\r\n"


async def send(h: RelayHarness, rcpts: list[str], data: bytes, sender: str = "a@example.com") -> str:
    """Send one message through the relay; returns the 250 text (raises on refusal)."""
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port, timeout=10)
    await c.connect()
    try:
        # Commands by hand: aiosmtplib's sendmail() refuses the null sender <>.
        assert (await c.execute_command(b"MAIL", f"FROM:<{sender}>".encode())).code == 250
        for r in rcpts:
            assert (await c.execute_command(b"RCPT", f"TO:<{r}>".encode())).code == 250
        resp = await c.data(data)
        assert resp.code == 250, resp
        return resp.message
    finally:
        await c.quit()


def records(h: RelayHarness, kind: str) -> list[list[str]]:
    return [f for f in h.mainlog() if f[1] == kind]


async def until_records(h: RelayHarness, kind: str, n: int, timeout: float = 10.0) -> list[list[str]]:
    """Wait until the mainlog holds at least n records of `kind` (T: deferred...); returns them."""
    for _ in range(int(timeout / 0.05)):
        got = records(h, kind)
        if len(got) >= n:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} {kind} records: {records(h, kind)}")


async def drained(h: RelayHarness, timeout: float = 15.0) -> None:
    """Wait until the relay's queue is empty (every message final and removed)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while h.relay.queue.items:
        if loop.time() > end:
            raise AssertionError(f"queue not drained: {h.relay.queue.counts()}")
        await asyncio.sleep(0.02)
