"""kill -9 and crash points against the spool (docs/reliability.md recipe steps 3-4; P1, P2, P5, P6).

A child process (tests/spool_crash_child.py) adds messages from 30 concurrent writers and prints
"acked <id> <sha256>" after each add returns. The parent SIGKILLs it at a random moment, several
times on the same spool, then checks that every acked message is there with exactly its body and
that recovery finds nothing torn.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from fastrelay.spool import Spool

CHILD = os.path.join(os.path.dirname(__file__), "spool_crash_child.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_child(directory, tag: str, crashpoint: str = "", writers: int = 30) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FASTRELAY_CRASHPOINT", None)
    if crashpoint:
        env["FASTRELAY_CRASHPOINT"] = crashpoint
    return subprocess.Popen(
        [sys.executable, CHILD, str(directory), str(writers), tag],
        stdout=subprocess.PIPE, env=env, start_new_session=True,
    )


def parse(lines: list[bytes]) -> tuple[dict[int, str], set[str]]:
    acked: dict[int, str] = {}
    trying: set[str] = set()
    for raw in lines:
        if not raw.endswith(b"\n"):
            continue  # cut by the kill: it was never a complete ack
        parts = raw.decode().split()
        if parts[0] == "acked":
            acked[int(parts[1])] = parts[2]
        elif parts[0] == "trying":
            trying.add(parts[1])
    return acked, trying


def kill_after(proc: subprocess.Popen, acks: int, extra_delay: float) -> list[bytes]:
    """Read the child's output until `acks` acks, wait a little more, SIGKILL it, read the rest."""
    lines: list[bytes] = []
    seen = 0
    deadline = time.monotonic() + 30
    while seen < acks and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(b"acked"):
            seen += 1
    assert seen >= acks, f"child gave only {seen} acks (exit {proc.poll()})"
    time.sleep(extra_delay)
    os.killpg(proc.pid, signal.SIGKILL)
    lines += proc.stdout.read().splitlines(keepends=True)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    return lines


async def contents(directory) -> tuple[list[int], dict[int, str]]:
    """(recovered ids, sha256 of each recovered body) after reopening the spool."""
    sp = Spool(str(directory))
    await sp.open()
    try:
        index = sp.recover()
        shas = {}
        for e in index:
            got = await sp.load(e.id)
            assert got is not None, f"message {e.id} recovered but not loadable"
            shas[e.id] = hashlib.sha256(got[1]).hexdigest()
        assert sp.stats["quarantined"] == 0, "recovery found torn or corrupt entries"
        return [e.id for e in index], shas
    finally:
        await sp.close()


def test_kill_9_loses_no_acked_message(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="fastrelay.spool")
    rnd = random.Random()
    all_acked: dict[int, str] = {}
    for cycle in range(5):
        proc = start_child(tmp_path, f"c{cycle}")
        acked, _ = parse(kill_after(proc, rnd.randint(200, 3000), rnd.uniform(0, 0.1)))
        assert acked, "the child acked nothing"
        assert not set(acked) & set(all_acked), "an id was reused after a crash"
        all_acked.update(acked)
        ids, shas = asyncio.run(contents(tmp_path))
        for mid, sha in all_acked.items():
            assert mid in shas, f"acked message {mid} lost (cycle {cycle})"
            assert shas[mid] == sha, f"acked message {mid} has a different body (cycle {cycle})"
        # Anything beyond the acks was committed just before the kill (P2's named window).
        assert len(ids) == len(set(ids))
    assert not caplog.records, caplog.text


@pytest.mark.parametrize("point", ["spool_after_write", "spool_after_commit"])
def test_crash_points(tmp_path, point):
    proc = start_child(tmp_path, "cp", crashpoint=point)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 137, proc.returncode
    acked, trying = parse(out.splitlines(keepends=True))
    assert trying and not acked
    ids, shas = asyncio.run(contents(tmp_path))
    if point == "spool_after_write":
        # Written, not committed: gone after restart (P5: unacked = no obligation).
        assert ids == []
    else:
        # Committed, never acked: kept (the duplicate window of P2); only what was being added.
        assert ids
        assert set(shas.values()) <= trying
    # The spool works after the crash.
    proc = start_child(tmp_path, "after")
    acked, _ = parse(kill_after(proc, 50, 0))
    _, shas = asyncio.run(contents(tmp_path))
    assert all(shas[mid] == sha for mid, sha in acked.items())
