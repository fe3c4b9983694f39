"""End-to-end throughput: drive a load through fastrelay (or other relays) into a sink, beside the ceiling."""

# docs/performance.md's method: the same client and sink for every setup, in the same run, and the relay's
# delivered/s as a share of the "ceiling" (client straight into the sink). One sink process serves
# the whole session; each measurement takes the difference of its counters, so it never restarts
# between setups. fastrelay gets a fresh temp dir (spool) per run: a spool that grows over the
# runs would make later runs slower for reasons that are not the load.
#
# Times: the client stamps the load's start and end with time.monotonic(), the sink stamps each
# delivery with it too; on Linux that is CLOCK_MONOTONIC, one clock for all processes, so
# "delivered/s" = delivered / (last delivery - start of the load) needs no clock sync.

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastrelay.bench.client import LoadSpec, percentile_ms, run_load_procs
from fastrelay.bench.procs import (
    PostfixSink,
    RelayProcess,
    SinkProcess,
    ToolError,
    child_env,
    end_all,
    end_group,
    fastrelay_version,
    find_postfix_tools,
    join_addr,
    relay_conf,
    split_addr,
    track,
)

TOOLS_PATH_ENV = "FASTRELAY_BENCH_TOOLS_PATH"

# Per-run numbers that get a median and a range over --runs.
METRICS = ("accepted_per_s", "delivered_per_s", "latency_p50_ms", "latency_p99_ms", "relay_cpu_s",
           "relay_cpu_ms_per_msg", "relay_peak_rss_mb", "client_cpu_s", "sink_cpu_s", "load_s", "delivery_s")


@dataclass
class Setup:
    name: str
    addr: str | None  # a relay that is already running; None: start fastrelay
    runs: list[dict[str, Any]] = field(default_factory=list)
    bound: bool = False  # the tool relay (--bound): the load into the sink, a second pair beside it

    @property
    def managed(self) -> bool:
        return self.addr is None and not self.bound


# --bound: what a relay as cheap as Postfix's own test tools would reach on this machine. A relay's
# inbound side does what smtp-sink does for the client's load (a new connection per message, if the
# load has that), its outbound side what smtp-source -d does into the next hop (a connection it
# keeps). So the load runs into the sink as for the ceiling while a second smtp-source -d sends the
# same messages into a second smtp-sink, both pairs at once on the same cores: no spool, no fsync,
# no routing, nothing but the protocol in C. Its "% of ceiling" is the most any relay could get
# here; a goal above it cannot be met on this machine, one near it needs a relay as cheap as these.
BOUND = "tool relay (bound)"


