"""Outbound TLS completion (Momentum 25.5, issue #10): a client certificate (TLS_Certificate,
TLS_Key), TLS_Protocols and TLS_Ciphers, against real TLS sinks; and the protocol and cipher that
the mainlog D record carries."""

from __future__ import annotations

import dataclasses
import ssl

import pytest

from fastrelay.config import loads
from fastrelay.delivery import OK, ConnectError, Hop, Settings
from fastrelay.delivery.connect import connect
from fastrelay.delivery.wire import protocol_range
from fastrelay.queue import delivery_settings
from tests.support import Sink, tls_pair

FAST = Settings(helo_name="relay.test", connect_timeout=2, greeting_timeout=2, ehlo_timeout=2, tls_timeout=3,
                mail_timeout=2, rcpt_timeout=2, data_timeout=2, done_timeout=2, rset_timeout=2, tls="required")


def _hop(sink):
    return Hop(sink.host, sink.port, "smtp", "sink.test", 10)


@pytest.fixture
def client_cert(tmp_path):
    """A client certificate from a CA of its own, as files (certificate + key in one, and apart)."""
    pair = tls_pair()
    leaf = pair.ca.issue_cert("relay.test")
    both = tmp_path / "client.pem"
    both.write_bytes(leaf.private_key_and_cert_chain_pem.bytes())
    cert = tmp_path / "cert.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key = tmp_path / "key.pem"
    key.write_bytes(leaf.private_key_pem.bytes())
    return pair, str(both), str(cert), str(key)


@pytest.mark.parametrize("separate_key", [False, True])
async def test_client_certificate_is_presented(client_cert, separate_key):
    """tls_certificate: "a PEM encoded certificate that Momentum should present to remote mail
    exchanges (it is a client certificate). The file may contain both a certificate and a key."
    The sink requires a client certificate from its CA: with one, mail goes out under TLS."""
    pair, both, cert, key = client_cert
    server = tls_pair().server
    server.verify_mode = ssl.CERT_REQUIRED
    pair.ca.configure_trust(server)
    s = dataclasses.replace(FAST, tls_cert=cert if separate_key else both, tls_key=key if separate_key else None)
    async with Sink(host="127.0.0.4", tls_context=server) as sink:
        conn = await connect(_hop(sink), s)
        try:
            (r,) = await conn.deliver("a@example.com", "", [("x@d.test", "")], b"Subject: t\r\n\r\nhi\r\n")
        finally:
            await conn.close()
        assert r.status == OK and conn.tls
        assert sink.messages[0].tls
        # Without the certificate the same sink does not take the mail.
        try:
            conn = await connect(_hop(sink), FAST)
        except ConnectError:
            pass
        else:
            try:
                (r,) = await conn.deliver("a@example.com", "", [("y@d.test", "")], b"Subject: t\r\n\r\nhi\r\n")
            finally:
                await conn.close()
            assert r.status != OK
        assert len(sink.messages) == 1


async def test_unreadable_client_certificate_is_a_policy_failure(tmp_path):
    s = dataclasses.replace(FAST, tls_cert=str(tmp_path / "missing.pem"))
    async with Sink(host="127.0.0.4", tls_context=tls_pair().server) as sink:
        with pytest.raises(ConnectError) as e:
            await connect(_hop(sink), s)
    assert e.value.policy and e.value.text.startswith("4.7.5 Cannot set up outbound TLS")


@pytest.mark.parametrize(("spec", "lo", "hi"), [
    ("+ALL", ssl.TLSVersion.SSLv3, ssl.TLSVersion.TLSv1_3),
    ("+ALL:-SSLv3:-TLSv1.0:-TLSv1.1", ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3),
    ("+TLSv1.2", ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2),
    ("+ALL:-TLSv1.3", ssl.TLSVersion.SSLv3, ssl.TLSVersion.TLSv1_2),
])
def test_protocol_range(spec, lo, hi):
    """tls_protocols: "`TLS_Protocols = "+ALL:-SSLv3:-TLSv1.0:-TLSv1.1"` ... leaving TLS 1.2 and
    TLS 1.3"."""
    assert protocol_range(spec) == (lo, hi)


