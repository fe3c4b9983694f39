"""Seed 003 (Stalwart's transport and routing) end to end: each TOML example of conf/examples as
written, run by a real relay against loopback sinks and the test DNS server."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import pytest

from tests.e2e.conftest import body, drained, records, send
from tests.support import Sink
from tests.support.relay import TomlRelayHarness
from tests.support.tls import tls_pair

EXAMPLES = Path(__file__).resolve().parents[2] / "conf" / "examples"

BASE = """
DNS_Servers = ["{dns}"]
Prohibited_Hosts = ["0.0.0.0/8"]
Remote_SMTP_Port = {port}
retry_interval = 60
host_failure_retry = 60
max_connections_per_ip = 1000
"""
TIMEOUTS = """
Connect_Timeout = "2s"
Greeting_Timeout = "3s"
Mail_From_Timeout = "3s"
Rcpt_To_Timeout = "3s"
Data_Timeout = "3s"
Delivery_Response_Timeout = "3s"
"""


def example(name: str) -> str:
    return (EXAMPLES / name).read_text()


async def start(tmp_path, toml: str, dns, port: int, extra: str = "", timeouts: bool = True,
                hostname: str | None = "relay.test") -> TomlRelayHarness:
    h = TomlRelayHarness(tmp_path, toml, BASE.format(dns=dns.address, port=port) + (TIMEOUTS if timeouts else "")
                         + extra, hostname=hostname)
    await h.start()
    return h


async def wait_records(h, kind: str, n: int = 1, timeout: float = 15.0) -> list[list[str]]:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while len(records(h, kind)) < n:
        if loop.time() > end:
            raise AssertionError(f"no {kind} record: {h.mainlog()}")
        await asyncio.sleep(0.05)
    return records(h, kind)


async def test_routing_example_lmtp_for_listed_domains_mx_for_others(tmp_path, dns, sinks, sink_port):
    """Seed 003: "Routing rules are useful for tasks such as forwarding messages for local domains
    to a message store over LMTP" and "`false` ... indicates that the message delivery should be
    done through DNS resolution"."""
    store = Sink("127.0.0.1", 0, lmtp=True)
    await store.start()
    (mx,) = await sinks(1)
    dns.add_mx("other.test", 10, "mx.other.test")
    dns.add_a("mx.other.test", "127.0.0.2")
    toml = example("seed003_routing.toml").replace("port = 24", f"port = {store.port}")
    h = await start(tmp_path, toml, dns, sink_port)
    try:
        await send(h, ["u@foobar.net", "v@foobar.org", "w@other.test"], body("route"))
        await store.wait_for(1, timeout=15)
        await mx.wait_for(1, timeout=15)
        await drained(h)
        assert sorted(r for m in store.messages for r in m.rcpt_tos) == ["u@foobar.net", "v@foobar.org"]
        assert [r for m in mx.messages for r in m.rcpt_tos] == ["w@other.test"]
        assert records(h, "T") == []
    finally:
        await h.stop()
        await store.stop()


@pytest.mark.parametrize("strategy,up,expect", [
    ("ipv4-only", {"v4", "v6"}, "v4"),
    ("ipv6-only", {"v4", "v6"}, "v6"),
    ("ipv4-only", {"v6"}, None),
    ("ipv6-only", {"v4"}, None),
    ("ipv6-then-ipv4", {"v4", "v6"}, "v6"),
    ("ipv6-then-ipv4", {"v4"}, "v4"),
    ("ipv4-then-ipv6", {"v4", "v6"}, "v4"),
    ("ipv4-then-ipv6", {"v6"}, "v6"),
])
async def test_ip_strategy(tmp_path, dns, sink_port, strategy, up, expect):
    """Seed 003: "`ipv6-then-ipv4`: Try first using IPv6 addresses and fallback to IPv4 if
    unavailable." The second family is tried only when the first has no usable address or all
    of its addresses failed; "-only" never uses the other family."""
    dns.add_mx("v.test", 10, "mx.v.test")
    dns.add_a("mx.v.test", "127.0.0.2")
    dns.add_aaaa("mx.v.test", "::1")
    sinks = {"v4": Sink("127.0.0.2", sink_port), "v6": Sink("::1", sink_port)}
    for fam in up:
        await sinks[fam].start()
    toml = example("seed003_ip_strategy.toml").replace("ipv4-then-ipv6", strategy)
    h = await start(tmp_path, toml, dns, sink_port)
    try:
        await send(h, ["u@v.test"], body("ip"))
        if expect is None:
            (t,) = await wait_records(h, "T")
            assert t[10].startswith("451 4.4.1"), t
        else:
            await sinks[expect].wait_for(1, timeout=15)
            await drained(h)
        for fam, s in sinks.items():
            assert len(s.messages) == (1 if fam == expect else 0), (fam, strategy)
    finally:
        await h.stop()
        for fam in up:
            await sinks[fam].stop()


