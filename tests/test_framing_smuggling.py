"""SMTP smuggling: no fake end-of-data ends DATA, on either implementation (docs/reliability.md case 1)."""

from __future__ import annotations

import pytest

from fastrelay._purepy import framing as spec

EV_COMMAND = spec.EV_COMMAND
EV_DATA = spec.EV_DATA
F_BARE_LF = spec.F_BARE_LF
F_BARE_CR = spec.F_BARE_CR
F_NUL = spec.F_NUL

# The smtpsmug list (CVE-2023-51764 Postfix, -51765 Sendmail, -51766 Exim, CVE-2024-27305 aiosmtpd).
# Each: the fake end, what it becomes in the body (lines are split on LF and unstuffed, RFC 5321
# §4.5.2), and the flags that let the server refuse the message after the real end (case 2).
VARIANTS = {
    "LF.LF": (b"\n.\n", b"\n\n", F_BARE_LF),
    "LF.CRLF": (b"\n.\r\n", b"\n\r\n", F_BARE_LF),
    "CRLF.LF": (b"\r\n.\n", b"\r\n\n", F_BARE_LF),
    "CR.CR": (b"\r.\r", b"\r.\r", F_BARE_CR),
    "CR.CRLF": (b"\r.\r\n", b"\r.\r\n", F_BARE_CR),
    "CRLF.CR": (b"\r\n.\r", b"\r\n\r", F_BARE_CR),
    "CR.LF": (b"\r.\n", b"\r.\n", F_BARE_CR | F_BARE_LF),
    "LF.CR": (b"\n.\r", b"\n\r", F_BARE_LF | F_BARE_CR),
    "NUL-before-dot": (b"\r\n\0.\r\n", b"\r\n\0.\r\n", F_NUL),
}

PREFIX = b"From: a@example.org\r\nSubject: hello\r\n\r\nhi"
SMUGGLED = (b"MAIL FROM:<ceo@victim.example>\r\nRCPT TO:<target@example.net>\r\nDATA\r\n"
            b"From: ceo\r\n\r\npay\r\n")
REAL_END = b".\r\n"     # SMUGGLED ends in CRLF, so this completes the one real CRLF.CRLF


def session(fake: bytes) -> bytes:
    return (b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
            + PREFIX + fake + SMUGGLED + REAL_END + b"QUIT\r\n")


def run(impl, pieces) -> list[tuple]:
    framer = impl.ServerFramer()
    events = []
    for piece in pieces:
        framer.feed(piece)
        while (event := framer.next_event()) is not None:
            events.append(event)
            if event == (EV_COMMAND, b"DATA"):
                framer.begin_data()
    return events


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fake_end_is_carried_in_the_body(impl, variant):
    fake, carried, flags = VARIANTS[variant]
    events = run(impl, [session(fake)])
    assert events == [
        (EV_COMMAND, b"MAIL FROM:<a@example.org>"),
        (EV_COMMAND, b"RCPT TO:<b@example.net>"),
        (EV_COMMAND, b"DATA"),
        # One message: the smuggled commands are body text, and only the real end ended it.
        (EV_DATA, PREFIX + carried + SMUGGLED, flags),
        (EV_COMMAND, b"QUIT"),
    ]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fake_end_alone_does_not_end_data(impl, variant):
    fake, _, flags = VARIANTS[variant]
    framer = impl.ServerFramer()
    framer.begin_data()
    framer.feed(b"hi" + fake)
    assert framer.next_event() is None
    assert framer.mode == spec.MODE_DATA
    framer.feed(b"more\r\n")
    assert framer.next_event() is None
    assert framer.flags == flags


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fake_end_split_anywhere(impl, variant):
    # docs/reliability.md case 8: a fake end cut between two TCP segments is still not an end.
    fake = VARIANTS[variant][0]
    stream = session(fake)
    expected = run(impl, [stream])
    start = stream.index(b"DATA\r\n")
    for cut in range(start, len(stream) + 1):
        assert run(impl, [stream[:cut], stream[cut:]]) == expected, cut


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_relayed_body_cannot_smuggle_downstream(impl, variant):
    # docs/reliability.md case 3: what we send on is CRLF-normalised and dot-stuffed, so the next hop
    # sees exactly one end: the one encode_data adds.
    fake = VARIANTS[variant][0]
    body = PREFIX + fake + SMUGGLED
    wire = impl.encode_data(body)
    assert wire.endswith(b"\r\n.\r\n")
    assert wire.count(b"\r\n.\r\n") == 1
    content = wire[:-3]
    assert b"\n.\n" not in content and b"\r.\r" not in content and b"\n.\r" not in content
    events = run(impl, [b"DATA\r\n" + wire + b"QUIT\r\n"])
    normalised = b"".join(line + b"\r\n" for line in body.splitlines())
    flags = F_NUL if b"\0" in body else 0
    assert events == [(EV_COMMAND, b"DATA"), (EV_DATA, normalised, flags), (EV_COMMAND, b"QUIT")]


def test_real_end_after_fake_ends(impl):
    # Every fake end in one body: still one message, ended by the CRLF.CRLF that follows them.
    body = b"x" + b"y".join(v[0] for v in VARIANTS.values()) + b"z\r\n"
    events = run(impl, [b"DATA\r\n" + body + b".\r\nNOOP\r\n"])
    assert [e[0] for e in events] == [EV_COMMAND, EV_DATA, EV_COMMAND]
    assert events[1][2] == F_BARE_LF | F_BARE_CR | F_NUL
    assert events[2] == (EV_COMMAND, b"NOOP")
