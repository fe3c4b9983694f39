"""DSNs end to end (RFC 3461, 3464, 6533): the extension at intake, passed on, honoured in reports.

Every DSN is read back from a sink that records the envelope verbatim, and parsed with Python's
email package: the multipart/report with the email parser, each field block of the report with
its header parser.
"""

from __future__ import annotations

import asyncio
import email
import email.parser
import email.policy

import aiosmtplib
import pytest

from fastrelay.smtp import replies as R
from tests.e2e.conftest import body, drained, records
from tests.support.envsink import EnvelopeSink

POLICY = email.policy.SMTPUTF8  # header values may be UTF-8 (RFC 6532)


def _mx(dns, domain: str, ip: str) -> None:
    dns.add_mx(domain, 10, f"mx.{domain}")
    dns.add_a(f"mx.{domain}", ip)


@pytest.fixture
async def envsinks(sink_port):
    """envsinks(**kw) -> (the destination's sink on 127.0.0.2, the senders' sink on 127.0.0.3)."""
    made = []

    async def make(dest_dsn: bool = False, dest_smtputf8: bool = True, sender_smtputf8: bool = True):
        dest = await EnvelopeSink("127.0.0.2", sink_port, dsn=dest_dsn, smtputf8=dest_smtputf8).start()
        senders = await EnvelopeSink("127.0.0.3", sink_port, smtputf8=sender_smtputf8).start()
        made.extend([dest, senders])
        return dest, senders

    yield make
    for s in made:
        await s.stop()


async def _send(h, sender: str, rcpts: list[tuple[str, str]], data: bytes, mail_params: str = "") -> None:
    """One message with DSN parameters; every command must get 250."""
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port, timeout=10)
    await c.connect()
    try:
        await c.ehlo()
        r = await c.execute_command(b"MAIL", f"FROM:<{sender}> {mail_params}".strip().encode())
        assert r.code == 250, r
        for addr, params in rcpts:
            r = await c.execute_command(b"RCPT", f"TO:<{addr}> {params}".strip().encode())
            assert r.code == 250, r
        r = await c.data(data)
        assert r.code == 250, r
    finally:
        await c.quit()


class DSN:
    """A DSN as the email package reads it."""

    def __init__(self, raw: bytes):
        text = raw.decode("utf-8")  # (the bytes parser would leave UTF-8 headers undecoded)
        self.msg = email.message_from_string(text, policy=POLICY)
        assert self.msg.get_content_type() == "multipart/report"
        self.parts = list(self.msg.iter_parts())
        # The report's text, as sent, split into its field blocks (RFC 3464 §2.1).
        chunks = text.split("--" + self.msg.get_boundary())
        report = chunks[2].partition("\r\n\r\n")[2]
        parse = email.parser.HeaderParser(policy=POLICY).parsestr
        blocks = [parse(b + "\r\n") for b in report.strip("\r\n").split("\r\n\r\n")]
        self.report_type = self.parts[1].get_content_type()
        self.per_message, self.per_rcpt = blocks[0], blocks[1:]
        self.returned = self.parts[2]

    @property
    def actions(self) -> list[str]:
        return [b["Action"] for b in self.per_rcpt]

    def rcpt(self, address: str):
        (b,) = [b for b in self.per_rcpt if b["Final-Recipient"].split(";", 1)[1].strip() == address]
        return b


async def _dsns(senders: EnvelopeSink, n: int) -> list[DSN]:
    got = await senders.wait_for(n)
    for e in got:
        assert e.sender == ""  # RFC 5321 §4.5.5: the null reverse-path
    return [DSN(e.data) for e in got]


