"""Resolve MX, A and AAAA records through aiodns, with TTL caching and bounded CNAME chasing."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import aiodns
import aiodns.error

from fastrelay.limits import DNS_TIMEOUT

# c-ares status codes (pycares.errno) that aiodns puts in DNSError.args[0].
ARES_ENODATA = 1
ARES_EFORMERR = 2
ARES_ESERVFAIL = 3
ARES_ENOTFOUND = 4
ARES_EREFUSED = 6
ARES_ETIMEOUT = 12

T_A, T_CNAME, T_MX, T_TXT, T_AAAA = 1, 5, 15, 16, 28
_QTYPE_NAMES = {T_A: "A", T_MX: "MX", T_TXT: "TXT", T_AAAA: "AAAA"}

# docs/reliability.md case 46: follow MX/A -> CNAME "a reasonable number" of times.
MAX_CNAME_CHAIN = 8
# How long an NXDOMAIN is remembered (RFC 2308 negative caching, kept short).
NEGATIVE_TTL = 60.0
MIN_TTL = 1.0
# Less time than this left of DNS_Timeout after an early c-ares timeout: not worth asking again.
MIN_DNS_RETRY = 0.05
# How long past DNS_Timeout a question may stay unanswered by c-ares itself before it is dropped.
HANG_GRACE = 1.0


def is_localhost(name: str) -> bool:
    """RFC 6761 §6.3: "localhost" and names under it are loopback, never looked up in DNS."""
    n = name.rstrip(".").lower()
    return n == "localhost" or n.endswith(".localhost")


# RFC 6761 §6.3: what a localhost name resolves to. IPv4 loopback only: a localhost route is one
# group spread evenly, and a message store listening on 127.0.0.1 alone (the usual LMTP setup)
# must not see every other connection tried on ::1 first.
LOCALHOST_ADDRESSES = ["127.0.0.1"]


class DNSTempError(Exception):
    """SERVFAIL, a timeout, a refusal: the lookup must be retried later (RFC 5321 §5.1)."""


class DNSNotFound(Exception):
    """NXDOMAIN: the name does not exist."""


async def _close(resolver: aiodns.DNSResolver) -> None:
    close = getattr(resolver, "close", None)
    if close is not None:
        res = close()
        if asyncio.iscoroutine(res):
            await res


def dns_servers(cfg) -> list[str] | None:
    """DNS_Servers as the "ip:port" strings Resolver takes; None for the system's resolv.conf."""
    out = [f"{h.host}:{h.port or 53}" if ":" not in h.host else f"[{h.host}]:{h.port or 53}"
           for h in cfg.get("DNS_Servers")]
    return out or None


# Old c-ares channels being closed after a reconfigure (a reference, so the task is not collected).
_CLOSING: set = set()


