"""Child process for tests/test_xfer_claims.py: one worker's side of the relay-wide XFER claims.

Usage:
  xfer_claims_child.py race BASE SHARD SHARDS KEYS GO_FILE
      claim keys 0..KEYS-1 as worker SHARD of SHARDS, key i at the time GO_FILE holds plus i * 5 ms
      (the other process claims it at the same moment); a claim won
      is marked done as "w<SHARD>-<i>"; one found pending elsewhere is tried again until it is done.
      Prints "won I" or "dup I MSGID" per key, then "end".
  xfer_claims_child.py store BASE SHARD SHARDS NODE ORIGIN
      store one transfer with store_once into shard SHARD's spool, as the relay does; prints
      "stored MSGID DUPLICATE". With FASTRELAY_CRASHPOINT=xfer_after_claim or xfer_before_done,
      fastrelay.crash ends the process inside it (status 137, as kill -9).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from fastrelay import shards
from fastrelay.message import Envelope, Recipient
from fastrelay.spool import Spool
from fastrelay.xfer.claims import ClaimTable, TransferInProgress

ROUND = 0.005  # seconds between two keys of a race


async def race(base: str, shard: int, n: int, keys: int, go: str) -> None:
    os.makedirs(base, exist_ok=True)
    t = ClaimTable(base, shard, n)
    await t.open()
    print("ready", flush=True)
    while not os.path.exists(go) or os.path.getsize(go) == 0:
        await asyncio.sleep(0.001)
    with open(go) as f:
        start = float(f.read())

    async def one(i: int) -> str:
        key = ("node-race", str(i))
        while True:
            try:
                dup = await t.claim(key)
            except TransferInProgress:
                await asyncio.sleep(0.002)
                continue
            if dup is not None:
                return f"dup {i} {dup}"
            await t.done(key, f"w{shard}-{i}")
            return f"won {i}"

    # Key i is claimed by both processes at the same wall-clock moment (start + i * ROUND): every
    # key is a real contest. (All keys at once, one process's first batch would take them all; one
    # after the other, the first to get ahead would stay ahead.)
    for i in range(keys):
        await asyncio.sleep(max(0.0, start + i * ROUND - time.time()))
        print(await one(i))
    print("end", flush=True)
    await t.close()


async def store(base: str, shard: int, n: int, node: str, origin: str) -> None:
    sp = Spool(shards.shard_dir(base, shard), min_free_bytes=1 << 20)
    await sp.open()
    sp.recover()
    t = ClaimTable(base, shard, n)
    await t.open()
    await t.import_shards([(k, shards.shard_dir(base, k)) for k in range(n)])
    await t.settle(sp.directory)
    items = [(Envelope("s@src.test", [Recipient("r@dst.test")], "dst.test"), b"Subject: x\r\n\r\nbody\r\n")]

    async def put() -> tuple[str, bool]:
        _entries, dup = await sp.add_once(items, (node, origin))
        return (dup, True) if dup is not None else (items[0][0].msgid, False)

    msgid, duplicate = await t.store_once((node, origin), put)
    print(f"stored {msgid} {duplicate}", flush=True)
    await sp.close()
    await t.close()


if __name__ == "__main__":
    mode, base = sys.argv[1], sys.argv[2]
    if mode == "race":
        asyncio.run(race(base, int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]))
    else:
        asyncio.run(store(base, int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]))
