"""docs/reliability.md cases 1-31: bad input at the listener, as raw bytes over a real socket.

Each test asserts the reply (by its name in fastrelay.smtp.replies) and what the spool holds
afterwards, read through the spool's own API once the relay has stopped.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from fastrelay import limits
from fastrelay.smtp import replies as R
from tests.support import RawClient
from tests.support.relay import RelayHarness

HOLD = "suspend_delivery = 1\n"
MSG = b"Subject: t\r\n\r\nbody\r\n"


def wire(reply: R.Reply) -> tuple[int, list[str]]:
    return reply.code, [f"{reply.esc} {reply.text}" if reply.esc else reply.text]


@pytest.fixture
async def relay_with(tmp_path, monkeypatch):
    """relay_with(conf) -> a started relay with extra conf; stopped (counters checked) at teardown.
    Its timer sweep runs every 0.1 s, not every second: a 1 s deadline fires at ~1.1 s, not ~2 s."""
    monkeypatch.setattr(limits, "REAPER_INTERVAL", 0.1)
    started: list[RelayHarness] = []

    async def make(conf: str) -> RelayHarness:
        h = await RelayHarness(tmp_path, HOLD + conf).start()
        started.append(h)
        return h

    yield make
    for h in started:
        await h.stop()


@pytest.fixture
async def relay(tmp_path):
    h = await RelayHarness(tmp_path, HOLD).start()
    yield h
    await h.stop()


async def connect(h: RelayHarness, ehlo: str | None = "EHLO client.test") -> RawClient:
    c = await RawClient.connect("127.0.0.1", h.port)
    await c.expect(220)
    if ehlo:
        await c.send(ehlo.encode() + b"\r\n")
        await c.expect(250)
    return c


async def transaction(c: RawClient, rcpts=("b@example.net",)) -> None:
    assert (await c.command("MAIL FROM:<a@example.com>"))[0] == 250
    for r in rcpts:
        assert (await c.command(f"RCPT TO:<{r}>"))[0] == 250
    assert (await c.command("DATA"))[0] == 354


async def the_one_spooled(h: RelayHarness, c: RawClient) -> tuple:
    """Close the client, stop the relay, and return the single (envelope, body) in its spool."""
    await c.close()
    await h.stop()
    (got,) = await h.spooled()
    return got


async def nothing_spooled(h: RelayHarness) -> None:
    await h.stop()
    assert await h.spooled() == []


# --- A. Framing and smuggling ----------------------------------------------------------------------
FAKE_ENDS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\r.\n", b"\n.\r"]


@pytest.mark.parametrize("fake", FAKE_ENDS, ids=[f.hex() for f in FAKE_ENDS])
async def test_case01_fake_end_of_data_does_not_end_data(relay, fake):
    c = await connect(relay)
    await transaction(c)
    # The smuggled second message after the fake end must not become a message of its own.
    await c.send(b"Subject: one\r\n\r\nx" + fake + b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<v@example.net>\r\n"
                 b"DATA\r\n\r\nsmuggled\r\n.\r\n")
    # Only the real CRLF.CRLF ends it, and the bare CR/LF in it rejects the whole message (case 2).
    assert await c.read_reply() == wire(R.BARE_LF_DATA)
    assert await c.command("NOOP") == wire(R.NOOP_OK)  # in sync: no reply to the smuggled commands
    await c.close()
    await nothing_spooled(relay)


async def test_case01_nul_before_the_dot_is_refused_by_default(relay):
    """Issue 9: "`<CR><LF><NUL>.<CR><LF>` is accepted and relayed byte-exact. [...] Reject NUL in
    DATA by default (Postfix does), with a documented switch to carry it." """
    c = await connect(relay)
    await transaction(c)
    await c.send(b"Subject: x\r\n\r\na\r\n\x00.\r\nstill body\r\n.\r\n")
    # Not an end of data (the real CRLF.CRLF is), and refused after the end: nothing spooled.
    assert await c.read_reply() == wire(R.NUL_IN_DATA)
    assert await c.command("NOOP") == wire(R.NOOP_OK)  # in sync: "still body" was content
    await c.close()
    await nothing_spooled(relay)


