"""Run asyncio peers on an event loop in a background thread, for tests whose main thread blocks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["InThread", "LoopThread"]

T = TypeVar("T")


class LoopThread:
    """A private event loop running forever in a daemon thread."""

    def __init__(self, name: str = "test-support-loop") -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, name=name, daemon=True)
        self.thread.start()
        ready.wait(10)

    def run(self, coro: Awaitable[T], timeout: float | None = 30.0) -> T:
        """Run a coroutine on the loop and block for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = 30.0) -> T:
        """Call a plain function on the loop thread (so it sees a consistent state) and return its result."""

        async def wrapper() -> T:
            return fn(*args)

        return self.run(wrapper(), timeout)

    def stop(self) -> None:
        if not self.loop.is_running():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_all(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class InThread:
    """Any peer with ``async start()``/``async stop()`` (Sink, FaultProxy), run in a LoopThread.

    Attribute reads and writes go to the peer (``ip.port``, ``ip.faults.set(...)``); these are
    plain Python objects, so a read from the main thread is safe under the GIL. For a consistent
    multi-field view use ``call(fn)``, which runs ``fn(peer)`` on the loop thread.
    """

    def __init__(self, factory: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "_factory", (factory, args, kwargs))
        object.__setattr__(self, "peer", None)
        object.__setattr__(self, "lt", None)

    def start(self) -> InThread:
        factory, args, kwargs = self._factory
        lt = LoopThread()
        object.__setattr__(self, "lt", lt)
        # Build the peer on the loop thread: some constructors look up the running loop.
        peer = lt.run(_build(factory, args, kwargs))
        object.__setattr__(self, "peer", peer)
        lt.run(peer.start())
        return self

    def stop(self) -> None:
        if self.lt is None:
            return
        try:
            if self.peer is not None:
                self.lt.run(self.peer.stop())
        finally:
            self.lt.stop()
            object.__setattr__(self, "lt", None)

    def call(self, fn: Callable[[Any], T]) -> T:
        return self.lt.call(fn, self.peer)

    def __getattr__(self, name: str) -> Any:
        peer = object.__getattribute__(self, "peer")
        if peer is None:
            raise AttributeError(f"{name}: the peer is not started")
        return getattr(peer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.peer, name, value)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _build(factory: Callable[..., T], args: tuple, kwargs: dict) -> T:
    return factory(*args, **kwargs)
