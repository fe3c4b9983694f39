"""Child process for tests/test_spool_crash.py: add messages from many writers until killed.

Usage: spool_crash_child.py DIRECTORY WRITERS TAG [ITEMS_PER_ADD]
Prints "ready <node_id>" once the spool is open, "trying <sha256 of body>" (flushed) before each
add and "acked <id> <sha256 of body>" (flushed) after each add returns, i.e. once the message is
durable. Bodies are unique (TAG, writer, sequence) and of varied sizes. With FASTRELAY_CRASHPOINT
set, fastrelay.crash ends the process at that point.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys

import uvloop

from fastrelay.message import Envelope, Recipient
from fastrelay.spool import Spool


async def main(directory: str, writers: int, tag: str, per_add: int) -> None:
    sp = Spool(directory)
    await sp.open()
    out = sys.stdout
    out.write(f"ready {sp.node_id}\n")
    out.flush()

    async def writer(w: int) -> None:
        seq = 0
        while True:
            items = []
            for _ in range(per_add):
                seq += 1
                head = f"X-Test-Id: {tag}-{w}-{seq}\r\n\r\n".encode()
                data = head + os.urandom(200 + (seq * 997 + w * 131) % 20000)
                env = Envelope("sender@src.example", [Recipient(f"r{w}@dst.example")], "dst.example")
                items.append((env, data))
            for _, data in items:
                out.write(f"trying {hashlib.sha256(data).hexdigest()}\n")
            out.flush()
            entries = await sp.add(items)
            for e, (_, data) in zip(entries, items, strict=True):
                out.write(f"acked {e.id} {hashlib.sha256(data).hexdigest()}\n")
            out.flush()

    await asyncio.gather(*(writer(w) for w in range(writers)))


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 1))
