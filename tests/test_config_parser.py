"""Conf parser: stanzas, options, lists, includes and syntax errors, on both tokenisers."""

from __future__ import annotations

import os

import pytest

from fastrelay.config.errors import ConfigError
from fastrelay.config.parser import Atom, ListValue, Option, Stanza, parse_file, parse_text


def parse(text: str, name: str = "t.conf"):
    return parse_text(text.encode(), name)


def err(text: str, name: str = "t.conf") -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse(text, name)
    return ei.value


def test_options_stanzas_and_lists(conf_impl):
    nodes = parse(
        'Gateway = 10.10.10.50\n'
        'Domain local.example.com {\n'
        '  Delivery_Method = LMTP\n'
        '  Routes = ( "smtp://10.0.11.7?pref=10" __mx__ )\n'
        '}\n'
        'ESMTP_Listener { Listen "127.0.0.1:2525" { } }\n'
    )
    assert [type(n) for n in nodes] == [Option, Stanza, Stanza]
    gw = nodes[0]
    assert (gw.name, gw.value.text, gw.value.quoted, gw.pos.line, gw.pos.col) == ("Gateway", "10.10.10.50", False, 1, 1)
    dom = nodes[1]
    assert dom.type == "Domain" and dom.name.text == "local.example.com" and dom.pos.line == 2
    routes = dom.children[1]
    assert isinstance(routes.value, ListValue)
    assert [(a.text, a.quoted) for a in routes.value.items] == [("smtp://10.0.11.7?pref=10", True), ("__mx__", False)]
    assert (routes.value.pos.line, routes.value.pos.col) == (4, 12)
    lst = nodes[2]
    assert lst.name is None and lst.children[0].type == "Listen"
    assert lst.children[0].name == Atom("127.0.0.1:2525", True, lst.children[0].name.pos)
    assert lst.children[0].children == []


def test_empty_list_and_empty_stanza(conf_impl):
    nodes = parse("relay_hosts = ( )\nHTTP_Listener { Listen \":8080\" {} }")
    assert nodes[0].value.items == []
    assert nodes[1].children[0].children == []


def test_scriptlet_as_in_the_seeds(conf_impl):
    nodes = parse('scriptlet "scriptlet" {\n  script xfer_server {\n    source = "msys.xfer.server"\n  }\n}\n')
    s = nodes[0]
    assert s.type == "scriptlet" and s.name.text == "scriptlet" and s.name.quoted
    script = s.children[0]
    assert script.type == "script" and script.name.text == "xfer_server"
    assert script.children[0].value.text == "msys.xfer.server"


@pytest.mark.parametrize(
    ("text", "line", "col", "message"),
    [
        ("Domain a.com {\n  Gateway = x\n", 1, 14,
         "unclosed '{' of the Domain stanza opened here; expected '}' before the end of the file"),
        ("}\n", 1, 1, "unexpected '}' with no stanza open; expected an option or a stanza"),
        ("Routes = ( \"a\"\n", 1, 10, "unclosed '(' opened here; expected ')' before the end of the file"),
        ("Gateway =\n", 2, 1, "unexpected end of the file; expected a value after '='"),
        ("Gateway = }\n", 1, 11, "unexpected '}'; expected a value (a word, a number, a string, a list or a hash)"),
        ("Gateway 1.2.3.4\n", 1, 9,
         "unexpected '1.2.3.4' after 'Gateway'; expected '=' and a value, or a stanza name and '{'"),
        ("Gateway\n", 2, 1,
         "unexpected end of the file after 'Gateway'; expected '=' and a value, or a stanza name and '{'"),
        ("Domain a b { }", 1, 10, "unexpected 'b' after 'Domain a'; expected '{'"),
        ('"quoted" = 1', 1, 1,
         'unexpected string "quoted"; expected an option name or a stanza type (a bare word)'),
        ("= 3", 1, 1, "unexpected '='; expected an option name or a stanza"),
        ("Routes = ( a { )", 1, 14, "unexpected '{' in a list; expected values separated by spaces, then ')'"),
        ('Gateway = "abc\n', 1, 11, "unterminated string; expected a closing '\"' before the end of the file"),
    ],
)
def test_syntax_errors(conf_impl, text, line, col, message):
    e = err(text)
    assert (e.file, e.line, e.col, e.message) == ("t.conf", line, col, message)
    assert str(e) == f"t.conf:{line}:{col}: {message}"


def test_include_file_and_directory(tmp_path, conf_impl):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "20-b.conf").write_text("Domain b.com { max_retries = 2 }\n")
    (tmp_path / "d" / "10-a.conf").write_text("Domain a.com { max_retries = 1 }\n")
    (tmp_path / "d" / ".hidden.conf").write_text("this would not parse {\n")
    (tmp_path / "one.conf").write_text("retry_interval = 5m\n")
    main = tmp_path / "main.conf"
    main.write_text('include "one.conf"\ninclude "d"\nDomain c.com { include "one.conf" }\n')
    nodes = parse_file(str(main))
    assert [getattr(n, "name", None) if isinstance(n, Option) else n.name.text for n in nodes] == [
        "retry_interval", "a.com", "b.com", "c.com",
    ]
    # Positions point into the included files.
    assert nodes[0].pos.file == os.path.join(str(tmp_path), "one.conf")
    assert nodes[2].pos.file.endswith("20-b.conf")
    assert nodes[3].children[0].name == "retry_interval"


