"""Outbound TLS values as Momentum writes them (TLS, TLS_Verify, TLS_Ifavailable_Fallback), against
real TLS sinks on loopback; a policy refusal is marked as the destination's, not the host's."""

from __future__ import annotations

import dataclasses
import ssl

import pytest

from fastrelay.config import loads
from fastrelay.config.errors import ConfigErrors
from fastrelay.delivery import ConnectError, Hop, Settings
from fastrelay.delivery.connect import connect
from fastrelay.queue import delivery_settings
from tests.support import Sink, free_port, tls_pair

FAST = Settings(helo_name="relay.test", connect_timeout=0.5, greeting_timeout=0.5, ehlo_timeout=0.5,
                tls_timeout=2.0, mail_timeout=0.5, rcpt_timeout=0.5, data_timeout=0.5, done_timeout=0.5,
                rset_timeout=0.5)


@pytest.mark.parametrize(("conf", "tls", "verify", "fallback"), [
    ("", "ifavailable", "no", True),
    ("TLS = no", "no", "no", True),
    ("TLS = disabled", "no", "no", True),  # the old spelling stays an alias
    ("TLS = ifavailable\nTLS_Verify = ca", "ifavailable", "ca", True),
    ("TLS = required\nTLS_Verify = host", "required", "host", True),
    ("TLS = Required\nTLS_Verify = true", "required", "host", True),  # booleans: true means host
    ("TLS_Verify = false\nTLS_Ifavailable_Fallback = false", "ifavailable", "no", False),
    ("TLS_Verify = yes", "ifavailable", "host", True),
    ("Domain d.test { TLS = required TLS_Verify = ca TLS_Ifavailable_Fallback = no }", "required", "ca", False),
])
def test_momentum_tls_values(conf, tls, verify, fallback):
    """Momentum's TLS: "no", "ifavailable", "required"; TLS_Verify: "no", "ca", "host";
    TLS_Ifavailable_Fallback: true/false."""
    s = delivery_settings(loads(conf + "\n"), "d.test", "default", "relay.test")
    assert (s.tls, s.tls_verify, s.tls_fallback) == (tls, verify, fallback)


@pytest.mark.parametrize("bad", ["TLS = maybe", "TLS_Verify = optional", "TLS_Verify = 2"])
def test_bad_tls_values_are_config_errors(bad):
    with pytest.raises(ConfigErrors, match=r"<string>:1:\d+: bad value for 'TLS(_Verify)?'.*expected one of"):
        loads(bad + "\n")


# (TLS, TLS_Verify, fallback, names on the sink's certificate, STARTTLS hidden, outcome)
# outcome: "tls", "plain", or the enhanced code of a policy ConnectError.
_ROWS = [
    ("no", "host", True, None, False, "plain"),
    ("ifavailable", "no", True, None, False, "tls"),
    ("required", "ca", True, ("other.example",), False, "tls"),  # ca: any name, trusted CA
    ("required", "host", True, None, False, "tls"),
    ("required", "host", True, ("other.example",), False, "4.7.5"),  # host: the name must match
    ("ifavailable", "host", True, ("other.example",), False, "plain"),  # fallback: plaintext at once
    ("ifavailable", "host", False, ("other.example",), False, "4.7.5"),  # no fallback: defer
    ("required", "no", True, None, True, "4.7.4"),
    ("ifavailable", "no", False, None, True, "plain"),  # not offered is not a failed negotiation
]


