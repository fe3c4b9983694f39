"""The SMTP/LMTP sink does what tests/support/sink.py promises, checked with real clients."""

from __future__ import annotations

import asyncio
import hashlib
import smtplib
import ssl
import time

import aiosmtplib
import pytest

from tests.support import MalformedReply, RawClient, Sink, ThreadedSink, read_ledger, tls_pair

BODY = b"X-Test-Id: t-1\r\nSubject: hello\r\n\r\nline one\r\n.starts with a dot\r\n"


@pytest.fixture
async def sink():
    async with Sink() as s:
        yield s


async def raw(sink: Sink, greeting: int = 220, ehlo: bool = True, timeout: float = 3.0) -> RawClient:
    c = await RawClient.connect(*sink.address, timeout=timeout)
    await c.expect(greeting)
    if ehlo:
        await c.send(b"LHLO client.test\r\n" if sink.lmtp else b"EHLO client.test\r\n")
        await c.expect(250)
    return c


async def aio_send(sink: Sink, rcpts: list[str], body: bytes = BODY, sender: str = "s@client.test",
                   **kw) -> tuple[dict, str]:
    return await aiosmtplib.send(body, sender=sender, recipients=rcpts, hostname=sink.host, port=sink.port,
                                 start_tls=kw.pop("start_tls", False), timeout=5, **kw)


# -- ledger ----------------------------------------------------------------------------------


async def test_ledger_records_exact_message(sink):
    errors, reply = await aio_send(sink, ["a@dest.test", "b@dest.test"])
    assert errors == {}
    assert reply == "2.0.0 Ok: queued as S000001"
    [m] = sink.messages
    # aiosmtplib dot-stuffed ".starts"; the sink undoes it: data is the message as sent.
    assert m.data == BODY
    assert m.sha256 == hashlib.sha256(BODY).hexdigest()
    assert m.test_id == "t-1"
    assert m.mail_from == "s@client.test"
    assert m.rcpt_tos == m.delivered == ["a@dest.test", "b@dest.test"]
    assert m.ehlo and m.peer[0] == "127.0.0.1" and m.session == 0 and not m.tls
    assert sink.deliveries()[("t-1", "b@dest.test", m.sha256)] == 1


async def test_ledger_keeps_raw_bytes_null_sender_and_options(sink):
    c = await raw(sink)
    await c.send(b"MAIL FROM:<> BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<r@dest.test>\r\nDATA\r\n")
    await c.expect(250)
    await c.expect(250)
    await c.expect(354)
    body = b"Subject: \xc3\xa9\r\n\r\nbare\nlf and \r cr\r\n..\r\n.\r\n"
    await c.send(body)
    lines = await c.expect(250)
    assert lines == ["2.0.0 Ok: queued as S000001"]
    [m] = sink.messages
    assert m.data == b"Subject: \xc3\xa9\r\n\r\nbare\nlf and \r cr\r\n.\r\n"
    assert m.mail_from == "<>"
    assert m.mail_options == ["BODY=8BITMIME", "SMTPUTF8"]
    assert m.test_id is None
    await c.close()


async def test_file_ledger_is_written_before_the_reply(tmp_path):
    path = tmp_path / "ledger.jsonl"
    async with Sink(ledger_path=path, ledger_data=True) as s:
        await aio_send(s, ["a@dest.test"])
        rows = read_ledger(path)  # already there: written before the 250 went out
        assert len(rows) == 1
        assert rows[0]["test_id"] == "t-1"
        assert rows[0]["delivered"] == ["a@dest.test"]
        assert rows[0]["sha256"] == hashlib.sha256(BODY).hexdigest()
        assert rows[0]["size"] == len(BODY)
        with pytest.raises(aiosmtplib.SMTPDataError):
            await aio_send(s, ["data-tempfail@dest.test"])  # refused: not in the ledger
    with open(path, "ab") as f:
        f.write(b'{"torn":')  # a torn last line is skipped
    assert len(read_ledger(path)) == 1


# -- faults by local part ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rcpt", "code"),
    [("tempfail", 450), ("permfail", 550), ("450-x", 450), ("452-full", 452), ("550-nouser", 550),
     ("PermFail", 550)],
)
async def test_rcpt_cues(sink, rcpt, code):
    c = await raw(sink)
    await c.command("MAIL FROM:<s@client.test>")
    got, _ = await c.command(f"RCPT TO:<{rcpt}@dest.test>")
    assert got == code
    assert (await c.command("RCPT TO:<ok@dest.test>"))[0] == 250  # the session goes on
    await c.close()


