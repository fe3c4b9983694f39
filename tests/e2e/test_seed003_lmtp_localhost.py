"""conf/examples/seed003_lmtp_equivalent.conf end to end: LMTP to localhost delivers, with the
default Prohibited_Hosts (loopback) in force, because the operator named that host."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import body, drained, records, send
from tests.support import Sink
from tests.support.relay import RelayHarness

EXAMPLE = Path(__file__).resolve().parents[2] / "conf" / "examples" / "seed003_lmtp_equivalent.conf"


async def test_seed003_lmtp_to_localhost_delivers(tmp_path, dns):
    """Momentum's prohibited_hosts is a guard against "DNS tricks": "return a loopback or other
    local address to you when you query their MX records". A route the conf writes itself
    (`lmtp://localhost?port=24`) is not a DNS answer, so the default loopback ban does not apply."""
    store = Sink("127.0.0.1", 0, lmtp=True)
    await store.start()
    # The example as written, with the sink's port for 24 (a test cannot count on port 24) and
    # no Prohibited_Hosts line: the default (loopback) applies.
    conf = EXAMPLE.read_text().replace("?port=24", f"?port={store.port}")
    h = RelayHarness(tmp_path, f'DNS_Servers = ( "{dns.address}" )\n' + conf)
    await h.start()
    try:
        await send(h, ["u@foobar.net", "v@foobar.org"], body("s3"), sender="")
        await store.wait_for(1, timeout=15)
        await drained(h)
        assert sorted(r for m in store.messages for r in m.rcpt_tos) == ["u@foobar.net", "v@foobar.org"]
        assert records(h, "P") == [] and records(h, "T") == []
        assert {r[3] for r in records(h, "D")} == {"u@foobar.net", "v@foobar.org"}
    finally:
        await h.stop()
        await store.stop()
