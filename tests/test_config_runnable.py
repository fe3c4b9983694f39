"""Whole-conf checks that check-config and run share (fastrelay.config.model.check_runnable), and
Momentum names fastrelay does not support (fastrelay/config/momentum_names.txt; --lenient).

Issue 9: "An `ESMTP_Listener` without a `Listen` is a config error, not silently ignored." "A conf
with no listener at all starts and says "ready" with nothing to serve; that is a config error."
"`Delivery_Method = delay_xfer` without the `msys.xfer.client` script loaded is a config error with
a clear message, as in Momentum." "`check-config` and `run` always agree."
"""

from __future__ import annotations

import pytest

from fastrelay.config import ConfigErrors, loads
from fastrelay.config.errors import UnsupportedMomentumName
from fastrelay.config.model import check_runnable

ESMTP = 'ESMTP_Listener { Listen "127.0.0.1:0" { } }\n'
XFER_SERVER = 'scriptlet "scriptlet" { script xfer_server { source = "msys.xfer.server" } }\n'
XFER_CLIENT = 'scriptlet "scriptlet" { script xfer_client { source = "msys.xfer.client" } }\n'
HTTP = 'HTTP_Listener { Listen "127.0.0.1:0" { } }\n'


def errors(text: str, **kw) -> list[str]:
    try:
        loads(text, "t.conf", **kw)
    except ConfigErrors as e:
        return [str(x) for x in e.errors]
    return []


def runnable(text: str, **kw) -> tuple[list[str], list[str]]:
    errs, warns = check_runnable(loads(text, "t.conf", **kw))
    return [str(e) for e in errs], [str(w) for w in warns]


@pytest.mark.parametrize(("text", "expected"), [
    ("ESMTP_Listener { }\n",
     ["t.conf:1:1: ESMTP_Listener has no Listen stanza, so it would listen nowhere; "
      'expected ESMTP_Listener { Listen "ADDRESS:PORT" { } }']),
    ("ESMTP_Listener {\n  relay_hosts = ( 10.0.0.0/8 )\n  Listener_Sessions = 10\n}\n",
     ["t.conf:1:1: ESMTP_Listener has no Listen stanza, so it would listen nowhere; "
      'expected ESMTP_Listener { Listen "ADDRESS:PORT" { } }']),
    (ESMTP + "esmtp_listener {\n}\n",
     ["t.conf:2:1: esmtp_listener has no Listen stanza, so it would listen nowhere; "
      'expected esmtp_listener { Listen "ADDRESS:PORT" { } }']),
    (XFER_SERVER + "HTTP_Listener { xfer_secret = \"s\" }\n",
     ["t.conf:2:1: HTTP_Listener has no Listen stanza, so it would listen nowhere; "
      'expected HTTP_Listener { Listen "ADDRESS:PORT" { } }']),
])
def test_a_listener_without_listen_is_an_error(conf_impl, text, expected):
    assert errors(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("", "t.conf:1:1: no listener: nothing would receive mail; expected an ESMTP_Listener"),
    ('Domain a.test { Gateway = "10.0.0.1" }\n', "t.conf:1:1: no listener: nothing would receive mail;"),
    (HTTP, "t.conf:1:1: no listener: nothing would receive mail (an HTTP_Listener serves only the "
           "msys.xfer.server script, which is not loaded)"),
    (XFER_SERVER, "t.conf:1:46: msys.xfer.server is loaded but there is no HTTP_Listener to serve it on"),
])
def test_a_conf_with_nothing_to_serve_is_an_error(conf_impl, text, expected):
    errs, _ = runnable(text)
    assert errs and errs[0].startswith(expected)


@pytest.mark.parametrize("text", [ESMTP, XFER_SERVER + HTTP, ESMTP + XFER_SERVER + HTTP, XFER_CLIENT + ESMTP])
def test_a_conf_with_a_listener_is_runnable(conf_impl, text):
    assert runnable(text) == ([], [])


DELAY_XFER_ERR = ("Delivery_Method = delay_xfer needs the XFER client, which is not loaded; expected "
                  'scriptlet "scriptlet" { script xfer_client { source = "msys.xfer.client" } }')


@pytest.mark.parametrize(("text", "where"), [
    ('Delivery_Method = "delay_xfer"\n' + ESMTP, ["t.conf:1:1"]),
    ('Domain xfer.test {\n  Delivery_Method = "delay_xfer"\n}\n' + ESMTP, ["t.conf:2:3"]),
    ('Binding b { Domain xfer.test {\n  delivery_method = DELAY_XFER } }\n' + ESMTP, ["t.conf:2:3"]),
    ('Binding_Group g {\n Delivery_Method = delay_xfer }\nDomain a.test {\n Delivery_Method = delay_xfer }\n'
     + XFER_SERVER + HTTP, ["t.conf:2:2", "t.conf:4:2"]),
    # The server script is not the client.
    ('Domain xfer.test { Delivery_Method = "delay_xfer" }\n' + XFER_SERVER + HTTP, ["t.conf:1:20"]),
])
def test_delay_xfer_without_the_xfer_client_is_an_error(conf_impl, text, where):
    errs, _ = runnable(text)
    assert errs == [f"{w}: {DELAY_XFER_ERR}" for w in where]


