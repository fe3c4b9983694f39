"""Issue 17 against real peers: fastrelay authenticating to a Postfix smtpd whose SASL is Dovecot's
(smtpd_sasl_type = dovecot), and Postfix as a client relaying through fastrelay with
smtp_sasl_auth_enable and a password map."""

from __future__ import annotations

import asyncio
import smtplib
import time

import pytest
import trustme

from fastrelay.smtp.auth import PasswordFile
from tests.support import Sink, free_port
from tests.support.postfix import Dovecot, Postfix, missing
from tests.support.relay import RelayHarness

BODY = b"From: a@example.com\r\nSubject: through postfix\r\n\r\nhello\r\n"


@pytest.fixture
def peers_present():
    why = missing()
    assert why is None, why  # CI installs and runs as root (.ci/peers); fail with instructions


def recs(h: RelayHarness, kind: str) -> list[list[str]]:
    return [f for f in h.mainlog() if f[1] == kind]


async def wait_for(pred, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        await asyncio.sleep(0.1)


async def test_fastrelay_authenticates_to_postfix_with_dovecot_sasl(tmp_path, peers_present):
    """"fastrelay authenticating to a real Postfix smtpd whose SASL is Dovecot's (smtpd_sasl_type =
    dovecot)": a wrong password is a deferral with Postfix's reason in the mainlog, the right one
    (from outbound_smtp_auth_pass_file) is delivered through Postfix to its relayhost."""
    ca = trustme.CA()
    async with Sink("127.0.0.3") as sink:
        dove = Dovecot({"relay-user": "relay-pass"})
        pf_port = free_port("127.0.0.5")
        pem = dove.dir / "postfix.pem"
        ca.issue_cert("postfix.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
        pf = Postfix("127.0.0.5", pf_port, {
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": str(dove.socket),
            "smtpd_tls_chain_files": str(pem),
            "smtpd_tls_security_level": "may",
            "smtpd_tls_auth_only": "yes",
            "mynetworks": "192.0.2.0/24",  # not loopback: only SASL lets fastrelay relay
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
            "relayhost": f"[127.0.0.3]:{sink.port}",
        })
        try:
            await asyncio.to_thread(dove.start)
            await asyncio.to_thread(pf.start)
            (tmp_path / "pw").write_text("relay-pass\n")
            route = f'Routes = ( "smtp://127.0.0.5?port={pf_port}" )'
            conf = (f'Prohibited_Hosts = ( "0.0.0.0/8" )\nretry_interval = 60\n'
                    f'Domain bad.test {{ {route}\n outbound_smtp_auth_user = "relay-user"\n'
                    f' outbound_smtp_auth_pass = "wrong" }}\n'
                    f'Domain far.test {{ {route}\n outbound_smtp_auth_type = "LOGIN"\n'
                    f' outbound_smtp_auth_user = "relay-user"\n outbound_smtp_auth_pass_file = "pw" }}\n')
            async with RelayHarness(tmp_path, conf) as h:
                def send(rcpt: str) -> None:
                    with smtplib.SMTP("127.0.0.1", h.port, timeout=20) as s:
                        s.sendmail("a@example.com", [rcpt], BODY)

                await asyncio.to_thread(send, "u@bad.test")
                await wait_for(lambda: recs(h, "T"))
                [t] = recs(h, "T")
                assert t[3] == "u@bad.test" and "535 5.7.8 Error: authentication failed" in t[-1], t
                await asyncio.to_thread(send, "u@far.test")
                await wait_for(lambda: recs(h, "D"))
                [d] = recs(h, "D")
                assert d[3] == "u@far.test" and d[-3] == f"127.0.0.5:{pf_port}", d  # then the response and tls=
                await wait_for(lambda: sink.messages)
            assert [m.rcpt_tos for m in sink.messages] == [["u@far.test"]]
            log = pf.wait_log("sasl_method=LOGIN, sasl_username=relay-user")
            # The session that delivered: STARTTLS, then AUTH (smtpd_tls_auth_only), then the message.
            assert "ehlo=2 starttls=1 auth=1 mail=1 rcpt=1 data=1 quit=1" in log
        finally:
            await asyncio.to_thread(pf.stop)
            await asyncio.to_thread(dove.stop)


async def test_postfix_relays_through_fastrelay_with_smtp_sasl_auth(tmp_path, peers_present):
    """"Postfix as a client relaying through fastrelay with smtp_sasl_auth_enable and a password
    map": Postfix's smtp client (Cyrus SASL) authenticates under STARTTLS, and fastrelay, which does
    not list 127.0.0.1 in relay_hosts, relays for it and records the user."""
    ca = trustme.CA()
    ca.issue_cert("relay.test", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
    PasswordFile(str(tmp_path / "passwd")).set("pf-client", "pf:secret")
    conf = ('suspend_delivery = 1\nrelay_hosts = ( "10.99.0.0/16" )\n'
            'TLS_Certificate = "relay.pem"\nTLS_Key = "relay.pem"\n'
            'Enable_Authentication = true\nAuthPlainParameters = "file://passwd"\n'
            'AuthLoginParameters = "file://passwd"\n')
    async with RelayHarness(tmp_path, conf) as h:
        pf_port = free_port("127.0.0.5")
        pf = Postfix("127.0.0.5", pf_port, {
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "relayhost": f"[127.0.0.1]:{h.port}",
            "smtp_sasl_auth_enable": "yes",
            "smtp_sasl_password_maps": "static:pf-client:pf:secret",
            "smtp_sasl_security_options": "noanonymous",
            "smtp_sasl_tls_security_options": "noanonymous",
            "smtp_tls_security_level": "encrypt",
        })
        try:
            await asyncio.to_thread(pf.start)

            def submit() -> None:
                with smtplib.SMTP("127.0.0.5", pf_port, timeout=20) as s:
                    s.sendmail("a@example.com", ["bob@far.example"], BODY)

            await asyncio.to_thread(submit)
            await wait_for(lambda: recs(h, "R"))
            [r] = recs(h, "R")
            assert r[3] == "bob@far.example" and r[7] == "esmtpsa" and r[9] == "pf-client", r
            await asyncio.to_thread(pf.wait_log, "status=sent")
        finally:
            await asyncio.to_thread(pf.stop)
    spooled = await h.spooled()
    [(env, body)] = spooled
    assert env.meta["auth_user"] == "pf-client"
    assert b"by relay.test (fastrelay) with ESMTPSA id" in body
