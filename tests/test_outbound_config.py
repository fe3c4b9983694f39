"""The outbound chapter's conf (issue #10): binding names, regex and literal Domain/Host stanzas,
Bind_Address, TLS_Protocols, XCLIENT and the throttles, in the scopes Momentum lists."""

from __future__ import annotations

import pytest

from fastrelay.config import loads
from fastrelay.config.errors import ConfigErrors

REGEX_CONF = """
Domain "yahoo.com" { max_outbound_connections = 20 }
Domain "/^(aol|yahoo)\\.com$/" { max_outbound_connections = 15 outbound_throttle_messages = "10/1" }
Domain "/(?:^|[.])example[.](com|co[.]uk)$/" { max_outbound_connections = 5 }
Domain "/example/" { max_outbound_connections = 7 }
Domain "[IPv6:2001:db8::1]" { max_outbound_connections = 3 }
Domain "[192.0.2.1]" { max_outbound_connections = 2 }
Binding "b1" {
  Domain "/^aol\\.com$/" { max_outbound_connections = 1 }
}
"""


@pytest.mark.parametrize(("domain", "binding", "expected", "scope"), [
    ("yahoo.com", None, 20, "Domain yahoo.com"),  # the literal stanza wins over a matching regex
    ("aol.com", None, 15, 'Domain /^(aol|yahoo)\\.com$/'),
    ("AOL.COM", None, 15, 'Domain /^(aol|yahoo)\\.com$/'),  # domains are case-insensitive
    ("mail.aol.com", None, 32, "global"),  # anchored: no substring match
    ("example.co.uk", None, 5, "Domain /(?:^|[.])example[.](com|co[.]uk)$/"),
    ("sub.example.com", None, 5, "Domain /(?:^|[.])example[.](com|co[.]uk)$/"),  # first regex in file order
    ("example.org", None, 7, "Domain /example/"),  # unanchored: a substring match, as Momentum warns
    ("[IPv6:2001:DB8:0::1]", None, 3, "Domain [ipv6:2001:db8::1]"),  # domain literals, normalised
    ("[192.0.2.1]", None, 2, "Domain [192.0.2.1]"),
    ("aol.com", "b1", 1, "Binding b1::Domain /^aol\\.com$/"),  # binding::regex-domain first
    ("yahoo.com", "b1", 20, "Domain yahoo.com"),
])
def test_regex_and_literal_domains(domain, binding, expected, scope):
    """Momentum's domain page: "Option resolution will always match a value defined in a normal
    domain stanza before looking for a matching regex domain stanza in the same container" and
    then "in the order that the regex domain stanzas were declared in the configuration file"."""
    cfg = loads(REGEX_CONF.replace("Domain \"yahoo.com\" {", "max_outbound_connections = 32\nDomain \"yahoo.com\" {"))
    s = cfg.lookup("max_outbound_connections", domain, binding)
    assert s.value == expected
    assert s.scope == scope


def test_one_regex_domain_is_one_throttle_scope():
    """ref-outbound-throttle-messages: "outbound_throttle_messages set in the regex domain ...
    will impact all domains together"."""
    cfg = loads(REGEX_CONF)
    a = cfg.lookup("outbound_throttle_messages", "aol.com", "x")
    y = cfg.lookup("outbound_throttle_messages", "yahoo.com", "x")
    assert a.scope == 'Domain /^(aol|yahoo)\\.com$/'
    assert y.value is None  # the literal yahoo.com stanza does not set it, and the literal wins
    assert str(a.value) == "10/1"


def test_regex_host_stanza():
    cfg = loads('Host "/^sink-[ab]\\.test$/" { outbound_throttle_connections = "5/10" }\n'
                'Host sink-a.test { max_outbound_connections = 2 }\n')
    assert cfg.host_lookup("outbound_throttle_connections", "sink-b.test").scope == 'Host /^sink-[ab]\\.test$/'
    assert cfg.host_lookup("max_outbound_connections", "sink-a.test").value == 2
    assert cfg.host_lookup("outbound_throttle_connections", "sink-a.test") is None  # the literal stanza wins
    assert cfg.host_lookup("outbound_throttle_connections", "sink-c.test") is None


def test_binding_names_are_case_sensitive_and_groups_merge():
    """ref-binding: "Binding names are case-sensitive. Spaces and colons are not allowed";
    ref-binding-group: "you can specify the same group multiple times"."""
    cfg = loads('Binding_Group "g" { Binding "A" { EHLO_Hostname = "a.test" } }\n'
                'Binding_Group "g" { Binding "a" { EHLO_Hostname = "lower.test" } }\n')
    assert cfg.get("EHLO_Hostname", "d.test", "A") == "a.test"
    assert cfg.get("EHLO_Hostname", "d.test", "a") == "lower.test"
    assert cfg.group_members("g") == ["A", "a"]


@pytest.mark.parametrize(("conf", "message"), [
    ('Binding "a:b" { }', r"bad Binding name: got 'a:b'; expected a binding name without spaces or colons"),
    ('Binding "a b" { }', r"bad Binding name"),
    ('Domain "/(unclosed/" { }', r"bad Domain name: .*bad regex"),
    ('Bind_Address = "not an address"', r"bad value for 'Bind_Address'"),
    ('TLS_Protocols = "+ALL:-TLSv9"', r"bad value for 'TLS_Protocols'.*unknown protocol 'TLSv9'"),
    ('XCLIENT = maybe', r"bad value for 'XCLIENT'.*expected one of"),
    ('outbound_throttle_messages = "0/1"', r"bad value for 'outbound_throttle_messages'"),
    ('ESMTP_Listener { Binding = "a:b" }', r"bad value for 'Binding'"),
    ('Domain d.test { Bind_Address = 127.0.0.2 }', r"option 'Bind_Address' is not valid in a Domain stanza"),
])
def test_bad_outbound_values(conf, message):
    with pytest.raises(ConfigErrors, match=r"<string>:1:\d+: " + message):
        loads(conf + "\n")


@pytest.mark.parametrize("scope", [
    "{}",
    'Binding_Group g {{ {} }}',
    'Binding b {{ {} }}',
    'Domain d.test {{ {} }}',
    'Binding b {{ Domain d.test {{ {} }} }}',
    'Host mx.d.test {{ {} }}',
])
@pytest.mark.parametrize("option", ["outbound_throttle_messages", "outbound_throttle_connections"])
def test_throttles_are_valid_in_every_scope_momentum_lists(scope, option):
    loads(scope.format(f'{option} = "10/60"') + "\n")


def test_tls_protocols_normalised():
    cfg = loads('TLS_Protocols = "+all:-sslv3:-tlsv1.0:-TLSv1.1"\n')
    assert cfg.get("TLS_Protocols") == "+ALL:-SSLv3:-TLSv1.0:-TLSv1.1"