def test_delay_xfer_with_the_xfer_client_is_runnable(conf_impl):
    text = XFER_CLIENT + 'Domain xfer.test { Delivery_Method = "delay_xfer" Routes = ( "xfer://127.0.0.1?port=8080" ) }\n' + ESMTP
    assert runnable(text) == ([], [])


@pytest.mark.parametrize(("extra", "warned"), [
    ("", None),  # the default: loopback only
    ('xfer_allowed_clients = ( 127.0.0.0/8 "::1/128" 127.0.0.2/32 )\n', None),
    ('xfer_secret = "s"\nxfer_allowed_clients = ( 0.0.0.0/0 )\n', None),
    ('xfer_tokens = ( "t" )\nxfer_allowed_clients = ( 10.0.0.0/8 )\n', None),
    ("xfer_allowed_clients = ( 10.0.0.0/8 127.0.0.0/8 )\n", "10.0.0.0/8"),
    ('xfer_allowed_clients = ( 0.0.0.0/0 "::/0" )\n', "0.0.0.0/0, ::/0"),
])
def test_xfer_server_without_a_secret_warns_only_for_a_non_loopback_allow_list(conf_impl, extra, warned):
    """Issue 9: "with no secret or token, the XFER server accepts only from xfer_allowed_clients,
    whose default is loopback ... A non-loopback allow-list without a secret starts with a warning
    naming the risk.\""""
    errs, warns = runnable(XFER_SERVER + HTTP + extra)
    assert errs == []
    if warned is None:
        assert warns == []
    else:
        assert len(warns) == 1
        assert f"takes unauthenticated transfers from {warned} (xfer_allowed_clients, no xfer_secret" in warns[0]
        assert "any host there can relay mail through this node" in warns[0]
        assert warns[0].startswith("t.conf:3:1: ")


# --- Momentum names fastrelay does not support -------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ('tls_verify_mode = "mx.example"\n', "t.conf:1:1: tls_verify_mode is a Momentum option that fastrelay does not "
                                       "support; expected an option or stanza of docs/config.md (--lenient "
                                       "ignores it with a warning)"),
    ('Domain a.test {\n  Adaptive_Retry_Interval = "60"\n}\n',
     "t.conf:2:3: Adaptive_Retry_Interval is a Momentum option that fastrelay does not support;"),
    ('ESMTP_Listener {\n  Listen ":25" { }\n  SMTP_Extensions = ( "AUTH LOGIN" )\n}\n',
     "t.conf:3:3: SMTP_Extensions is a Momentum option that fastrelay does not support;"),
    ('ESMTP_Listener {\n  Listen ":25" { }\n  AuthLoginParameters = [ uri = "ac_auth://" ]\n}\n',
     "t.conf:3:33: AuthLoginParameters: 'ac_auth://' is a Momentum authentication backend (auth_ds); "
     "fastrelay reads password files only"),
    ('HTTP_Listener {\n  Listen ":8080" { }\n  Enable_Authentication = true\n}\n',
     "t.conf:3:3: Enable_Authentication in an HTTP_Listener stanza is a Momentum option that fastrelay does "
     "not support there"),
    ("ac_auth { }\n", "t.conf:1:1: ac_auth is a Momentum module that fastrelay does not support;"),
    ('pathway "p1" { }\n', "t.conf:1:1: pathway is a Momentum stanza that fastrelay does not support;"),
    ('Threadpool "cpu" { concurrency = 4 }\n', "t.conf:1:1: Threadpool is a Momentum stanza that fastrelay"),
])
def test_a_momentum_name_gets_not_supported_and_no_guess(conf_impl, text, expected):
    errs = errors(text)
    assert len(errs) == 1 and errs[0].startswith(expected)
    assert "did you mean" not in errs[0] and "unknown" not in errs[0]


@pytest.mark.parametrize(("text", "expected"), [
    ("Rotues = ( a )\n", "t.conf:1:1: unknown option 'Rotues'; did you mean 'Routes'?"),
    ("frobnicate = 1\n", "t.conf:1:1: unknown option 'frobnicate'; expected a known option name"),
    ("Domian a.test { }\n", "t.conf:1:1: unknown stanza 'Domian'; did you mean 'Domain'?"),
])
def test_names_neither_fastrelay_nor_momentum_knows_are_still_unknown(conf_impl, text, expected):
    assert errors(text)[0].startswith(expected)
    assert errors(text, lenient=True)[0].startswith(expected)


