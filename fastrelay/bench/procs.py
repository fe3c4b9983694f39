"""Start, watch and stop the processes of the bench tools: the sink, fastrelay, Postfix's smtp-sink."""

# Every process here is started in its own session (so its own process group) and ended by its
# group id in stop()/kill(); the tools call those from `finally`/`with`, so Ctrl-C, an error or a
# SIGTERM to the tool (turned into KeyboardInterrupt by the tools' main) leaves nothing running.

from __future__ import annotations

import ctypes
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent  # the directory holding the fastrelay package
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ToolError(Exception):
    """An expected failure: the tool prints its message on one line and exits 1."""


# Every child this module starts, until it is reaped: end_all() is the tools' last line of defence
# (an exception raised by a signal handler inside an event loop can skip a `finally`).
_LIVE: set[subprocess.Popen] = set()


def track(proc: subprocess.Popen) -> subprocess.Popen:
    _LIVE.add(proc)
    return proc


def end_all() -> None:
    """Kill the process group of every child still running (by its own id, nothing else)."""
    for proc in list(_LIVE):
        end_group(proc)


def child_env(extra: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment for a child: this tree first on PYTHONPATH, so it runs the same code."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def split_addr(addr: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ToolError(f"bad address {addr!r}: expected HOST:PORT")
    return host.strip("[]") or default_host, int(port)


def join_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str) -> int:
    """A port that is free on `host` now (bind to 0 and let go; the race is harmless here)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def proc_cpu_seconds(pid: int) -> float | None:
    """user + system CPU of a process and all its threads (the ended ones too).

    Read from the process's CPU clock (clock_getcpuclockid, nanoseconds): /proc/PID/stat counts
    in clock ticks (10 ms), so a short run's sink could read 0.0 s (seen in CI, 200 messages).
    /proc/PID/stat is the fallback where that clock cannot be read."""
    if _LIBC is not None:
        clock = ctypes.c_int()
        if _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
            try:
                return time.clock_gettime(clock.value)
            except OSError:
                pass  # gone, or a zombie: /proc says which
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # comm may hold spaces: cut after its ')'
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_tree(pid: int) -> list[int]:
    """pid and its descendants (a relay with Workers > 1 is a supervisor and its workers)."""
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        try:
            out += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            pass
        i += 1
    return out


def tree_sum(pid: int, one) -> float | None:
    """The sum of one(p) over proc_tree(pid); None if the process itself is gone."""
    first = one(pid)
    if first is None:
        return None
    return first + sum(v for v in (one(c) for c in proc_tree(pid)[1:]) if v is not None)


def proc_status_kb(pid: int, key: str) -> int | None:
    """A 'kB' field of /proc/PID/status, e.g. VmHWM (peak RSS) or VmRSS."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def end_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    _LIVE.discard(proc)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _how_it_ended(rc: int | None) -> str:
    if rc is not None and rc < 0:
        return f"was killed by {signal.Signals(-rc).name} (not by this tool)"
    return f"exited with status {rc}"


def wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ToolError(f"exited with status {proc.returncode} before listening on {join_addr(host, port)}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.02)
    raise ToolError(f"not listening on {join_addr(host, port)} after {timeout:g} s")


def _wait_counter(sink: Any, key: str, target: int, timeout: float) -> None:
    """Wait until `sink.latest[key]` reaches `target`, the sink's process ends, or the timeout;
    `sink` has `latest` (counters), `_cond` (notified on each update) and `proc`."""
    deadline = time.monotonic() + timeout
    with sink._cond:
        while sink.latest.get(key, 0) < target and sink.proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sink._cond.wait(min(left, 0.5))


class SinkProcess:
    """`python -m fastrelay.bench.sink` in its own process group; its JSON status lines are read in a thread."""

    kind = "own"

    def __init__(self, listen: str = "127.0.0.2:0", ledger: str | Path | None = None, tempfail_rate: float = 0.0,
                 status_interval: float = 0.2, log: str | Path | None = None) -> None:
        self.listen = listen
        self.ledger = str(ledger) if ledger else None
        self.tempfail_rate = tempfail_rate
        self.status_interval = status_interval
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.host, self.port = split_addr(listen)
        self.latest: dict[str, Any] = {}
        self.final: dict[str, Any] | None = None
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    @property
    def addr(self) -> str:
        return join_addr(self.host, self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def start(self, timeout: float = 15.0) -> SinkProcess:
        cmd = [sys.executable, "-m", "fastrelay.bench.sink", "--listen", self.listen,
               "--status-interval", str(self.status_interval)]
        if self.ledger:
            cmd += ["--ledger", self.ledger]
        if self.tempfail_rate:
            cmd += ["--tempfail-rate", str(self.tempfail_rate)]
        err = open(self.log, "ab") if self.log else subprocess.DEVNULL
        try:
            self.proc = track(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                               env=child_env(), cwd=ROOT, start_new_session=True))
        finally:
            if self.log:
                err.close()  # type: ignore[union-attr]
        first: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(first,), daemon=True)
        self._reader.start()
        try:
            line = first.get(timeout=timeout)
        except queue.Empty:
            line = None
        if not line or line.get("event") != "listening":
            self.kill()
            raise ToolError(f"the sink did not start on {self.listen}")
        self.port = int(line["port"])
        return self

    def _read(self, first: queue.Queue) -> None:
        told = False
        for raw in self.proc.stdout:  # type: ignore[union-attr]
            try:
                d = json.loads(raw)
            except ValueError:
                continue
            if not told:
                first.put(d)
                told = True
                continue
            with self._cond:
                if d.get("event") == "final":
                    self.final = d
                self.latest = d
                self._cond.notify_all()
        if not told:
            first.put(None)
        with self._cond:
            self._cond.notify_all()

    def snapshot(self, timeout: float = 5.0) -> dict[str, Any]:
        """Fresh counters (asks for a status line with SIGUSR1 and waits for it)."""
        t = time.monotonic()
        os.kill(self.pid, signal.SIGUSR1)
        with self._cond:
            ok = self._cond.wait_for(lambda: self.latest.get("now", 0) >= t or self.proc.poll() is not None,
                                     timeout)
        if not ok or self.proc.poll() is not None:
            raise ToolError("the sink stopped answering")
        return dict(self.latest)

    def wait_for(self, key: str, target: int, timeout: float) -> dict[str, Any]:
        """Wait until counter `key` reaches `target` (or the timeout); the latest counters."""
        _wait_counter(self, key, target, timeout)
        if self.proc.poll() is not None and self.final is None:
            raise ToolError(f"the sink {_how_it_ended(self.proc.returncode)}")
        return self.snapshot() if self.proc.poll() is None else dict(self.latest)

    def cpu(self) -> float | None:
        return proc_cpu_seconds(self.pid)

    def stop(self, timeout: float = 15.0) -> dict[str, Any] | None:
        """SIGTERM, wait for the final status line; kill the group if it does not end."""
        if self.proc is None:
            return self.final
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        end_group(self.proc)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return self.final

    def kill(self) -> None:
        if self.proc is not None:
            end_group(self.proc)

    def __enter__(self) -> SinkProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def find_postfix_tools(path: str | None = None) -> tuple[str, str] | None:
    """(smtp-source, smtp-sink) found on `path` (default: $PATH plus the sbin directories), or None."""
    if path is None:
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    src, sink = shutil.which("smtp-source", path=path), shutil.which("smtp-sink", path=path)
    return (src, sink) if src and sink else None