async def test_case01_nul_carried_byte_exact_with_the_switch(relay_with):
    h = await relay_with("allow_nul_in_data = true\n")
    c = await connect(h)
    await transaction(c)
    await c.send(b"Subject: x\r\n\r\na\r\n\x00.\r\nstill body\r\n.\r\n")
    code, _lines = await c.read_reply()
    assert code == 250  # NUL is carried byte-exact (case 25), and it did not end DATA
    _env, body = await the_one_spooled(h, c)
    assert body.endswith(b"a\r\n\x00.\r\nstill body\r\n")


async def test_case02_bare_lf_in_command(relay):
    c = await connect(relay)
    await c.send(b"NOOP\n")
    assert await c.read_reply() == wire(R.BARE_LF_COMMAND)
    # Never split a command on CR alone.
    await c.send(b"MAIL FROM:<a@example.com>\rRCPT TO:<b@example.net>\r\n")
    assert await c.read_reply() == wire(R.BARE_LF_COMMAND)
    assert (await c.command("MAIL FROM:<a@example.com>"))[0] == 250  # the session stays usable


async def test_case02_bare_lf_normalized_for_listed_clients(relay_with):
    h = await relay_with('bare_lf_normalize_hosts = ( "127.0.0.1" )\n')
    c = await connect(h)
    await transaction(c)
    await c.send(b"Subject: x\n\nline1\nline2\r\n.\r\n")
    assert (await c.read_reply())[0] == 250
    _env, body = await the_one_spooled(h, c)
    assert body.endswith(b"Subject: x\r\n\r\nline1\r\nline2\r\n")


async def test_case04_content_before_354_is_a_pipelining_violation(relay):
    c = await connect(relay)
    await c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: early\r\n\r\nx\r\n.\r\n")
    assert (await c.read_reply())[0] == 250
    assert (await c.read_reply())[0] == 250
    assert await c.read_reply() == wire(R.PIPELINING_VIOLATION)
    assert await c.closed()
    await nothing_spooled(relay)


async def test_case05_early_talker(relay_with):
    h = await relay_with("greeting_delay = 300ms\n")
    c = await RawClient.connect("127.0.0.1", h.port)
    await c.send(b"EHLO eager.test\r\n")
    assert await c.read_reply() == wire(R.EARLY_TALKER)
    assert await c.closed()
    # A patient client is greeted after the delay.
    c2 = await RawClient.connect("127.0.0.1", h.port)
    assert (await c2.read_reply())[0] == 220
    await c2.close()


