"""MTA-STS (RFC 8461) policy text, TXT records and MX patterns, values in and results out."""

from __future__ import annotations

import pytest

from fastrelay.mta_sts import Policy, PolicyError, matches, parse_policy, parse_txt


@pytest.mark.parametrize("pattern,host,ok", [
    ("mx.example.com", "mx.example.com", True),
    ("mx.example.com", "MX.Example.com.", True),
    ("*.example.com", "mx.example.com", True),
    ("*.example.com", "a.b.example.com", False),  # §4.1: exactly one label
    ("*.example.com", "example.com", False),
    ("mx.example.com", "mx2.example.com", False),
])
def test_matches(pattern, host, ok):
    assert matches(pattern, host) is ok


@pytest.mark.parametrize("records,want", [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),
    (["v=STSv1; id=a", "v=STSv1; id=b"], None),  # §3.1: more than one is no policy
    (["v=STSv1;"], None),
    (["v=STSv1; id=not-alnum!"], None),
    ([], None),
])
def test_parse_txt(records, want):
    assert parse_txt(records) == want


def test_parse_policy():
    p = parse_policy("version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
                     "max_age: 604800\r\nextension: ignored\r\n")
    assert p == Policy("enforce", ("mail.example.com", "*.example.net"), 604800)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 99999999999\n".replace("99999999999", "9999999999")
                        ).max_age == 31_557_600


@pytest.mark.parametrize("text", [
    "mode: enforce\nmx: a\nmax_age: 1\n",
    "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
    "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmx: a\n",
    "version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n",
    "<html>\n",
])
def test_bad_policies(text):
    with pytest.raises(PolicyError):
        parse_policy(text)
