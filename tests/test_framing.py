"""SMTP framing on both implementations: commands, DATA, BDAT, replies, encode_data, split invariance."""

from __future__ import annotations

import itertools
import re
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrelay import _impl
from fastrelay._purepy import framing as spec
from fastrelay.limits import COMMAND_HARD_CAP, MAX_COMMAND_LINE, MAX_MESSAGE_SIZE

EV_COMMAND = spec.EV_COMMAND
EV_COMMAND_ERROR = spec.EV_COMMAND_ERROR
EV_OVERFLOW = spec.EV_OVERFLOW
EV_DATA = spec.EV_DATA
EV_BDAT_CHUNK = spec.EV_BDAT_CHUNK
ERR_TOO_LONG = spec.ERR_TOO_LONG
ERR_BARE_LF = spec.ERR_BARE_LF
ERR_BARE_CR = spec.ERR_BARE_CR
ERR_NUL = spec.ERR_NUL
F_BARE_LF = spec.F_BARE_LF
F_BARE_CR = spec.F_BARE_CR
F_LONG_LINE = spec.F_LONG_LINE
F_TOO_BIG = spec.F_TOO_BIG
F_NUL = spec.F_NUL
MODE_COMMAND = spec.MODE_COMMAND
MODE_DATA = spec.MODE_DATA
MODE_BDAT = spec.MODE_BDAT
MODE_DEAD = spec.MODE_DEAD

# Small limits so that the edge cases are reached by short inputs.
SMALL = {"max_line": 64, "max_text_line": 32, "max_size": 200, "hard_cap": 300}

_BDAT = re.compile(rb"BDAT ([0-9]{1,18})( LAST)?", re.IGNORECASE)


def drain(framer) -> list[tuple]:
    """Every event available now, without begin_* calls."""
    events = []
    while (event := framer.next_event()) is not None:
        events.append(event)
    return events


def drive(framer, pieces, states: list | None = None) -> list[tuple]:
    """Feed pieces like a server would: begin_data() after DATA, begin_bdat() after BDAT n [LAST]."""
    events = []
    for piece in pieces:
        framer.feed(piece)
        while (event := framer.next_event()) is not None:
            events.append(event)
            if event[0] == EV_COMMAND:
                if event[1].upper() == b"DATA":
                    framer.begin_data()
                elif m := _BDAT.fullmatch(event[1]):
                    framer.begin_bdat(int(m[1]), m[2] is not None)
        if states is not None:
            states.append((framer.flags, framer.size, framer.pending(), framer.mode))
    return events


def in_data(impl, **limits):
    """A framer that has just accepted DATA (the caller sent 354)."""
    framer = impl.ServerFramer(**limits)
    framer.feed(b"DATA\r\n")
    assert drain(framer) == [(EV_COMMAND, b"DATA")]
    framer.begin_data()
    return framer


def test_constants_are_the_same_in_both(impl):
    module = sys.modules[impl.ServerFramer.__module__]
    names = [n for n in dir(spec) if n.startswith(("EV_", "ERR_", "F_", "MODE_"))]
    assert len(names) == 18
    for name in names:
        assert getattr(module, name) == getattr(spec, name), name


def test_bad_limits_are_refused(impl):
    for kwargs in ({"max_line": 2}, {"max_text_line": 2}, {"max_size": -1},
                   {"max_line": 100, "hard_cap": 99}):
        with pytest.raises(ValueError):
            impl.ServerFramer(**kwargs)
    for kwargs in ({"max_line": 3}, {"max_lines": 0}):
        with pytest.raises(ValueError):
            impl.ReplyParser(**kwargs)


# -- command mode (RFC 5321 §4.1.1, §4.5.3.1.4) ----------------------------------------------------


def test_command_line(impl):
    f = impl.ServerFramer()
    assert f.mode == MODE_COMMAND
    f.feed(b"EHLO client.example.org\r\n")
    assert f.next_event() == (EV_COMMAND, b"EHLO client.example.org")
    assert f.next_event() is None
    assert f.pending() == 0


def test_pipelined_commands_in_one_feed(impl):
    f = impl.ServerFramer()
    f.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nNO")
    assert drain(f) == [
        (EV_COMMAND, b"MAIL FROM:<a@example.org>"),
        (EV_COMMAND, b"RCPT TO:<b@example.net>"),
        (EV_COMMAND, b"RCPT TO:<c@example.net>"),
    ]
    assert f.pending() == 2
    f.feed(b"OP\r\n")
    assert drain(f) == [(EV_COMMAND, b"NOOP")]
    assert f.pending() == 0


def test_empty_line_is_a_command(impl):
    f = impl.ServerFramer()
    f.feed(b"\r\n\r\nQUIT\r\n")
    assert drain(f) == [(EV_COMMAND, b""), (EV_COMMAND, b""), (EV_COMMAND, b"QUIT")]


def test_line_of_exactly_max_line_is_accepted_one_more_is_not(impl):
    f = impl.ServerFramer()
    exact = b"X" * (MAX_COMMAND_LINE - 2)       # 512 octets with the CRLF
    f.feed(exact + b"\r\n" + b"Y" * (MAX_COMMAND_LINE - 1) + b"\r\nNOOP\r\n")
    assert drain(f) == [(EV_COMMAND, exact), (EV_COMMAND_ERROR, ERR_TOO_LONG), (EV_COMMAND, b"NOOP")]


def test_max_line_boundary_with_small_limit(impl):
    f = impl.ServerFramer(max_line=16, hard_cap=64)
    f.feed(b"A" * 14 + b"\r\n" + b"B" * 15 + b"\r\n" + b"C" * 14 + b"\n")
    assert drain(f) == [(EV_COMMAND, b"A" * 14), (EV_COMMAND_ERROR, ERR_TOO_LONG),
                        (EV_COMMAND_ERROR, ERR_BARE_LF)]


