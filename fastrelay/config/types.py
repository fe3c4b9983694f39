"""Value types of conf options: check a written value and turn it into a typed Python value."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from fastrelay.config.parser import Atom, HashValue, ListValue, Value


class Invalid(Exception):
    """A written value is not of the option's type; `atom` says which value, for its position."""

    def __init__(self, message: str, atom: Atom | None = None):
        super().__init__(message)
        self.message = message
        self.atom = atom


class MomentumValue(Invalid):
    """A value Momentum documents and fastrelay does not implement (an auth_ds scheme in an
    Auth*Parameters uri): reported as an unsupported Momentum name, so --lenient warns and ignores
    the option instead of refusing the conf."""


class OptType:
    """A value type: `expected` describes it in error messages, `convert` checks and converts."""

    expected = "a value"
    is_list = False

    def convert(self, value: Value) -> Any:
        if isinstance(value, HashValue):
            raise Invalid(f"got a hash [ key = value ... ]; expected {self.expected}")
        if isinstance(value, ListValue):
            if self.is_list:
                return self.convert_list(value.items)
            raise Invalid(f"got a list; expected {self.expected}")
        if self.is_list:
            return self.convert_list([value])
        return self.convert_atom(value)

    def convert_atom(self, atom: Atom) -> Any:  # pragma: no cover - every type overrides it
        raise NotImplementedError

    def convert_list(self, items: list[Atom]) -> Any:  # pragma: no cover
        raise NotImplementedError

    def format(self, value: Any) -> str:
        return str(value)


class String(OptType):
    expected = "a string"

    def __init__(self, nonempty: bool = False, pattern: str | None = None, expected: str | None = None):
        self.nonempty = nonempty
        self.pattern = re.compile(pattern) if pattern else None
        if expected:
            self.expected = expected

    def convert_atom(self, atom: Atom) -> str:
        if self.nonempty and not atom.text:
            raise Invalid(f"got an empty string; expected {self.expected}", atom)
        if self.pattern is not None and not self.pattern.fullmatch(atom.text):
            raise Invalid(f"got '{atom.text}'; expected {self.expected}", atom)
        return atom.text

    def format(self, value: Any) -> str:
        return f'"{value}"'


class Int(OptType):
    def __init__(self, lo: int = 0, hi: int = 2**31 - 1):
        self.lo, self.hi = lo, hi
        self.expected = f"a whole number from {lo} to {hi}"

    def convert_atom(self, atom: Atom) -> int:
        t = atom.text.strip()
        if not re.fullmatch(r"-?[0-9]+", t):
            raise Invalid(f"got '{atom.text}'; expected {self.expected}", atom)
        n = int(t)
        if not self.lo <= n <= self.hi:
            raise Invalid(f"got {n}; expected {self.expected}", atom)
        return n


_TRUE = {"1", "true", "yes", "on", "enabled", "enable"}
_FALSE = {"0", "false", "no", "off", "disabled", "disable"}


class Bool(OptType):
    expected = "a boolean (1, 0, true, false, yes, no, on, off)"

    def convert_atom(self, atom: Atom) -> bool:
        t = atom.text.strip().lower()
        if t in _TRUE:
            return True
        if t in _FALSE:
            return False
        raise Invalid(f"got '{atom.text}'; expected {self.expected}", atom)

    def format(self, value: Any) -> str:
        return "true" if value else "false"


# "us" (microseconds) is for windows shorter than a millisecond, as spool_commit_delay's on a disk
# whose fsync takes 0.2 ms or less; whole numbers only, as in Momentum's times.
_TIME_UNITS = {"us": 0.000001, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TIME_RE = re.compile(r"([0-9]+)(us|ms|s|m|h|d)?", re.IGNORECASE)


class Time(OptType):
    """A duration, in seconds as a float. A plain number is in `unit` ("s", or "ms" where Momentum
    takes milliseconds, as for Delivery_Response_Timeout); `500ms`, `10s`, `3m`, `2h`, `7d` too."""

    def __init__(self, unit: str = "s", lo: float = 0.0, hi: float = 10 * 365 * 86400.0):
        self.unit = unit
        self.lo, self.hi = lo, hi
        plain = "milliseconds" if unit == "ms" else "seconds"
        self.expected = f"a time: a number of {plain}, or a number with a unit (500ms, 10s, 3m, 2h, 7d)"

    def convert_atom(self, atom: Atom) -> float:
        m = _TIME_RE.fullmatch(atom.text.strip())
        if not m:
            raise Invalid(f"got '{atom.text}'; expected {self.expected}", atom)
        seconds = int(m.group(1)) * _TIME_UNITS[(m.group(2) or self.unit).lower()]
        if not self.lo <= seconds <= self.hi:
            raise Invalid(
                f"got '{atom.text}' ({format_seconds(seconds)}); expected a time from "
                f"{format_seconds(self.lo)} to {format_seconds(self.hi)}",
                atom,
            )
        return seconds

    def format(self, value: Any) -> str:
        return format_seconds(value)


def format_seconds(seconds: float) -> str:
    """The shortest exact unit form of a duration: 10000 ms -> 10s, 1200 -> 20m, 0.0005 -> 500us."""
    us = round(seconds * 1_000_000)
    if us % 1000:
        return f"{us}us"
    ms = us // 1000
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}