class Progress:
    """A one-line text bar with rate on stderr, redrawn by a thread; a no-op when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, label: str, total: int, count: Any, noun: str = "sent") -> None:
        """Show `count()` of `total` until stop(); the rate counts from now."""
        if not self.enabled:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._draw, args=(label, total, count, noun), daemon=True)
        self._thread.start()

    def _draw(self, label: str, total: int, count: Any, noun: str) -> None:
        t0, n0 = time.monotonic(), count()
        width = 30
        while not self._stop.wait(0.25):
            n = count()
            frac = min(1.0, n / total) if total else 1.0
            bar = "#" * int(frac * width) + "." * (width - int(frac * width))
            rate = (n - n0) / max(time.monotonic() - t0, 1e-9)
            sys.stderr.write(f"\r{label:<18} [{bar}] {n:,}/{total:,} {noun}, {rate:,.0f}/s   ")
            sys.stderr.flush()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


def machine_info(version_line: str, version: str, impl: str) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    return {
        "nproc": nproc, "cpu_model": model or platform.processor(), "python": platform.python_version(),
        "kernel": platform.release(), "fastrelay_version": version, "fastrelay_impl": impl,
        "fastrelay_version_line": version_line, "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def command_line() -> str:
    """This process's command line as typed (from /proc; sys.argv loses `-m module`)."""
    try:
        parts = Path("/proc/self/cmdline").read_bytes().split(b"\0")
        return shlex.join(p.decode(errors="replace") for p in parts if p)
    except OSError:
        return shlex.join(sys.argv)


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {"median": {}, "min": {}, "max": {}}
    for m in METRICS:
        vals = [r[m] for r in runs if r.get(m) is not None]
        out["median"][m] = round(statistics.median(vals), 3) if vals else None
        out["min"][m] = round(min(vals), 3) if vals else None
        out["max"][m] = round(max(vals), 3) if vals else None
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.progress = Progress(args.progress if args.progress is not None else sys.stderr.isatty())
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.workdir = Path()
        self.sink: SinkProcess | PostfixSink | None = None
        self.sink2: PostfixSink | None = None  # --bound: the outbound side's next hop
        self.tools: tuple[str, str] | None = None
        self.env = child_env()
        if args.impl == "python":
            self.env = child_env({"FASTRELAY_NO_EXTENSIONS": "1"})
        elif args.impl == "cython":
            self.env = child_env({"FASTRELAY_REQUIRE_EXTENSIONS": "1"}, drop=("FASTRELAY_NO_EXTENSIONS",))

    # --- the session -----------------------------------------------------------------------------
    def run(self) -> int:
        a = self.a
        if a.tools == "postfix":
            path = a.tools_path if a.tools_path is not None else os.environ.get(TOOLS_PATH_ENV)
            self.tools = find_postfix_tools(path)
            if self.tools is None:
                where = path if path is not None else "$PATH:/usr/sbin:/usr/local/sbin:/sbin"
                raise ToolError(f"--tools postfix: smtp-source and smtp-sink not found in {where}"
                                " (Debian/Ubuntu: apt-get install postfix; they run without starting Postfix)")
        if a.bound and a.tools != "postfix":
            raise ToolError("--bound needs --tools postfix: it measures a relay made of smtp-source and smtp-sink")
        if (a.target or a.compare) and split_addr(a.sink_listen)[1] == 0:
            raise ToolError("with --target/--compare, give --sink-listen ADDR:PORT with a fixed port: "
                            "the other relays must be set up to deliver there")
        line, version, impl = fastrelay_version(self.env)
        started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        machine = machine_info(line, version, impl)
        self.workdir = Path(tempfile.mkdtemp(prefix="fastrelay-bench-"))
        setups: list[Setup] = []
        try:
            self._start_sink()
            setups = self._setups()
            for k in range(a.runs):
                for s in setups:
                    s.runs.append(self._one(s, k))
        finally:
            self.progress.stop()
            for sink in (self.sink, self.sink2):
                if sink is not None:
                    sink.stop()
            if a.keep:
                print(f"kept {self.workdir}", file=sys.stderr)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
        report = self._report(setups, machine, started)
        self._print_table(report)
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        if self.failures:
            print(f"bench: {self.failures[0]}" + (f" (and {len(self.failures) - 1} more failures)"
                                                  if len(self.failures) > 1 else ""), file=sys.stderr)
            return 1
        return 0

    def _start_sink(self) -> None:
        a = self.a
        if self.tools:
            self.sink = PostfixSink(self.tools[1], a.sink_listen, self.workdir).start()
            if a.bound:
                (self.workdir / "bound").mkdir()
                self.sink2 = PostfixSink(self.tools[1], "127.0.0.3:0", self.workdir / "bound").start()
        else:
            self.sink = SinkProcess(a.sink_listen, status_interval=0.2, log=self.workdir / "sink.log").start()

    def _setups(self) -> list[Setup]:
        a = self.a
        out = [] if a.no_ceiling else [Setup("ceiling", self.sink.addr)]  # type: ignore[union-attr]
        if a.bound:
            out.append(Setup(BOUND, self.sink.addr, bound=True))  # type: ignore[union-attr]
        if a.target:
            out.append(Setup(f"target {a.target}", a.target))
            self.notes.append("relay CPU and RSS are measured only for a fastrelay this tool starts")
        else:
            out.append(Setup("fastrelay", None))
        for c in a.compare:
            out.append(Setup(f"compare {c}", c))
        if a.compare and not a.target:
            self.notes.append("relay CPU and RSS are measured only for a fastrelay this tool starts")
        return out

    # --- one measurement -------------------------------------------------------------------------
    def _one(self, setup: Setup, k: int) -> dict[str, Any]:
        a = self.a
        label = f"{setup.name} {k + 1}/{a.runs}"
        relay: RelayProcess | None = None
        r: dict[str, Any] = {"run": k + 1}
        try:
            if setup.managed:
                shost, sport = self.sink.host, self.sink.port  # type: ignore[union-attr]
                extra = list(a.relay_option) + ([] if a.fsync else ["spool_fsync = 0"])
                conf = relay_conf(shost, sport, extra=extra)
                relay = RelayProcess(self.workdir / f"fastrelay-{k + 1}", conf, self.env).start()
                host, port = "127.0.0.1", relay.port
                cpu0 = relay.cpu() or 0.0
            else:
                host, port = split_addr(setup.addr or "")
            r["target"] = join_addr(host, port)
            sink_cpu0 = self.sink.cpu() or 0.0  # type: ignore[union-attr]
            base = self.sink.snapshot()  # type: ignore[union-attr]
            sink2 = self.sink2 if setup.bound else None
            if sink2 is not None:
                sink_cpu0 += sink2.cpu() or 0.0
                base2 = sink2.snapshot().get("messages", 0)
            load = self._drive_postfix(host, port, label, sink2) if self.tools else self._drive_own(host, port, label)
            r.update({k2: v for k2, v in load.items() if not k2.startswith("_")})
            # Our sink counts recipients, smtp-sink only messages.
            key = "rcpts" if not self.tools else "messages"
            want = load["_units"]
            sent_base = base.get(key, 0)
            self.progress.start(label, want, lambda: self.sink.latest.get(key, 0) - sent_base,  # type: ignore[union-attr]
                                "delivered" if key == "messages" else "recipients delivered")
            try:
                snap = self.sink.wait_for(key, sent_base + want, a.timeout)  # type: ignore[union-attr]
            finally:
                self.progress.stop()
            got = snap.get(key, 0) - sent_base
            last = snap.get("last") or time.monotonic()
            sink_cpu1 = self.sink.cpu() or 0.0  # type: ignore[union-attr]
            if sink2 is not None:
                # The tool relay has delivered a message once both of its sides have.
                snap2 = sink2.wait_for("messages", base2 + want, a.timeout)
                got = min(got, snap2.get("messages", 0) - base2)
                last = max(last, snap2.get("last") or time.monotonic())
                sink_cpu1 += sink2.cpu() or 0.0
            per = max(1, a.rcpts) if key == "rcpts" else 1
            r["delivered"] = got // per
            start = load["_start"]
            r["delivery_s"] = round(max(last - start, 1e-9), 4)
            r["delivered_per_s"] = round(r["delivered"] / r["delivery_s"], 1) if r["delivered"] else 0.0
            r["sink_cpu_s"] = round(sink_cpu1 - sink_cpu0, 3)
            if relay is not None:
                r["relay_cpu_s"] = round((relay.cpu() or 0.0) - cpu0, 3)
                r["relay_cpu_ms_per_msg"] = round(1000 * r["relay_cpu_s"] / r["accepted"], 3) if r["accepted"] else None
                hwm = relay.peak_rss_kb()
                r["relay_peak_rss_mb"] = round(hwm / 1024, 1) if hwm else None
            else:
                r["relay_cpu_s"] = r["relay_cpu_ms_per_msg"] = r["relay_peak_rss_mb"] = None
            if r["accepted"] < a.messages:
                err = f" (first error: {load['_error']})" if load.get("_error") else ""
                self.failures.append(f"{label}: {a.messages - r['accepted']} of {a.messages} messages "
                                     f"were not accepted{err}")
            if got < want:
                self.failures.append(f"{label}: only {r['delivered']} of {r['accepted']} accepted messages "
                                     f"were delivered within {a.timeout:g} s")
            if relay is not None:
                rc = relay.stop()
                relay = None
                if rc != 0:
                    self.failures.append(f"{label}: the relay exited with status {rc} on SIGTERM")
            return r
        finally:
            self.progress.stop()
            if relay is not None:
                relay.stop()

    def _drive_own(self, host: str, port: int, label: str) -> dict[str, Any]:
        a = self.a
        spec = LoadSpec(host=host, port=port, messages=a.messages, size=a.size, rcpts=a.rcpts,
                        concurrency=a.concurrency, reuse=a.reuse, pipelining=a.pipelining,
                        id_prefix=f"b{os.getpid()}-{int(time.time())}-", timeout=a.reply_timeout)
        progress = [0]
        self.progress.start(label, a.messages, lambda: progress[0])
        try:
            res = run_load_procs(spec, a.procs, progress)
        except RuntimeError as e:
            raise ToolError(f"{label}: the client failed: {e}") from None
        finally:
            self.progress.stop()
        lat = sorted(res.latencies)
        first_err = max(res.errors, key=res.errors.get) if res.errors else None
        return {
            "accepted": res.accepted, "rejected": res.rejected, "failed": res.failed + res.unknown,
            "load_s": round(res.elapsed, 4), "accepted_per_s": round(res.accepted_per_s, 1),
            "latency_p50_ms": _r3(percentile_ms(lat, 50)), "latency_p99_ms": _r3(percentile_ms(lat, 99)),
            "client_cpu_s": round(res.cpu_s, 3),
            "_units": res.rcpts_accepted, "_start": res.start, "_error": first_err,
        }

    def _source_cmd(self, host: str, port: int, reuse: bool) -> list[str]:
        a = self.a
        cmd = [self.tools[0], "-c", "-s", str(a.concurrency), "-m", str(a.messages), "-l", str(a.size),  # type: ignore[index]
               "-r", str(a.rcpts), "-f", "bench@example.com", "-t", "rcpt@example.com"]
        if reuse:
            cmd.append("-d")
        cmd.append(join_addr(host, port))
        return cmd

    def _drive_postfix(self, host: str, port: int, label: str, beside: PostfixSink | None = None) -> dict[str, Any]:
        """smtp-source with the load; `beside` (--bound): a second one at once, reusing its
        connections into that sink, as the tool relay's outbound side (its CPU counts as the
        client's)."""
        a = self.a
        # Its output goes to files, read only by the progress bar and at the end: a pipe would wake
        # this process for every message (-c prints a running count, CR-separated).
        out_path, err_path = self.workdir / "smtp-source.out", self.workdir / "smtp-source.err"
        bound_err = self.workdir / "bound" / "smtp-source.err"
        self.progress.start(label, a.messages, lambda: _last_count(out_path))
        procs: list[subprocess.Popen] = []
        cpu = 0.0
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                start = time.monotonic()
                procs.append(track(subprocess.Popen(self._source_cmd(host, port, a.reuse), stdout=out, stderr=err,
                                                    stdin=subprocess.DEVNULL, start_new_session=True)))
                if beside is not None:
                    with open(bound_err, "wb") as err2:
                        procs.append(track(subprocess.Popen(self._source_cmd(beside.host, beside.port, True),
                                                            stdout=subprocess.DEVNULL, stderr=err2,
                                                            stdin=subprocess.DEVNULL, start_new_session=True)))
            codes = []
            for k, proc in enumerate(procs):
                _, status, usage = os.wait4(proc.pid, 0)
                if k == 0:
                    end = time.monotonic()
                proc.returncode = os.waitstatus_to_exitcode(status)
                codes.append(proc.returncode)
                cpu += usage.ru_utime + usage.ru_stime
        finally:
            for proc in procs:
                end_group(proc)  # kills its group only if wait4 did not reap it (an interrupt)
            self.progress.stop()
        err_lines = err_path.read_text(errors="replace").strip().splitlines()
        # smtp-source stops at the first error (its messages are "fatal"), so a clean exit means
        # that every message was accepted; otherwise its running count says how far it got.
        accepted = a.messages if codes[0] == 0 else _last_count(out_path)
        if any(codes[1:]):
            last = bound_err.read_text(errors="replace").strip().splitlines()
            self.failures.append(f"{label}: the tool relay's outbound smtp-source exited with status {codes[1]}"
                                 + (f": {last[-1]}" if last else ""))
        elapsed = max(end - start, 1e-9)
        return {
            "accepted": accepted, "rejected": 0, "failed": a.messages - accepted,
            "load_s": round(elapsed, 4), "accepted_per_s": round(accepted / elapsed, 1),
            "latency_p50_ms": None, "latency_p99_ms": None,
            "client_cpu_s": round(cpu, 3),
            "_units": accepted, "_start": start,
            "_error": err_lines[-1] if err_lines else None,
        }

    # --- output ----------------------------------------------------------------------------------
    def _report(self, setups: list[Setup], machine: dict[str, Any], started: str) -> dict[str, Any]:
        a = self.a
        if self.tools:
            self.notes.insert(0, "latency percentiles are not available from smtp-source (it reports none)")
            self.notes.insert(1, "smtp-source sends HELO and does not pipeline; smtp-sink counts messages")
        if a.bound:
            self.notes.append(f"{BOUND}: the load into smtp-sink while smtp-source -d sends as many messages into "
                              "a second smtp-sink, at once; no relay runs: its % of ceiling is the most a relay "
                              "could reach here (client and sink CPU are both pairs')")
        if not a.fsync:
            self.notes.append("spool_fsync = 0: UNSAFE mode (a power loss may lose acknowledged mail)")
        out_setups = []

        def median_dps(name: str) -> float | None:
            ref = next((s for s in setups if s.name == name), None)
            return summarize(ref.runs)["median"]["delivered_per_s"] if ref and ref.runs else None

        ceil_dps, bound_dps = median_dps("ceiling"), median_dps(BOUND)
        for s in setups:
            summ = summarize(s.runs)
            dps = summ["median"]["delivered_per_s"]
            pct = round(100 * dps / ceil_dps, 1) if ceil_dps and dps is not None else None
            # The relays' delivered/s as a share of the most a relay could reach (the ceiling is no relay).
            of_bound = round(100 * dps / bound_dps, 1) if bound_dps and dps is not None and s.name != "ceiling" \
                else None
            out_setups.append({"name": s.name, "target": s.runs[0]["target"] if s.runs else s.addr,
                               "runs": s.runs, **summ, "pct_of_ceiling": pct, "pct_of_bound": of_bound})
        return {
            "tool": "fastrelay bench",
            "date": started,
            "command": command_line(),
            "argv": self.a.argv,
            "machine": machine,
            "load": {"messages": a.messages, "size": a.size, "rcpts": a.rcpts, "concurrency": a.concurrency,
                     "reuse": a.reuse, "pipelining": a.pipelining and not self.tools, "procs": a.procs,
                     "runs": a.runs, "tools": a.tools, "spool_fsync": a.fsync,
                     "relay_options": list(a.relay_option), "impl": machine["fastrelay_impl"]},
            "sink": self.sink.addr if self.sink else None,
            "setups": out_setups,
            "notes": self.notes,
            "ok": not self.failures,
            "failures": self.failures,
        }

    def _print_table(self, rep: dict[str, Any]) -> None:
        ld, m = rep["load"], rep["machine"]
        conn = "connection reuse" if ld["reuse"] else "new connection per message"
        mode = "EHLO+PIPELINING" if ld["pipelining"] else "HELO, one command at a time"
        runs = rep["load"]["runs"]
        tools = "smtp-source/smtp-sink" if ld["tools"] == "postfix" else "bench client/sink"
        print(f"fastrelay bench: {ld['messages']:,} messages of {ld['size']:,} bytes, {ld['rcpts']} rcpt(s), "
              f"{ld['concurrency']} connections, {conn}, {mode}, {tools}")
        print(f"{m['fastrelay_version_line']}; {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, "
              f"load average {m['loadavg_at_start'][0]}; "
              + (f"{runs} runs: median [min-max]" if runs > 1 else "1 run"))
        bound = any(s["pct_of_bound"] is not None for s in rep["setups"])
        cols = ["setup", "accepted/s", "delivered/s", "% ceiling", *(["% bound"] if bound else []), "p50 ms",
                "p99 ms", "relay CPU s", "CPU ms/msg", "peak RSS MB", "client CPU s", "sink CPU s"]
        rows = []
        for s in rep["setups"]:
            med, lo, hi = s["median"], s["min"], s["max"]

            def rng(key: str, med: dict = med, lo: dict = lo, hi: dict = hi) -> str:
                v = _fmt(med[key], 0)
                if runs > 1 and med[key] is not None:
                    v += f" [{_fmt(lo[key], 0)}-{_fmt(hi[key], 0)}]"
                return v

            pct = "" if s["pct_of_ceiling"] is None else f"{s['pct_of_ceiling']:.1f}%"
            of_bound = ([] if not bound else [""] if s["pct_of_bound"] is None else [f"{s['pct_of_bound']:.1f}%"])
            rows.append([s["name"], rng("accepted_per_s"), rng("delivered_per_s"), pct, *of_bound,
                         _fmt(med["latency_p50_ms"], 2), _fmt(med["latency_p99_ms"], 2),
                         _fmt(med["relay_cpu_s"], 2), _fmt(med["relay_cpu_ms_per_msg"], 3),
                         _fmt(med["relay_peak_rss_mb"], 1), _fmt(med["client_cpu_s"], 2), _fmt(med["sink_cpu_s"], 2)])
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        print()
        for r in [cols, *rows]:
            cells = [v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))]
            print("  ".join(cells))
        for n in rep["notes"]:
            print(f"note: {n}")
        for f in rep["failures"]:
            print(f"FAILED: {f}")


