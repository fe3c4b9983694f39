"""P1/P2/P5 end to end: a relay process killed while clients send loses no message it said 250 to."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fastrelay.spool import Spool
from tests.support import RawClient, ServerClosed
from tests.support.relayproc import RelayProcess


async def spool_contents(dir: Path) -> dict[str, bytes]:
    """X-Test-Id -> body, read through the spool API; asserts nothing is corrupt."""
    sp = Spool(str(dir / "spool"))
    await sp.open()
    try:
        out = {}
        for e in sp.recover():
            got = await sp.load(e.id)
            assert got is not None, f"spool entry {e.id} is corrupt or gone"
            _env, body = got
            m = re.search(rb"X-Test-Id: (\S+)", body)
            out[m.group(1).decode()] = body
        return out
    finally:
        await sp.close()


def make_body(tid: str) -> bytes:
    return f"X-Test-Id: {tid}\r\nSubject: crash test\r\n\r\n".encode() + (f"{tid} " * 40 + "\r\n").encode() * 20


async def sender(port: int, worker: int, outcome: dict[str, str], stop: asyncio.Event) -> None:
    """Send messages until the relay dies; record each as acked, rejected or unknown."""
    n = 0
    while not stop.is_set():
        try:
            c = await RawClient.connect("127.0.0.1", port, timeout=5)
        except OSError:
            return
        try:
            await c.expect(220)
            await c.command(f"EHLO w{worker}")
            while not stop.is_set():
                tid = f"w{worker}m{n}"
                n += 1
                await c.command("MAIL FROM:<a@example.com>")
                await c.command(f"RCPT TO:<{tid}@example.net>")
                await c.command("DATA")
                body = make_body(tid)
                outcome[tid] = "unknown"  # from here on, a kill leaves the outcome unknown
                await c.send(body + b".\r\n")
                code, _ = await c.read_reply()
                outcome[tid] = "acked" if code == 250 else "rejected"
        except (ServerClosed, ConnectionError, TimeoutError, OSError):
            return
        finally:
            await c.close()


@pytest.mark.slow
async def test_sigkill_while_20_clients_send_loses_no_acked_message(tmp_path):
    outcome: dict[str, str] = {}
    bodies_ok = 0
    for cycle in range(3):
        relay = RelayProcess(tmp_path).start()
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(sender(relay.port, cycle * 100 + w, outcome, stop)) for w in range(20)]
        await asyncio.sleep(1.0 + 0.3 * cycle)
        relay.kill()  # SIGKILL mid-traffic
        stop.set()
        await asyncio.gather(*tasks)
    # Restart: recovery runs on the spool the killed processes left, then a clean stop.
    relay = RelayProcess(tmp_path).start()
    assert relay.stop() == 0
    spooled = await spool_contents(tmp_path)
    acked = [t for t, o in outcome.items() if o == "acked"]
    rejected = [t for t, o in outcome.items() if o == "rejected"]
    unknown = [t for t, o in outcome.items() if o == "unknown"]
    assert len(acked) > 100, "the clients hardly sent anything: the test proves nothing"
    for tid in acked:
        assert tid in spooled, f"{tid} got 250 but is not in the spool"
        assert spooled[tid].endswith(make_body(tid)), f"{tid} is in the spool but not whole"
        bodies_ok += 1
    assert not [t for t in rejected if t in spooled]
    # Messages killed between the commit and the 250 may be in the spool (P2's named window);
    # nothing else may be.
    extra = set(spooled) - set(acked)
    assert extra <= set(unknown)
    for tid in extra:
        assert spooled[tid].endswith(make_body(tid))
    print(f"acked {len(acked)}, whole in spool {bodies_ok}, unknown {len(unknown)} "
          f"(of which spooled {len(extra)}), rejected {len(rejected)}")


async def _one_message(port: int) -> tuple[int | None, bytes]:
    body = make_body("cp1")
    c = await RawClient.connect("127.0.0.1", port)
    try:
        await c.expect(220)
        await c.command("EHLO c")
        await c.command("MAIL FROM:<a@example.com>")
        await c.command("RCPT TO:<cp1@example.net>")
        await c.command("DATA")
        await c.send(body + b".\r\n")
        try:
            code, _ = await c.read_reply()
        except (ServerClosed, ConnectionError):
            code = None
        return code, body
    finally:
        await c.close()


@pytest.mark.slow
@pytest.mark.parametrize(("point", "in_spool"), [("spool_after_write", False), ("spool_after_commit", True)])
async def test_crash_points_around_the_commit(tmp_path, point, in_spool):
    relay = RelayProcess(tmp_path, env={"FASTRELAY_CRASHPOINT": point}).start()
    code, body = await _one_message(relay.port)
    assert relay.proc.wait(timeout=10) == 137
    assert code is None  # no 250 was ever sent: the commit comes first (P1)
    spooled = await spool_contents(tmp_path)
    # Killed before COMMIT: nothing (P5). Killed after COMMIT, before the 250: the message is
    # there, a duplicate if the client resends (P2's named window).
    assert ("cp1" in spooled) is in_spool
    if in_spool:
        assert spooled["cp1"].endswith(body)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
async def test_fsync_precedes_the_250(tmp_path):
    """Power-loss ordering (docs/reliability.md recipe step 6): kill -9 cannot test it, strace can."""
    relay = RelayProcess(tmp_path).start()
    trace = tmp_path / "trace"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-tt", "-e", "trace=fsync,fdatasync,write,sendto,writev",
                               "-s", "64", "-o", str(trace), "-p", str(relay.proc.pid)])
    try:
        await asyncio.sleep(1.0)  # let strace attach to every thread
        code, _ = await _one_message(relay.port)
        assert code == 250
        await asyncio.sleep(0.3)
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)
        relay.stop()
    lines = trace.read_text().splitlines()
    reply = next(i for i, ln in enumerate(lines) if "250 2.0.0 OK queued" in ln)
    syncs = [i for i, ln in enumerate(lines[:reply]) if re.search(r"\b(fsync|fdatasync)\(", ln)]
    assert syncs, "no fsync/fdatasync before the 250:\n" + "\n".join(lines[: reply + 1])
