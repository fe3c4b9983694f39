"""One sender alone: ms a message over one smtplib session into a fresh relay, optionally beside
CPU hogs (what cpu_scheduling costs a lone sender when every core is busy; bench/RESULTS.md).

    python bench/lone_sender.py --messages 500 --option 'cpu_scheduling = inherit' --hogs 2
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=500)
    p.add_argument("--option", action="append", default=[], metavar="'NAME = VALUE'",
                   help="a line for the relay's conf (repeatable)")
    p.add_argument("--hogs", type=int, default=0, help="busy-loop processes beside the relay")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "relay.conf"
        conf.write_text('Spool_Base = "spool"\nsuspend_delivery = 1\n' + "".join(o + "\n" for o in a.option)
                        + 'ESMTP_Listener { Listen "127.0.0.1:0" { } }\n')
        relay = subprocess.Popen([sys.executable, "-m", "fastrelay", "run", "--quiet-messages", "-c", str(conf)],
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        hogs: list[subprocess.Popen] = []
        try:
            port = 0
            for line in relay.stderr:
                m = re.search(r" ready .*smtp on 127\.0\.0\.1:(\d+)", line)
                if m:
                    port = int(m.group(1))
                    break
            if not port:
                print("lone_sender: the relay did not start", file=sys.stderr)
                return 1
            hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(a.hogs)]
            body = "Subject: lone\r\n\r\n" + ("x" * 76 + "\r\n") * 52  # about 4 KB
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                t = time.perf_counter()
                for _ in range(a.messages):
                    c.sendmail("a@lone.test", ["b@lone.test"], body)
                took = time.perf_counter() - t
            print(f"{a.messages} messages, one session, {a.hogs} hogs, {a.option or 'defaults'}: "
                  f"{took / a.messages * 1000:.2f} ms a message")
            return 0
        finally:
            for h in hogs:
                h.kill()
                h.wait()
            if relay.poll() is None:
                os.killpg(relay.pid, signal.SIGTERM)
                relay.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
