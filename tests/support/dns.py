"""A real DNS server on loopback (dnslib, UDP and TCP) serving a zone that tests edit at run time.

What aiodns 4.0.4 (pycares 5.2, c-ares 1.34) does against it, as tests/test_support_dns.py checks.
Make the resolver with ``aiodns.DNSResolver(nameservers=[server.address], timeout=0.3, tries=1)``;
``server.address`` is ``"127.0.0.1:PORT"``, one server for UDP and TCP (``flags=
pycares.ARES_FLAG_USEVC`` forces TCP). ``await resolver.query_dns(name, qtype)`` returns a
``pycares.DNSResult(answer, authority, additional)``; each is a list of ``pycares.DNSRecord(name,
type, record_class, ttl, data)``; ``type`` is an int (``pycares.QUERY_TYPE_MX`` = 15 …), names
are lower case without the trailing dot, records come in zone order (sort MX yourself).

- MX: ``data`` is ``pycares.MXRecordData(priority: int, exchange: str)``.
- A / AAAA: ``pycares.ARecordData(addr: str)`` / ``pycares.AAAARecordData(addr: str)``, the
  address in compressed text form (``"::1"``).
- CNAME chain: an A query for an alias returns the whole chain in ``answer``: the
  ``CNAMERecordData(cname: str)`` links in order, each with its owner ``name``, then the
  ``ARecordData`` of the last name. Filter by ``type``. A "CNAME" query returns the first link.
  A CNAME loop gives SERVFAIL; a CNAME to a missing name gives NXDOMAIN.
- Null MX (RFC 7505, ``MX 0 .``): one ``MXRecordData(priority=0, exchange="")``: the root
  comes back as the empty string, not ".".
- Errors are all ``aiodns.error.DNSError`` (a plain Exception subclass) with ``args ==
  (code, message)``; compare ``e.args[0]`` with ``pycares.errno.ARES_*``:

  ==========================  ========================  ============================================
  case                        ``args[0]``               ``args[1]``
  ==========================  ========================  ============================================
  NODATA (name, no such type) ARES_ENODATA = 1          "DNS server returned answer with no data"
  SERVFAIL                    ARES_ESERVFAIL = 3        "DNS server returned general failure"
  NXDOMAIN                    ARES_ENOTFOUND = 4        "Domain name not found"
  REFUSED                     ARES_EREFUSED = 6         "DNS server refused query"
  nothing listens (UDP)       ARES_ECONNREFUSED = 11    "Could not contact DNS servers"
  no answer (``timeout()``)   ARES_ETIMEOUT = 12        "Timeout while contacting DNS servers"
  ==========================  ========================  ============================================

  A timeout takes about ``timeout * tries`` seconds and more (c-ares backs off: 0.3 s with
  tries=3 took 2 s), and every try reaches the server, so ``query_count`` counts tries.

Caching trap for the relay's router: c-ares caches answers in the channel (its query cache is on
by default; pycares offers no switch). Positive answers live for their TTL, so a test that edits
a record the relay already resolved must give it ``ttl=0`` or use a fresh resolver. This server
answers NXDOMAIN without an SOA and NODATA with TTL-0 records, so c-ares caches neither (c-ares
1.34 would otherwise keep a bare NODATA for 3600 s).
"""

from __future__ import annotations

import socketserver
import threading
import time
from collections import Counter
from typing import Any

from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSError, DNSLabel, DNSRecord
from dnslib.server import DNSHandler, TCPServer, UDPServer

__all__ = ["DNSServer"]

# A chain longer than this is answered SERVFAIL, as recursive resolvers do for CNAME loops.
MAX_CHAIN = 16
# How long a never-answered TCP query holds its connection open (bounded so threads end).
TCP_SILENCE_MAX = 30.0
_SOA = SOA("ns.test.", "hostmaster.test.", (1, 60, 60, 60, 0))


def _norm(name: str) -> str:
    return str(name).rstrip(".").lower()


class _Silence(DNSError):
    """Raised by the resolver for a name that must never be answered; DNSHandler drops it."""


