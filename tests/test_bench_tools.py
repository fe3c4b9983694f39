"""The bench tools: the sink counts and unstuffs, the client drives it, `fastrelay bench` end to end."""

from __future__ import annotations

import hashlib
import json
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastrelay.bench import e2e
from fastrelay.bench.client import ACKED, LoadSpec, percentile_ms, run_load, run_load_procs
from fastrelay.bench.procs import (
    RelayProcess,
    SinkProcess,
    find_postfix_tools,
    free_port,
    proc_cpu_seconds,
    relay_conf,
)
from fastrelay.bench.sink import find_test_id, strip_received


@pytest.fixture
def sink(tmp_path):
    s = SinkProcess("127.0.0.2:0", ledger=tmp_path / "ledger", status_interval=0.1).start()
    yield s
    s.stop()


def _ledger(path: Path) -> list[list[str]]:
    return [ln.split("\t") for ln in path.read_text().splitlines()]


def _recv_replies(sock: socket.socket, n: int, timeout: float = 5.0) -> list[bytes]:
    """Read until `n` complete replies arrived; each reply's lines joined (multi-line ones count once)."""
    sock.settimeout(timeout)
    buf = b""
    while True:
        replies, cur = [], []
        for ln in buf.split(b"\r\n")[:-1]:
            cur.append(ln)
            if len(ln) < 4 or ln[3:4] != b"-":
                replies.append(b"\r\n".join(cur))
                cur = []
        if len(replies) >= n:
            return replies
        chunk = sock.recv(65536)
        assert chunk, f"connection closed; got {buf!r}"
        buf += chunk


def test_strip_received_and_find_test_id():
    orig = b"X-Test-Id: abc-1\r\nSubject: s\r\n\r\nbody\r\n"
    relayed = b"Received: from a ([127.0.0.1])\r\n\tby r (fastrelay) with ESMTP id x\r\n\tfor <b@c>; date\r\n" + orig
    twice = b"received: from b\r\n by x; d\r\n" + relayed
    assert strip_received(relayed) == orig
    assert strip_received(twice) == orig
    assert strip_received(orig) == orig
    assert find_test_id(orig) == "abc-1"
    assert find_test_id(b"Subject: s\r\nx-test-id:  z9 \r\n\r\nX-Test-Id: body\r\n") == "z9"
    assert find_test_id(b"Subject: s\r\n\r\nX-Test-Id: in-body\r\n") == "-"


def test_sink_counts_and_unstuffs_smtplib(sink, tmp_path):
    # Lines starting with a dot (smtplib stuffs them), a lone "." line, a last line that is "..".
    body = (b"X-Test-Id: lib-1\r\nSubject: dots\r\n\r\n.starts with a dot\r\n.\r\nmiddle\r\n..\r\n")
    with smtplib.SMTP(sink.host, sink.port, timeout=10) as c:
        refused = c.sendmail("a@example.com", ["b@example.com", "c@example.com"], body)
        assert refused == {}
        c.noop()
        c.rset()
    snap = sink.wait_for("messages", 1, 10)
    assert snap["messages"] == 1 and snap["rcpts"] == 2 and snap["ledger_lines"] == 2
    rows = _ledger(tmp_path / "ledger")
    want = hashlib.sha256(body).hexdigest()
    assert rows == [["lib-1", "b@example.com", want], ["lib-1", "c@example.com", want]]