def test_lenient_turns_momentum_names_and_only_them_into_warnings(conf_impl):
    text = ('tls_verify_mode = "mx.example"\n'
            'ac_auth { uri = "x" deep { a = b } }\n'
            'Domain a.test {\n  adaptive_enabled = true\n  max_retries = 7\n}\n' + ESMTP)
    assert len(errors(text)) == 3
    cfg = loads(text, "t.conf", lenient=True)
    assert [(w.line, w.col) for w in cfg.warnings] == [(1, 1), (2, 1), (4, 3)]
    assert all(isinstance(w, UnsupportedMomentumName) for w in cfg.warnings)
    assert cfg.get("max_retries", "a.test") == 7
    # A real error next to them stays an error, alone.
    assert errors(text + "max_retries = x\n", lenient=True) == [
        "t.conf:8:15: bad value for 'max_retries': got 'x'; expected a whole number from 0 to 1000000, \"auto\" or \"none\""]


def test_momentum_names_file_is_derived_and_holds_the_reference_names():
    from fastrelay.config import momentum, schema

    names = momentum.names()
    assert len(names) > 400
    for name, kind in [("ehlo_hostname", "option"), ("routes", "option"), ("binding_group", "stanza"),
                       ("ac_auth", "module"), ("esmtp_listener", "stanza"), ("tls_verify", "option")]:
        assert names[name][0] == kind
    # Every fastrelay option that carries a Momentum name is in the list (a sanity check of the
    # derivation; fastrelay's own options such as xfer_secret are not Momentum's).
    for opt in ["Gateway", "Routes", "Delivery_Method", "max_outbound_connections", "retry_interval",
                "relay_hosts", "Hostname", "suspend_delivery", "TLS_Certificate"]:
        assert schema.BY_KEY[opt.lower()] and momentum.lookup(opt) is not None


def test_a_hash_for_a_fastrelay_option_is_a_type_error(conf_impl):
    assert errors('Gateway = [ host = "10.0.0.1" ]\n') == [
        "t.conf:1:11: bad value for 'Gateway': got a hash [ key = value ... ]; expected a hostname or IP "
        "address, optionally with :port (IPv6 in brackets: [2001:db8::1]:25)"]


# Momentum configurations from its reference, as written (the ESMTP listener is fastrelay's own).
MOMENTUM_CONFS = {
    "modules/ac-auth.md": """
ac_auth {}
Esmtp_Listener {
  SMTP_Extensions = ( "AUTH LOGIN" )
  AuthLoginParameters = [
    uri = "ac_auth://"
    log_authentication = "true"
  ]
  Listen "127.0.0.1:0" { }
}
HTTP_Listener {
  enable_authentication = true
  Log_Requests_to_Paniclog = true
  AuthPlainParameters = [
    uri = "ac_auth://"
    log_authentication = "true"
  ]
  Listen "127.0.0.1:0" { }
}
""",
    "inbound-ssl.md": """
ESMTP_Listener = {
  Listen ":465" {
    Use_SSL = true
    TLS_Certificate = "/path/to/cert.pem"
    TLS_Key = "/path/to/key.pem"
    TLS_Client_CA = "/path/to/clientca.bundle"
    TLS_Ciphers = "DEFAULT"
  }
}
""",
    "modules/pipe-transport.md": """
pipe_transport "pipe_transport1"
{
   program_name  = "/bin/cat"
   domain =  ( "example.com" "another.example.com" )
   code = [
     "0" = "250 ok"
   ]
}
""" + ESMTP,
    "modules/auth-ds.md": """
auth_ds {
  Scheme "mysqlauth" {
    Authenticate {
        query = "SELECT 1 AS ALLOW FROM users WHERE user_name = :user and
          password = encrypt(:pass, PASSWORD)"
      cache = "authdb"
      map = [
        user = "%{username}"
        pass = "%{password}"
      ]
    }
  }
}
ESMTP_Listener {
  AuthLoginParameters = [uri = "mysqlauth://"]
  Listen "127.0.0.1:0" { }
}
""",
}


@pytest.mark.parametrize("name", list(MOMENTUM_CONFS))
def test_momentum_reference_confs_parse_and_lenient_loads_them(conf_impl, name):
    text = MOMENTUM_CONFS[name]
    errs = errors(text)
    # Every error is a Momentum name fastrelay does not support: no syntax error left.
    assert errs and all("is a Momentum" in e for e in errs), errs
    cfg = loads(text, "t.conf", lenient=True)
    assert len(cfg.warnings) == len(errs)
    assert check_runnable(cfg)[0] == []