async def test_case06_starttls_plaintext_injection(tmp_path, relay_with):
    import ssl

    import trustme

    ca = trustme.CA()
    ca.issue_cert("relay.test").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    h = await relay_with('TLS_Certificate = "relay.pem"\nTLS_Key = "relay.pem"\n')
    c = await connect(h)
    # CVE-2011-0411: plaintext after STARTTLS in the same packet must be thrown away.
    await c.send(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n")
    assert await c.read_reply() == wire(R.READY_TLS)
    await c.starttls(ctx, server_hostname="relay.test")
    # The injected MAIL was dropped, and state was reset: MAIL needs a new EHLO (RFC 3207 §4.2).
    assert await c.command("MAIL FROM:<a@example.com>") == wire(R.NEED_EHLO)
    await c.command("EHLO again.test")
    assert (await c.command("MAIL FROM:<a@example.com>"))[0] == 250
    assert await c.command("STARTTLS") == wire(R.TLS_ALREADY)  # a second STARTTLS
    await c.close()


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1", b"POST /xfer HTTP/1.1", b"CONNECT mx.example.com:25 HTTP/1.1"])
async def test_case07_http_on_the_smtp_port(relay, line):
    c = await RawClient.connect("127.0.0.1", relay.port)
    await c.expect(220)
    await c.send(line + b"\r\nHost: x\r\n\r\n")
    assert await c.read_reply() == wire(R.HTTP_COMMAND)
    assert await c.closed()


# Case 8 (split-segment invariance) is tested on the framer itself (tests/test_framing.py) and end
# to end by feeding a message one byte at a time (tests/test_smtp_server.py).


# --- B. Limits and exhaustion --------------------------------------------------------------------------
async def test_case09_command_line_over_512(relay):
    c = await connect(relay)
    await c.send(b"NOOP " + b"x" * 600 + b"\r\n")
    assert await c.read_reply() == wire(R.LINE_TOO_LONG)
    assert await c.command("NOOP") == wire(R.NOOP_OK)  # discarded up to the LF; the session goes on
    # 10 MB without LF: closed at the hard cap, memory bounded (the framer discards as it reads).
    # The close is a lingering one (FIN after the 500, the rest of the client's bytes read and
    # discarded), so no reset destroys the 500 before the client reads it.
    for _ in range(160):
        await c.send(b"y" * 65536)
    assert await c.read_reply() == wire(R.LINE_TOO_LONG)
    assert await c.closed()
    await c.close()  # the client's FIN ends the linger at once, well before close_linger (2 s)
    for _ in range(25):
        if not relay.smtp.sessions:
            break
        await asyncio.sleep(0.02)
    assert relay.smtp.sessions == set()


async def test_case10_data_line_over_1000(relay):
    c = await connect(relay)
    await transaction(c)
    await c.send(b"Subject: x\r\n\r\n" + b"z" * 1200 + b"\r\n.\r\n")
    assert await c.read_reply() == wire(R.LONG_LINE_DATA)  # never truncated silently
    await c.close()
    await nothing_spooled(relay)


async def test_case11_size(relay_with):
    h = await relay_with("max_message_size = 2k\n")
    c = await connect(h)
    assert await c.command("MAIL FROM:<a@example.com> SIZE=4096") == wire(R.SIZE_EXCEEDED)
    await transaction(c)
    await c.send(b"Subject: big\r\n\r\n" + (b"a" * 70 + b"\r\n") * 100 + b".\r\n")
    assert await c.read_reply() == wire(R.SIZE_EXCEEDED)  # read to the end, then 552
    assert await c.command("NOOP") == wire(R.NOOP_OK)
    await c.close()
    await h.stop()
    assert await h.spooled() == []


async def test_case12_too_many_recipients_keeps_the_accepted(relay_with):
    h = await relay_with("max_recipients_per_message = 3\n")
    c = await connect(h)
    assert (await c.command("MAIL FROM:<a@example.com>"))[0] == 250
    for i in range(3):
        assert (await c.command(f"RCPT TO:<r{i}@example.net>"))[0] == 250
    assert await c.command("RCPT TO:<r3@example.net>") == wire(R.TOO_MANY_RECIPIENTS)
    assert (await c.command("DATA"))[0] == 354
    await c.send(MSG + b".\r\n")
    assert (await c.read_reply())[0] == 250
    env, _ = await the_one_spooled(h, c)
    assert [r.address for r in env.recipients] == ["r0@example.net", "r1@example.net", "r2@example.net"]


async def test_case13_messages_per_connection(relay_with):
    h = await relay_with("max_messages_per_connection = 2\n")
    c = await connect(h)
    for _ in range(2):
        await transaction(c)
        await c.send(MSG + b".\r\n")
        assert (await c.read_reply())[0] == 250
    assert await c.command("MAIL FROM:<a@example.com>") == wire(R.TOO_MANY_MESSAGES)
    await c.close()


async def test_case13_connections_per_ip_and_in_total(relay_with):
    h = await relay_with("max_connections_per_ip = 2\nListener_Sessions = 3\n")
    a = await RawClient.connect("127.0.0.1", h.port)
    b = await RawClient.connect("127.0.0.1", h.port)
    await a.expect(220)
    await b.expect(220)
    c = await RawClient.connect("127.0.0.1", h.port)
    assert await c.read_reply() == wire(R.TOO_MANY_FROM_CLIENT)
    assert await c.closed()
    # Another source address (127.0.0.2) gets the third and last slot, then the total is full.
    d = await RawClient.connect("127.0.0.1", h.port, local_addr=("127.0.0.2", 0))
    await d.expect(220)
    e = await RawClient.connect("127.0.0.1", h.port, local_addr=("127.0.0.3", 0))
    assert await e.read_reply() == wire(R.TOO_MANY_CONNECTIONS)
    assert await e.closed()
    # Slots come back when clients leave.
    await a.close()
    await asyncio.sleep(0.05)
    f = await RawClient.connect("127.0.0.1", h.port)
    await f.expect(220)
    for x in (b, d, f):
        await x.close()


async def test_case14_trickled_command_hits_the_deadline(relay_with):
    h = await relay_with("command_deadline = 1s\n")
    c = await connect(h)
    await c.send(b"NO")  # a command begun and never finished, one byte now and then
    await asyncio.sleep(0.6)
    await c.send(b"O")
    assert await c.read_reply(timeout=4) == wire(R.COMMAND_DEADLINE)
    assert await c.closed()


async def test_case14_idle_timeout(relay_with):
    h = await relay_with("Idle_Time = 1s\n")
    c = await connect(h)
    assert await c.read_reply(timeout=4) == wire(R.IDLE_TIMEOUT)
    assert await c.closed()


async def test_case14_min_data_rate(relay_with):
    h = await relay_with("command_deadline = 1s\nmin_data_rate = 1000\n")
    c = await connect(h)
    await transaction(c)
    reply = None
    for _ in range(8):  # ~20 bytes/s against 1000 required; listen between the trickles
        await c.send(b"slow data\r\n")
        try:
            reply = await c.read_reply(timeout=0.5)
            break
        except TimeoutError:
            continue
    assert reply == wire(R.DATA_TOO_SLOW)
    assert await c.closed()
    await h.stop()
    assert await h.spooled() == []


async def test_case15_junk_command_flood(relay_with):
    h = await relay_with("junk_command_limit = 20\n")
    c = await connect(h)
    await c.send(b"NOOP\r\n" * 25)
    for _ in range(20):
        assert await c.read_reply() == wire(R.NOOP_OK)
    assert await c.read_reply() == wire(R.TOO_MANY_ERRORS)
    assert await c.closed()


async def test_case15_error_limits_tarpit_then_close(relay_with):
    h = await relay_with("soft_error_limit = 2\nhard_error_limit = 5\nerror_sleep_time = 100ms\n")
    c = await connect(h)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await c.send(b"BOGUS\r\n" * 5)
    for _ in range(4):
        assert await c.read_reply() == wire(R.UNKNOWN_COMMAND)
    assert await c.read_reply() == wire(R.UNKNOWN_COMMAND)
    assert await c.read_reply() == wire(R.TOO_MANY_ERRORS)
    assert loop.time() - t0 >= 0.2  # the replies past the soft limit were delayed
    assert await c.closed()


async def test_case16_too_many_hops(relay):
    c = await connect(relay)
    await transaction(c)
    await c.send(b"".join(b"Received: from hop%d\r\n" % i for i in range(51)) + b"Subject: loop\r\n\r\nx\r\n.\r\n")
    assert await c.read_reply() == wire(R.TOO_MANY_HOPS)
    await c.close()
    await nothing_spooled(relay)


async def test_case17_low_disk_space_at_mail(relay_with):
    h = await relay_with("spool_min_free = 1000g\n")
    c = await connect(h)
    assert await c.command("MAIL FROM:<a@example.com>") == wire(R.SPOOL_LOW_SPACE)
    await c.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_case17_disk_full_at_end_of_data_loses_nothing(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        h = await RelayHarness(mnt, HOLD + "spool_min_free = 0\n").start()
        acked: list[str] = []
        failed = 0
        try:
            c = await connect(h)
            body = b"Subject: fill\r\n\r\n" + (b"f" * 76 + b"\r\n") * 200
            for i in range(200):
                code, lines = await c.command("MAIL FROM:<a@example.com>")
                if code != 250:
                    # Once a commit found the disk full, MAIL itself gets 452 4.3.1 at once.
                    assert (code, lines) == wire(R.SPOOL_LOW_SPACE) and failed >= 1
                    break
                assert (await c.command(f"RCPT TO:<r{i}@example.net>"))[0] == 250
                assert (await c.command("DATA"))[0] == 354
                await c.send(body + b".\r\n")
                code, lines = await c.read_reply()
                if code == 250:
                    acked.append(f"r{i}@example.net")
                else:
                    assert (code, lines) == wire(R.SPOOL_FAILED)  # 451 4.3.0, never 250-then-lose
                    failed += 1
                    if failed >= 3:
                        break
            assert failed >= 1 and acked
            assert await c.command("NOOP") == wire(R.NOOP_OK)  # still running
            await c.close()
        finally:
            await h.stop()
        got = sorted(e.recipients[0].address for e, _ in await h.spooled())
        assert got == sorted(acked)  # every 250 is there, nothing else
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# --- C. Envelope, addresses, content -------------------------------------------------------------------
async def test_case18_null_sender_accepted(relay):
    c = await connect(relay)
    assert await c.command("MAIL FROM:<>") == wire(R.SENDER_OK)
    assert (await c.command("RCPT TO:<b@example.net>"))[0] == 250
    assert (await c.command("DATA"))[0] == 354
    await c.send(MSG + b".\r\n")
    assert (await c.read_reply())[0] == 250
    env, _ = await the_one_spooled(relay, c)
    assert env.sender == ""


@pytest.mark.parametrize("addr", ['"john..doe"@example.net', '"a b"@example.net', '"x@y"@example.net',
                                  'MixedCase@Example.NET'])
async def test_case19_quoted_local_parts_kept_byte_exact(relay, addr):
    c = await connect(relay)
    assert (await c.command("MAIL FROM:<a@example.com>"))[0] == 250
    assert await c.command(f"RCPT TO:<{addr}>") == wire(R.RCPT_OK)
    assert (await c.command("DATA"))[0] == 354
    await c.send(MSG + b".\r\n")
    assert (await c.read_reply())[0] == 250
    env, _ = await the_one_spooled(relay, c)
    assert env.recipients[0].address == addr and env.domain == "example.net"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("MAIL FROM:a@example.com", R.BAD_SENDER_SYNTAX),
        ("MAIL FROM:<a@example.com:25>", R.BAD_SENDER_SYNTAX),
        ("MAIL FROM:<a@@example.com>", R.BAD_SENDER_SYNTAX),
        ('MAIL FROM:<"unbalanced@example.com>', R.BAD_SENDER_SYNTAX),
        ("MAIL FROM:<" + "l" * 65 + "@example.com>", R.BAD_SENDER_SYNTAX),
        ("MAIL FROM:<a@" + "d" * 60 + ("." + "d" * 60) * 4 + ">", R.BAD_SENDER_SYNTAX),
        ("MAIL FROM:<a..b@example.com>", R.BAD_SENDER_SYNTAX),
    ],
)
async def test_case20_malformed_sender(relay, line, reply):
    c = await connect(relay)
    assert await c.command(line) == wire(reply)