def test_long_line_in_pieces_keeps_memory_small(impl):
    f = impl.ServerFramer()
    for _ in range(100):
        f.feed(b"x" * 100)
        assert drain(f) == []
        assert f.pending() <= MAX_COMMAND_LINE
    f.feed(b"\r\nNOOP\r\n")
    assert drain(f) == [(EV_COMMAND_ERROR, ERR_TOO_LONG), (EV_COMMAND, b"NOOP")]
    assert f.pending() == 0


def test_long_line_cr_lf_split_after_discard(impl):
    # The CR of the CRLF is discarded with the line; its LF alone must still end the line as CRLF.
    f = impl.ServerFramer(max_line=16, hard_cap=64)
    f.feed(b"x" * 40 + b"\r")
    assert drain(f) == []
    assert f.pending() == 0
    f.feed(b"\nNOOP\r\n")
    assert drain(f) == [(EV_COMMAND_ERROR, ERR_TOO_LONG), (EV_COMMAND, b"NOOP")]


def assert_dead(f):
    assert f.mode == MODE_DEAD
    assert f.next_event() is None
    f.feed(b"NOOP\r\n")
    assert f.next_event() is None
    assert f.pending() == 0
    f.reset()
    assert f.mode == MODE_DEAD
    with pytest.raises(RuntimeError):
        f.begin_data()
    with pytest.raises(RuntimeError):
        f.begin_bdat(1, True)


def test_line_over_hard_cap_overflows_and_kills(impl):
    f = impl.ServerFramer()
    f.feed(b"NOOP\r\n" + b"x" * (COMMAND_HARD_CAP - 1) + b"\r\nNOOP\r\n")
    assert drain(f) == [(EV_COMMAND, b"NOOP"), (EV_OVERFLOW,)]
    assert_dead(f)


def test_hard_cap_boundary(impl):
    f = impl.ServerFramer(max_line=16, hard_cap=64)
    f.feed(b"x" * 62 + b"\r\n" + b"y" * 62 + b"\n")      # 62 = hard_cap - 2: too long, not overflow
    assert drain(f) == [(EV_COMMAND_ERROR, ERR_TOO_LONG), (EV_COMMAND_ERROR, ERR_TOO_LONG)]
    f.feed(b"z" * 63 + b"\n")
    assert drain(f) == [(EV_OVERFLOW,)]
    assert_dead(f)


def test_hard_cap_partial_line_with_final_cr_waits(impl):
    # hard_cap - 2 bytes and a CR: the CR may be half of the CRLF, so no overflow yet.
    f = impl.ServerFramer(max_line=16, hard_cap=64)
    f.feed(b"x" * 62 + b"\r")
    assert drain(f) == []
    f.feed(b"\n")
    assert drain(f) == [(EV_COMMAND_ERROR, ERR_TOO_LONG)]
    f.feed(b"x" * 62 + b"\r")
    assert drain(f) == []
    f.feed(b"x")        # that CR was not half of a CRLF: now sure to be over
    assert drain(f) == [(EV_OVERFLOW,)]


def test_ten_megabytes_without_lf_overflows_with_bounded_memory(impl):
    f = impl.ServerFramer()
    events = []
    piece = b"A" * 4096
    for i in range(10 * 256):       # 10 MB
        f.feed(piece)
        got = drain(f)
        if got:
            events.append((i, got))
        assert f.pending() <= MAX_COMMAND_LINE
    # 16 * 4096 = 65536 > hard_cap - 2: the overflow comes with the 16th piece, once.
    assert events == [(15, [(EV_OVERFLOW,)])]
    assert f.mode == MODE_DEAD


def test_bare_lf_command(impl):
    f = impl.ServerFramer()
    f.feed(b"NOOP\nNOOP\r\n")
    assert drain(f) == [(EV_COMMAND_ERROR, ERR_BARE_LF), (EV_COMMAND, b"NOOP")]


def test_bare_cr_never_splits_a_command(impl):
    f = impl.ServerFramer()
    f.feed(b"MAIL FROM:<a>\rRCPT TO:<b>\r\n")
    assert drain(f) == [(EV_COMMAND_ERROR, ERR_BARE_CR)]
    f.feed(b"NOOP\r\r\n")
    assert drain(f) == [(EV_COMMAND_ERROR, ERR_BARE_CR)]


def test_nul_in_command(impl):
    f = impl.ServerFramer()
    f.feed(b"MAIL FROM:<a\0@b>\r\n\0\r\n")
    assert drain(f) == [(EV_COMMAND_ERROR, ERR_NUL), (EV_COMMAND_ERROR, ERR_NUL)]


def test_command_error_order(impl):
    f = impl.ServerFramer(max_line=16, hard_cap=64)
    f.feed(b"\0\r" + b"x" * 20 + b"\n"      # too long wins over bare LF, CR and NUL
           + b"\0\rx\n"                     # bare LF wins over CR and NUL
           + b"\0\rx\r\n")                  # bare CR wins over NUL
    assert drain(f) == [(EV_COMMAND_ERROR, ERR_TOO_LONG), (EV_COMMAND_ERROR, ERR_BARE_LF),
                        (EV_COMMAND_ERROR, ERR_BARE_CR)]


def test_crlf_split_between_feeds(impl):
    f = impl.ServerFramer()
    f.feed(b"NOOP\r")
    assert drain(f) == []
    assert f.pending() == 5
    f.feed(b"\n")
    assert drain(f) == [(EV_COMMAND, b"NOOP")]


