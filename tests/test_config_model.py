"""Settings model: typed options, scope fallback, origins, and every semantic error."""

from __future__ import annotations

import ipaddress

import pytest

from fastrelay.config import ConfigErrors, loads, schema
from fastrelay.config.types import HostPort, Route


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as ei:
        loads(text, "t.conf")
    return [str(e) for e in ei.value.errors]


def test_option_names_are_case_insensitive(conf_impl):
    cfg = loads("DELIVERY_METHOD = lmtp\nremote_smtp_port = 2525\ndomain A.Example { MAX_RETRIES = 3 }")
    assert cfg.get("delivery_method") == "LMTP"
    assert cfg.get("Remote_SMTP_Port") == 2525
    assert cfg.get("max_retries", "a.example") == 3
    assert cfg.get("MAX_RETRIES", "A.EXAMPLE") == 3


@pytest.mark.parametrize(
    ("option", "text", "seconds"),
    [
        ("retry_interval", "20", 20.0),
        ("host_failure_retry", "500ms", 0.5),
        ("retry_interval", "10s", 10.0),
        ("retry_interval", "3m", 180.0),
        ("retry_interval", "2h", 7200.0),
        ("retry_interval", "7d", 604800.0),
        ("retry_interval", '"1200"', 1200.0),
        ("Delivery_Response_Timeout", '"10000"', 10.0),  # Momentum: milliseconds
        ("Delivery_Response_Timeout", "250", 0.25),
        ("Delivery_Response_Timeout", "30s", 30.0),
        ("message_expiration", "5d", 432000.0),
        ("host_failure_retry", "1", 1.0),
        ("max_retry_interval", "2", 2.0),
        # Below a millisecond, for the group commit window (whole numbers of microseconds).
        ("spool_commit_delay", "500us", 0.0005),
        ("spool_commit_delay", "250US", 0.00025),
        ("spool_commit_delay", "2", 0.002),
        ("spool_commit_delay", "1000us", 0.001),
    ],
)
def test_time_values(conf_impl, option, text, seconds):
    assert loads(f"{option} = {text}").get(option) == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0005, "500us"), (0.0015, "1500us"), (0.001, "1ms"), (0.25, "250ms"), (1.0, "1s"), (90.0, "90s"),
     (120.0, "2m"), (0.0, "0ms"), (10 * 365 * 86400.0, "3650d")],
)
def test_times_print_in_their_shortest_exact_unit(seconds, text):
    """config show and the range errors: a sub-millisecond value keeps its microseconds."""
    from fastrelay.config.types import format_seconds

    assert format_seconds(seconds) == text


def test_time_below_a_microsecond_or_with_decimals_is_refused(conf_impl):
    assert errors("spool_commit_delay = 0.5ms") == [
        "t.conf:1:22: bad value for 'spool_commit_delay': got '0.5ms'; expected a time: a number of "
        "milliseconds, or a number with a unit (500ms, 10s, 3m, 2h, 7d)"]
    assert errors("spool_commit_delay = 2s") == [
        "t.conf:1:22: bad value for 'spool_commit_delay': got '2s' (2s); expected a time from 0ms to 1s"]


def test_spool_commit_few_clients(conf_impl):
    from fastrelay import limits

    assert loads("").get("spool_commit_few_clients") == limits.SPOOL_COMMIT_FEW_CLIENTS
    assert loads("spool_commit_few_clients = 0").get("spool_commit_few_clients") == 0
    assert loads("spool_commit_few_clients = 16").get("spool_commit_few_clients") == 16
    for text, got in (("-1", "-1"), ("many", "'many'"), ("10001", "10001")):
        assert errors(f"spool_commit_few_clients = {text}") == [
            f"t.conf:1:28: bad value for 'spool_commit_few_clients': got {got}; expected a whole number "
            "from 0 to 10000"]


def test_defaults_have_no_origin(conf_impl):
    s = loads("").lookup("retry_interval")
    assert s.value == 1200.0 and s.pos is None and s.origin == "default"


