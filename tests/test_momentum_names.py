"""The schema's Momentum names mean what Momentum means: held against docs/momentum.md's table."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from fastrelay.config import loads, momentum
from fastrelay.config import schema as S
from fastrelay.config.parser import Atom, Pos
from fastrelay.config.types import Invalid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "docs", "momentum.md")

# Momentum's scope words, as fastrelay's scopes (the others, pathway, peer..., fastrelay lacks).
_SCOPE = {"global": S.GLOBAL, "domain": S.DOMAIN, "binding": S.BINDING, "binding_group": S.BINDING_GROUP,
          "host": S.HOST, "esmtp_listener": S.ESMTP_LISTENER, "http_listener": S.HTTP_LISTENER,
          "binding::domain": S.BINDING_DOMAIN, "security": S.SECURITY, "eventloop": S.EVENTLOOP}


def _rows() -> dict[str, dict]:
    rows = {}
    with open(TABLE, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) != 6 or cells[0] in ("option", "---"):
                continue
            name, _meaning, _unit, default, scopes, differs = cells
            rows[name.lower()] = {"name": name, "default": default, "scopes": [s.strip() for s in scopes.split(",")],
                                  "differs": differs}
    return rows


ROWS = _rows()


def _fastrelay_scopes(words: set[str], listeners: set[str]) -> set[str]:
    """Momentum scope words as fastrelay scopes: `listen` is the Listen of the `listeners` named."""
    out = {_SCOPE[w] for w in words if w in _SCOPE}
    if "listen" in words:
        out |= {lsn for lst, lsn in (("esmtp_listener", S.ESMTP_LISTEN), ("http_listener", S.HTTP_LISTEN))
                if lst in listeners}
    return out


def _momentum_options() -> list[S.OptionDef]:
    seen = []
    for o in S.OPTIONS:
        if any((momentum.lookup(n) or ("",))[0] == "option" for n in (o.name, *o.aliases)) and o not in seen:
            seen.append(o)
    return seen


def test_every_momentum_name_of_the_schema_has_a_row():
    """Issue 15: "Add a test that holds the schema against a table of Momentum's names, meanings and
    scopes kept in the repository"."""
    names = {o.name.lower() for o in _momentum_options()}
    assert names - set(ROWS) == set()
    assert set(ROWS) - names == set(), "rows for options the schema does not have (or not by a Momentum name)"


@pytest.mark.parametrize("key", sorted(ROWS))
def test_scopes_match_momentum(key):
    """Issue 15: "Where fastrelay uses a Momentum name, the meaning, unit, default and valid scopes
    must match." Every Momentum scope fastrelay knows is accepted unless the table says `-scope`
    (not yet); a wider scope is allowed only with `+scope` and its reason."""
    row, opt = ROWS[key], S.BY_KEY[key]
    words = set(row["scopes"])
    if {"binding", "domain"} <= words:
        words.add("binding::domain")  # a Domain inside a Binding: Momentum's binding::domain fallback
    plus = set(re.findall(r"`\+([a-z_:]+)`", row["differs"]))
    minus = set(re.findall(r"`-([a-z_:]+)`", row["differs"]))
    # A listener not accepted yet takes its Listen stanzas with it; `-listen`: no Listen stanza at all.
    want = (_fastrelay_scopes(words, words) | _fastrelay_scopes(plus, plus | words)) - _fastrelay_scopes(
        minus | {"listen"}, minus | (words if "listen" in minus else set()))
    assert set(opt.scopes) == want, (sorted(opt.scopes), sorted(want))


@pytest.mark.parametrize("key", sorted(ROWS))
def test_default_matches_momentum(key):
    """The Momentum default, written as a Momentum conf would write it, read with the schema's own
    type, is fastrelay's default, unless the table gives a reason (`default`)."""
    row, opt = ROWS[key], S.BY_KEY[key]
    if "`default`" in row["differs"]:
        if row["default"]:
            try:
                value = opt.type.convert(Atom(row["default"], False, Pos("t", 1, 1)))
            except Invalid:  # Momentum's "0: no limit", which fastrelay refuses (the table says so)
                assert "refused" in row["differs"], row["differs"]
                return
            assert value != opt.default, "stale `default`"
        return
    if not row["default"]:
        assert opt.default in (None, (), frozenset()), opt.default
        return
    assert opt.type.convert(Atom(row["default"], False, Pos("t", 1, 1))) == opt.default


def test_idle_timeout_is_the_outbound_idle_connection_time():
    """Issue 15: "A Momentum conf with `idle_timeout = 5` passes check-config and cuts idle clients
    after 5 s, below RFC 5321's 5-minute minimum. Give it Momentum's meaning"."""
    cfg = loads('idle_timeout = 5\nDomain a.test { idle_timeout = 30 }\n'
                'ESMTP_Listener { Listen "127.0.0.1:0" { } }\n', "t.conf")
    assert (cfg.get("idle_timeout"), cfg.get("idle_timeout", "a.test")) == (5.0, 30.0)
    assert cfg.esmtp_listens[0].get("Idle_Time") == 300.0
    old = loads("Connection_Cache_Time = 7\n", "t.conf")
    assert old.lookup("idle_timeout").value == 7.0 and old.lookup("Connection_Cache_Time").value == 7.0


@pytest.mark.parametrize(
    ("conf", "warned"),
    [
        ('ESMTP_Listener { Idle_Time = 5\n Listen "127.0.0.1:0" { } }\n', True),
        ('Idle_Time = 299s\nESMTP_Listener { Listen "127.0.0.1:0" { } }\n', True),
        ('ESMTP_Listener { Listen "127.0.0.1:0" { Idle_Time = 1m } }\n', True),
        ('ESMTP_Listener { Idle_Time = 5m\n Listen "127.0.0.1:0" { } }\n', False),
        ('ESMTP_Listener { Idle_Time = 0\n Listen "127.0.0.1:0" { } }\n', False),  # 0: never (Momentum)
        ('idle_timeout = 5\nESMTP_Listener { Listen "127.0.0.1:0" { } }\n', False),  # outbound: no floor
    ],
)
def test_an_inbound_idle_time_below_the_rfc_floor_is_warned(tmp_path, conf, warned):
    """Issue 15: "Rename the inbound one, and enforce the RFC floor or warn below it"."""
    f = tmp_path / "t.conf"
    f.write_text(f'Spool_Base = "spool"\n{conf}')
    out = subprocess.run([sys.executable, "-m", "fastrelay", "check-config", str(f)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert ("RFC 5321 §4.5.3.2.7's 5 minutes" in out.stderr) is warned, out.stderr


@pytest.mark.parametrize(("alias", "name"), [("Mail_From_Timeout", "mailfrom_timeout"),
                                             ("Rcpt_To_Timeout", "rcptto_timeout"),
                                             ("Connection_Cache_Time", "idle_timeout")])
def test_old_names_are_aliases(alias, name):
    cfg = loads(f"Domain a.test {{ {alias} = 9 }}\n", "t.conf")
    assert cfg.get(name, "a.test") == 9.0


def test_momentum_concurrency_is_not_fastrelay_sessions():
    """Momentum's `concurrency` is a thread count: not read as the session limit."""
    from fastrelay.config import ConfigErrors

    with pytest.raises(ConfigErrors) as ei:
        loads("ESMTP_Listener { concurrency = 20\n Listen \"127.0.0.1:0\" { } }\n", "t.conf")
    assert ("Concurrency in an ESMTP_Listener stanza is a Momentum option that fastrelay does not "
            "support there") in str(ei.value)
