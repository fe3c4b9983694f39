"""Tests of the conf tokeniser, run on the pure-Python twin ("py") and the Cython build ("c")."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrelay import _impl
from fastrelay.config import tokens as T
from fastrelay.config.errors import ConfigError

UNTERMINATED_STRING = "unterminated string; expected a closing '\"' before the end of the file"
UNTERMINATED_COMMENT = "unterminated comment; expected '*/' before the end of the file"
BAD_WORD = "invalid UTF-8 in word; expected UTF-8 text"
BAD_STRING = "invalid UTF-8 in string; expected UTF-8 text"


def control(byte: int) -> str:
    return f"unexpected control character 0x{byte:02X}; expected printable text"


def kt(tokens: list) -> list[tuple[int, str]]:
    """Kinds and texts only, for tests about what the tokens are rather than where."""
    return [(kind, text) for kind, text, _file, _line, _col in tokens]


def positions(tokens: list) -> list[tuple[str, int, int]]:
    return [(text, line, col) for _kind, text, _file, line, col in tokens]


# -- token kinds ---------------------------------------------------------------------------------


def test_every_token_kind(impl):
    data = b'Domain "x" 25 = { } ( )'
    assert impl.tokenize(data, "k.conf") == [
        (T.WORD, "Domain", "k.conf", 1, 1),
        (T.STRING, "x", "k.conf", 1, 8),
        (T.NUMBER, "25", "k.conf", 1, 12),
        (T.EQUALS, "=", "k.conf", 1, 15),
        (T.LBRACE, "{", "k.conf", 1, 17),
        (T.RBRACE, "}", "k.conf", 1, 19),
        (T.LPAREN, "(", "k.conf", 1, 21),
        (T.RPAREN, ")", "k.conf", 1, 23),
    ]


def test_kind_values_are_the_shared_constants():
    assert (T.WORD, T.STRING, T.NUMBER, T.EQUALS, T.LBRACE, T.RBRACE, T.LPAREN, T.RPAREN, T.LBRACKET,
            T.RBRACKET) == tuple(range(1, 11))
    assert set(T.NAMES) == set(range(1, 11))


@pytest.mark.needs_compiled
def test_cython_enum_agrees_with_tokens_module():
    from fastrelay import _core

    assert _core._tok_kinds == {name: getattr(T, name) for name in _core._tok_kinds}
    assert set(_core._tok_kinds) == {name for name in vars(T) if name.isupper() and name != "NAMES"}


def test_default_filename(impl):
    assert impl.tokenize(b"a") == [(T.WORD, "a", "<string>", 1, 1)]


def test_punctuation_needs_no_spaces(impl):
    assert kt(impl.tokenize(b'a={b}(c)"d"e')) == [
        (T.WORD, "a"), (T.EQUALS, "="), (T.LBRACE, "{"), (T.WORD, "b"), (T.RBRACE, "}"),
        (T.LPAREN, "("), (T.WORD, "c"), (T.RPAREN, ")"), (T.STRING, "d"), (T.WORD, "e"),
    ]


def test_empty_input(impl):
    assert impl.tokenize(b"") == []


def test_only_whitespace(impl):
    assert impl.tokenize(b" \t\r\n\f\v \n") == []


def test_only_comments(impl):
    assert impl.tokenize(b"# one\n/* two\n three */ # four\n   /**/") == []


# -- strings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (rb'"a\\b"', "a\\b"),
        (rb'"a\"b"', 'a"b'),
        (rb'"a\nb"', "a\nb"),
        (rb'"a\tb"', "a\tb"),
        (rb'"a\rb"', "a\rb"),
        (rb'"a\qb"', "a\\qb"),  # unknown escape: both characters kept
        (rb'"\x41"', "\\x41"),
        (rb'"a\\"', "a\\"),  # the escaped backslash does not escape the quote
        (rb'"\\\""', '\\"'),
        (rb'"\\\\n"', "\\\\n"),
        (rb'"\\\ "', "\\\\ "),
        (rb'""', ""),
        (b'"a # b /* c */ { } ( ) = d"', "a # b /* c */ { } ( ) = d"),
        (b'"tab\there\r\x0b\x0c"', "tab\there\r\x0b\x0c"),
        (rb'"\n\t\r\\\""', "\n\t\r\\\""),
    ],
)
def test_string_escapes(impl, data, text):
    assert impl.tokenize(data) == [(T.STRING, text, "<string>", 1, 1)]


def test_unknown_escape_before_non_ascii(impl):
    assert kt(impl.tokenize('"\\é"'.encode())) == [(T.STRING, "\\é")]


def test_string_position_is_the_opening_quote(impl):
    assert positions(impl.tokenize(b'x  "a\\"b"  y')) == [("x", 1, 1), ('a"b', 1, 4), ("y", 1, 12)]


def test_string_next_to_word(impl):
    assert kt(impl.tokenize(b'"a"b"c"')) == [(T.STRING, "a"), (T.WORD, "b"), (T.STRING, "c")]


# -- comments ------------------------------------------------------------------------------------


def test_hash_comment(impl):
    assert positions(impl.tokenize(b"a # b c\nd")) == [("a", 1, 1), ("d", 2, 1)]


def test_hash_ends_a_word(impl):
    assert kt(impl.tokenize(b"abc#def\nghi")) == [(T.WORD, "abc"), (T.WORD, "ghi")]


def test_hash_comment_at_eof_without_newline(impl):
    assert kt(impl.tokenize(b"a = 1 # the end")) == [(T.WORD, "a"), (T.EQUALS, "="), (T.NUMBER, "1")]


def test_block_comment(impl):
    assert positions(impl.tokenize(b"a /* b c */ d")) == [("a", 1, 1), ("d", 1, 13)]


def test_block_comment_ends_a_word(impl):
    assert positions(impl.tokenize(b"abc/*c*/def")) == [("abc", 1, 1), ("def", 1, 9)]


def test_block_comment_does_not_nest(impl):
    assert kt(impl.tokenize(b"/* a /* b */ c */")) == [(T.WORD, "c"), (T.WORD, "*/")]


def test_block_comment_closes_at_first_star_slash(impl):
    assert kt(impl.tokenize(b"/***/x/* **/y")) == [(T.WORD, "x"), (T.WORD, "y")]


def test_block_comment_at_eof(impl):
    assert kt(impl.tokenize(b"a/**/")) == [(T.WORD, "a")]


def test_comment_bytes_are_not_checked(impl):
    data = b"# \x00\x01\x7f\xff\xc3\n/* \x00\x02\xfe \" */ ok"
    assert impl.tokenize(data) == [(T.WORD, "ok", "<string>", 2, 13)]


def test_comment_markers_inside_strings_are_text(impl):
    assert kt(impl.tokenize(b'"# not" "/* not */"')) == [(T.STRING, "# not"), (T.STRING, "/* not */")]


def test_slash_and_star_slash_are_word_bytes(impl):
    assert kt(impl.tokenize(b"a/b / */ a*/ /")) == [
        (T.WORD, "a/b"), (T.WORD, "/"), (T.WORD, "*/"), (T.WORD, "a*/"), (T.WORD, "/"),
    ]


# -- positions -----------------------------------------------------------------------------------


def test_lines_and_columns(impl):
    data = b"Domain x {\n  Routes = ( \"y\" )\n\t}\n"
    assert positions(impl.tokenize(data)) == [
        ("Domain", 1, 1), ("x", 1, 8), ("{", 1, 10),
        ("Routes", 2, 3), ("=", 2, 10), ("(", 2, 12), ("y", 2, 14), (")", 2, 18),
        ("}", 3, 2),
    ]


def test_positions_after_multiline_block_comment(impl):
    data = b"a /* one\n two\n  three */ b\nc /*\n*/d"
    assert positions(impl.tokenize(data)) == [("a", 1, 1), ("b", 3, 12), ("c", 4, 1), ("d", 5, 3)]


def test_positions_with_crlf_line_endings(impl):
    data = b"Domain x {\r\n  max = 5\r\n}\r\n\r\ny"
    assert positions(impl.tokenize(data)) == [
        ("Domain", 1, 1), ("x", 1, 8), ("{", 1, 10),
        ("max", 2, 3), ("=", 2, 7), ("5", 2, 9),
        ("}", 3, 1), ("y", 5, 1),
    ]


def test_lone_cr_is_not_a_line_end(impl):
    assert positions(impl.tokenize(b"a\rb")) == [("a", 1, 1), ("b", 1, 3)]


def test_columns_count_bytes(impl):
    assert positions(impl.tokenize('"é" ü x'.encode())) == [("é", 1, 1), ("ü", 1, 6), ("x", 1, 9)]


def test_many_lines_and_long_lines(impl):
    tokens = impl.tokenize(b"word\n" * 1000 + b" " * 300 + b"x")
    assert [(line, col) for *_, line, col in tokens] == [(n, 1) for n in range(1, 1001)] + [(1001, 301)]
    assert {text for _, text, *_ in tokens} == {"word", "x"}


def test_many_distinct_texts_of_one_length(impl):
    # Enough same-length words and strings that any text cache must meet collisions and reuse.
    words = [f"w{i:05d}" for i in range(20000)] + [f"{i:06d}" for i in range(0, 20000, 7)]
    data = " ".join(words).encode() + b"\n" + b" ".join(b'"%s"' % w.encode() for w in reversed(words))
    tokens = impl.tokenize(data)
    assert [text for _, text, *_ in tokens] == words + words[::-1]
    assert [kind for kind, *_ in tokens[: len(words)]] == [
        T.NUMBER if w.isdigit() else T.WORD for w in words
    ]


# -- NUMBER vs WORD ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("8080", T.NUMBER),
        ("0", T.NUMBER),
        ("007", T.NUMBER),
        ("10s", T.WORD),
        ("20m", T.WORD),
        ("-1", T.WORD),
        ("1.5", T.WORD),
        ("10.10.10.50", T.WORD),
        ("[::1]", T.WORD),
        ("[2001:db8::1]:25", T.WORD),
        ("smtp://10.0.0.1?pref", T.WORD),
        ("__mx__", T.WORD),
        ("/var/spool/x", T.WORD),
        ("ESMTP", T.WORD),
        ("\u0661\u0662", T.WORD),  # Arabic-Indic digits are not ASCII digits
        ("a\\b", T.WORD),
    ],
)
def test_number_or_word(impl, text, kind):
    assert impl.tokenize(text.encode()) == [(kind, text, "<string>", 1, 1)]


def test_bare_url_splits_at_equals(impl):
    # Unquoted, '=' ends a word; conf files quote such routes (see test_seed_routes).
    assert kt(impl.tokenize(b"smtp://10.0.0.1?pref=10&ttl=300&type=mx")) == [
        (T.WORD, "smtp://10.0.0.1?pref"), (T.EQUALS, "="), (T.WORD, "10&ttl"), (T.EQUALS, "="),
        (T.WORD, "300&type"), (T.EQUALS, "="), (T.WORD, "mx"),
    ]


def test_utf8_in_words_and_strings(impl):
    data = 'Domain zürich.例え.jp { X = "Réseau — 配信" }'.encode()
    assert kt(impl.tokenize(data)) == [
        (T.WORD, "Domain"), (T.WORD, "zürich.例え.jp"), (T.LBRACE, "{"), (T.WORD, "X"),
        (T.EQUALS, "="), (T.STRING, "Réseau — 配信"), (T.RBRACE, "}"),
    ]


# -- Momentum's forms (issue 9, part 4: "hash values `[ key = value ... ]`, used by many module
# and listener options; a string continued on the next line") ------------------------------------

L, R = (T.LBRACKET, "["), (T.RBRACKET, "]")


@pytest.mark.parametrize(("data", "expected"), [
    # modules/ac-auth.md, auth-ds.md: a hash on one line, and over several
    (b'AuthLoginParameters = [uri = "mysqlauth://"]',
     [(T.WORD, "AuthLoginParameters"), (T.EQUALS, "="), L, (T.WORD, "uri"), (T.EQUALS, "="),
      (T.STRING, "mysqlauth://"), R]),
    (b'AuthLoginParameters = [\n  uri = "ac_auth://"\n  log_authentication = "true"\n]\n',
     [(T.WORD, "AuthLoginParameters"), (T.EQUALS, "="), L, (T.WORD, "uri"), (T.EQUALS, "="),
      (T.STRING, "ac_auth://"), (T.WORD, "log_authentication"), (T.EQUALS, "="), (T.STRING, "true"), R]),
    # a bare value right before ']' (no space), keys that are numbers, strings and dotted words
    (b"m = [a = b]", [(T.WORD, "m"), (T.EQUALS, "="), L, (T.WORD, "a"), (T.EQUALS, "="), (T.WORD, "b"), R]),
    (b'code = [ 100 = "550 failed" "0" = "250 ok" ]',
     [(T.WORD, "code"), (T.EQUALS, "="), L, (T.NUMBER, "100"), (T.EQUALS, "="), (T.STRING, "550 failed"),
      (T.STRING, "0"), (T.EQUALS, "="), (T.STRING, "250 ok"), R]),
    (b'bits = [ 0.0.0.1 = "l1" ]',
     [(T.WORD, "bits"), (T.EQUALS, "="), L, (T.WORD, "0.0.0.1"), (T.EQUALS, "="), (T.STRING, "l1"), R]),
    (b"[] [[a]]", [L, R, L, L, (T.WORD, "a"), R, R]),
    # IPv6 literals stay words, at the start of a word or inside one, in a hash or a list
    (b"[::1] [2001:db8::1]:25 [fe80::1%eth0] smtp://[::1]:2525 x[y]z",
     [(T.WORD, "[::1]"), (T.WORD, "[2001:db8::1]:25"), (T.WORD, "[fe80::1%eth0]"), (T.WORD, "smtp://[::1]:2525"),
      (T.WORD, "x[y]z")]),
    (b"h = [ip = [::1]]", [(T.WORD, "h"), (T.EQUALS, "="), L, (T.WORD, "ip"), (T.EQUALS, "="), (T.WORD, "[::1]"), R]),
    (b"( [::1] 10.0.0.1 )", [(T.LPAREN, "("), (T.WORD, "[::1]"), (T.WORD, "10.0.0.1"), (T.RPAREN, ")")]),
    # brackets that are not an IPv6 literal: no ':' inside, a space, or no ']'
    (b"[a] [1.2] [:: 1] [::1", [L, (T.WORD, "a"), R, L, (T.WORD, "1.2"), R, L, (T.WORD, "::"), (T.NUMBER, "1"), R,
                                L, (T.WORD, "::1")]),
    # a ']' that closes nothing ends a word
    (b"a]b", [(T.WORD, "a"), R, (T.WORD, "b")]),
    # Momentum's `Name = { ... }` is plain tokens
    (b"ESMTP_Listener = {", [(T.WORD, "ESMTP_Listener"), (T.EQUALS, "="), (T.LBRACE, "{")]),
])
def test_hash_brackets(impl, data, expected):
    assert kt(impl.tokenize(data)) == expected


@pytest.mark.parametrize(("data", "text"), [
    # modules/auth-ds.md: query = "SELECT ... and\n          password = encrypt(:pass, PASSWORD)"
    (b'"SELECT 1 AS ALLOW FROM users WHERE user_name = :user and\n          password = encrypt(:pass, PASSWORD)"',
     "SELECT 1 AS ALLOW FROM users WHERE user_name = :user and\n          password = encrypt(:pass, PASSWORD)"),
    (b'"a\r\nb"', "a\r\nb"),  # the line break as written
    (b'"a\n\n\nb"', "a\n\n\nb"),
    (b'"a\\\nb"', "a\\\nb"),  # a backslash before a line break is kept, and so is the break
    (b'"a\\n\nb\\t"', "a\n\nb\t"),  # escapes on either side of a real line break
    ('"Réseau\n配信"'.encode(), "Réseau\n配信"),
])
def test_string_continued_on_the_next_line(impl, data, text):
    assert kt(impl.tokenize(data)) == [(T.STRING, text)]


def test_positions_after_a_string_over_several_lines(impl):
    data = b'q = "one\n  two\n  three" x\n  y = [ k = "a\r\nb" ] z\n"'
    with pytest.raises(ConfigError):
        impl.tokenize(data)
    assert positions(impl.tokenize(data[:-1])) == [
        ("q", 1, 1), ("=", 1, 3), ("one\n  two\n  three", 1, 5), ("x", 3, 10),
        ("y", 4, 3), ("=", 4, 5), ("[", 4, 7), ("k", 4, 9), ("=", 4, 11), ("a\r\nb", 4, 13), ("]", 5, 4),
        ("z", 5, 6),
    ]


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "line", "col", "message"),
    [
        # control bytes outside comments
        (b"\x00", 1, 1, control(0x00)),
        (b"ab\x01cd", 1, 3, control(0x01)),
        (b"x = \x7f", 1, 5, control(0x7F)),
        (b"a\r\n  \x1b", 2, 3, control(0x1B)),
        (b'x "ab\x02c"', 1, 6, control(0x02)),
        (b'"a\\\x00"', 1, 4, control(0x00)),  # an escape does not hide a control byte
        (b"\x01 \x02", 1, 1, control(0x01)),  # first error only
        (b"/* ok */\x1f", 1, 9, control(0x1F)),
        (b"a\x08", 1, 2, control(0x08)),
        # unterminated strings
        (b'x = "abc', 1, 5, UNTERMINATED_STRING),
        (b'"abc\n', 1, 1, UNTERMINATED_STRING),  # a string may cross lines, not the end of the file
        (b'"abc\r\n  x = 1\n', 1, 1, UNTERMINATED_STRING),
        (b'a\n\n  "abc\\"', 3, 3, UNTERMINATED_STRING),  # the last quote is escaped
        (b'"abc\\\ndef', 1, 1, UNTERMINATED_STRING),
        # a string after one that crossed lines: the message points back at that one
        (b'x = "a\nb"\ny = "c', 3, 5, UNTERMINATED_STRING + " (the string opened at 1:5 runs over several "
                                                        "lines; is its closing '\"' missing?)"),
        (b'g = "x\n  r = "y"\n', 2, 9, UNTERMINATED_STRING + " (the string opened at 1:5 runs over several "
                                                          "lines; is its closing '\"' missing?)"),
        (b'"a" "b"\n"c', 2, 1, UNTERMINATED_STRING),  # no earlier string crossed a line
        # a control byte on a later line of a string is reported where it is
        (b'q = "one\n  two\x01"', 2, 6, control(0x01)),
        (b'q = "one\r\n\x7f"', 2, 1, control(0x7F)),
        (b'"\\', 1, 1, UNTERMINATED_STRING),
        (b'"', 1, 1, UNTERMINATED_STRING),
        # unterminated comments
        (b"a /* b", 1, 3, UNTERMINATED_COMMENT),
        (b"/*/", 1, 1, UNTERMINATED_COMMENT),
        (b"/*", 1, 1, UNTERMINATED_COMMENT),
        (b"a\n  /* x\n y * / z", 2, 3, UNTERMINATED_COMMENT),
        (b"/* one */\n x/* two *", 2, 3, UNTERMINATED_COMMENT),
        # invalid UTF-8, at the token's first byte
        (b"ab\xff", 1, 1, BAD_WORD),
        (b"ok\n  \xc3", 2, 3, BAD_WORD),
        (b"\xc0\xaf", 1, 1, BAD_WORD),  # overlong
        (b'x "\xe9t\xe9"', 1, 3, BAD_STRING),
        (b'"\xed\xa0\x80"', 1, 1, BAD_STRING),  # an encoded surrogate
        (b'"a\\n\xff"', 1, 1, BAD_STRING),  # escaped string
        # a token is scanned to its end before it is decoded
        (b'"\xff\x01"', 1, 3, control(0x01)),
        (b'"\xff', 1, 1, UNTERMINATED_STRING),
        (b"\xff\x01", 1, 2, control(0x01)),
        (b"\xff /*", 1, 1, BAD_WORD),  # but tokens are handled in order
    ],
)
def test_errors(impl, data, line, col, message):
    with pytest.raises(ConfigError) as info:
        impl.tokenize(data, "bad.conf")
    err = info.value
    assert (err.file, err.line, err.col, err.message) == ("bad.conf", line, col, message)
    assert err.args == ("bad.conf", line, col, message)
    assert str(err) == f"bad.conf:{line}:{col}: {message}"


def test_error_default_filename(impl):
    with pytest.raises(ConfigError) as info:
        impl.tokenize(b"\n\n /* x")
    assert str(info.value) == f"<string>:3:2: {UNTERMINATED_COMMENT}"


@pytest.mark.parametrize("data", [bytearray(b"a"), memoryview(b"a"), "a", None, 1])
def test_only_bytes_accepted(impl, data):
    with pytest.raises(TypeError) as info:
        impl.tokenize(data)
    assert str(info.value) == f"tokenize() expects bytes, got {type(data).__name__}"


def test_bytes_subclass_accepted(impl):
    class B(bytes):
        pass

    assert impl.tokenize(B(b"x 1")) == [(T.WORD, "x", "<string>", 1, 1), (T.NUMBER, "1", "<string>", 1, 3)]


def test_filename_passed_through(impl):
    class Name(str):
        pass

    name = Name("sub.conf")
    tokens = impl.tokenize(b"a\nb", name)
    assert [tok[2] for tok in tokens] == [name, name]
    assert all(tok[2] is name for tok in tokens)


# -- real conf snippets (shared/seeds) -----------------------------------------------------------


def test_seed_xfer_domain(impl):
    data = (
        b'Domain xfer.test { reroute_domain = "disabled" Delivery_Response_Timeout = "10000"  # 10s\n'
        b' Routes = ( "xfer://10.10.10.10?port=8080" ) }'
    )
    assert impl.tokenize(data, "ecelerity.conf") == [
        (T.WORD, "Domain", "ecelerity.conf", 1, 1),
        (T.WORD, "xfer.test", "ecelerity.conf", 1, 8),
        (T.LBRACE, "{", "ecelerity.conf", 1, 18),
        (T.WORD, "reroute_domain", "ecelerity.conf", 1, 20),
        (T.EQUALS, "=", "ecelerity.conf", 1, 35),
        (T.STRING, "disabled", "ecelerity.conf", 1, 37),
        (T.WORD, "Delivery_Response_Timeout", "ecelerity.conf", 1, 48),
        (T.EQUALS, "=", "ecelerity.conf", 1, 74),
        (T.STRING, "10000", "ecelerity.conf", 1, 76),
        (T.WORD, "Routes", "ecelerity.conf", 2, 2),
        (T.EQUALS, "=", "ecelerity.conf", 2, 9),
        (T.LPAREN, "(", "ecelerity.conf", 2, 11),
        (T.STRING, "xfer://10.10.10.10?port=8080", "ecelerity.conf", 2, 13),
        (T.RPAREN, ")", "ecelerity.conf", 2, 44),
        (T.RBRACE, "}", "ecelerity.conf", 2, 46),
    ]


def test_seed_scriptlet(impl):
    data = b'scriptlet "scriptlet" {\n  # load the XFER server module\n  script xfer_server {\n' \
           b'    source = "msys.xfer.server"\n  }\n}\n'
    assert impl.tokenize(data) == [
        (T.WORD, "scriptlet", "<string>", 1, 1),
        (T.STRING, "scriptlet", "<string>", 1, 11),
        (T.LBRACE, "{", "<string>", 1, 23),
        (T.WORD, "script", "<string>", 3, 3),
        (T.WORD, "xfer_server", "<string>", 3, 10),
        (T.LBRACE, "{", "<string>", 3, 22),
        (T.WORD, "source", "<string>", 4, 5),
        (T.EQUALS, "=", "<string>", 4, 12),
        (T.STRING, "msys.xfer.server", "<string>", 4, 14),
        (T.RBRACE, "}", "<string>", 5, 3),
        (T.RBRACE, "}", "<string>", 6, 1),
    ]


def test_seed_http_listener(impl):
    assert kt(impl.tokenize(b'HTTP_Listener {\n  Listen ":8080" {}\n}\n')) == [
        (T.WORD, "HTTP_Listener"), (T.LBRACE, "{"), (T.WORD, "Listen"), (T.STRING, ":8080"),
        (T.LBRACE, "{"), (T.RBRACE, "}"), (T.RBRACE, "}"),
    ]


def test_seed_routes(impl):
    assert kt(impl.tokenize(b'Routes = ( "smtp://my.local.smart.host?pref=1" "__mx__" )')) == [
        (T.WORD, "Routes"), (T.EQUALS, "="), (T.LPAREN, "("),
        (T.STRING, "smtp://my.local.smart.host?pref=1"), (T.STRING, "__mx__"), (T.RPAREN, ")"),
    ]


def test_seed_gateway(impl):
    data = b"# route all mail to a \"smart host\"\nGateway = 10.10.10.50\n\nDomain local.example.com {\n" \
           b"  Gateway = 10.10.10.20\n  Delivery_Method = LMTP\n}\n"
    assert positions(impl.tokenize(data)) == [
        ("Gateway", 2, 1), ("=", 2, 9), ("10.10.10.50", 2, 11),
        ("Domain", 4, 1), ("local.example.com", 4, 8), ("{", 4, 26),
        ("Gateway", 5, 3), ("=", 5, 11), ("10.10.10.20", 5, 13),
        ("Delivery_Method", 6, 3), ("=", 6, 19), ("LMTP", 6, 21),
        ("}", 7, 1),
    ]


# -- the two implementations agree ---------------------------------------------------------------


def _outcome(tokenize, data: bytes):
    try:
        return ("tokens", tokenize(data, "prop.conf"))
    except ConfigError as err:
        return ("error", err.args)


def _compiled_tokenize():
    compiled = _impl.compiled()
    return None if compiled is None else compiled.tokenize


_CLEAN_FRAGMENTS = [
    b"Domain", b"Routes", b"x", b"10", b"8080", b"10.0.0.1", b"[::1]", b"__mx__", b"smtp://h?p=1",
    b"[", b"]", b"[::1]:25", b"[fe80::1%eth0]", b"[a", b":", b"%", b"smtp://[::1]", b'"\n"', b'"a\r\nb"',
    b" ", b"  ", b"\t", b"\n", b"\r\n", b"\r", b"\x0b", b"\x0c",
    b'"', b'"', b"\\", b"\\\\", b'\\"', b"\\n", b"\\t", b"\\r", b"\\q",
    b"{", b"}", b"(", b")", b"=", b"#", b"/*", b"*/", b"/", b"*", "é".encode(), "配".encode(),
]
# Bytes the spec rejects outside comments: control bytes and broken UTF-8.
_NASTY_FRAGMENTS = [b"\x00", b"\x01", b"\x1f", b"\x7f", b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80"]

# Mostly clean fragments, so that many examples get past the first error and compare real tokens.
conf_like = st.lists(
    st.one_of(st.sampled_from(_CLEAN_FRAGMENTS), st.sampled_from(_CLEAN_FRAGMENTS + _NASTY_FRAGMENTS)),
    max_size=40,
).map(b"".join)


@pytest.mark.needs_compiled
class TestTwinAgreement:
    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=300))
    def test_arbitrary_bytes(self, data):
        assert _outcome(_compiled_tokenize(), data) == _outcome(_impl.PY.tokenize, data)

    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(conf_like)
    def test_conf_like_text(self, data):
        assert _outcome(_compiled_tokenize(), data) == _outcome(_impl.PY.tokenize, data)

    @settings(max_examples=500, deadline=None)
    @given(st.lists(conf_like.filter(lambda d: b"\n" not in d), min_size=1, max_size=8))
    def test_agreement_line_by_line(self, lines):
        # Joined lines put errors and tokens on later lines, checking line/col bookkeeping.
        data = b"\n".join(lines)
        assert _outcome(_compiled_tokenize(), data) == _outcome(_impl.PY.tokenize, data)