@pytest.mark.parametrize(
    "rcpt", ["b@example.net", "<>", "<b@example.net:25>", "<b@@example.net>", "<" + "l" * 65 + "@example.net>",
             "<b@exa mple.net>"],
)
async def test_case20_malformed_recipient(relay, rcpt):
    c = await connect(relay)
    await c.command("MAIL FROM:<a@example.com>")
    assert await c.command(f"RCPT TO:{rcpt}") == wire(R.BAD_RCPT_SYNTAX)


@pytest.mark.parametrize(
    "rcpt", ["u%victim.example@ours.test", "victim.example!u@ours.test", '"u@victim.example"@ours.test',
             "u@[127.0.0.1]", "u@[IPv6:::1]", "u@victim.example"],
)
async def test_case21_open_relay_tricks_from_an_untrusted_client(relay_with, rcpt):
    h = await relay_with('relay_hosts = ( "10.255.255.0/24" )\nrelay_domains = ( "ours.test" )\n')
    c = await connect(h)
    await c.command("MAIL FROM:<a@example.com>")
    assert await c.command(f"RCPT TO:<{rcpt}>") == wire(R.RELAY_DENIED)
    assert await c.command("RCPT TO:<u>") == wire(R.RELAY_DENIED)  # unqualified
    # Our own domain, and a source route (accepted, route ignored), are fine.
    assert (await c.command("RCPT TO:<u@ours.test>"))[0] == 250
    assert (await c.command("RCPT TO:<@hop1.example,@hop2.example:w@ours.test>"))[0] == 250
    await c.close()


