"""fastrelay.bindings: the Binding_Header field is found and removed, names resolve to bindings,
groups spread over the bindings that are not suspended, an unknown name is logged once."""

from __future__ import annotations

import logging

import pytest

from fastrelay.bindings import Assigner, ListenerBinding, split_header
from fastrelay.config import loads


@pytest.mark.parametrize(("body", "value", "rest"), [
    (b"X-Binding: b1\r\nSubject: s\r\n\r\nhi\r\n", b"b1", b"Subject: s\r\n\r\nhi\r\n"),
    (b"Subject: s\r\nx-binding:b2\r\n\r\nX-Binding: in the body\r\n",
     b"b2", b"Subject: s\r\n\r\nX-Binding: in the body\r\n"),  # only the header section counts
    (b"A: 1\r\nX-Binding: g\r\n  folded\r\nX-Binding: second\r\nB: 2\r\n\r\nx", b"g folded", b"A: 1\r\nB: 2\r\n\r\nx"),
    (b"A: 1\nX-Binding: lf\n\nbody\n", b"lf", b"A: 1\n\nbody\n"),  # bare LF endings
    (b"Subject: none\r\n\r\nX-Binding: b1\r\n", None, b"Subject: none\r\n\r\nX-Binding: b1\r\n"),
    (b"X-Bindings: other\r\n\r\n", None, b"X-Bindings: other\r\n\r\n"),  # another field name
    (b"\r\nX-Binding: b1\r\n", None, b"\r\nX-Binding: b1\r\n"),  # no header section: all body
    (b"X-Binding: only\r\n", b"only", b""),  # a message of one header field, no body
])
def test_split_header(body, value, rest):
    assert split_header(body, "X-Binding") == (value, rest)


CONF = """
Binding "a" { }
Binding_Group "g" {
  Binding "g1" { }
  Binding "g2" { suspend_delivery = true }
  Binding "g3" { }
}
Binding_Group "all_suspended" { Binding "s1" { suspend_delivery = true } }
Binding_Group "empty" { }
"""


def test_resolve_and_spread(caplog):
    a = Assigner(loads(CONF))
    assert a.resolve("a") == "a"
    assert a.resolve("A") == "default"  # case-sensitive names (Momentum)
    assert [a.resolve("g") for _ in range(4)] == ["g1", "g3", "g1", "g3"]  # g2 is suspended
    assert a.resolve("all_suspended") == "s1"  # still a binding: the mail waits there
    with caplog.at_level(logging.WARNING, logger="fastrelay.bindings"):
        assert [a.resolve("nosuch") for _ in range(3)] == ["default"] * 3
        assert a.resolve("empty") == "default"
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("'nosuch'" in m for m in msgs) == 1  # logged once
    assert sum("'empty'" in m for m in msgs) == 1


@pytest.mark.parametrize(("binding", "group", "header", "trusted", "want"), [
    ("a", None, None, True, "a"),
    (None, "g", None, True, "g1"),
    ("a", "g", None, True, "a"),  # Binding wins over Binding_Group
    ("a", None, "g3", True, "g3"),  # a trusted header wins over the listener
    ("a", None, "g3", False, "a"),  # an untrusted one is ignored (and still removed)
    (None, None, None, True, "default"),
])
def test_listener_assignment(binding, group, header, trusted, want):
    lb = ListenerBinding(Assigner(loads(CONF)), binding, group, "X-Binding")
    body = (f"X-Binding: {header}\r\n".encode() if header else b"") + b"Subject: s\r\n\r\nhi\r\n"
    got, rest = lb.assign(body, trusted)
    assert got == want
    assert rest == b"Subject: s\r\n\r\nhi\r\n"


def test_listen_scope_options():
    cfg = loads(CONF + 'ESMTP_Listener { Binding_Group = "g"\n'
                '  Listen "127.0.0.1:0" { Binding = "a" }\n  Listen "127.0.0.1:0" { } }\n')
    a = Assigner(cfg)
    first, second = (a.for_listener(li) for li in cfg.esmtp_listens)
    assert (first.binding, first.group) == ("a", "g")
    assert first.assign(b"\r\n", True)[0] == "a"
    assert (second.binding, second.group) == (None, "g")
    assert second.assign(b"\r\n", True)[0] == "g1"