async def test_source_ip_example_binds_a_listed_address(tmp_path, dns, sinks, sink_port):
    """Seed 003: "If multiple source addresses are provided, Stalwart SMTP will randomly choose one
    from the list each time a new connection is established." The example as written names
    addresses this machine does not have: the bind fails, a clear 4.4.1, the mail stays queued."""
    (mx,) = await sinks(1)
    dns.add_mx("s.test", 10, "mx.s.test")
    dns.add_a("mx.s.test", "127.0.0.2")
    h = await start(tmp_path, example("seed003_source_ip.toml"), dns, sink_port)
    try:
        await send(h, ["u@s.test"], body("src"))
        (t,) = await wait_records(h, "T")
        assert "4.4.1 Cannot bind to Bind_Address 10.0.0.1" in t[10], t
        assert mx.messages == []
    finally:
        await h.stop()
    toml = example("seed003_source_ip.toml").replace('"10.0.0.10", "10.0.0.11"', '"127.0.0.5", "127.0.0.6"')
    (tmp_path / "b").mkdir()
    h = await start(tmp_path / "b", toml, dns, sink_port)
    try:
        for i in range(4):
            await send(h, ["u@s.test"], body(f"src{i}"))
        await mx.wait_for(4, timeout=15)
        await drained(h)
        assert {m.peer[0] for m in mx.messages} <= {"127.0.0.5", "127.0.0.6"}
    finally:
        await h.stop()


async def test_source_ip_by_family(tmp_path, dns, sink_port):
    """The v6 list is used for an IPv6 next hop, the v4 list for an IPv4 one."""
    dns.add_mx("six.test", 10, "mx.six.test")
    dns.add_aaaa("mx.six.test", "::1")
    six = Sink("::1", sink_port)
    await six.start()
    toml = '[queue.outbound.source-ip]\nv4 = ["127.0.0.5"]\nv6 = ["::1"]\n'
    h = await start(tmp_path, toml, dns, sink_port)
    try:
        await send(h, ["u@six.test"], body("six"))
        await six.wait_for(1, timeout=15)
        await drained(h)
        assert six.messages[0].peer[0] == "::1"
    finally:
        await h.stop()
        await six.stop()


@pytest.mark.parametrize("with_outbound_hostname", [True, False])
async def test_ehlo_hostname(tmp_path, dns, sinks, sink_port, with_outbound_hostname):
    """Seed 003: "The `queue.outbound.hostname` parameter indicates which EHLO hostname to use ...
    If this parameter is missing, the hostname specified in `server.hostname` is used instead."
    The listener's banner keeps server.hostname either way."""
    (mx,) = await sinks(1)
    dns.add_mx("e.test", 10, "mx.e.test")
    dns.add_a("mx.e.test", "127.0.0.2")
    toml = '[server]\nhostname = "banner.example"\n'
    if with_outbound_hostname:
        toml = example("seed003_hostname.toml") + "\n" + toml
    h = await start(tmp_path, toml, dns, sink_port, hostname=None)
    try:
        banner = await asyncio.to_thread(_banner, h.port)
        assert "banner.example" in banner
        await send(h, ["u@e.test"], body("ehlo"))
        await mx.wait_for(1, timeout=15)
        await drained(h)
        assert mx.messages[0].ehlo == ("mx.mydomain.net" if with_outbound_hostname else "banner.example")
    finally:
        await h.stop()


def _banner(port: int) -> str:
    c = smtplib.SMTP()
    try:
        _code, msg = c.connect("127.0.0.1", port)
        return msg.decode()
    finally:
        c.close()


@pytest.mark.parametrize("limits,delivered", [
    ("", True),  # the example as written: mx = 7, multihomed = 2
    ("mx = 7\nmultihomed = 2", True),
    ("mx = 2\nmultihomed = 2", False),
])
async def test_limits_mx(tmp_path, dns, sinks, sink_port, limits, delivered):
    """Seed 003: "`mx`: The maximum number of MX hosts to try on each delivery attempt." Only the
    third MX listens: with mx = 2 the attempt ends (deferred) without trying it."""
    (third,) = await sinks(1, first=4)
    for i, pref in ((2, 10), (3, 20), (4, 30)):
        dns.add_mx("l.test", pref, f"mx{i}.l.test")
        dns.add_a(f"mx{i}.l.test", f"127.0.0.{i}")
    toml = example("seed003_limits.toml")
    if limits:
        toml = "[queue.outbound.limits]\n" + limits + "\n"
    h = await start(tmp_path, toml, dns, sink_port)
    try:
        await send(h, ["u@l.test"], body("mx"))
        if delivered:
            await third.wait_for(1, timeout=15)
            await drained(h)
        else:
            await wait_records(h, "T")
            assert third.messages == []
    finally:
        await h.stop()


