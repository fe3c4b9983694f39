"""DSN requests kept in the spooled envelope (RFC 3461), read back as NOTIFY/ORCPT/RET/ENVID."""

from __future__ import annotations

import email
import email.policy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrelay.bounce import DELAYED, DELIVERED, FAILED, RELAYED, make_dsn, mta_name
from fastrelay.delivery import Hop
from fastrelay.message import DEFAULT_NOTIFY, Envelope, Recipient
from fastrelay.smtp.address import check_rcpt_params, valid_envid, valid_orcpt, valid_ret
from fastrelay.spool import Spool

# An envelope row as fastrelay wrote it before DSN support: the same v1 JSON, no DSN parameters.
OLD_ROW = {
    "v": 1, "sender": "s@src.test", "rcpts": [["a@dst.test", "", 0, ""], ["b@dst.test", "", 2, "550 5.1.1 x"]],
    "domain": "dst.test", "mail_params": "SIZE=100 BODY=8BITMIME", "client_ip": "127.0.0.1", "helo": "c.test",
    "protocol": "esmtp", "binding": "default", "msgid": "M1", "received_at": 1.0, "first_queued": 1.0,
    "attempts": 2, "next_attempt": 5.0, "meta": {"reroute": "x.test"},
}


def test_an_old_spool_row_reads_as_no_dsn_parameters():
    """Extending the envelope stays backward compatible: an old row gives RFC 3461's defaults."""
    env = Envelope.from_json(json.loads(json.dumps(OLD_ROW)))
    assert env.ret == "" and env.envid == ""
    assert [r.notify for r in env.recipients] == [DEFAULT_NOTIFY, DEFAULT_NOTIFY]
    assert [r.orcpt for r in env.recipients] == [None, None]
    assert env.to_json() == OLD_ROW  # and it is written back unchanged


PARAMS = [  # (RCPT parameters as received, notify, orcpt)
    ("", {"FAILURE", "DELAY"}, None),
    ("NOTIFY=NEVER", set(), None),
    ("NOTIFY=never ORCPT=rfc822;a@b", set(), ("rfc822", "a@b")),
    ("ORCPT=RFC822;a+2Bb+3Dc@d NOTIFY=success,Delay", {"SUCCESS", "DELAY"}, ("rfc822", "a+b=c@d")),
    ("NOTIFY=FAILURE ORCPT=utf-8;w\\x{FC}rst@d", {"FAILURE"}, ("utf-8", "würst@d")),
    ("ORCPT=utf-8;wü@d", {"FAILURE", "DELAY"}, ("utf-8", "wü@d")),
]


@pytest.mark.parametrize(("params", "notify", "orcpt"), PARAMS)
def test_recipient_dsn_parameters(params, notify, orcpt):
    r = Recipient("a@dst.test", params)
    assert r.notify == notify
    assert r.orcpt == orcpt


@pytest.mark.parametrize(("mail_params", "ret", "envid"), [
    ("", "", ""),
    ("SIZE=10 RET=hdrs", "HDRS", ""),
    ("RET=FULL ENVID=QQ+2B+3D1 SMTPUTF8", "FULL", "QQ+=1"),
    ("ENVID=plain BODY=8BITMIME", "", "plain"),
])
def test_envelope_dsn_parameters(mail_params, ret, envid):
    env = Envelope("s@src.test", [], "dst.test", mail_params=mail_params)
    assert (env.ret, env.envid) == (ret, envid)


async def test_dsn_parameters_survive_the_spool(tmp_path):
    """The spool stores the envelope; the DSN request comes back from disk intact."""
    sp = Spool(str(tmp_path / "spool"))
    await sp.open()
    try:
        env = Envelope("s@src.test", [Recipient("a@dst.test", "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2Bx@dst.test"),
                                      Recipient("b@dst.test", "NOTIFY=NEVER")],
                       "dst.test", mail_params="SIZE=10 RET=FULL ENVID=e+2B1")
        (entry,) = await sp.add([(env, b"Subject: x\r\n\r\nbody\r\n")])
    finally:
        await sp.close()
    sp = Spool(str(tmp_path / "spool"))
    await sp.open()
    try:
        assert [e.id for e in sp.recover()] == [entry.id]
        got, _ = await sp.load(entry.id)
    finally:
        await sp.close()
    assert (got.ret, got.envid) == ("FULL", "e+1")
    assert [r.notify for r in got.recipients] == [{"SUCCESS", "FAILURE"}, set()]
    assert got.recipients[0].orcpt == ("rfc822", "A+x@dst.test")


@pytest.mark.parametrize(("name", "ip", "want"), [
    ("mx.dst.test", "127.0.0.2", "mx.dst.test"),
    ("mx.dst.test.", "127.0.0.2", "mx.dst.test"),
    ("127.0.0.3", "127.0.0.3", "[127.0.0.3]"),
    ("", "127.0.0.4", "[127.0.0.4]"),
    ("::1", "::1", "[::1]"),
])
def test_remote_mta_name(name, ip, want):
    """Issue #9: "`Remote-MTA` is `dns; <host name>` (RFC 3464 §2.3.5), never `ip:port`." """
    assert mta_name(Hop(ip, 2525, "smtp", name, 10)) == want


# --- never a traceback: whatever a spool row or an XFER peer holds, validators and DSNs cope ------------


_param_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
_param = st.one_of(
    _param_text,
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["NOTIFY", "ORCPT", "RET", "ENVID", "notify"]), _param_text),
)


@given(value=st.one_of(st.none(), _param_text), smtputf8=st.booleans())
@settings(max_examples=300, deadline=None)
def test_validators_answer_for_any_value(value, smtputf8):
    for ok in (valid_ret(value), valid_envid(value), valid_orcpt(value, smtputf8)):
        assert ok in (True, False)
    reply = check_rcpt_params({"NOTIFY": value, "ORCPT": value}, smtputf8)
    assert reply is None or reply.code in (501, 555)


@given(rcpt_params=st.lists(_param, max_size=4), mail_params=st.lists(_param, max_size=4),
       action=st.sampled_from([FAILED, DELAYED, DELIVERED, RELAYED]),
       sender=st.sampled_from(["s@src.test", "jü@src.test", "r\udcffw@src.test"]))  # the last: a raw byte kept
@settings(max_examples=200, deadline=None)
def test_any_stored_parameters_give_a_parseable_dsn(rcpt_params, mail_params, action, sender):
    env = Envelope(sender, [Recipient("a@dst.test", " ".join(rcpt_params), detail="550 5.1.1 x"),
                            Recipient("ü@dst.test")], "dst.test", mail_params=" ".join(mail_params), msgid="M")
    out = make_dsn(env, b"Subject: s\r\n\r\nbody\r\n", [0, 1], "relay.test", "mx.dst.test", action=action)
    for dsn, raw in out:
        assert dsn.sender == "" and dsn.recipients[0].address == sender
        m = email.message_from_string(raw.decode("utf-8", "surrogateescape"), policy=email.policy.SMTPUTF8)
        assert m.get_content_type() == "multipart/report"
        assert len(list(m.iter_parts())) == 3
