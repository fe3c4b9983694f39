"""The SMTP delivery client against real sinks on loopback: docs/reliability.md cases 3, 19, 22-24, 27, 38-45."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from fastrelay import _impl
from fastrelay.delivery import OK, PERM, TEMP, ConnectError, Hop, RcptResult, Settings
from fastrelay.delivery.connect import connect
from fastrelay.delivery.smtp import SMTPConnection
from tests.support import FaultProxy, Sink, free_port, tls_pair

FAST = Settings(helo_name="relay.test", connect_timeout=0.5, greeting_timeout=0.5, ehlo_timeout=0.5,
                tls_timeout=2.0, mail_timeout=0.5, rcpt_timeout=0.5, data_timeout=0.5, done_timeout=0.5,
                rset_timeout=0.5)
BODY = b"X-Test-Id: t-1\r\nSubject: hello\r\n\r\nline one\r\n"


def hop(host: str, port: int) -> Hop:
    return Hop(host, port, "smtp", "sink.test", 10)


def settings(**kw) -> Settings:
    return dataclasses.replace(FAST, **kw)


async def open_conn(sink: Sink, s: Settings = FAST) -> SMTPConnection:
    conn = await connect(hop(sink.host, sink.port), s)
    assert conn.usable and conn.remote == f"{sink.host}:{sink.port}"
    return conn


async def send(sink: Sink, rcpts: list[str], body: bytes = BODY, s: Settings = FAST,
               sender: str = "s@src.test", mail_params: str = "") -> tuple[list[RcptResult], SMTPConnection]:
    conn = await open_conn(sink, s)
    try:
        res = await conn.deliver(sender, mail_params, [(r, "") for r in rcpts], body)
    finally:
        await conn.close()
    assert len(res) == len(rcpts)
    return res, conn


def statuses(res: list[RcptResult]) -> list[tuple[int, int]]:
    return [(r.status, r.code) for r in res]


# -- connecting (cases 38, 39) -----------------------------------------------------------------------


async def test_connect_refused():
    port = free_port("127.0.0.4")
    with pytest.raises(ConnectError) as e:
        await connect(hop("127.0.0.4", port), FAST)
    assert e.value.code == 451 and e.value.text.startswith("4.4.1")


async def test_blackholed_host_is_given_up_in_time():
    async with Sink(host="127.0.0.5") as sink, FaultProxy(*sink.address, host="127.0.0.5") as proxy:
        proxy.blackhole = True  # accepts, then never says a word
        t = time.monotonic()
        with pytest.raises(ConnectError) as e:
            await connect(hop(*proxy.address), FAST)
        assert time.monotonic() - t < FAST.connect_timeout + FAST.greeting_timeout + 0.5
        assert e.value.code == 451 and e.value.text.startswith("4.4.2")


async def test_reset_on_connect():
    async with Sink(host="127.0.0.5") as sink, FaultProxy(*sink.address, host="127.0.0.5") as proxy:
        proxy.reset_new = True
        with pytest.raises(ConnectError) as e:
            await connect(hop(*proxy.address), FAST)
        assert e.value.code == 451


@pytest.mark.parametrize("code", [421, 554])
async def test_greeting_refusal_is_a_connect_error(code):
    async with Sink(host="127.0.0.6") as sink:
        sink.faults.set("greeting", reply=f"{code} {code // 100}.3.2 go away")
        with pytest.raises(ConnectError) as e:
            await open_conn(sink)
        assert e.value.code == code and e.value.text == f"{code // 100}.3.2 go away"
        assert sink.messages == []


@pytest.mark.parametrize("kind", ["garbage", "long_line", "endless"])
async def test_hostile_greeting_or_ehlo_is_a_connect_error(kind):
    async with Sink(host="127.0.0.6") as sink:
        sink.faults.endless_cap = 1 << 20
        for phase in ("greeting", "ehlo"):
            sink.faults.set(phase, hostile=kind, times=1)
            with pytest.raises(ConnectError) as e:
                await open_conn(sink)
            assert e.value.code == 451


async def test_ehlo_refused_falls_back_to_helo():
    async with Sink(host="127.0.0.7") as sink:
        sink.faults.set("ehlo", reply="502 5.5.2 EHLO not implemented", times=1)
        res, _ = await send(sink, ["a@d.test"], mail_params="BODY=8BITMIME")
        assert statuses(res) == [(OK, 250)]
        cmds = sink.sessions[0].commands
        assert cmds[0].startswith("EHLO") and cmds[1] == "HELO relay.test"
        assert sink.messages[0].mail_options == []  # no extensions after HELO


async def test_esmtp_off_means_helo_only():
    async with Sink(host="127.0.0.7") as sink:
        res, _ = await send(sink, ["a@d.test"], s=settings(esmtp=False))
        assert statuses(res) == [(OK, 250)]
        assert sink.sessions[0].commands[0] == "HELO relay.test"


async def test_connect_dispatch_xfer_goes_to_the_xfer_client():
    # hop.proto "xfer" is the XFER client's: nothing listens on port 1, so it cannot connect.
    with pytest.raises(ConnectError) as e:
        await connect(Hop("127.0.0.2", 1, "xfer", "x.test", 0), FAST)
    assert e.value.code == 451 and e.value.text.startswith("4.4.1 Connection to 127.0.0.2:1 failed")


# -- per-phase timeouts and lost connections (cases 40, 43) -----------------------------------------


@pytest.mark.parametrize("phase", ["mail", "rcpt", "data", "dot"])
async def test_phase_timeout_defers(phase):
    async with Sink(host="127.0.0.2") as sink:
        sink.faults.set(phase, delay=1.5)
        t = time.monotonic()
        conn = await open_conn(sink)
        res = await conn.deliver("s@src.test", "", [("a@d.test", ""), ("b@d.test", "")], BODY)
        assert time.monotonic() - t < 1.4
        assert statuses(res) == [(TEMP, 451)] * 2
        assert not conn.usable
        assert ("possible duplicate" in res[0].text) == (phase == "dot")
        await conn.close()


async def test_data_and_done_timeouts_are_separate():
    # RFC 5321 §4.5.3.2: DATA init and the reply after the dot have their own limits (case 40).
    s = settings(data_timeout=0.3, done_timeout=1.5)
    async with Sink(host="127.0.0.2") as sink:
        sink.faults.set("dot", delay=0.7)
        res, _ = await send(sink, ["a@d.test"], s=s)
        assert statuses(res) == [(OK, 250)]
        sink.faults.set("data", delay=0.7)
        res, conn = await send(sink, ["a@d.test"], s=s)
        assert statuses(res) == [(TEMP, 451)] and not conn.usable
        assert "possible duplicate" not in res[0].text
        assert len(sink.messages) == 1


@pytest.mark.parametrize("how", ["drop-in-data", "body-reset", "body-421", "rcpt-drop", "mail-reset"])
async def test_lost_connection_defers_unresolved(how):
    async with Sink(host="127.0.0.3") as sink:
        rcpts = ["a@d.test", "permfail@d.test"]
        if how == "drop-in-data":
            rcpts.append("drop-in-data@d.test")
        elif how == "body-reset":
            sink.faults.set("body", reset=True)
        elif how == "body-421":
            sink.faults.set("body", reply="421 4.4.2 timeout in DATA")
        elif how == "rcpt-drop":
            sink.faults.set("rcpt", drop=True)
            rcpts = ["a@d.test", "b@d.test"]
        else:
            sink.faults.set("mail", reset=True)
            rcpts = ["a@d.test", "b@d.test"]
        conn = await open_conn(sink)
        res = await conn.deliver("s@src.test", "", [(r, "") for r in rcpts], BODY)
        assert not conn.usable
        assert sink.messages == []
        for r, st in zip(rcpts, res, strict=True):
            if r == "permfail@d.test":
                assert st.status == PERM and st.code == 550  # resolved at RCPT: kept
            else:
                assert st.status == TEMP and st.code in (451, 421)
        await conn.close()
        # An unusable connection refuses further work without touching the network.
        again = await conn.deliver("s@src.test", "", [("a@d.test", "")], BODY)
        assert statuses(again) == [(TEMP, 451)]


async def test_421_at_rcpt_defers_the_rest_and_ends_the_session():
    async with Sink(host="127.0.0.3") as sink:
        res, conn = await send(sink, ["a@d.test", "421-closing@d.test", "b@d.test"])
        assert statuses(res) == [(TEMP, 451), (TEMP, 421), (TEMP, 451)]
        assert not conn.usable and sink.messages == []


# -- transaction results (cases 41-43) ------------------------------------------------------------


@pytest.mark.parametrize(("reply", "status"), [("451 4.3.0 try later", TEMP), ("550 5.7.1 go away", PERM)])
async def test_mail_from_failure_applies_to_all(reply, status):
    async with Sink(host="127.0.0.4") as sink:
        sink.faults.set("mail", reply=reply, times=1)
        conn = await open_conn(sink)
        res = await conn.deliver("s@src.test", "", [("a@d.test", ""), ("b@d.test", "")], BODY)
        code = int(reply[:3])
        assert res == [RcptResult(status, code, reply[4:])] * 2
        assert conn.usable and sink.messages == []
        # The connection goes on: RSET, then the next message is delivered.
        res = await conn.deliver("s@src.test", "", [("a@d.test", "")], BODY)
        assert statuses(res) == [(OK, 250)]
        await conn.close()


async def test_mixed_rcpt_results():
    async with Sink(host="127.0.0.4") as sink:
        rcpts = ["ok1@d.test", "tempfail@d.test", "permfail@d.test", "ok2@d.test"]
        res, _ = await send(sink, rcpts)
        assert res[1] == RcptResult(TEMP, 450, "4.2.0 sink: tempfail")
        assert res[2] == RcptResult(PERM, 550, "5.1.1 sink: permfail")
        assert res[0] == res[3] and res[0].status == OK and res[0].text.startswith("2.0.0 Ok: queued as")
        [m] = sink.messages
        assert m.rcpt_tos == m.delivered == ["ok1@d.test", "ok2@d.test"]
        assert m.data == BODY


async def test_no_recipient_accepted_means_no_data():
    async with Sink(host="127.0.0.4") as sink:
        # Without PIPELINING (with it, DATA goes out in the group: test_pipelined_nobody_accepted).
        sink.faults.hide.add("PIPELINING")
        conn = await open_conn(sink)
        res = await conn.deliver("s@src.test", "", [("tempfail@d.test", ""), ("permfail@d.test", "")], BODY)
        assert statuses(res) == [(TEMP, 450), (PERM, 550)]
        assert conn.usable
        cmds = sink.sessions[0].commands
        assert "DATA" not in cmds and cmds[-1] == "RSET"
        assert sink.messages == [] and sink.rejected == []
        # After that RSET the next message needs no other.
        res = await conn.deliver("s@src.test", "", [("a@d.test", "")], BODY)
        assert statuses(res) == [(OK, 250)]
        await conn.close()
        assert sink.sessions[0].commands.count("RSET") == 1


async def test_remote_recipient_limit_splits_transactions():
    async with Sink(host="127.0.0.8", max_rcpts=2) as sink:
        rcpts = [f"r{i}@d.test" for i in range(5)] + ["permfail@d.test"]
        res, conn = await send(sink, rcpts)
        assert [r.status for r in res] == [OK] * 5 + [PERM]
        assert [m.rcpt_tos for m in sink.messages] == [["r0@d.test", "r1@d.test"], ["r2@d.test", "r3@d.test"],
                                                     ["r4@d.test"]]
        assert sink.sessions_total == 1 and conn.remote == f"{sink.host}:{sink.port}"


@pytest.mark.parametrize(("cue", "expect"), [("data-tempfail", (TEMP, 451)), ("data-permfail", (PERM, 554))])
async def test_reply_after_dot_applies_to_accepted_only(cue, expect):
    async with Sink(host="127.0.0.8") as sink:
        conn = await open_conn(sink)
        res = await conn.deliver("s@src.test", "", [("a@d.test", ""), (f"{cue}@d.test", ""),
                                                    ("permfail@d.test", "")], BODY)
        assert statuses(res) == [expect, expect, (PERM, 550)]
        assert sink.messages == [] and len(sink.rejected) == 1
        assert conn.usable
        res = await conn.deliver("s@src.test", "", [("a@d.test", "")], BODY)
        assert statuses(res) == [(OK, 250)]
        await conn.close()


async def test_several_messages_on_one_connection():
    async with Sink(host="127.0.0.9") as sink:
        conn = await open_conn(sink)
        for i in range(3):
            res = await conn.deliver(f"s{i}@src.test", "", [(f"r{i}@d.test", "")], BODY)
            assert statuses(res) == [(OK, 250)]
        await conn.close()
        await sink.wait_idle()
        assert sink.per_session_messages() == [3]
        cmds = [c.split(":")[0] for c in sink.sessions[0].commands]
        assert cmds == ["EHLO relay.test", "MAIL FROM", "RCPT TO", "DATA",
                        "RSET", "MAIL FROM", "RCPT TO", "DATA",
                        "RSET", "MAIL FROM", "RCPT TO", "DATA", "QUIT"]


# -- hostile replies (case 44) ------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["mail", "rcpt", "data", "dot", "rset"])
@pytest.mark.parametrize("kind", ["long_line", "endless", "garbage", "unsolicited"])
async def test_hostile_reply_defers(phase, kind):
    async with Sink(host="127.0.0.9") as sink:
        sink.faults.endless_cap = 8 << 20
        conn = await open_conn(sink)
        if phase == "rset":  # RSET comes before the second message
            assert statuses(await conn.deliver("s@src.test", "", [("a@d.test", "")], BODY)) == [(OK, 250)]
        sink.faults.set(phase, hostile=kind)
        t = time.monotonic()
        res = await conn.deliver("s@src.test", "", [("a@d.test", ""), ("b@d.test", "")], BODY)
        assert time.monotonic() - t < 1.0  # no hang; an endless reply is cut off, not read to the end
        assert statuses(res) == [(TEMP, 451)] * 2
        assert ("possible duplicate" in res[0].text) == (phase == "dot")
        assert not conn.usable
        await conn.close()


# -- TLS (case 45) ---------------------------------------------------------------------------------


async def test_starttls_opportunistic():
    pair = tls_pair()
    async with Sink(host="127.0.0.2", tls_context=pair.server) as sink:
        res, conn = await send(sink, ["a@d.test"])
        assert statuses(res) == [(OK, 250)] and conn.tls
        [m] = sink.messages
        assert m.tls
        cmds = sink.sessions[0].commands
        assert cmds[:3] == ["EHLO relay.test", "STARTTLS", "EHLO relay.test"]  # RFC 3207 §4.2


async def test_starttls_454_goes_on_in_plaintext():
    pair = tls_pair()
    async with Sink(host="127.0.0.2", tls_context=pair.server) as sink:
        sink.faults.set("starttls", reply="454 4.7.0 TLS not available now")
        res, conn = await send(sink, ["a@d.test"])
        assert statuses(res) == [(OK, 250)] and not conn.tls
        assert not sink.messages[0].tls and sink.sessions_total == 1


async def test_starttls_disabled():
    pair = tls_pair()
    async with Sink(host="127.0.0.2", tls_context=pair.server) as sink:
        res, _ = await send(sink, ["a@d.test"], s=settings(tls="disabled"))
        assert statuses(res) == [(OK, 250)]
        assert "STARTTLS" not in sink.sessions[0].commands and not sink.messages[0].tls


async def test_opportunistic_tls_accepts_a_bad_certificate_without_verify():
    pair = tls_pair(expired=True)
    async with Sink(host="127.0.0.3", tls_context=pair.server) as sink:
        res, conn = await send(sink, ["a@d.test"])
        assert statuses(res) == [(OK, 250)] and conn.tls and sink.messages[0].tls


async def test_opportunistic_tls_failed_handshake_retries_in_plaintext():
    pair = tls_pair()  # its CA is not in the system store, and tls_verify is on
    async with Sink(host="127.0.0.3", tls_context=pair.server) as sink:
        res, conn = await send(sink, ["a@d.test"], s=settings(tls_verify=True))
        assert statuses(res) == [(OK, 250)] and not conn.tls
        assert sink.sessions_total == 2  # a new connection, in plaintext
        assert not sink.messages[0].tls and sink.messages[0].session == 1
        assert "STARTTLS" not in sink.sessions[1].commands


@pytest.mark.parametrize("fault", ["untrusted", "expired", "hidden", "454"])
async def test_required_tls_never_falls_back(fault, tmp_path):
    pair = tls_pair(expired=fault == "expired")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pair.ca_pem)
    s = settings(tls="required", tls_verify=True, tls_ca=None if fault == "untrusted" else str(ca))
    async with Sink(host="127.0.0.4", tls_context=pair.server) as sink:
        if fault == "hidden":
            sink.faults.hide.add("STARTTLS")
        elif fault == "454":
            sink.faults.set("starttls", reply="454 4.7.0 TLS not available now")
        with pytest.raises(ConnectError) as e:
            await open_conn(sink, s)
        assert e.value.code == 451 and e.value.text[:5] in ("4.7.4", "4.7.5")
        assert sink.messages == [] and sink.sessions_total == 1
        assert not any(c.startswith("MAIL") for c in sink.sessions[0].commands)


async def test_required_tls_with_trusted_ca_file(tmp_path):
    pair = tls_pair()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pair.ca_pem)
    async with Sink(host="127.0.0.4", tls_context=pair.server) as sink:
        s = settings(tls="required", tls_verify=True, tls_ca=str(ca))
        res, conn = await send(sink, ["a@d.test"], s=s)
        assert statuses(res) == [(OK, 250)] and conn.tls and sink.messages[0].tls


# -- envelope and content (cases 3, 19, 22-24, 27) ------------------------------------------------------


async def test_quoted_local_parts_go_out_byte_exact():
    async with Sink(host="127.0.0.5") as sink:
        rcpts = ['"john..doe"@x.test', '"a b"@x.test', "MiXeD@x.test"]
        res, _ = await send(sink, rcpts, sender='"s..x"@src.test')
        assert [r.status for r in res] == [OK] * 3
        cmds = sink.sessions[0].commands
        assert f'MAIL FROM:<"s..x"@src.test> SIZE={len(BODY)}' in cmds
        assert 'RCPT TO:<"john..doe"@x.test>' in cmds and 'RCPT TO:<"a b"@x.test>' in cmds
        assert "RCPT TO:<MiXeD@x.test>" in cmds
        # (aiosmtpd unquotes some local parts in its envelope; the command lines above are the wire bytes)
        assert len(sink.messages[0].rcpt_tos) == 3


async def test_null_sender():
    async with Sink(host="127.0.0.5") as sink:
        res, _ = await send(sink, ["a@d.test"], sender="")
        assert statuses(res) == [(OK, 250)]
        assert f"MAIL FROM:<> SIZE={len(BODY)}" in sink.sessions[0].commands
        assert sink.messages[0].mail_from == "<>"


async def test_control_characters_in_the_envelope_are_never_sent():
    # docs/reliability.md case 22: aiosmtplib refuses them; they fail only what they are in.
    async with Sink(host="127.0.0.5") as sink:
        conn = await open_conn(sink)
        evil = "b\r\nRCPT TO:<evil@d.test>@d.test"
        res = await conn.deliver("s@src.test", "", [("a@d.test", ""), (evil, "")], BODY)
        assert res[0].status == OK and res[1] == RcptResult(PERM, 501, res[1].text)
        assert res[1].text.startswith("5.1.3")
        res = await conn.deliver("s\r\nRSET@src.test", "", [("a@d.test", "")], BODY)
        assert res[0].status == PERM and res[0].text.startswith("5.1.7")
        res = await conn.deliver("s@src.test", "", [("c@d.test", "")], BODY)
        assert res[0].status == OK and conn.usable
        await conn.close()
        assert [m.rcpt_tos for m in sink.messages] == [["a@d.test"], ["c@d.test"]]
        assert not any("evil" in c or c.startswith("RSET@") for c in sink.sessions[0].commands)


async def test_dot_stuffing_and_bare_line_ends_round_trip():
    body = b"Subject: dots\n\n.x\nbare lf\nbare cr\rcrlf\r\n.\r\n..two\r\n.\nend"
    async with Sink(host="127.0.0.6") as sink:
        res, _ = await send(sink, ["a@d.test"], body=body)
        assert statuses(res) == [(OK, 250)]
        [m] = sink.messages  # one message: no line of the body ended DATA early
        assert m.data == (b"Subject: dots\r\n\r\n.x\r\nbare lf\r\nbare cr\r\ncrlf\r\n"
                          b".\r\n..two\r\n.\r\nend\r\n")


async def test_mail_parameters_passed_on_where_offered():
    body = "Subject: ü\r\n\r\n8-bit body\r\n".encode()
    async with Sink(host="127.0.0.6") as sink:
        params = "SIZE=5 BODY=8BITMIME SMTPUTF8 AUTH=<>"
        res, _ = await send(sink, ["ü@d.test"], body=body, mail_params=params)
        assert statuses(res) == [(OK, 250)]
        m = sink.messages[0]
        assert m.mail_options == [f"SIZE={len(body)}", "BODY=8BITMIME", "SMTPUTF8"]
        assert m.rcpt_tos == ["ü@d.test"]


async def test_8bit_body_to_a_host_without_8bitmime_goes_as_it_is():
    body = "Subject: x\r\n\r\nnaïve\r\n".encode()
    async with Sink(host="127.0.0.7") as sink:
        sink.faults.hide.add("8BITMIME")  # and refuses BODY=8BITMIME
        res, _ = await send(sink, ["a@d.test"], body=body, mail_params="BODY=8BITMIME")
        assert statuses(res) == [(OK, 250)]
        assert sink.messages[0].data == body and "BODY=8BITMIME" not in sink.messages[0].mail_options


async def test_smtputf8_message_to_a_host_without_it_bounces():
    async with Sink(host="127.0.0.7") as sink:
        sink.faults.hide.add("SMTPUTF8")
        res, _ = await send(sink, ["ü@d.test", "a@d.test"], mail_params="SMTPUTF8")
        assert [r.status for r in res] == [PERM, PERM]
        assert all(r.text.startswith("5.6.7") for r in res)
        assert not any(c.startswith("MAIL") for c in sink.sessions[0].commands)  # no downgrade


async def test_reply_text_is_cleaned_and_capped():
    async with Sink(host="127.0.0.8") as sink:
        sink.faults.set("mail", reply="550-5.7.1 first line\x1b[31m\r\n550 5.7.1 " + "y" * 2000)
        res, _ = await send(sink, ["a@d.test"])
        assert res[0].status == PERM and res[0].code == 550
        assert res[0].text.startswith("5.7.1 first line [31m 5.7.1 yyy")
        assert res[0].text.isprintable() and len(res[0].text) <= 500


async def test_close_sends_quit_and_never_raises():
    async with Sink(host="127.0.0.9") as sink:
        conn = await open_conn(sink)
        await conn.close()
        await conn.close()
        await sink.wait_idle()
        assert sink.sessions[0].commands[-1] == "QUIT"
        conn = await open_conn(sink)
        sink.faults.set("quit", delay=5)
        t = time.monotonic()
        await conn.close()  # a peer that does not answer QUIT is dropped
        assert time.monotonic() - t < 3
    # A connection whose peer is gone closes quietly too.
    async with Sink(host="127.0.0.9") as sink:
        conn = await open_conn(sink)
    await asyncio.sleep(0.05)
    await conn.close()


# -- pipelining (RFC 2920; cases 41-44) ---------------------------------------------------------------


class PipeServer(asyncio.Protocol):
    """A raw SMTP server that shows what arrived in which packet: it records every data_received
    chunk and answers all complete commands of a chunk in one write, as a pipelining server does.
    RCPT by local part: ``perm*`` 550, ``temp*`` 450; ``max_rcpts`` gives 452 past the limit."""

    def __init__(self, pipe: Pipe):
        self.pipe = pipe
        self.buf = b""
        self.mail: str | None = None
        self.rcpts: list[str] = []
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pipe.chunks.append([])
        self.pipe.transports.append(transport)
        transport.write(b"220 pipe.test ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.pipe.chunks[-1].append(data)
        self.buf += data
        out: list[bytes] = []
        while True:
            if self.in_data:
                if self.buf.startswith(b".\r\n"):
                    end, body = 3, b""
                else:
                    k = self.buf.find(b"\r\n.\r\n")
                    if k < 0:
                        break
                    end, body = k + 5, self.buf[:k + 2]
                self.buf = self.buf[end:]
                self.in_data = False
                self.pipe.messages.append((self.mail, self.rcpts, body.replace(b"\r\n..", b"\r\n.")))
                out.append(b"250 2.0.0 queued\r\n" if self.rcpts else b"554 5.5.1 no valid recipients\r\n")
                out.append(self.pipe.extra.get(".", b""))
                self.mail, self.rcpts = None, []
                continue
            k = self.buf.find(b"\r\n")
            if k < 0:
                break
            line, self.buf = self.buf[:k].decode(), self.buf[k + 2:]
            verb = line[:4].upper()
            out.append(self.answer(verb, line).encode() + b"\r\n" + self.pipe.extra.get(verb, b""))
            if verb == "QUIT":
                break
        if out:
            self.transport.write(b"".join(out))

    def answer(self, verb: str, line: str) -> str:
        pipe = self.pipe
        if verb == "EHLO":
            return "250-pipe.test\r\n250-8BITMIME\r\n250-SIZE 1000000\r\n250 PIPELINING"
        if verb == "MAIL":
            if pipe.mail_reply:
                return pipe.mail_reply
            self.mail = line[11:].partition(">")[0]
            return "250 2.1.0 Ok"
        if verb == "RCPT":
            addr = line[9:].partition(">")[0]
            lp = addr.partition("@")[0]
            if self.mail is None:
                return "503 5.5.1 need MAIL"
            if lp.startswith("perm"):
                return "550 5.1.1 no such user"
            if lp.startswith("temp"):
                return "450 4.2.0 try later"
            if pipe.max_rcpts is not None and len(self.rcpts) >= pipe.max_rcpts:
                return "452 4.5.3 too many recipients"
            self.rcpts.append(addr)
            return "250 2.1.5 Ok"
        if verb == "DATA":
            if self.mail is None or not (self.rcpts or pipe.always_354):
                return "503 5.5.1 no valid recipients"
            self.in_data = True
            return "354 go ahead"
        if verb == "RSET":
            self.mail, self.rcpts = None, []
            return "250 2.0.0 Ok"
        if verb == "QUIT":
            self.transport.close()
            return "221 2.0.0 Bye"
        return "502 5.5.2 what"


class Pipe:
    def __init__(self, *, max_rcpts: int | None = None, always_354: bool = False, mail_reply: str | None = None,
                 extra: dict[str, bytes] | None = None):
        self.max_rcpts = max_rcpts
        self.always_354 = always_354  # a server not following RFC 2920 §3.1: 354 with no recipient
        self.mail_reply = mail_reply
        self.extra = extra or {}  # bytes sent after the reply to a verb: unsolicited data (case 44)
        self.chunks: list[list[bytes]] = []  # per connection, every data_received chunk
        self.transports: list[asyncio.BaseTransport] = []
        self.messages: list[tuple[str | None, list[str], bytes]] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Pipe:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: PipeServer(self), "127.0.0.7", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    @property
    def hop(self) -> Hop:
        return hop("127.0.0.7", self.server.sockets[0].getsockname()[1])

    def packets(self) -> list[bytes]:
        """The chunks of the only connection after EHLO, QUIT left out."""
        [chunks] = self.chunks
        assert chunks[0] == b"EHLO relay.test\r\n"
        return [c for c in chunks[1:] if c != b"QUIT\r\n"]


def mail_line(sender: str = "s@src.test", body: bytes = BODY) -> bytes:
    return f"MAIL FROM:<{sender}> SIZE={len(body)}\r\n".encode()


async def test_pipelined_group_is_one_packet_and_rset_joins_it():
    # (a) MAIL, every RCPT and DATA in ONE write; the body only after the 354; (g) from the second
    # message on, RSET opens the group.
    async with Pipe() as pipe:
        conn = await connect(pipe.hop, FAST)
        for _ in range(3):
            res = await conn.deliver("s@src.test", "", [("a@d.test", ""), ("b@d.test", "")], BODY)
            assert statuses(res) == [(OK, 250)] * 2
        await conn.close()
        group = mail_line() + b"RCPT TO:<a@d.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n"
        body = BODY + b".\r\n"
        assert pipe.packets() == [group, body, b"RSET\r\n" + group, body, b"RSET\r\n" + group, body]
        assert pipe.messages == [("s@src.test", ["a@d.test", "b@d.test"], BODY)] * 3


async def test_pipelined_mixed_rcpt_results():
    # (b) docs/reliability.md case 42: each RCPT reply of the group counts for its own recipient.
    async with Pipe() as pipe:
        conn = await connect(pipe.hop, FAST)
        rcpts = ["ok1@d.test", "temp@d.test", "perm@d.test", "ok2@d.test"]
        res = await conn.deliver("s@src.test", "", [(r, "") for r in rcpts], BODY)
        assert res[1] == RcptResult(TEMP, 450, "4.2.0 try later")
        assert res[2] == RcptResult(PERM, 550, "5.1.1 no such user")
        assert res[0] == res[3] == RcptResult(OK, 250, "2.0.0 queued")
        assert conn.usable
        await conn.close()
        assert pipe.packets()[0] == mail_line() + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts) + b"DATA\r\n"
        assert pipe.messages == [("s@src.test", ["ok1@d.test", "ok2@d.test"], BODY)]


async def test_pipelined_nobody_accepted():
    # (c) Every RCPT refused: DATA went out in the group and got 503 (RFC 2920 §3.1); nothing
    # reaches the sink, and the session goes on with RSET first.
    async with Sink(host="127.0.0.4") as sink:
        conn = await open_conn(sink)
        res = await conn.deliver("s@src.test", "", [("tempfail@d.test", ""), ("permfail@d.test", "")], BODY)
        assert statuses(res) == [(TEMP, 450), (PERM, 550)]
        assert conn.usable and sink.messages == [] and sink.rejected == []
        res = await conn.deliver("s@src.test", "", [("a@d.test", "")], BODY)
        assert statuses(res) == [(OK, 250)]
        await conn.close()
        await sink.wait_idle()
        cmds = [c.split(":")[0] for c in sink.sessions[0].commands]
        assert cmds == ["EHLO relay.test", "MAIL FROM", "RCPT TO", "RCPT TO", "DATA",
                        "RSET", "MAIL FROM", "RCPT TO", "DATA", "QUIT"]
        assert [m.rcpt_tos for m in sink.messages] == [["a@d.test"]]


async def test_pipelined_354_although_nobody_was_accepted():
    # (d) A server not following RFC 2920 says 354 with no recipient: the client ends the empty
    # message with a lone dot, ignores its reply, and the session stays usable.
    async with Pipe(always_354=True) as pipe:
        conn = await connect(pipe.hop, FAST)
        res = await conn.deliver("s@src.test", "", [("temp@d.test", ""), ("perm@d.test", "")], BODY)
        assert statuses(res) == [(TEMP, 450), (PERM, 550)] and conn.usable
        res = await conn.deliver("s@src.test", "", [("a@d.test", "")], BODY)
        assert statuses(res) == [(OK, 250)]
        await conn.close()
        assert pipe.packets()[1] == b".\r\n"  # no body went out for nobody
        assert pipe.messages == [("s@src.test", [], b""), ("s@src.test", ["a@d.test"], BODY)]


@pytest.mark.parametrize(("reply", "status"), [("451 4.3.0 try later", TEMP), ("550 5.7.1 go away", PERM)])
async def test_pipelined_mail_refused(reply, status):
    # (e) docs/reliability.md case 41: the MAIL result is every recipient's; the 503s that follow for the
    # RCPTs and DATA of the group are read and decide nothing.
    async with Sink(host="127.0.0.4") as sink:
        sink.faults.set("mail", reply=reply, times=1)
        conn = await open_conn(sink)
        res = await conn.deliver("s@src.test", "", [("a@d.test", ""), ("permfail@d.test", "")], BODY)
        assert res == [RcptResult(status, int(reply[:3]), reply[4:])] * 2
        assert conn.usable and sink.messages == []
        res = await conn.deliver("s@src.test", "", [("b@d.test", "")], BODY)
        assert statuses(res) == [(OK, 250)]
        await conn.close()
        await sink.wait_idle()
        cmds = [c.split(":")[0] for c in sink.sessions[0].commands]
        assert cmds == ["EHLO relay.test", "MAIL FROM", "RCPT TO", "RCPT TO", "DATA",
                        "RSET", "MAIL FROM", "RCPT TO", "DATA", "QUIT"]


async def test_pipelined_mail_421_ends_the_session():
    async with Pipe(mail_reply="421 4.3.2 closing") as pipe:
        conn = await connect(pipe.hop, FAST)
        res = await conn.deliver("s@src.test", "", [("a@d.test", ""), ("b@d.test", "")], BODY)
        assert res == [RcptResult(TEMP, 421, "4.3.2 closing")] * 2 and not conn.usable
        await conn.close()


async def test_pipelined_452_split():
    # (f) docs/reliability.md case 42: past a remote 452 the rest go in new pipelined transactions;
    # replies after the 452 in the same group still count (permfail is answered at once).
    async with Sink(host="127.0.0.8", max_rcpts=2) as sink:
        rcpts = [f"r{i}@d.test" for i in range(5)] + ["permfail@d.test"]
        res, _ = await send(sink, rcpts)
        assert statuses(res) == [(OK, 250)] * 5 + [(PERM, 550)]
        assert [m.rcpt_tos for m in sink.messages] == [["r0@d.test", "r1@d.test"], ["r2@d.test", "r3@d.test"],
                                                     ["r4@d.test"]]
        await sink.wait_idle()
        cmds = [c.split(":")[0] for c in sink.sessions[0].commands]
        assert cmds == ["EHLO relay.test", "MAIL FROM"] + ["RCPT TO"] * 6 + ["DATA", "RSET", "MAIL FROM"] + \
            ["RCPT TO"] * 3 + ["DATA", "RSET", "MAIL FROM", "RCPT TO", "DATA", "QUIT"]
        assert sink.sessions[0].commands.count("RCPT TO:<permfail@d.test>") == 1
    async with Pipe(max_rcpts=1) as pipe:
        conn = await connect(pipe.hop, FAST)
        res = await conn.deliver("s@src.test", "", [("a@d.test", ""), ("b@d.test", "")], BODY)
        assert statuses(res) == [(OK, 250)] * 2
        await conn.close()
        packets = pipe.packets()
        assert packets[0] == mail_line() + b"RCPT TO:<a@d.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n"
        assert packets[2] == b"RSET\r\n" + mail_line() + b"RCPT TO:<b@d.test>\r\nDATA\r\n"
        assert [m[1] for m in pipe.messages] == [["a@d.test"], ["b@d.test"]]


@pytest.mark.parametrize(("verb", "extra"), [("RCPT", b"250 2.1.5 me too\r\n"), ("DATA", b"25"), ("MAIL", b"2")])
async def test_pipelined_reply_data_nobody_asked_for(verb, extra):
    # docs/reliability.md case 44: a whole extra reply, or bytes after the last reply of the group (even
    # a part of a line): the replies are out of step; no body goes out, nothing is trusted.
    async with Pipe(extra={verb: extra}) as pipe:
        conn = await connect(pipe.hop, FAST)
        res = await conn.deliver("s@src.test", "", [("a@d.test", ""), ("perm@d.test", "")], BODY)
        assert statuses(res) == [(TEMP, 451)] * 2 and res[0].text.startswith("4.5.0")
        assert "possible duplicate" not in res[0].text and not conn.usable
        await conn.close()
        assert pipe.messages == []


async def test_pipelined_unsolicited_reply_after_the_dot():
    # Case 44 after the dot: the message was taken, but what the replies meant is unknown.
    async with Pipe(extra={".": b"250 2.0.0 again\r\n"}) as pipe:
        conn = await connect(pipe.hop, FAST)
        res = await conn.deliver("s@src.test", "", [("a@d.test", "")], BODY)
        assert statuses(res) == [(TEMP, 451)] and "possible duplicate" in res[0].text and not conn.usable
        await conn.close()
        assert len(pipe.messages) == 1


@pytest.mark.parametrize("stray", [b"250 2.0.0 stray\r\n", b"25"])
async def test_reply_data_between_messages_stops_the_next_group(stray):
    async with Pipe() as pipe:
        conn = await connect(pipe.hop, FAST)
        assert statuses(await conn.deliver("s@src.test", "", [("a@d.test", "")], BODY)) == [(OK, 250)]
        pipe.transports[0].write(stray)  # nobody asked
        await asyncio.sleep(0.05)
        res = await conn.deliver("s@src.test", "", [("b@d.test", "")], BODY)
        assert statuses(res) == [(TEMP, 451)] and res[0].text.startswith("4.5.0") and not conn.usable
        await conn.close()
        assert pipe.packets() == [mail_line() + b"RCPT TO:<a@d.test>\r\nDATA\r\n", BODY + b".\r\n"]


@pytest.mark.parametrize("case", ["mixed", "split", "unsolicited", "several"])
async def test_without_pipelining_one_command_at_a_time(case):
    # The same transactions where PIPELINING is not offered: one command, one reply (RFC 5321 §4.1.1).
    async with Sink(host="127.0.0.9", max_rcpts=2 if case == "split" else None) as sink:
        sink.faults.hide.add("PIPELINING")
        conn = await open_conn(sink)
        assert not conn._pipelining
        rcpts = [("a@d.test", ""), ("permfail@d.test", ""), ("b@d.test", ""), ("c@d.test", "")]
        if case == "unsolicited":
            sink.faults.set("rcpt", hostile="unsolicited", times=1)
            res = await conn.deliver("s@src.test", "", rcpts, BODY)
            assert statuses(res) == [(TEMP, 451)] * 4 and not conn.usable
        elif case == "several":
            for _ in range(3):
                assert statuses(await conn.deliver("s@src.test", "", rcpts[:1], BODY)) == [(OK, 250)]
            await conn.close()
            await sink.wait_idle()
            cmds = [c.split(":")[0] for c in sink.sessions[0].commands]
            assert cmds == ["EHLO relay.test"] + ["MAIL FROM", "RCPT TO", "DATA", "RSET"] * 2 + \
                ["MAIL FROM", "RCPT TO", "DATA", "QUIT"]
        else:
            res = await conn.deliver("s@src.test", "", rcpts, BODY)
            assert statuses(res) == [(OK, 250), (PERM, 550), (OK, 250), (OK, 250)]
            want = [["a@d.test", "b@d.test", "c@d.test"]] if case == "mixed" else [["a@d.test", "b@d.test"],
                                                                                ["c@d.test"]]
            assert [m.rcpt_tos for m in sink.messages] == want
        await conn.close()


async def test_body_goes_through_impl_encode_data(impl, monkeypatch):
    # Looked up on fastrelay._impl at use: either implementation can be swapped in (cases 3, 27).
    calls = []

    def encode(body: bytes) -> bytes:
        calls.append(body)
        return impl.encode_data(body)

    monkeypatch.setattr(_impl, "encode_data", encode)
    monkeypatch.setattr(_impl, "ReplyParser", impl.ReplyParser)
    body = b"Subject: dots\n\n.x\nbare cr\r.\r\nend"
    async with Pipe() as pipe:
        conn = await connect(pipe.hop, FAST)
        assert type(conn._wire.parser) is impl.ReplyParser
        assert statuses(await conn.deliver("s@src.test", "", [("a@d.test", "")], body)) == [(OK, 250)]
        await conn.close()
    assert calls == [body]
    assert pipe.messages[0][2] == b"Subject: dots\r\n\r\n.x\r\nbare cr\r\n.\r\nend\r\n"
