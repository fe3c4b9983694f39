"""An SMTP sink that records each envelope verbatim (MAIL and RCPT arguments, parameters and all).

The aiosmtpd sink (tests/support/sink.py) uppercases parameters and refuses the DSN ones
(RFC 3461), so it cannot show what a relay passes on. This one offers DSN on request, keeps
`MAIL FROM:` and `RCPT TO:` arguments exactly as received (UTF-8 decoded), and answers RCPT by
the recipient's local part: ``permfail...`` 550 5.1.1, ``tempfail...`` 450 4.2.0, else 250.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class Envelope:
    mail: str  # the MAIL argument after "FROM:", e.g. "<a@b> SIZE=12 RET=HDRS"
    rcpts: list[str] = field(default_factory=list)  # accepted RCPT arguments after "TO:"
    data: bytes = b""  # dot-stuffing undone, CRLF line ends as sent

    @property
    def sender(self) -> str:
        return self.mail.partition(">")[0].lstrip("<")

    @property
    def mail_params(self) -> list[str]:
        return self.mail.partition(">")[2].split()

    @property
    def rcpt_addresses(self) -> list[str]:
        return [r.partition(">")[0].lstrip("<") for r in self.rcpts]

    def rcpt_params(self, i: int) -> list[str]:
        return self.rcpts[i].partition(">")[2].split()


class EnvelopeSink:
    """`async with EnvelopeSink(host, port, dsn=True) as s:`; `await s.wait_for(n)` -> envelopes."""

    def __init__(self, host: str, port: int, *, dsn: bool = False, smtputf8: bool = True,
                 hostname: str = "envsink.test"):
        self.host, self.port = host, port
        self.dsn, self.smtputf8, self.hostname = dsn, smtputf8, hostname
        self.messages: list[Envelope] = []
        self.commands: list[str] = []
        self._server: asyncio.base_events.Server | None = None
        self._changed = asyncio.Event()

    async def start(self) -> EnvelopeSink:
        self._server = await asyncio.start_server(self._session, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> EnvelopeSink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for(self, n: int, timeout: float = 15.0) -> list[Envelope]:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while len(self.messages) < n:
            left = end - loop.time()
            if left <= 0:
                raise AssertionError(f"{self.host}: {len(self.messages)} of {n} messages; commands: {self.commands}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        return self.messages[:n]

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")

        env: Envelope | None = None
        try:
            say(f"220 {self.hostname} ESMTP envsink")
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
                self.commands.append(line)
                verb = line[:4].upper()
                if verb == "EHLO":
                    kws = ["8BITMIME", "SIZE 33554432"] + (["SMTPUTF8"] if self.smtputf8 else []) \
                        + (["DSN"] if self.dsn else [])
                    say(f"250-{self.hostname}")
                    for i, kw in enumerate(kws):
                        say(f"250{'-' if i < len(kws) - 1 else ' '}{kw}")
                elif verb == "HELO":
                    say(f"250 {self.hostname}")
                elif verb == "MAIL":
                    env = Envelope(line[10:] if line[:10].upper() == "MAIL FROM:" else line[5:])
                    say("250 2.1.0 Ok")
                elif verb == "RCPT" and env is not None:
                    arg = line[8:]
                    local = arg.lstrip("<").partition("@")[0].lower()
                    if local.startswith("permfail"):
                        say("550 5.1.1 envsink: no such user")
                    elif local.startswith("tempfail"):
                        say("450 4.2.0 envsink: mailbox busy")
                    else:
                        env.rcpts.append(arg)
                        say("250 2.1.5 Ok")
                elif verb == "DATA" and env is not None and env.rcpts:
                    say("354 End data with <CR><LF>.<CR><LF>")
                    await writer.drain()
                    lines = []
                    while True:
                        chunk = await reader.readline()
                        if not chunk:
                            return
                        if chunk == b".\r\n":
                            break
                        lines.append(chunk[1:] if chunk.startswith(b".") else chunk)
                    env.data = b"".join(lines)
                    self.messages.append(env)
                    self._changed.set()
                    env = None
                    say("250 2.0.0 Ok: queued")
                elif verb == "RSET":
                    env = None
                    say("250 2.0.0 Ok")
                elif verb == "NOOP":
                    say("250 2.0.0 Ok")
                elif verb == "QUIT":
                    say("221 2.0.0 Bye")
                    await writer.drain()
                    return
                else:
                    say("503 5.5.1 envsink: bad sequence")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
