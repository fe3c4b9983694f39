"""The loopback DNS server answers aiodns 4 as tests/support/dns.py documents: shapes and errors."""

from __future__ import annotations

import time

import aiodns
import pycares
import pytest
from aiodns.error import DNSError as AiodnsError

from tests.support import DNSServer, free_port


@pytest.fixture
def dns():
    with DNSServer() as server:
        yield server


@pytest.fixture
async def resolver(dns):
    r = aiodns.DNSResolver(nameservers=[dns.address], timeout=0.3, tries=1)
    yield r
    await r.close()


def _records(result: pycares.DNSResult, rtype: int) -> list:
    return [rr.data for rr in result.answer if rr.type == rtype]


async def test_mx(dns, resolver):
    assert dns.address == f"127.0.0.1:{dns.port}"
    dns.add_mx("example.test", 20, "mx2.example.test")
    dns.add_mx("example.test", 10, "mx1.example.test.", ttl=60)
    res = await resolver.query_dns("example.test", "MX")
    assert isinstance(res, pycares.DNSResult)
    assert res.authority == [] and res.additional == []
    assert [(rr.name, rr.type, rr.record_class, rr.ttl) for rr in res.answer] == [
        ("example.test", pycares.QUERY_TYPE_MX, 1, 300),
        ("example.test", pycares.QUERY_TYPE_MX, 1, 60),
    ]
    # In zone order; sorting by priority is the router's job.
    assert res.answer[0].data == pycares.MXRecordData(priority=20, exchange="mx2.example.test")
    assert res.answer[1].data == pycares.MXRecordData(priority=10, exchange="mx1.example.test")
    assert dns.query_count("example.test", "MX") == 1
    assert dns.query_count("EXAMPLE.test.") == 1


async def test_a_and_aaaa(dns, resolver):
    dns.add_a("mx1.example.test", "127.0.0.2")
    dns.add_a("mx1.example.test", "127.0.0.3")
    dns.add_aaaa("mx1.example.test", "0:0:0:0:0:0:0:1")
    a = await resolver.query_dns("mx1.example.test", "A")
    assert _records(a, pycares.QUERY_TYPE_A) == [
        pycares.ARecordData("127.0.0.2"),
        pycares.ARecordData("127.0.0.3"),
    ]
    aaaa = await resolver.query_dns("mx1.example.test", "AAAA")
    assert _records(aaaa, pycares.QUERY_TYPE_AAAA) == [pycares.AAAARecordData(addr="::1")]


async def test_cname_chain(dns, resolver):
    dns.add_mx("alias-mx.test", 10, "mx.alias.test")
    dns.add_cname("mx.alias.test", "hop.alias.test")
    dns.add_cname("hop.alias.test", "real.alias.test")
    dns.add_a("real.alias.test", "127.0.0.4")
    res = await resolver.query_dns("mx.alias.test", "A")
    assert [(rr.name, rr.type, rr.data) for rr in res.answer] == [
        ("mx.alias.test", pycares.QUERY_TYPE_CNAME, pycares.CNAMERecordData(cname="hop.alias.test")),
        ("hop.alias.test", pycares.QUERY_TYPE_CNAME, pycares.CNAMERecordData(cname="real.alias.test")),
        ("real.alias.test", pycares.QUERY_TYPE_A, pycares.ARecordData(addr="127.0.0.4")),
    ]
    only = await resolver.query_dns("mx.alias.test", "CNAME")
    assert [rr.data for rr in only.answer] == [pycares.CNAMERecordData(cname="hop.alias.test")]


async def test_cname_loop_is_servfail_and_dangling_is_nxdomain(dns, resolver):
    dns.add_cname("loop1.test", "loop2.test")
    dns.add_cname("loop2.test", "loop1.test")
    dns.add_cname("dangling.test", "nowhere.test")
    with pytest.raises(AiodnsError) as e:
        await resolver.query_dns("loop1.test", "A")
    assert e.value.args[0] == pycares.errno.ARES_ESERVFAIL
    with pytest.raises(AiodnsError) as e:
        await resolver.query_dns("dangling.test", "A")
    assert e.value.args[0] == pycares.errno.ARES_ENOTFOUND


async def test_null_mx(dns, resolver):
    dns.add_mx("nomail.test", 10, "old.nomail.test")
    dns.null_mx("nomail.test")  # replaces the MX set
    dns.add_a("nomail.test", "127.0.0.5")  # an A must not be used as implicit MX
    res = await resolver.query_dns("nomail.test", "MX")
    assert [rr.data for rr in res.answer] == [pycares.MXRecordData(priority=0, exchange="")]


async def test_servfail(dns, resolver):
    dns.add_mx("broken.test", 10, "mx.broken.test")
    dns.servfail("broken.test")
    with pytest.raises(AiodnsError) as e:
        await resolver.query_dns("broken.test", "MX")
    assert e.value.args == (pycares.errno.ARES_ESERVFAIL, "DNS server returned general failure")
    assert e.value.args[0] == 3
    assert dns.query_count("broken.test", "MX") == 1  # SERVFAIL is not retried with tries=1
    dns.heal("broken.test")
    res = await resolver.query_dns("broken.test", "MX")
    assert res.answer[0].data.exchange == "mx.broken.test"


async def test_nxdomain(dns, resolver):
    with pytest.raises(AiodnsError) as e:
        await resolver.query_dns("unknown.test", "MX")
    assert e.value.args == (pycares.errno.ARES_ENOTFOUND, "Domain name not found")
    assert e.value.args[0] == 4
    dns.add_a("gone.test", "127.0.0.6")
    dns.nxdomain("gone.test")
    with pytest.raises(AiodnsError) as e:
        await resolver.query_dns("gone.test", "A")
    assert e.value.args[0] == pycares.errno.ARES_ENOTFOUND
    # NXDOMAIN carries no SOA, so c-ares does not cache it: each lookup reaches the server.
    with pytest.raises(AiodnsError):
        await resolver.query_dns("unknown.test", "MX")
    assert dns.query_count("unknown.test", "MX") == 2


