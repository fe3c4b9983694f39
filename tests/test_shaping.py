"""fastrelay.shaping: the GCRA throttle, slots, and Momentum's by-reference keys (issue #10)."""

from __future__ import annotations

import pytest

from fastrelay.config import loads
from fastrelay.config.types import Rate
from fastrelay.shaping import LocalShaper, OutboundShaping


def test_gcra_never_more_than_n_in_any_window():
    """ref-outbound-throttle-messages: "Momentum will ensure that no more than the specified
    number of messages are sent in a given second"; "1/60": N over the window of S seconds."""
    r = Rate(10, 1.0)
    s = LocalShaper()
    times = [i * 0.003 for i in range(1000)]
    passed = [t for t in times if s.take("k", r, t) == 0.0]
    for t0 in times:  # every window of S seconds, wherever it starts
        assert sum(1 for t in passed if t0 <= t < t0 + 1.0) <= 10
    assert len(passed) >= 29  # and the rate is used: about 10 per second over 3 s
    s2 = LocalShaper()
    assert s2.take("k", r, 0.0) == 0.0
    assert s2.take("k", r, 0.0) == pytest.approx(0.1)  # the next one S/N later
    assert s2.wait("k", r, 0.05) == pytest.approx(0.05)
    assert s2.take("k", r, 0.1) == 0.0


def test_refused_take_spends_nothing():
    s = LocalShaper()
    r = Rate(1, 60.0)
    assert s.take("k", r, 0.0) == 0.0
    for _ in range(5):
        assert s.take("k", r, 1.0) == pytest.approx(59.0)
    assert s.take("k", r, 60.0) == 0.0


def test_slots_release_in_pairs():
    s = LocalShaper()
    assert s.acquire("x", 2) and s.acquire("x", 2)
    assert not s.acquire("x", 2)
    s.release("x")
    assert s.acquire("x", 2)
    s.release("x")
    s.release("x")
    assert s.held() == 0
    with pytest.raises(ValueError):
        s.release("x")


CONF = """
outbound_throttle_connections = "100"
Binding_Group "mygroup" {
  Outbound_Throttle_Messages = "10"
  binding "mybinding1" {}
  binding "mybinding2" {}
  binding "own" { outbound_throttle_messages = "10" }
}
Binding "lone" {}
Domain "mydomain1" { outbound_throttle_messages = "5/60" }
"""


@pytest.mark.parametrize(("domain", "binding", "key"), [
    ("a.test", "mybinding1", "Binding_Group mygroup"),
    ("a.test", "mybinding2", "Binding_Group mygroup"),  # the same throttle: by reference
    ("mydomain1", "mybinding1", "Binding_Group mygroup"),  # binding_group comes before domain
    ("a.test", "own", "Binding own"),  # set again in a narrower scope: a separate throttle
    ("mydomain1", "lone", "Domain mydomain1"),
    ("a.test", "lone", None),
])
def test_throttles_are_by_reference(domain, binding, key):
    """ref-outbound-throttle-messages: "A single throttle structure is created in the scope of
    the binding group ... the combined scopes ... may send 10 messages cumulatively"."""
    sh = OutboundShaping(loads(CONF))
    th = sh.throttle("outbound_throttle_messages", domain, binding)
    assert (th[0] if th else None) == (f"outbound_throttle_messages@{key}" if key else None)
    # Global connection throttle: one for the whole system.
    assert sh.throttle("outbound_throttle_connections", domain, binding)[0] == "outbound_throttle_connections@global"


def test_shared_group_throttle_is_one_budget():
    now = [0.0]
    sh = OutboundShaping(loads(CONF), clock=lambda: now[0])
    sent = 0
    for i in range(400):  # 4 s, both bindings asking every 10 ms
        now[0] = i * 0.01
        for b in ("mybinding1", "mybinding2"):
            sent += sh.before_message("a.test", b, []) == 0.0
    assert 38 <= sent <= 40  # 10 per second for the two together
    assert sh.before_message("a.test", "own", []) == 0.0  # its own throttle still has tokens


def test_open_connection_is_all_or_nothing():
    now = [0.0]
    sh = OutboundShaping(loads('Server_Max_Outbound_Connections = 1\n'
                               'Host mx.test { outbound_throttle_connections = "1/10" }\n'), clock=lambda: now[0])
    a = sh.open_connection("d.test", "default", ["mx.test", "192.0.2.1"])
    assert a.retry_in == 0 and a.slots == ("server@global",)
    b = sh.open_connection("d.test", "default", ["other.test", "192.0.2.2"])
    assert b.retry_in > 0 and b.reason == "limit" and b.slots == ()
    sh.close_connection(a.slots)
    c = sh.open_connection("d.test", "default", ["mx.test", "192.0.2.1"])
    assert c.reason == "host throttle" and c.retry_in == pytest.approx(10.0)
    assert sh.backend.held() == 0  # refused: nothing held
    assert sh.host_wait(["mx.test"]) == pytest.approx(10.0)
    assert sh.host_wait(["other.test"]) == 0.0


def test_binding_server_limit_adds_to_the_global_one():
    sh = OutboundShaping(loads('Server_Max_Outbound_Connections = 100\n'
                               'Binding b { Server_Max_Outbound_Connections = 1 }\n'))
    assert sh.server_limits("b") == [("server@global", 100), ("server@Binding b", 1)]
    assert sh.server_limits("other") == [("server@global", 100)]


def test_message_wait_takes_nothing():
    now = [0.0]
    sh = OutboundShaping(loads('outbound_throttle_messages = "1/10"\n'), clock=lambda: now[0])
    assert sh.message_wait("d.test", "b") == 0.0
    assert sh.before_message("d.test", "b", []) == 0.0
    assert sh.message_wait("d.test", "b") == pytest.approx(10.0)
    assert sh.message_wait("d.test", "b") == pytest.approx(10.0)  # asking spends nothing
    now[0] = 10.0
    assert sh.message_wait("d.test", "other") == 0.0  # the global throttle, shared, has a token now