class Resolver:
    """MX and address lookups; `servers` are "ip:port" strings (empty: the system's resolv.conf).

    `timeout` (DNS_Timeout) is what one question gets in all; `tries` is c-ares' tries on the
    shared channel (1: c-ares backs off exponentially, so more tries overrun the timeout; an
    early timeout is asked again anyway, see _ask)."""

    def __init__(self, servers: list[str] | None = None, timeout: float = DNS_TIMEOUT, tries: int = 1):
        self._tries = tries
        self._use(servers, timeout)
        self._r: aiodns.DNSResolver | None = None
        self._cache: dict[tuple[str, int], tuple[float, object]] = {}
        self.queries = 0
        self.retries = 0  # questions asked again after c-ares gave up early (see _ask)

    def _resolver(self) -> aiodns.DNSResolver:
        if self._r is None:
            self._r = aiodns.DNSResolver(**self._kw)
        return self._r

    def _use(self, servers: list[str] | None, timeout: float) -> None:
        self.timeout = timeout
        self._servers = servers
        self._kw: dict = {"timeout": timeout, "tries": self._tries}
        if servers:
            self._kw["nameservers"] = list(servers)

    def reconfigure(self, servers: list[str] | None, timeout: float) -> bool:
        """Use other servers or another DNS_Timeout from the next question on (a reload, issue
        12); True if anything changed. The cache is dropped, as the new servers may answer
        differently; the counters go on (they feed Prometheus counters, which never go down).
        Questions in flight finish on the old channel, which is closed once they have had time."""
        if list(servers or []) == list(self._servers or []) and timeout == self.timeout:
            return False
        self._use(servers, timeout)
        self._cache.clear()
        old, self._r = self._r, None
        if old is not None:
            # Not closed at once: closing a c-ares channel fails the questions still on it.
            loop = asyncio.get_running_loop()

            def close_old() -> None:
                t = loop.create_task(_close(old))
                _CLOSING.add(t)
                t.add_done_callback(_CLOSING.discard)

            loop.call_later(timeout + HANG_GRACE, close_old)
        return True

    async def close(self) -> None:
        if self._r is not None:
            await _close(self._r)
            self._r = None

    async def _ask(self, name: str, qtype: str):
        """One DNS question, given at least `timeout` seconds (DNS_Timeout) before it times out.

        c-ares 1.34 sets each try's timeout from the server's past latency (five times the
        average, at least 250 ms), not from the configured timeout: once it has seen fast
        answers, an answer taking 0.8 s times out in about 0.6 s. So an early c-ares timeout is
        asked again, for the rest of the time, on a channel with no latency history."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        resolver = self._resolver()
        fresh: aiodns.DNSResolver | None = None
        try:
            while True:
                remaining = deadline - loop.time()
                try:
                    # c-ares' own timeout ends the try; the wait here only guards against a hang.
                    return await asyncio.wait_for(resolver.query_dns(name, qtype), max(remaining, 0.0) + HANG_GRACE)
                except TimeoutError:
                    raise aiodns.error.DNSError(ARES_ETIMEOUT, "Timeout while contacting DNS servers") from None
                except aiodns.error.DNSError as e:
                    if (e.args[0] if e.args else None) != ARES_ETIMEOUT:
                        raise
                    remaining = deadline - loop.time()
                    if remaining < MIN_DNS_RETRY:
                        raise
                if fresh is not None:
                    await _close(fresh)
                self.retries += 1
                fresh = resolver = aiodns.DNSResolver(**{**self._kw, "timeout": remaining, "tries": 1})
        finally:
            if fresh is not None:
                await _close(fresh)

    async def _query(self, name: str, qtype: int) -> tuple[list, float]:
        """Records of `qtype` for `name` (following CNAMEs) and the smallest TTL; [] for no data."""
        key = (name, qtype)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            if isinstance(hit[1], Exception):
                raise hit[1]
            return hit[1]  # type: ignore[return-value]
        target = name
        for _ in range(MAX_CNAME_CHAIN + 1):
            self.queries += 1
            try:
                res = await self._ask(target, _QTYPE_NAMES[qtype])
            except aiodns.error.DNSError as e:
                code = e.args[0] if e.args else None
                if code == ARES_ENODATA:
                    value: tuple[list, float] = ([], NEGATIVE_TTL)
                    self._cache[key] = (now + NEGATIVE_TTL, value)
                    return value
                if code == ARES_ENOTFOUND:
                    err = DNSNotFound(f"{name}: no such domain")
                    self._cache[key] = (now + NEGATIVE_TTL, err)
                    raise err from None
                raise DNSTempError(f"{name}: {e.args[1] if len(e.args) > 1 else e}") from None
            records = [r for r in res.answer if r.type == qtype]
            ttl = min((r.ttl for r in res.answer), default=NEGATIVE_TTL)
            if records:
                value = (records, max(float(ttl), MIN_TTL))
                self._cache[key] = (now + value[1], value)
                return value
            cnames = [r for r in res.answer if r.type == T_CNAME]
            if not cnames:
                value = ([], NEGATIVE_TTL)
                self._cache[key] = (now + NEGATIVE_TTL, value)
                return value
            target = cnames[-1].data.cname
        raise DNSTempError(f"{name}: CNAME chain longer than {MAX_CNAME_CHAIN}")

    async def mx(self, domain: str) -> tuple[list[tuple[int, str]], float]:
        """(preference, exchange) pairs, lowest first, and the TTL. A null MX (RFC 7505) comes back
        as [(0, "")]. [] means no MX records (use the implicit MX, RFC 5321 §5.1)."""
        records, ttl = await self._query(domain, T_MX)
        pairs = sorted((r.data.priority, r.data.exchange.rstrip(".").lower()) for r in records)
        return pairs, ttl

    async def txt(self, name: str) -> tuple[list[str], float]:
        """The TXT records of `name`, each as one string (its character-strings joined, RFC 7208
        §3.3 style), and the TTL; [] for none. DNSNotFound for NXDOMAIN."""
        records, ttl = await self._query(name, T_TXT)
        out = []
        for r in records:
            data = r.data.data
            out.append(data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data))
        return out, ttl

    async def addresses(self, host: str) -> tuple[list[str], float]:
        """IPv4 then IPv6 addresses of `host` and the smallest TTL; [] if it has none."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [str(ip)], float("inf")
        if is_localhost(host):
            return list(LOCALHOST_ADDRESSES), float("inf")
        a, aaaa = await asyncio.gather(self._query(host, T_A), self._query(host, T_AAAA), return_exceptions=True)
        out: list[str] = []
        ttls: list[float] = []
        errors: list[BaseException] = []
        for res, attr in ((a, "addr"), (aaaa, "addr")):
            if isinstance(res, BaseException):
                errors.append(res)
                continue
            out.extend(getattr(r.data, attr) for r in res[0])
            ttls.append(res[1])
        if not out and errors:
            # Prefer the transient error: a SERVFAIL on A with NXDOMAIN on AAAA must defer.
            for e in errors:
                if isinstance(e, DNSTempError):
                    raise e
            raise errors[0]
        return out, min(ttls, default=NEGATIVE_TTL)
