"""Run `fastrelay run` as a separate process (for kill -9 tests), and find its port in its log."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


class RelayProcess:
    """`fastrelay run` in its own process group, on a conf in `dir` with a free port."""

    def __init__(self, dir: Path, extra: str = "", env: dict | None = None, hold: bool = True,
                 prefix: list[str] | None = None):
        self.dir = dir
        self.conf = dir / "relay.conf"
        self.conf.write_text(
            'Spool_Base = "spool"\nMainlog = "mainlog"\n' + ("suspend_delivery = 1\n" if hold else "") + extra
            + 'ESMTP_Listener { Listen "127.0.0.1:0" { } }\n'
        )
        self.env = {**os.environ, **(env or {})}
        self.prefix = prefix or []  # e.g. ["chrt", "--idle", "0"]: what the relay is started under
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log: list[str] = []

    def start(self) -> RelayProcess:
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "fastrelay", "run", "--quiet-messages", "-c", str(self.conf)],
            cwd=ROOT, stderr=subprocess.PIPE, text=True, env=self.env, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r" ready .*smtp on 127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                return self
        self.kill()
        raise AssertionError("relay did not start:\n" + "".join(self.log))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        self.log.extend(self.proc.stderr.readlines())
        return rc