async def test_rcpt_421_closes(sink):
    c = await raw(sink)
    await c.command("MAIL FROM:<s@client.test>")
    assert (await c.command("RCPT TO:<421-bye@dest.test>"))[0] == 421
    assert await c.closed(2)


async def test_mixed_rcpt_results_with_aiosmtplib(sink):
    errors, _ = await aio_send(sink, ["ok@d.test", "tempfail@d.test", "permfail@d.test"])
    assert {k: v.code for k, v in errors.items()} == {"tempfail@d.test": 450, "permfail@d.test": 550}
    assert sink.messages[0].delivered == ["ok@d.test"]


async def test_slow_cue_delays_rcpt(sink):
    c = await raw(sink)
    await c.command("MAIL FROM:<s@client.test>")
    t0 = time.monotonic()
    assert (await c.command("RCPT TO:<slow-300@dest.test>"))[0] == 250
    assert time.monotonic() - t0 >= 0.3
    sink.faults.slow_delay = 0.2
    t0 = time.monotonic()
    assert (await c.command("RCPT TO:<slow@dest.test>"))[0] == 250
    assert time.monotonic() - t0 >= 0.2
    await c.close()


async def test_drop_in_data(sink):
    c = await raw(sink)
    await c.send(b"MAIL FROM:<s@c.test>\r\nRCPT TO:<drop-in-data@d.test>\r\nDATA\r\n")
    await c.expect(250)
    await c.expect(250)
    await c.expect(354)
    await c.send(b"Subject: x\r\n")
    assert await c.closed(2)
    assert c.buffer == b""  # no reply at all
    assert sink.messages == [] and sink.dropped_in_data == 1


@pytest.mark.parametrize(
    ("rcpt", "code"), [("data-tempfail", 451), ("data-permfail", 554), ("data-552-big", 552)]
)
async def test_data_cues(sink, rcpt, code):
    with pytest.raises(aiosmtplib.SMTPDataError) as e:
        await aio_send(sink, ["ok@d.test", f"{rcpt}@d.test"])
    assert e.value.code == code
    assert sink.messages == []
    assert len(sink.rejected) == 1 and sink.rejected[0].delivered == []


async def test_data_slow_cue(sink):
    sink.faults.slow_delay = 0.3
    t0 = time.monotonic()
    await aio_send(sink, ["data-slow@d.test"])
    assert time.monotonic() - t0 >= 0.3
    assert len(sink.messages) == 1


# -- faults by phase -------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["421", "554"])
async def test_greeting_refusal(sink, code):
    sink.faults.set("greeting", reply=f"{code} 4.3.2 not today")
    c = await RawClient.connect(*sink.address)
    assert await c.read_reply() == (int(code), ["4.3.2 not today"])
    if code == "421":
        assert await c.closed(2)
    else:
        # RFC 5321 §3.1: after a 554 greeting, 503 to everything until QUIT.
        assert (await c.command("EHLO x"))[0] == 503
        assert (await c.command("QUIT"))[0] == 221
        assert await c.closed(2)


@pytest.mark.parametrize(
    ("phase", "cmds", "code"),
    [
        ("ehlo", [], 550),
        ("mail", ["EHLO c.test"], 451),
        ("rcpt", ["EHLO c.test", "MAIL FROM:<s@c.test>"], 452),
        ("data", ["EHLO c.test", "MAIL FROM:<s@c.test>", "RCPT TO:<r@d.test>"], 554),
        ("rset", ["EHLO c.test"], 421),
        ("quit", ["EHLO c.test"], 500),
    ],
)
async def test_phase_reply(sink, phase, cmds, code):
    sink.faults.set(phase, reply=f"{code} {str(code)[0]}.9.9 phase {phase}")
    c = await raw(sink, ehlo=False)
    for cmd in cmds:
        assert (await c.command(cmd))[0] in (250,)
    verb = {"ehlo": "EHLO c.test", "mail": "MAIL FROM:<s@c.test>", "rcpt": "RCPT TO:<r@d.test>",
            "data": "DATA", "rset": "RSET", "quit": "QUIT"}[phase]
    assert await c.command(verb) == (code, [f"{str(code)[0]}.9.9 phase {phase}"])
    if code == 421:
        assert await c.closed(2)
    await c.close()