@pytest.mark.parametrize("line", ["MAIL FROM:<a\x01b@example.com>", "MAIL FROM:<a@example.com> SIZE=1\x02",
                                  "MAIL FROM:<a@exam\x7fple.com>"])
async def test_case22_control_characters_in_address_or_parameter(relay, line):
    c = await connect(relay)
    code, _ = await c.command(line)
    assert code == 501
    assert (await c.command("MAIL FROM:<a@example.com>"))[0] == 250


async def test_case23_utf8_addresses(relay):
    c = await connect(relay)
    assert await c.command("MAIL FROM:<jörg@example.com>") == wire(R.UTF8_NEEDS_SMTPUTF8)
    assert await c.command("MAIL FROM:<jörg@example.com> SMTPUTF8") == wire(R.SENDER_OK)
    assert await c.command("RCPT TO:<søren@exämple.net>") == wire(R.RCPT_OK)
    await c.command("RSET")
    await c.command("MAIL FROM:<a@example.com>")
    assert await c.command("RCPT TO:<søren@example.net>") == wire(R.UTF8_NEEDS_SMTPUTF8)
    await c.send(b"RCPT TO:<\xff\xfe@example.net>\r\n")  # invalid UTF-8
    assert await c.read_reply() == wire(R.BAD_UTF8)
    assert await c.command("NOOP") == wire(R.NOOP_OK)  # the session stays usable


