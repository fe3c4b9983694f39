"""fastrelay.memtrim: freed heap memory goes back to the kernel (issue 13: a million queued
messages in under 1 GB), on this machine's glibc."""

from __future__ import annotations

import asyncio
import os

from fastrelay import memtrim


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_trim_hands_back_the_holes_between_live_objects():
    """The relay's pattern: kilobyte bodies from malloc interleaved with small objects that stay
    (queue items). Freeing the bodies leaves holes glibc's free() keeps; malloc_trim returns them."""
    assert memtrim.available(), "CI runs on Debian's glibc, which has malloc_trim"
    memtrim.trim()
    bodies, keep = [], []
    for i in range(20_000):
        bodies.append(bytes(8192) + i.to_bytes(4, "little"))  # distinct, from malloc (> 512 bytes)
        keep.append(bytearray(600))  # a survivor after each body: the top of the heap never frees
    before = _rss()
    del bodies
    after_free = _rss()
    memtrim.trim()
    after_trim = _rss()
    assert before - after_free < 50 * 2**20, "free() alone kept the holes (the behaviour trim is for)"
    assert after_free - after_trim > 100 * 2**20, (before, after_free, after_trim)  # of 160 MB
    del keep


async def test_run_trims_in_the_background_and_zero_turns_it_off():
    assert await memtrim.run(0) is None  # memory_trim_interval = 0: returns at once
    task = asyncio.ensure_future(memtrim.run(0.01))
    await asyncio.sleep(0.1)
    assert not task.done(), "it keeps running until cancelled"
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