async def test_dot_reply_and_times(sink):
    sink.faults.set("dot", reply="452 4.3.1 full", times=1)
    with pytest.raises(aiosmtplib.SMTPDataError) as e:
        await aio_send(sink, ["a@d.test"])
    assert e.value.code == 452
    await aio_send(sink, ["a@d.test"])  # the fault was used up
    assert len(sink.messages) == 1 and len(sink.rejected) == 1
    assert "dot" not in sink.faults.phases


async def test_greeting_fault_times_one(sink):
    sink.faults.set("greeting", reply="421 4.3.2 busy", times=1)
    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as e:
        await aio_send(sink, ["a@d.test"])
    assert e.value.code == 421
    await aio_send(sink, ["a@d.test"])
    assert len(sink.messages) == 1 and sink.sessions_total == 2


@pytest.mark.parametrize("phase", ["mail", "dot"])
async def test_drop_at_phase(sink, phase):
    sink.faults.set(phase, drop=True)
    c = await raw(sink)
    await c.send(b"MAIL FROM:<s@c.test>\r\n")
    if phase == "dot":
        await c.expect(250)
        await c.send(b"RCPT TO:<r@d.test>\r\nDATA\r\n")
        await c.expect(250)
        await c.expect(354)
        await c.send(BODY + b".\r\n")
    assert await c.closed(2)
    assert c.buffer == b""
    assert sink.messages == []


async def test_reset_sends_rst(sink):
    sink.faults.set("mail", reset=True)
    c = await raw(sink)
    await c.send(b"MAIL FROM:<s@c.test>\r\n")
    assert await c.closed(2)
    assert c.was_reset and c.buffer == b""


async def test_delay_at_phase(sink):
    sink.faults.set("ehlo", delay=0.3)
    c = await RawClient.connect(*sink.address)
    await c.expect(220)
    t0 = time.monotonic()
    assert (await c.command("EHLO c.test"))[0] == 250
    assert time.monotonic() - t0 >= 0.3
    await c.close()


async def test_body_delay_stops_reading_then_accepts(sink):
    sink.faults.set("body", delay=0.4)
    t0 = time.monotonic()
    await aio_send(sink, ["a@d.test"])
    assert time.monotonic() - t0 >= 0.4
    assert len(sink.messages) == 1


async def test_body_421_mid_data(sink):
    sink.faults.set("body", reply="421 4.4.2 timeout in DATA")
    with pytest.raises(aiosmtplib.SMTPResponseException) as e:
        await aio_send(sink, ["a@d.test"])
    assert e.value.code == 421
    assert sink.messages == []


async def test_hidden_extensions_are_not_offered_and_are_refused():
    pair = tls_pair()
    async with Sink(tls_context=pair.server) as s:
        c = await raw(s, ehlo=False)
        _, lines = await c.command("EHLO c.test")
        assert {"STARTTLS", "8BITMIME", "SMTPUTF8", "PIPELINING"} <= set(lines)
        s.faults.hide |= {"STARTTLS", "8BITMIME", "SMTPUTF8", "PIPELINING", "SIZE"}
        _, lines = await c.command("EHLO c.test")
        assert lines == ["sink.test", "HELP"]
        assert (await c.command("STARTTLS"))[0] == 454
        assert (await c.command("MAIL FROM:<s@c.test> BODY=8BITMIME"))[0] == 555
        assert (await c.command("MAIL FROM:<s@c.test> SMTPUTF8"))[0] == 501
        await c.close()


# -- hostile replies ---------------------------------------------------------------------------


async def test_hostile_long_line(sink):
    sink.faults.set("ehlo", hostile="long_line", times=1)
    sink.faults.long_line_len = 5000
    c = await raw(sink, ehlo=False)
    await c.send(b"EHLO c.test\r\n")
    line = await c.read_line()
    assert line == b"250 " + b"x" * 5000 + b"\r\n"
    assert (await c.command("EHLO c.test"))[0] == 250  # the hostile reply did not count as EHLO
    c.max_line = 1000
    sink.faults.set("mail", hostile="long_line")
    await c.send(b"MAIL FROM:<s@c.test>\r\n")
    with pytest.raises(MalformedReply, match="longer than 1000"):
        await c.read_reply()
    await c.close()


