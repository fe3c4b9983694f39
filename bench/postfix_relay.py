"""Run a private Postfix 3.7 as a relay beside fastrelay, for `fastrelay bench --compare` (issue 13:
"each beside Postfix in the same run").

    python bench/postfix_relay.py --listen 127.0.0.5:2525 --relayhost 127.0.0.2:2526 &
    fastrelay bench --tools postfix --sink-listen 127.0.0.2:2526 --compare 127.0.0.5:2525

Postfix runs from the tree `.ci/peers` unpacks (tests/support/postfix.py: master, smtpd, qmgr and
smtp as root, its queue in /tmp), relaying for loopback to the bench's sink, its defaults
otherwise (default_destination_concurrency_limit 20, fsync per queue file). It stops on SIGTERM
or Ctrl-C and removes its queue.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.postfix import Postfix, missing


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.5:2525", help="where its smtpd listens")
    p.add_argument("--relayhost", required=True, help="HOST:PORT of the sink it relays everything to")
    args = p.parse_args()
    why = missing()
    if why:
        print(f"postfix_relay: {why}", file=sys.stderr)
        return 1
    host, _, port = args.listen.rpartition(":")
    rhost, _, rport = args.relayhost.rpartition(":")
    pf = Postfix(host, int(port), {
        "relayhost": f"[{rhost}]:{rport}",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "smtpd_recipient_restrictions": "permit_mynetworks, reject",
    })
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    pf.start()
    print(f"postfix relay ready on {args.listen}, relaying to {args.relayhost}", flush=True)
    try:
        done.wait()
    finally:
        pf.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