@pytest.mark.parametrize(("protocols", "server_min", "outcome"), [
    ("+ALL:-SSLv3:-TLSv1.0:-TLSv1.1:-TLSv1.2", None, "TLSv1.3"),
    ("+TLSv1.2", None, "TLSv1.2"),
    ("+ALL:-TLSv1.3", ssl.TLSVersion.TLSv1_3, "4.7.5"),  # nothing in common: required defers
])
async def test_tls_protocols_decide_the_version(protocols, server_min, outcome):
    server = tls_pair().server
    if server_min is not None:
        server.minimum_version = server_min
    s = dataclasses.replace(FAST, tls_protocols=protocols)
    async with Sink(host="127.0.0.4", tls_context=server) as sink:
        if outcome.startswith("4."):
            with pytest.raises(ConnectError) as e:
                await connect(_hop(sink), s)
            assert e.value.text.startswith(outcome) and e.value.policy
            return
        conn = await connect(_hop(sink), s)
        try:
            assert conn.tls_info.split(":")[0] == outcome
        finally:
            await conn.close()


async def test_tls_ciphers_restrict_the_cipher():
    """tls_ciphers: the OpenSSL cipher list for TLS 1.2 and below."""
    wanted = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
    s = dataclasses.replace(FAST, tls_protocols="+TLSv1.2", tls_ciphers=wanted)
    async with Sink(host="127.0.0.4", tls_context=tls_pair().server) as sink:
        conn = await connect(_hop(sink), s)
        try:
            proto, cipher = conn.tls_info.split(":", 1)
        finally:
            await conn.close()
    assert proto == "TLSv1.2" and cipher in wanted.split(":")


def test_outbound_tls_options_in_every_scope(tmp_path):
    """tls_certificate, tls_protocols, tls_ciphers are valid in binding, binding_group, domain and
    global scope; a relative path is relative to the conf file."""
    conf = tmp_path / "r.conf"
    conf.write_text('TLS_Certificate = "g.pem"\n'
                    'Binding_Group grp { TLS_Protocols = "+TLSv1.2" Binding b { TLS_Certificate = "none" } }\n'
                    'Domain d.test { TLS_Ciphers = "HIGH:!aNULL" TLS_CA = "ca.pem" }\n')
    from fastrelay.config import load

    cfg = load(str(conf))
    s = delivery_settings(cfg, "d.test", "b", "h")
    assert (s.tls_cert, s.tls_protocols, s.tls_ciphers, s.tls_ca) == (
        "none", "+TLSv1.2", "HIGH:!aNULL", str(tmp_path / "ca.pem"))
    assert delivery_settings(cfg, "x.test", "default", "h").tls_cert == str(tmp_path / "g.pem")
    assert loads("TLS_Protocols = \"+ALL\"\n").get("TLS_Protocols") == "+ALL"


@pytest.mark.parametrize(("conf", "version"), [
    ('TLS_Protocols = "+TLSv1.2"\n', "TLSv1.2"),
    ('TLS_Protocols = "+ALL:-TLSv1.2"\n', "TLSv1.3"),
])
async def test_tls_protocols_for_the_listener_too(tmp_path, conf, version):
    """tls_protocols is valid in esmtp_listener and listen scope as well: STARTTLS here offers
    only those versions."""
    import trustme

    from tests.support import RawClient
    from tests.support.relay import RelayHarness

    ca = trustme.CA()
    ca.issue_cert("relay.test").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    h = RelayHarness(tmp_path, 'suspend_delivery = 1\nTLS_Certificate = "relay.pem"\nTLS_Key = "relay.pem"\n' + conf)
    async with h:
        async with await RawClient.connect("127.0.0.1", h.port) as c:
            await c.expect(220)
            await c.command("EHLO c")
            assert (await c.command("STARTTLS"))[0] == 220
            await c.starttls(client_ctx, server_hostname="relay.test")
            assert c.writer.get_extra_info("ssl_object").version() == version


async def test_a_cipher_list_that_matches_nothing_stops_the_start(tmp_path):
    import trustme

    from fastrelay.relay import StartupError
    from tests.support.relay import RelayHarness

    trustme.CA().issue_cert("relay.test").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
    h = RelayHarness(tmp_path, 'TLS_Certificate = "relay.pem"\nTLS_Key = "relay.pem"\nTLS_Ciphers = "NOSUCHCIPHER"\n')
    with pytest.raises(StartupError, match=r"ESMTP listener 127\.0\.0\.1:0: .*cipher"):
        await h.start()
    await h.relay.stop()
