"""Every known option and stanza: name, type, the scopes where it is valid, default and meaning."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from fastrelay import limits
from fastrelay.config import types as t
from fastrelay.config.parser import ListValue

# Scopes. The outbound fallback order is Momentum's: binding::domain, binding, binding_group,
# domain, global.
GLOBAL = "global"
DOMAIN = "domain"
BINDING = "binding"
BINDING_GROUP = "binding_group"
BINDING_DOMAIN = "binding_domain"
HOST = "host"
BINDING_HOST = "binding_host"
BINDING_GROUP_DOMAIN = "binding_group_domain"
ESMTP_LISTENER = "esmtp_listener"
ESMTP_LISTEN = "esmtp_listen"
HTTP_LISTENER = "http_listener"
HTTP_LISTEN = "http_listen"
SCRIPTLET = "scriptlet"
SCRIPT = "script"
EVENTLOOP = "eventloop"
SECURITY = "security"

SCOPE_NAMES = {
    GLOBAL: "the global scope",
    DOMAIN: "a Domain stanza",
    BINDING: "a Binding stanza",
    BINDING_GROUP: "a Binding_Group stanza",
    BINDING_DOMAIN: "a Domain stanza inside a Binding",
    HOST: "a Host stanza",
    BINDING_HOST: "a Host stanza inside a Binding",
    BINDING_GROUP_DOMAIN: "a Domain stanza inside a Binding_Group",
    ESMTP_LISTENER: "an ESMTP_Listener stanza",
    ESMTP_LISTEN: "a Listen stanza of an ESMTP_Listener",
    HTTP_LISTENER: "an HTTP_Listener stanza",
    HTTP_LISTEN: "a Listen stanza of an HTTP_Listener",
    SCRIPTLET: "a scriptlet stanza",
    SCRIPT: "a script stanza",
    EVENTLOOP: "an eventloop stanza",
    SECURITY: "the Security stanza",
}

OUTBOUND = frozenset({GLOBAL, BINDING_GROUP, BINDING, DOMAIN, BINDING_DOMAIN})
ROUTING = frozenset({GLOBAL, DOMAIN, BINDING_DOMAIN})
LISTENER = frozenset({GLOBAL, ESMTP_LISTENER, ESMTP_LISTEN})
HTTP = frozenset({GLOBAL, HTTP_LISTENER, HTTP_LISTEN})


# The Routes documentation (docs/config.md): how explicit and implicit preferences combine.
_ROUTES_DOC = """\
Where mail of this scope goes: hostnames, IPs, "__mx__" (the domain's MX records),
"smtp://host?pref=P&ttl=T&port=O&type=mx|a", "lmtp://host?port=N" and "xfer://host?port=N".
Unset means "__mx__".

How the order is made (seed 004: "the routes are listed in preferential order, with the first
listed item being attempted before any others, unless there is an explicit preference applied
to the item"):

- An entry without `pref=` keeps its place in the list. The first entry is used exclusively
  while one of its hosts is up and below its connection limits; the next entry only when none
  is, and so on.
- An entry that expands to several hosts keeps its place as a whole. Inside `__mx__` or a name
  with MX records, the MX preference orders the hosts (lowest first, equal preferences spread
  evenly); a name with several addresses is one group, spread evenly.
- Entries with an explicit `pref=` are ordered among themselves by it, lowest first; entries
  with the same value form one group that connections are spread over evenly. That sorted block
  takes the place of the first `pref=` entry in the list, and entries without `pref=` keep
  theirs. So `pref=` never competes numerically with the MX preferences inside `__mx__`.
- An address reached twice (listed, and also one of the MXs) is used at its first place only.
- `ttl=T` is the entry's time to live, as given: the plan is rebuilt after T seconds. Without
  it, DNS answers count for their TTL and a plan is re-read at least every 5 minutes.
- An entry that cannot be resolved is skipped while another entry is usable. Mail bounces only
  when every entry fails for good (NXDOMAIN or a null MX for `__mx__`, or nothing but
  Prohibited_Hosts addresses); it is deferred when none is usable and some failure may heal
  (SERVFAIL, a timeout, an unknown route host).

Examples:

    Routes = ( "__mx__" "smarthost.example" )    # the MXs (by MX preference), then the smart host
    Routes = ( "10.0.0.3" "__mx__" )             # 10.0.0.3 only; the MXs while it is unavailable
    Routes = ( "smtp://relay.example?pref=1" "__mx__" )  # the smart host first, then the MXs
    Routes = ( "smtp://10.0.11.7?pref=10" "smtp://10.0.11.8?pref=10" )  # spread over both
    Routes = ( "smtp://b.example?pref=20" "c.example" "smtp://a.example?pref=10" )  # a, b, then c
"""


@dataclass(frozen=True)
class OptionDef:
    name: str  # canonical spelling; lookups are case-insensitive
    type: t.OptType
    scopes: frozenset[str]
    default: Any
    doc: str
    # Other names accepted for it (an older fastrelay name, or Momentum's other spelling); a value
    # is stored, looked up and shown under `name`.
    aliases: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.name.lower()

    def format(self, value: Any) -> str:
        if value is None:
            return "(unset)"
        return self.type.format(value)


class _MailAddress(t.String):
    """An address local@domain as RCPT TO would take it (RFC 5321 §4.1.2)."""

    expected = "an address local@domain"

    def convert_atom(self, atom):  # type: ignore[override]
        from fastrelay.smtp import replies
        from fastrelay.smtp.address import AddressError, parse_path

        try:
            path, rest = parse_path(f"<{atom.text}>", replies.BAD_RCPT_SYNTAX, allow_null=False)
        except AddressError:
            path, rest = None, ""
        if path is None or rest:
            raise t.Invalid(f"got '{atom.text}'; expected {self.expected}", atom)
        return atom.text

class _WorkerCount(t.OptType):
    expected = f"a whole number from 1 to {limits.MAX_WORKERS}, or auto (one per CPU)"

    def convert_atom(self, atom):  # type: ignore[override]
        text = atom.text.strip().lower()
        if text == "auto":
            return "auto"
        if text.isdigit() and 1 <= int(text) <= limits.MAX_WORKERS:
            return int(text)
        raise t.Invalid(f"got '{atom.text}'; expected {self.expected}", atom)


class _PoolName(t.OptType):
    expected = "the name of an eventloop stanza"

    def convert_atom(self, atom):  # type: ignore[override]
        if not atom.text or any(c.isspace() for c in atom.text):
            raise t.Invalid(f"got '{atom.text}'; expected {self.expected}", atom)
        return atom.text

    def format(self, value):  # type: ignore[override]
        return f'"{value}"'


class _BindingName(t.OptType):
    """Momentum: "Binding names are case-sensitive. Spaces and colons are not allowed"."""

    expected = "a binding name without spaces or colons"

    def convert_atom(self, atom):  # type: ignore[override]
        text = atom.text
        if not text or len(text) > limits.MAX_BINDING_NAME or any(c.isspace() or c == ":" or not c.isprintable()
                                                                 for c in text):
            raise t.Invalid(f"got '{text}'; expected {self.expected}", atom)
        return text


class _BindAddress(t.OptType):
    """Momentum's bind_address: an IP address, a local host name, or "*" (the kernel chooses)."""

    expected = 'an IP address, a local host name or "*", or a list of IP addresses'

    def convert(self, value):  # type: ignore[override]
        # A list of IP addresses (Stalwart's source-ip.v4/.v6): one is chosen at random for each
        # new connection, among those of the destination's family.
        if isinstance(value, ListValue):
            if not value.items:
                raise t.Invalid(f"got an empty list; expected {self.expected}")
            out = []
            for atom in value.items:
                try:
                    out.append(str(ipaddress.ip_address(atom.text.strip().strip("[]"))))
                except ValueError:
                    raise t.Invalid(f"got '{atom.text}'; expected an IP address in a Bind_Address list",
                                    atom) from None
            return tuple(out)
        return super().convert(value)

    def format(self, value):  # type: ignore[override]
        if isinstance(value, tuple):
            return "( " + " ".join(f'"{a}"' for a in value) + " )"
        return "*" if value is None else f'"{value}"'

    def convert_atom(self, atom):  # type: ignore[override]
        text = atom.text.strip()
        if text == "*":
            return None
        try:
            return str(ipaddress.ip_address(text.strip("[]")))
        except ValueError:
            pass
        if t.is_hostname(text.lower().rstrip(".")):
            return text.lower().rstrip(".")
        raise t.Invalid(f"got '{atom.text}'; expected {self.expected}", atom)


# Momentum's TLS_Protocols tokens (tls_protocols page); SSLv2 is accepted and never negotiated.
TLS_PROTOCOL_TOKENS = ("ALL", "SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3")


class _TLSProtocols(t.OptType):
    expected = 'a list of +/- protocol tokens such as "+ALL:-TLSv1.0:-TLSv1.1"'

    def convert_atom(self, atom):  # type: ignore[override]
        out = []
        known = {k.lower(): k for k in TLS_PROTOCOL_TOKENS}
        for part in atom.text.split(":"):
            part = part.strip()
            sign, name = (part[0], part[1:]) if part[:1] in "+-" and part else ("+", part)
            if name.lower() not in known:
                raise t.Invalid(f"got '{atom.text}': unknown protocol '{name}'; expected {self.expected} "
                                f"(tokens {', '.join(TLS_PROTOCOL_TOKENS)})", atom)
            out.append(sign + known[name.lower()])
        return ":".join(out)

    def format(self, value):  # type: ignore[override]
        return f'"{value}"'


# Options fastrelay has, in scopes where Momentum documents them and fastrelay does not implement
# them: reported as unsupported Momentum names (so --lenient warns), not as misplaced options.
# Momentum's HTTP_Listener takes SMTP AUTH's options for HTTP basic authentication (modules/ac-auth.md).
# Momentum's `concurrency` in a listener sizes a thread pool; fastrelay's session limit there is
# Listener_Sessions, and its Concurrency is only the eventloop stanza's (multi-event-loops.md).
MOMENTUM_ONLY_SCOPES = frozenset(
    [(key, scope)
     for key in ("enable_authentication", "authplainparameters", "authloginparameters")
     for scope in (HTTP_LISTENER, HTTP_LISTEN)]
    + [("concurrency", scope) for scope in (ESMTP_LISTENER, ESMTP_LISTEN, HTTP_LISTENER, HTTP_LISTEN)]
)


class _AuthParams(t.OptType):
    """Momentum's Auth*Parameters: a hash with a uri (file:// only), or (until the conf language
    reads hashes) the uri alone as a string. The value is {"uri": path, ...}."""

    expected = 'a password file: [ uri = "file:///path" ] or "file:///path"'
    _KEYS = frozenset({"uri", "log_authentication"})

    def convert(self, value):  # type: ignore[override]
        pairs = getattr(value, "items", None)
        if isinstance(pairs, list) and not isinstance(value, t.ListValue):  # a hash (HashValue)
            out: dict[str, str] = {}
            uri_atom = None
            for key, v in pairs:
                if key.text.lower() not in self._KEYS:
                    raise t.Invalid(f"got the key '{key.text}'; expected uri (and log_authentication)", key)
                if not hasattr(v, "text"):
                    raise t.Invalid(f"got a list or hash for '{key.text}'; expected a string", key)
                out[key.text.lower()] = v.text
                if key.text.lower() == "uri":
                    uri_atom = v
            if uri_atom is None:
                raise t.Invalid(f"got no uri; expected {self.expected}", pairs[0][0] if pairs else None)
            out["uri"] = self._path(out["uri"], uri_atom)
            return out
        if isinstance(value, t.ListValue):
            raise t.Invalid(f"got a list; expected {self.expected}")
        return {"uri": self._path(value.text, value)}

    def _path(self, uri: str, where):
        atom = where if hasattr(where, "text") else None
        if uri.startswith("file://"):
            path = uri[len("file://"):]
        elif uri.startswith("file:"):
            path = uri[len("file:"):]
        elif "://" in uri:
            # Momentum's auth_ds / ac_auth schemes (mysqlauth://, ac_auth://): another backend.
            raise t.MomentumValue(f"'{uri}' is a Momentum authentication backend (auth_ds); fastrelay "
                                  "reads password files only: expected a file:// uri", atom)
        else:
            path = uri
        if not path:
            raise t.Invalid(f"got '{uri}'; expected {self.expected}", atom)
        return path

    def format(self, value) -> str:
        return f'[ uri = "file://{value["uri"]}" ]'


class _UserTable(t.OptType):
    """A table keyed by SMTP AUTH user: a list of "user=value" strings, or a hash [ user = "value" ].
    With `list_values`, each value is a set of domains ("user=a.com,b.com", or a list in a hash)."""

    def __init__(self, list_values: bool = False):
        self.list_values = list_values
        if list_values:
            self.expected = 'a list of "user=domain[,domain...]" strings, or a hash [ user = ( "domain" ... ) ]'
        else:
            self.expected = 'a list of "user=binding" strings, or a hash [ user = "binding" ]'

    def convert(self, value):  # type: ignore[override]
        pairs = getattr(value, "items", None)
        out: dict = {}
        if isinstance(pairs, list) and not isinstance(value, t.ListValue):  # a hash (HashValue)
            for key, v in pairs:
                if isinstance(v, t.ListValue) and self.list_values:
                    out[key.text] = self._domains([a.text for a in v.items], v.items[0] if v.items else key)
                elif hasattr(v, "text"):
                    out[key.text] = self._value(v.text, v)
                else:
                    raise t.Invalid(f"got a hash for '{key.text}'; expected {self.expected}", key)
            return out
        items = value.items if isinstance(value, t.ListValue) else [value]
        for atom in items:
            user, sep, val = atom.text.rpartition("=")
            if not sep or not user:
                raise t.Invalid(f"got '{atom.text}'; expected {self.expected}", atom)
            out[user] = self._value(val, atom)
        return out

    def _value(self, text: str, atom):
        if self.list_values:
            return self._domains(text.split(","), atom)
        if not text or any(c.isspace() for c in text):
            raise t.Invalid(f"got '{text}'; expected a binding name without spaces", atom)
        return text

    def _domains(self, names: list[str], atom) -> frozenset:
        doms = [n.strip().lower().rstrip(".") for n in names]
        for d in doms:
            if not t.is_hostname(d):
                raise t.Invalid(f"got '{d}'; expected a domain name", atom)
        return frozenset(doms)

    def format(self, value) -> str:
        if not value:
            return "( )"
        if self.list_values:
            return "( " + " ".join(f'"{u}={",".join(sorted(d))}"' for u, d in value.items()) + " )"
        return "( " + " ".join(f'"{u}={b}"' for u, b in value.items()) + " )"


class _MaxRetries(t.Int):
    """A retry count, or Momentum's "auto" / "none" (both: no count, message_expiration decides)."""

    def __init__(self) -> None:
        super().__init__(0, 1_000_000)
        self.expected = f'{self.expected}, "auto" or "none"'

    def convert_atom(self, atom):  # type: ignore[override]
        if atom.text.strip().lower() in ("auto", "none"):
            return 0
        return super().convert_atom(atom)


def _nets(*texts: str) -> tuple:
    return tuple(ipaddress.ip_network(x) for x in texts)


OPTIONS: list[OptionDef] = [
    # --- Routing (seeds 002 and 004) -----------------------------------------------------------
    OptionDef("Gateway", t.Host(), OUTBOUND, None,
              "Send all mail of this scope to this host (a smart host). It is resolved as MX, "
              "then as A/AAAA when there is no MX. An optional :port overrides Remote_SMTP_Port."),
    OptionDef("Routes", t.Routes(), ROUTING | {BINDING}, None, _ROUTES_DOC),
    OptionDef("Sender_Domains", t.DomainList(), frozenset({BINDING}), (),
              "Mail whose envelope sender's domain is in this list is assigned to this binding, unless "
              "its listener (Binding, Binding_Group) or a trusted Binding_Header assigns it already; a "
              "domain listed by several bindings goes to the first. With Routes in the Binding, this "
              "routes by sender domain (Stalwart's next-hop rules on sender-domain)."),
    OptionDef("Delivery_Method", t.Enum("ESMTP", "SMTP", "LMTP", "delay_xfer"), OUTBOUND, "ESMTP",
              "ESMTP (EHLO, falling back to HELO), SMTP (HELO only), LMTP (RFC 2033) or delay_xfer "
              "(XFER over HTTP to the relay named by Routes)."),
    OptionDef("Remote_SMTP_Port", t.Int(1, 65535), OUTBOUND, 25,
              "The port outbound SMTP and LMTP connect to unless a route names one."),
    OptionDef("Delivery_Response_Timeout", t.Time("ms", lo=0.001), frozenset({GLOBAL, BINDING, DOMAIN, BINDING_DOMAIN}),
              5.0,
              "As Momentum's: how long to wait for the response to an HTTP delivery, here an XFER "
              "transfer (Delivery_Method = delay_xfer); a large body gets a little more time to "
              "upload. A plain number is in milliseconds (default 5000). The reply after an SMTP or "
              "LMTP final dot is body_timeout's."),
    OptionDef("body_timeout", t.Time(lo=0.001), OUTBOUND, 600.0,
              "As Momentum's: how long to wait for the reply after the final dot of DATA (or the last "
              "BDAT) over SMTP and LMTP (RFC 5321 §4.5.3.2.6: 10 minutes). Seconds."),
    OptionDef("max_outbound_connections", t.Int(0, 1_000_000), OUTBOUND | {HOST}, 32,
              "Connections open at once to the hosts of a destination (keyed by its set of MX "
              "hosts, so domains that share MXs share the limit); in a Host stanza, to that host. "
              "0 means no limit."),
    OptionDef("Prohibited_Hosts", t.CIDRList(), frozenset({GLOBAL}),
              _nets("127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128"),
              "Networks never connected to when DNS gives them (Momentum: a guard against DNS tricks, "
              "such as an MX that resolves to loopback). An address the conf names itself is trusted: "
              "an IP written in Routes or Gateway, \"localhost\" (RFC 6761), or an address with a Host "
              "stanza. A route to one of our own listeners is refused whatever this says (\"loops back "
              "to myself\", 5.4.6). The default covers loopback and the unspecified address."),
    OptionDef("DNS_Servers", t.HostList(), frozenset({GLOBAL}), (),
              "The DNS servers asked for MX, A and AAAA records, as \"ip:port\". Empty means the "
              "system's resolv.conf."),
    OptionDef("DNS_Timeout", t.Time(lo=0.01), frozenset({GLOBAL}), limits.DNS_TIMEOUT,
              "The least time a DNS question (MX, A, AAAA) gets before it counts as a timeout, and "
              "the mail waiting for it is deferred. It holds even after fast answers, when the resolver "
              "library would otherwise give up on a slower one in well under a second."),
    # --- Seed 003 (Stalwart's transport and routing), written the ecelerity way -------------
    OptionDef("IP_Strategy", t.Enum("any", "ipv4-only", "ipv6-only", "ipv6-then-ipv4", "ipv4-then-ipv6"),
              OUTBOUND, "any",
              "Which address families of a next hop are used (seed 003, Stalwart's "
              "queue.outbound.ip-strategy): any (Momentum's way: A and AAAA addresses at one "
              "preference), ipv4-only, ipv6-only, or ipv6-then-ipv4 / ipv4-then-ipv6: the second "
              "family is tried only when the first has no usable address or all its addresses "
              "failed in this attempt."),
    OptionDef("Max_MX_Hosts", t.Int(0, 1000), OUTBOUND, limits.MAX_MX_HOSTS,
              "The most MX hosts (host names) of one route entry tried in one delivery attempt (seed "
              "003, Stalwart's queue.outbound.limits.mx); when they all failed to connect the mail "
              "is deferred, the others are not tried. 0 means no limit."),
    OptionDef("Max_MX_Addresses", t.Int(0, 1000), OUTBOUND, limits.MAX_MX_ADDRESSES,
              "For a multi-homed next hop, the most of its addresses tried in one delivery attempt "
              "(seed 003, Stalwart's queue.outbound.limits.multihomed), counted in IP_Strategy order. "
              "0 means no limit."),
    OptionDef("TLS_Implicit", t.Bool(), OUTBOUND, False,
              "TLS from the first byte (RFC 8314 §3, SMTPS/LMTPS; Stalwart's remote tls.implicit): "
              "the handshake comes before the greeting and STARTTLS is not used. TLS_Verify still says "
              "how the certificate is checked; a failed handshake makes the host unusable (4.7.5)."),
    OptionDef("Session_Timeout", t.Time(), OUTBOUND, 0.0,
              "One bound for a whole delivery session, from the connect to QUIT, whatever each "
              "phase's own timeout (Stalwart's remote timeout); past it the connection is dropped "
              "and the recipients not answered yet are deferred (4.4.2). 0 (the default) means none."),
    OptionDef("use_mta_sts", t.Bool(), ROUTING, False,
              "Momentum's use_mta_sts: look up the recipient domain's MTA-STS policy (RFC 8461) for "
              "delivery by MX: the `_mta-sts` TXT record, then "
              "https://mta-sts.DOMAIN/.well-known/mta-sts.txt over verified HTTPS (no redirects), "
              "cached in memory for its max_age. A policy that cannot be fetched and is not cached "
              "counts as none (RFC 8461 §5.1), and is logged. A Stalwart TOML file has it on "
              "(Stalwart always applies MTA-STS)."),
    OptionDef("enable_mta_sts", t.Bool(), OUTBOUND, True,
              "Momentum's enable_mta_sts: apply the policy use_mta_sts found. enforce: only the MX "
              "hosts matching the policy, and only with TLS = required and TLS_Verify = host for that "
              "mail, whatever TLS and TLS_Verify say; no MX left defers it with 4.7.0, a TLS failure "
              "with 4.7.x. testing (or enable_mta_sts = false): logs what enforce would refuse and "
              "delivers. none: nothing."),
    OptionDef("MTA_STS_Timeout", t.Time(lo=0.001), frozenset({GLOBAL}), 120.0,
              "How long an MTA-STS policy lookup (TXT record and HTTPS fetch together) may take "
              "(seed 003's queue.outbound.timeouts.mta-sts)."),
    OptionDef("MTA_STS_CA", t.String(nonempty=True, expected="a PEM file path"), frozenset({GLOBAL}), None,
              "CA certificates (PEM) trusted for MTA-STS policy fetches, in addition to the system "
              "store. Relative to the conf file."),
    OptionDef("MTA_STS_Port", t.Int(1, 65535), frozenset({GLOBAL}), limits.MTA_STS_PORT,
              "The HTTPS port MTA-STS policies are fetched from (RFC 8461 §3.3: 443)."),
    # --- Outbound sessions (per-phase timeouts as in seed 003 and RFC 5321 §4.5.3.2) ----------
    OptionDef("Connect_Timeout", t.Time(lo=0.001), OUTBOUND, 300.0,
              "How long a TCP connect to a next hop may take (Momentum's default, 300 seconds; "
              "Postfix's smtp_connect_timeout is 30s)."),
    OptionDef("Greeting_Timeout", t.Time(lo=0.001), OUTBOUND, 300.0,
              "How long to wait for the 220 greeting (RFC 5321 §4.5.3.2.1: 5 minutes)."),
    OptionDef("EHLO_Timeout", t.Time(lo=0.001), OUTBOUND, 300.0, "How long to wait for the EHLO/LHLO reply."),
    OptionDef("TLS_Timeout", t.Time(lo=0.001), OUTBOUND, 120.0, "How long a STARTTLS handshake may take."),
    OptionDef("mailfrom_timeout", t.Time(lo=0.001), OUTBOUND, 300.0,
              "How long to wait for the reply to MAIL (RFC 5321 §4.5.3.2.2: 5 minutes), as Momentum's "
              "mailfrom_timeout.", aliases=("Mail_From_Timeout",)),
    OptionDef("rcptto_timeout", t.Time(lo=0.001), OUTBOUND, 300.0,
              "How long to wait for each RCPT reply (RFC 5321 §4.5.3.2.3: 5 minutes), as Momentum's "
              "rcptto_timeout.", aliases=("Rcpt_To_Timeout",)),
    OptionDef("Data_Timeout", t.Time(lo=0.001), OUTBOUND, 120.0,
              "How long to wait for the 354 after DATA (RFC 5321 §4.5.3.2.4: 2 minutes) and for "
              "each block of the body to be taken (§4.5.3.2.5: 3 minutes)."),
    OptionDef("RSET_Timeout", t.Time(lo=0.001), OUTBOUND, 30.0,
              "How long to wait for the reply to RSET between two messages on one connection."),
    OptionDef("idle_timeout", t.Time(), OUTBOUND, 5.0,
              "As Momentum's: how long an outbound connection with nothing more to send stays open in "
              "case more mail comes for its destination; 0 closes it at once. Seconds. (The inbound "
              "idle timeout is Idle_Time.) Connection_Cache_Time, its name before, is accepted too.",
              aliases=("Connection_Cache_Time",)),
    OptionDef("TLS", t.Enum("no", "ifavailable", "required", aliases={"disabled": "no"}), OUTBOUND, "ifavailable",
              "Outbound STARTTLS, as Momentum's `TLS`: no (never; `disabled` is accepted too), "
              "ifavailable (opportunistic: used when offered; a failed handshake is retried in "
              "plaintext on a new connection unless TLS_Ifavailable_Fallback is off), required "
              "(never plaintext: the mail is deferred with the 4.7.x reason). A TLS failure under this "
              "policy is the domain's, not the host's: the host stays usable for other domains. "
              "(Momentum's default is no.)"),
    OptionDef("TLS_Verify", t.Enum("no", "ca", "host", aliases={
                  **{w: "host" for w in ("1", "true", "yes", "on", "enabled", "enable")},
                  **{w: "no" for w in ("0", "false", "off", "disabled", "disable")}}), OUTBOUND, "no",
              "How the next hop's certificate is checked once TLS is negotiated, as Momentum's "
              "`TLS_Verify`: no (not at all, as Postfix's `may`), ca (signed by a trusted CA: the "
              "system store plus TLS_CA), host (ca, and the name matches the MX or route host). A "
              "boolean is accepted too: true means host, false means no."),
    OptionDef("TLS_Ifavailable_Fallback", t.Bool(), OUTBOUND, True,
              "With TLS = ifavailable, what a failed TLS negotiation does: true sends the message "
              "in plaintext at once on a new connection; false defers it (4.7.5) to be retried later, "
              "with TLS again (Momentum's TLS_Ifavailable_Fallback)."),
    OptionDef("TLS_CA", t.String(nonempty=True, expected="a PEM file path"), OUTBOUND, None,
              "Extra CA certificates (PEM) to trust when TLS_Verify is ca or host."),
    # --- Outbound chapter (issue #10; Momentum 25.3-25.6): MultiVIP, shaping, TLS, XCLIENT -----
    OptionDef("Bind_Address", _BindAddress(), frozenset({GLOBAL, BINDING_GROUP, BINDING}), None,
              "The local address outbound connections (SMTP, LMTP, XFER) of this binding are bound "
              "to before they connect (Momentum's bind_address): an IP address or a local host name. "
              "Set globally, it is the `default` binding's. Unset (or \"*\") lets the kernel choose. "
              "A bind that fails (the address is not on this machine) is a transient failure (4.4.1). "
              "A list of IP addresses (Stalwart's queue.outbound.source-ip.v4 and .v6 together): each "
              "new connection binds one of those of the next hop's family, at random; with none of "
              "that family the kernel chooses."),
    OptionDef("EHLO_Hostname", t.String(nonempty=True, pattern=r"[A-Za-z0-9.\-_\[\]:]+",
                                        expected='a host name, "__hostname__" or "__message__"'),
              OUTBOUND, "__hostname__",
              "The name said in EHLO/HELO/LHLO: a host name; \"__hostname__\" (the default) is the "
              "relay's Hostname; \"__message__\" is the domain of the message's envelope sender."),
    OptionDef("Binding", _BindingName(), LISTENER, None,
              "Assign all mail received here to this binding (Momentum assigns bindings by policy "
              "scripts). A name with no Binding stanza falls back to `default` (logged once)."),
    OptionDef("Binding_Group", _BindingName(), LISTENER, None,
              "Assign mail received here to one of this group's bindings that is not suspended "
              "(suspend_delivery), spread evenly. Binding wins when both are set."),
    OptionDef("Binding_Header", t.String(nonempty=True, pattern=r"[!-9;-~]+", expected="a header field name"),
              LISTENER, None,
              "A header (for example \"X-Binding\") naming the binding or binding group of a "
              "message. It is honoured only from clients in relay_hosts, and removed from every "
              "message before it is queued, so it never reaches a next hop."),
    OptionDef("outbound_throttle_messages", t.RateType(), OUTBOUND | {HOST}, None,
              "Messages delivered per second (\"N\") or per S seconds (\"N/S\"). By reference, as "
              "Momentum's: the throttle belongs to the scope that sets it, so every binding and domain "
              "falling back to it shares one throttle; set again in a narrower scope, it is a separate "
              "one. A regex Domain or Host stanza is one throttle for all it matches. A throttled "
              "destination waits on a timer; an open connection waits on it within "
              "Connection_Cache_Time. Unset: no limit."),
    OptionDef("outbound_throttle_connections", t.RateType(), OUTBOUND | {HOST}, None,
              "Connections opened per second (\"N\") or per S seconds (\"N/S\"), by reference as "
              "outbound_throttle_messages. In a Host stanza it limits connections to that MX, on top "
              "of the binding/domain/global throttle; a throttled host is skipped for another of "
              "the same preference when there is one. A Host stanza inside a Binding (binding::host) "
              "gives that binding its own throttle to the MX; it takes only the two throttles."),
    OptionDef("Server_Max_Outbound_Connections", t.Int(1, 10_000_000), frozenset({GLOBAL, BINDING_GROUP, BINDING}),
              limits.SERVER_MAX_OUTBOUND_CONNECTIONS,
              "Outbound connections open at once, all destinations together (Momentum's "
              "server_max_outbound_connections); in a Binding (or Binding_Group) stanza, through that "
              "binding (group), by reference like the throttles."),
    OptionDef("XCLIENT", t.Enum("no", "ifavailable", "required"), OUTBOUND, "no",
              "Tell the next hop who the original client was (Postfix's XCLIENT: ADDR, NAME, HELO, "
              "PROTO, LOGIN) before each message: ifavailable where the next hop offers XCLIENT; "
              "required defers the mail (4.7.0) where it is not offered or is refused."),
    OptionDef("TLS_Protocols", _TLSProtocols(), LISTENER | OUTBOUND, None,
              "The TLS versions allowed, as Momentum writes them: \"+ALL:-TLSv1.0:-TLSv1.1\" (tokens "
              "ALL, SSLv3, TLSv1.0, TLSv1.1, TLSv1.2, TLSv1.3, each + or -). Unset: OpenSSL's default."),
    OptionDef("TLS_Ciphers", t.String(nonempty=True, pattern=r"[A-Za-z0-9!+@:=_\-.,]+",
                                      expected="an OpenSSL cipher list"),
              LISTENER | OUTBOUND, None,
              "The OpenSSL cipher list for TLS 1.2 and below (\"DEFAULT:!LOW:!EXP\"). Unset: DEFAULT."),
    # --- Retries, expiry, reroutes ------------------------------------------------------------
    OptionDef("retry_interval", t.Time(lo=1), OUTBOUND, 1200.0,
              "The first retry delay after a transient failure; it doubles with each attempt."),
    OptionDef("max_retry_interval", t.Time(lo=1), OUTBOUND, 43200.0,
              "The longest delay between two attempts."),
    OptionDef("host_failure_retry", t.Time(), OUTBOUND | {HOST}, 120.0,
              "How long a host that failed (refused, timed out, 4xx/5xx greeting) is avoided."),
    OptionDef("message_expiration", t.Time(lo=1), OUTBOUND, 5 * 86400.0,
              "How long a message may stay queued before it is bounced (RFC 5321 §4.5.4.1: 4-5 days)."),
    OptionDef("max_retries", _MaxRetries(), OUTBOUND, 0,
              "Attempts after which a message is bounced; 0 means no limit (message_expiration "
              "decides). Momentum's words are taken too: \"none\" and \"auto\" (its default, the "
              "retries message_expiration allows) both mean 0 here, as the retries stop at "
              "message_expiration either way."),
    OptionDef("delay_warning_time", t.Time(), OUTBOUND, 0.0,
              "Once a message has waited this long, send its sender one delay notice (a DSN with "
              "Action: delayed) for the recipients whose NOTIFY allows it, once per message (per "
              "destination domain: the spool keeps each domain's recipients apart), as Postfix's "
              "delay_warning_time does; 0 (the default, as Postfix's 0h) turns it off."),
    OptionDef("reroute_domain", t.DomainRef(), OUTBOUND, None,
              "Send mail of this domain using the settings of the named domain (e.g. a synthetic "
              "XFER domain); \"disabled\" turns it off in this scope."),
    OptionDef("delayed_reroute_domain", t.DomainRef(), OUTBOUND, None,
              "After a message's first transient failure, move it to the named domain; "
              "\"disabled\" turns it off in this scope."),
    # --- XFER client (seeds 000 and 001) -----------------------------------------------------
    OptionDef("teleport_enabled", t.Bool(), OUTBOUND, False,
              "Seed 000's meaning: \"don't swap out xfer message context if there is a temporary xfer "
              "failure\": after a transient failure the message stays loaded (body and envelope in "
              "memory, up to teleport_memory_limit in all) for its quick retry, instead of being read "
              "back from the spool. Also: the message's context (schedule, attempts, first-queued "
              "time, metadata) is carried across an XFER transfer instead of the receiver starting "
              "afresh."),
    OptionDef("teleport_memory_limit", t.Size(), frozenset({GLOBAL}), limits.TELEPORT_MEMORY_LIMIT,
              "At most this many bytes of bodies kept loaded by teleport_enabled; past it the oldest "
              "go back to disk only (they are read from the spool for their retry)."),
    OptionDef("HTTP_URI", t.URIPath(), OUTBOUND | HTTP, "/delay_message",
              "The path XFER transfers are sent to (in a Domain), and accepted on (at an HTTP_Listener "
              "or global)."),
    OptionDef("HTTP_METHOD", t.Enum("POST", "PUT"), OUTBOUND | HTTP, "POST",
              "The HTTP method of XFER transfers, sent and accepted."),
    OptionDef("HTTP_HOST", t.String(nonempty=True, expected="a host name for the HTTP Host header"),
              OUTBOUND, None,
              "The Host header of XFER transfers; unset means the route's host and port."),
    OptionDef("xfer_secret", t.String(nonempty=True, expected="a shared secret"), OUTBOUND | HTTP, None,
              "The XFER shared secret: the client signs each transfer with HMAC-SHA256 over method, "
              "path, body hash, timestamp and nonce (docs/xfer.md); the server accepts only valid "
              "signatures inside xfer_replay_window. An XFER server with neither xfer_secret nor "
              "xfer_tokens authenticates by address only (xfer_allowed_clients, loopback by default), "
              "and warns when that list reaches beyond loopback."),
    OptionDef("xfer_token", t.String(nonempty=True, expected="a bearer token"), OUTBOUND, None,
              "A bearer token the XFER client sends when no xfer_secret is set."),
    OptionDef("xfer_tokens", t.StringList(), HTTP, (),
              "Bearer tokens the XFER server accepts (besides HMAC signatures with xfer_secret)."),
    OptionDef("xfer_allowed_clients", t.CIDRList(), HTTP, _nets("127.0.0.0/8", "::1/128"),
              "Networks the XFER server accepts transfers from (403 for others): on top of "
              "xfer_secret/xfer_tokens, or, with neither, the only authentication (as relay_hosts is "
              "for SMTP). The default is loopback only."),
    OptionDef("xfer_max_body", t.Size(lo=1024), HTTP, 64 * 1024 * 1024,
              "The largest XFER request body accepted (413 beyond it)."),
    OptionDef("xfer_max_hops", t.Int(1, 100), HTTP, 10,
              "Transfers that already passed through more XFER nodes than this are refused as a loop (508)."),
    OptionDef("xfer_replay_window", t.Time(lo=1), HTTP, 300.0,
              "How far a signed transfer's timestamp may be from the server's clock; nonces are "
              "remembered this long so a captured request cannot be replayed."),
    # --- Cluster: limits shared by nodes through Redis (docs/cluster.md) -----------------------
    OptionDef("Cluster_Redis", t.String(nonempty=True, pattern=r"rediss?://\S+|unix://\S+",
                                        expected="a Redis URL such as \"redis://127.0.0.1:6379/0\""),
              frozenset({GLOBAL}), None,
              "The Redis server the nodes of a cluster share their connection limits and throttles "
              "through. Unset: no cluster, every Cluster_* option is ignored."),
    OptionDef("Cluster_Node", t.String(nonempty=True, pattern=r"[A-Za-z0-9.\-_]+", expected="a node name"),
              frozenset({GLOBAL}), None,
              "This node's name in the cluster (its leases and heartbeat); unset means the host name."),
    OptionDef("Cluster_Lease_Time", t.Time(lo=1), frozenset({GLOBAL}), limits.CLUSTER_LEASE_TIME,
              "How long a cluster connection slot lives in Redis without renewal; it is renewed "
              "every third of that while the connection is open, and a dead node's slots come back "
              "after at most this long."),
    OptionDef("Cluster_Max_Outbound_Connections", t.Int(-1, 1_000_000),
              frozenset({GLOBAL, DOMAIN, BINDING, BINDING_DOMAIN, HOST}), -1,
              "Connections open at once across the whole cluster, per binding and domain (in the "
              "global scope it applies to every domain); in a Host stanza, to that MX, named as in "
              "its DNS MX record. Precedence as Momentum's: binding::host, host, binding::domain, "
              "binding, domain, global. -1 means no limit. Each slot is a lease in Redis renewed while "
              "the connection is open, so a dead node's slots come back within a lease time."),
    OptionDef("Cluster_Outbound_Throttle_Messages", t.RateType(), frozenset({GLOBAL, BINDING_GROUP, DOMAIN}), None,
              "Messages delivered per second (\"N\") or per S seconds (\"N/S\") across the cluster. "
              "The throttle belongs to the scope it is set in: set globally, one throttle is shared by "
              "every domain; set in a Domain, that domain has its own."),
    OptionDef("Cluster_Outbound_Throttle_Connections", t.RateType(), frozenset({GLOBAL, BINDING_GROUP, DOMAIN}),
              None,
              "Connections opened per second (\"N\") or per S seconds (\"N/S\") across the cluster, "
              "shared by the scope it is set in, as Cluster_Outbound_Throttle_Messages."),
    OptionDef("Drain_On_Shutdown", t.XferRoute(), frozenset({GLOBAL}), None,
              "On SIGTERM, stop accepting mail, then move every queued message to this XFER peer "
              "(\"xfer://host?port=N\") with its schedule, attempts and binding, before exiting; "
              "`fastrelay drain --to` does the same on demand."),
    OptionDef("Drain_Timeout", t.Time(lo=1), frozenset({GLOBAL}), 300.0,
              "How long a drain on shutdown may take; what is left stays in the spool for the "
              "next start (or the next drain)."),
    # --- Receiving ---------------------------------------------------------------------------
    OptionDef("relay_hosts", t.CIDRList(), LISTENER, _nets("127.0.0.0/8", "::1/128"),
              "Clients that may relay (CIDRs). The innermost scope wins: Listen, then ESMTP_Listener, "
              "then global. Anyone else gets 554 5.7.1 at RCPT. The default is loopback only."),
    OptionDef("relay_domains", t.DomainList(), LISTENER, (),
              "Domains any client may send to (we are their MX or relay); mail to other domains "
              "needs a client in relay_hosts. Open-relay tricks (u%victim@, victim!u@, \"u@victim\"@, "
              "address literals) are refused for clients outside relay_hosts (docs/reliability.md case 21)."),
    OptionDef("Hostname", t.String(nonempty=True, pattern=r"[A-Za-z0-9.\-_\[\]:]+", expected="a host name"),
              LISTENER, None,
              "The name in the greeting, the EHLO reply and Received: headers; unset means this "
              "machine's host name."),
    OptionDef("max_command_line", t.Int(512, 65536), LISTENER, limits.MAX_COMMAND_LINE,
              "Longest command line, CRLF included (RFC 5321 §4.5.3.1.4: at least 512). Longer ones "
              "get 500 5.5.2; a line with no LF past 64 KiB closes the connection."),
    OptionDef("max_text_line", t.Int(1000, 1_000_000), LISTENER, limits.MAX_TEXT_LINE,
              "Longest line of message text, CRLF included (RFC 5321 §4.5.3.1.6: at least 1000). A "
              "message with a longer line gets 550 5.5.2 after its end; it is never truncated."),
    OptionDef("max_message_size", t.Size(lo=1024), LISTENER, limits.MAX_MESSAGE_SIZE,
              "The largest message accepted, announced as SIZE (RFC 1870). Larger ones get 552 5.3.4."),
    OptionDef("max_recipients_per_message", t.Int(1, 100_000), LISTENER, limits.MAX_RECIPIENTS,
              "Recipients per transaction; the next RCPT gets 452 4.5.3 (RFC 5321 §4.5.3.1.10)."),
    OptionDef("max_messages_per_connection", t.Int(1, 10_000_000), LISTENER, limits.MAX_MESSAGES_PER_CONNECTION,
              "Transactions per connection; the next MAIL gets 452 4.5.3."),
    OptionDef("Listener_Sessions", t.Int(0, 1_000_000), LISTENER, limits.MAX_CONNECTIONS,
              "As Momentum's: connections a listener serves at once; the next one gets 421 4.7.0 and is "
              "closed. 0 means no limit. With Workers > 1 it counts over the whole relay. (Before, "
              "fastrelay called this Concurrency; Momentum's `concurrency` is the size of a pool.)"),
    OptionDef("Concurrency", t.Int(1, 1_000_000), frozenset({EVENTLOOP}), None,
              "In an eventloop stanza (Momentum's multi-event-loops.md): the number of event loops in "
              f"the pool, i.e. worker processes (1 to {limits.MAX_WORKERS}), as Workers."),
    OptionDef("max_connections_per_ip", t.Int(1, 1_000_000), LISTENER, limits.MAX_CONNECTIONS_PER_IP,
              "Connections from one client address at once; the next one gets 421 4.7.0."),
    OptionDef("Idle_Time", t.Time(), LISTENER | HTTP, limits.IDLE_TIMEOUT,
              "As Momentum's: how long a client may stay silent between commands before it gets "
              "421 4.4.2 and is disconnected (at an HTTP_Listener: how long an idle keep-alive "
              "connection stays open); 0 never disconnects for silence. RFC 5321 §4.5.3.2.7 "
              "asks for at least 5 minutes: a shorter value is allowed, with a warning from "
              "check-config and run. (Before, fastrelay called this idle_timeout, which is now "
              "Momentum's outbound idle_timeout.)"),
    OptionDef("overload_idle_timeout", t.Time(lo=1), LISTENER, limits.OVERLOAD_IDLE_TIMEOUT,
              "The idle timeout while a listener is above 80% of its Listener_Sessions (Postfix's stress mode)."),
    OptionDef("command_deadline", t.Time(lo=1), LISTENER, limits.COMMAND_DEADLINE,
              "Time to receive a whole command line once it has begun (Postfix "
              "smtpd_per_request_deadline), so a trickled line cannot hold a slot; then 421 4.4.2."),
    OptionDef("min_data_rate", t.Int(0, 2**31 - 1), LISTENER, limits.MIN_DATA_RATE,
              "Bytes per second a client must keep up in DATA/BDAT: the message must arrive within "
              "command_deadline + size / min_data_rate (Postfix smtpd_min_data_rate); 0 turns it off."),
    OptionDef("data_deadline", t.Time(lo=1), LISTENER, limits.DATA_DEADLINE,
              "The longest a message's content may take to arrive, from the 354 (or from each BDAT "
              "command) to its end, whatever min_data_rate says; then 421 4.4.2 and the connection "
              "is closed, nothing spooled."),
    OptionDef("close_linger", t.Time(lo=0, hi=600), LISTENER, limits.CLOSE_LINGER,
              "After a reply that ends the connection while the client may still be sending (a "
              "deadline, too many errors, an HTTP verb; not QUIT), how long the listener half-closes "
              "and discards further input instead of closing at once, so the client reads the 421 "
              "rather than a reset; 0 closes at once."),
    OptionDef("write_timeout", t.Time(lo=1), LISTENER, limits.WRITE_TIMEOUT,
              "How long replies may wait unread: a client that stops reading them (its write buffer "
              "full, or a close waiting for it to drain) is disconnected after this, and its slot "
              "in Listener_Sessions and max_connections_per_ip is freed."),
    OptionDef("allow_nul_in_data", t.Bool(), LISTENER, False,
              "Carry NUL bytes in message content. Off (the default, as Postfix): a message with a "
              "NUL gets 554 5.6.0 after its end and is not queued, because a next hop that strips "
              "NULs would read <CR><LF><NUL>.<CR><LF> as the end of data (SMTP smuggling)."),
    OptionDef("Postmaster_Address", _MailAddress(), LISTENER, None,
              "Where RCPT TO:<postmaster> (no domain; RFC 5321 §4.5.1: it must be accepted, from "
              "any client) is delivered. Unset means postmaster@<Hostname>."),
    OptionDef("junk_command_limit", t.Int(1, 1_000_000), LISTENER, limits.JUNK_COMMAND_LIMIT,
              "NOOP, RSET, VRFY, HELP and unknown commands allowed per connection before 421 "
              "(Postfix smtpd_junk_command_limit)."),
    OptionDef("soft_error_limit", t.Int(0, 1_000_000), LISTENER, limits.SOFT_ERROR_LIMIT,
              "Errors after which each reply is delayed by error_sleep_time (a tarpit)."),
    OptionDef("hard_error_limit", t.Int(1, 1_000_000), LISTENER, limits.HARD_ERROR_LIMIT,
              "Errors after which the connection gets 421 4.7.0 and is closed."),
    OptionDef("error_sleep_time", t.Time(), LISTENER, limits.ERROR_SLEEP_TIME,
              "The tarpit delay per reply once soft_error_limit is passed."),
    OptionDef("greeting_delay", t.Time(), LISTENER, 0.0,
              "Wait this long before the greeting; a client that talks first gets 554 and is closed "
              "(early-talker detection, docs/reliability.md case 5). 0 (the default) greets at once."),
    OptionDef("hop_count_limit", t.Int(1, 1000), LISTENER, limits.HOP_COUNT_LIMIT,
              "More Received: headers than this is a mail loop: 554 5.4.0 (docs/reliability.md case 16)."),
    OptionDef("bare_lf_normalize_hosts", t.CIDRList(), LISTENER, (),
              "Clients whose bare CR or LF line endings are turned into CRLF instead of refused with "
              "550 5.5.2 (Postfix's normalize mode with exclusions; docs/reliability.md case 2)."),
    OptionDef("TLS_Certificate", t.String(nonempty=True, expected="a PEM file path"), LISTENER | OUTBOUND, None,
              "Certificate (PEM): in a listener (or globally) the server certificate for STARTTLS, "
              "offered when TLS_Key is set too; in an outbound scope (or globally) the client "
              "certificate shown to next hops. \"none\" uses none where a broader scope set one. "
              "Relative paths are relative to the conf file."),
    OptionDef("TLS_Key", t.String(nonempty=True, expected="a PEM file path"), LISTENER | OUTBOUND, None,
              "Private key (PEM) for TLS_Certificate; unset with a client certificate: the key is in "
              "the certificate file."),
    # --- SMTP AUTH, inbound and outbound, and implicit TLS (issue 17; Momentum's names) -------
    OptionDef("Use_SSL", t.Bool(), LISTENER, False,
              "Implicit TLS (RFC 8314, \"submissions\" on port 465): the TLS handshake comes first, "
              "with TLS_Certificate and TLS_Key, and STARTTLS is not offered (Momentum's inbound SSL)."),
    OptionDef("Enable_Authentication", t.Bool(), LISTENER, False,
              "Offer SMTP AUTH (RFC 4954) with the mechanisms whose parameters are set "
              "(AuthPlainParameters, AuthLoginParameters), only under TLS (STARTTLS or Use_SSL) unless "
              "auth_plaintext_loopback. An authenticated client may relay from any address; its user "
              "is kept with the message (spool, mainlog) and its Received: header says ESMTPSA "
              "(RFC 3848)."),
    OptionDef("AuthPlainParameters", _AuthParams(), LISTENER, None,
              "AUTH PLAIN (RFC 4616): where the users are. Momentum writes a hash, "
              "[ uri = \"file:///etc/fastrelay/passwd\" ]; until the conf language reads hashes, "
              "write the uri alone: \"file:///etc/fastrelay/passwd\" (a relative path is relative to "
              "the conf file). The file holds scrypt hashes; `fastrelay passwd add|remove|list USER -f "
              "FILE` manages it and the listener re-reads it when it changes."),
    OptionDef("AuthLoginParameters", _AuthParams(), LISTENER, None,
              "AUTH LOGIN: as AuthPlainParameters (both may name the same file)."),
    OptionDef("auth_user_bindings", _UserTable(), LISTENER, {},
              "The Binding that mail of an authenticated user is assigned to (others get the "
              "listener's): ( \"alice@example.com=marketing\" \"bob=transactional\" ), or as a hash "
              "once the conf language reads them: [ bob = \"transactional\" ]."),
    OptionDef("auth_sender_domains", _UserTable(list_values=True), LISTENER, {},
              "The sender domains an authenticated user may use in MAIL FROM (Postfix's "
              "reject_sender_login_mismatch, by domain): ( \"alice@example.com=example.com,example.net\" ), "
              "or a hash [ alice = ( \"example.com\" ) ]. Another domain gets 553 5.7.1; <> is always "
              "allowed (bounces); a user not listed may use any."),
    OptionDef("auth_plaintext_loopback", t.Bool(), LISTENER, False,
              "Offer AUTH without TLS to clients on loopback (127.0.0.0/8, ::1) only; everyone else "
              "still needs TLS first (530 5.7.0)."),
    OptionDef("auth_max_failures", t.Int(1, 1_000_000), LISTENER, limits.AUTH_MAX_FAILURES,
              "Failed AUTH attempts from one client address after which it is locked out: its AUTH "
              "gets 454 4.7.0 without a password check, until auth_lockout_time after its last failure."),
    OptionDef("auth_lockout_time", t.Time(lo=1), LISTENER, limits.AUTH_LOCKOUT_TIME,
              "How long failures from an address are remembered, and so how long a lockout lasts."),
    OptionDef("auth_failure_delay", t.Time(), LISTENER, limits.AUTH_FAILURE_DELAY,
              "The 535 5.7.8 to a failed AUTH waits this long, doubled with each further failure "
              "from the same address (up to 16 times as long); 0 turns the delay off."),
    OptionDef("outbound_smtp_auth_type", t.Enum("PLAIN", "LOGIN", "XOAUTH2"), OUTBOUND, None,
              "AUTH to the next hop (Momentum's outbound_smtp_auth): PLAIN, LOGIN or XOAUTH2 (the "
              "password is then the OAuth 2.0 bearer token). Unset with outbound_smtp_auth_user set: "
              "PLAIN if offered, else LOGIN. An AUTH that fails is a temporary failure of the "
              "messages with the peer's reply (in the mainlog); the host is not marked down."),
    OptionDef("outbound_smtp_auth_user", t.String(nonempty=True, expected="a user name"), OUTBOUND, None,
              "The user name sent to the next hop; setting it turns outbound AUTH on."),
    OptionDef("outbound_smtp_auth_pass", t.String(), OUTBOUND, None,
              "The password (or XOAUTH2 token) sent to the next hop. It sits in the conf in plain "
              "text: outbound_smtp_auth_pass_file keeps it out."),
    OptionDef("outbound_smtp_auth_pass_file", t.String(nonempty=True, expected="a file path"), OUTBOUND, None,
              "A file whose first line is the password (or token), so that it need not sit in the "
              "conf; read when a destination is first delivered to. Where it applies it wins over "
              "outbound_smtp_auth_pass. Relative to the conf file."),
    OptionDef("outbound_smtp_auth_allow_plaintext", t.Bool(), OUTBOUND, False,
              "Send credentials on a connection that is not under TLS. Off: without TLS, AUTH is not "
              "attempted and the messages are deferred (4.7.0)."),
    # --- Spool -------------------------------------------------------------------------------
    OptionDef("Spool_Base", t.String(nonempty=True, expected="a directory path"), frozenset({GLOBAL}), None,
              "The spool directory. A relative path is relative to the directory of the conf file "
              "that sets it. Unset means /var/spool/fastrelay when run as root, else "
              "$XDG_STATE_HOME/fastrelay/spool (~/.local/state/fastrelay/spool); "
              "`fastrelay run --spool DIR` overrides it."),
    OptionDef("spool_min_free", t.Size(), frozenset({GLOBAL}), limits.SPOOL_MIN_FREE,
              "Below this much free space on the spool's filesystem, MAIL gets 452 4.3.1 "
              "(docs/reliability.md case 17), and so does MAIL or RCPT when the SIZE announced (one copy "
              "per destination domain) would go below it; delivery keeps draining."),
    OptionDef("spool_failure_retry", t.Time(lo=1), frozenset({GLOBAL}), limits.SPOOL_FAILURE_RETRY,
              "When the spool cannot read or write a message (failing or full disk), it is tried again "
              "after this long at most (a shorter retry_interval of its domain wins)."),
    OptionDef("mainlog_max_pending", t.Size(), frozenset({GLOBAL}), limits.MAINLOG_MAX_PENDING,
              "While the mainlog cannot be written (full or read-only disk), at most this many bytes of "
              "records wait in memory; past it the oldest are dropped, and the count is logged when "
              "writing works again. No record is ever written twice."),
    OptionDef("cpu_scheduling", t.Enum("batch", "inherit"), frozenset({GLOBAL}), limits.CPU_SCHEDULING,
              "The Linux CPU scheduling policy of the spool writer's thread (in each worker). \"batch\" "
              "(the default) is SCHED_BATCH: the same CPU share and nice value as SCHED_OTHER, but "
              "when a commit's fsync returns, the writer does not preempt the event loop; it runs "
              "when the loop waits. Measured with Workers = 2 on 2 cores under 20 sessions: 17% "
              "less relay CPU a message and 15% more delivered (bench/RESULTS.md). The cost: "
              "while other programs keep every core busy, each commit waits up to their time slice "
              "(a lone sender against two CPU hogs: 2.3-7.8 ms a message against 1.7-3.1). A relay "
              "started under another policy (chrt, systemd's CPUSchedulingPolicy=) keeps it; "
              "\"inherit\" keeps whatever it was started under. Needs a restart to change."),
    OptionDef("memory_trim_interval", t.Time(lo=0), frozenset({GLOBAL}), limits.MEMORY_TRIM_INTERVAL,
              "How often freed heap memory is handed back to the kernel (glibc's malloc_trim), so that "
              "the relay's RSS follows what its queue holds rather than its busiest moment; 0 never. "
              "Each time costs a millisecond or two, off the event loop."),
    OptionDef("Mainlog", t.String(nonempty=True, expected="a file path"), frozenset({GLOBAL}), None,
              "The mainlog file (R, D, T, P and X records; see docs/operations.md). Relative to the "
              "conf file. Unset: with Spool_Base unset too, /var/log/fastrelay/mainlog when run as root, "
              "else $XDG_STATE_HOME/fastrelay/mainlog (~/.local/state/fastrelay/mainlog); with Spool_Base "
              "set, \"mainlog\" beside the spool directory (Spool_Base = \"/srv/relay/spool\" logs to "
              "/srv/relay/mainlog)."),
    OptionDef("suspend_delivery", t.Bool(), OUTBOUND, False,
              "Accept and queue mail but deliver none of the scope's (Momentum's suspend_delivery; "
              "Postfix's defer_transports): globally, for a Binding or Binding_Group, for a Domain, or "
              "for a Domain inside a Binding. For maintenance of the next hops. Queued mail goes out "
              "when the relay is started with it off again (message_expiration still counts from "
              "its reception)."),
    OptionDef("spool_fsync", t.Bool(), frozenset({GLOBAL}), True,
              "fsync each group commit. UNSAFE when off: a power loss can lose mail that was "
              "acknowledged with 250 (a process crash still cannot)."),
    OptionDef("spool_commit_delay", t.Time(unit="ms", lo=0, hi=1.0), frozenset({GLOBAL}), limits.SPOOL_COMMIT_DELAY,
              "Group commit window: after the first write of a transaction, the spool waits this long "
              "for others to share its commit (and its fsync). A plain number is milliseconds; `500us` "
              "is half of one; 0 commits at once. Each 250 waits up to this much longer; under load, "
              "fewer and larger commits cost less CPU per message. A client alone is not made to wait: "
              "its next message comes only after this 250, so its message commits at once; with up to "
              "spool_commit_few_clients clients, the window ends once each one's message is in."),
    OptionDef("spool_commit_few_clients", t.Int(0, 10_000), frozenset({GLOBAL}), limits.SPOOL_COMMIT_FEW_CLIENTS,
              "Up to this many clients sending (SMTP sessions and XFER requests), the commit window "
              "ends as soon as a message from each has joined it: none of them can send another "
              "before its 250. Above it, the spool writer sleeps through the whole window, which costs "
              "less CPU under load than waking for each message. 0 keeps the whole window always."),
    # --- Workers (Momentum's multiple event loops, multi-event-loops.md) ----------------------
    OptionDef("Workers", _WorkerCount(), frozenset({GLOBAL}), 1,
              "Worker processes, each with its own event loop, listening on the same sockets "
              "(SO_REUSEPORT) and owning one spool shard; \"auto\" is one per CPU. Connection limits "
              "hold across them (shared memory). 1 (the default) is a single process, no supervisor. "
              "Momentum's spelling works too: eventloop \"pool\" { concurrency = N } named by "
              "delivery_pool and by the listeners' event_loop."),
    OptionDef("shared_counter_slots", t.Int(1024, 1 << 24), frozenset({GLOBAL}), limits.SHARED_SLOTS,
              "With Workers > 1: slots of the shared table that counts connections across workers "
              "(one per MX host, destination, client address and listener seen in a run). Past it, "
              "keys share slots: limits get stricter, never looser."),
    OptionDef("worker_stop_timeout", t.Time(lo=1), frozenset({GLOBAL}), limits.WORKER_STOP_TIMEOUT,
              "With Workers > 1: how long SIGTERM waits for the workers to stop before they are killed."),
    OptionDef("worker_restart_delay", t.Time(lo=0.01), frozenset({GLOBAL}), limits.WORKER_RESTART_DELAY,
              "With Workers > 1: how soon a worker that died is started again; the delay doubles while "
              "it keeps dying within 10 seconds of its start, up to worker_restart_max."),
    OptionDef("worker_restart_max", t.Time(lo=0.01), frozenset({GLOBAL}), limits.WORKER_RESTART_MAX,
              "With Workers > 1: the longest delay before a worker that keeps dying is started again."),
    OptionDef("delivery_pool", _PoolName(), frozenset({GLOBAL}), None,
              "The eventloop stanza whose concurrency sets the number of workers (Momentum's "
              "delivery_pool). Reception and delivery run in the same workers, so a listener's "
              "event_loop, when set, must name the same pool."),
    OptionDef("event_loop", _PoolName(), frozenset({ESMTP_LISTENER, HTTP_LISTENER}), None,
              "The eventloop stanza this listener runs in (Momentum's event_loop): the same pool "
              "as delivery_pool, or the only pool when delivery_pool is unset."),

    # --- Security (Momentum's privilege drop) -------------------------------------------------
    OptionDef("User", t.String(nonempty=True, pattern=r"[A-Za-z0-9._][A-Za-z0-9._-]*", expected="a user name"),
              frozenset({SECURITY}), None,
              "As Momentum's: started as root, the relay binds its listeners, then runs as this user "
              "before it opens the spool and the mainlog (which this user must be able to write). "
              "Unset: it keeps the user it was started as."),
    OptionDef("Group", t.String(nonempty=True, pattern=r"[A-Za-z0-9._][A-Za-z0-9._-]*", expected="a group name"),
              frozenset({SECURITY}), None,
              "The group the relay runs as with User; unset means the user's own group."),
    # --- scriptlet ---------------------------------------------------------------------------
    OptionDef("source", t.Enum("msys.xfer.server", "msys.xfer.client"), frozenset({SCRIPT}), None,
              "The module a script loads: msys.xfer.server (accept XFER transfers on the "
              "HTTP_Listener) or msys.xfer.client (send with Delivery_Method = delay_xfer)."),
]

BY_KEY: dict[str, OptionDef] = {o.key: o for o in OPTIONS}
BY_KEY.update({a.lower(): o for o in OPTIONS for a in o.aliases})


@dataclass(frozen=True)
class StanzaDef:
    name: str  # canonical spelling
    scope: str  # the scope its contents are in
    parents: frozenset[str]  # scopes it may appear in
    needs_name: bool
    name_type: t.OptType | None = None

    @property
    def key(self) -> str:
        return self.name.lower()


class _DomainName(t.OptType):
    """A Domain (or Host) stanza name: a domain name, an IP address, a domain literal
    ("[IPv6:...]", "[192.0.2.1]") or a regex between slashes (Momentum's regex domains)."""

    expected = 'a domain name, an address literal or a "/regex/"'

    def convert_atom(self, atom):  # type: ignore[override]
        raw = atom.text.strip()
        if len(raw) >= 2 and raw[0] == "/" and raw[-1] == "/":
            try:
                re.compile(raw[1:-1])
            except re.error as e:
                raise t.Invalid(f"got '{atom.text}': bad regex: {e}; expected {self.expected}", atom) from None
            return raw  # kept as written: the scope's name; matched by Config
        text = raw.lower().rstrip(".")
        literal = domain_literal(text)
        if literal is not None:
            return literal
        if not t.is_hostname(text):
            raise t.Invalid(f"got '{atom.text}'; expected {self.expected}", atom)
        return text


def domain_literal(text: str) -> str | None:
    """The canonical form of an address used as a domain ("[IPv6:::1]" -> "[ipv6:::1]",
    "[192.0.2.1]" and "192.0.2.1" -> "[192.0.2.1]"), or None for anything else."""
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    v6 = inner.lower().startswith("ipv6:")
    try:
        addr = ipaddress.ip_address(inner[5:] if v6 else inner)
    except ValueError:
        return None
    if addr.version == 6:
        return f"[ipv6:{addr}]"
    return None if v6 else f"[{addr}]"


class _Name(t.OptType):
    expected = "a name"

    def convert_atom(self, atom):  # type: ignore[override]
        if not atom.text or any(c.isspace() for c in atom.text):
            raise t.Invalid(f"got '{atom.text}'; expected {self.expected} without spaces", atom)
        return atom.text


class _HostName(t.OptType):
    expected = "an IP address ([...] for IPv6) or a hostname"

    def convert_atom(self, atom):  # type: ignore[override]
        raw = atom.text.strip()
        if len(raw) >= 2 and raw[0] == "/" and raw[-1] == "/":  # a regex Host stanza: one scope for all it matches
            try:
                re.compile(raw[1:-1])
            except re.error as e:
                raise t.Invalid(f"got '{atom.text}': bad regex: {e}; expected {self.expected} or a \"/regex/\"",
                                atom) from None
            return raw
        try:
            return t.parse_host(raw)
        except ValueError as e:
            raise t.Invalid(f"{e}; expected {self.expected}", atom) from None


STANZAS: list[StanzaDef] = [
    StanzaDef("Domain", DOMAIN, frozenset({GLOBAL, BINDING, BINDING_GROUP}), True, _DomainName()),
    StanzaDef("Binding_Group", BINDING_GROUP, frozenset({GLOBAL}), True, _BindingName()),
    StanzaDef("Binding", BINDING, frozenset({GLOBAL, BINDING_GROUP}), True, _BindingName()),
    StanzaDef("Host", HOST, frozenset({GLOBAL, BINDING}), True, _HostName()),
    StanzaDef("ESMTP_Listener", ESMTP_LISTENER, frozenset({GLOBAL}), False),
    StanzaDef("HTTP_Listener", HTTP_LISTENER, frozenset({GLOBAL}), False),
    StanzaDef("scriptlet", SCRIPTLET, frozenset({GLOBAL}), True, _Name()),
    StanzaDef("Security", SECURITY, frozenset({GLOBAL}), False),
    StanzaDef("script", SCRIPT, frozenset({SCRIPTLET}), True, _Name()),
    StanzaDef("EventLoop", EVENTLOOP, frozenset({GLOBAL}), True, _Name()),
    # `Listen` is the same word in both listeners; its scope depends on the parent.
    StanzaDef("Listen", ESMTP_LISTEN, frozenset({ESMTP_LISTENER, HTTP_LISTENER}), True, t.ListenAddress()),
]
STANZA_BY_KEY: dict[str, StanzaDef] = {s.key: s for s in STANZAS}

# A Domain inside a Binding is the binding::domain scope.
NESTED_SCOPE = {(BINDING, DOMAIN): BINDING_DOMAIN, (HTTP_LISTENER, ESMTP_LISTEN): HTTP_LISTEN,
                (BINDING, HOST): BINDING_HOST, (BINDING_GROUP, DOMAIN): BINDING_GROUP_DOMAIN}
# What a Host inside a Binding (binding::host) may set: the throttles, which are the binding's own
# towards that MX (ref-outbound-throttle-connections: "binding::host > host"). Connection counts
# per MX are shared by every binding, so max_outbound_connections stays in plain Host stanzas.
BINDING_HOST_OPTIONS = frozenset({"outbound_throttle_connections", "outbound_throttle_messages"})


def add_option(opt: OptionDef) -> None:
    """Register an option (later parts of the relay add theirs the same way)."""
    OPTIONS.append(opt)
    BY_KEY[opt.key] = opt
    BY_KEY.update({a.lower(): opt for a in opt.aliases})


def valid_in(opt: OptionDef) -> str:
    order = [GLOBAL, DOMAIN, BINDING, BINDING_GROUP, BINDING_DOMAIN, BINDING_GROUP_DOMAIN, HOST, BINDING_HOST,
             ESMTP_LISTENER, ESMTP_LISTEN,
             HTTP_LISTENER, HTTP_LISTEN, SCRIPTLET, SCRIPT, EVENTLOOP, SECURITY]
    order += [s for s in SCOPE_NAMES if s not in order]  # scopes added by later blocks (Admin_Listener)
    names = [SCOPE_NAMES[s] for s in order if s in opt.scopes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]



# --- Admin_Listener and the process log (issue 12: the operator's side) ----------------------------
# One contiguous block: the admin HTTP API's listener stanza, its token options and the process
# log's format. `Listen` inside an Admin_Listener is its own scope, as inside an HTTP_Listener.
ADMIN_LISTENER = "admin_listener"
ADMIN_LISTEN = "admin_listen"
SCOPE_NAMES[ADMIN_LISTENER] = "an Admin_Listener stanza"
SCOPE_NAMES[ADMIN_LISTEN] = "a Listen stanza of an Admin_Listener"
ADMIN = frozenset({GLOBAL, ADMIN_LISTENER, ADMIN_LISTEN})
STANZAS.insert(len(STANZAS) - 1, StanzaDef("Admin_Listener", ADMIN_LISTENER, frozenset({GLOBAL}), False))
STANZAS[-1] = StanzaDef("Listen", ESMTP_LISTEN, STANZAS[-1].parents | {ADMIN_LISTENER}, True, t.ListenAddress())
STANZA_BY_KEY.clear()
STANZA_BY_KEY.update({s.key: s for s in STANZAS})
NESTED_SCOPE[(ADMIN_LISTENER, ESMTP_LISTEN)] = ADMIN_LISTEN
for _opt in (
    OptionDef("Admin_Token", t.String(nonempty=True, expected="a bearer token"), ADMIN, None,
              "The bearer token the admin API (Admin_Listener) requires in `Authorization: Bearer "
              "TOKEN`. With neither Admin_Token nor Admin_Token_File set, only loopback clients are "
              "served. The CLI (`fastrelay queue ...`) reads it from the same conf."),
    OptionDef("Admin_Token_File", t.String(nonempty=True, expected="a file path"), ADMIN, None,
              "A file holding the admin API's bearer token (first line; relative to the conf file), "
              "so the token stays out of the conf. Admin_Token wins when both are set."),
    OptionDef("Admin_Domain_Labels", t.Int(lo=1, hi=1000), frozenset({GLOBAL}), 20,
              "How many domains get their own label in /metrics (the busiest ones); the rest are "
              "counted as \"other\", so label cardinality stays bounded."),
    OptionDef("Log_Format", t.Enum("text", "json"), frozenset({GLOBAL}), "text",
              "The process log's format on stderr: text lines, or one JSON object per line (time, "
              "level, logger, message) for log collectors. The mainlog is not affected."),
):
    add_option(_opt)
