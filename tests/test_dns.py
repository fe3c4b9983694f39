"""fastrelay.dns against a real DNS server on loopback: MX, A/AAAA, CNAME, null MX, errors, cache."""

from __future__ import annotations

import time

import pytest

from fastrelay import limits
from fastrelay.config import loads
from fastrelay.dns import DNSNotFound, DNSTempError, Resolver
from tests.support import DNSServer


@pytest.fixture
def server():
    s = DNSServer("127.0.0.1", 0)
    yield s
    s.stop()


@pytest.fixture
def resolver(server):
    return Resolver([server.address], timeout=0.3, tries=1)


async def test_mx_sorted_by_preference(server, resolver):
    server.add_mx("ex.test", 20, "b.ex.test", ttl=120)
    server.add_mx("ex.test", 10, "a.ex.test", ttl=60)
    assert await resolver.mx("ex.test") == ([(10, "a.ex.test"), (20, "b.ex.test")], 60.0)


async def test_null_mx_and_no_mx(server, resolver):
    server.null_mx("nomail.test")
    server.add_a("plain.test", "127.0.0.5")
    assert (await resolver.mx("nomail.test"))[0] == [(0, "")]
    assert (await resolver.mx("plain.test"))[0] == []  # NODATA: use the implicit MX


async def test_nxdomain_and_servfail(server, resolver):
    server.nxdomain("gone.test")
    server.servfail("broken.test")
    with pytest.raises(DNSNotFound):
        await resolver.mx("gone.test")
    with pytest.raises(DNSTempError):
        await resolver.mx("broken.test")


async def test_timeout_is_temporary(server, resolver):
    server.timeout("slow.test")
    with pytest.raises(DNSTempError):
        await resolver.mx("slow.test")


async def test_addresses_v4_and_v6_and_ip_literals(server, resolver):
    server.add_a("h.test", "127.0.0.2")
    server.add_aaaa("h.test", "::1")
    ips, _ = await resolver.addresses("h.test")
    assert ips == ["127.0.0.2", "::1"]
    assert (await resolver.addresses("10.1.2.3"))[0] == ["10.1.2.3"]
    server.nxdomain("nothing.test")
    with pytest.raises(DNSNotFound):
        await resolver.addresses("nothing.test")


async def test_cname_chain_followed(server, resolver):
    server.add_cname("alias.test", "mid.test")
    server.add_cname("mid.test", "real.test")
    server.add_a("real.test", "127.0.0.3")
    assert (await resolver.addresses("alias.test"))[0] == ["127.0.0.3"]


async def test_answers_cached_for_their_ttl(server, resolver):
    server.add_mx("c.test", 10, "mx.c.test", ttl=300)
    await resolver.mx("c.test")
    n = server.query_count("c.test")
    await resolver.mx("c.test")
    assert server.query_count("c.test") == n


async def _warm_up(server, resolver, n: int = 6) -> None:
    """Fast answers first: c-ares learns the server's latency from them."""
    for i in range(n):
        server.add_a(f"fast{i}.test", "127.0.0.2")
        assert (await resolver.addresses(f"fast{i}.test"))[0] == ["127.0.0.2"]


async def test_slow_answer_after_fast_ones_still_gets_the_configured_timeout(server):
    """A lookup gets at least DNS_Timeout: once c-ares has seen fast answers it would give up on
    a 0.8 s answer in about 0.6 s, and a domain with slow DNS would be deferred again and again."""
    resolver = Resolver([server.address], timeout=3.0, tries=2)
    await _warm_up(server, resolver)
    server.add_a("slow.test", "127.0.0.3")
    server.add_mx("slow.test", 10, "mx.slow.test")
    server.delay("slow.test", 0.8)
    assert (await resolver.addresses("slow.test"))[0] == ["127.0.0.3"]
    assert (await resolver.mx("slow.test"))[0] == [(10, "mx.slow.test")]
    await resolver.close()


async def test_no_answer_times_out_after_the_configured_timeout_not_before(server):
    resolver = Resolver([server.address], timeout=1.5, tries=2)
    await _warm_up(server, resolver)
    server.timeout("silent.test")
    t0 = time.monotonic()
    with pytest.raises(DNSTempError, match="Timeout"):
        await resolver.mx("silent.test")
    took = time.monotonic() - t0
    assert 1.5 <= took < 6.0  # at least DNS_Timeout; the upper bound only catches a hang
    await resolver.close()


def test_dns_timeout_option_default_and_override():
    assert loads("").get("DNS_Timeout") == limits.DNS_TIMEOUT == 5.0
    assert loads("DNS_Timeout = 12s\n").get("DNS_Timeout") == 12.0
    assert Resolver().timeout == limits.DNS_TIMEOUT
