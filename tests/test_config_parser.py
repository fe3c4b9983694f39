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
        ("Gateway = }\n", 1, 11, "unexpected '}'; expected a value (a word, a number, a string or a list)"),
        ("Gateway 1.2.3.4\n", 1, 9,
         "unexpected '1.2.3.4' after 'Gateway'; expected '=' and a value, or a stanza name and '{'"),
        ("Gateway\n", 2, 1,
         "unexpected end of the file after 'Gateway'; expected '=' and a value, or a stanza name and '{'"),
        ("Domain a b { }", 1, 10, "unexpected 'b' after 'Domain a'; expected '{'"),
        ('"quoted" = 1', 1, 1,
         'unexpected string "quoted"; expected an option name or a stanza type (a bare word)'),
        ("= 3", 1, 1, "unexpected '='; expected an option name or a stanza"),
        ("Routes = ( a { )", 1, 14, "unexpected '{' in a list; expected values separated by spaces, then ')'"),
        ('Gateway = "abc\n', 1, 11, "unterminated string; expected a closing '\"' before the end of the line"),
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
    assert str(ei.value).startswith(f"{tmp_path / 'none.conf'}:1:1: cannot read the file:")