async def test_case24_8bit_body_without_8bitmime_is_accepted(relay):
    c = await connect(relay)
    await transaction(c)
    await c.send("Subject: é\r\n\r\nnaïve\r\n.\r\n".encode())
    assert (await c.read_reply())[0] == 250
    _, body = await the_one_spooled(relay, c)
    assert body.endswith("naïve\r\n".encode())


async def test_case25_nul_in_command(relay):
    c = await connect(relay)
    await c.send(b"MAIL FROM:<a\x00@example.com>\r\n")
    assert await c.read_reply() == wire(R.NUL_IN_COMMAND)


async def test_case26_header_injection_via_ehlo_is_refused_or_capped(relay):
    c = await RawClient.connect("127.0.0.1", relay.port)
    await c.expect(220)
    assert await c.command("EHLO bad\x01name") == wire(R.HELO_NEEDS_DOMAIN)
    assert (await c.command("EHLO " + "h" * 400))[0] == 250
    await transaction(c)
    await c.send(MSG + b".\r\n")
    assert (await c.read_reply())[0] == 250
    env, body = await the_one_spooled(relay, c)
    assert env.helo == "h" * 255  # capped before it reaches Received: and the logs
    assert body.startswith(b"Received: from " + b"h" * 255 + b" ([127.0.0.1])\r\n")


async def test_case27_dot_unstuffing(relay):
    c = await connect(relay)
    await transaction(c)
    await c.send(b"Subject: dots\r\n\r\n..leading\r\n..\r\n...\r\n.\r\n")
    assert (await c.read_reply())[0] == 250
    _, body = await the_one_spooled(relay, c)
    assert body.endswith(b"Subject: dots\r\n\r\n.leading\r\n.\r\n..\r\n")


# --- D. Protocol state and extensions ---------------------------------------------------------------
async def test_case28_bad_sequences(relay):
    c = await RawClient.connect("127.0.0.1", relay.port)
    await c.expect(220)
    assert await c.command("MAIL FROM:<a@example.com>") == wire(R.NEED_EHLO)
    await c.command("EHLO c")
    assert await c.command("RCPT TO:<b@example.net>") == wire(R.NEED_MAIL)
    assert await c.command("DATA") == wire(R.NEED_MAIL)
    await c.command("MAIL FROM:<a@example.com>")
    assert await c.command("DATA") == wire(R.NEED_RCPT)
    assert await c.command("MAIL FROM:<a@example.com>") == wire(R.NESTED_MAIL)
    await c.command("EHLO c")  # EHLO resets the transaction
    assert (await c.command("MAIL FROM:<a@example.com>"))[0] == 250