def test_include_missing(tmp_path, conf_impl):
    main = tmp_path / "main.conf"
    main.write_text('\n  include "nope.conf"\n')
    with pytest.raises(ConfigError) as ei:
        parse_file(str(main))
    e = ei.value
    assert (e.file, e.line, e.col) == (str(main), 2, 11)
    assert e.message == "cannot include 'nope.conf': no such file or directory; expected an existing path"


def test_include_loop(tmp_path, conf_impl):
    a, b = tmp_path / "a.conf", tmp_path / "b.conf"
    a.write_text('include "b.conf"\n')
    b.write_text('Gateway = x.example\ninclude "a.conf"\n')
    with pytest.raises(ConfigError) as ei:
        parse_file(str(a))
    e = ei.value
    assert (e.file, e.line, e.col) == (str(b), 2, 9)
    assert e.message.startswith(f"include loop: {a} -> {b} -> {a}")


def test_include_self_loop_through_directory(tmp_path, conf_impl):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.conf").write_text('include "."\n')
    with pytest.raises(ConfigError) as ei:
        parse_file(str(d / "x.conf"))
    assert ei.value.message.startswith("include loop:")


def test_missing_top_level_file(tmp_path, conf_impl):
    with pytest.raises(ConfigError) as ei:
        parse_file(str(tmp_path / "none.conf"))
    assert str(ei.value) == f"{tmp_path / 'none.conf'}: cannot read the conf file: No such file or directory"


# --- Momentum's forms (issue 9, part 4: "Several kinds that Momentum accepts do not parse here:
# hash values `[ key = value ... ]` ...; a string continued on the next line; a stanza written
# with `=` (`Name = { ... }`)") ---------------------------------------------------------------------

from fastrelay.config.parser import HashValue  # noqa: E402


def hash_items(v) -> list:
    """A HashValue as plain (key, value) pairs, nested values too."""
    if isinstance(v, HashValue):
        return [(k.text, hash_items(x)) for k, x in v.items]
    if isinstance(v, ListValue):
        return [a.text for a in v.items]
    return v.text


@pytest.mark.parametrize(("text", "expected"), [
    ('AuthLoginParameters = [uri = "mysqlauth://"]', [("uri", "mysqlauth://")]),  # auth-ds.md
    ('AuthLoginParameters = [\n  uri = "ac_auth://"\n  log_authentication = "true"\n]',  # ac-auth.md
     [("uri", "ac_auth://"), ("log_authentication", "true")]),
    ('code = [\n  100 = "550 command failed"\n  111 = "450 try again later"\n]',  # pipe-transport.md
     [("100", "550 command failed"), ("111", "450 try again later")]),
    ('code = [ "0" = "250 ok" ]', [("0", "250 ok")]),
    ('bits = [\n 0.0.0.1 = "list1_hits"\n 0.0.0.2 = "list2_hits"\n]', [("0.0.0.1", "list1_hits"), ("0.0.0.2", "list2_hits")]),
    ("h = [ ]", []),
    ('h = [ list = ( a "b" ) inner = [ k = v ip = [::1]:25 ] last = x]',
     [("list", ["a", "b"]), ("inner", [("k", "v"), ("ip", "[::1]:25")]), ("last", "x")]),
])
def test_hash_values(conf_impl, text, expected):
    (opt,) = parse(text)
    assert isinstance(opt.value, HashValue) and hash_items(opt.value) == expected
    assert opt.value.pos.line == 1 and opt.value.pos.col == text.index("[") + 1


def test_momentum_listener_with_hashes_parses(conf_impl):
    # modules/ac-auth.md, as written.
    nodes = parse(
        'ac_auth {}\n'
        'Esmtp_Listener {\n'
        '  SMTP_Extensions = ( "AUTH LOGIN" )\n'
        '  AuthLoginParameters = [\n'
        '    uri = "ac_auth://"\n'
        '    log_authentication = "true"\n'
        '  ]\n'
        '}\n'
        'HTTP_Listener {\n'
        '  enable_authentication = true\n'
        '  AuthPlainParameters = [\n'
        '    uri = "ac_auth://"\n'
        '  ]\n'
        '}\n'
    )
    assert [n.type for n in nodes] == ["ac_auth", "Esmtp_Listener", "HTTP_Listener"]
    auth = nodes[1].children[1]
    assert auth.name == "AuthLoginParameters" and auth.value.get("uri").text == "ac_auth://"


@pytest.mark.parametrize("text", [
    'ESMTP_Listener = {\n  Listen ":465" {\n    TLS_Key = "/k.pem"\n  }\n}\n',  # inbound-ssl.md
    'ESMTP_Listener={ Listen ":465" { TLS_Key = "/k.pem" } }',
    'ESMTP_Listener\n=\n{\n Listen ":465" {\n TLS_Key = "/k.pem" } }',
])
def test_a_stanza_written_with_equals(conf_impl, text):
    (s,) = parse(text)
    assert isinstance(s, Stanza) and s.type == "ESMTP_Listener" and s.name is None
    (listen,) = s.children
    assert listen.type == "Listen" and listen.name.text == ":465"
    assert listen.children[0].value.text == "/k.pem"