@pytest.mark.parametrize("multihomed,delivered", [(2, False), (3, True)])
async def test_limits_multihomed(tmp_path, dns, sinks, sink_port, multihomed, delivered):
    """Seed 003: "`multihomed`: For multi-homed remote servers, it is the maximum number of IP
    addresses to try on each delivery attempt." One MX with three addresses; only the third listens."""
    (third,) = await sinks(1, first=4)
    dns.add_mx("h.test", 10, "mx.h.test")
    for i in (2, 3, 4):
        dns.add_a("mx.h.test", f"127.0.0.{i}")
    toml = example("seed003_limits.toml").replace("multihomed = 2", f"multihomed = {multihomed}")
    h = await start(tmp_path, toml, dns, sink_port)
    try:
        await send(h, ["u@h.test"], body("mh"))
        if delivered:
            await third.wait_for(1, timeout=15)
            await drained(h)
        else:
            await wait_records(h, "T")
            assert third.messages == []
    finally:
        await h.stop()


async def test_timeouts_example_runs_and_applies(tmp_path, dns, sinks, sink_port):
    """Seed 003's timeouts as written ("3m", "10m") are the per-phase timeouts of the session."""
    (mx,) = await sinks(1)
    dns.add_mx("t.test", 10, "mx.t.test")
    dns.add_a("mx.t.test", "127.0.0.2")
    h = await start(tmp_path, example("seed003_timeouts.toml"), dns, sink_port, timeouts=False)
    try:
        cfg = h.relay.cfg
        assert [cfg.get(o) for o in ("Connect_Timeout", "Greeting_Timeout", "TLS_Timeout", "EHLO_Timeout",
                                     "Mail_From_Timeout", "Rcpt_To_Timeout", "Data_Timeout", "MTA_STS_Timeout")] \
            == [180.0, 180.0, 120.0, 180.0, 180.0, 180.0, 600.0, 120.0]
        await send(h, ["u@t.test"], body("t"))
        await mx.wait_for(1, timeout=15)
        await drained(h)
    finally:
        await h.stop()


REMOTE = """
[queue.outbound]
next-hop = [ {{ else = "peer" }} ]

[remote."peer"]
address = "127.0.0.2"
port = {port}
protocol = "smtp"
{extra}
"""


async def test_remote_timeout_bounds_the_whole_session(tmp_path, dns, sinks, sink_port):
    """A remote's `timeout` is one bound for the whole session: every phase is within its own
    timeout (3 s), but the session as a whole passes 1 s and is cut; the mail is deferred."""
    (peer,) = await sinks(1)
    peer.faults.set("dot", delay=2.0)
    h = await start(tmp_path, REMOTE.format(port=sink_port, extra='timeout = "1s"'), dns, sink_port)
    try:
        await send(h, ["u@any.test"], body("slow"))
        (t,) = await wait_records(h, "T")
        assert "Session_Timeout" in t[10] and t[10].startswith("451 4.4.2"), t
    finally:
        await h.stop()


@pytest.mark.parametrize("allow_invalid,trust_ca,delivered", [
    (True, False, True),
    (False, False, False),
    (False, True, True),
])
async def test_remote_implicit_tls(tmp_path, dns, sink_port, allow_invalid, trust_ca, delivered):
    """`tls.implicit` (RFC 8314 §3): TLS from the first byte, before the greeting. Without
    allow-invalid-certs the certificate must verify (here against TLS_CA); an untrusted one makes
    the host unusable (4.7.5) and the mail is deferred."""
    pair = tls_pair()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pair.ca_pem)
    peer = Sink("127.0.0.2", sink_port, tls_context=pair.server, implicit_tls=True)
    await peer.start()
    extra = f'[remote."peer".tls]\nimplicit = true\nallow-invalid-certs = {str(allow_invalid).lower()}\n'
    h = await start(tmp_path, REMOTE.format(port=sink_port, extra=extra), dns, sink_port,
                    extra=f'TLS_CA = "{ca}"\n' if trust_ca else "")
    try:
        await send(h, ["u@any.test"], body("tls"))
        if delivered:
            await peer.wait_for(1, timeout=15)
            await drained(h)
            assert peer.messages[0].tls
        else:
            (t,) = await wait_records(h, "T")
            assert "4.7.5" in t[10], t
            assert peer.messages == []
    finally:
        await h.stop()
        await peer.stop()