def test_scope_fallback_order(conf_impl):
    cfg = loads(
        "max_retries = 1\n"                                  # line 1: global
        "Domain d.example { max_retries = 2 }\n"             # line 2: domain
        "Binding_Group g {\n"                                # line 3
        "  max_retries = 3\n"                                # line 4: binding_group
        "  Binding b {\n"                                    # line 5
        "    max_retries = 4\n"                              # line 6: binding
        "    Domain d.example { max_retries = 5 }\n"         # line 7: binding::domain
        "  }\n"
        "}\n"
        "Binding lone { }\n",
        "f.conf",
    )
    def at(domain, binding):
        s = cfg.lookup("max_retries", domain, binding)
        return s.value, s.pos.line
    assert at("d.example", "b") == (5, 7)          # binding::domain
    assert at("other.example", "b") == (4, 6)      # binding
    assert at("d.example", "lone") == (2, 2)       # no binding value: domain
    assert at(None, None) == (1, 1)                # global
    assert at("other.example", "lone") == (1, 1)
    assert cfg.lookup("max_retries", "d.example", "b").scope == "Binding b::Domain d.example"
    assert cfg.lookup("max_retries", "d.example", "b").origin == "f.conf:7"


def test_binding_group_between_binding_and_domain(conf_impl):
    cfg = loads(
        "Domain d.example { retry_interval = 1m }\n"
        "Binding_Group g { retry_interval = 2m  Binding b { } }\n"
    )
    assert cfg.get("retry_interval", "d.example", "b") == 120.0  # binding_group beats domain
    assert cfg.get("retry_interval", "d.example") == 60.0


def test_routes_every_form(conf_impl):
    cfg = loads(
        'Routes = ( "smtp://1.2.3.4?pref=10&ttl=300&type=mx" "my.local.smart.host" "__mx__"\n'
        '  "smtp://my.local.smart.host?pref=1" "smtp://[2001:db8::1]?port=2525&type=a"\n'
        '  "lmtp://127.0.0.2?port=24" "lmtp://store.example" "xfer://10.10.10.10?port=8080" 10.0.0.7 )\n'
    )
    r = cfg.get("Routes")
    assert r[0] == Route("smtp", "1.2.3.4", None, 10, 300, "mx", "smtp://1.2.3.4?pref=10&ttl=300&type=mx")
    assert r[1] == Route("smtp", "my.local.smart.host", text="my.local.smart.host")
    assert r[2] == Route("mx", text="__mx__")
    assert (r[3].host, r[3].pref) == ("my.local.smart.host", 1)
    assert (r[4].host, r[4].port, r[4].lookup) == ("2001:db8::1", 2525, "a")
    assert (r[5].scheme, r[5].host, r[5].port) == ("lmtp", "127.0.0.2", 24)
    assert (r[6].scheme, r[6].port) == ("lmtp", None)
    assert (r[7].scheme, r[7].host, r[7].port) == ("xfer", "10.10.10.10", 8080)
    assert (r[8].scheme, r[8].host) == ("smtp", "10.0.0.7")


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("ftp://x", "unknown route scheme 'ftp://'; expected smtp://, lmtp:// or xfer://"),
        ("smtp://1.2.3.4?prio=1", "unknown route parameter 'prio'; expected pref, ttl, port or type"),
        ("smtp://1.2.3.4?pref=x", "route parameter pref='x' is not a number from 0 to 65535"),
        ("smtp://1.2.3.4?port=70000", "route parameter port='70000' is not a number from 1 to 65535"),
        ("smtp://1.2.3.4?type=cname", "route parameter type='cname'; expected type=mx or type=a"),
        ("xfer://10.0.0.1", "xfer route 'xfer://10.0.0.1' has no port; expected xfer://host?port=N"),
        ("smtp://::1", "'::1' looks like an IPv6 address; write IPv6 literals in brackets: [::1]"),
        ("bad host!", "'bad host!' is not a valid hostname or IP address"),
    ],
)
def test_route_errors(conf_impl, route, message):
    assert errors(f'Routes = ( "ok.example" "{route}" )') == [f"t.conf:1:25: bad value for 'Routes': {message}"]


