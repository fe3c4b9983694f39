"""Seeds 000/001 with two relays on loopback: A transfers to B over XFER, B delivers to its sink."""

from __future__ import annotations

import asyncio

from tests.e2e.conftest import body, drained, records, send
from tests.support import free_port

SECRET = "s3cret-shared-by-both-nodes"


def node_b_conf(http_port: int, sink_port: int) -> str:
    # Seed 000, "Server Configuration To Receive XFER messages", addresses on loopback, plus the
    # shared secret fastrelay requires (an XFER server without authentication is an open relay).
    return f"""
scriptlet "scriptlet" {{
  # load the XFER server module
  script xfer_server {{
    source = "msys.xfer.server"
  }}
}}
HTTP_Listener {{
  Listen "127.0.0.1:{http_port}" {{}}
}}
xfer_secret = "{SECRET}"
Domain gmail.com {{ Routes = ( "smtp://127.0.0.3?port={sink_port}" ) }}
Domain slow.test {{ Routes = ( "smtp://127.0.0.3?port={sink_port}" ) }}
"""


def node_a_conf(http_port: int, extra: str = "") -> str:
    # Seed 000, "Client Configuration to Send XFER Messages", the XFER server on 127.0.0.1.
    return f"""
scriptlet "scriptlet" {{
  # load the XFER client module
  script xfer_client {{
    source = "msys.xfer.client"
  }}
}}

Domain xfer.test {{
  reroute_domain = "disabled"
  delayed_reroute_domain = "disabled"

  # use the XFER delivery method
  Delivery_Method = "delay_xfer"
  Delivery_Response_Timeout = "10000"  # 10s

  # retry xfer messages quicker
  host_failure_retry = 1
  max_retry_interval = 2

  # don't swap out xfer message context if there is a temporary xfer failure:
  teleport_enabled = 1

  Routes = (
    "xfer://127.0.0.1?port={http_port}"
  )
  HTTP_URI = "/delay_message"
  HTTP_METHOD = "POST"
  HTTP_HOST = "localhost"
  xfer_secret = "{SECRET}"
}}
{extra}
"""


async def test_gmail_rerouted_to_xfer_and_delivered_at_b(sinks, relay, sink_port):
    (sink_b,) = await sinks(1, first=3)
    http = free_port()
    b = await relay(node_b_conf(http, sink_port), subdir="b")
    a = await relay(node_a_conf(http, '# reroute all gmail mail to the XFER server\n'
                                      'domain gmail.com {\n  reroute_domain = "xfer.test"\n}\n'), subdir="a")
    data = body("x1")
    await send(a, ["someone@gmail.com"], data)
    (msg,) = await sink_b.wait_for(1)
    assert msg.rcpt_tos == ["someone@gmail.com"] and msg.data.endswith(data)
    await drained(a)
    await drained(b)
    (x,) = records(a, "X")  # A logs the transfer
    assert x[3] == "someone@gmail.com" and x[10].startswith("250")
    assert records(a, "D") == []
    rb = records(b, "R")
    assert [r[7] for r in rb] == ["xfer"]  # B logs the reception with protocol xfer
    assert [r[3] for r in records(b, "D")] == ["someone@gmail.com"]


async def test_tempfail_on_a_is_transferred_after_the_first_failure(sinks, relay, sink_port):
    sink_a, sink_b = await sinks(2)  # 127.0.0.2 for A's own delivery, 127.0.0.3 for B's
    sink_a.faults.set("rcpt", reply="451 4.3.0 try later")
    http = free_port()
    b = await relay(node_b_conf(http, sink_port), subdir="b")
    a = await relay(node_a_conf(http, '# reroute delayed messages to the synthetic xfer.test domain\n'
                                      'delayed_reroute_domain = "xfer.test"\n'
                                      f'Domain slow.test {{ Routes = ( "smtp://127.0.0.2?port={sink_port}" ) }}\n'),
                    subdir="a")
    await send(a, ["x@slow.test"], body("d1"))
    (msg,) = await sink_b.wait_for(1, timeout=15)
    await drained(a)
    assert msg.rcpt_tos == ["x@slow.test"] and sink_a.messages == []
    assert len(records(a, "T")) == 1 and len(records(a, "X")) == 1
    # teleport_enabled: B kept the context (one attempt made on A) instead of starting afresh.
    (d,) = records(b, "D")
    assert d[7] == "1"


async def test_b_down_a_retries_and_delivers_when_b_returns(sinks, relay, sink_port):
    (sink_b,) = await sinks(1, first=3)
    http = free_port()
    a = await relay(node_a_conf(http, 'domain gmail.com { reroute_domain = "xfer.test" }\n'), subdir="a")
    await send(a, ["late@gmail.com"], body("down"))
    for _ in range(100):  # B is not there: transient failures on A
        if len(records(a, "T")) >= 2:
            break
        await asyncio.sleep(0.1)
    assert len(records(a, "T")) >= 2 and sink_b.messages == []
    t = [float(r[0]) for r in records(a, "T")]
    assert t[1] - t[0] <= 2.8  # max_retry_interval = 2 (plus host_failure_retry slack)
    await relay(node_b_conf(http, sink_port), subdir="b")
    (msg,) = await sink_b.wait_for(1, timeout=15)
    await drained(a)
    assert msg.rcpt_tos == ["late@gmail.com"]
    assert len(records(a, "X")) == 1


async def test_wrong_secret_is_refused_and_retried_not_bounced(sinks, relay, sink_port):
    (sink_b,) = await sinks(1, first=3)
    http = free_port()
    await relay(node_b_conf(http, sink_port).replace(SECRET, "another-secret"), subdir="b")
    a = await relay(node_a_conf(http, 'domain gmail.com { reroute_domain = "xfer.test" }\n'), subdir="a")
    await send(a, ["x@gmail.com"], body("auth"))
    for _ in range(60):
        if records(a, "T"):
            break
        await asyncio.sleep(0.1)
    (t, *_) = records(a, "T")
    assert "401" in t[10]
    assert records(a, "P") == [] and sink_b.messages == []
