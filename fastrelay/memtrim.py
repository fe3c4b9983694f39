"""Give the heap memory the relay freed back to the kernel now and then, so RSS follows the queue.

Why: a relay under load allocates and frees message bodies (kilobytes each, from malloc) between
long-lived queue items (small objects that stay for as long as a message is deferred). glibc's
free() returns memory to the kernel only from the top of the heap, so after a burst the freed
holes between live items stay in RSS: with 100,000 deferred messages a worker held 1,280 bytes
of RSS per message, against about 620 for the same queue recovered into a fresh process (issue
13's goal is a million queued messages in under 1 GB). malloc_trim(0) hands back every whole
free page, wherever it lies (glibc >= 2.8, by madvise), in about 1-2 ms for a 100 MB heap. It runs
in a thread (ctypes drops the GIL), so the event loop does not wait for it.

Not glibc (musl, macOS): there is no malloc_trim, and nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger("fastrelay.memtrim")


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_TRIM = _malloc_trim()


def available() -> bool:
    return _TRIM is not None


def trim() -> bool:
    """One malloc_trim(0), here and now; True if the C library released memory."""
    return bool(_TRIM(0)) if _TRIM is not None else False


async def run(interval: float) -> None:
    """Trim every `interval` seconds until cancelled (memory_trim_interval; 0 never starts it)."""
    if _TRIM is None or interval <= 0:
        return
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        try:
            await loop.run_in_executor(None, _TRIM, 0)
        except RuntimeError:  # the executor is shutting down with the loop
            return