async def test_hostile_endless_continuation(sink):
    sink.faults.set("mail", hostile="endless")
    sink.faults.endless_cap = 1 << 20
    c = await raw(sink)
    await c.send(b"MAIL FROM:<s@c.test>\r\n")
    with pytest.raises(MalformedReply, match="more than 500"):
        await c.read_reply(max_lines=500)
    # The sink stops at endless_cap and closes: bounded on its side too.
    assert await c.closed(5)


async def test_hostile_garbage_then_session_goes_on(sink):
    sink.faults.set("mail", hostile="garbage", times=1)
    c = await raw(sink)
    await c.send(b"MAIL FROM:<s@c.test>\r\n")
    with pytest.raises(MalformedReply, match="not a reply line"):
        await c.read_reply()
    assert (await c.command("MAIL FROM:<s@c.test>"))[0] == 250
    await c.close()


async def test_hostile_unsolicited_line(sink):
    sink.faults.set("mail", hostile="unsolicited")
    c = await raw(sink)
    await c.send(b"MAIL FROM:<s@c.test>\r\n")
    assert await c.read_reply() == (250, ["2.1.0 Ok"])
    # The extra line is already on the wire: it answers the next command, desynchronising.
    await c.send(b"RCPT TO:<permfail@d.test>\r\n")
    assert await c.read_reply() == (250, ["2.0.0 sink: an unsolicited reply"])
    assert (await c.read_reply())[0] == 550
    await c.close()


@pytest.mark.parametrize(
    ("kind", "msg"),
    [("long_line", "Response too long"), ("endless", "Response too long"),
     ("garbage", "Malformed SMTP response line")],
)
async def test_aiosmtplib_rejects_hostile_replies(sink, kind, msg):
    # What the relay's aiosmtplib client sees: documented here for the delivery-side authors.
    sink.faults.set("dot", hostile=kind)
    with pytest.raises(aiosmtplib.SMTPResponseException) as e:
        await aio_send(sink, ["a@d.test"])
    assert e.value.code == -1 and msg in e.value.message


# -- LMTP ----------------------------------------------------------------------------------------


async def lmtp_transaction(c: RawClient, rcpts: list[str]) -> None:
    await c.send(b"MAIL FROM:<s@c.test>\r\n" + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts)
                 + b"DATA\r\n")
    for _ in range(len(rcpts) + 1):
        await c.expect(250)
    await c.expect(354)
    await c.send(BODY + b".\r\n")


async def test_lmtp_per_recipient_replies():
    async with Sink(lmtp=True) as s:
        c = await RawClient.connect(*s.address)
        await c.expect(220)
        assert (await c.command("EHLO c.test"))[0] == 500  # LMTP wants LHLO
        await c.send(b"LHLO c.test\r\n")
        await c.expect(250)
        rcpts = ["a@d.test", "data-tempfail@d.test", "data-permfail@d.test", "data-451-x@d.test", "b@d.test"]
        await lmtp_transaction(c, rcpts)
        codes = [(await c.read_reply())[0] for _ in rcpts]
        assert codes == [250, 452, 550, 451, 250]
        [m] = s.messages
        assert m.delivered == ["a@d.test", "b@d.test"]
        assert len(m.replies) == 5 and m.replies[1].startswith("452")
        await c.close()


async def test_lmtp_421_reply_closes_and_later_recipients_are_unanswered():
    async with Sink(lmtp=True) as s:
        c = await raw(s)
        await lmtp_transaction(c, ["a@d.test", "data-421-bye@d.test", "b@d.test"])
        assert (await c.read_reply())[0] == 250
        assert (await c.read_reply())[0] == 421
        assert await c.closed(2) and c.buffer == b""
        assert s.messages[0].delivered == ["a@d.test"]


async def test_lmtp_drop_after_k_replies():
    async with Sink(lmtp=True) as s:
        s.faults.lmtp_drop_after = 2
        c = await raw(s)
        await lmtp_transaction(c, ["a@d.test", "data-permfail@d.test", "b@d.test", "c@d.test"])
        assert (await c.read_reply())[0] == 250
        assert (await c.read_reply())[0] == 550
        assert await c.closed(2)
        assert c.buffer == b""
        [m] = s.messages
        assert m.delivered == ["a@d.test"]  # b and c were never answered
        assert s.deliveries() == {("t-1", "a@d.test", m.sha256): 1}


# -- counters ----------------------------------------------------------------------------------


