"""One sender alone: ms a message over one smtplib session into a fresh relay, optionally beside
CPU hogs (what cpu_scheduling costs a lone sender when every core is busy; bench/RESULTS.md).

    python bench/lone_sender.py --messages 500 --option 'cpu_scheduling = inherit' --hogs 2
"""

from __future__ import annotations

import argparse
import smtplib
import subprocess
import sys
import tempfile
import time

from fastrelay.bench.procs import RelayProcess, ToolError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=500)
    p.add_argument("--option", action="append", default=[], metavar="'NAME = VALUE'",
                   help="a line for the relay's conf (repeatable)")
    p.add_argument("--hogs", type=int, default=0, help="busy-loop processes beside the relay")
    a = p.parse_args()
    conf = 'Spool_Base = "spool"\nsuspend_delivery = 1\n' + "".join(o + "\n" for o in a.option) \
        + 'ESMTP_Listener { Listen "127.0.0.1:0" { } }\n'
    with tempfile.TemporaryDirectory() as d:
        relay = RelayProcess(d, conf)
        hogs: list[subprocess.Popen] = []
        try:
            relay.start()
            hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(a.hogs)]
            body = "Subject: lone\r\n\r\n" + ("x" * 76 + "\r\n") * 52  # about 4 KB
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as c:
                t = time.perf_counter()
                for _ in range(a.messages):
                    c.sendmail("a@lone.test", ["b@lone.test"], body)
                took = time.perf_counter() - t
            print(f"{a.messages} messages, one session, {a.hogs} hogs, {a.option or 'defaults'}: "
                  f"{took / a.messages * 1000:.2f} ms a message")
            return 0
        except ToolError as e:
            print(f"lone_sender: {e}", file=sys.stderr)
            return 1
        finally:
            for h in hogs:
                h.kill()
                h.wait()
            relay.stop()


if __name__ == "__main__":
    sys.exit(main())
