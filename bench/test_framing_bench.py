"""Benchmarks of the SMTP framing hot path: the pure-Python twin ("py") against Cython ("c")."""

from __future__ import annotations

import random

import pytest

from fastrelay import _impl

_C = None if _impl.NO_EXTENSIONS else _impl.compiled()
IMPLS = [pytest.param(_impl.PY, id="py")]
if _C is not None:
    IMPLS.append(pytest.param(_C, id="c"))

EV_COMMAND = 1
EV_DATA = 4
PIECE = 64 * 1024


def _message(size: int, seed: int) -> bytes:
    """A realistic body: headers, then 76-character lines (base64-like and text), ~2% starting with '.'."""
    rnd = random.Random(seed)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    words = [b"relay", b"mail", b"the", b"queue", b"of", b"message", b"and", b"deliver", b"to", b"host."]
    lines = [b"From: Alice <alice@example.org>", b"To: Bob <bob@example.net>", b"Subject: bench",
             b"Message-ID: <bench@example.org>", b"MIME-Version: 1.0", b""]
    total = sum(len(line) + 2 for line in lines)
    while total < size:
        if rnd.random() < 0.5:
            line = bytes(rnd.choice(alphabet) for _ in range(76))
        else:
            line = b""
            while len(line) < 76:
                line += rnd.choice(words) + b" "
            line = line[:76]
        if rnd.random() < 0.02:
            line = b"." + line[1:]
        lines.append(line)
        total += len(line) + 2
    return b"".join(line + b"\r\n" for line in lines)


BODY_4K = _message(4096, 1)
BODY_1M = _message(1 << 20, 2)
WIRE_1M = _impl.PY.encode_data(BODY_1M)     # dot-stuffed, ends in CRLF.CRLF
PIECES_1M = [WIRE_1M[i:i + PIECE] for i in range(0, len(WIRE_1M), PIECE)]
# One client session as its TCP writes: EHLO, then MAIL/RCPT/DATA pipelined (RFC 2920), the body.
TRANSACTION = [
    b"EHLO client.example.org\r\n",
    b"MAIL FROM:<alice@example.org> SIZE=4096\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n",
    _impl.PY.encode_data(BODY_4K),
    b"QUIT\r\n",
]
EHLO_REPLY = (b"250-mx.example.net Hello client.example.org [192.0.2.1]\r\n250-SIZE 10240000\r\n"
              b"250-8BITMIME\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-SMTPUTF8\r\n"
              b"250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n250 DSN\r\n")


def run_transaction(impl) -> list[tuple]:
    framer = impl.ServerFramer()
    events = []
    for write in TRANSACTION:
        framer.feed(write)
        while (event := framer.next_event()) is not None:
            events.append(event)
            if event == (EV_COMMAND, b"DATA"):
                framer.begin_data()
    return events


def run_data(impl) -> tuple:
    framer = impl.ServerFramer()
    framer.feed(b"DATA\r\n")
    framer.next_event()
    framer.begin_data()
    event = None
    for piece in PIECES_1M:
        framer.feed(piece)
        event = framer.next_event()
    return event


def parse_ehlo(parser_cls) -> tuple:
    parser = parser_cls()
    parser.feed(EHLO_REPLY)
    return parser.next_reply()


def _gb_per_s(benchmark, nbytes: int) -> None:
    benchmark.extra_info["bytes"] = nbytes
    if benchmark.stats is not None:
        benchmark.extra_info["GB_per_s"] = round(nbytes / benchmark.stats.stats.mean / 1e9, 3)


@pytest.mark.benchmark(group="transaction-4KB")
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_transaction(benchmark, impl):
    events = benchmark(run_transaction, impl)
    assert events[-2:] == [(EV_DATA, BODY_4K, 0), (EV_COMMAND, b"QUIT")]


@pytest.mark.benchmark(group="data-1MB")
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_data_1mb(benchmark, impl):
    event = benchmark(run_data, impl)
    assert event == (EV_DATA, BODY_1M, 0)
    _gb_per_s(benchmark, len(WIRE_1M))


@pytest.mark.benchmark(group="encode-1MB")
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_encode_data_1mb(benchmark, impl):
    assert benchmark(impl.encode_data, BODY_1M) == WIRE_1M
    _gb_per_s(benchmark, len(BODY_1M))


@pytest.mark.benchmark(group="reply-ehlo")
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_reply_ehlo(benchmark, impl):
    code, lines = benchmark(parse_ehlo, impl.ReplyParser)
    assert (code, len(lines)) == (250, 9)


def test_bench_inputs_are_right_and_implementations_agree():
    assert 4000 <= len(BODY_4K) < 4200
    assert (1 << 20) <= len(BODY_1M) < (1 << 20) + 100
    lines = BODY_1M.split(b"\r\n")[6:-1]
    assert {len(line) for line in lines} == {76}
    dotted = sum(line.startswith(b".") for line in lines)
    assert 0.01 < dotted / len(lines) < 0.03
    assert len(WIRE_1M) == len(BODY_1M) + dotted + 3
    assert WIRE_1M.count(b"\r\n..") == dotted and WIRE_1M.endswith(b"\r\n.\r\n")
    assert b"".join(PIECES_1M) == WIRE_1M and len(PIECES_1M) == 17
    expected = [(EV_COMMAND, b"EHLO client.example.org"),
                (EV_COMMAND, b"MAIL FROM:<alice@example.org> SIZE=4096"),
                (EV_COMMAND, b"RCPT TO:<bob@example.net>"), (EV_COMMAND, b"DATA"),
                (EV_DATA, BODY_4K, 0), (EV_COMMAND, b"QUIT")]
    for param in IMPLS:
        impl = param.values[0]
        assert run_transaction(impl) == expected
        assert run_data(impl) == (EV_DATA, BODY_1M, 0)
        assert impl.encode_data(BODY_1M) == WIRE_1M
        assert parse_ehlo(impl.ReplyParser) == (250, [b"mx.example.net Hello client.example.org [192.0.2.1]",
                                          b"SIZE 10240000", b"8BITMIME", b"PIPELINING", b"CHUNKING",
                                          b"SMTPUTF8", b"ENHANCEDSTATUSCODES", b"STARTTLS", b"DSN"])