def test_sink_raw_pipelined_groups_and_split_end_of_data(sink, tmp_path):
    s = socket.create_connection((sink.host, sink.port))
    try:
        assert _recv_replies(s, 1)[0].startswith(b"220 ")
        s.sendall(b"EHLO me\r\n")
        ehlo = _recv_replies(s, 1)
        s.sendall(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nDATA\r\n")
        # One pipelined group, answered in one write: all four replies in one read on loopback.
        s.settimeout(5)
        first = s.recv(65536)
        assert first == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        # A body that starts with a stuffed dot, with CRLF.CRLF cut across three sends; then,
        # pipelined behind the dot, a second transaction whose body is empty.
        msg1 = b"..x first line\r\nX-Test-Id: not-a-header\r\n"
        s.sendall(b"X-Test-Id: raw-1\r\n\r\n" + msg1[:-1])
        time.sleep(0.05)
        s.sendall(b"\n.")
        time.sleep(0.05)
        s.sendall(b"\r\nMAIL FROM:<a@x>\r\nRCPT TO:<d@x>\r\nDATA\r\n")
        r = _recv_replies(s, 4)
        assert [x[:3] for x in r] == [b"250", b"250", b"250", b"354"]
        s.sendall(b".\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        r = _recv_replies(s, 4)
        assert [x[:3] for x in r] == [b"250", b"250", b"250", b"221"]
    finally:
        s.close()
    assert b"250-PIPELINING" in ehlo[0]
    snap = sink.wait_for("messages", 2, 10)
    assert (snap["messages"], snap["rcpts"], snap["ledger_lines"]) == (2, 3, 3)
    rows = _ledger(tmp_path / "ledger")
    body1 = b"X-Test-Id: raw-1\r\n\r\n.x first line\r\nX-Test-Id: not-a-header\r\n"
    assert rows[0] == ["raw-1", "b@x", hashlib.sha256(body1).hexdigest()]
    assert rows[1] == ["raw-1", "c@x", hashlib.sha256(body1).hexdigest()]
    assert rows[2] == ["-", "d@x", hashlib.sha256(b"").hexdigest()]


def test_sink_ehlo_errors_and_tempfail(tmp_path):
    with SinkProcess("127.0.0.2:0", tempfail_rate=1.0, status_interval=0.1) as s:
        c = socket.create_connection((s.host, s.port))
        try:
            _recv_replies(c, 1)
            c.sendall(b"EHLO me\r\n")
            assert _recv_replies(c, 1)[0].startswith(b"250-")
            c.sendall(b"RCPT TO:<x@y>\r\nDATA\r\nBOGUS\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\nDATA\r\n")
            r = _recv_replies(c, 6)
            assert [x[:3] for x in r] == [b"503", b"503", b"502", b"250", b"503", b"503"]
            c.sendall(b"RCPT TO:<x@y>\r\nDATA\r\n")
            _recv_replies(c, 2)
            c.sendall(b"hello\r\n.\r\n")
            assert _recv_replies(c, 1)[0].startswith(b"451 ")
        finally:
            c.close()
        snap = s.snapshot()
        assert snap["messages"] == 0 and snap["tempfailed"] == 1
    raw = s.proc.args
    assert "--tempfail-rate" in raw
    final = s.final
    assert final is not None and final["event"] == "final"


def test_sink_ehlo_offers_pipelining():
    with SinkProcess("127.0.0.2:0") as s, smtplib.SMTP(s.host, s.port, timeout=10) as c:
        code, _ = c.ehlo("me")
        assert code == 250
        assert c.has_extn("pipelining") and c.has_extn("8bitmime") and c.has_extn("size")


@pytest.mark.parametrize("reuse, pipelining", [(False, True), (True, False), (True, True)])
def test_client_drives_the_sink(sink, tmp_path, reuse, pipelining):
    n = 300
    base = sink.snapshot()
    spec = LoadSpec(host=sink.host, port=sink.port, messages=n, size=1500, rcpts=2, concurrency=4,
                    reuse=reuse, pipelining=pipelining, record=True, id_prefix="t-")
    res = run_load(spec)
    assert (res.messages, res.accepted, res.rejected, res.failed, res.unknown) == (n, n, 0, 0, 0), res.errors
    assert res.rcpts_accepted == 2 * n
    assert len(res.latencies) == n
    p50, p99 = res.percentile_ms(50), res.percentile_ms(99)
    assert 0 < p50 <= p99 < 5000
    assert res.end > res.start and res.accepted_per_s > 0
    snap = sink.wait_for("messages", base["messages"] + n, 10)
    assert snap["messages"] - base["messages"] == n
    assert snap["rcpts"] - base["rcpts"] == 2 * n
    # The sink's hash of what it received equals the client's hash of what it sent, per id.
    rows = _ledger(tmp_path / "ledger")[-2 * n:]
    assert {r[0] for r in rows} == set(res.outcomes)
    for tid, rcpt, sha in rows:
        state, ok, _, sent_sha = res.outcomes[tid]
        assert state == ACKED and rcpt in ok and sha == sent_sha


def test_client_message_size_and_procs(sink):
    base = sink.snapshot()
    res = run_load_procs(LoadSpec(host=sink.host, port=sink.port, messages=101, size=4096, concurrency=4), procs=2)
    assert res.accepted == 101 and len(res.latencies) == 101
    snap = sink.wait_for("messages", base["messages"] + 101, 10)
    # 4096 bytes each as sent (the sink counts the content without the final dot line).
    assert snap["bytes"] - base["bytes"] == 101 * 4096


def test_client_reports_failures_without_a_server():
    port = free_port("127.0.0.2")
    res = run_load(LoadSpec(host="127.0.0.2", port=port, messages=5, concurrency=2, timeout=5))
    assert res.accepted == 0 and res.failed == 5 and res.errors


def test_percentile():
    assert percentile_ms([], 50) is None
    xs = [i / 1000 for i in range(1, 101)]
    assert percentile_ms(xs, 50) == pytest.approx(50)
    assert percentile_ms(xs, 99) == pytest.approx(99)
    assert percentile_ms(xs, 100) == pytest.approx(100)


def _check_report(rep: dict, names: list[str], n: int) -> None:
    assert rep["ok"] is True and rep["failures"] == []
    for key in ("nproc", "cpu_model", "python", "fastrelay_version", "fastrelay_impl"):
        assert rep["machine"][key], key
    assert rep["date"] and rep["command"] and isinstance(rep["argv"], list)
    assert [s["name"] for s in rep["setups"]] == names
    for s in rep["setups"]:
        (run,) = s["runs"]
        assert run["accepted"] == run["delivered"] == n, (s["name"], run)
        for key in ("accepted_per_s", "delivered_per_s", "latency_p50_ms", "latency_p99_ms"):
            assert run[key] > 0, (s["name"], key)
            assert s["median"][key] == run[key]
        assert run["latency_p99_ms"] >= run["latency_p50_ms"]
        for key in ("relay_cpu_s", "relay_peak_rss_mb", "client_cpu_s", "sink_cpu_s"):
            assert key in run
    assert rep["setups"][0]["pct_of_ceiling"] == 100.0


def test_e2e_fastrelay_and_ceiling(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = e2e.main(["--messages", "200", "--concurrency", "4", "--runs", "1", "--json", str(out), "--no-progress"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    rep = json.loads(out.read_text())
    _check_report(rep, ["ceiling", "fastrelay"], 200)
    fr = rep["setups"][1]["runs"][0]
    assert fr["relay_cpu_s"] > 0 and fr["relay_peak_rss_mb"] > 10
    assert rep["machine"]["fastrelay_impl"] in ("cython", "python")
    assert "ceiling" in text.out and "fastrelay" in text.out and "delivered/s" in text.out


def test_e2e_impl_python_reuse_and_compare(tmp_path, capsys):
    # --compare a relay this test starts itself (as a user would point Postfix at the sink).
    sink_port = free_port("127.0.0.2")
    other = RelayProcess(tmp_path / "other", relay_conf("127.0.0.2", sink_port)).start()
    try:
        out = tmp_path / "bench.json"
        rc = e2e.main(["--messages", "200", "--concurrency", "4", "--reuse", "--no-pipelining", "--impl", "python",
                       "--sink-listen", f"127.0.0.2:{sink_port}", "--compare", f"127.0.0.1:{other.port}",
                       "--json", str(out), "--no-progress"])
    finally:
        other.stop()
    assert rc == 0, capsys.readouterr().err
    rep = json.loads(out.read_text())
    _check_report(rep, ["ceiling", "fastrelay", f"compare 127.0.0.1:{other.port}"], 200)
    assert rep["machine"]["fastrelay_impl"] == "python"
    assert rep["setups"][2]["runs"][0]["relay_cpu_s"] is None


def test_fastrelay_bench_entry_point(capsys):
    from fastrelay import cli

    rc = cli.main(["bench", "--", "--messages", "50", "--concurrency", "2", "--no-ceiling", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "fastrelay bench: 50 messages" in out


def test_e2e_postfix_tools_missing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = e2e.main(["--tools", "postfix", "--tools-path", str(empty), "--messages", "10", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and "smtp-source and smtp-sink not found" in err and "Traceback" not in err


def test_e2e_relay_that_does_not_start(tmp_path, capsys):
    rc = e2e.main(["--messages", "10", "--no-ceiling", "--relay-option", "no_such_option = 1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("bench: the relay did not start") and "Traceback" not in err


def test_e2e_target_needs_a_fixed_sink_port(capsys):
    assert e2e.main(["--target", "127.0.0.1:2525", "--no-progress"]) == 1
    assert "fixed port" in capsys.readouterr().err


def test_e2e_postfix_tools(tmp_path, capsys):
    # Never skipped: .ci/peers installs the tools; the README says how to get them locally.
    assert find_postfix_tools() is not None, "Postfix's smtp-source/smtp-sink are not installed (see .ci/peers)"
    out = tmp_path / "bench.json"
    rc = e2e.main(["--tools", "postfix", "--messages", "200", "--concurrency", "4", "--json", str(out),
                   "--no-progress"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    rep = json.loads(out.read_text())
    for s in rep["setups"]:
        (run,) = s["runs"]
        assert run["accepted"] == run["delivered"] == 200
        assert run["latency_p50_ms"] is None
    assert "latency percentiles are not available from smtp-source" in text.out


def test_e2e_postfix_tools_bound(tmp_path, capsys):
    """--bound: the tool relay (the load into smtp-sink and, at once, smtp-source -d into a second
    smtp-sink) is a row of its own; it has delivered a message only once both sides have."""
    out = tmp_path / "bench.json"
    rc = e2e.main(["--tools", "postfix", "--bound", "--messages", "200", "--concurrency", "4", "--json", str(out),
                   "--no-progress"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    rep = json.loads(out.read_text())
    assert [s["name"] for s in rep["setups"]] == ["ceiling", e2e.BOUND, "fastrelay"]
    _, bound, _ = (s["runs"][0] for s in rep["setups"])
    assert bound["accepted"] == bound["delivered"] == 200
    assert bound["relay_cpu_s"] is None
    # Two sources and two sinks did the work of one pair each (counted, not timed).
    assert bound["client_cpu_s"] > 0 and bound["sink_cpu_s"] > 0
    assert rep["setups"][1]["pct_of_ceiling"] is not None
    assert [s["pct_of_bound"] for s in rep["setups"][:2]] == [None, 100.0]
    assert rep["setups"][2]["pct_of_bound"] == round(100 * rep["setups"][2]["median"]["delivered_per_s"]
                                                      / rep["setups"][1]["median"]["delivered_per_s"], 1)
    assert "% bound" in text.out
    assert e2e.BOUND in text.out and "the most a relay could reach here" in text.out


def test_e2e_bound_needs_postfix_tools(capsys):
    assert e2e.main(["--bound", "--messages", "10", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--bound needs --tools postfix" in err


@pytest.mark.slow
def test_xfer_bench_small_run():
    from fastrelay.bench import xfer

    res = xfer.run(messages=200, size=4096, concurrency=4, connections=4, timeout=60)
    assert res["accepted"] == 200
    assert res["transferred_per_s"] > 0 and res["delivered_per_s"] > 0


ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("e2e", "client", "sink", "chaos", "deferred", "xfer")


def test_wheel_packages_no_top_level_bench():
    """Issue #9: "`pip install fastrelay` installs a top-level package named `bench` into
    site-packages, where it can clash with anyone else's." The packages a wheel gets, found with
    pyproject's own packages.find, are all under fastrelay; the tools are among them and the
    pytest-benchmark files are not."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(ROOT), include=find.get("include", ["*"]), exclude=find.get("exclude", ()))
    assert "fastrelay.bench" in packages
    assert [p for p in packages if p.split(".")[0] != "fastrelay"] == []
    for tool in (*TOOLS, "procs", "confgen"):
        assert (ROOT / "fastrelay" / "bench" / f"{tool}.py").is_file()
    assert list((ROOT / "fastrelay" / "bench").glob("test_*")) == []


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_run_as_fastrelay_bench_modules(tool, tmp_path):
    """The README's commands: `python -m fastrelay.bench.X --help` works from any directory."""
    out = subprocess.run([sys.executable, "-m", f"fastrelay.bench.{tool}", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    prog = "fastrelay bench" if tool == "e2e" else f"python -m fastrelay.bench.{tool}"
    assert out.stdout.startswith(f"usage: {prog}")


def test_cpu_of_another_process_is_read_finer_than_a_clock_tick():
    """A short run's tools use less than a clock tick (10 ms) of CPU: CI once read the bound's
    sinks at 0.0 s from /proc/PID/stat. The child spins for 3 ms of its own CPU clock, then
    waits; what the bench reads of it is at least that."""
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.003: pass\n"
         "print(time.process_time(), flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        own = float(child.stdout.readline())
        seen = proc_cpu_seconds(child.pid)
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    assert seen is not None and seen >= own >= 0.003
    assert proc_cpu_seconds(child.pid) is None  # reaped: gone
