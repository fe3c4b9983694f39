"""XCLIENT against a real Postfix smtpd (issue #10: "Test against a real Postfix smtpd
(smtpd_authorized_xclient_hosts) as well as a sink. Postfix's log or received header must show
the original client's address")."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from tests.e2e.conftest import drained, records
from tests.support.postfix_smtpd import Postfix


@pytest.fixture
def postfix():
    # The relay binds 127.0.0.3; the test's client connects to the relay from 127.0.0.1.
    pf = Postfix(clients={"127.0.0.1/32": "REJECT 5.7.1 postfix saw client 127.0.0.1",
                          "127.0.0.3/32": "REJECT 5.7.1 postfix saw client 127.0.0.3"}).start()
    yield pf
    pf.stop()


async def _relay_one(h, rcpt):
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port, timeout=10, local_hostname="origin.example")
    await c.connect()
    try:
        await c.sendmail("", [rcpt], b"Subject: xclient\r\n\r\nhello\r\n")  # null sender: no DSN
    finally:
        await c.quit()


@pytest.mark.parametrize(("mode", "seen"), [("required", "127.0.0.1"), ("no", "127.0.0.3")])
async def test_postfix_sees_the_original_client(postfix, relay, mode, seen):
    h = await relay(f'Bind_Address = "127.0.0.3"\nXCLIENT = "{mode}"\n'
                    f'Domain pf.test {{ Routes = ( "smtp://{postfix.host}?port={postfix.port}" ) }}\n')
    await _relay_one(h, "x@pf.test")
    await drained(h, 20)
    (p,) = records(h, "P")
    assert f"postfix saw client {seen}" in p[10]
    for _ in range(50):  # postlogd writes asynchronously
        if f"RCPT from unknown[{seen}]" in postfix.log():
            break
        await asyncio.sleep(0.1)
    log = postfix.log()
    assert f"reject: RCPT from unknown[{seen}]" in log
    if mode == "required":
        assert "helo=<origin.example>" in log  # the original client's HELO name too
