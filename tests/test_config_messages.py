"""Conf errors a newcomer can act on: invisible characters named, errors at the right place, only
the stanzas valid where the error is offered; and Momentum's Listen wildcards and readonly_include."""

from __future__ import annotations

import pytest

from fastrelay.config import ConfigErrors, loads


def _errors(text: str | bytes, filename: str = "t.conf") -> list[str]:
    with pytest.raises(ConfigErrors) as ei:
        loads(text, filename)
    return [str(e) for e in ei.value.errors]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (b"\xef\xbb\xbfDomain a.test { }\n",
         "t.conf:1:1: unknown stanza '<U+FEFF>Domain' (it contains U+FEFF ZERO WIDTH NO-BREAK SPACE (a byte "
         "order mark), which does not show); did you mean 'Domain'?"),
        (b"\xef\xbb\xbfretry_interval = 5m\n",
         "t.conf:1:1: unknown option '<U+FEFF>retry_interval' (it contains U+FEFF ZERO WIDTH NO-BREAK SPACE (a "
         "byte order mark), which does not show); did you mean 'retry_interval'?"),
        ("Domain a.test {\n  retry\u00a0interval = 5m\n}\n".encode(),
         "t.conf:2:3: unknown option 'retry<U+00A0>interval' (it contains U+00A0 NO-BREAK SPACE, which does not "
         "show); did you mean 'retry_interval'?"),
        ("max_retries\u200b = 3\n".encode(),
         "t.conf:1:1: unknown option 'max_retries<U+200B>' (it contains U+200B ZERO WIDTH SPACE, which does not "
         "show); did you mean 'max_retries'?"),
    ],
)
def test_invisible_characters_are_named(conf_impl, text, error):
    """Issue 15: "a UTF-8 BOM or a no-break space inside a name is shown as U+FEFF or U+00A0, not as
    a name that looks right"."""
    assert _errors(text) == [error]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("retry_interval = 5 minutes\n",
         "t.conf:1:20: unexpected 'minutes' after retry_interval = 5; expected one value per option "),
        ("retry_interval = 5 minutes\nmax_retries = 3\n",
         "t.conf:1:20: unexpected 'minutes' after retry_interval = 5; "),
        ("Domain a.test {\n  message_expiration = 3 days\n}\nDomain b.test { }\n",
         "t.conf:2:26: unexpected 'days' after message_expiration = 3; "),
    ],
)
def test_a_value_that_goes_on_is_reported_at_its_line(conf_impl, text, error):
    """Issue 15: "`retry_interval = 5 minutes` is reported at the value's line, not at the end of the file"."""
    (got,) = _errors(text)
    assert got.startswith(error), got


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("Bogus x { }\n",
         "t.conf:1:1: unknown stanza 'Bogus'; expected one of the stanzas valid in the global scope: Domain, "
         "Binding_Group, Binding, Host, ESMTP_Listener, HTTP_Listener, scriptlet, Security, EventLoop, Admin_Listener"),
        ("Domain a.test {\n  Hots x { }\n}\n",
         "t.conf:2:3: unknown stanza 'Hots'; a Domain stanza holds no stanzas, only options"),
        ("ESMTP_Listener {\n  Lisen \"127.0.0.1:25\" { }\n  Listen \"127.0.0.1:26\" { }\n}\n",
         "t.conf:2:3: unknown stanza 'Lisen'; did you mean 'Listen'?"),
        ("ESMTP_Listener {\n  Bogus x { }\n  Listen \"127.0.0.1:26\" { }\n}\n",
         "t.conf:2:3: unknown stanza 'Bogus'; expected one of the stanzas valid in an ESMTP_Listener stanza: Listen"),
        ("Binding b1 {\n  Bogus x { }\n}\n",
         "t.conf:2:3: unknown stanza 'Bogus'; expected one of the stanzas valid in a Binding stanza: Domain, Host"),
    ],
)
def test_unknown_stanza_offers_only_what_is_valid_there(conf_impl, text, error):
    """Issue 15: "The unknown-stanza list offers only stanzas valid where the error is"."""
    assert _errors(text) == [error]


@pytest.mark.parametrize(
    ("listen", "address"),
    [('"*:25"', ":25"), ('"[*]:25"', ":25"), ('":25"', ":25"), ('"127.0.0.1:25"', "127.0.0.1:25"),
     ('"[::1]:2525"', "[::1]:2525")],
)
def test_listen_wildcards(conf_impl, listen, address):
    """Issue 15: "support `Listen "*:25"` and `"[*]:25"` wildcards"."""
    cfg = loads(f"ESMTP_Listener {{\n  Listen {listen} {{ }}\n}}\nHTTP_Listener {{\n  Listen {listen} {{ }}\n}}\n",
                "t.conf")
    assert [str(x.address) for x in cfg.esmtp_listens + cfg.http_listens] == [address, address]


def test_readonly_include(conf_impl, tmp_path):
    """Issue 15: "and `readonly_include`": read as include is."""
    (tmp_path / "domains.conf").write_text("Domain a.test {\n  retry_interval = 5m\n}\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.conf").write_text("Domain b.test { max_retries = 2 }\n")
    main = tmp_path / "main.conf"
    main.write_text('readonly_include "domains.conf"\nreadonly_include "d"\n')
    cfg = loads(main.read_bytes(), str(main))
    assert (cfg.get("retry_interval", "a.test"), cfg.get("max_retries", "b.test")) == (300.0, 2)
    main.write_text('readonly_include "missing.conf"\n')
    assert _errors(main.read_bytes(), str(main)) == [
        f"{main}:1:18: cannot include 'missing.conf': no such file or directory; expected an existing path"]