def test_feed_accepts_bytes_like_and_copies_them(impl):
    f = impl.ServerFramer()
    buf = bytearray(b"NOOP\r\nRS")
    f.feed(buf)
    buf[:] = b"XXXXXXXX"
    f.feed(memoryview(b"ET\r\n"))
    assert drain(f) == [(EV_COMMAND, b"NOOP"), (EV_COMMAND, b"RSET")]
    f.feed(b"")
    assert drain(f) == []


# -- DATA (RFC 5321 §4.1.1.4, §4.5.2, §4.5.3.1.6) --------------------------------------------------


def test_data_body_boundaries_and_next_command(impl):
    f = in_data(impl)
    assert f.mode == MODE_DATA
    f.feed(b"Subject: x\r\n\r\nhi\r\n.\r\nMAIL FROM:<next@example.org>\r\n")
    assert f.next_event() == (EV_DATA, b"Subject: x\r\n\r\nhi\r\n", 0)
    assert f.mode == MODE_COMMAND
    assert (f.flags, f.size) == (0, 0)
    assert f.pending() == len(b"MAIL FROM:<next@example.org>\r\n")   # kept for command mode
    assert drain(f) == [(EV_COMMAND, b"MAIL FROM:<next@example.org>")]


def test_empty_body(impl):
    f = in_data(impl)
    f.feed(b".\r\n")
    assert drain(f) == [(EV_DATA, b"", 0)]


def test_body_is_kept_across_feeds(impl):
    f = in_data(impl)
    f.feed(b"line one\r\nline t")
    assert drain(f) == []
    assert f.size == len(b"line one\r\n")
    assert f.pending() == len(b"line t")
    f.feed(b"wo\r\n.")
    assert drain(f) == []
    f.feed(b"\r")
    assert drain(f) == []
    f.feed(b"\n")
    assert drain(f) == [(EV_DATA, b"line one\r\nline two\r\n", 0)]


@pytest.mark.parametrize(("wire", "body"), [
    (b"..x\r\n", b".x\r\n"),
    (b"..\r\n", b".\r\n"),                      # a body line that is only "."
    (b".x\r\n", b"x\r\n"),                      # an unstuffed leading dot is still removed
    (b"...\r\n", b"..\r\n"),
    (b"a\r\n..b\r\nc.d\r\n", b"a\r\n.b\r\nc.d\r\n"),
    (b"..\r\n..\r\n", b".\r\n.\r\n"),
], ids=["dotdot-x", "dotdot", "dot-x", "three-dots", "middle", "two-dot-lines"])
def test_dot_unstuffing(impl, wire, body):
    f = in_data(impl)
    f.feed(wire + b".\r\n")
    assert drain(f) == [(EV_DATA, body, 0)]


# Each fake end between "x" and "y": (wire, body after unstuffing, flags). docs/reliability.md case 1.
FAKE_ENDS = {
    "LF.LF": (b"\n.\n", b"x\n\ny\r\n", F_BARE_LF),
    "LF.CRLF": (b"\n.\r\n", b"x\n\r\ny\r\n", F_BARE_LF),
    "CRLF.LF": (b"\r\n.\n", b"x\r\n\ny\r\n", F_BARE_LF),
    "CR.CR": (b"\r.\r", b"x\r.\ry\r\n", F_BARE_CR),
    "CR.CRLF": (b"\r.\r\n", b"x\r.\r\ny\r\n", F_BARE_CR),
    "CRLF.CR": (b"\r\n.\r", b"x\r\n\ry\r\n", F_BARE_CR),
    "CR.LF": (b"\r.\n", b"x\r.\ny\r\n", F_BARE_CR | F_BARE_LF),
    "LF.CR": (b"\n.\r", b"x\n\ry\r\n", F_BARE_LF | F_BARE_CR),
    "NUL-before-dot": (b"\r\n\0.\r\n", b"x\r\n\0.\r\ny\r\n", F_NUL),
}


@pytest.mark.parametrize("name", list(FAKE_ENDS))
def test_fake_end_does_not_end_data(impl, name):
    fake, body, flags = FAKE_ENDS[name]
    f = in_data(impl)
    f.feed(b"x" + fake + b"y\r\n")
    assert drain(f) == []
    assert f.mode == MODE_DATA
    assert f.flags == flags
    f.feed(b".\r\nQUIT\r\n")
    assert drain(f) == [(EV_DATA, body, flags), (EV_COMMAND, b"QUIT")]


@pytest.mark.parametrize(("wire", "body", "flags"), [
    (b"a\nb\r\n", b"a\nb\r\n", F_BARE_LF),
    (b"\n", b"\n", F_BARE_LF),
    (b".\n", b"\n", F_BARE_LF),
    (b"a\rb\r\n", b"a\rb\r\n", F_BARE_CR),
    (b"a\r\r\n", b"a\r\r\n", F_BARE_CR),
    (b"a\0b\r\n", b"a\0b\r\n", F_NUL),
    (b"\0\r\n", b"\0\r\n", F_NUL),
    (b"a\r\0\n", b"a\r\0\n", F_BARE_CR | F_BARE_LF | F_NUL),
], ids=["bare-lf", "lf-only", "dot-lf", "bare-cr", "cr-crlf", "nul", "nul-only", "all"])
def test_data_flags(impl, wire, body, flags):
    f = in_data(impl)
    f.feed(wire + b"end\r\n.\r\n")
    assert drain(f) == [(EV_DATA, body + b"end\r\n", flags)]


def test_end_line_after_a_bare_lf_is_not_the_end(impl):
    # b"a\n.\r\n" holds no CRLF.CRLF (RFC 5321 §4.1.1.4): the ".\r\n" line is body, unstuffed.
    f = in_data(impl)
    f.feed(b"a\n.\r\n")
    assert drain(f) == []
    f.feed(b".\r\n")
    assert drain(f) == [(EV_DATA, b"a\n\r\n", F_BARE_LF)]


