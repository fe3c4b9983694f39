"""Momentum's binding_group::domain scope (issue 15): a Domain stanza inside a Binding_Group, in
the precedence Momentum's "Configuration Scopes and Fallback" page gives, held against every
combination an operator writes."""

from __future__ import annotations

import pytest

from fastrelay.config import ConfigErrors, loads

# The page's summary, "in order of decreasing precedence":
#   "Value given in a domain stanza within a binding that is part of a binding group"
#   "Value given in a domain stanza within a binding"
#   "Value given in a domain stanza within a binding_group"
#   "Value specified within the binding stanza"
#   "Value specified within a global domain stanza"
#   "Global setting"
# and its example: with max_outbound_connections removed from the binding, the domain's value
# "becomes 5, namely its value within the binding group that contains domain example.com".
CONF = """
max_outbound_connections = 30
Domain example.com { max_outbound_connections = 20 }
Binding_Group group1 {
  max_outbound_connections = 5
  Domain example.com { max_outbound_connections = 7 }
  Binding withdomain {
    max_outbound_connections = 15
    Domain example.com { max_outbound_connections = 11 }
  }
  Binding emptydomain {
    max_outbound_connections = 15
    Domain example.com { retry_interval = 60 }
  }
  Binding bare { }
}
Binding_Group group1 {
  Domain "/^y/" { max_outbound_connections = 4 }
}
Binding_Group group2 { Binding other { max_outbound_connections = 9 } }
Binding lone { Domain example.com { max_outbound_connections = 3 } }
"""

ROWS = [
    # (domain, binding, value, scope it comes from)
    ("example.com", "withdomain", 11, "Binding withdomain::Domain example.com"),  # binding::domain first
    ("example.com", "emptydomain", 7, "Binding_Group group1::Domain example.com"),  # then group::domain
    ("example.com", "bare", 7, "Binding_Group group1::Domain example.com"),  # group::domain before the group
    ("other.com", "withdomain", 15, "Binding withdomain"),  # no domain stanza: the binding
    ("other.com", "bare", 5, "Binding_Group group1"),  # then its group
    ("yahoo.com", "bare", 4, "Binding_Group group1::Domain /^y/"),  # a regex Domain in a group (merged group)
    ("yahoo.com", "withdomain", 4, "Binding_Group group1::Domain /^y/"),  # ... above the binding's own 15
    ("example.com", "other", 9, "Binding other"),  # another group's Domain does not apply
    ("example.com", "lone", 3, "Binding lone::Domain example.com"),
    ("example.com", None, 20, "Domain example.com"),  # no binding: the group's Domain does not apply
    ("example.com", "default", 20, "Domain example.com"),
    ("other.com", None, 30, "global"),
]


@pytest.mark.parametrize(("domain", "binding", "value", "scope"), ROWS)
def test_binding_group_domain_precedence(conf_impl, domain, binding, value, scope):
    s = loads(CONF, "t.conf").lookup("max_outbound_connections", domain, binding)
    assert (s.value, s.scope) == (value, scope)


def test_a_group_domain_takes_what_a_binding_domain_takes(conf_impl):
    """Options valid in binding::domain are valid in binding_group::domain; others are refused
    with the scope named."""
    loads('Binding_Group g { Domain d.test { Routes = ( "127.0.0.2" ) suspend_delivery = true } }\n', "t.conf")
    with pytest.raises(ConfigErrors) as ei:
        loads('Binding_Group g { Domain d.test { Bind_Address = "127.0.0.2" } }\n', "t.conf")
    assert "t.conf:1:35: option 'Bind_Address' is not valid in a Domain stanza inside a Binding_Group" in str(ei.value)


def test_config_show_lists_group_domains(tmp_path, capsys):
    from fastrelay.cli import main

    f = tmp_path / "t.conf"
    f.write_text('Spool_Base = "s"\nBinding_Group g { Domain d.test { retry_interval = 60 } }\n'
                 'ESMTP_Listener { Listen "127.0.0.1:0" { } }\n')
    assert main(["config", "show", "-c", str(f), "--non-default"]) == 0
    out = capsys.readouterr().out
    assert "# Binding_Group g :: Domain d.test\nretry_interval = 1m\t# " in out
