"""The spool's writes fail for real for a while (a file-size limit on the relay process, a full disk):
the queue survives, releases what it took, logs once, and delivers everything after recovery."""

from __future__ import annotations

import asyncio
import re
import resource
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fastrelay.bench.procs import child_env, relay_conf
from fastrelay.spool import Spool
from tests.support import Sink, free_port

N = 20


def _send(port: int, n: int, prefix: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        for i in range(n):
            c.sendmail("from@src.test", [f"{prefix}{i}@dst.test"],
                       f"Subject: {prefix}{i}\r\nX-Test-Id: {prefix}{i}\r\n\r\nbody {i}\r\n")


def _records(path: Path, kind: str) -> list[list[str]]:
    if not path.exists():
        return []
    return [f for f in (ln.split("\t") for ln in path.read_text(errors="replace").splitlines())
            if len(f) > 2 and f[1] == kind]


async def _until(cond, timeout: float, what) -> None:
    """Wait for cond(); `what` (a string, or a callable giving one) names it in the failure."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.1)


class Relay:
    """`fastrelay run` whose log goes through a pipe (a file-size limit does not apply to pipes, so
    the relay can still log while its file writes fail); a thread keeps the pipe drained."""

    def __init__(self, dir: Path, conf: str) -> None:
        (dir / "relay.conf").write_text(conf)
        self.proc = subprocess.Popen([sys.executable, "-m", "fastrelay", "run", "-c", "relay.conf"], cwd=dir,
                                     stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=child_env(), start_new_session=True)
        self.lines: list[str] = []
        self.port = 0
        ready = threading.Event()

        def drain() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r" ready .*smtp on 127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        self._t = threading.Thread(target=drain, daemon=True)
        self._t.start()
        if not ready.wait(30) or not self.port:
            self.stop()
            raise AssertionError("relay did not start:\n" + self.log())

    def log(self, start: int = 0) -> str:
        return "".join(self.lines[start:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._t.join(5)
        return self.proc.returncode


def _limit_writes(pid: int, limit: int) -> None:
    """RLIMIT_FSIZE of the running relay: every write at or past `limit` fails with EFBIG (the
    interpreter ignores SIGXFSZ), as on a disk whose quota ran out. The hard limit is left alone,
    so the soft one can be raised again."""
    hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))


async def _spool_ids(directory: Path) -> list[int]:
    sp = Spool(str(directory))
    await sp.open()
    try:
        return [e.id for e in sp.recover()]
    finally:
        await sp.close()


@pytest.mark.slow
@pytest.mark.parametrize("hop_back", ["after the spool recovers", "while the spool fails"])
async def test_spool_write_failures_while_deferring_strand_nothing(tmp_path, hop_back):
    """Issue 9: a transient spool write failure while the queue defers mail killed the queue task
    (Task exception was never retrieved ... Queue._pump ... SpoolError), leaving every message it had
    taken busy until restart. Now each is released with a retry, the failure is logged once, and
    everything is delivered once the spool works again: exactly once, also when the next hop comes
    back while the spool still fails (the removal waits; the message is not sent again)."""
    port = free_port("127.0.0.3")
    relay = Relay(tmp_path, relay_conf("127.0.0.3", port, retry="1s", host_failure_retry="1s",
                                       extra=["message_expiration = 1h"]))
    sink = None
    try:
        await asyncio.to_thread(_send, relay.port, N, "m")
        mainlog = tmp_path / "mainlog"
        # Every message has been deferred at least once (next hop refuses connections).
        await _until(lambda: len({r[2] for r in _records(mainlog, "T")}) >= N, 30, "first deferrals")
        _limit_writes(relay.proc.pid, 1)  # from now on every write to the spool (and the mainlog) fails
        log_at = len(relay.lines)
        await _until(lambda: "spool write failed" in relay.log(log_at), 20, "a failed spool write")
        await asyncio.sleep(3)  # several retry rounds with every write failing
        if hop_back == "while the spool fails":
            sink = await Sink("127.0.0.3", port).start()
            await _until(lambda: len(sink.messages) >= N, 60, lambda: f"deliveries; log:\n{relay.log(log_at)[-3000:]}")
            await asyncio.sleep(3)  # the removals fail and wait; nothing is sent again meanwhile
        _limit_writes(relay.proc.pid, resource.RLIM_INFINITY)
        if sink is None:
            sink = await Sink("127.0.0.3", port).start()
        await _until(lambda: len({m.rcpt_tos[0] for m in sink.messages}) >= N, 60,
                     lambda: f"every message delivered; relay log:\n{relay.log(log_at)[-3000:]}")
        await _until(lambda: "queue: the spool works again" in relay.log(log_at), 30, "the spool to work again")
        await asyncio.sleep(2)
        assert relay.alive()
        got = sorted(m.rcpt_tos[0] for m in sink.messages)
        assert got == sorted(f"m{i}@dst.test" for i in range(N)), "lost or sent twice"
        log = relay.log(log_at)
        assert "Task exception was never retrieved" not in log
        assert "Traceback" not in log, log[-4000:]
        # Logged once per failure episode, not once per message and retry.
        q_episodes = log.count("queue: spool write failed")
        assert 1 <= q_episodes == log.count("queue: the spool works again") <= 3, log[-4000:]
        # The writer's line is once per episode too: an episode ends when a write succeeds, which
        # can happen while the limit holds (a commit that only overwrites WAL pages in place does
        # not grow a file), so each "batch of" line is paired with the "succeed again" that ends it.
        episodes = log.count("spool: batch of")
        assert 1 <= episodes == log.count("spool: writes succeed again"), log[-4000:]
        assert episodes <= 3, log[-4000:]  # not once per batch: several retry rounds ran meanwhile
    finally:
        relay.stop()
        if sink is not None:
            await sink.stop()
    assert await _spool_ids(tmp_path / "spool") == []  # every removal was written in the end