@pytest.mark.parametrize(("content", "flags"), [
    (997, 0),               # 999 octets with CRLF
    (998, 0),               # 1000: the RFC 5321 §4.5.3.1.6 limit
    (999, F_LONG_LINE),     # 1001
])
def test_long_line_limit(impl, content, flags):
    f = in_data(impl)
    line = b"a" * content + b"\r\n"
    f.feed(line + b".\r\n")
    assert drain(f) == [(EV_DATA, line, flags)]


def test_long_line_limit_with_crlf_split_and_stuffed_dot(impl):
    f = in_data(impl)
    f.feed(b"a" * 998 + b"\r")        # CRLF split at the boundary
    f.feed(b"\n." + b"b" * 998 + b"\r\n")    # 1001 octets on the wire, 1000 unstuffed
    f.feed(b"c" * 999 + b"\n")       # 1000 octets but 999 without the (bare) line ending
    f.feed(b"\r\n.\r\n")
    assert drain(f) == [(EV_DATA, b"a" * 998 + b"\r\n" + b"b" * 998 + b"\r\n" + b"c" * 999 + b"\n\r\n",
                         F_LONG_LINE | F_BARE_LF)]


def test_too_big_caps_the_body_and_still_finds_the_end(impl):
    f = in_data(impl, max_size=100)
    line = b"z" * 38 + b"\r\n"        # 40 octets
    f.feed(line * 2)
    f.feed(line)                       # 120 > 100: F_TOO_BIG, dropped
    f.feed(b"bare\nlf\r\n..\r\n.\nok\r\n")   # dropped unchecked: no F_BARE_LF
    assert drain(f) == []
    assert (f.flags, f.size, f.mode) == (F_TOO_BIG, 80, MODE_DATA)
    f.feed(b".\r\nQUIT\r\n")
    assert drain(f) == [(EV_DATA, line * 2, F_TOO_BIG), (EV_COMMAND, b"QUIT")]


def test_body_of_exactly_max_size_then_end_in_pieces(impl):
    # b"." and b".\r" must be kept even when the body is full: they may become the end.
    f = in_data(impl, max_size=100)
    body = b"q" * 98 + b"\r\n"
    f.feed(body)
    f.feed(b".")
    assert drain(f) == []
    f.feed(b"\r")
    assert drain(f) == []
    assert f.flags == 0
    f.feed(b"\n")
    assert drain(f) == [(EV_DATA, body, 0)]


def test_ten_megabyte_line_in_data_has_bounded_memory(impl):
    f = in_data(impl, max_size=100_000)
    f.feed(b"header: x\r\n")
    piece = b"B" * 65536
    for _ in range(160):               # 10 MB with no LF
        f.feed(piece)
        assert drain(f) == []
        assert f.pending() <= 100_000
        assert f.size == len(b"header: x\r\n")
    assert f.flags == F_TOO_BIG
    f.feed(b"\r\n.\r\nQUIT\r\n")
    assert drain(f) == [(EV_DATA, b"header: x\r\n", F_TOO_BIG), (EV_COMMAND, b"QUIT")]


def test_ten_megabyte_line_in_data_with_default_limit(impl):
    f = in_data(impl)
    piece = b"C" * 65536
    for _ in range(160):
        f.feed(piece)
        assert drain(f) == []
        assert f.pending() <= MAX_MESSAGE_SIZE
        assert f.size == 0
    assert f.flags == F_TOO_BIG
    assert f.pending() < 65536
    f.feed(b"\r\n.\r\n")
    assert drain(f) == [(EV_DATA, b"", F_TOO_BIG)]


def test_partial_line_too_big_is_dropped_as_it_arrives(impl):
    f = in_data(impl, max_size=50)
    f.feed(b"a" * 30 + b"\r\n")
    f.feed(b"b" * 21)                  # 32 + 21 > 50 before its LF arrives
    assert drain(f) == []
    assert (f.flags, f.size, f.pending()) == (F_TOO_BIG, 32, 0)
    f.feed(b"\r\n")
    f.feed(b".\r\n")
    assert drain(f) == [(EV_DATA, b"a" * 30 + b"\r\n", F_TOO_BIG)]


def test_lowercase_data_command_through_the_driver(impl):
    f = impl.ServerFramer()
    assert drive(f, [b"data\r\nbody\r\n.\r\n"]) == [(EV_COMMAND, b"data"), (EV_DATA, b"body\r\n", 0)]


# -- BDAT (RFC 3030) -------------------------------------------------------------------------------


def test_bdat_chunks_and_last(impl):
    f = impl.ServerFramer()
    f.begin_bdat(5, False)
    assert f.mode == MODE_BDAT
    f.feed(b"Subj:")
    assert drain(f) == [(EV_BDAT_CHUNK, 5)]
    assert (f.mode, f.size) == (MODE_COMMAND, 5)
    f.begin_bdat(12, True)
    f.feed(b" x\r\n.\r\n..y\r\nQUIT\r\n")       # raw content: no end line, no unstuffing
    assert drain(f) == [(EV_DATA, b"Subj: x\r\n.\r\n..y\r\n", 0), (EV_COMMAND, b"QUIT")]
    assert (f.mode, f.size, f.flags) == (MODE_COMMAND, 0, 0)


def test_bdat_zero_last(impl):
    f = impl.ServerFramer()
    f.begin_bdat(0, True)
    assert drain(f) == [(EV_DATA, b"", 0)]
    f.begin_bdat(3, False)
    f.feed(b"abc")
    assert drain(f) == [(EV_BDAT_CHUNK, 3)]
    f.begin_bdat(0, True)
    assert drain(f) == [(EV_DATA, b"abc", 0)]


