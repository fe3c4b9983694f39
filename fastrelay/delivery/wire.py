"""Reply wire for the own SMTP and LMTP clients: bytes in, whole replies out, in step with the commands.

aiosmtplib cannot pipeline (RFC 2920): its read_response must be awaited once per command written,
and its data_received drops bytes once a reply is parsed. This asyncio Protocol instead counts the
replies still expected (`want`: 1 after a command, N after a pipelined group of N commands), hands
them out in order, and flags any reply nobody asked for (RELIABILITY.md case 44, "unsolicited").
Replies go through the framing hot path's ReplyParser (bounded memory: a hostile reply is a
`(-1, reason)`), looked up on `fastrelay._impl` at use so either implementation can be swapped in.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque

from fastrelay import _impl

__all__ = ["CONTROL", "TEXT_CAP", "Hostile", "Lost", "ReplyWire", "reply_text"]

# Remote reply text goes into logs and DSNs: no control characters, bounded (RELIABILITY.md case 26).
TEXT_CAP = 500

# What may never go out in a command argument (RELIABILITY.md case 22: no command injection).
CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class Lost(Exception):
    """The peer closed the connection."""


class Hostile(Exception):
    """A reply the parser refused (too long, too many lines, malformed), or reply data nobody asked
    for (`shifted`: the replies may be out of step with the commands)."""

    def __init__(self, reason: str, shifted: bool):
        super().__init__(reason)
        self.reason = reason
        self.shifted = shifted


def reply_text(lines: list[bytes]) -> str:
    """A multi-line reply as one line of text; decoded only as far as it will be kept (case 26)."""
    return b" ".join(lines)[: TEXT_CAP + 16].decode("utf-8", "replace")


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class ReplyWire(asyncio.Protocol):
    """Bytes in, whole replies out; holds no more replies than were asked for.

    `lines` and `tail` keep track of bytes the parser holds that are not part of a reply handed
    out yet: complete lines of an unfinished reply, and whether the last byte received ended a
    line. With every expected reply read, either one means the peer is out of step (`settled`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = _impl.ReplyParser()
        self.replies: deque[tuple[int, list[bytes]]] = deque()
        self.want = 1  # replies that may still arrive: the greeting first
        self.waiter: asyncio.Future | None = None
        self.drain_waiter: asyncio.Future | None = None
        self.paused = False
        self.lost = False
        self.bad: Hostile | None = None
        self.lines = 0  # complete lines received that belong to no complete reply yet
        self.tail = False  # the bytes received last did not end a line

    # -- asyncio callbacks -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.bad is not None:
            return
        parser = self.parser
        parser.feed(data)
        self.lines += data.count(b"\n")
        self.tail = data[-1] != 10  # LF
        replies = self.replies
        while (r := parser.next_reply()) is not None:
            if r[0] < 0:
                # Garbage where no reply was due is unsolicited too: out of step.
                reason = r[1][0].decode("ascii", "replace") if r[1] else "malformed"
                self._hostile(Hostile(reason, len(replies) >= self.want))
                break
            if len(replies) >= self.want:
                # No reply comes unasked: one per command (RFC 5321 §4.1.1), one per command of a
                # pipelined group (RFC 2920 §3.1), one per accepted recipient after an LMTP dot
                # (RFC 2033 §4.2). One more means the peer is out of step.
                self._hostile(Hostile("unsolicited reply", True))
                break
            self.lines -= len(r[1])
            replies.append(r)
        if replies:
            self._wake()

    def _hostile(self, e: Hostile) -> None:
        self.bad = e
        if self.transport is not None:
            self.transport.abort()  # stop reading a flood at once (case 44)
        self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- used by the clients ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.bad is not None:
            raise self.bad
        t = self.transport
        if self.lost or t is None or t.is_closing():
            raise Lost
        t.write(data)

    def send(self, data: bytes, n: int) -> None:
        """Write a group of `n` commands at once (RFC 2920; n=1 without PIPELINING) and expect `n`
        replies. Refused if anything arrived since the last expected reply (case 44)."""
        if self.lines or self.tail or self.replies:
            raise Hostile("unsolicited reply data", True)
        self.want = n
        self.write(data)

    async def read(self, timeout: float) -> tuple[int, list[bytes]]:
        """The next reply; TimeoutError, Lost or Hostile if none comes. Replies that arrived
        before a malformed one are handed out first (they were well-formed and in order)."""
        replies = self.replies
        if not replies:
            if self.bad is None and not self.lost:
                fut = self.waiter = self.loop.create_future()
                timer = self.loop.call_later(timeout, _expire, fut)
                try:
                    await fut
                finally:
                    timer.cancel()
                    self.waiter = None
            if not replies:
                if self.bad is not None:
                    raise self.bad
                raise Lost
        if self.bad is not None and self.bad.shifted:
            raise self.bad
        self.want -= 1
        return replies.popleft()

    async def command(self, line: bytes, timeout: float) -> tuple[int, list[bytes]]:
        self.want = 1
        self.write(line)
        return await self.read(timeout)

    def check(self) -> None:
        """Raise if something went wrong after the replies just read (e.g. one reply too many)."""
        if self.bad is not None:
            raise self.bad

    def settled(self) -> None:
        """After the last reply of a group: raise if anything else came, a whole reply or a part
        of one (the pipelined twin of aiosmtplib's non-empty buffer after a reply, case 44)."""
        if self.bad is not None:
            raise self.bad
        if self.lines or self.tail or self.replies:
            raise Hostile("unsolicited reply data", True)

    async def drain(self, timeout: float) -> None:
        """Wait until the body is written out; `timeout` without progress is a timeout (a server
        that stopped reading: data_timeout, "each block of the body")."""
        while self.paused:
            if self.lost:
                raise Lost
            fut = self.drain_waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, _expire, fut)
            try:
                await fut
            finally:
                timer.cancel()
                self.drain_waiter = None
        if self.lost:
            raise Lost

    def reset_parser(self) -> None:
        # RELIABILITY.md case 6 (STARTTLS injection): nothing read before TLS carries over.
        self.parser = _impl.ReplyParser()
        self.replies.clear()
        self.want = 0
        self.lines = 0
        self.tail = False

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