def _last_count(path: Path) -> int:
    """The newest running count in smtp-source -c output (numbers separated by CR)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64))
            nums = [p for p in f.read().replace(b"\n", b"\r").split(b"\r") if p.strip().isdigit()]
    except OSError:
        return 0
    return int(nums[-1]) if nums else 0


def _r3(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _fmt(v: float | None, digits: int) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastrelay bench",
        description="End-to-end throughput of fastrelay (or of other relays) against the client->sink ceiling.")
    g = p.add_argument_group("load")
    g.add_argument("--messages", type=int, default=20000, help="messages per run (default 20000)")
    g.add_argument("--size", type=int, default=4096, help="message size in bytes (default 4096)")
    g.add_argument("--rcpts", type=int, default=1, help="recipients per message (default 1)")
    g.add_argument("--concurrency", type=int, default=20, help="client connections at once (default 20)")
    g.add_argument("--reuse", action="store_true", help="send all of a connection's messages on it (smtp-source -d)")
    g.add_argument("--pipelining", action=argparse.BooleanOptionalAction, default=True,
                   help="EHLO + RFC 2920 pipelining (default), or HELO and one command at a time as smtp-source")
    g.add_argument("--procs", type=int, default=1, help="client processes (so the client is not the bottleneck)")
    g.add_argument("--runs", type=int, default=1, help="repeat; report the median and min-max")
    g.add_argument("--reply-timeout", type=float, default=60.0, help="client: seconds to wait for a reply")
    s = p.add_argument_group("what to measure")
    s.add_argument("--no-ceiling", action="store_true", help="skip the client->sink run without a relay")
    s.add_argument("--target", metavar="HOST:PORT", help="drive the relay already running there instead of "
                   "starting fastrelay (point it at --sink-listen)")
    s.add_argument("--compare", metavar="HOST:PORT", action="append", default=[],
                   help="also drive this relay (repeatable), side by side in the table")
    s.add_argument("--bound", action="store_true",
                   help="with --tools postfix: also measure a 'tool relay', the load into the sink while a second "
                   "smtp-source -d sends as many messages into a second smtp-sink at once: the most any relay "
                   "could deliver on this machine")
    s.add_argument("--sink-listen", default="127.0.0.2:0", metavar="ADDR:PORT",
                   help="where the sink listens (default 127.0.0.2, a free port)")
    s.add_argument("--tools", choices=["own", "postfix"], default="own",
                   help="own client/sink (default) or Postfix's smtp-source/smtp-sink")
    s.add_argument("--tools-path", help=f"where to look for smtp-source/smtp-sink (default: $PATH and the sbin "
                   f"directories; also ${TOOLS_PATH_ENV})")
    r = p.add_argument_group("the fastrelay under test")
    r.add_argument("--impl", choices=["cython", "python"], help="hot paths: python sets FASTRELAY_NO_EXTENSIONS=1 "
                   "(default: as the environment says)")
    r.add_argument("--no-fsync", dest="fsync", action="store_false", help="spool_fsync = 0 (unsafe; labelled)")
    r.add_argument("--relay-option", action="append", default=[], metavar="'NAME = VALUE'",
                   help="add a line to the relay's conf (repeatable), e.g. 'max_outbound_connections = 50'")
    r.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for delivery after the load")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write every number, the machine and the command line as JSON")
    o.add_argument("--keep", action="store_true", help="keep the temp dir (confs, spools, logs)")
    o.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`fastrelay bench ARGS` / `python -m fastrelay.bench.e2e ARGS`: 0 on success, 1 with one line on failure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        # `fastrelay bench -- ARGS`: fastrelay's REMAINDER argument keeps the "--" it was given.
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    args.argv = argv
    for name in ("messages", "size", "rcpts", "concurrency", "procs", "runs"):
        if getattr(args, name) < 1:
            print(f"bench: --{name} must be at least 1", file=sys.stderr)
            return 1
    # A SIGTERM to the tool ends it like Ctrl-C does: through the `finally`s that stop its children.
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return Bench(args).run()
    except ToolError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        end_all()
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