def test_ipv6_literals(conf_impl):
    cfg = loads(
        'Gateway = [2001:db8::1]:2525\n'
        'Host [::1] { max_outbound_connections = 3 }\n'
        'ESMTP_Listener { Listen "[::1]:2525" { } Listen "127.0.0.1:2525" { } }\n'
        'relay_hosts = ( "[::1]" "10.0.0.0/8" 192.168.1.1 )\n'
    )
    assert cfg.get("Gateway") == HostPort("2001:db8::1", 2525)
    assert cfg.host_lookup("max_outbound_connections", "::1").value == 3
    assert [str(li.address) for li in cfg.esmtp_listens] == ["[::1]:2525", "127.0.0.1:2525"]
    assert cfg.get("relay_hosts") == (
        ipaddress.ip_network("::1/128"), ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.1/32"),
    )


def test_listener_scope_wins_for_relay_hosts(conf_impl):
    cfg = loads(
        'relay_hosts = ( "10.0.0.0/8" )\n'
        'ESMTP_Listener {\n'
        '  relay_hosts = ( "192.168.0.0/16" )\n'
        '  Listen "127.0.0.1:25" { relay_hosts = ( "127.0.0.1" ) }\n'
        '  Listen "127.0.0.1:26" { }\n'
        '}\n'
        'ESMTP_Listener { Listen "127.0.0.1:27" { } }\n'
    )
    a, b, c = cfg.esmtp_listens
    assert a.get("relay_hosts") == (ipaddress.ip_network("127.0.0.1/32"),)
    assert b.get("relay_hosts") == (ipaddress.ip_network("192.168.0.0/16"),)
    assert c.get("relay_hosts") == (ipaddress.ip_network("10.0.0.0/8"),)
    assert a.lookup("relay_hosts").pos.line == 4


def test_http_listener_and_scriptlets(conf_impl):
    cfg = loads(
        'scriptlet "scriptlet" { script xfer_server { source = "msys.xfer.server" } }\n'
        'HTTP_Listener { Listen ":8080" {} }\n'
    )
    assert cfg.xfer_server_enabled and not cfg.xfer_client_enabled
    assert cfg.http_listens[0].address == HostPort("", 8080)
    assert cfg.esmtp_listens == []


def test_reroute_disabled(conf_impl):
    cfg = loads(
        'delayed_reroute_domain = "xfer.test"\n'
        'Domain xfer.test { reroute_domain = "disabled" delayed_reroute_domain = "disabled" }\n'
        'Domain gmail.com { reroute_domain = "xfer.test" }\n'
    )
    assert cfg.reroute_target("delayed_reroute_domain", "example.com") == "xfer.test"
    assert cfg.reroute_target("delayed_reroute_domain", "xfer.test") is None
    assert cfg.reroute_target("reroute_domain", "gmail.com") == "xfer.test"
    assert cfg.reroute_target("reroute_domain", "xfer.test") is None
    assert cfg.reroute_target("reroute_domain", "example.com") is None


def test_spool_dir_relative_to_the_conf_file(tmp_path, conf_impl):
    f = tmp_path / "etc" / "relay.conf"
    f.parent.mkdir()
    f.write_text('Spool_Base = "../spool"\n')
    from fastrelay.config import load

    assert load(str(f)).spool_dir == str(tmp_path / "spool")
    assert loads('Spool_Base = "/abs/spool"').spool_dir == "/abs/spool"


