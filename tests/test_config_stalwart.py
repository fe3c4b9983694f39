"""The Stalwart TOML dialect (seed 003): keys understood, mapped onto the one settings model, and
every mistake a file:line:col error with exit 2."""

from __future__ import annotations

import glob
import os

import pytest

from fastrelay.cli import main
from fastrelay.config import ConfigErrors, load
from fastrelay.config import schema as S
from fastrelay.config.stalwart import key_positions, loads_toml
from fastrelay.delivery import Hop
from fastrelay.routing import shape_groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOML_EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "conf", "examples", "seed003_*.toml")))


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as e:
        loads_toml(text, "r.toml")
    return [str(x) for x in e.value.errors]


def test_every_seed_example_is_here_with_its_equivalent():
    names = {os.path.basename(p)[:-5] for p in TOML_EXAMPLES}
    assert names == {"seed003_routing", "seed003_ip_strategy", "seed003_source_ip", "seed003_hostname",
                     "seed003_limits", "seed003_timeouts"}
    for n in names:
        assert os.path.exists(os.path.join(ROOT, "conf", "examples", n + ".conf"))


OPTIONS = ["Routes", "max_outbound_connections", "Session_Timeout", "TLS_Implicit", "TLS_Verify", "IP_Strategy",
           "Bind_Address", "EHLO_Hostname", "Max_MX_Hosts", "Max_MX_Addresses", "Connect_Timeout",
           "Greeting_Timeout", "TLS_Timeout", "EHLO_Timeout", "Mail_From_Timeout", "Rcpt_To_Timeout", "Data_Timeout",
           "MTA_STS_Timeout"]


@pytest.mark.parametrize("path", TOML_EXAMPLES, ids=os.path.basename)
def test_toml_example_means_what_its_ecelerity_equivalent_says(path):
    """Both dialects map onto the one settings model: the same effective values."""
    a, b = load(path), load(path[:-5] + ".conf")
    for d in (None, "foobar.net", "foobar.org", "other.test"):
        for o in OPTIONS:
            assert a.get(o, d) == b.get(o, d), (o, d)


