"""A raw-socket SMTP/LMTP client for exact protocol tests: send bytes, read replies, never hang."""

from __future__ import annotations

import asyncio
import ssl
import time

__all__ = ["MalformedReply", "RawClient", "ServerClosed"]


class ServerClosed(ConnectionError):
    """The server closed (or reset) the connection before a complete reply."""


class MalformedReply(ValueError):
    """A reply line that is not ``DDD``, ``DDD text`` or ``DDD-text``, or mixes codes."""


class RawClient:
    """One connection. Every read has a deadline (``timeout``, default 5 s): a test never hangs.

    ``read_reply()`` returns ``(code, [text of each line])``: for ``250-a\\r\\n250 b\\r\\n`` it is
    ``(250, ["a", "b"])``. Bytes not yet consumed stay in ``buffer``.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float = 5.0,
                 max_line: int = 1 << 20) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.max_line = max_line
        self.buffer = bytearray()
        self.eof = False
        self.was_reset = False  # the close was an RST
        self.transcript: list[tuple[str, bytes]] = []  # ("C"|"S", bytes), for failure messages

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        local_addr: tuple[str, int] | None = None,
    ) -> RawClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context, local_addr=local_addr,
                                    server_hostname=server_hostname if ssl_context else None),
            timeout,
        )
        return cls(reader, writer, timeout)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- sending -----------------------------------------------------------------------------

    async def send(self, data: bytes | str) -> None:
        """Write bytes exactly as given (str is UTF-8 encoded; add your own CRLF)."""
        if isinstance(data, str):
            data = data.encode()
        self.transcript.append(("C", data))
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), self.timeout)

    async def command(self, line: str | bytes, timeout: float | None = None) -> tuple[int, list[str]]:
        """Send one command line (CRLF added) and read its reply."""
        if isinstance(line, str):
            line = line.encode()
        await self.send(line + b"\r\n")
        return await self.read_reply(timeout)

    # -- reading -----------------------------------------------------------------------------

    async def _fill(self, deadline: float) -> bool:
        """Read more into the buffer before ``deadline``; False at EOF. Raises TimeoutError."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no reply in time")
        try:
            chunk = await asyncio.wait_for(self.reader.read(65536), remaining)
        except (ConnectionResetError, BrokenPipeError):
            self.was_reset = True
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.transcript.append(("S", chunk))
        self.buffer += chunk
        return True

    async def read_line(self, timeout: float | None = None) -> bytes:
        """One line including its LF. Raises ServerClosed, TimeoutError, or MalformedReply when the
        line grows past ``max_line`` (so an endless line cannot eat memory)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            i = self.buffer.find(b"\n")
            if i >= self.max_line or (i < 0 and len(self.buffer) > self.max_line):
                raise MalformedReply(f"reply line longer than {self.max_line} bytes")
            if i >= 0:
                line = bytes(self.buffer[: i + 1])
                del self.buffer[: i + 1]
                return line
            if not await self._fill(deadline):
                raise ServerClosed(f"server closed; unterminated bytes: {bytes(self.buffer[:200])!r}")

    async def read_reply(self, timeout: float | None = None, max_lines: int = 1000) -> tuple[int, list[str]]:
        """Read one (possibly multi-line) reply. The timeout covers the whole reply."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        code: int | None = None
        texts: list[str] = []
        for _ in range(max_lines):
            raw = await self.read_line(max(0.0, deadline - time.monotonic()))
            line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
                raise MalformedReply(f"not a reply line: {line[:200]!r}")
            this = int(line[:3])
            if code is not None and this != code:
                raise MalformedReply(f"code changed inside a reply: {code} then {this}")
            code = this
            texts.append(line[4:])
            if len(line) == 3 or line[3] == " ":
                return code, texts
        raise MalformedReply(f"more than {max_lines} continuation lines")

    async def expect(self, code: int, timeout: float | None = None) -> list[str]:
        """Read a reply and assert its code; returns the text lines."""
        got, lines = await self.read_reply(timeout)
        assert got == code, f"expected {code}, got {got} {lines!r}"
        return lines

    async def closed(self, timeout: float = 2.0) -> bool:
        """Did the server close the connection within ``timeout``? Data that arrives meanwhile
        is kept in ``buffer``."""
        deadline = time.monotonic() + timeout
        try:
            while await self._fill(deadline):
                pass
        except TimeoutError:
            return False
        return True

    # -- TLS and teardown ----------------------------------------------------------------------

    async def starttls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None) -> None:
        """Upgrade after a 220 to STARTTLS. Unread plaintext is discarded, as RFC 3207 requires."""
        self.buffer.clear()
        await asyncio.wait_for(
            self.writer.start_tls(ssl_context, server_hostname=server_hostname), self.timeout
        )

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (OSError, TimeoutError, ssl.SSLError):
            pass
