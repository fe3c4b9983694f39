"""The ESMTP listener with real clients (smtplib, aiosmtplib, raw sockets), on both framers."""

from __future__ import annotations

import asyncio
import smtplib

import aiosmtplib
import pytest

from fastrelay import _impl
from fastrelay.smtp import replies as R
from tests.support import RawClient
from tests.support.relay import RelayHarness

HOLD = "suspend_delivery = 1\n"
MSG = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def framing(impl, monkeypatch):
    """Run the listener on `impl`'s framer (the events are the same ints in both)."""
    monkeypatch.setattr(_impl, "ServerFramer", impl.ServerFramer)
    return impl


@pytest.fixture
async def relay(tmp_path, framing):
    h = RelayHarness(tmp_path, HOLD)
    await h.start()
    yield h
    await h.stop()


async def test_greeting_and_ehlo(relay):
    async with await RawClient.connect("127.0.0.1", relay.port) as c:
        code, lines = await c.read_reply()
        assert (code, lines) == (220, ["relay.test ESMTP fastrelay"])
        code, lines = await c.command("EHLO client.test")
        assert code == 250
        assert lines == ["relay.test", "PIPELINING", "SIZE 10240000", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN",
                         "SMTPUTF8", "CHUNKING"]
        assert await c.command("QUIT") == (221, ["2.0.0 Bye"])
        assert await c.closed()


async def test_smtplib_sends_and_message_is_spooled_with_received_header(relay):
    def send():
        with smtplib.SMTP("127.0.0.1", relay.port) as s:
            s.ehlo("client.test")
            return s.sendmail("a@example.com", ["b@example.net", "c@example.net", "d@other.test"], MSG)

    assert await asyncio.to_thread(send) == {}
    log = relay.mainlog()
    await relay.stop()
    spooled = await relay.spooled()
    # One entry per destination domain (as Momentum splits), one body each.
    assert sorted((e.domain, [r.address for r in e.recipients]) for e, _ in spooled) == [
        ("example.net", ["b@example.net", "c@example.net"]),
        ("other.test", ["d@other.test"]),
    ]
    env, body = spooled[0]
    assert env.sender == "a@example.com" and env.client_ip == "127.0.0.1" and env.helo == "client.test"
    assert env.protocol == "esmtp" and env.binding == "default" and env.msgid
    assert body.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test (fastrelay) with ESMTP id ")
    assert body.endswith(MSG)
    # Mainlog R records: one per recipient, with the documented fields.
    recs = [f for f in log if f[1] == "R"]
    assert sorted(f[3] for f in recs) == ["b@example.net", "c@example.net", "d@other.test"]
    assert all(f[4:] == ["a@example.com", "127.0.0.1", str(len(body)), "esmtp", "default", ""] for f in recs)


async def test_aiosmtplib_pipelined_several_messages_one_connection(relay):
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port)
    await c.connect()
    for i in range(5):
        errors, resp = await c.sendmail("a@example.com", [f"r{i}@example.net"], MSG)
        assert errors == {} and resp.startswith("2.0.0 OK queued as ")
    await c.quit()
    await relay.stop()
    assert len(await relay.spooled()) == 5


async def test_raw_pipelined_group_gets_one_write(relay):
    async with await RawClient.connect("127.0.0.1", relay.port) as c:
        await c.expect(220)
        await c.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
        await c.expect(250)
        assert await c.read_reply() == (250, ["2.1.0 Sender OK"])
        assert await c.read_reply() == (250, ["2.1.5 Recipient OK"])
        assert await c.read_reply() == (250, ["2.1.5 Recipient OK"])
        assert await c.read_reply() == (354, ["End data with <CR><LF>.<CR><LF>"])
        await c.send(MSG + b".\r\nQUIT\r\n")
        code, lines = await c.read_reply()
        assert code == 250 and lines[0].startswith("2.0.0 OK queued as ")
        assert await c.read_reply() == (221, ["2.0.0 Bye"])


async def test_message_fed_one_byte_at_a_time(relay):
    # docs/reliability.md case 8 end to end: the framer sees every split; the result is one message.
    async with await RawClient.connect("127.0.0.1", relay.port) as c:
        await c.expect(220)
        stream = b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
        for b in stream:
            await c.send(bytes([b]))
        await c.expect(250)
        await c.expect(250)
        await c.expect(250)
        await c.send(b"DATA\r\n")
        await c.expect(354)
        for b in MSG + b"..dot\r\n.\r\n":
            await c.send(bytes([b]))
        code, _ = await c.read_reply()
        assert code == 250
    await relay.stop()
    (_env, body), = await relay.spooled()
    assert body.endswith(MSG + b".dot\r\n")  # dot-unstuffed


async def test_bdat_chunks(relay):
    async with await RawClient.connect("127.0.0.1", relay.port) as c:
        await c.expect(220)
        await c.command("EHLO c")
        await c.command("MAIL FROM:<a@example.com>")
        await c.command("RCPT TO:<b@example.net>")
        part1, part2 = MSG[:20], MSG[20:]
        await c.send(b"BDAT %d\r\n" % len(part1) + part1)
        assert await c.read_reply() == (250, [f"2.0.0 {len(part1)} octets received"])
        await c.send(b"BDAT %d LAST\r\n" % len(part2) + part2)
        code, lines = await c.read_reply()
        assert code == 250 and lines[0].startswith("2.0.0 OK queued as")
    await relay.stop()
    (_env, body), = await relay.spooled()
    assert body.endswith(MSG)