class PostfixSink:
    """Postfix's smtp-sink with -c (running counters 'sess=N quit=N mesg=N', CR-separated).

    Its output goes to a file that a thread reads every 20 ms: a pipe read per message would make
    this process the bottleneck (it is woken for every counter update). It counts messages, not
    recipients; `last` is when the count was last seen to change (to within the 20 ms).
    """

    kind = "postfix"
    POLL = 0.02

    def __init__(self, binary: str, listen: str, workdir: str | Path) -> None:
        self.binary = binary
        self.host, self.port = split_addr(listen)
        if self.port == 0:
            self.port = free_port(self.host)
        self.out = Path(workdir) / "smtp-sink.out"
        self.err = Path(workdir) / "smtp-sink.err"
        self.proc: subprocess.Popen | None = None
        self.latest: dict[str, Any] = {"messages": 0, "rcpts": 0, "last": 0.0, "first": 0.0}
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def addr(self) -> str:
        return join_addr(self.host, self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def start(self) -> PostfixSink:
        cmd = [self.binary, "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # it refuses to run as root without a user to switch to
        cmd += ["-m", "1024", self.addr, "1024"]
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = track(subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                               start_new_session=True))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            wait_listening(self.host, self.port, self.proc)
        except ToolError as e:
            self.kill()
            err_lines = self.err.read_text(errors="replace").strip().splitlines()
            raise ToolError(f"smtp-sink: {e}" + (f": {err_lines[-1]}" if err_lines else "")) from None
        return self

    def _read(self) -> None:
        with open(self.out, "rb") as f:
            tail = b""
            while True:
                stopping = self._stop.is_set()
                chunk = f.read()
                if chunk:
                    tail = (tail + chunk)[-256:]  # only the newest counter line matters
                    found = re.findall(rb"mesg=(\d+)", tail)
                    n = int(found[-1]) if found else 0
                    with self._cond:
                        if n != self.latest["messages"]:
                            now = time.monotonic()
                            self.latest = {"messages": n, "rcpts": n, "last": now,
                                           "first": self.latest["first"] or now, "now": now}
                            self._cond.notify_all()
                if stopping:
                    break
                self._stop.wait(self.POLL)
        with self._cond:
            self._cond.notify_all()

    def snapshot(self, timeout: float = 0.0) -> dict[str, Any]:
        with self._cond:
            return dict(self.latest, now=time.monotonic())

    def wait_for(self, key: str, target: int, timeout: float) -> dict[str, Any]:
        _wait_counter(self, key, target, timeout)
        if self.proc.poll() is not None:
            raise ToolError(f"smtp-sink {_how_it_ended(self.proc.returncode)}")
        return self.snapshot()

    def cpu(self) -> float | None:
        return proc_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc is not None:
            end_group(self.proc, signal.SIGTERM)
        self._stop.set()
        if self._reader is not None:
            self._reader.join(timeout=5)

    kill = stop

    def __enter__(self) -> PostfixSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def relay_conf(route_host: str, route_port: int, *, listen: str = "127.0.0.1:0", fsync: bool = True,
               retry: str = "1s", host_failure_retry: str = "1s", extra: list[str] | tuple[str, ...] = ()) -> str:
    """A fastrelay conf that relays everything to one SMTP next hop on loopback, with the intake
    limits raised so that a benchmark's load is never refused."""
    lines = [
        'Spool_Base = "spool"',
        'Mainlog = "mainlog"',
        'Hostname = "relay.bench"',
        f"spool_fsync = {'1' if fsync else '0'}",
        # The default forbids loopback next hops (docs/reliability.md case 46); the sink is on loopback.
        'Prohibited_Hosts = ( "0.0.0.0/8" )',
        f'Routes = ( "smtp://{route_host}?port={route_port}" )',
        "TLS = disabled",
        f"retry_interval = {retry}",
        f"max_retry_interval = {retry}",
        f"host_failure_retry = {host_failure_retry}",
        "Connect_Timeout = 5s",
        "Listener_Sessions = 100000",
        "max_connections_per_ip = 100000",
        "max_messages_per_connection = 10000000",
        "junk_command_limit = 1000000",
        *extra,
        f'ESMTP_Listener {{ Listen "{listen}" {{ }} }}',
    ]
    return "\n".join(lines) + "\n"


_READY = re.compile(r" ready .*smtp on (?:\[[^\]]+\]|[\d.]+):(\d+)")
# Logged once per start by the relay, and with Workers > 1 once by each worker for its shard.
_RECOVERED = re.compile(r"recovered (\d+) queued messages")


class RelayProcess:
    """`python -m fastrelay run -c CONF` in its own process group; its log goes to a file, which is
    read for the ready line (no pipe that a chatty relay could fill and block on)."""

    def __init__(self, workdir: str | Path, conf: str, env: dict[str, str] | None = None) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "relay.conf"
        self.conf.write_text(conf)
        self.logfile = self.dir / "relay.log"
        self.env = env if env is not None else child_env()
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.t_start = 0.0  # time.monotonic() just before the process was started
        self.t_ready = 0.0  # ... when the ready line was seen
        self.t_recovered = 0.0  # ... when "recovered N queued messages" was seen (0: not logged)
        self.recovered = 0
        self.starts = 0

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0, poll: float = 0.01) -> RelayProcess:
        offset = self.logfile.stat().st_size if self.logfile.exists() else 0
        self.t_recovered, self.recovered = 0.0, 0
        with open(self.logfile, "ab") as log:
            self.t_start = time.monotonic()
            self.proc = track(subprocess.Popen(
                [sys.executable, "-m", "fastrelay", "run", "--quiet-messages", "-c", str(self.conf)],
                cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                start_new_session=True,
            ))
        self.starts += 1
        deadline = self.t_start + timeout
        pending = ""
        with open(self.logfile, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            while True:
                chunk = f.read()
                now = time.monotonic()
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split("\n")
                    for line in lines:
                        m = _RECOVERED.search(line)
                        if m:  # summed over the workers; the time is the last one's
                            self.t_recovered, self.recovered = now, self.recovered + int(m.group(1))
                        m = _READY.search(line)
                        if m:
                            self.t_ready, self.port = now, int(m.group(1))
                            return self
                if self.proc.poll() is not None:
                    raise ToolError(f"the relay did not start (exit status {self.proc.returncode}): "
                                    f"{self.last_log_line(offset)}")
                if now > deadline:
                    self.kill()
                    raise ToolError(f"the relay was not ready after {timeout:g} s: {self.last_log_line(offset)}")
                time.sleep(poll)

    def last_log_line(self, offset: int = 0) -> str:
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                f.seek(offset)
                lines = [ln.strip() for ln in f if ln.strip()]
        except OSError:
            return "(no log)"
        errors = [ln for ln in lines if " ERROR " in ln or "error" in ln.lower()]
        return (errors or lines or ["(nothing logged)"])[-1]

    def cpu(self) -> float | None:
        """CPU seconds of the relay: with Workers > 1, the supervisor's plus its live workers'."""
        return tree_sum(self.pid, proc_cpu_seconds)

    def peak_rss_kb(self) -> int | None:
        """Peak RSS summed over the relay's processes (each process's own peak)."""
        v = tree_sum(self.pid, lambda p: proc_status_kb(p, "VmHWM"))
        return None if v is None else int(v)

    def rss_kb(self) -> int | None:
        v = tree_sum(self.pid, lambda p: proc_status_kb(p, "VmRSS"))
        return None if v is None else int(v)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (a clean stop); SIGKILL to the group if it takes longer than `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        rc = self.proc.poll()
        end_group(self.proc)
        return rc

    def kill(self) -> None:
        """kill -9 of the whole process group (the chaos test's crash)."""
        if self.proc is not None:
            end_group(self.proc, signal.SIGKILL)

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def fastrelay_version(env: dict[str, str]) -> tuple[str, str, str]:
    """(line, version, implementation) from `fastrelay --version` run with `env`."""
    try:
        out = subprocess.run([sys.executable, "-m", "fastrelay", "--version"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ToolError(f"fastrelay --version failed: {e}") from None
    line = (out.stdout or out.stderr).strip()
    m = re.match(r"fastrelay (\S+) \((\w+) hot paths\)", line)
    if out.returncode != 0 or not m:
        raise ToolError(f"fastrelay --version failed: {line.splitlines()[-1] if line else out.returncode}")
    return line, m.group(1), m.group(2)