@pytest.mark.parametrize("text,want", [
    ('[queue.outbound]\nip-stratgy = "ipv4-only"\n',
     "r.toml:2:1: unknown key 'queue.outbound.ip-stratgy'; did you mean 'queue.outbound.ip-strategy'?"),
    ('[queue.outbound.timeouts]\nconect = "3m"\n',
     "r.toml:2:1: unknown key 'queue.outbound.timeouts.conect'; did you mean 'queue.outbound.timeouts.connect'?"),
    ('\n\n[queue.outbound.timeout]\nconnect = "3m"\n',
     "r.toml:3:2: unknown key 'queue.outbound.timeout'; did you mean 'queue.outbound.timeouts'?"),
    ('[remote."x"]\naddress = "a"\n  protocl = "lmtp"\n',
     "r.toml:3:3: unknown key 'remote.x.protocl'; did you mean 'remote.x.protocol'?"),
    ('[queue.outbound]\nnext-hop = [ { if = "rcpt-domain", eq = "a.test", then = "nope" },\n'
     '             { else = false } ]\n',
     "r.toml:2:51: unknown remote 'nope'; expected the name of a [remote.\"NAME\"] table"),
    ('[queue.outbound]\nnext-hop = [ { if = "rcpt-domain", in-list = "list/domain", then = false } ]\n'
     '[list]\ndomains = ["a.test"]\n',
     "r.toml:2:36: unknown list 'list/domain'; did you mean 'list/domains'?"),
    ('[queue.outbound]\nnext-hop = [ { if = "rcpt-domain", eq = "a.test", thn = false } ]\n',
     "r.toml:2:51: unknown key 'queue.outbound.next-hop[0].thn'; did you mean 'then'?"),
    ('[queue.outbound]\nip-strategy = "ipv4"\n',
     "r.toml:2:1: bad value for 'queue.outbound.ip-strategy': got 'ipv4'; expected \"ipv4-only\", \"ipv6-only\", "
     "\"ipv6-then-ipv4\", \"ipv4-then-ipv6\""),
    ('[queue.outbound.source-ip]\nv4 = ["10.0.0.1", "a::b"]\n',
     "r.toml:2:19: bad value for 'queue.outbound.source-ip.v4': got 'a::b'; expected an IPv4 address"),
    ('[queue.outbound.limits]\nmx = -1\n',
     "r.toml:2:1: bad value for 'Max_MX_Hosts': got -1; expected a whole number from 0 to 1000"),
    ('[queue.outbound.timeouts]\ndata = "ten minutes"\n',
     "r.toml:2:1: bad value for 'Data_Timeout': got 'ten minutes'; expected a time: a number of seconds, or a "
     "number with a unit (500ms, 10s, 3m, 2h, 7d)"),
    ('[fastrelay]\nSpool_Bse = "x"\n',
     "r.toml:2:1: unknown option 'Spool_Bse'; did you mean 'Spool_Base'?"),
    ('[fastrelay.domain."a.test"]\nretry_intervl = 5\n',
     "r.toml:2:1: unknown option 'retry_intervl'; did you mean 'retry_interval'?"),
    ('[server.listener."s"]\nbind = ["127.0.0.1:2525"]\nprotocol = "lmtp"\n',
     "r.toml:3:1: bad value for 'server.listener.s.protocol': got 'lmtp'; expected \"smtp\" (fastrelay's "
     "listeners speak SMTP)"),
    ('a = "unterminated\n', None),
])
def test_errors_name_the_key_and_its_line(text, want):
    """"A key fastrelay does not know is an error naming the key and its line ("did you mean"
    too) ... tomllib gives no positions for keys, so find them yourself"."""
    got = errors(text)
    if want is None:  # a TOML syntax error: tomllib's position
        assert len(got) == 1 and got[0].startswith("r.toml:1:") and "expected TOML" in got[0], got
    else:
        assert got == [want]


def test_key_positions_inline_tables_and_arrays():
    text = ('# c\n[queue.outbound]\nnext-hop = [ { if = "rcpt-domain", eq = "x" },\n'
            '  { else = false } ]\n[remote."a.b"]\n  address = "h" # x\n')
    pos = key_positions(text)
    assert pos[("queue", "outbound", "next-hop")] == (3, 1)
    assert pos[("queue", "outbound", "next-hop", 0, "eq")] == (3, 36)
    assert pos[("queue", "outbound", "next-hop", 1, "else")] == (4, 5)
    assert pos[("remote", "a.b", "address")] == (6, 3)


def test_cli_exit_2_with_position(tmp_path, capsys):
    p = tmp_path / "relay.toml"
    p.write_text('[server]\nhostnme = "x"\n')
    assert main(["check-config", str(p)]) == 2
    assert f"{p}:2:1: unknown key 'server.hostnme'; did you mean 'server.hostname'?" in capsys.readouterr().err
    assert main(["config", "eval", "-c", str(p), "Hostname"]) == 2


def test_whole_relay_in_toml(tmp_path, capsys):
    """A TOML file can configure a whole relay: listeners with Stalwart's keys, any ecelerity
    option in [fastrelay] under its own name, Domain stanzas in [fastrelay.domain."NAME"]."""
    p = tmp_path / "relay.toml"
    p.write_text(
        '[server]\nhostname = "mx.example"\n'
        '[server.listener."smtp"]\nbind = ["127.0.0.1:2525", "[::1]:2525"]\nprotocol = "smtp"\n'
        '[fastrelay]\nSpool_Base = "spool"\nrelay_hosts = ["10.0.0.0/8"]\nProhibited_Hosts = ["192.0.2.0/24"]\n'
        'DNS_Servers = ["127.0.0.1:5353"]\n'
        '[fastrelay.domain."slow.test"]\nretry_interval = "5m"\n')
    assert main(["check-config", str(p)]) == 0
    cfg = load(str(p))
    assert [str(li.address) for li in cfg.esmtp_listens] == ["127.0.0.1:2525", "[::1]:2525"]
    assert cfg.get("Hostname") == "mx.example"
    assert cfg.spool_dir == str(tmp_path / "spool")
    assert cfg.get("retry_interval", "slow.test") == 300.0
    capsys.readouterr()
    assert main(["config", "eval", "-c", str(p), "--domain", "slow.test", "retry_interval"]) == 0
    assert f"{p}:12 (Domain slow.test)" in capsys.readouterr().out