# Every option the issue names, with a value of its type: known, typed and validated.
ISSUE_OPTIONS = [
    ("Gateway", "10.10.10.50", HostPort("10.10.10.50", None)),
    ("Routes", '( "__mx__" )', (Route("mx", text="__mx__"),)),
    ("Delivery_Method", "delay_xfer", "delay_xfer"),
    ("Delivery_Method", "esmtp", "ESMTP"),
    ("Delivery_Method", "SMTP", "SMTP"),
    ("Delivery_Response_Timeout", '"10000"', 10.0),
    ("reroute_domain", '"xfer.test"', "xfer.test"),
    ("delayed_reroute_domain", '"disabled"', "disabled"),
    ("host_failure_retry", "1", 1.0),
    ("retry_interval", "20m", 1200.0),
    ("max_retry_interval", "2", 2.0),
    ("message_expiration", "4d", 345600.0),
    ("max_retries", "5", 5),
    ("teleport_enabled", "1", True),
    ("HTTP_URI", '"/delay_message"', "/delay_message"),
    ("HTTP_METHOD", '"POST"', "POST"),
    ("HTTP_HOST", '"localhost"', "localhost"),
    ("Remote_SMTP_Port", "2525", 2525),
    ("max_outbound_connections", "20", 20),
    ("relay_hosts", '( "127.0.0.0/8" )', (ipaddress.ip_network("127.0.0.0/8"),)),
    ("Prohibited_Hosts", '( "10.0.0.0/8" )', (ipaddress.ip_network("10.0.0.0/8"),)),
    ("Spool_Base", '"/var/spool/fastrelay"', "/var/spool/fastrelay"),
]


@pytest.mark.parametrize(("option", "text", "value"), ISSUE_OPTIONS, ids=[f"{o}={t}" for o, t, _ in ISSUE_OPTIONS])
def test_issue_options_typed(conf_impl, option, text, value):
    assert loads(f"{option} = {text}").get(option) == value


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("Delivery_Method = FTP", "t.conf:1:19: bad value for 'Delivery_Method': got 'FTP'; expected one of ESMTP, SMTP, LMTP, delay_xfer"),
        ("max_retries = many", "t.conf:1:15: bad value for 'max_retries': got 'many'; expected a whole number from 0 to 1000000, \"auto\" or \"none\""),
        ("teleport_enabled = maybe", "t.conf:1:20: bad value for 'teleport_enabled': got 'maybe'; expected a boolean (1, 0, true, false, yes, no, on, off)"),
        ("Remote_SMTP_Port = 0", "t.conf:1:20: bad value for 'Remote_SMTP_Port': got 0; expected a whole number from 1 to 65535"),
        ("retry_interval = 0", "t.conf:1:18: bad value for 'retry_interval': got '0' (0ms); expected a time from 1s to 3650d"),
        ("HTTP_URI = delay_message", "t.conf:1:12: bad value for 'HTTP_URI': got 'delay_message'; expected a path that starts with \"/\", e.g. \"/delay_message\""),
        ("reroute_domain = \"not a domain\"", "t.conf:1:18: bad value for 'reroute_domain': got 'not a domain'; expected a domain name, or \"disabled\""),
        ("relay_hosts = ( \"10.0.0.0/33\" )", "t.conf:1:17: bad value for 'relay_hosts': got '10.0.0.0/33'; expected a list of networks or addresses: ( \"127.0.0.0/8\" \"::1\" \"10.0.0.0/8\" )"),
        ("Gateway = ( a b )", "t.conf:1:11: bad value for 'Gateway': got a list; expected a hostname or IP address, optionally with :port (IPv6 in brackets: [2001:db8::1]:25)"),
        ("Routes = ( )", "t.conf:1:10: bad value for 'Routes': got an empty list; expected a list of routes: ( \"host\" \"__mx__\" \"smtp://ip?pref=P&ttl=T&port=O&type=mx|a\" \"lmtp://host\" \"xfer://host?port=N\" )"),
    ],
)
def test_wrong_value_types(conf_impl, line, message):
    assert errors(line) == [message]


def test_unknown_option_did_you_mean(conf_impl):
    assert errors("Domain a.com {\n  Delivery_Metod = LMTP\n}") == [
        "t.conf:2:3: unknown option 'Delivery_Metod'; did you mean 'Delivery_Method'?"
    ]
    assert errors("frobnicate = 1") == [
        "t.conf:1:1: unknown option 'frobnicate'; expected a known option name (see docs/config.md)"
    ]