def test_a_string_continued_on_the_next_line(conf_impl):
    # modules/auth-ds.md, as written: the line break is part of the query.
    (s,) = parse(
        'Scheme "mysqlauth" {\n'
        '  Authenticate {\n'
        '      query = "SELECT 1 AS ALLOW FROM users WHERE user_name = :user and\n'
        '          password = encrypt(:pass, PASSWORD)"\n'
        '      cache = "authdb"\n'
        '  }\n'
        '}\n'
    )
    query, cache = s.children[0].children
    assert query.value.text == ("SELECT 1 AS ALLOW FROM users WHERE user_name = :user and\n"
                                "          password = encrypt(:pass, PASSWORD)")
    assert (cache.pos.line, cache.pos.col, cache.value.text) == (5, 7, "authdb")


@pytest.mark.parametrize(("text", "line", "col", "message"), [
    ("a = [ k = 1", 1, 5, "unclosed '[' opened here; expected ']' before the end of the file"),
    ("a = [\n  k = 1\n  m = [ x = y\n]\n", 1, 5, "unclosed '[' opened here; expected ']' before the end of the file"),
    ("a = [ k ]", 1, 9, "unexpected ']' after the key 'k' in a hash; expected '='"),
    ("a = [ k v ]", 1, 9, "unexpected 'v' after the key 'k' in a hash; expected '='"),
    ("a = [ k = ]", 1, 11, "unexpected ']'; expected a value (a word, a number, a string, a list or a hash)"),
    ("a = [ k =", 1, 10, "unexpected end of the file; expected a value for 'k' in the hash"),
    ("a = [ { ]", 1, 7, "unexpected '{' in a hash; expected key = value pairs, then ']'"),
    ("a = [ k = 1 k = 2 ]", 1, 13, "the key 'k' is already in this hash (at t.conf:1:7); expected each key once"),
    ("a = ( [ k = 1 ] )", 1, 7, "unexpected '[' in a list; expected values separated by spaces, then ')'"),
    ("map [ a = b ]", 1, 5, "unexpected '[' after 'map'; expected '=' and a value, or a stanza name and '{'"),
    ("]", 1, 1, "unexpected ']'; expected an option name or a stanza"),
    ("Domain a.test { x = 1 ]", 1, 23, "unexpected ']'; expected an option name or a stanza"),
    # Only a stanza without a name is written with '=' (Momentum's form).
    ('Listen ":465" = { }', 1, 15, "unexpected '=' after 'Listen :465'; expected '{'"),
    ("ESMTP_Listener = {\n", 1, 18,
     "unclosed '{' of the ESMTP_Listener stanza opened here; expected '}' before the end of the file"),
    ('q = "SELECT 1\n  AND 2\nr = "x"\n', 3, 7,
     "unterminated string; expected a closing '\"' before the end of the file (the string opened at 1:5 "
     "runs over several lines; is its closing '\"' missing?)"),
])
def test_momentum_form_errors(conf_impl, text, line, col, message):
    e = err(text)
    assert (e.file, e.line, e.col, e.message) == ("t.conf", line, col, message)


def test_hashes_nested_past_the_limit(conf_impl):
    from fastrelay import limits

    n = limits.MAX_CONF_NESTING
    e = err("h = " + "[ k = " * (n + 5) + "v" + " ]" * (n + 5))
    assert (e.line, e.col) == (1, 5 + 6 * n)
    assert e.message.startswith(f"lists and hashes nested more than {n} deep")
    # Stanzas and hashes count together.
    e = err("Binding b { " * (n - 1) + "h = [ k = [ k = v ] ]" + " }" * (n - 1))
    assert e.message.startswith(f"lists and hashes nested more than {n} deep")


# --- Hypothesis: the parser and the model answer every input with ConfigError(s) or a result -----

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastrelay.config import ConfigErrors, loads  # noqa: E402

_PARSER_FRAGMENTS = [
    b"Domain", b"ESMTP_Listener", b"Listen", b"Routes", b"Gateway", b"AuthLoginParameters", b"ac_auth", b"x",
    b"a.test", b"10", b'"127.0.0.1:0"', b"[::1]:25", b'"s"', b'"a\nb"', b" ", b"\n", b"=", b"{", b"}", b"(",
    b")", b"[", b"]", b"#c\n", b"/*c*/", b"include", b'"\xff"', b"\x01",
]
conf_text = st.lists(st.sampled_from(_PARSER_FRAGMENTS), max_size=60).map(b" ".join)


# conf_impl only selects the tokeniser for the whole test; it holds nothing an example could change.
@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(conf_text)
def test_parse_and_model_raise_only_config_errors(conf_impl, data):
    try:
        loads(data, "p.conf")
    except ConfigErrors as e:
        assert e.errors and all(isinstance(x, ConfigError) for x in e.errors)
