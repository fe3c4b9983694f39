"""Spool.add_once: a transfer's (origin node, origin id) is stored at most once, across restarts,
and after its shard was adopted."""

from __future__ import annotations

import asyncio
import os

from fastrelay import shards
from fastrelay.message import Envelope, Recipient
from fastrelay.spool import Spool


def item(tag: str) -> tuple[Envelope, bytes]:
    return Envelope("a@x.test", [Recipient(f"{tag}@y.test")], "y.test"), f"body {tag}\r\n".encode()


async def test_add_once_dedupes_and_survives_restart(tmp_path):
    sp = Spool(str(tmp_path / "s"))
    await sp.open()
    sp.recover()
    entries, dup = await sp.add_once([item("first")], ("node-a", "17"))
    assert dup is None and len(entries) == 1
    (env, _) = await sp.load(entries[0].id)
    first_msgid = env.msgid
    again, dup = await sp.add_once([item("again")], ("node-a", "17"))
    assert again == [] and dup == first_msgid
    other, dup = await sp.add_once([item("other")], ("node-b", "17"))  # another origin node
    assert dup is None and len(other) == 1
    await sp.close()
    sp = Spool(str(tmp_path / "s"))
    await sp.open()
    assert len(sp.recover()) == 2
    _, dup = await sp.add_once([item("after-restart")], ("node-a", "17"))
    assert dup == first_msgid
    await sp.close()


async def test_concurrent_resends_in_one_batch_store_once(tmp_path):
    sp = Spool(str(tmp_path / "s"))
    await sp.open()
    sp.recover()
    results = await asyncio.gather(*(sp.add_once([item(f"r{i}")], ("node-a", "9")) for i in range(10)))
    stored = [r for r in results if r[1] is None]
    dups = [r for r in results if r[1] is not None]
    assert len(stored) == 1 and len(dups) == 9
    assert {d[1] for d in dups} == {(await sp.load(stored[0][0][0].id))[0].msgid}
    assert len(sp.recover()) == 1
    await sp.close()


async def test_first_load_after_add_is_served_from_memory_then_from_disk(tmp_path):
    # A just-committed message is loaded once from memory (no reader-thread read); any later
    # load (after a retry was saved) comes from the database, which holds the same bytes.
    sp = Spool(str(tmp_path / "s"))
    await sp.open()
    sp.recover()
    (e,) = await sp.add([item("m")])
    env1, body1 = await sp.load(e.id)
    assert sp._recent == {}
    env1.attempts = 3
    await sp.reschedule(e.id, env1)
    env2, body2 = await sp.load(e.id)
    assert body2 == body1 and env2.attempts == 3 and env2 is not env1
    await sp.remove(e.id)
    assert await sp.load(e.id) is None
    await sp.close()


async def test_adopting_a_shard_keeps_its_keys(tmp_path):
    # The last run had 2 workers; shard 1 stored a transfer. Now one process adopts shard 1 (and
    # deletes it): a resend of that transfer is still a duplicate, with no second copy.
    base = str(tmp_path / "s")
    sp1 = Spool(shards.shard_dir(base, 1))
    await sp1.open()
    sp1.recover()
    (e,), _ = await sp1.add_once([item("first")], ("node-a", "17"))
    msgid = (await sp1.load(e.id))[0].msgid
    await sp1.add_once([item("other")], ("node-a", "18"))
    await sp1.close()
    sp0 = Spool(base)
    await sp0.open()
    sp0.recover()
    assert await shards.adopt(shards.shard_dir(base, 1), sp0) == 2
    assert not os.path.exists(shards.shard_dir(base, 1))
    assert await sp0.add_once([item("resend")], ("node-a", "17")) == ([], msgid)
    assert len(sp0.recover()) == 2
    assert [r[1:3] for r in await asyncio.to_thread(sp0.xfer_keys)] == [("node-a", "17"), ("node-a", "18")]
    await sp0.close()


async def test_adopted_keys_never_replace_the_adopters_own(tmp_path):
    base = str(tmp_path / "s")
    sp0 = Spool(base)
    await sp0.open()
    sp0.recover()
    await sp0.add_once([item("mine")], ("node-a", "17"))
    (mine,) = sp0.recover()
    msgid = (await sp0.load(mine.id))[0].msgid
    await sp0.add_xfer_keys([("node-a", "17", "OTHER.1", 1.0), ("node-a", "19", "X.1", 2.0)])
    assert await sp0.add_once([item("resend")], ("node-a", "17")) == ([], msgid)
    assert await sp0.add_once([item("resend")], ("node-a", "19")) == ([], "X.1")
    await sp0.close()