def test_bdat_zero_without_last(impl):
    f = impl.ServerFramer()
    f.begin_bdat(0, False)
    assert drain(f) == [(EV_BDAT_CHUNK, 0)]
    assert f.mode == MODE_COMMAND


def test_bdat_chunk_across_feeds(impl):
    f = impl.ServerFramer()
    f.begin_bdat(10, True)
    f.feed(b"abc")
    assert drain(f) == []
    assert (f.mode, f.size, f.pending()) == (MODE_BDAT, 3, 0)
    f.feed(b"defg")
    assert drain(f) == []
    f.feed(b"hi\rNOOP\r\n")
    assert drain(f) == [(EV_DATA, b"abcdefghi\r", F_BARE_CR), (EV_COMMAND, b"NOOP")]


@pytest.mark.parametrize(("chunks", "flags"), [
    ([b"a\r", b"\nb\r\n"], 0),                 # CR at a chunk end, LF at the next start
    ([b"a\r\n", b"b\r"], F_BARE_CR),           # a CR as the very last byte of LAST is bare
    ([b"a\r", b"b\r\n"], F_BARE_CR),
    ([b"a", b"\nb\r\n"], F_BARE_LF),
    ([b"a\r\n", b"\n"], F_BARE_LF),
    ([b"\0", b"\r\n"], F_NUL),
    ([b"a" * 600, b"a" * 398 + b"\r\n"], 0),           # 998 octets across chunks
    ([b"a" * 600, b"a" * 399 + b"\r\n"], F_LONG_LINE),
    ([b"a" * 600, b"a" * 399], F_LONG_LINE),           # an unterminated last line counts
    ([b"a" * 998 + b"\r", b""], F_BARE_CR | F_LONG_LINE),   # a final bare CR is content: 999
    ([b"a" * 997 + b"\r", b""], F_BARE_CR),
    ([b"a" * 998 + b"\r", b"\n"], 0),
    ([b"a" * 999 + b"\n", b""], F_LONG_LINE | F_BARE_LF),
], ids=lambda v: repr(v)[:24])
def test_bdat_flags_across_chunks(impl, chunks, flags):
    f = impl.ServerFramer()
    first, last = chunks
    f.begin_bdat(len(first), False)
    f.feed(first)
    assert drain(f) == [(EV_BDAT_CHUNK, len(first))]
    f.begin_bdat(len(last), True)
    f.feed(last)
    assert drain(f) == [(EV_DATA, first + last, flags)]


def test_bdat_too_big_at_begin_still_consumes(impl):
    f = impl.ServerFramer(max_size=10)
    f.begin_bdat(4, False)
    f.feed(b"abcd")
    assert drain(f) == [(EV_BDAT_CHUNK, 4)]
    f.begin_bdat(7, False)                 # 4 + 7 > 10
    assert f.flags == F_TOO_BIG
    f.feed(b"x\0\nyz\r\r")                 # consumed, not kept, not checked
    assert drain(f) == [(EV_BDAT_CHUNK, 7)]
    f.begin_bdat(3, True)
    f.feed(b"end")
    f.feed(b"NOOP\r\n")
    assert drain(f) == [(EV_DATA, b"abcd", F_TOO_BIG), (EV_COMMAND, b"NOOP")]
    assert f.flags == 0


def test_bdat_exactly_max_size_fits(impl):
    f = impl.ServerFramer(max_size=10)
    f.begin_bdat(10, True)
    f.feed(b"0123456789")
    assert drain(f) == [(EV_DATA, b"0123456789", 0)]


def test_command_after_bdat_chunk_in_the_same_feed(impl):
    f = impl.ServerFramer()
    events = drive(f, [b"BDAT 4\r\nab\r\nBDAT 3 LAST\r\ncd\nRSET\r\n"])
    assert events == [(EV_COMMAND, b"BDAT 4"), (EV_BDAT_CHUNK, 4), (EV_COMMAND, b"BDAT 3 LAST"),
                      (EV_DATA, b"ab\r\ncd\n", F_BARE_LF), (EV_COMMAND, b"RSET")]


def test_bdat_argument_checks(impl):
    f = impl.ServerFramer()
    for bad in (-1, 2**63, "5", 1.0):
        with pytest.raises(ValueError):
            f.begin_bdat(bad, True)
    f.begin_bdat(2**63 - 1, False)
    assert f.flags == F_TOO_BIG
    with pytest.raises(RuntimeError):
        f.begin_bdat(1, True)
    with pytest.raises(RuntimeError):
        f.begin_data()


# -- reset, pending, discard_pending ---------------------------------------------------------------


def test_reset_forgets_the_message_keeps_input(impl):
    f = in_data(impl)
    f.feed(b"a\nb\r\nRSET\r")
    assert drain(f) == []
    assert (f.flags, f.size, f.pending()) == (F_BARE_LF, 5, 5)
    f.reset()
    assert (f.flags, f.size, f.pending(), f.mode) == (0, 0, 5, MODE_COMMAND)
    f.feed(b"\n")
    assert drain(f) == [(EV_COMMAND, b"RSET")]


def test_reset_after_bdat_chunk(impl):
    f = impl.ServerFramer()
    f.begin_bdat(3, False)
    f.feed(b"a\0c")
    assert drain(f) == [(EV_BDAT_CHUNK, 3)]
    f.reset()
    f.begin_bdat(0, True)
    assert drain(f) == [(EV_DATA, b"", 0)]


def test_discard_pending_after_starttls(impl):
    # docs/reliability.md case 6: plaintext sent after STARTTLS must not be read as TLS-protected input.
    f = impl.ServerFramer()
    injected = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\n"
    f.feed(b"STARTTLS\r\n" + injected)
    assert f.next_event() == (EV_COMMAND, b"STARTTLS")
    assert f.pending() == len(injected)
    assert f.discard_pending() == len(injected)
    assert f.pending() == 0
    assert f.next_event() is None
    f.feed(b"EHLO again\r\n")
    assert drain(f) == [(EV_COMMAND, b"EHLO again")]