R = '[remote."a"]\naddress = "127.0.0.2"\nport = 2525\n[remote."b"]\naddress = "::1"\nprotocol = "lmtp"\n'


@pytest.mark.parametrize("rules,expect", [
    # first match wins, as Stalwart evaluates them
    ('{ if = "rcpt-domain", eq = "x.test", then = "a" }, { else = false }',
     {"x.test": "smtp://127.0.0.2?port=2525", "y.test": None}),
    ('{ if = "rcpt-domain", ne = "x.test", then = "a" }, { else = "b" }',
     {"x.test": "lmtp://[::1]?port=24", "y.test": "smtp://127.0.0.2?port=2525"}),
    ('{ if = "rcpt-domain", ne = "x.test", then = "a" }, { else = false }',
     {"x.test": "__mx__", "y.test": "smtp://127.0.0.2?port=2525"}),
    ('{ if = "rcpt-domain", in-list = "list/l", then = "b" }, { if = "rcpt-domain", eq = "x.test", then = "a" }',
     {"x.test": "lmtp://[::1]?port=24", "z.test": "lmtp://[::1]?port=24", "y.test": None}),
    ('{ if = "rcpt-domain", ne = "x.test", then = "a" }, { if = "rcpt-domain", eq = "x.test", then = "b" }',
     {"x.test": "lmtp://[::1]?port=24", "y.test": "smtp://127.0.0.2?port=2525"}),
    ('{ if = "rcpt-domain", not-in-list = "list/l", then = false }, { else = "a" }',
     {"x.test": "smtp://127.0.0.2?port=2525", "y.test": None}),
    ('{ else = "a" }', {"x.test": "smtp://127.0.0.2?port=2525"}),
])
def test_next_hop_rules(rules, expect):
    cfg = loads_toml(f'[queue.outbound]\nnext-hop = [ {rules} ]\n{R}[list]\nl = ["x.test", "z.test"]\n')
    for dom, route in expect.items():
        got = cfg.get("Routes", dom)
        assert (None if got is None else got[0].text) == route, dom


def test_remote_options_and_defaults_when_by_mx():
    cfg = loads_toml('[queue.outbound]\nnext-hop = [ { if = "rcpt-domain", eq = "x.test", then = false }, '
                     '{ else = "a" } ]\n[remote."a"]\naddress = "h.test"\nconcurrency = 3\ntimeout = "30s"\n'
                     '[remote."a".tls]\nimplicit = true\n')
    assert (cfg.get("max_outbound_connections"), cfg.get("Session_Timeout"), cfg.get("TLS_Implicit"),
            cfg.get("TLS_Verify")) == (3, 30.0, True, "host")
    assert (cfg.get("max_outbound_connections", "x.test"), cfg.get("Session_Timeout", "x.test"),
            cfg.get("TLS_Implicit", "x.test"), cfg.get("TLS_Verify", "x.test")) == (
        S.BY_KEY["max_outbound_connections"].default, 0.0, False, "no")


SENDER_RULES = """
[queue.outbound]
next-hop = [ { if = "sender-domain", eq = "vip.test", then = "a" },
             { if = "rcpt-domain", in-list = "list/l", then = "b" },
             { if = "sender-domain", ne = "plain.test", then = false },
             { else = "a" } ]
""" + R + '[list]\nl = ["x.test"]\n'


