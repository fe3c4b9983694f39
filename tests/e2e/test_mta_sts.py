"""MTA-STS (RFC 8461) end to end: the test DNS server's `_mta-sts` TXT record, a policy served over
real HTTPS (aiohttp, a trustme CA given as MTA_STS_CA) on loopback, and an MX sink with STARTTLS."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
import trustme
from aiohttp import web

from tests.e2e.conftest import body, drained, records
from tests.e2e.conftest import send as send_mail
from tests.support import Sink

POLICY = "version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n"


class PolicyServer:
    """https://mta-sts.s.test:PORT/.well-known/mta-sts.txt on 127.0.0.3, counting its fetches."""

    def __init__(self, ca: trustme.CA, text: str, delay: float = 0.0, ctype: str = "text/plain"):
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("mta-sts.s.test").configure_cert(self.ctx)
        self.text, self.delay, self.ctype = text, delay, ctype
        self.fetches = 0
        self._stopping = asyncio.Event()  # ends a slow answer's wait at stop(): no 5 s teardown
        self.runner: web.AppRunner | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.3", 0))
            self.port = s.getsockname()[1]

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.delay:
            try:
                await asyncio.wait_for(self._stopping.wait(), self.delay)
            except TimeoutError:
                pass
        return web.Response(body=self.text.encode(), content_type=self.ctype)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.3", self.port, ssl_context=self.ctx).start()

    async def stop(self) -> None:
        self._stopping.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
def ca(tmp_path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return ca


def conf(tmp_path, port: int, extra: str = "") -> str:
    return (f'use_mta_sts = true\nMTA_STS_CA = "{tmp_path / "ca.pem"}"\nTLS_CA = "{tmp_path / "ca.pem"}"\n'
            f"MTA_STS_Port = {port}\nMTA_STS_Timeout = 3s\nretry_interval = 60\nhost_failure_retry = 60\n" + extra)


async def mx_sink(ca: trustme.CA, port: int, tls: bool = True) -> Sink:
    ctx = None
    if tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("mx.s.test").configure_cert(ctx)
    s = Sink("127.0.0.2", port, tls_context=ctx)
    await s.start()
    return s


def zone(dns, txt: bool = True) -> None:
    dns.add_mx("s.test", 10, "mx.s.test")
    dns.add_a("mx.s.test", "127.0.0.2")
    dns.add_a("mta-sts.s.test", "127.0.0.3")
    if txt:
        dns.add_txt("_mta-sts.s.test", "v=STSv1; id=20260101")


async def wait_t(h, timeout: float = 15.0) -> list[str]:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not records(h, "T"):
        if loop.time() > end:
            raise AssertionError(f"no T record: {h.mainlog()}")
        await asyncio.sleep(0.05)
    return records(h, "T")[0]


@pytest.mark.parametrize("mode,pattern,mx_tls,txt,delivered,reason", [
    ("enforce", "mx.s.test", True, True, True, None),
    ("enforce", "*.s.test", True, True, True, None),
    ("enforce", "*.other.test", True, True, False, "4.7.0 MTA-STS policy of s.test (enforce)"),
    ("enforce", "mx.s.test", False, True, False, "4.7.4 TLS is required"),
    ("testing", "*.other.test", False, True, True, None),
    ("none", "*.other.test", False, True, True, None),
    ("enforce", "*.other.test", False, False, True, None),  # no TXT record: no policy
])
async def test_policy_modes(tmp_path, dns, relay, sink_port, ca, mode, pattern, mx_tls, txt, delivered, reason):
    """RFC 8461 §5: in enforce mode, an MX must match the policy and TLS must be verified;
    "testing" and "none" deliver whatever; a policy failure in enforce mode defers with 4.7.x."""
    zone(dns, txt)
    server = PolicyServer(ca, POLICY.format(mode=mode, mx=pattern))
    await server.start()
    sink = await mx_sink(ca, sink_port, tls=mx_tls)
    try:
        h = await relay(conf(tmp_path, server.port))
        await send_mail(h, ["u@s.test"], body("sts"))
        if delivered:
            await sink.wait_for(1, timeout=15)
            await drained(h)
            if mode == "enforce" and txt:
                assert sink.messages[0].tls
        else:
            t = await wait_t(h)
            assert t[10].startswith(f"451 {reason}"), t
            assert sink.messages == []
        assert server.fetches == (1 if txt else 0)
    finally:
        await sink.stop()
        await server.stop()


async def test_policy_is_cached_for_max_age(tmp_path, dns, relay, sink_port, ca):
    """§5.1: a fetched policy is used until its max_age, with no new fetch while the TXT id is the
    same, even once the policy host is gone."""
    zone(dns)
    server = PolicyServer(ca, POLICY.format(mode="enforce", mx="mx.s.test"))
    await server.start()
    sink = await mx_sink(ca, sink_port)
    try:
        h = await relay(conf(tmp_path, server.port, "Connection_Cache_Time = 0\n"))
        sts = h.relay.queue.router.sts()
        p1 = await sts.policy("s.test")
        await server.stop()
        p2 = await sts.policy("s.test")
        assert p1 == p2 and p1.mode == "enforce" and server.fetches == 1
        await send_mail(h, ["u@s.test"], body("cached"))
        await sink.wait_for(1, timeout=15)
        await drained(h)
        assert sink.messages[0].tls and server.fetches == 1
    finally:
        await sink.stop()
        await server.stop()


@pytest.mark.parametrize("trouble", ["slow", "untrusted", "html"])
async def test_unfetchable_policy_is_no_policy(tmp_path, dns, relay, sink_port, ca, trouble):
    """A policy that cannot be had within the mta-sts timeout, over verified HTTPS, as text/plain,
    counts as no policy (§5.1) and the mail goes out as without one."""
    zone(dns)
    other = trustme.CA() if trouble == "untrusted" else ca
    server = PolicyServer(other, POLICY.format(mode="enforce", mx="*.other.test"),
                          delay=5.0 if trouble == "slow" else 0.0,
                          ctype="text/html" if trouble == "html" else "text/plain")
    await server.start()
    sink = await mx_sink(ca, sink_port, tls=False)
    try:
        h = await relay(conf(tmp_path, server.port, "MTA_STS_Timeout = 1s\n"))
        await send_mail(h, ["u@s.test"], body("nopolicy"))
        await sink.wait_for(1, timeout=15)
        await drained(h)
    finally:
        await sink.stop()
        await server.stop()


async def test_enable_mta_sts_false_only_logs(tmp_path, dns, relay, sink_port, ca, caplog):
    """Momentum's enable_mta_sts = false: the policy is fetched (use_mta_sts) but not applied; an
    enforce policy naming other MX hosts is logged and the mail delivered."""
    zone(dns)
    server = PolicyServer(ca, POLICY.format(mode="enforce", mx="*.other.test"))
    await server.start()
    sink = await mx_sink(ca, sink_port, tls=False)
    try:
        h = await relay(conf(tmp_path, server.port, "enable_mta_sts = false\n"))
        await send_mail(h, ["u@s.test"], body("off"))
        await sink.wait_for(1, timeout=15)
        await drained(h)
        assert server.fetches == 1
        assert any("MTA-STS (testing): MX mx.s.test not in the policy" in r.getMessage() for r in caplog.records)
    finally:
        await sink.stop()
        await server.stop()
