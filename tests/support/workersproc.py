"""`fastrelay run` with Workers in its own process, its log read all the time (for waiting on
log lines: worker starts, restarts, signals)."""

from __future__ import annotations

import re
import signal
import threading
import time

from tests.support.relayproc import RelayProcess


class WorkersProcess(RelayProcess):
    """RelayProcess whose stderr is read all the time (the test waits for log lines)."""

    def start(self) -> WorkersProcess:
        super().start()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._lock:
                self.log.append(line)

    def text(self) -> str:
        with self._lock:
            return "".join(self.log)

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 30.0) -> list[re.Match]:
        deadline = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.text()))
            if len(found) >= count:
                return found
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {count} x {pattern!r} in the log:\n{self.text()}")
            time.sleep(0.05)

    def worker_pids(self) -> dict[int, int]:
        """worker index -> pid of its latest incarnation."""
        out = {}
        for m in re.finditer(r"worker (\d+) of \d+ started \(pid (\d+)", self.text()):
            out[int(m.group(1))] = int(m.group(2))
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        return rc
