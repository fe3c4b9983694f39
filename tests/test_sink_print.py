"""`python -m fastrelay.bench.sink --print` prints the messages alone on stdout."""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import sys


def test_print_keeps_status_lines_out_of_the_messages():
    """Issue 15: "`python -m bench.sink --print` no longer mixes its JSON status lines into the
    printed messages"."""
    proc = subprocess.Popen([sys.executable, "-m", "fastrelay.bench.sink", "--listen", "127.0.0.1:0", "--print"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stderr.readline())
        assert first["event"] == "listening"
        with smtplib.SMTP("127.0.0.1", first["port"], timeout=10) as c:
            c.sendmail("me@example.com", ["you@sink.test"], "Subject: hi\r\n\r\nhello\r\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert out.splitlines() == ["--- message 1: from <me@example.com> to <you@sink.test>, 22 bytes",
                                "Subject: hi", "", "hello", "--- end"]
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert events == ["final"]
