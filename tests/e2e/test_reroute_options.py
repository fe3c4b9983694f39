"""reroute_domain: rerouted mail is retried, expired and delivered with the target domain's options."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from tests.e2e.conftest import body, drained, records, send

# Seed 000's shape: gmail mail goes through the synthetic domain xfer.test, whose options say how
# it is retried. Here the next hop is an SMTP sink, and gmail.test's own options would be slow.
CONF = """
Domain gmail.test {{
  reroute_domain = "xfer.test"
  retry_interval = 1h
  max_retry_interval = 1h
}}
Domain xfer.test {{
  reroute_domain = "disabled"
  delayed_reroute_domain = "disabled"
  Routes = ( "127.0.0.2" )
  {xfer}
}}
"""


@pytest.mark.parametrize("xfer, fault_times, expect", [
    # "retry xfer messages quicker": xfer.test's retry schedule, not gmail.test's hour.
    ("retry_interval = 1\n  max_retry_interval = 2", 2, "D"),
    # max_retries of xfer.test (gmail.test has no limit): bounced after the second attempt.
    ("retry_interval = 1\n  max_retry_interval = 1\n  max_retries = 1", None, "P:Too many delivery attempts"),
    # message_expiration of xfer.test (gmail.test keeps mail 5 days).
    ("retry_interval = 1\n  max_retry_interval = 1\n  message_expiration = 2", None, "P:Delivery time expired"),
], ids=["retry_interval", "max_retries", "message_expiration"])
async def test_rerouted_mail_takes_the_target_domains_options(dns, sinks, relay, xfer, fault_times, expect):
    """Seed 000: "retry xfer messages quicker" in `Domain xfer.test`, reached through
    `reroute_domain = "xfer.test"` on gmail.com."""
    (sink,) = await sinks(1)
    sink.faults.set("rcpt", reply="451 4.3.0 try later", times=fault_times)
    h = await relay(CONF.format(xfer=xfer))
    await send(h, ["someone@gmail.test"], body("rr1"), sender="")
    await drained(h, timeout=20)
    if expect == "D":
        (msg,) = await sink.wait_for(1, timeout=5)
        assert msg.rcpt_tos == ["someone@gmail.test"]
        assert len(records(h, "T")) == 2 and len(records(h, "D")) == 1
    else:
        (p,) = records(h, "P")
        assert expect[2:] in p[10]
        assert not sink.messages
    await asyncio.sleep(0)


def test_config_eval_says_the_reroute_decides(tmp_path):
    """`config eval --domain gmail.com max_retry_interval` says what the runtime uses and why."""
    f = tmp_path / "r.conf"
    f.write_text('Domain gmail.com {\n  reroute_domain = "xfer.test"\n  max_retry_interval = 1h\n}\n'
                 'Domain xfer.test {\n  reroute_domain = "disabled"\n  max_retry_interval = 2\n}\n')
    out = subprocess.run([sys.executable, "-m", "fastrelay", "config", "eval", "-c", str(f), "--domain",
                          "gmail.com", "max_retry_interval"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (f"max_retry_interval = 2s\t# {f}:7 (Domain xfer.test); mail to gmail.com is rerouted "
                          f"to xfer.test (reroute_domain at {f}:2 (Domain gmail.com))\n")
    # reroute_domain itself, and a domain without a reroute, are evaluated as written.
    out = subprocess.run([sys.executable, "-m", "fastrelay", "config", "eval", "-c", str(f), "--domain",
                          "gmail.com", "reroute_domain"], capture_output=True, text=True)
    assert out.stdout == f"reroute_domain = xfer.test\t# {f}:2 (Domain gmail.com)\n"


@pytest.mark.parametrize("xfer, fault, text", [
    # TLS of xfer.test (gmail.test: the default, ifavailable): the sink offers no STARTTLS.
    # (The T record's text is generic today; the 4.7.x reason reaching it is another issue-9 item.)
    ("TLS = required", None, ""),
    # A timeout of xfer.test (gmail.test has the 3 s of the base conf): RCPT is answered after 2 s.
    ("Rcpt_To_Timeout = 1", ("rcpt", 2.0), "Timed out waiting for the reply to RCPT"),
], ids=["TLS", "Rcpt_To_Timeout"])
async def test_rerouted_mail_is_sent_with_the_target_domains_session_options(dns, sinks, relay, xfer, fault, text):
    """Seed 000: the options of `Domain xfer.test` apply to the mail rerouted to it."""
    (sink,) = await sinks(1)
    if fault is not None:
        sink.faults.set(fault[0], delay=fault[1])
    h = await relay(CONF.format(xfer=xfer))
    await send(h, ["someone@gmail.test"], body("rr2"), sender="")
    for _ in range(100):
        if records(h, "T"):
            break
        await asyncio.sleep(0.05)
    (t, *_) = records(h, "T")
    assert text in t[10], t
    assert not records(h, "D") and not sink.messages