def test_binding_host_throttle_comes_before_host():
    """ref-outbound-throttle-connections: "connections opened to the resolved MX host
    smtp.example.com are limited to 5 every 10 seconds by default, but the vip binding may open
    up to 30 new connections per second to the same host"."""
    from fastrelay.shaping import has_host_throttles

    cfg = loads('host "smtp.example.com" {\n  Outbound_Throttle_Connections = "5/10"\n}\n'
                'Binding "vip" {\n  host "smtp.example.com" {\n    Outbound_Throttle_Connections = "30"\n  }\n}\n'
                'Binding "other" { }\n')
    sh = OutboundShaping(cfg)
    assert sh.host_throttle("outbound_throttle_connections", "smtp.example.com", "vip") == (
        "outbound_throttle_connections@Binding vip::Host smtp.example.com", Rate(30, 1.0))
    assert sh.host_throttle("outbound_throttle_connections", "smtp.example.com", "other")[0] == \
        "outbound_throttle_connections@Host smtp.example.com"  # shared by reference with everyone else
    assert sh.host_throttle("outbound_throttle_connections", "smtp.example.com")[1] == Rate(5, 10.0)
    assert has_host_throttles(cfg)
    assert not has_host_throttles(loads("Binding b { }\n"))


C = 'outbound_throttle_connections = "5/10"'


@pytest.mark.parametrize("conf, host_throttled", [
    (f'Host "mx.d.test" {{ {C} }}\n', True),
    (f'Host "/^mx\\./" {{ {C} }}\n', True),
    (f'Binding b {{ Host "mx.d.test" {{ {C} }} }}\n', True),
    (f'Binding b {{ Host "/^mx\\./" {{ {C} }} }}\n', True),
    (f'Binding a {{ }}\nBinding b {{ Host "mx.d.test" {{ {C} }} }}\n', True),  # the second binding's
    (f"{C}\n", False),  # a global connection throttle is not a Host's
    (f"Domain d.test {{ {C} }}\n", False),
    (f"Binding b {{ {C} }}\n", False),
    ('Host "mx.d.test" { outbound_throttle_messages = "1/10" }\n', False),
])
def test_host_throttles_are_found_in_every_host_stanza(conf, host_throttled):
    """The scheduler looks for throttled MXs only when some Host stanza sets
    outbound_throttle_connections (fastrelay.shaping.has_host_throttles, over Config.host_scopes):
    each row, the option in one place an operator may write it."""
    from fastrelay.shaping import has_host_throttles

    assert has_host_throttles(loads(conf)) is host_throttled


@pytest.mark.parametrize("bad", [
    'Binding b { Host mx.test { max_outbound_connections = 3 } }',
    'Binding b { Host mx.test { retry_interval = 3 } }',
])
def test_binding_host_takes_only_the_throttles(bad):
    from fastrelay.config.errors import ConfigErrors

    with pytest.raises(ConfigErrors, match=r"<string>:1:\d+: option '\w+' is not valid in a Host stanza inside a "
                                           r"Binding; expected outbound_throttle_connections or "
                                           r"outbound_throttle_messages there"):
        loads(bad + "\n")


T = 'outbound_throttle_messages = "1/10"'


@pytest.mark.parametrize("conf, domain, binding, hosts", [
    (f"{T}\n", "d.test", "default", []),
    (f"Domain d.test {{ {T} }}\n", "d.test", "default", []),
    (f'Domain "/^d\\\\./" {{ {T} }}\n', "d.test", "default", []),
    (f'Host "mx.d.test" {{ {T} }}\n', "d.test", "default", ["mx.d.test"]),
    (f'Host "/^mx\\\\./" {{ {T} }}\n', "d.test", "default", ["mx.d.test"]),
    (f"Binding b {{ {T} }}\n", "d.test", "b", []),
    (f"Binding b {{ Domain d.test {{ {T} }} }}\n", "d.test", "b", []),
    (f'Binding b {{ Host "mx.d.test" {{ {T} }} }}\n', "d.test", "b", ["mx.d.test"]),
    (f"Binding_Group g {{ {T}\n Binding b {{ }} }}\n", "d.test", "b", []),
    (f"Binding_Group g {{ Domain d.test {{ {T} }}\n Binding b {{ }} }}\n", "d.test", "b", []),
])
def test_a_message_throttle_in_any_scope_is_seen_by_the_no_throttle_shortcut(conf, domain, binding, hosts):
    """before_message skips its lookups when no scope sets outbound_throttle_messages
    (issue 13, relay CPU per message): a throttle in any scope Momentum allows it in must still
    apply. Each row: the throttle set in one scope, and mail that scope covers."""
    cfg = loads(conf)
    assert cfg.set_anywhere("outbound_throttle_messages")
    sh = OutboundShaping(cfg, clock=lambda: 0.0)
    assert sh.before_message(domain, binding, hosts) == 0.0
    assert sh.before_message(domain, binding, hosts) == pytest.approx(10.0)


def test_no_message_throttle_anywhere_takes_the_shortcut():
    cfg = loads('Domain d.test { max_outbound_connections = 3 }\nBinding b { }\n'
                'Host "mx.d.test" { outbound_throttle_connections = "5/10" }\n')
    assert not cfg.set_anywhere("outbound_throttle_messages")
    assert cfg.set_anywhere("max_outbound_connections")  # has a default
    sh = OutboundShaping(cfg, clock=lambda: 0.0)
    assert all(sh.before_message("d.test", "b", ["mx.d.test"]) == 0.0 for _ in range(5))
