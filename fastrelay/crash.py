"""Named crash points for durability tests: FASTRELAY_CRASHPOINT=<name> exits the process there.

docs/reliability.md recipe step 4. The check is one string comparison against a value read once at
import, so the points can stay on hot paths. Names in use are listed in POINTS.
"""

from __future__ import annotations

import os

POINTS = frozenset(
    {
        "spool_after_write",  # the transaction is written but not committed
        "spool_after_commit",  # committed, before any 250 is sent
        "after_remote_ok",  # the next hop said 250, before the recipient state is saved
        "between_recipient_updates",  # some recipients saved as delivered, not all
        "xfer_mid_post",  # part of an XFER request body sent
        "xfer_after_200",  # the XFER peer said 200, before the local copy is removed
        "mid_reschedule",  # a retry is being saved
        "xfer_after_claim",  # Workers > 1: an XFER key claimed relay-wide, before the shard's commit
        "xfer_before_done",  # the shard committed the transfer, before its claim is marked done
    }
)

_ARMED = os.environ.get("FASTRELAY_CRASHPOINT", "")


def crashpoint(name: str) -> None:
    """Exit at once with status 137 (as SIGKILL would) if this point is armed."""
    if _ARMED == name:
        os._exit(137)