def test_discard_pending_forgets_a_partly_received_line(impl):
    f = impl.ServerFramer(max_line=16, hard_cap=64)
    f.feed(b"x" * 40)                  # too long, already discarded and counted
    assert drain(f) == []
    assert f.discard_pending() == 0
    f.feed(b"NOOP\r\n")
    assert drain(f) == [(EV_COMMAND, b"NOOP")]


# -- ReplyParser (RFC 5321 §4.2; docs/reliability.md case 44) -------------------------------------------


def replies(parser) -> list:
    out = []
    while (reply := parser.next_reply()) is not None:
        out.append(reply)
    return out


EHLO_REPLY = (b"250-mx.example.net Hello client [192.0.2.1]\r\n250-SIZE 10240000\r\n250-PIPELINING\r\n"
              b"250-CHUNKING\r\n250 8BITMIME\r\n")


def test_reply_single_line(impl):
    r = impl.ReplyParser()
    r.feed(b"220 mx.example.net ESMTP ready\r\n")
    assert replies(r) == [(220, [b"mx.example.net ESMTP ready"])]


def test_reply_multi_line(impl):
    r = impl.ReplyParser()
    r.feed(EHLO_REPLY)
    assert replies(r) == [(250, [b"mx.example.net Hello client [192.0.2.1]", b"SIZE 10240000",
                                 b"PIPELINING", b"CHUNKING", b"8BITMIME"])]


def test_reply_without_text(impl):
    r = impl.ReplyParser()
    r.feed(b"250\r\n354 \r\n250-\r\n250\r\n")
    assert replies(r) == [(250, [b""]), (354, [b""]), (250, [b"", b""])]


def test_reply_lf_only(impl):
    r = impl.ReplyParser()
    r.feed(b"250-a\n250 b\n221 bye\n")
    assert replies(r) == [(250, [b"a", b"b"]), (221, [b"bye"])]


def test_reply_split_at_every_offset(impl):
    stream = EHLO_REPLY + b"354 go ahead\n" + b"250\r\n" + b"451-try\r\n451 later\r\n"
    whole = impl.ReplyParser()
    whole.feed(stream)
    expected = replies(whole)
    assert len(expected) == 4
    for cut in range(len(stream) + 1):
        r = impl.ReplyParser()
        got = []
        for piece in (stream[:cut], stream[cut:]):
            r.feed(piece)
            got += replies(r)
        assert got == expected, cut
    r = impl.ReplyParser()
    got = []
    for i in range(len(stream)):
        r.feed(stream[i:i + 1])
        got += replies(r)
    assert got == expected


def test_reply_line_too_long(impl):
    r = impl.ReplyParser(max_line=16)
    r.feed(b"250 " + b"a" * 10 + b"\r\n")     # 16 octets: fine
    assert replies(r) == [(250, [b"a" * 10])]
    r.feed(b"250 " + b"a" * 11 + b"\r\n")
    assert replies(r) == [(-1, [b"line too long"])]
    r = impl.ReplyParser(max_line=16)
    r.feed(b"250 " + b"a" * 12)              # 16 octets and no LF yet: already too long
    assert replies(r) == [(-1, [b"line too long"])]


def test_reply_long_line_is_refused_without_waiting(impl):
    r = impl.ReplyParser()
    for _ in range(3):
        r.feed(b"2" * 1000)
    assert replies(r) == [(-1, [b"line too long"])]
    r.feed(b"\r\n250 ok\r\n")
    assert replies(r) == []


def test_reply_too_many_lines(impl):
    r = impl.ReplyParser(max_lines=3)
    r.feed(b"250-a\r\n250-b\r\n250 c\r\n")
    assert replies(r) == [(250, [b"a", b"b", b"c"])]
    r.feed(b"250-a\r\n250-b\r\n250-c\r\n")
    assert replies(r) == [(-1, [b"too many lines"])]


def test_reply_endless_continuation_has_bounded_memory(impl):
    r = impl.ReplyParser()
    r.feed(b"250-x\r\n" * 1000)
    assert replies(r) == [(-1, [b"too many lines"])]


@pytest.mark.parametrize("line", [
    b"25x ok", b"ok", b"", b"25", b"2500 ok", b"250x", b"150 ok", b"650 ok", b"050 ok", b"250 a\rb",
    b"250 a\0b", b" 250 ok", b"250 ok\r",
], ids=lambda v: repr(v))
def test_reply_malformed(impl, line):
    r = impl.ReplyParser()
    r.feed(line + b"\r\n250 ok\r\n")
    assert replies(r) == [(-1, [b"malformed"])]
    r.feed(b"250 ok\r\n")
    assert r.next_reply() is None


def test_reply_first_digit_2_to_5(impl):
    r = impl.ReplyParser()
    r.feed(b"200 a\r\n354 b\r\n421 c\r\n599 d\r\n")
    assert replies(r) == [(200, [b"a"]), (354, [b"b"]), (421, [b"c"]), (599, [b"d"])]


def test_reply_mixed_codes(impl):
    r = impl.ReplyParser()
    r.feed(b"250-a\r\n251 b\r\n")
    assert replies(r) == [(-1, [b"malformed"])]


def test_reply_dead_after_error(impl):
    r = impl.ReplyParser()
    r.feed(b"250 ok\r\nXXX\r\n250 after\r\n")
    assert r.next_reply() == (250, [b"ok"])
    assert r.next_reply() == (-1, [b"malformed"])
    assert r.next_reply() is None
    r.feed(b"250 more\r\n")
    assert r.next_reply() is None