async def test_nodata_raises_enodata_and_is_not_cached(dns, resolver):
    dns.add_a("host-only.test", "127.0.0.7")
    with pytest.raises(AiodnsError) as e:
        await resolver.query_dns("host-only.test", "MX")
    assert e.value.args == (pycares.errno.ARES_ENODATA, "DNS server returned answer with no data")
    assert e.value.args[0] == 1
    dns.add_mx("host-only.test", 10, "mx.host-only.test")
    res = await resolver.query_dns("host-only.test", "MX")  # seen at once: NODATA was not cached
    assert res.answer[0].data.priority == 10


async def test_timeout(dns):
    dns.timeout("slow.test")
    r = aiodns.DNSResolver(nameservers=[dns.address], timeout=0.2, tries=2)
    t0 = time.monotonic()
    with pytest.raises(AiodnsError) as e:
        await r.query_dns("slow.test", "MX")
    elapsed = time.monotonic() - t0
    await r.close()
    assert e.value.args == (pycares.errno.ARES_ETIMEOUT, "Timeout while contacting DNS servers")
    assert e.value.args[0] == 12
    assert 0.2 <= elapsed < 3
    assert dns.query_count("slow.test", "MX") == 2  # one per try


async def test_delay_then_answer(dns, resolver):
    dns.add_a("lag.test", "127.0.0.8")
    dns.delay("lag.test", 0.1)
    t0 = time.monotonic()
    res = await resolver.query_dns("lag.test", "A")
    assert time.monotonic() - t0 >= 0.1
    assert res.answer[0].data.addr == "127.0.0.8"


async def test_refused_and_dead_server(dns):
    dns.refused("no.test")
    r = aiodns.DNSResolver(nameservers=[dns.address], timeout=0.3, tries=1)
    with pytest.raises(AiodnsError) as e:
        await r.query_dns("no.test", "A")
    assert e.value.args == (pycares.errno.ARES_EREFUSED, "DNS server refused query")
    await r.close()
    dead = aiodns.DNSResolver(nameservers=[f"127.0.0.1:{free_port()}"], timeout=0.3, tries=1)
    with pytest.raises(AiodnsError) as e:
        await dead.query_dns("x.test", "A")
    await dead.close()
    # Nothing listening: the ICMP port-unreachable is reported, not a timeout.
    assert e.value.args == (pycares.errno.ARES_ECONNREFUSED, "Could not contact DNS servers")


async def test_tcp(dns):
    dns.add_mx("tcp.test", 5, "mx.tcp.test")
    dns.timeout("tcp-slow.test")
    r = aiodns.DNSResolver(nameservers=[dns.address], timeout=0.3, tries=1, flags=pycares.ARES_FLAG_USEVC)
    res = await r.query_dns("tcp.test", "MX")
    assert res.answer[0].data == pycares.MXRecordData(priority=5, exchange="mx.tcp.test")
    assert dns.query_log[-1] == ("tcp.test", "MX", "tcp")
    with pytest.raises(AiodnsError) as e:
        await r.query_dns("tcp-slow.test", "A")
    assert e.value.args[0] == pycares.errno.ARES_ETIMEOUT
    await r.close()


async def test_positive_answers_are_cached_by_ttl(dns, resolver):
    # The trap for tests that edit the zone: c-ares serves a cached answer until its TTL runs out.
    dns.add_a("cached.test", "127.0.0.2", ttl=300)
    dns.add_a("fresh.test", "127.0.0.2", ttl=0)
    for name in ("cached.test", "fresh.test"):
        await resolver.query_dns(name, "A")
    dns.remove("cached.test")
    dns.remove("fresh.test")
    dns.add_a("cached.test", "127.0.0.9", ttl=0)
    dns.add_a("fresh.test", "127.0.0.9", ttl=0)
    assert (await resolver.query_dns("cached.test", "A")).answer[0].data.addr == "127.0.0.2"  # stale
    assert (await resolver.query_dns("fresh.test", "A")).answer[0].data.addr == "127.0.0.9"
    assert dns.query_count("cached.test", "A") == 1
    assert dns.query_count("fresh.test", "A") == 2


async def test_clear_and_counts(dns, resolver):
    dns.add_txt("t.test", "v=spf1 -all")
    res = await resolver.query_dns("t.test", "TXT")
    assert res.answer[0].data == pycares.TXTRecordData(data=b"v=spf1 -all")
    assert dns.queries[("t.test", "TXT")] == 1
    dns.clear()
    assert dns.query_count("t.test") == 0 and dns.query_log == []
    with pytest.raises(AiodnsError) as e:
        await resolver.query_dns("t2.test", "TXT")
    assert e.value.args[0] == pycares.errno.ARES_ENOTFOUND


async def test_second_server_is_independent():
    with DNSServer(host="127.0.0.2") as a, DNSServer(host="127.0.0.2") as b:
        assert a.port != b.port
        a.add_a("x.test", "127.0.0.3", ttl=0)
        r = aiodns.DNSResolver(nameservers=[b.address], timeout=0.3, tries=1)
        with pytest.raises(AiodnsError):
            await r.query_dns("x.test", "A")
        r.nameservers = [a.address]
        assert (await r.query_dns("x.test", "A")).answer[0].data.addr == "127.0.0.3"
        await r.close()
