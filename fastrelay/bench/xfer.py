"""XFER throughput between two fastrelay nodes: transfers/s from node A to node B (4 KB default).

`python -m fastrelay.bench.xfer [--messages N] [--size S] [--concurrency C] [--connections K] [--json FILE]`

Node A accepts the load over SMTP and routes every message (domain example.com) to the synthetic
domain xfer.test, whose Delivery_Method is delay_xfer to node B (seeds 000/001); B spools each
transfer and delivers it to a counting sink. Both nodes run with spool fsync on, in their own
processes. Reported: accepted/s at A, transferred/s (A's first reception to its last X record,
i.e. B's durable 200s), delivered/s at B's sink, and each node's CPU per message.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fastrelay.bench.client import LoadSpec, run_load
from fastrelay.bench.procs import RelayProcess, SinkProcess, end_all, free_port, proc_cpu_seconds

SECRET = "bench-xfer-secret"


def node_b(http_port: int, sink: str) -> str:
    return "\n".join([
        'Spool_Base = "spool"', 'Mainlog = "mainlog"', 'Hostname = "b.bench"',
        'Prohibited_Hosts = ( "0.0.0.0/8" )', "TLS = disabled",
        f'Routes = ( "smtp://{sink}" )',
        'scriptlet "scriptlet" { script xfer_server { source = "msys.xfer.server" } }',
        f'HTTP_Listener {{ Listen "127.0.0.1:{http_port}" {{}} }}',
        f'xfer_secret = "{SECRET}"',
        'ESMTP_Listener { Listen "127.0.0.1:0" { } }',
    ]) + "\n"


def node_a(http_port: int, connections: int) -> str:
    return "\n".join([
        'Spool_Base = "spool"', 'Mainlog = "mainlog"', 'Hostname = "a.bench"',
        'Prohibited_Hosts = ( "0.0.0.0/8" )',
        "Listener_Sessions = 100000", "max_connections_per_ip = 100000", "max_messages_per_connection = 10000000",
        'scriptlet "scriptlet" { script xfer_client { source = "msys.xfer.client" } }',
        'Domain xfer.test {',
        '  reroute_domain = "disabled"', '  delayed_reroute_domain = "disabled"',
        '  Delivery_Method = "delay_xfer"', '  Delivery_Response_Timeout = "10000"',
        '  host_failure_retry = 1', '  max_retry_interval = 2', '  teleport_enabled = 1',
        f'  Routes = ( "xfer://127.0.0.1?port={http_port}" )',
        '  HTTP_URI = "/delay_message"', '  HTTP_METHOD = "POST"', '  HTTP_HOST = "localhost"',
        f'  xfer_secret = "{SECRET}"', f"  max_outbound_connections = {connections}",
        '}',
        'Domain example.com { reroute_domain = "xfer.test" }',
        'ESMTP_Listener { Listen "127.0.0.1:0" { } }',
    ]) + "\n"


def _records(mainlog: Path, kind: str) -> list[float]:
    if not mainlog.exists():
        return []
    out = []
    for line in mainlog.read_text(errors="replace").splitlines():
        f = line.split("\t")
        if len(f) > 1 and f[1] == kind:
            out.append(float(f[0]))
    return out


def run(messages: int, size: int, concurrency: int, connections: int, timeout: float = 300.0) -> dict:
    with tempfile.TemporaryDirectory(prefix="fastrelay-xfer-bench-") as tmp:
        root = Path(tmp)
        sink = SinkProcess("127.0.0.3:0").start()
        http = free_port("127.0.0.1")
        b = RelayProcess(root / "b", node_b(http, sink.addr)).start()
        a = RelayProcess(root / "a", node_a(http, connections)).start()
        try:
            cpu_a0, cpu_b0 = proc_cpu_seconds(a.pid) or 0.0, proc_cpu_seconds(b.pid) or 0.0
            load = run_load(LoadSpec(port=a.port, messages=messages, size=size, concurrency=concurrency,
                                     reuse=True, domain="example.com"))
            sink.wait_for("messages", load.accepted, timeout)
            t_done = time.monotonic()
            cpu_a = (proc_cpu_seconds(a.pid) or 0.0) - cpu_a0
            cpu_b = (proc_cpu_seconds(b.pid) or 0.0) - cpu_b0
            a.stop()
            b.stop()
            r = _records(root / "a" / "mainlog", "R")
            x = _records(root / "a" / "mainlog", "X")
            assert len(x) == load.accepted, f"{len(x)} transfers for {load.accepted} accepted"
            span = max(x) - min(r)
            return {
                "messages": messages, "size": size, "client_connections": concurrency,
                "xfer_connections": connections, "accepted": load.accepted,
                "accepted_per_s": round(load.accepted / load.elapsed),
                "transferred_per_s": round(len(x) / span),
                "delivered_per_s": round(load.accepted / (t_done - load.start)),
                "node_a_cpu_ms_per_msg": round(1000 * cpu_a / load.accepted, 3),
                "node_b_cpu_ms_per_msg": round(1000 * cpu_b / load.accepted, 3),
            }
        finally:
            a.kill()
            b.kill()
            sink.stop()
            end_all()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastrelay.bench.xfer", description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=10000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--concurrency", type=int, default=20, help="SMTP client connections into node A")
    p.add_argument("--connections", type=int, default=20, help="XFER connections from A to B")
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)
    try:
        res = run(args.messages, args.size, args.concurrency, args.connections)
    except Exception as e:  # one clear line, the tool's contract
        print(f"fastrelay.bench.xfer: failed: {e}", file=sys.stderr)
        return 1
    for k, v in res.items():
        print(f"{k:24} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