def test_several_replies_in_one_feed(impl):
    r = impl.ReplyParser()
    r.feed(b"250 a\r\n250 b\r\n354 c\r\n25")
    assert replies(r) == [(250, [b"a"]), (250, [b"b"]), (354, [b"c"])]
    r.feed(b"0 d\r\n")
    assert replies(r) == [(250, [b"d"])]


# -- encode_data (docs/reliability.md cases 3, 27; RFC 5321 §4.5.2) -------------------------------------


@pytest.mark.parametrize(("body", "wire"), [
    (b"", b".\r\n"),
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"a\nb\rc", b"a\r\nb\r\nc\r\n.\r\n"),
    (b"a\r\r\n", b"a\r\n\r\n.\r\n"),
    (b"a\n\r", b"a\r\n\r\n.\r\n"),
    (b"\r", b"\r\n.\r\n"),
    (b"\n\n", b"\r\n\r\n.\r\n"),
    (b".a\r\n.\r\nb.c\r\n", b"..a\r\n..\r\nb.c\r\n.\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b"x\n.\r.\r\n.", b"x\r\n..\r\n..\r\n..\r\n.\r\n"),
    (b"abc", b"abc\r\n.\r\n"),
    (b"a\0b", b"a\0b\r\n.\r\n"),
    (b"\r\n", b"\r\n.\r\n"),
], ids=lambda v: repr(v)[:20])
def test_encode_data(impl, body, wire):
    assert impl.encode_data(body) == wire
    assert impl.encode_data(bytearray(body)) == wire
    assert impl.encode_data(memoryview(body)) == wire


def test_encode_data_refuses_non_bytes(impl):
    for bad in ("text", 5, None):
        with pytest.raises(TypeError):
            impl.encode_data(bad)


def test_encode_data_large_and_pathological(impl):
    rows = [b"." * (i % 3) + b"x" * (i % 90) for i in range(3000)]
    for body in (b"\r\n".join(rows), b"\n".join(rows), b"\n" * 5000, b".\r" * 5000, b"\r" * 4999):
        assert impl.encode_data(body) == spec.encode_data(body)
    assert impl.encode_data(b"\n" * 5000) == b"\r\n" * 5000 + b".\r\n"
    assert impl.encode_data(b".\r" * 3) == b"..\r\n..\r\n..\r\n.\r\n"


def test_encode_data_round_trip(impl):
    body = b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\nend.\r\n"
    f = in_data(impl)
    f.feed(impl.encode_data(body))
    assert drain(f) == [(EV_DATA, body, 0)]


# -- split invariance (docs/reliability.md case 8) ------------------------------------------------------


SESSIONS = {
    "transaction": (
        b"EHLO client.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
        b"DATA\r\nSubject: hi\r\n\r\n..leading dot\r\nbody\r\n..\r\n.\r\nQUIT\r\n", {}),
    "smuggling": (
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nx\n.\nMAIL FROM:<e@x>\r\n"
        b"y\r.\r\nRCPT TO:<v@y>\r\n\r\n.\rDATA\r\nz\n.\r\n\0.\r\n.\r\nRSET\r\n", {}),
    "bdat": (
        b"EHLO x\r\nBDAT 12\r\n.\r\n..\r\nabc\r\rBDAT 5 LAST\r\n\nc\r\n\rNOOP\r\nbdat 0 LAST\r\n"
        b"BDAT 0\r\nBDAT 3 last\r\nxyzQUIT\r\n", {}),
    "errors": (
        b"NOOP\n" + b"A" * 200 + b"\r\nMAIL\rFROM\r\n\0\r\n\r\nHELO x\r\n" + b"B" * 70 + b"\r\n"
        + b"C" * 400 + b"\r\nNOOP\r\n", {"max_line": 64, "hard_cap": 300}),
    "limits": (
        b"data\r\n" + b"d" * 40 + b"\r\n" + (b"e" * 50 + b"\r\n") * 5 + b"\r\n.\r\n"
        b"DATA\r\n" + b"f" * 250 + b"\r\n..\r\n.\r\nNOOP\r\n" + b"g" * 400 + b"\r\nNOOP\r\n", SMALL),
}


@pytest.mark.parametrize("name", list(SESSIONS))
def test_split_invariance(impl, name):
    stream, limits = SESSIONS[name]
    expected = drive(impl.ServerFramer(**limits), [stream])
    assert len(expected) >= 5
    for cut in range(len(stream) + 1):
        assert drive(impl.ServerFramer(**limits), [stream[:cut], stream[cut:]]) == expected, cut
    one_by_one = [stream[i:i + 1] for i in range(len(stream))]
    assert drive(impl.ServerFramer(**limits), one_by_one) == expected


