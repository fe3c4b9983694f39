"""The LMTP delivery client against a real LMTP sink on loopback: docs/reliability.md cases 3, 27, 38-45, 48.

Every test runs on both framing implementations (`impl`: the pure-Python twin and the Cython one),
swapped in where the client looks them up (fastrelay._impl).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import uvloop

from fastrelay import _impl
from fastrelay.delivery import OK, PERM, TEMP, ConnectError, Hop, RcptResult, Settings
from fastrelay.delivery.connect import connect
from fastrelay.delivery.lmtp import LMTPConnection
from tests.support import Sink, free_port, tls_pair

FAST = Settings(helo_name="relay.test", connect_timeout=0.5, greeting_timeout=0.5, ehlo_timeout=0.5,
                tls_timeout=2.0, mail_timeout=0.5, rcpt_timeout=0.5, data_timeout=0.5, done_timeout=0.5,
                rset_timeout=0.5)
BODY = b"X-Test-Id: l-1\r\nSubject: hello\r\n\r\nline one\r\n"


@pytest.fixture(autouse=True)
def framing(impl, monkeypatch):
    monkeypatch.setattr(_impl, "ReplyParser", impl.ReplyParser)
    monkeypatch.setattr(_impl, "encode_data", impl.encode_data)
    return impl


def hop(host: str, port: int) -> Hop:
    return Hop(host, port, "lmtp", "sink.test", 0)


def settings(**kw) -> Settings:
    return dataclasses.replace(FAST, **kw)


async def open_conn(sink: Sink, s: Settings = FAST) -> LMTPConnection:
    conn = await connect(hop(sink.host, sink.port), s)
    assert isinstance(conn, LMTPConnection)
    assert conn.usable and conn.remote == f"{sink.host}:{sink.port}"
    return conn


async def send(sink: Sink, rcpts: list[str], body: bytes = BODY, s: Settings = FAST,
               sender: str = "s@src.test", mail_params: str = "") -> tuple[list[RcptResult], LMTPConnection]:
    conn = await open_conn(sink, s)
    try:
        res = await conn.deliver(sender, mail_params, [(r, "") for r in rcpts], body)
    finally:
        await conn.close()
    assert len(res) == len(rcpts)
    return res, conn


def statuses(res: list[RcptResult]) -> list[tuple[int, int]]:
    return [(r.status, r.code) for r in res]


# -- session ---------------------------------------------------------------------------------------


async def test_lhlo_and_delivery():
    async with Sink(host="127.0.0.2", lmtp=True) as sink:
        res, _ = await send(sink, ["a@d.test"])
        assert res[0].status == OK and res[0].code == 250 and "delivered as" in res[0].text
        await sink.wait_idle()
        cmds = sink.sessions[0].commands
        assert cmds[0] == "LHLO relay.test" and cmds[-1] == "QUIT"
        [m] = sink.messages
        assert m.data == BODY and m.delivered == ["a@d.test"]
        assert m.mail_options == [f"SIZE={len(BODY)}"]


async def test_connect_refused_and_greeting_refused():
    with pytest.raises(ConnectError):
        await connect(hop("127.0.0.2", free_port("127.0.0.2")), FAST)
    async with Sink(host="127.0.0.2", lmtp=True) as sink:
        sink.faults.set("greeting", reply="421 4.3.2 not now")
        with pytest.raises(ConnectError) as e:
            await open_conn(sink)
        assert (e.value.code, e.value.text) == (421, "4.3.2 not now")
        sink.faults.set("greeting", delay=1.0)
        t = time.monotonic()
        with pytest.raises(ConnectError):
            await open_conn(sink)
        assert time.monotonic() - t < 0.9


@pytest.mark.parametrize("kind", ["garbage", "long_line", "endless", "unsolicited"])
async def test_hostile_lhlo_is_a_connect_error(kind):
    async with Sink(host="127.0.0.2", lmtp=True) as sink:
        sink.faults.endless_cap = 1 << 20
        sink.faults.set("ehlo", hostile=kind)
        with pytest.raises(ConnectError) as e:
            await open_conn(sink)
        assert e.value.code == 451 and e.value.text.startswith("4.5.0")


# -- per-recipient replies after the dot (case 48) -------------------------------------------------


async def test_one_reply_per_accepted_recipient():
    async with Sink(host="127.0.0.3", lmtp=True) as sink:
        rcpts = ["a@d.test", "data-tempfail@d.test", "permfail@d.test", "data-permfail@d.test", "b@d.test",
                 "tempfail@d.test"]
        res, conn = await send(sink, rcpts)
        assert statuses(res) == [(OK, 250), (TEMP, 452), (PERM, 550), (PERM, 550), (OK, 250), (TEMP, 450)]
        assert res[1].text == "4.2.2 sink: data-tempfail" and res[2].text == "5.1.1 sink: permfail"
        assert conn.remote == f"{sink.host}:{sink.port}"
        [m] = sink.messages
        assert m.rcpt_tos == ["a@d.test", "data-tempfail@d.test", "data-permfail@d.test", "b@d.test"]
        assert m.delivered == ["a@d.test", "b@d.test"]


async def test_drop_after_k_replies():
    async with Sink(host="127.0.0.3", lmtp=True) as sink:
        sink.faults.lmtp_drop_after = 2
        conn = await open_conn(sink)
        rcpts = ["a@d.test", "data-permfail@d.test", "b@d.test", "c@d.test"]
        res = await conn.deliver("s@src.test", "", [(r, "") for r in rcpts], BODY)
        assert statuses(res) == [(OK, 250), (PERM, 550), (TEMP, 451), (TEMP, 451)]
        assert "possible duplicate" in res[2].text
        assert not conn.usable
        await conn.close()


async def test_421_for_one_recipient_defers_the_rest():
    async with Sink(host="127.0.0.3", lmtp=True) as sink:
        res, conn = await send(sink, ["a@d.test", "data-421-bye@d.test", "b@d.test"])
        assert statuses(res) == [(OK, 250), (TEMP, 421), (TEMP, 451)]
        assert not conn.usable


async def test_mail_refused_and_no_recipient_accepted():
    async with Sink(host="127.0.0.4", lmtp=True) as sink:
        sink.faults.set("mail", reply="550 5.7.1 go away", times=1)
        conn = await open_conn(sink)
        res = await conn.deliver("s@src.test", "", [("a@d.test", ""), ("b@d.test", "")], BODY)
        assert res == [RcptResult(PERM, 550, "5.7.1 go away")] * 2
        res = await conn.deliver("s@src.test", "", [("tempfail@d.test", ""), ("permfail@d.test", "")], BODY)
        assert statuses(res) == [(TEMP, 450), (PERM, 550)]
        assert conn.usable and "DATA" not in sink.sessions[0].commands
        await conn.close()
        assert sink.messages == [] and sink.rejected == []


async def test_remote_recipient_limit_splits_transactions():
    async with Sink(host="127.0.0.4", lmtp=True, max_rcpts=2) as sink:
        res, _ = await send(sink, [f"r{i}@d.test" for i in range(5)])
        assert [r.status for r in res] == [OK] * 5
        assert [m.delivered for m in sink.messages] == [
            ["r0@d.test", "r1@d.test"], ["r2@d.test", "r3@d.test"], ["r4@d.test"]]


async def test_several_messages_on_one_connection(framing):
    async with Sink(host="127.0.0.5", lmtp=True) as sink:
        conn = await open_conn(sink)
        assert type(conn._wire.parser) is framing.ReplyParser  # the implementation under test
        for i in range(3):
            res = await conn.deliver(f"s{i}@src.test", "", [(f"r{i}@d.test", ""), ("x@d.test", "")], BODY)
            assert statuses(res) == [(OK, 250)] * 2
        await conn.close()
        await sink.wait_idle()
        assert sink.per_session_messages() == [3]
        cmds = [c.split(":")[0] for c in sink.sessions[0].commands]
        assert cmds == ["LHLO relay.test"] + ["MAIL FROM", "RCPT TO", "RCPT TO", "DATA", "RSET"] * 2 + \
            ["MAIL FROM", "RCPT TO", "RCPT TO", "DATA", "QUIT"]


# -- timeouts, lost connections, hostile replies (cases 40, 43, 44) -----------------------------------


@pytest.mark.parametrize("phase", ["mail", "rcpt", "data", "dot"])
async def test_phase_timeout_defers(phase):
    async with Sink(host="127.0.0.6", lmtp=True) as sink:
        sink.faults.set(phase, delay=1.5)
        conn = await open_conn(sink)
        t = time.monotonic()
        res = await conn.deliver("s@src.test", "", [("a@d.test", ""), ("b@d.test", "")], BODY)
        assert time.monotonic() - t < 1.4
        assert statuses(res) == [(TEMP, 451)] * 2 and not conn.usable
        assert ("possible duplicate" in res[0].text) == (phase == "dot")
        await conn.close()


async def test_drop_in_data():
    async with Sink(host="127.0.0.6", lmtp=True) as sink:
        res, conn = await send(sink, ["a@d.test", "drop-in-data@d.test", "permfail@d.test"])
        assert statuses(res) == [(TEMP, 451), (TEMP, 451), (PERM, 550)]
        assert not conn.usable and sink.messages == []


@pytest.mark.parametrize("phase", ["mail", "rcpt", "data", "dot"])
@pytest.mark.parametrize("kind", ["long_line", "endless", "garbage", "unsolicited"])
async def test_hostile_reply_defers(phase, kind):
    async with Sink(host="127.0.0.7", lmtp=True) as sink:
        sink.faults.endless_cap = 8 << 20
        conn = await open_conn(sink)
        sink.faults.set(phase, hostile=kind)
        t = time.monotonic()
        res = await conn.deliver("s@src.test", "", [("a@d.test", ""), ("b@d.test", "")], BODY)
        assert time.monotonic() - t < 1.0  # no hang; the reply is cut off at the parser's bound
        assert statuses(res) == [(TEMP, 451)] * 2
        assert res[0].text.startswith("4.5.0")
        assert ("possible duplicate" in res[0].text) == (phase == "dot")
        assert not conn.usable
        await conn.close()


# -- TLS (case 45) ----------------------------------------------------------------------------------


async def test_starttls_opportunistic_and_454():
    pair = tls_pair()
    async with Sink(host="127.0.0.8", lmtp=True, tls_context=pair.server) as sink:
        res, conn = await send(sink, ["a@d.test"])
        assert statuses(res) == [(OK, 250)] and conn.tls and sink.messages[0].tls
        assert sink.sessions[0].commands[:3] == ["LHLO relay.test", "STARTTLS", "LHLO relay.test"]
        sink.faults.set("starttls", reply="454 4.7.0 TLS not available now")
        res, conn = await send(sink, ["a@d.test"])
        assert statuses(res) == [(OK, 250)] and not conn.tls and not sink.messages[1].tls
        assert sink.sessions_total == 2


async def test_failed_handshake_retries_in_plaintext_unless_required(tmp_path):
    pair = tls_pair()  # not trusted by the system store
    async with Sink(host="127.0.0.8", lmtp=True, tls_context=pair.server) as sink:
        res, conn = await send(sink, ["a@d.test"], s=settings(tls_verify=True))
        assert statuses(res) == [(OK, 250)] and not conn.tls
        assert sink.sessions_total == 2 and not sink.messages[0].tls
        with pytest.raises(ConnectError) as e:
            await open_conn(sink, settings(tls="required", tls_verify=True))
        assert e.value.text.startswith("4.7.5")
        ca = tmp_path / "ca.pem"
        ca.write_bytes(pair.ca_pem)
        s = settings(tls="required", tls_verify=True, tls_ca=str(ca))
        res, conn = await send(sink, ["b@d.test"], s=s)
        assert statuses(res) == [(OK, 250)] and conn.tls and sink.messages[1].tls
        sink.faults.hide.add("STARTTLS")
        with pytest.raises(ConnectError) as e:
            await open_conn(sink, settings(tls="required"))
        assert e.value.text.startswith("4.7.4")
        assert len(sink.messages) == 2


# -- content and envelope (cases 3, 19, 22, 23, 27) ----------------------------------------------------


async def test_dot_stuffing_and_bare_line_ends_round_trip():
    body = b"Subject: dots\n\n.x\nbare lf\nbare cr\rcrlf\r\n.\r\n..two\r\n.\nend"
    async with Sink(host="127.0.0.9", lmtp=True) as sink:
        res, _ = await send(sink, ["a@d.test", "b@d.test"], body=body)
        assert statuses(res) == [(OK, 250)] * 2
        [m] = sink.messages
        assert m.data == (b"Subject: dots\r\n\r\n.x\r\nbare lf\r\nbare cr\r\ncrlf\r\n"
                          b".\r\n..two\r\n.\r\nend\r\n")


async def test_envelope_byte_exact_and_checked():
    async with Sink(host="127.0.0.9", lmtp=True) as sink:
        rcpts = ['"john..doe"@x.test', '"a b"@x.test', "bad\r\nDATA@x.test"]
        res, _ = await send(sink, rcpts, sender='"s..x"@src.test')
        assert [r.status for r in res] == [OK, OK, PERM] and res[2].text.startswith("5.1.3")
        cmds = sink.sessions[0].commands
        assert f'MAIL FROM:<"s..x"@src.test> SIZE={len(BODY)}' in cmds
        assert 'RCPT TO:<"john..doe"@x.test>' in cmds and 'RCPT TO:<"a b"@x.test>' in cmds
        res, _ = await send(sink, ["a@d.test"], sender="s\r\nRSET@src.test")
        assert res[0].status == PERM and res[0].text.startswith("5.1.7")
        assert len(sink.messages) == 1 and not any("evil" in c or "DATA@" in c for c in cmds)
        sink.faults.hide.add("SMTPUTF8")
        res, _ = await send(sink, ["ü@d.test"], mail_params="SMTPUTF8")
        assert res[0].status == PERM and res[0].text.startswith("5.6.7")


# -- under uvloop, as in production ----------------------------------------------------------------


def test_under_uvloop():
    async def scenario() -> None:
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        pair = tls_pair()
        for lmtp in (True, False):
            async with Sink(host="127.0.0.5", lmtp=lmtp, tls_context=pair.server) as sink:
                h = Hop(sink.host, sink.port, "lmtp" if lmtp else "smtp", "sink.test", 0)
                conn = await connect(h, FAST)
                assert conn.tls
                for _ in range(2):
                    res = await conn.deliver("s@src.test", "", [("a@d.test", ""), ("permfail@d.test", "")],
                                             b".x\n.\nend")
                    assert statuses(res) == [(OK, 250), (PERM, 550)]
                sink.faults.set("dot", delay=1.0)
                res = await conn.deliver("s@src.test", "", [("a@d.test", "")], BODY)
                assert res[0].status == TEMP and "possible duplicate" in res[0].text and not conn.usable
                await conn.close()
                assert [m.data for m in sink.messages] == [b".x\r\n.\r\nend\r\n"] * 2

    uvloop.run(scenario())
