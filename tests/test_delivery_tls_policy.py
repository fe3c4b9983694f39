"""Outbound TLS values as Momentum writes them (TLS, TLS_Verify, TLS_Ifavailable_Fallback), against
real TLS sinks on loopback; a policy refusal is marked as the destination's, not the host's."""

from __future__ import annotations

import dataclasses

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