def test_split_invariance_sessions_have_the_expected_events(impl):
    # Guards the sessions above: the splits must agree with the right events, not just each other.
    stream, limits = SESSIONS["transaction"]
    assert drive(impl.ServerFramer(**limits), [stream])[-2:] == [
        (EV_DATA, b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n.\r\n", 0), (EV_COMMAND, b"QUIT")]
    stream, limits = SESSIONS["smuggling"]
    assert drive(impl.ServerFramer(**limits), [stream])[-2:] == [
        (EV_DATA, b"x\n\nMAIL FROM:<e@x>\r\ny\r.\r\nRCPT TO:<v@y>\r\n\r\n\rDATA\r\nz\n\r\n\0.\r\n",
         F_BARE_LF | F_BARE_CR | F_NUL), (EV_COMMAND, b"RSET")]
    stream, limits = SESSIONS["bdat"]
    assert drive(impl.ServerFramer(**limits), [stream]) == [
        (EV_COMMAND, b"EHLO x"), (EV_COMMAND, b"BDAT 12"), (EV_BDAT_CHUNK, 12),
        (EV_COMMAND, b"BDAT 5 LAST"), (EV_DATA, b".\r\n..\r\nabc\r\r\nc\r\n\r", F_BARE_CR),
        (EV_COMMAND, b"NOOP"), (EV_COMMAND, b"bdat 0 LAST"), (EV_DATA, b"", 0),
        (EV_COMMAND, b"BDAT 0"), (EV_BDAT_CHUNK, 0), (EV_COMMAND, b"BDAT 3 last"),
        (EV_DATA, b"xyz", 0), (EV_COMMAND, b"QUIT")]
    stream, limits = SESSIONS["errors"]
    assert drive(impl.ServerFramer(**limits), [stream]) == [
        (EV_COMMAND_ERROR, ERR_BARE_LF), (EV_COMMAND_ERROR, ERR_TOO_LONG),
        (EV_COMMAND_ERROR, ERR_BARE_CR), (EV_COMMAND_ERROR, ERR_NUL), (EV_COMMAND, b""),
        (EV_COMMAND, b"HELO x"), (EV_COMMAND_ERROR, ERR_TOO_LONG), (EV_OVERFLOW,)]
    stream, limits = SESSIONS["limits"]
    assert drive(impl.ServerFramer(**limits), [stream]) == [
        (EV_COMMAND, b"data"), (EV_DATA, b"d" * 40 + b"\r\n" + (b"e" * 50 + b"\r\n") * 3,
                                F_TOO_BIG | F_LONG_LINE),
        (EV_COMMAND, b"DATA"), (EV_DATA, b"", F_TOO_BIG), (EV_COMMAND, b"NOOP"), (EV_OVERFLOW,)]


# -- Hypothesis: the twin and the Cython version agree (DESIGN.md, docs/reliability.md case 8) ---------

_COMPILED = None if _impl.NO_EXTENSIONS else _impl.compiled()
# Twin-vs-Cython comparisons: deselected (not skipped) in the run with FASTRELAY_NO_EXTENSIONS=1 (conftest).
needs_both = pytest.mark.needs_compiled

_FRAGMENTS = [
    b"EHLO x\r\n", b"MAIL FROM:<a@b>\r\n", b"DATA\r\n", b"data\r\n", b"BDAT 4\r\n", b"BDAT 9 LAST\r\n",
    b"BDAT 0 LAST\r\n", b"BDAT 0\r\n", b"bdat 70\r\n", b"RSET\r\n", b".", b"..", b".\r\n", b"\r\n.\r\n",
    b"\r", b"\n", b"\r\n", b"\0", b"\n.\n", b"\r.\r", b"x", b"hello world", b"a" * 33, b"b" * 70,
    b"c" * 190, b"d" * 310,
]
_stream = st.lists(st.sampled_from(_FRAGMENTS) | st.binary(max_size=6), max_size=40).map(b"".join)


def _cuts(data, stream: bytes) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


@needs_both
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=_stream, data=st.data())
def test_property_framer_twin_and_cython_agree(stream, data):
    pieces = _cuts(data, stream)
    py_states: list = []
    c_states: list = []
    py_events = drive(_impl.PY.ServerFramer(**SMALL), pieces, py_states)
    c_events = drive(_COMPILED.ServerFramer(**SMALL), pieces, c_states)
    assert c_events == py_events
    assert c_states == py_states
    assert drive(_impl.PY.ServerFramer(**SMALL), [stream]) == py_events     # split invariance


_REPLY_FRAGMENTS = [
    b"250", b"220", b"550", b"199", b"2x0", b"-", b" ", b"ok", b"hello there", b"\r\n", b"\n", b"\r",
    b"\0", b"250-ok\r\n", b"250 ok\r\n", b"354\n", b"x" * 20, b"y" * 40,
]
_reply_stream = st.lists(st.sampled_from(_REPLY_FRAGMENTS) | st.binary(max_size=4),
                         max_size=30).map(b"".join)


def _replies_of(parser_cls, pieces) -> list:
    parser = parser_cls(max_line=32, max_lines=4)
    out = []
    for piece in pieces:
        parser.feed(piece)
        out += replies(parser)
    return out


@needs_both
@settings(max_examples=500, deadline=None)
@given(stream=_reply_stream, data=st.data())
def test_property_reply_parser_twin_and_cython_agree(stream, data):
    pieces = _cuts(data, stream)
    expected = _replies_of(_impl.PY.ReplyParser, pieces)
    assert _replies_of(_COMPILED.ReplyParser, pieces) == expected
    assert _replies_of(_impl.PY.ReplyParser, [stream]) == expected


@needs_both
@settings(max_examples=300, deadline=None)
@given(body=st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"\0", b"a", b"bc" * 20]),
                     max_size=60).map(b"".join))
def test_property_encode_data_agrees_at_every_simd_level(body):
    core = sys.modules[_COMPILED.encode_data.__module__]
    expected = _impl.PY.encode_data(body)
    top = core._framing_simd()
    try:
        for level in range(top + 1):
            assert core._framing_simd(level) == level
            assert _COMPILED.encode_data(body) == expected
    finally:
        core._framing_simd(top)


@settings(max_examples=200, deadline=None)
@given(body=st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..x"]), max_size=30)
       .map(b"".join))
def test_property_dot_stuffing_round_trip(body):
    # docs/reliability.md case 27: what the twin sends, the framer gives back (line ends normalised).
    framer = in_data(_impl.PY)
    framer.feed(spec.encode_data(body))
    normalised = b"".join(line + b"\r\n" for line in body.splitlines())
    assert drain(framer) == [(EV_DATA, normalised, 0)]