@pytest.mark.parametrize(("tls", "verify", "fallback", "names", "hidden", "outcome"), _ROWS)
async def test_tls_policy_outcomes(tmp_path, tls, verify, fallback, names, hidden, outcome):
    """Momentum's TLS_Verify: "host - In addition to requiring that the certificate be signed by
    a valid certificate authority, the common name presented in the certificate must either
    exactly match the domain or mail exchange to which we are connected"; TLS_Ifavailable_Fallback
    "false - The message is put back into the delayed queue and retried later"."""
    pair = tls_pair(*(names or ()))
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pair.ca_pem)
    s = dataclasses.replace(FAST, tls=tls, tls_verify=verify, tls_fallback=fallback, tls_ca=str(ca))
    async with Sink(host="127.0.0.6", tls_context=pair.server) as sink:
        if hidden:
            sink.faults.hide.add("STARTTLS")
        hop = Hop(sink.host, sink.port, "smtp", "sink.test", 10)
        if outcome in ("tls", "plain"):
            conn = await connect(hop, s)
            try:
                assert conn.tls is (outcome == "tls")
                assert ("STARTTLS" in sink.sessions[-1].commands) is (outcome == "tls")
            finally:
                await conn.close()
        else:
            with pytest.raises(ConnectError) as e:
                await connect(hop, s)
            assert e.value.code == 451 and e.value.text.startswith(outcome)
            # The destination's policy refused a working host: not the host's failure.
            assert e.value.policy is True


async def test_a_dead_host_is_not_a_policy_failure():
    port = free_port("127.0.0.4")
    with pytest.raises(ConnectError) as e:
        await connect(Hop("127.0.0.4", port, "smtp", "x.test", 10), dataclasses.replace(FAST, tls="required"))
    assert e.value.policy is False


@pytest.mark.parametrize("where", ["global", "Domain d.test", "Binding default", "Binding_Group g",
                                   "Binding default::Domain d.test"])
def test_an_outbound_client_certificate_in_momentums_scopes(tmp_path, where):
    """Issue 15: "Scopes Momentum documents and fastrelay refuses: ... `TLS_Certificate` and
    `TLS_Key` in Binding and Domain"."""
    opts = 'TLS_Certificate = "client.pem"\nTLS_Key = "client.key"\n'
    conf = {"global": opts, "Domain d.test": f"Domain d.test {{\n{opts}}}\n",
            "Binding default": f"Binding default {{\n{opts}}}\n",
            "Binding_Group g": f"Binding_Group g {{\nBinding default {{ }}\n{opts}}}\n",
            "Binding default::Domain d.test": f"Binding default {{\nDomain d.test {{\n{opts}}}\n}}\n"}[where]
    cfg = loads(conf, str(tmp_path / "relay.conf"))
    s = delivery_settings(cfg, "d.test", "default", "relay.test")
    assert (s.tls_cert, s.tls_key) == (str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
    other = delivery_settings(cfg, "e.test", "other", "relay.test")
    assert (other.tls_cert is None) is (where != "global")


@pytest.mark.parametrize("present", [True, False])
async def test_the_client_certificate_is_presented_to_a_next_hop_that_requires_one(tmp_path, present):
    pair = tls_pair()
    pair.server.verify_mode = ssl.CERT_REQUIRED  # the sink takes only clients with a certificate of its CA
    pair.ca.configure_trust(pair.server)
    client = pair.ca.issue_cert("relay.test")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    s = dataclasses.replace(FAST, tls="required", tls_verify="no",
                            tls_cert=str(cert) if present else None, tls_key=str(key) if present else None)
    async with Sink(host="127.0.0.6", tls_context=pair.server) as sink:
        hop = Hop(sink.host, sink.port, "smtp", "sink.test", 10)
        if present:
            conn = await connect(hop, s)
            try:
                assert conn.tls is True
            finally:
                await conn.close()
        else:
            with pytest.raises(ConnectError) as e:
                await connect(hop, s)
            # TLS 1.3: the server refuses the missing certificate after the client's side of the
            # handshake is done, so the client sees the handshake fail or the connection drop.
            assert e.value.code == 451, e.value


def test_a_client_certificate_without_its_key_is_an_error(tmp_path):
    from fastrelay.config.model import check_runnable

    cfg = loads('Domain d.test {\n  TLS_Certificate = "c.pem"\n}\nESMTP_Listener { Listen "127.0.0.1:0" { } }\n',
                "t.conf")
    errors, _ = check_runnable(cfg)
    assert [str(e) for e in errors] == [
        "t.conf:2:3: TLS_Certificate is set in Domain d.test without TLS_Key; expected both, for the client "
        "certificate presented outbound"]