async def test_next_hop_by_sender_domain(tmp_path, dns, sinks, sink_port):
    """Next-hop rules on sender-domain: mail from vip.test goes to the remote, other mail by MX,
    whatever its recipient domain."""
    peer, mx = await sinks(2)
    dns.add_mx("y.test", 10, "mx.y.test")
    dns.add_a("mx.y.test", "127.0.0.3")
    toml = REMOTE.format(port=sink_port, extra="").replace(
        '{ else = "peer" }', '{ if = "sender-domain", eq = "vip.test", then = "peer" }, { else = false }')
    h = await start(tmp_path, toml, dns, sink_port)
    try:
        await send(h, ["u@y.test"], body("vip"), sender="s@vip.test")
        await send(h, ["v@y.test"], body("plain"), sender="s@plain.test")
        await peer.wait_for(1, timeout=15)
        await mx.wait_for(1, timeout=15)
        await drained(h)
        assert [m.rcpt_tos for m in peer.messages] == [["u@y.test"]]
        assert [m.rcpt_tos for m in mx.messages] == [["v@y.test"]]
        assert {r[6] for r in records(h, "D")} == {"next-hop-1", "default"}
    finally:
        await h.stop()


def _max_overlap(sink: Sink) -> int:
    events = []
    for s in sink.sessions:
        events.append((s.opened_at, 1))
        events.append((s.closed_at if s.closed_at is not None else float("inf"), -1))
    cur = best = 0
    for _, d in sorted(events):
        cur += d
        best = max(best, cur)
    return best


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_remote_concurrency_is_shared_by_the_domains_routed_to_it(tmp_path, dns, sink_port, concurrency):
    """`concurrency` of a remote bounds the connections open to it at once, across all the
    domains a rule sends there (the seed's example: "concurrency = 10" for list/domains)."""
    store = Sink("127.0.0.1", 0, lmtp=True)
    store.faults.set("dot", delay=0.5)
    await store.start()
    domains = [f"d{i}.test" for i in range(6)]
    toml = (example("seed003_routing.toml").replace("port = 24", f"port = {store.port}")
            .replace("concurrency = 10", f"concurrency = {concurrency}")
            .replace('domains = ["foobar.net", "foobar.org"]', "domains = [" + ", ".join(f'"{d}"' for d in domains)
                     + "]"))
    h = await start(tmp_path, toml, dns, sink_port, extra="Connection_Cache_Time = 0\n")
    try:
        await asyncio.gather(*(send(h, [f"u@{d}"], body(d)) for d in domains))
        await store.wait_for(len(domains), timeout=30)
        await drained(h, timeout=30)
        assert 1 <= _max_overlap(store) <= concurrency
        if concurrency > 1:
            assert _max_overlap(store) > 1  # the limit, not something else, held it to 1 above
    finally:
        await h.stop()
        await store.stop()


async def test_fastrelay_run_on_a_toml_file(tmp_path, dns, sink_port):
    """`fastrelay run -c relay.toml`: the whole relay from Stalwart's TOML, as its own process."""
    from tests.support.relayproc import RelayProcess

    store = Sink("127.0.0.1", 0, lmtp=True)
    await store.start()
    p = RelayProcess(tmp_path, hold=False)
    p.conf = tmp_path / "relay.toml"
    p.conf.write_text(
        example("seed003_routing.toml").replace("port = 24", f"port = {store.port}")
        + '\n[server]\nhostname = "relay.test"\n[server.listener."smtp"]\nbind = ["127.0.0.1:0"]\n'
          'protocol = "smtp"\n[fastrelay]\nSpool_Base = "spool"\nMainlog = "mainlog"\n'
          f'DNS_Servers = ["{dns.address}"]\n')
    await asyncio.to_thread(p.start)
    try:
        def submit() -> None:
            with smtplib.SMTP("127.0.0.1", p.port, timeout=10) as c:
                c.sendmail("a@example.com", ["u@foobar.org"], body("run"))

        await asyncio.to_thread(submit)
        await store.wait_for(1, timeout=20)
        assert store.messages[0].rcpt_tos == ["u@foobar.org"]
        assert await asyncio.to_thread(p.stop) == 0
    finally:
        await asyncio.to_thread(p.kill)
        await store.stop()
