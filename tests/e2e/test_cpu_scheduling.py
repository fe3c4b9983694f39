"""cpu_scheduling: the spool writer's threads of a real `fastrelay run` (one process, or each
worker) run under the policy the option and the one it was started under give (fastrelay.cpu);
every other thread keeps what the relay was started under."""

from __future__ import annotations

import os
import smtplib

import pytest

from fastrelay import cpu
from tests.support.relayproc import RelayProcess
from tests.support.workersproc import WorkersProcess

OTHER, BATCH, IDLE = os.SCHED_OTHER, os.SCHED_BATCH, os.SCHED_IDLE

# What an operator writes and what the relay is started under, against the policy the spool
# writer's threads must end up with and the log line that says so. The option's text: "A relay
# started under another policy (chrt, systemd's CPUSchedulingPolicy=) keeps it; "inherit" keeps
# whatever it was started under."
ROWS = [
    # (id, conf line, started under, Workers, expected writer policy, log line)
    ("default", "", [], 1, BATCH, "SCHED_BATCH (cpu_scheduling = batch)"),
    ("batch", "cpu_scheduling = batch\n", [], 1, BATCH, "SCHED_BATCH (cpu_scheduling = batch)"),
    ("inherit", "cpu_scheduling = inherit\n", [], 1, OTHER, "inherited (cpu_scheduling = inherit)"),
    ("idle-kept", "", ["chrt", "--idle", "0"], 1, IDLE, "SCHED_IDLE kept (the relay was started under it)"),
    ("batch-started", "", ["chrt", "--batch", "0"], 1, BATCH, "SCHED_BATCH (as started)"),
    ("batch-started-inherit", "cpu_scheduling = inherit\n", ["chrt", "--batch", "0"], 1, BATCH,
     "inherited (cpu_scheduling = inherit)"),
    ("idle-inherit", "cpu_scheduling = inherit\n", ["chrt", "--idle", "0"], 1, IDLE,
     "inherited (cpu_scheduling = inherit)"),
    ("workers-default", "", [], 2, BATCH, "SCHED_BATCH (cpu_scheduling = batch)"),
    ("workers-inherit", "cpu_scheduling = inherit\n", [], 2, OTHER, "inherited (cpu_scheduling = inherit)"),
    ("workers-idle-kept", "", ["chrt", "--idle", "0"], 2, IDLE, "SCHED_IDLE kept (the relay was started under it)"),
]


def _threads(pid: int) -> dict[str, set[int]]:
    """thread name (comm) -> the scheduling policies of process pid's threads of that name."""
    out: dict[str, set[int]] = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                name = f.read().strip()
            policy = os.sched_getscheduler(int(t))
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
        out.setdefault(name, set()).add(policy)
    return out


def _started(prefix: list[str]) -> int:
    return {"--idle": IDLE, "--batch": BATCH}.get(prefix[1], OTHER) if prefix[:1] == ["chrt"] else OTHER


def _send_one(port: int) -> None:
    # One message through the spool, so that its writer and reader threads exist and have worked.
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        c.sendmail("a@example.com", ["u@cpu.test"], "Subject: cpu\r\n\r\nhello\r\n")


@pytest.mark.parametrize("conf,prefix,workers,expected,line", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_each_relay_thread_runs_under_the_expected_policy(tmp_path, conf, prefix, workers, expected, line):
    extra = conf + (f"Workers = {workers}\n" if workers > 1 else "")
    cls = WorkersProcess if workers > 1 else RelayProcess
    relay = cls(tmp_path, extra, prefix=prefix).start()
    try:
        if workers > 1:
            relay.wait_log(r"worker 1 of 2 started")
            pids = sorted(relay.worker_pids().values())
            assert len(pids) == 2
        else:
            pids = [relay.proc.pid]
        _send_one(relay.port)
        seen = {pid: _threads(pid) for pid in pids}
        supervisor = _threads(relay.proc.pid) if workers > 1 else None
    finally:
        rc = relay.stop()
    assert rc == 0
    started = _started(prefix)
    for pid, threads in seen.items():
        assert threads.pop("spool-writer") == {expected}, (pid, threads)
        assert threads.pop("spool-ckpt") == {expected}, (pid, threads)  # the writer starts it
        # The event loop's thread, the spool reader and any other: as the relay was started.
        assert "spool-reader" in threads, (pid, threads)
        assert set().union(*threads.values()) == {started}, (pid, threads)
    text = "".join(relay.log)
    assert text.count("spool writer CPU scheduling: " + line) == len(pids), text
    if supervisor is not None:
        # The supervisor only waits; it keeps what it was started under.
        assert set().union(*supervisor.values()) == {started}


def test_the_nice_value_is_kept(tmp_path):
    """The option's text: "the same CPU share and nice value as SCHED_OTHER"."""
    relay = RelayProcess(tmp_path, prefix=["nice", "-n", "7"]).start()
    try:
        _send_one(relay.port)
        threads = _threads(relay.proc.pid)
        nices = {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{relay.proc.pid}/task")}
    finally:
        assert relay.stop() == 0
    assert threads["spool-writer"] == {BATCH}
    assert nices == {7}


def test_a_system_that_forbids_it_changes_nothing_and_says_so(monkeypatch):
    """A sandbox (seccomp) may refuse sched_setscheduler; the spool writer then runs on as before
    (the relay logs the line as a warning). The refusal cannot be made on this machine without
    such a sandbox, so the call is made to fail here; nothing of this process changes."""
    before = os.sched_getscheduler(0)
    calls = []

    def refuse(*a: object) -> None:
        calls.append(a)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: OTHER)  # as under systemd's default
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    ok, line = cpu.apply("batch")
    assert not ok
    assert line == "cannot set SCHED_BATCH ([Errno 1] Operation not permitted); running under SCHED_OTHER"
    assert len(calls) == 1
    monkeypatch.undo()
    assert os.sched_getscheduler(0) == before


def test_a_reload_that_changes_it_is_refused(tmp_path):
    """"Needs a restart to change": a SIGHUP with cpu_scheduling changed keeps the relay as it
    is and says why."""
    relay = WorkersProcess(tmp_path).start()
    try:
        relay.conf.write_text(relay.conf.read_text() + "cpu_scheduling = inherit\n")
        relay.proc.send_signal(1)
        relay.wait_log(r"reload refused: cpu_scheduling changed; that needs a restart")
        assert _threads(relay.proc.pid)["spool-writer"] == {BATCH}
    finally:
        assert relay.stop() == 0


def test_policy_names():
    assert [cpu.policy_name(p) for p in (OTHER, BATCH, IDLE, os.SCHED_FIFO, os.SCHED_RR)] == [
        "SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR"]
    assert cpu.policy_name(BATCH | os.SCHED_RESET_ON_FORK) == "SCHED_BATCH"