class Size(OptType):
    """A size in bytes; `k`, `m`, `g` (powers of 1024) suffixes are accepted."""

    def __init__(self, lo: int = 0, hi: int = 2**40):
        self.lo, self.hi = lo, hi
        self.expected = "a size in bytes, optionally with a unit (64k, 10m, 1g)"

    def convert_atom(self, atom: Atom) -> int:
        m = re.fullmatch(r"([0-9]+)\s*([a-zA-Z]*)", atom.text.strip())
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise Invalid(f"got '{atom.text}'; expected {self.expected}", atom)
        n = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
        if not self.lo <= n <= self.hi:
            raise Invalid(f"got {n} bytes; expected a size from {self.lo} to {self.hi} bytes", atom)
        return n


class Enum(OptType):
    """One of a fixed set of words, case-insensitive; the canonical spelling is kept. `aliases`
    maps other accepted words to a choice (older spellings, booleans)."""

    def __init__(self, *choices: str, aliases: dict[str, str] | None = None):
        self.choices = {c.lower(): c for c in choices}
        for word, choice in (aliases or {}).items():
            self.choices.setdefault(word.lower(), self.choices[choice.lower()])
        self.expected = "one of " + ", ".join(choices)

    def convert_atom(self, atom: Atom) -> str:
        c = self.choices.get(atom.text.strip().lower())
        if c is None:
            raise Invalid(f"got '{atom.text}'; expected {self.expected}", atom)
        return c


_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


def is_hostname(text: str) -> bool:
    return len(text) <= 253 and bool(_HOSTNAME_RE.fullmatch(text))


def parse_host(text: str) -> str:
    """A hostname, an IPv4 address or a bracketed IPv6 literal ([::1]); IPv6 comes back unbracketed."""
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        if inner.lower().startswith("ipv6:"):
            inner = inner[5:]
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            raise ValueError(f"'{text}' is not a valid IPv6 literal") from None
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    if ":" in text:
        raise ValueError(f"'{text}' looks like an IPv6 address; write IPv6 literals in brackets: [{text}]")
    if not is_hostname(text):
        raise ValueError(f"'{text}' is not a valid hostname or IP address")
    return text.lower().rstrip(".")


def ascii_digits(text: str) -> bool:
    """Only ASCII digits: str.isdigit() also takes '²' and fullwidth digits, which int() refuses or
    reads (issue 9: numbers are ASCII digits only)."""
    return text.isascii() and text.isdigit()