class _QuietLogger:
    """dnslib prints every query by default; tests want a clean output."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


class _Handler(DNSHandler):
    def get_reply(self, data: bytes) -> bytes:
        try:
            return super().get_reply(data)
        except _Silence:
            if self.protocol == "tcp":
                # Hold the connection open: a TCP close would be an answer of its own (EOF).
                self.server.dns_stopping.wait(TCP_SILENCE_MAX)
            raise


class _Resolver:
    def __init__(self, owner: DNSServer) -> None:
        self.owner = owner

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        return self.owner._answer(request, handler.protocol)


class DNSServer:
    """Authoritative-and-recursive-looking DNS server for one editable zone.

    Unknown names get NXDOMAIN. Every record-adding method takes effect at once, from any
    thread (the server runs in its own threads; a lock guards the zone).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tcp: bool = True) -> None:
        self.host = host
        self._lock = threading.Lock()
        self._records: dict[str, list[RR]] = {}
        self._modes: dict[str, str] = {}
        self._delays: dict[str, float] = {}
        self.queries: Counter[tuple[str, str]] = Counter()
        self.query_log: list[tuple[str, str, str]] = []
        self._stopping = threading.Event()
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self._bind(host, port, tcp)
        self._start()

    # -- lifecycle -------------------------------------------------------------------------

    def _bind(self, host: str, port: int, tcp: bool) -> None:
        # UDP takes the ephemeral port; TCP must share the number (c-ares falls back to TCP on
        # the same server address), so retry a few ephemeral ports if TCP's is taken.
        for _ in range(20):
            udp = UDPServer((host, port), _Handler)
            if not tcp:
                self._servers = [udp]
                break
            try:
                tcps = TCPServer((host, udp.server_address[1]), _Handler)
            except OSError:
                udp.server_close()
                if port:
                    raise
                continue
            self._servers = [udp, tcps]
            break
        else:
            raise OSError("could not bind UDP and TCP on one port")
        self.port: int = self._servers[0].server_address[1]
        for srv in self._servers:
            srv.resolver = _Resolver(self)
            srv.logger = _QuietLogger()
            srv.dns_stopping = self._stopping

    def _start(self) -> None:
        for srv in self._servers:
            # A short poll interval keeps stop() fast.
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``, the form c-ares/aiodns take as a nameserver ("[::1]:PORT" for v6)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def stop(self) -> None:
        self._stopping.set()
        # shutdown() waits for serve_forever's next poll (up to poll_interval): ask the UDP and
        # the TCP server at once rather than one after the other.
        stoppers = [threading.Thread(target=srv.shutdown, daemon=True) for srv in self._servers]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(timeout=5)
        for srv in self._servers:
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers = []
        self._threads = []

    close = stop

    def __enter__(self) -> DNSServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> DNSServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    # -- zone editing ----------------------------------------------------------------------

    def _add(self, name: str, rtype: int, rdata: Any, ttl: int) -> None:
        key = _norm(name)
        with self._lock:
            self._records.setdefault(key, []).append(RR(key + ".", rtype, rdata=rdata, ttl=ttl))
            # Adding data to a name makes it a normal name again.
            self._modes.pop(key, None)

    def add_mx(self, domain: str, pref: int, host: str, ttl: int = 300) -> None:
        self._add(domain, QTYPE.MX, MX(DNSLabel(host.rstrip(".") + "."), pref), ttl)

    def null_mx(self, domain: str, ttl: int = 300) -> None:
        """RFC 7505 null MX: the domain accepts no mail (``MX 0 .``); replaces its other MXs."""
        key = _norm(domain)
        with self._lock:
            rrs = [rr for rr in self._records.get(key, []) if rr.rtype != QTYPE.MX]
            self._records[key] = rrs
        self._add(domain, QTYPE.MX, MX(DNSLabel("."), 0), ttl)

    def add_a(self, host: str, ip: str, ttl: int = 300) -> None:
        self._add(host, QTYPE.A, A(ip), ttl)

    def add_aaaa(self, host: str, ip: str, ttl: int = 300) -> None:
        self._add(host, QTYPE.AAAA, AAAA(ip), ttl)

    def add_cname(self, name: str, target: str, ttl: int = 300) -> None:
        self._add(name, QTYPE.CNAME, CNAME(DNSLabel(target.rstrip(".") + ".")), ttl)

    def add_txt(self, name: str, text: str, ttl: int = 300) -> None:
        self._add(name, QTYPE.TXT, TXT(text), ttl)

    def remove(self, name: str) -> None:
        """Forget a name's records and mode (it becomes NXDOMAIN)."""
        key = _norm(name)
        with self._lock:
            self._records.pop(key, None)
            self._modes.pop(key, None)
            self._delays.pop(key, None)

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL for every query of ``name`` (its records are kept for later)."""
        with self._lock:
            self._modes[_norm(name)] = "servfail"

    def refused(self, name: str) -> None:
        """Answer REFUSED for every query of ``name``."""
        with self._lock:
            self._modes[_norm(name)] = "refused"

    def nxdomain(self, name: str) -> None:
        """Answer NXDOMAIN for ``name`` (the default for names with no records)."""
        with self._lock:
            self._modes[_norm(name)] = "nxdomain"

    def timeout(self, name: str) -> None:
        """Never answer queries for ``name`` (the resolver times out)."""
        with self._lock:
            self._modes[_norm(name)] = "timeout"

    def delay(self, name: str, seconds: float) -> None:
        """Answer queries for ``name`` only after ``seconds`` (a slow resolver path)."""
        with self._lock:
            self._delays[_norm(name)] = seconds

    def heal(self, name: str) -> None:
        """Undo servfail/refused/nxdomain/timeout/delay for ``name``; its records answer again."""
        key = _norm(name)
        with self._lock:
            self._modes.pop(key, None)
            self._delays.pop(key, None)

    def clear(self) -> None:
        """Empty the zone, the modes and the query counts."""
        with self._lock:
            self._records.clear()
            self._modes.clear()
            self._delays.clear()
            self.queries.clear()
            self.query_log.clear()

    def query_count(self, name: str, qtype: str | None = None) -> int:
        """Queries received for ``name`` (of ``qtype``, e.g. "MX", or of any type)."""
        key = _norm(name)
        with self._lock:
            if qtype is not None:
                return self.queries[(key, qtype.upper())]
            return sum(n for (qn, _), n in self.queries.items() if qn == key)

    # -- answering -------------------------------------------------------------------------

    def _answer(self, request: DNSRecord, proto: str) -> DNSRecord:
        qname = _norm(request.q.qname)
        qtype = request.q.qtype
        with self._lock:
            self.queries[(qname, QTYPE.get(qtype, str(qtype)))] += 1
            self.query_log.append((qname, QTYPE.get(qtype, str(qtype)), proto))
            delay = self._delays.get(qname, 0.0)
        if delay:
            time.sleep(delay)  # each request has its own thread (ThreadingMixIn)
        reply = request.reply()  # sets aa and ra: we look like a recursive resolver
        with self._lock:
            rcode = self._fill(reply, qname, qtype)
        if rcode == "timeout":
            raise _Silence("no answer for " + qname)
        reply.header.rcode = getattr(RCODE, rcode)
        return reply

    def _fill(self, reply: DNSRecord, qname: str, qtype: int) -> str:
        """Put the answer (following CNAMEs inside the zone) into ``reply``; return the rcode."""
        cur = qname
        seen: set[str] = set()
        for _ in range(MAX_CHAIN):
            mode = self._modes.get(cur)
            if mode == "timeout":
                return "timeout"
            if mode is not None:
                return {"servfail": "SERVFAIL", "refused": "REFUSED", "nxdomain": "NXDOMAIN"}[mode]
            rrs = self._records.get(cur)
            if not rrs:
                # A dangling CNAME is NXDOMAIN with the chain so far, as BIND answers.
                return "NXDOMAIN"
            matching = [rr for rr in rrs if rr.rtype == qtype]
            if matching:
                reply.add_answer(*matching)
                return "NOERROR"
            cnames = [rr for rr in rrs if rr.rtype == QTYPE.CNAME]
            if not cnames:
                # NODATA: the name exists, not this type. c-ares 1.34 caches a NOERROR answer
                # for the least TTL of its non-SOA records, i.e. for its max (3600 s) when there
                # are none. A TTL-0 glue record stops that, so a record added later is seen.
                reply.add_auth(RR(cur + ".", QTYPE.SOA, ttl=0, rdata=_SOA))
                reply.add_ar(RR("ns.test.", QTYPE.A, ttl=0, rdata=A("127.0.0.1")))
                return "NOERROR"
            seen.add(cur)
            reply.add_answer(cnames[0])
            cur = _norm(cnames[0].rdata.label)
            if cur in seen:
                return "SERVFAIL"
        return "SERVFAIL"