async def test_rset_noop_vrfy_help(relay):
    async with await RawClient.connect("127.0.0.1", relay.port) as c:
        await c.expect(220)
        await c.command("EHLO c")
        await c.command("MAIL FROM:<a@example.com>")
        assert await c.command("RSET") == (250, ["2.0.0 Reset OK"])
        assert await c.command("RCPT TO:<b@example.net>") == (R.NEED_MAIL.code, [f"{R.NEED_MAIL.esc} {R.NEED_MAIL.text}"])
        assert await c.command("NOOP") == (250, ["2.0.0 OK"])
        assert (await c.command("VRFY postmaster"))[0] == R.VRFY_CANNOT.code
        assert (await c.command("HELP"))[0] == R.HELP.code
        assert await c.command("HELO old.client") == (250, ["relay.test"])


async def test_ipv6_listener(tmp_path):
    h = RelayHarness(tmp_path, HOLD, listen="[::1]:0")
    async with h:
        async with await RawClient.connect("::1", h.port) as c:
            await c.expect(220)
            await c.command("EHLO c")
            assert (await c.command("MAIL FROM:<a@example.com>"))[0] == 250
            assert (await c.command("RCPT TO:<b@example.net>"))[0] == 250  # ::1 is in relay_hosts


async def test_several_listen_entries(tmp_path):
    h = RelayHarness(tmp_path, HOLD + 'ESMTP_Listener { Listen "127.0.0.1:0" { } }\n')
    async with h:
        ports = [s.sockets[0].getsockname()[1] for s in h.relay.smtp_servers]
        assert len(ports) == 2
        for p in ports:
            async with await RawClient.connect("127.0.0.1", p) as c:
                await c.expect(220)


async def test_starttls(tmp_path, framing):
    import ssl

    import trustme

    ca = trustme.CA()
    ca.issue_cert("relay.test").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    h = RelayHarness(tmp_path, HOLD + 'TLS_Certificate = "relay.pem"\nTLS_Key = "relay.pem"\n')
    async with h:
        async with await RawClient.connect("127.0.0.1", h.port) as c:
            await c.expect(220)
            code, lines = await c.command("EHLO c")
            assert "STARTTLS" in lines
            assert await c.command("STARTTLS") == (220, ["2.0.0 Ready to start TLS"])
            await c.starttls(client_ctx, server_hostname="relay.test")
            code, lines = await c.command("EHLO c")
            assert code == 250 and "STARTTLS" not in lines
            await c.command("MAIL FROM:<a@example.com>")
            await c.command("RCPT TO:<b@example.net>")
            await c.command("DATA")
            await c.send(MSG + b".\r\n")
            assert (await c.read_reply())[0] == 250
    spooled = await h.spooled()
    assert spooled[0][0].protocol == "esmtps"
    assert b"with ESMTPS id" in spooled[0][1]


async def test_starttls_command_in_the_same_segment_as_the_clients_finished(tmp_path, framing):
    """Under TLS 1.3 the client is done with the handshake first and may send EHLO at once; when
    its Finished and the EHLO arrive in one read, the EHLO reaches the session before the server's
    start_tls returns. That EHLO came through TLS and must be answered (3.12's wait_for made it
    the usual timing for asyncio clients, and the session, dropping it, hung)."""
    import ssl

    import trustme

    ca = trustme.CA()
    ca.issue_cert("relay.test").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
    client_ctx = ssl.create_default_context()
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ca.configure_trust(client_ctx)
    h = RelayHarness(tmp_path, HOLD + 'TLS_Certificate = "relay.pem"\nTLS_Key = "relay.pem"\n')
    async with h:
        async with await RawClient.connect("127.0.0.1", h.port) as c:
            await c.expect(220)
            await c.command("EHLO c")
            assert await c.command("STARTTLS") == (220, ["2.0.0 Ready to start TLS"])
            # TLS on memory BIOs, so the test decides what goes into each write.
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = client_ctx.wrap_bio(incoming, outgoing, server_hostname="relay.test")

            async def receive() -> None:
                data = await asyncio.wait_for(c.reader.read(65536), 5)
                assert data, "server closed during the handshake"
                incoming.write(data)

            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    c.writer.write(outgoing.read())
                    await receive()
            assert tls.version() == "TLSv1.3"
            tls.write(b"EHLO c\r\n")
            c.writer.write(outgoing.read())  # the client's Finished and the EHLO, one write
            reply = b""
            while not reply.endswith(b"250 CHUNKING\r\n"):
                await receive()
                try:
                    reply += tls.read(65536)
                except ssl.SSLWantReadError:  # only session tickets so far
                    pass
            assert reply.startswith(b"250-relay.test\r\n") and b"STARTTLS" not in reply
