"""MTA-STS (RFC 8461): find, fetch, cache and apply a recipient domain's policy for delivery by MX.

A policy is found through the `_mta-sts.DOMAIN` TXT record (§3.1), fetched from
`https://mta-sts.DOMAIN/.well-known/mta-sts.txt` over verified HTTPS with the aiohttp client
(§3.3: no redirects, 200 only, text/plain, bounded size), all within MTA_STS_Timeout (seed 003's
`queue.outbound.timeouts.mta-sts`), and cached for its max_age (§5.1). The host mta-sts.DOMAIN
is resolved through the relay's own resolver (DNS_Servers), like every other next hop.

What the router does with it (fastrelay.routing): in `enforce` mode only the MX hosts whose names
match a policy pattern are used, and only with verified TLS (§5); none left defers the mail
with 4.7.x. `testing` only logs what enforce would have refused; `none` does nothing.

A policy that cannot be fetched and is not cached is treated as no policy (§5.1: the sender
"MUST NOT" fail delivery merely because the policy could not be had; a cached one is kept in force
until it expires), and logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass

from fastrelay import limits
from fastrelay.dns import DNSNotFound, DNSTempError, Resolver

log = logging.getLogger("fastrelay.mta_sts")

__all__ = ["MTASTS", "Policy", "PolicyError", "matches", "parse_policy", "parse_txt"]

# RFC 8461 §3.2: max_age is at most 31557600 (about a year).
MAX_AGE_LIMIT = 31_557_600


class PolicyError(Exception):
    """A policy that could not be had or is not valid; the text says why."""


@dataclass(frozen=True)
class Policy:
    mode: str  # "enforce", "testing" or "none"
    mx: tuple[str, ...]  # patterns: "mx.example.com" or "*.example.com"
    max_age: int
    id: str = ""  # the TXT record's id it was fetched for

    def allows(self, host: str) -> bool:
        return any(matches(p, host) for p in self.mx)


def matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: a pattern is a name, or "*." and a name matching exactly one more label on
    the left ("*.example.com" matches "mx.example.com", not "a.b.example.com" nor "example.com")."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return host == pattern


_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")


def parse_txt(records: list[str]) -> str | None:
    """The id of the one `v=STSv1` TXT record (§3.1), or None: none, or more than one (which
    the RFC says to treat as no policy)."""
    found = [r for r in records if r.startswith("v=STSv1")]
    if len(found) != 1:
        return None
    fields = {}
    for part in found[0].split(";"):
        k, _, v = part.strip().partition("=")
        if k:
            fields[k.strip()] = v.strip()
    rid = fields.get("id", "")
    return rid if _TXT_ID.fullmatch(rid) else None


def parse_policy(text: str) -> Policy:
    """The policy file (§3.2): `key: value` lines (CRLF or LF), version STSv1, a mode, mx lines
    (at least one unless mode is none) and max_age; unknown keys are ignored."""
    version = mode = None
    mx: list[str] = []
    max_age: int | None = None
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        k, sep, v = line.partition(":")
        if not sep:
            raise PolicyError(f"bad policy line {line[:80]!r}; expected key: value")
        k, v = k.strip(), v.strip()
        if k == "version":
            version = v
        elif k == "mode":
            mode = v
        elif k == "mx":
            mx.append(v)
        elif k == "max_age":
            if not v.isdigit() or len(v) > 10:
                raise PolicyError(f"bad max_age {v[:20]!r}; expected a whole number of seconds")
            max_age = min(int(v), MAX_AGE_LIMIT)
    if version != "STSv1":
        raise PolicyError(f"policy version {version!r}; expected STSv1")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"policy mode {mode!r}; expected enforce, testing or none")
    if max_age is None:
        raise PolicyError("policy has no max_age")
    if not mx and mode != "none":
        raise PolicyError("policy has no mx")
    return Policy(mode, tuple(mx), max_age)


class _ResolverAdapter:
    """aiohttp's resolver interface over the relay's DNS resolver (DNS_Servers)."""

    def __init__(self, dns: Resolver):
        self.dns = dns

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        ips, _ = await self.dns.addresses(host)
        if not ips:
            raise OSError(f"{host} has no address")
        return [{"hostname": host, "host": ip, "port": port,
                 "family": socket.AF_INET6 if ":" in ip else socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST} for ip in ips]

    async def close(self) -> None:
        return None


class MTASTS:
    """Policies by domain, fetched and cached (one per relay)."""

    def __init__(self, dns: Resolver, timeout: float, cafile: str | None = None,
                 port: int = limits.MTA_STS_PORT):
        self.dns = dns
        self.timeout = timeout
        self.cafile = cafile
        self.port = port
        self._cache: dict[str, tuple[float, Policy]] = {}  # domain -> (monotonic expiry, policy)
        self._ctx: ssl.SSLContext | None = None
        self.fetches = 0

    def _context(self) -> ssl.SSLContext:
        if self._ctx is None:
            # §3.3: the certificate must be valid for mta-sts.DOMAIN and chain to a trusted root.
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            if self.cafile:
                ctx.load_verify_locations(cafile=self.cafile)
            self._ctx = ctx
        return self._ctx

    async def policy(self, domain: str) -> Policy | None:
        """The policy in force for `domain`, or None. Never raises: a failure is logged and,
        with nothing cached, means no policy (§5.1)."""
        domain = domain.lower().rstrip(".")
        now = time.monotonic()
        cached = self._cache.get(domain)
        if cached is not None and cached[0] <= now:
            del self._cache[domain]
            cached = None
        try:
            return await asyncio.wait_for(self._lookup(domain, cached), self.timeout)
        except (PolicyError, DNSTempError, OSError, TimeoutError, UnicodeError) as e:
            why = str(e) or type(e).__name__
            if cached is not None:
                log.warning("%s: MTA-STS refresh failed (%s); the cached policy stays in force", domain, why)
                return cached[1]
            log.warning("%s: MTA-STS policy not available (%s); delivering as without a policy", domain, why)
            return None

    async def _lookup(self, domain: str, cached: tuple[float, Policy] | None) -> Policy | None:
        try:
            records, _ = await self.dns.txt(f"_mta-sts.{domain}")
        except DNSNotFound:
            records = []
        rid = parse_txt(records)
        if rid is None:
            # §5.1: without a TXT record a cached policy is still used until it expires.
            return cached[1] if cached is not None else None
        if cached is not None and cached[1].id == rid:
            return cached[1]
        policy = await self._fetch(domain)
        policy = Policy(policy.mode, policy.mx, policy.max_age, rid)
        self._cache[domain] = (time.monotonic() + policy.max_age, policy)
        return policy

    async def _fetch(self, domain: str) -> Policy:
        import aiohttp  # loaded only where MTA-STS is used

        host = f"mta-sts.{domain}"
        url = f"https://{host}:{self.port}/.well-known/mta-sts.txt" if self.port != 443 else \
            f"https://{host}/.well-known/mta-sts.txt"
        self.fetches += 1
        connector = aiohttp.TCPConnector(resolver=_ResolverAdapter(self.dns), ssl=self._context(),
                                         use_dns_cache=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status != 200:
                        # §3.3: "HTTP 3xx redirects MUST NOT be followed", and only 200 is a policy.
                        raise PolicyError(f"{url} answered {resp.status}; expected 200")
                    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
                    if ctype != "text/plain":
                        raise PolicyError(f"{url} is {ctype or 'untyped'}; expected text/plain")
                    body = await resp.content.read(limits.MTA_STS_MAX_POLICY + 1)
            except aiohttp.ClientError as e:
                raise PolicyError(f"fetching {url}: {e}") from None
        if len(body) > limits.MTA_STS_MAX_POLICY:
            raise PolicyError(f"{url} is larger than {limits.MTA_STS_MAX_POLICY} bytes")
        return parse_policy(body.decode("utf-8", "replace"))