@pytest.mark.parametrize("sender,rcpt,route", [
    ("s@vip.test", "u@x.test", "smtp://127.0.0.2?port=2525"),  # the first rule wins
    ("s@vip.test", "u@y.test", "smtp://127.0.0.2?port=2525"),
    ("s@plain.test", "u@x.test", "lmtp://[::1]?port=24"),
    ("s@plain.test", "u@y.test", "smtp://127.0.0.2?port=2525"),  # else
    ("s@other.test", "u@x.test", "lmtp://[::1]?port=24"),
    ("s@other.test", "u@y.test", "__mx__"),  # sender-domain ne plain.test: false
    ("", "u@y.test", "__mx__"),  # the null sender has no domain: "ne" matches it
])
def test_next_hop_rules_on_sender_domain(sender, rcpt, route):
    """"Support the variables and operators ...: at least rcpt-domain, sender-domain, in-list, eq
    and ne": sender-domain rules become Bindings that take those senders' mail (Sender_Domains)."""
    from fastrelay.bindings import Assigner, ListenerBinding

    cfg = loads_toml(SENDER_RULES)
    binding, _ = ListenerBinding(Assigner(cfg), None, None, None).assign(b"", True, sender)
    got = cfg.get("Routes", rcpt.split("@")[1], binding)
    assert (got[0].text if got else "__mx__") == route


def h(ip: str, name: str = "mx") -> Hop:
    return Hop(ip, 25, "smtp", name, 0)


@pytest.mark.parametrize("strategy,mx,addr,want", [
    ("any", 0, 0, [["1.0.0.1", "::1", "1.0.0.2"], ["2.0.0.1"]]),
    ("ipv4-only", 0, 0, [["1.0.0.1", "1.0.0.2"], ["2.0.0.1"]]),
    ("ipv6-only", 0, 0, [["::1"]]),
    ("ipv6-then-ipv4", 0, 0, [["::1"], ["1.0.0.1", "1.0.0.2"], ["2.0.0.1"]]),
    ("ipv4-then-ipv6", 0, 0, [["1.0.0.1", "1.0.0.2"], ["::1"], ["2.0.0.1"]]),
    ("any", 1, 0, [["1.0.0.1", "::1", "1.0.0.2"]]),
    ("any", 0, 2, [["1.0.0.1", "::1"], ["2.0.0.1"]]),
    ("ipv6-then-ipv4", 0, 2, [["::1"], ["1.0.0.1"], ["2.0.0.1"]]),
    ("ipv4-then-ipv6", 1, 2, [["1.0.0.1", "1.0.0.2"]]),
])
def test_shape_groups(strategy, mx, addr, want):
    groups = [[h("1.0.0.1", "a"), h("::1", "a"), h("1.0.0.2", "a")], [h("2.0.0.1", "b")]]
    got = shape_groups(groups, strategy, mx, addr)
    assert [[x.ip for x in g] for g in got] == want


TRICKY = [
    '[server.listener."a.b"]\nbind = [ "127.0.0.1:25", # c ] ,\n  "[::1]:25" , ]\nprotocol = \'smtp\'\n',
    'x = """a\n[not.a.table]\nb = 1\n"""\ny.z = { "q.r" = 1, s = [ { t = "}" } ] }\n',
    "[[a.b]]\nc = 1\n[[a.b]]\nd = 'x#y'\n  [a.e]  # comment\nf.g.h = true\n",
    'k = "es\\"cape # not a comment"\n"quoted key" = 2\n\'lit key\' = 3\n',
    "arr = [\n  [1, 2],\n  [ { a = 1 } ],\n]\n",
]


def _paths(value, path=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*path, k)
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield (*path, i)
            yield from _paths(v, (*path, i))


@pytest.mark.parametrize("text", TRICKY)
def test_key_positions_find_every_key(text):
    """Every key tomllib reads has a position, whatever strings, comments and nesting surround it."""
    import tomllib

    pos = key_positions(text)
    lines = text.split("\n")
    for p in _paths(tomllib.loads(text)):
        assert p in pos, p
        line, col = pos[p]
        assert 1 <= line <= len(lines) and 1 <= col <= len(lines[line - 1]) + 1
    assert pos.get(("x",)) == (1, 1) if text.startswith("x") else True