def test_option_in_wrong_scope(conf_impl):
    assert errors("Domain a.com { Spool_Base = \"/x\" }") == [
        "t.conf:1:16: option 'Spool_Base' is not valid in a Domain stanza; expected it in the global scope"
    ]
    # Routes is valid in a Binding too (Sender_Domains routing, seed 003's sender-domain rules).
    assert errors("Host 10.0.0.1 { Routes = ( __mx__ ) }") == [
        "t.conf:1:17: option 'Routes' is not valid in a Host stanza; expected it in the global scope, "
        "a Domain stanza, a Binding stanza and a Domain stanza inside a Binding"
    ]
    assert errors("Host 10.0.0.1 { retry_interval = 1 }") == [
        "t.conf:1:17: option 'retry_interval' is not valid in a Host stanza; expected it in the global scope, "
        "a Domain stanza, a Binding stanza, a Binding_Group stanza and a Domain stanza inside a Binding"
    ]


def test_stanza_errors(conf_impl):
    assert errors("Domian a.com { }") == ["t.conf:1:1: unknown stanza 'Domian'; did you mean 'Domain'?"]
    assert errors("Domain a.com { Domain b.com { } }") == [
        "t.conf:1:16: a Domain stanza is not valid in a Domain stanza; expected it in a Binding stanza or a "
        "Binding_Group stanza or the global scope"
    ]
    assert errors("Domain { }") == ["t.conf:1:1: a Domain stanza needs a name; expected Domain NAME { ... }"]
    assert errors("ESMTP_Listener x { }") == [
        "t.conf:1:16: an ESMTP_Listener stanza takes no name; expected ESMTP_Listener { ... }"
    ]
    assert errors('ESMTP_Listener { Listen "127.0.0.1" { } }') == [
        "t.conf:1:25: bad Listen name: got '127.0.0.1' with no port; expected an address and port: "
        "\"127.0.0.1:2525\", \"[::1]:2525\" or \":8080\""
    ]
    assert errors("Routes { }") == [
        "t.conf:1:1: unknown stanza 'Routes'; 'Routes' is an option: write Routes = value"
    ]
    assert errors("Host ::1 { }")[0].startswith("t.conf:1:6: bad Host name: '::1' looks like an IPv6 address")
    assert errors('scriptlet "s" { script x { } }') == [
        "t.conf:1:17: script x has no source; expected source = \"msys.xfer.server\" or \"msys.xfer.client\""
    ]


def test_every_error_is_reported(conf_impl):
    errs = errors(
        "Domain a.com {\n"
        "  Rotues = ( __mx__ )\n"
        "  max_retries = x\n"
        "}\n"
        "Spool_Base = \"\"\n"
    )
    assert [e.split(":")[1] for e in errs] == ["2", "3", "5"]


def test_every_option_has_a_doc_and_a_valid_default():
    for opt in schema.OPTIONS:
        assert opt.doc and opt.scopes, opt.name
        assert opt.format(opt.default)


@pytest.mark.parametrize(("text", "expected"), [
    ('Gateway = "a.test:\u00b2"', "t.conf:1:11: bad value for 'Gateway': port '\u00b2' is not a number from 1 to 65535"),
    ('Gateway = "a.test:\uff15"', "t.conf:1:11: bad value for 'Gateway': port '\uff15' is not a number from 1 to 65535"),
    ('Routes = ( "smtp://1.2.3.4?port=\uff15" )',
     "t.conf:1:12: bad value for 'Routes': route parameter port='\uff15' is not a number from 1 to 65535"),
    ('Routes = ( "smtp://1.2.3.4?pref=\u00b2" )',
     "t.conf:1:12: bad value for 'Routes': route parameter pref='\u00b2' is not a number from 0 to 65535"),
])
def test_numbers_in_values_are_ascii_digits_only(conf_impl, text, expected):
    """Issue 9: "SMTP numbers are ASCII digits only ... Look for every `isdigit()` and `strip()` used
    before `int()`": a fullwidth 5 was read as port 5, a '²' gave int()'s own message."""
    with pytest.raises(ConfigErrors) as ei:
        loads(text, "t.conf")
    (err,) = ei.value.errors
    assert str(err).startswith(expected + "; expected") or str(err) == expected