async def test_remote_mta_is_the_host_name(dns, envsinks, relay):
    """Issue #9: "`Remote-MTA` is `dns; <host name>` (RFC 3464 §2.3.5), never `ip:port`." """
    _dest, senders = await envsinks()
    _mx(dns, "dest.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    h = await relay()
    await _send(h, "s@sender.test", [("permfail@dest.test", "")], body("rm"))
    (d,) = await _dsns(senders, 1)
    await drained(h)
    b = d.rcpt("permfail@dest.test")
    assert b["Remote-MTA"] == "dns; mx.dest.test"
    assert b["Action"] == "failed" and b["Status"] == "5.1.1"
    assert "127.0.0.2" not in d.msg.as_string()


async def test_remote_mta_of_a_route_given_as_an_address(dns, envsinks, relay, sink_port):
    _dest, senders = await envsinks()
    _mx(dns, "sender.test", "127.0.0.3")
    h = await relay(f'Domain dest.test {{ Routes = ( "smtp://127.0.0.2?port={sink_port}" ) }}\n')
    await _send(h, "s@sender.test", [("permfail@dest.test", "")], body("ra"))
    (d,) = await _dsns(senders, 1)
    assert d.rcpt("permfail@dest.test")["Remote-MTA"] == "dns; [127.0.0.2]"


async def test_dsn_parameters_go_on_to_a_next_hop_that_offers_dsn(dns, envsinks, relay):
    """RFC 3461 §5.2.1: a relay passes NOTIFY, ORCPT, RET and ENVID on, as received, to a next hop
    offering DSN; that hop reports success, so this relay sends none."""
    dest, senders = await envsinks(dest_dsn=True)
    _mx(dns, "dest.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    h = await relay()
    await _send(h, "s@sender.test",
                [("a@dest.test", "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2Bx@dest.test"), ("b@dest.test", "NOTIFY=never")],
                body("pass"), mail_params="RET=HDRS ENVID=Qq+2B1")
    (got,) = await dest.wait_for(1)
    await drained(h)
    assert got.sender == "s@sender.test"
    assert "RET=HDRS" in got.mail_params and "ENVID=Qq+2B1" in got.mail_params
    assert got.rcpt_addresses == ["a@dest.test", "b@dest.test"]
    assert got.rcpt_params(0) == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;A+2Bx@dest.test"]
    assert got.rcpt_params(1) == ["NOTIFY=never"]
    await asyncio.sleep(0.3)
    assert senders.messages == []


async def test_a_next_hop_without_dsn_gets_none_and_success_is_reported_as_relayed(dns, envsinks, relay):
    """RFC 3461 §5.2.2: to a next hop without DSN the parameters are not sent, and NOTIFY=SUCCESS
    is answered here with Action: relayed; ENVID and ORCPT come back, decoded from xtext."""
    dest, senders = await envsinks(dest_dsn=False)
    _mx(dns, "dest.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    h = await relay()
    await _send(h, "s@sender.test", [("a@dest.test", "NOTIFY=SUCCESS ORCPT=rfc822;A+2Bx@dest.test")], body("rel"),
                mail_params="RET=FULL ENVID=Qq+2B1")
    (got,) = await dest.wait_for(1)
    assert got.mail_params[:1] == ["SIZE=" + got.mail_params[0][5:]] and len(got.mail_params) == 1
    assert got.rcpt_params(0) == []
    (d,) = await _dsns(senders, 1)
    await drained(h)
    assert d.msg["Subject"] == "Successful Mail Delivery Report"
    assert d.per_message["Original-Envelope-Id"] == "Qq+1"
    b = d.rcpt("a@dest.test")
    assert b["Action"] == "relayed" and b["Status"].startswith("2.")
    assert b["Original-Recipient"] == "rfc822; A+x@dest.test"
    assert b["Remote-MTA"] == "dns; mx.dest.test"
    # RFC 3461 §4.3: RET=FULL is for failure DSNs; a success report returns the headers only.
    assert d.returned.get_content_type() == "text/rfc822-headers"


# NOTIFY of a recipient that fails (permfail) and of one that is accepted (ok), next hop without
# DSN -> the DSNs (their actions) the sender gets.
NOTIFY_ROWS = [
    ("", "", [["failed"]]),  # RFC 3461 §4.1: no NOTIFY means FAILURE (and DELAY)
    ("NOTIFY=NEVER", "NOTIFY=NEVER", []),
    ("NOTIFY=SUCCESS", "NOTIFY=SUCCESS", [["relayed"]]),
    ("NOTIFY=DELAY", "", []),
    ("NOTIFY=FAILURE,DELAY", "NOTIFY=SUCCESS,FAILURE", [["failed"], ["relayed"]]),
    ("NOTIFY=success,failure", "NOTIFY=never", [["failed"]]),
]


@pytest.mark.parametrize(("bad", "good", "want"), NOTIFY_ROWS)
async def test_notify_decides_which_dsns_are_sent(dns, envsinks, relay, bad, good, want):
    dest, senders = await envsinks()
    _mx(dns, "dest.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    h = await relay()
    await _send(h, "s@sender.test", [("permfail@dest.test", bad), ("ok@dest.test", good)], body("nt"))
    await dest.wait_for(1)
    await drained(h)
    if want:
        await senders.wait_for(len(want))
    await drained(h)
    await asyncio.sleep(0.3)
    got = sorted(DSN(e.data).actions for e in senders.messages)
    assert got == sorted(want)
    assert len(records(h, "P")) == 1


@pytest.mark.parametrize(("ret", "returned_type", "has_body"), [
    ("", "text/rfc822-headers", False),
    ("RET=HDRS", "text/rfc822-headers", False),
    ("RET=FULL", "message/rfc822", True),
    ("RET=full ENVID=x", "message/rfc822", True),
])
async def test_ret_decides_what_a_failure_dsn_returns(dns, envsinks, relay, ret, returned_type, has_body):
    _dest, senders = await envsinks()
    _mx(dns, "dest.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    h = await relay()
    await _send(h, "s@sender.test", [("permfail@dest.test", "NOTIFY=FAILURE")], body("ret", b"the body line\r\n"),
                mail_params=ret)
    (d,) = await _dsns(senders, 1)
    assert d.returned.get_content_type() == returned_type
    raw = d.returned.as_bytes()
    assert b"X-Test-Id: ret" in raw
    assert (b"the body line" in raw) == has_body
    assert (d.per_message["Original-Envelope-Id"] == "x") == ("ENVID" in ret)


async def test_delay_notice_once_after_delay_warning_time(dns, envsinks, relay):
    """Issue #9: "Send delay notifications (Action: delayed) after a configurable delay, as
    Postfix does with delay_warning_time." One notice per message, then the failure at expiry."""
    _dest, senders = await envsinks()
    _mx(dns, "dest.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    h = await relay("Domain dest.test { delay_warning_time = 1s message_expiration = 5s }\n")
    await _send(h, "s@sender.test", [("tempfail@dest.test", ""), ("tempfail2@dest.test", "NOTIFY=FAILURE")],
                body("dl"), mail_params="ENVID=d1")
    (delayed,) = await _dsns(senders, 1)
    assert delayed.msg["Subject"] == "Delayed Mail (still being retried)"
    assert delayed.actions == ["delayed"]  # tempfail2 asked for FAILURE only
    b = delayed.rcpt("tempfail@dest.test")
    assert b["Status"] == "4.2.0" and "Will-Retry-Until" in b
    assert delayed.per_message["Original-Envelope-Id"] == "d1"
    assert delayed.returned.get_content_type() == "text/rfc822-headers"
    _, failed_dsn = await _dsns(senders, 2)
    await drained(h)
    assert sorted(failed_dsn.actions) == ["failed", "failed"]
    assert len(records(h, "T")) >= 3  # several retries, still one delay notice
    await asyncio.sleep(0.3)
    assert len(senders.messages) == 2


async def test_no_delay_notice_by_default(dns, envsinks, relay):
    """delay_warning_time defaults to 0 (off), as Postfix's 0h."""
    _dest, senders = await envsinks()
    _mx(dns, "dest.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    h = await relay("Domain dest.test { message_expiration = 3s }\n")
    await _send(h, "s@sender.test", [("tempfail@dest.test", "NOTIFY=DELAY,FAILURE")], body("nd"))
    (d,) = await _dsns(senders, 1)
    await drained(h)
    assert d.actions == ["failed"]
    assert len(records(h, "T")) >= 2


async def test_lmtp_delivery_is_reported_as_delivered(dns, sinks, envsinks, relay, sink_port):
    """Final delivery over LMTP to a server without DSN: NOTIFY=SUCCESS gets Action: delivered."""
    _dest, senders = await envsinks()
    await _dest.stop()  # 127.0.0.2 is the LMTP store here
    (store,) = await sinks(1, lmtp=True)
    _mx(dns, "sender.test", "127.0.0.3")
    h = await relay(f'Domain store.test {{ Routes = ( "lmtp://127.0.0.2?port={sink_port}" ) }}\n')
    await _send(h, "s@sender.test", [("u@store.test", "NOTIFY=SUCCESS")], body("lm"))
    await store.wait_for(1)
    (d,) = await _dsns(senders, 1)
    await drained(h)
    b = d.rcpt("u@store.test")
    assert b["Action"] == "delivered" and b["Status"].startswith("2.")
    assert b["Remote-MTA"] == "dns; [127.0.0.2]"


# --- RFC 6533: DSNs for UTF-8 addresses (issue #16 part 2) ---------------------------------------------

async def test_dsn_for_a_utf8_recipient_is_global(dns, envsinks, relay):
    """Issue #16: "RFC 6533: such a DSN is sent with SMTPUTF8, uses the `utf-8` address type, and
    is a `message/global-delivery-status` (with `message/global-headers`)." """
    _dest, senders = await envsinks()
    _mx(dns, "dest.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    h = await relay()
    await _send(h, "s@sender.test", [("permfail-ü@dest.test", "ORCPT=utf-8;permfail-\\x{FC}@dest.test"),
                                     ("permfail@dest.test", "")],
                body("u8"), mail_params="SMTPUTF8")
    (got,) = await senders.wait_for(1)
    await drained(h)
    assert "SMTPUTF8" in got.mail_params
    d = DSN(got.data)
    assert d.msg.get_param("report-type") == "global-delivery-status"
    assert d.report_type == "message/global-delivery-status"
    assert d.parts[1]["Content-Transfer-Encoding"] == "8bit"  # raw UTF-8 in the report (RFC 6533 §6)
    assert d.returned.get_content_type() == "message/global-headers"
    b = d.rcpt("permfail-ü@dest.test")
    assert b["Final-Recipient"] == "utf-8; permfail-ü@dest.test"
    assert b["Original-Recipient"] == "utf-8; permfail-ü@dest.test"
    assert b["Action"] == "failed"
    assert d.rcpt("permfail@dest.test")["Final-Recipient"] == "rfc822; permfail@dest.test"


async def test_dsn_to_a_utf8_sender_goes_out_with_smtputf8(dns, envsinks, relay):
    """Issue #16: "A DSN to a UTF-8 sender goes out without SMTPUTF8 in its MAIL FROM." Now with."""
    _dest, senders = await envsinks()
    _mx(dns, "dest.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    h = await relay()
    await _send(h, "jürgen@sender.test", [("permfail@dest.test", "")], body("u9"), mail_params="SMTPUTF8")
    (got,) = await senders.wait_for(1)
    await drained(h)
    assert got.rcpt_addresses == ["jürgen@sender.test"]
    assert "SMTPUTF8" in got.mail_params
    d = DSN(got.data)
    assert d.msg["To"].addresses[0].addr_spec == "jürgen@sender.test"
    # Only ASCII addresses are reported: a plain message/delivery-status.
    assert d.report_type == "message/delivery-status"
    assert d.rcpt("permfail@dest.test")["Final-Recipient"] == "rfc822; permfail@dest.test"


async def test_ascii_dsn_to_an_ascii_sender_stays_plain(dns, envsinks, relay):
    _dest, senders = await envsinks()
    _mx(dns, "dest.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    h = await relay()
    await _send(h, "s@sender.test", [("permfail@dest.test", "")], body("u0"))
    (got,) = await senders.wait_for(1)
    assert [p for p in got.mail_params if not p.startswith("SIZE=")] == []  # no SMTPUTF8, no BODY
    d = DSN(got.data)
    assert d.report_type == "message/delivery-status"
    assert d.msg.get_param("report-type") == "delivery-status"
    assert d.returned.get_content_type() == "text/rfc822-headers"


# --- intake: RFC 3461 parameters accepted, validated --------------------------------------------------

async def _exchange(h, mail: str, rcpt: str) -> tuple[int, str, int, str]:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port, timeout=10)
    await c.connect()
    try:
        ehlo = await c.ehlo()
        assert "DSN" in ehlo.message.split("\n")  # RFC 3461 §4: the extension is offered
        m = await c.execute_command(b"MAIL", mail.encode())
        r = await c.execute_command(b"RCPT", rcpt.encode()) if m.code == 250 else m
        return m.code, m.message, r.code, r.message
    finally:
        await c.quit()


GOOD = [
    ("FROM:<s@x.test> RET=FULL", "TO:<a@x.test>"),
    ("FROM:<s@x.test> RET=hdrs ENVID=abc+2Bdef", "TO:<a@x.test> NOTIFY=NEVER"),
    ("FROM:<s@x.test> ENVID=" + "e" * 100, "TO:<a@x.test> NOTIFY=SUCCESS,FAILURE,DELAY"),
    ("FROM:<s@x.test> SIZE=100 BODY=8BITMIME RET=FULL ENVID=q", "TO:<a@x.test> NOTIFY=delay ORCPT=rfc822;a@x.test"),
    ("FROM:<s@x.test>", "TO:<a@x.test> ORCPT=rfc822;a+2Bb@x.test NOTIFY=Failure"),
    ("FROM:<s@x.test>", "TO:<a@x.test> ORCPT=utf-8;w\\x{FC}@x.test"),
    ("FROM:<s@x.test> SMTPUTF8", "TO:<ü@x.test> ORCPT=utf-8;ü@x.test NOTIFY=FAILURE"),
]


@pytest.mark.parametrize(("mail", "rcpt"), GOOD)
async def test_dsn_parameters_are_accepted(relay, mail, rcpt):
    """Issue #9: "Today `NOTIFY=` gets 555." """
    h = await relay("suspend_delivery = 1\n")
    mcode, _, rcode, rtext = await _exchange(h, mail, rcpt)
    assert (mcode, rcode) == (250, 250), rtext


BAD = [  # (MAIL, RCPT, the reply that refuses one of them)
    ("FROM:<s@x.test> RET=BODY", "TO:<a@x.test>", R.BAD_DSN_PARAM),
    ("FROM:<s@x.test> RET", "TO:<a@x.test>", R.BAD_DSN_PARAM),
    ("FROM:<s@x.test> RET=FULL RET=HDRS", "TO:<a@x.test>", R.SYNTAX),
    ("FROM:<s@x.test> ENVID=" + "e" * 101, "TO:<a@x.test>", R.BAD_DSN_PARAM),
    ("FROM:<s@x.test> ENVID=a+2bc", "TO:<a@x.test>", R.BAD_DSN_PARAM),  # lowercase hex is not xtext
    ("FROM:<s@x.test> ENVID=a+0Ab", "TO:<a@x.test>", R.BAD_DSN_PARAM),  # decodes to a control
    ("FROM:<s@x.test> ENVID=", "TO:<a@x.test>", R.SYNTAX),
    ("FROM:<s@x.test> ENVID=ü", "TO:<a@x.test>", R.BAD_DSN_PARAM),
    ("FROM:<s@x.test>", "TO:<a@x.test> NOTIFY=", R.SYNTAX),
    ("FROM:<s@x.test>", "TO:<a@x.test> NOTIFY=ALWAYS", R.BAD_DSN_PARAM),
    ("FROM:<s@x.test>", "TO:<a@x.test> NOTIFY=NEVER,SUCCESS", R.BAD_DSN_PARAM),
    ("FROM:<s@x.test>", "TO:<a@x.test> NOTIFY=SUCCESS,SUCCESS", R.BAD_DSN_PARAM),
    ("FROM:<s@x.test>", "TO:<a@x.test> NOTIFY", R.BAD_DSN_PARAM),
    ("FROM:<s@x.test>", "TO:<a@x.test> NOTIFY=NEVER NOTIFY=NEVER", R.SYNTAX),
    ("FROM:<s@x.test>", "TO:<a@x.test> ORCPT=a@x.test", R.BAD_DSN_PARAM),  # no address type
    ("FROM:<s@x.test>", "TO:<a@x.test> ORCPT=rfc822;", R.BAD_DSN_PARAM),
    ("FROM:<s@x.test>", "TO:<a@x.test> ORCPT=rfc822;a+0Db@x.test", R.BAD_DSN_PARAM),
    ("FROM:<s@x.test>", "TO:<a@x.test> ORCPT=rfc822;" + "a" * 500, R.BAD_DSN_PARAM),
    ("FROM:<s@x.test>", "TO:<a@x.test> ORCPT=utf-8;ü@x.test", R.BAD_DSN_PARAM),  # raw UTF-8 needs SMTPUTF8
    ("FROM:<s@x.test>", "TO:<a@x.test> ORCPT=utf-8;\\x{110000}@x.test", R.BAD_DSN_PARAM),
    ("FROM:<s@x.test>", "TO:<a@x.test> NOTIFY=NEVER XDSN=1", R.UNKNOWN_PARAM),
    ("FROM:<s@x.test> XRET=FULL", "TO:<a@x.test>", R.UNKNOWN_PARAM),
]


@pytest.mark.parametrize(("mail", "rcpt", "reply"), BAD)
async def test_bad_dsn_parameters_are_refused(relay, mail, rcpt, reply):
    # RFC 3461 §3 lets NOTIFY and ORCPT add 500 characters to a RCPT line: room for that here.
    h = await relay("suspend_delivery = 1\nmax_command_line = 1100\n")
    mcode, mtext, rcode, rtext = await _exchange(h, mail, rcpt)
    code, text = (mcode, mtext) if mcode != 250 else (rcode, rtext)
    assert (code, text) == (reply.code, f"{reply.esc} {reply.text}")


async def test_ret_full_of_an_8bit_body_needs_no_smtputf8(dns, envsinks, relay):
    """An 8-bit body returned with RET=FULL stays message/rfc822 (8bit): the DSN needs 8BITMIME,
    not SMTPUTF8, so it still reaches a sender whose server lacks SMTPUTF8."""
    _dest, senders = await envsinks(sender_smtputf8=False)
    _mx(dns, "dest.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    h = await relay()
    await _send(h, "s@sender.test", [("permfail@dest.test", "")], body("8b", "café\r\n".encode()),
                mail_params="BODY=8BITMIME RET=FULL")
    (got,) = await senders.wait_for(1)
    await drained(h)
    assert "SMTPUTF8" not in got.mail_params and "BODY=8BITMIME" in got.mail_params
    d = DSN(got.data)
    assert d.report_type == "message/delivery-status"
    assert d.returned.get_content_type() == "message/rfc822"
    assert d.returned["Content-Transfer-Encoding"] == "8bit"
    assert "café" in d.returned.as_string()


async def test_delay_notice_is_not_repeated_after_a_restart(dns, envsinks, relay):
    """"Once per message" holds across a restart: the spooled envelope remembers the notice."""
    _dest, senders = await envsinks()
    _mx(dns, "dest.test", "127.0.0.2")
    _mx(dns, "sender.test", "127.0.0.3")
    conf = "Domain dest.test { delay_warning_time = 1s message_expiration = 1h }\n"
    h = await relay(conf)
    await _send(h, "s@sender.test", [("tempfail@dest.test", "")], body("rs"))
    (d,) = await _dsns(senders, 1)
    assert d.actions == ["delayed"]
    # The sink has the notice before the relay reads its 250: a stop in between leaves the notice
    # spooled, to be sent again after the restart (at least once, by design), which is not the
    # repeat this test is about. So stop only once the relay has logged the notice delivered.
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while not [f for f in records(h, "D") if f[4] == "sender.test"]:
        assert loop.time() < end, records(h, "D")
        await asyncio.sleep(0.02)
    before = len(records(h, "T"))
    await h.stop()
    h2 = await relay(conf)  # the same spool (and mainlog)
    end = loop.time() + 20
    while len(records(h2, "T")) < before + 3:  # three more attempts after the restart
        assert loop.time() < end, records(h2, "T")
        await asyncio.sleep(0.1)
    assert len(senders.messages) == 1