def split_host_port(text: str, default_port: int | None = None, min_port: int = 1) -> tuple[str, int | None]:
    """'host', 'host:25', '1.2.3.4:25', '[::1]:25', '[::1]' -> (host, port); ValueError if malformed."""
    t = text.strip()
    if t.startswith("["):
        end = t.find("]")
        if end < 0:
            raise ValueError(f"'{text}' has an unclosed '['")
        host, rest = t[: end + 1], t[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected '{rest}' after '{host}'")
        port_s = rest[1:] if rest else None
    elif t.count(":") == 1:
        host, port_s = t.split(":")
    else:
        host, port_s = t, None
    port = default_port
    if port_s is not None:
        if not ascii_digits(port_s) or not min_port <= int(port_s) <= 65535:
            raise ValueError(f"port '{port_s}' is not a number from {min_port} to 65535")
        port = int(port_s)
    return parse_host(host) if host else "", port


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int | None

    def __str__(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return h if self.port is None else f"{h}:{self.port}"


class Host(OptType):
    """A hostname or IP address, with an optional :port (Gateway)."""

    expected = "a hostname or IP address, optionally with :port (IPv6 in brackets: [2001:db8::1]:25)"

    def convert_atom(self, atom: Atom) -> HostPort:
        try:
            host, port = split_host_port(atom.text)
        except ValueError as e:
            raise Invalid(f"{e}; expected {self.expected}", atom) from None
        if not host:
            raise Invalid(f"got '{atom.text}'; expected {self.expected}", atom)
        return HostPort(host, port)


class ListenAddress(OptType):
    """A listener address: "127.0.0.1:2525", "[::1]:2525", ":8080" (every address)."""

    expected = 'an address and port: "127.0.0.1:2525", "[::1]:2525" or ":8080"'

    def convert_atom(self, atom: Atom) -> HostPort:
        # Port 0 asks the kernel for a free port (the ready log line names it): handy for tests.
        text = atom.text
        for star in ("*:", "[*]:"):
            # Momentum's wildcards for every address: "*:25" and "[*]:25" are ":25".
            if text.strip().startswith(star):
                text = ":" + text.strip()[len(star):]
        try:
            host, port = split_host_port(text, min_port=0)
        except ValueError as e:
            raise Invalid(f"{e}; expected {self.expected}", atom) from None
        if port is None:
            raise Invalid(f"got '{atom.text}' with no port; expected {self.expected}", atom)
        return HostPort(host, port)


@dataclass(frozen=True, slots=True)
class Route:
    """One entry of Routes (seed 004): a host, `__mx__`, or smtp:// lmtp:// xfer:// with parameters."""

    scheme: str  # "mx" for __mx__, else "smtp", "lmtp" or "xfer"
    host: str = ""
    port: int | None = None
    pref: int | None = None
    ttl: int | None = None
    lookup: str | None = None  # "mx" or "a"; None: MX, then A (as for Gateway)
    text: str = ""

    def __str__(self) -> str:
        return self.text


_ROUTE_PARAMS = ("pref", "ttl", "port", "type")


def parse_route(text: str) -> Route:
    t = text.strip()
    if t.lower() == "__mx__":
        return Route("mx", text=t)
    scheme = "smtp"
    query = ""
    if "://" in t:
        scheme, _, rest = t.partition("://")
        scheme = scheme.lower()
        if scheme not in ("smtp", "lmtp", "xfer"):
            raise ValueError(f"unknown route scheme '{scheme}://'; expected smtp://, lmtp:// or xfer://")
        hostpart, _, query = rest.partition("?")
        hostpart = hostpart.rstrip("/")
    else:
        hostpart = t
    host, port = split_host_port(hostpart)
    if not host:
        raise ValueError(f"route '{text}' names no host")
    params: dict[str, str] = {}
    if query:
        for k, v in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
            k = k.lower()
            if k not in _ROUTE_PARAMS:
                raise ValueError(f"unknown route parameter '{k}'; expected pref, ttl, port or type")
            params[k] = v
        if not params and query:
            raise ValueError(f"cannot read the query string '?{query}'; expected pref=P&ttl=T&port=O&type=mx|a")

    def num(name: str, lo: int, hi: int) -> int | None:
        if name not in params:
            return None
        v = params[name]
        if not ascii_digits(v) or not lo <= int(v) <= hi:
            raise ValueError(f"route parameter {name}='{v}' is not a number from {lo} to {hi}")
        return int(v)

    pref = num("pref", 0, 65535)
    ttl = num("ttl", 0, 2**31 - 1)
    qport = num("port", 1, 65535)
    if qport is not None:
        if port is not None and port != qport:
            raise ValueError(f"route '{text}' gives two different ports")
        port = qport
    lookup = params.get("type")
    if lookup is not None:
        lookup = lookup.lower()
        if lookup not in ("mx", "a"):
            raise ValueError(f"route parameter type='{params['type']}'; expected type=mx or type=a")
    if scheme == "xfer" and port is None:
        raise ValueError(f"xfer route '{text}' has no port; expected xfer://host?port=N")
    return Route(scheme, host, port, pref, ttl, lookup, t)


class Routes(OptType):
    expected = (
        'a list of routes: ( "host" "__mx__" "smtp://ip?pref=P&ttl=T&port=O&type=mx|a" "lmtp://host" '
        '"xfer://host?port=N" )'
    )
    is_list = True

    def convert_list(self, items: list[Atom]) -> tuple[Route, ...]:
        if not items:
            raise Invalid(f"got an empty list; expected {self.expected}")
        out = []
        for a in items:
            try:
                out.append(parse_route(a.text))
            except ValueError as e:
                raise Invalid(f"{e}", a) from None
        return tuple(out)

    def format(self, value: Any) -> str:
        return "( " + " ".join(f'"{r.text}"' for r in value) + " )"


class CIDRList(OptType):
    expected = 'a list of networks or addresses: ( "127.0.0.0/8" "::1" "10.0.0.0/8" )'
    is_list = True

    def convert_list(self, items: list[Atom]) -> tuple:
        nets = []
        for a in items:
            t = a.text.strip()
            if t.startswith("[") and "]" in t:
                t = t[1:].replace("]", "", 1)
            try:
                nets.append(ipaddress.ip_network(t, strict=False))
            except ValueError:
                raise Invalid(f"got '{a.text}'; expected {self.expected}", a) from None
        return tuple(nets)

    def format(self, value: Any) -> str:
        return "( " + " ".join(f'"{n}"' for n in value) + " )"


DISABLED = "disabled"


class DomainRef(OptType):
    """A domain name whose settings are used instead (reroute_domain), or "disabled"."""

    expected = 'a domain name, or "disabled"'

    def convert_atom(self, atom: Atom) -> str:
        t = atom.text.strip().lower()
        if t == DISABLED:
            return DISABLED
        if not is_hostname(t):
            raise Invalid(f"got '{atom.text}'; expected {self.expected}", atom)
        return t.rstrip(".")


class StringList(OptType):
    expected = "a list of strings"
    is_list = True

    def convert_list(self, items: list[Atom]) -> tuple[str, ...]:
        return tuple(a.text for a in items)

    def format(self, value: Any) -> str:
        return "( " + " ".join(f'"{v}"' for v in value) + " )"


class HostList(OptType):
    """A list of host:port addresses (DNS servers)."""

    expected = 'a list of addresses: ( "127.0.0.1:53" "[::1]:53" )'
    is_list = True

    def convert_list(self, items: list[Atom]) -> tuple[HostPort, ...]:
        out = []
        for a in items:
            try:
                host, port = split_host_port(a.text)
            except ValueError as e:
                raise Invalid(f"{e}; expected {self.expected}", a) from None
            out.append(HostPort(host, port))
        return tuple(out)

    def format(self, value: Any) -> str:
        return "( " + " ".join(f'"{v}"' for v in value) + " )"


class URIPath(String):
    expected = 'a path that starts with "/", e.g. "/delay_message"'

    def convert_atom(self, atom: Atom) -> str:
        if not atom.text.startswith("/") or any(c.isspace() for c in atom.text):
            raise Invalid(f"got '{atom.text}'; expected {self.expected}", atom)
        return atom.text


class DomainList(OptType):
    expected = 'a list of domain names: ( "example.com" "example.net" )'
    is_list = True

    def convert_list(self, items: list[Atom]) -> frozenset[str]:
        out = set()
        for a in items:
            d = a.text.strip().lower().rstrip(".")
            if not is_hostname(d):
                raise Invalid(f"got '{a.text}'; expected {self.expected}", a)
            out.add(d)
        return frozenset(out)

    def format(self, value: Any) -> str:
        return "( " + " ".join(f'"{v}"' for v in sorted(value)) + " )"


@dataclass(frozen=True)
class Rate:
    """A throttle: `count` events per `period` seconds (Momentum's "N" = N per second, "N/S")."""

    count: int
    period: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        n, _, s = str(text).partition("/")
        # ASCII digits only: str.isdigit() also takes superscript and fullwidth digits (issue #9).
        if not re.fullmatch(r"[0-9]+", n) or (s and not re.fullmatch(r"[0-9]+", s)):
            raise ValueError(f"a rate is N or N/S with whole numbers, got {text!r}")
        count, period = int(n), float(s) if s else 1.0
        if count <= 0 or period <= 0:
            raise ValueError(f"a rate needs N > 0 and S > 0, got {text!r}")
        return cls(count, period)

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}"


class XferRoute(OptType):
    expected = 'an XFER peer: "xfer://host?port=N"'

    def convert_atom(self, atom: Atom) -> Route:
        try:
            r = parse_route(atom.text)
        except ValueError as e:
            raise Invalid(f"{e}", atom) from None
        if r.scheme != "xfer":
            raise Invalid(f"got '{atom.text}'; expected {self.expected}", atom)
        return r

    def format(self, value: Any) -> str:
        return f'"{value.text}"'


class RateType(OptType):
    expected = 'a rate: "N" (per second) or "N/S" (N per S seconds)'

    def convert_atom(self, atom: Atom) -> Rate:
        try:
            return Rate.parse(atom.text)
        except ValueError:
            raise Invalid(f"got '{atom.text}'; expected {self.expected}", atom) from None

    def format(self, value: Any) -> str:
        return f'"{value}"'
