"""fastrelay.dns against a real DNS server on loopback: MX, A/AAAA, CNAME, null MX, errors, cache."""

from __future__ import annotations

import pytest

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