async def test_case29_bdat_without_chunking_offered(relay):
    c = await connect(relay, ehlo="HELO c")
    await c.command("MAIL FROM:<a@example.com>")
    await c.command("RCPT TO:<b@example.net>")
    await c.send(b"BDAT 5 LAST\r\nhello")
    assert await c.read_reply() == wire(R.BDAT_NOT_OFFERED)
    assert await c.closed()
    await nothing_spooled(relay)


@pytest.mark.parametrize("cmd", [b"BDAT x", b"BDAT -1", b"BDAT 5 NOTLAST", b"BDAT", b"BDAT 99999999999999999999"])
async def test_case29_bdat_malformed_count(relay, cmd):
    c = await connect(relay)
    await c.command("MAIL FROM:<a@example.com>")
    await c.command("RCPT TO:<b@example.net>")
    await c.send(cmd + b"\r\nraw content that is not a command\r\n")
    assert await c.read_reply() == wire(R.BDAT_BAD_COUNT)
    assert await c.closed()


async def test_case29_bdat_zero_and_data_after_bdat_and_size(relay_with):
    h = await relay_with("max_message_size = 2k\n")
    c = await connect(h)
    await c.command("MAIL FROM:<a@example.com>")
    await c.command("RCPT TO:<b@example.net>")
    assert await c.command("BDAT 0") == wire(R.BDAT_ZERO_NOT_LAST)
    await c.send(b"BDAT 4\r\nabcd")
    assert (await c.read_reply())[0] == 250
    assert await c.command("DATA") == wire(R.DATA_AFTER_BDAT)
    big = b"x" * 3000
    await c.send(b"BDAT %d\r\n" % len(big) + big)
    assert await c.read_reply() == wire(R.SIZE_EXCEEDED)  # its bytes consumed all the same
    await c.send(b"BDAT 0 LAST\r\n")
    assert await c.read_reply() == wire(R.SIZE_EXCEEDED)
    assert await c.command("NOOP") == wire(R.NOOP_OK)  # in sync
    await c.close()
    await h.stop()
    assert await h.spooled() == []


async def test_case29_bdat_before_mail_consumes_the_chunk(relay):
    c = await connect(relay)
    await c.send(b"BDAT 10 LAST\r\nNOOP\r\nNOOP")
    assert await c.read_reply() == wire(R.NEED_MAIL)
    assert await c.command("NOOP") == wire(R.NOOP_OK)


async def test_case30_auth_is_not_offered(relay):
    c = await connect(relay)
    code, _ = await c.command("AUTH PLAIN AGFAYg==")
    assert (code, _) == wire(R.AUTH_NEEDS_TLS)


async def test_case31_client_gone_mid_data(relay):
    c = await connect(relay)
    await transaction(c)
    await c.send(b"Subject: cut\r\n\r\npartial body")
    await c.close()
    await asyncio.sleep(0.1)
    await nothing_spooled(relay)


async def test_case31_client_gone_after_the_dot_before_reading_250(relay):
    c = await connect(relay)
    await transaction(c)
    await c.send(MSG + b".\r\n")
    await c.close()  # gone before the 250: the message is ours all the same
    await asyncio.sleep(0.3)
    await relay.stop()
    assert len(await relay.spooled()) == 1


async def test_line_limits_are_configurable(relay_with):
    h = await relay_with("max_command_line = 1024\nmax_text_line = 2000\n")
    c = await connect(h)
    assert (await c.command("NOOP " + "x" * 700))[0] == 250  # over 512, under 1024
    assert await c.command("NOOP " + "x" * 1100) == wire(R.LINE_TOO_LONG)
    await transaction(c)
    await c.send(b"Subject: x\r\n\r\n" + b"y" * 1500 + b"\r\n.\r\n")  # over 1000, under 2000
    assert (await c.read_reply())[0] == 250