async def test_peak_concurrent_sessions(sink):
    clients = [await raw(sink, ehlo=False) for _ in range(5)]
    assert sink.current_sessions == 5 and sink.peak_sessions == 5
    for c in clients:
        await c.close()
    await sink.wait_idle(2)
    assert sink.current_sessions == 0 and sink.peak_sessions == 5 and sink.sessions_total == 5
    # Concurrent deliveries, each held open by a slow RCPT.
    sink.reset()
    assert sink.peak_sessions == 0
    await asyncio.gather(*(aio_send(sink, [f"slow-300@{i}.test"]) for i in range(4)))
    assert sink.peak_sessions == 4 and len(sink.messages) == 4


async def test_connection_reuse_counts(sink):
    async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port, start_tls=False, timeout=5) as smtp:
        for i in range(3):
            await smtp.sendmail("s@c.test", [f"r{i}@d.test"], BODY)
    await aio_send(sink, ["x@d.test"])
    assert sink.per_session_messages() == [3, 1]
    assert [m.session for m in sink.messages] == [0, 0, 0, 1]
    assert sink.sessions[0].commands[-1] == "QUIT"
    assert sum(cmd.startswith("MAIL") for cmd in sink.sessions[0].commands) == 3


async def test_max_rcpts():
    async with Sink(max_rcpts=2) as s:
        errors, _ = await aio_send(s, ["a@d.test", "b@d.test", "c@d.test"])
        assert errors["c@d.test"].code == 452
        assert s.messages[0].delivered == ["a@d.test", "b@d.test"]


# -- TLS ---------------------------------------------------------------------------------------


async def test_starttls_with_trustme_ca():
    pair = tls_pair()
    async with Sink(tls_context=pair.server) as s:
        await aio_send(s, ["a@d.test"], start_tls=True, tls_context=pair.client)
        [m] = s.messages
        assert m.tls and s.sessions[0].tls
        cmds = s.sessions[0].commands
        assert cmds[0].startswith("EHLO") and cmds[1] == "STARTTLS" and cmds[2].startswith("EHLO")
        # A client that does not trust the CA fails the handshake; the sink records nothing.
        # (aiosmtplib lets the ssl error through unwrapped.)
        with pytest.raises(ssl.SSLCertVerificationError):
            await aio_send(s, ["a@d.test"], start_tls=True, tls_context=pair.untrusting_client())
        assert len(s.messages) == 1


async def test_starttls_refused_by_phase_fault():
    pair = tls_pair()
    async with Sink(tls_context=pair.server) as s:
        s.faults.set("starttls", reply="454 4.7.0 TLS not available now")
        c = await raw(s)
        assert (await c.command("STARTTLS"))[0] == 454
        await c.close()
        with pytest.raises(aiosmtplib.SMTPException):
            await aio_send(s, ["a@d.test"], start_tls=True, tls_context=pair.client)


async def test_raw_client_starttls_and_implicit_tls():
    pair = tls_pair()
    async with Sink(tls_context=pair.server) as s:
        c = await raw(s)
        await c.command("STARTTLS")
        await c.starttls(pair.client, server_hostname="sink.test")
        code, lines = await c.command("EHLO c.test")
        assert code == 250 and "STARTTLS" not in lines
        await c.close()
    async with Sink(tls_context=pair.server, implicit_tls=True) as s:
        await aio_send(s, ["a@d.test"], use_tls=True, tls_context=pair.client)
        assert s.messages[0].tls
    with pytest.raises(ssl.SSLCertVerificationError):
        expired = tls_pair(expired=True)
        async with Sink(tls_context=expired.server, implicit_tls=True) as s:
            await RawClient.connect(*s.address, ssl_context=expired.client, server_hostname="sink.test")


# -- threaded variant ---------------------------------------------------------------------------


def test_threaded_sink_with_blocking_smtplib():
    with ThreadedSink(host="127.0.0.3") as ts:
        assert ts.address == ("127.0.0.3", ts.port)
        ts.faults.set("rcpt", reply="550 5.1.1 no", times=1)
        with smtplib.SMTP(ts.host, ts.port, timeout=5) as smtp:
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                smtp.sendmail("s@c.test", ["a@d.test"], BODY)
            smtp.sendmail("s@c.test", ["a@d.test"], BODY)
        [m] = ts.wait_for(1)
        assert m.data == BODY and m.delivered == ["a@d.test"]
        assert ts.snapshot()[0].sha256 == m.sha256
        ts.wait_idle()
        assert ts.current_sessions == 0
