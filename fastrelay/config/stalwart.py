"""Read a Stalwart SMTP TOML file (seed 003's keys) into the same settings model as ecelerity.conf.

The file is read with the standard library's tomllib; since tomllib gives no positions, a small
scanner (`key_positions`) finds the line and column of every key, so that each error is
``file:line:col: ...; expected ...`` as for ecelerity.conf (exit 2 in the CLI).

Stalwart's keys become the parse tree the ecelerity.conf parser makes (options and stanzas with
their positions), and fastrelay.config.model builds the Config from it: one settings model, one
set of value checks, one `config eval` and docs/config.md.

Mapping (docs/config.md, "Stalwart keys", has the whole table):

- `queue.outbound.next-hop` rules on `rcpt-domain` compile into Domain stanzas (and, for a rule
  that matches every other domain, the global scope) whose Routes name the remote's address;
  the remote's other keys become options of the same scopes. Rules on `sender-domain` compile
  into Bindings that take those senders' mail (Sender_Domains), holding the rules as they stand
  for them. Domain stanzas, not a new kind of
  route, because that is how ecelerity.conf already says "mail for these domains goes there
  with these settings" (seed 003's own LMTP example, conf/examples/seed003_lmtp_equivalent.conf),
  and so `config eval --domain` shows exactly what a rule did.
- `[fastrelay]` holds any ecelerity.conf global option under its own name, and
  `[fastrelay.domain."NAME"]` (also `host`, `binding`, `binding_group`) its stanzas.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from typing import Any

from fastrelay.config.errors import ConfigError, ConfigErrors
from fastrelay.config.parser import Atom, ListValue, Option, Pos, Stanza

__all__ = ["STALWART_KEYS", "key_positions", "load_toml", "loads_toml", "translate"]

# --- where each key was written ---------------------------------------------------------------

Path = tuple  # of str (table keys) and int (array positions)


class _Scanner:
    """Walk TOML text (already known to be valid) and note the (line, col) of each key path."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0
        self.line = 1
        self.start = 0  # index where the current line starts
        self.pos: dict[Path, tuple[int, int]] = {}
        self.arrays: dict[Path, int] = {}  # [[table]] path -> entries so far

    def here(self) -> tuple[int, int]:
        return self.line, self.i - self.start + 1

    def note(self, path: Path, at: tuple[int, int]) -> None:
        self.pos.setdefault(path, at)

    def nl(self) -> None:
        self.line += 1
        self.start = self.i + 1

    def ws(self, newlines: bool = False) -> None:
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c in " \t\r":
                self.i += 1
            elif c == "\n" and newlines:
                self.nl()
                self.i += 1
            elif c == "#":
                while self.i < len(s) and s[self.i] != "\n":
                    self.i += 1
            else:
                return

    def key(self) -> list[str]:
        """A dotted key: its parts."""
        parts = []
        s = self.s
        while True:
            self.ws()
            c = s[self.i]
            if c in "\"'":
                parts.append(self.string())
            else:
                j = self.i
                while self.i < len(s) and (s[self.i].isalnum() or s[self.i] in "_-"):
                    self.i += 1
                parts.append(s[j:self.i])
            self.ws()
            if self.i < len(s) and s[self.i] == ".":
                self.i += 1
                continue
            return parts

    def string(self) -> str:
        s = self.s
        q = s[self.i]
        if s.startswith(q * 3, self.i):
            end = s.index(q * 3, self.i + 3)
            while s.startswith(q, end + 3):  # up to two quotes may end the string's content
                end += 1
            text = s[self.i + 3:end]
            for k in range(self.i, end):
                if s[k] == "\n":
                    self.line += 1
                    self.start = k + 1
            self.i = end + 3
            return text
        j = self.i + 1
        out = []
        while s[j] != q:
            if q == '"' and s[j] == "\\":
                out.append(s[j:j + 2])
                j += 2
                continue
            out.append(s[j])
            j += 1
        self.i = j + 1
        text = "".join(out)
        if q == '"' and "\\" in text:
            text = tomllib.loads(f"k = \"{text}\"")["k"]
        return text

    def value(self, path: Path) -> None:
        s = self.s
        c = s[self.i]
        if c in "\"'":
            self.string()
        elif c == "[":
            self.i += 1
            n = 0
            while True:
                self.ws(newlines=True)
                if s[self.i] == "]":
                    self.i += 1
                    return
                self.note((*path, n), self.here())
                self.value((*path, n))
                n += 1
                self.ws(newlines=True)
                if s[self.i] == ",":
                    self.i += 1
        elif c == "{":
            self.i += 1
            while True:
                self.ws()
                if s[self.i] == "}":
                    self.i += 1
                    return
                self.keyval(path)
                self.ws()
                if s[self.i] == ",":
                    self.i += 1
        else:
            while self.i < len(s) and s[self.i] not in ",]}\n#":
                self.i += 1

    def keyval(self, table: Path) -> None:
        at = self.here()
        parts = self.key()
        for k in range(1, len(parts) + 1):
            self.note((*table, *parts[:k]), at)
        self.ws()
        self.i += 1  # '='
        self.ws()
        self.value((*table, *parts))

    def run(self) -> dict[Path, tuple[int, int]]:
        s = self.s
        table: Path = ()
        while True:
            self.ws(newlines=True)
            if self.i >= len(s):
                return self.pos
            if s[self.i] == "[":
                double = s.startswith("[[", self.i)
                self.i += 2 if double else 1
                at = self.here()
                parts = tuple(self.key())
                self.i += 2 if double else 1
                if double:
                    n = self.arrays.get(parts, 0)
                    self.arrays[parts] = n + 1
                    table = (*parts, n)
                else:
                    table = parts
                for k in range(1, len(table) + 1):
                    self.note(table[:k], at)
            else:
                self.keyval(table)


def key_positions(text: str) -> dict[Path, tuple[int, int]]:
    """The (line, col) where each key path of a valid TOML document is first written."""
    return _Scanner(text).run()


# --- the keys fastrelay knows -------------------------------------------------------------------

ANY = "*"  # a name chosen by the operator ([remote."NAME"], [list] entries)

_TIMEOUTS = {
    "connect": "Connect_Timeout", "greeting": "Greeting_Timeout", "tls": "TLS_Timeout", "ehlo": "EHLO_Timeout",
    "mail-from": "Mail_From_Timeout", "rcpt-to": "Rcpt_To_Timeout", "data": "Data_Timeout",
    "mta-sts": "MTA_STS_Timeout",
}

# The tree of Stalwart keys understood, with the ecelerity.conf option each one becomes (the
# documentation table in docs/config.md is generated from MAPPING below).
STALWART_KEYS: dict[str, Any] = {
    "server": {"hostname": None, "listener": {ANY: {"bind": None, "protocol": None, "hostname": None}}},
    "queue": {"outbound": {
        "next-hop": None, "ip-strategy": None, "hostname": None,
        "source-ip": {"v4": None, "v6": None},
        "limits": {"mx": None, "multihomed": None},
        "timeouts": dict.fromkeys(_TIMEOUTS),
    }},
    "remote": {ANY: {"address": None, "port": None, "protocol": None, "concurrency": None, "timeout": None,
                     "tls": {"implicit": None, "allow-invalid-certs": None}}},
    "list": {ANY: None},
    "fastrelay": None,  # any ecelerity.conf option: checked by the settings model
}

# (Stalwart key, ecelerity.conf equivalent) for the docs, in the seed's order.
MAPPING: list[tuple[str, str]] = [
    ("queue.outbound.next-hop = [ { if = \"rcpt-domain\", in-list = \"list/L\", then = \"R\" } ]",
     "`Domain D { Routes = ( \"R's URL\" ) ... }` for each D in list L (with R's options)"),
    ("queue.outbound.next-hop = [ { if = \"rcpt-domain\", eq = \"D\", then = \"R\" } ]",
     "`Domain D { Routes = ( \"R's URL\" ) ... }`"),
    ("queue.outbound.next-hop = [ { if = \"rcpt-domain\", ne = \"D\", then = \"R\" } ]",
     "global `Routes = ( \"R's URL\" )` with R's options, and `Domain D` keeping the defaults"),
    ("queue.outbound.next-hop = [ ... { else = false } ]", "no Routes: delivery by MX (`__mx__`)"),
    ("queue.outbound.next-hop = [ { if = \"sender-domain\", eq = \"S\", then = \"R\" } ]",
     "`Binding next-hop-N { Sender_Domains = ( \"S\" ) Routes = ( \"R's URL\" ) ... }`"),
    ("[list] NAME = [ \"a\", \"b\" ]", "the domains of the Domain stanzas a rule makes"),
    ("remote.R.address, remote.R.port, remote.R.protocol",
     "`Routes = ( \"smtp://ADDRESS?port=PORT\" )` or `lmtp://...`"),
    ("remote.R.concurrency", "`max_outbound_connections`"),
    ("remote.R.timeout", "`Session_Timeout`"),
    ("remote.R.tls.implicit", "`TLS_Implicit`"),
    ("remote.R.tls.allow-invalid-certs = true / false (the default)", "`TLS_Verify = no` / `TLS_Verify = host`"),
    ("queue.outbound.ip-strategy", "`IP_Strategy`"),
    ("queue.outbound.source-ip.v4, .v6", "`Bind_Address = ( v4... v6... )` (the default binding's)"),
    ("queue.outbound.hostname", "`EHLO_Hostname`"),
    ("server.hostname", "`Hostname`"),
    ("(always, in Stalwart)", "`use_mta_sts = true` (on for every TOML file; `[fastrelay] use_mta_sts = "
                              "false` turns it off)"),
    ("queue.outbound.limits.mx", "`Max_MX_Hosts`"),
    ("queue.outbound.limits.multihomed", "`Max_MX_Addresses`"),
    *[(f"queue.outbound.timeouts.{k}", f"`{v}`") for k, v in _TIMEOUTS.items()],
    ("[server.listener.\"N\"] bind = [ \"ADDR:PORT\", ... ], protocol = \"smtp\"",
     "`ESMTP_Listener { Listen \"ADDR:PORT\" { } ... }`"),
    ("[server.listener.\"N\"] hostname", "`Hostname` in each of its Listen stanzas"),
    ("[fastrelay] OPTION = value", "the global option OPTION"),
    ("[fastrelay.domain.\"D\"] (host, binding, binding_group too)", "`Domain D { ... }` (Host, Binding, ...)"),
]

# The options a remote host's keys become (each scope a next-hop rule makes writes all of them).
REMOTE_OPTIONS = ("Routes", "max_outbound_connections", "Session_Timeout", "TLS_Implicit", "TLS_Verify")

_IP_STRATEGIES = ("ipv4-only", "ipv6-only", "ipv6-then-ipv4", "ipv4-then-ipv6")
_VARIABLES = ("rcpt-domain", "sender-domain")
_OPERATORS = ("eq", "ne", "in-list", "not-in-list")
_STANZAS = {"domain": "Domain", "host": "Host", "binding": "Binding", "binding_group": "Binding_Group"}


def _dotted(path: Path) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + (p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else f'"{p}"')
    return out


class _Translator:
    def __init__(self, file: str, text: str, data: dict):
        self.file = file
        self.data = data
        self.pos = key_positions(text)
        self.errors: list[ConfigError] = []
        self.globals: list[Option | Stanza] = []

    # -- helpers -------------------------------------------------------------------------------
    def at(self, path: Path) -> Pos:
        while path:
            hit = self.pos.get(path)
            if hit is not None:
                return Pos(self.file, hit[0], hit[1])
            path = path[:-1]
        return Pos(self.file, 1, 1)

    def fail(self, path: Path, message: str) -> None:
        self.errors.append(self.at(path).error(message))

    def atom(self, value: Any, path: Path) -> Atom | ListValue | None:
        p = self.at(path)
        if isinstance(value, bool):
            return Atom("true" if value else "false", False, p)
        if isinstance(value, (int, float)):
            return Atom(str(value), False, p)
        if isinstance(value, str):
            return Atom(value, True, p)
        if isinstance(value, list):
            items = []
            for k, v in enumerate(value):
                a = self.atom(v, (*path, k))
                if not isinstance(a, Atom):
                    self.fail((*path, k), f"bad value for '{_dotted(path)}': expected a string or a number in the list")
                    return None
                items.append(a)
            return ListValue(items, p)
        self.fail(path, f"bad value for '{_dotted(path)}': got a table; expected a value")
        return None

    def option(self, name: str, value: Any, path: Path, into: list | None = None) -> None:
        a = self.atom(value, path)
        if a is not None:
            (self.globals if into is None else into).append(Option(name, a, self.at(path)))

    def want(self, value: Any, kind: type | tuple, path: Path, expected: str) -> bool:
        if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            ok = False
        else:
            ok = isinstance(value, kind)
        if not ok:
            self.fail(path, f"bad value for '{_dotted(path)}': got {value!r}; expected {expected}")
        return ok

    def check_keys(self, table: dict, schema: dict, path: Path) -> None:
        """Every key of `table` must be in `schema` (ANY: any name, checked one level down)."""
        for k, v in table.items():
            if ANY in schema:
                sub = schema[ANY]
            elif k in schema:
                sub = schema[k]
            else:
                full = _dotted((*path, k))
                close = difflib.get_close_matches(k, list(schema), n=1, cutoff=0.6)
                if close:
                    hint = f"; did you mean '{_dotted((*path, close[0]))}'?"
                else:
                    hint = "; expected one of " + ", ".join(f"'{_dotted((*path, c))}'" for c in schema)
                self.fail((*path, k), f"unknown key '{full}'{hint}")
                continue
            if isinstance(sub, dict):
                if not isinstance(v, dict):
                    self.fail((*path, k), f"'{_dotted((*path, k))}' is a table; expected [{_dotted((*path, k))}] "
                                          "with its keys")
                    continue
                self.check_keys(v, sub, (*path, k))

    # -- the translation -----------------------------------------------------------------------
    def run(self) -> list:
        d = self.data
        top = {k: v for k, v in d.items() if k != "fastrelay"}
        self.check_keys(top, STALWART_KEYS, ())
        if self.errors:
            return []
        # Stalwart applies MTA-STS to every delivery by MX; `[fastrelay] use_mta_sts = false` turns it off.
        where = ("queue", "outbound", "timeouts", "mta-sts")
        self.globals.append(Option("use_mta_sts", Atom("true", False, self.at(where)), self.at(where)))
        self.server(d.get("server", {}))
        out = d.get("queue", {}).get("outbound", {})
        self.outbound(out)
        self.fastrelay(d.get("fastrelay"))
        return self.globals

    def server(self, srv: dict) -> None:
        if "hostname" in srv:
            self.option("Hostname", srv["hostname"], ("server", "hostname"))
        listens: list[Stanza] = []
        for name, li in srv.get("listener", {}).items():
            base = ("server", "listener", name)
            proto = li.get("protocol", "smtp")
            if proto != "smtp":
                self.fail((*base, "protocol"), f"bad value for '{_dotted((*base, 'protocol'))}': got {proto!r}; "
                                               'expected "smtp" (fastrelay\'s listeners speak SMTP)')
                continue
            binds = li.get("bind")
            if binds is None:
                self.fail(base, f"listener '{name}' has no bind, so it would listen nowhere; "
                                'expected bind = ["ADDRESS:PORT"]')
                continue
            if isinstance(binds, str):
                binds = [binds]
            if not self.want(binds, list, (*base, "bind"), 'a list of "ADDRESS:PORT"'):
                continue
            for k, b in enumerate(binds):
                bp = (*base, "bind", k) if (*base, "bind", k) in self.pos else (*base, "bind")
                if not self.want(b, str, bp, 'an "ADDRESS:PORT" string'):
                    continue
                children: list = []
                if "hostname" in li:
                    self.option("Hostname", li["hostname"], (*base, "hostname"), children)
                listens.append(Stanza("Listen", Atom(b, True, self.at(bp)), self.at(bp), children))
        if listens:
            self.globals.append(Stanza("ESMTP_Listener", None, listens[0].pos, listens))

    def outbound(self, out: dict) -> None:
        base = ("queue", "outbound")
        if "hostname" in out:
            self.option("EHLO_Hostname", out["hostname"], (*base, "hostname"))
        if "ip-strategy" in out:
            v = out["ip-strategy"]
            if v not in _IP_STRATEGIES:
                self.fail((*base, "ip-strategy"), f"bad value for 'queue.outbound.ip-strategy': got {v!r}; expected "
                                                  + ", ".join(f'"{s}"' for s in _IP_STRATEGIES))
            else:
                self.option("IP_Strategy", v, (*base, "ip-strategy"))
        src = out.get("source-ip", {})
        addrs: list[str] = []
        for fam, version in (("v4", 4), ("v6", 6)):
            if fam not in src:
                continue
            p = (*base, "source-ip", fam)
            if not self.want(src[fam], list, p, f"a list of IPv{version} addresses"):
                continue
            for k, a in enumerate(src[fam]):
                try:
                    ok = ipaddress.ip_address(a).version == version
                except (ValueError, TypeError):
                    ok = False
                if not ok:
                    self.fail((*p, k), f"bad value for '{_dotted(p)}': got {a!r}; expected an IPv{version} address")
                else:
                    addrs.append(a)
        if addrs:
            self.globals.append(Option("Bind_Address", ListValue([Atom(a, True, self.at((*base, "source-ip")))
                                                                   for a in addrs], self.at((*base, "source-ip"))),
                                       self.at((*base, "source-ip"))))
        lim = out.get("limits", {})
        for key, opt in (("mx", "Max_MX_Hosts"), ("multihomed", "Max_MX_Addresses")):
            if key in lim:
                self.option(opt, lim[key], (*base, "limits", key))
        for key, opt in _TIMEOUTS.items():
            if key in out.get("timeouts", {}):
                self.option(opt, out["timeouts"][key], (*base, "timeouts", key))
        if "next-hop" in out:
            self.next_hop(out["next-hop"], (*base, "next-hop"))

    # -- remotes and next-hop rules ---------------------------------------------------------------
    def remote_options(self, name: str, path: Path) -> list[Option] | None:
        """The options a remote host stands for, or None (with an error) if it is not defined."""
        remotes = self.data.get("remote", {})
        if name not in remotes:
            close = difflib.get_close_matches(name, list(remotes), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else (
                "; expected the name of a [remote.\"NAME\"] table" + (
                    " (" + ", ".join(f"'{r}'" for r in remotes) + ")" if remotes else ""))
            self.fail(path, f"unknown remote '{name}'{hint}")
            return None
        r = remotes[name]
        rp = ("remote", name)
        opts: list[Option] = []
        if "address" not in r:
            self.fail(rp, f"remote '{name}' has no address; expected address = \"HOST\"")
            return None
        addr = r["address"]
        if not self.want(addr, str, (*rp, "address"), "a host name or IP address"):
            return None
        proto = r.get("protocol", "smtp")
        if proto not in ("smtp", "lmtp"):
            self.fail((*rp, "protocol"), f"bad value for '{_dotted((*rp, 'protocol'))}': got {proto!r}; "
                                         'expected "smtp" or "lmtp"')
            return None
        port = r.get("port", 25 if proto == "smtp" else 24)
        if not self.want(port, int, (*rp, "port"), "a port number") or not 0 < port < 65536:
            if isinstance(port, int):
                self.fail((*rp, "port"), f"bad value for '{_dotted((*rp, 'port'))}': got {port}; expected 1 to 65535")
            return None
        host = f"[{addr}]" if ":" in addr else addr
        where = (*rp, "address")
        opts.append(Option("Routes", ListValue([Atom(f"{proto}://{host}?port={port}", True, self.at(where))],
                                               self.at(where)), self.at(where)))
        for key, opt in (("concurrency", "max_outbound_connections"), ("timeout", "Session_Timeout")):
            if key in r:
                self.option(opt, r[key], (*rp, key), opts)
        tls = r.get("tls", {})
        if "implicit" in tls:
            self.option("TLS_Implicit", tls["implicit"], (*rp, "tls", "implicit"), opts)
        invalid = tls.get("allow-invalid-certs", False)
        if self.want(invalid, bool, (*rp, "tls", "allow-invalid-certs"), "true or false"):
            # Stalwart checks a remote's certificate unless allow-invalid-certs = true.
            self.option("TLS_Verify", "no" if invalid else "host", (*rp, "tls", "allow-invalid-certs")
                        if "allow-invalid-certs" in tls else where, opts)
        return opts

    def full(self, value: Any, tp: Path) -> list[Option] | None:
        """The options a next hop stands for, every one of REMOTE_OPTIONS written (at its default
        where the remote says nothing), so that no scope inherits another remote's settings.
        `value` False is delivery by MX."""
        from fastrelay.config import schema as S

        if value is False:
            opts: list[Option] = []
        elif value is True or not isinstance(value, str):
            self.fail(tp, f"bad next-hop target: got {value!r}; expected the name of a remote or false")
            return None
        else:
            if value not in self._remote_cache:
                self._remote_cache[value] = self.remote_options(value, tp)
            got = self._remote_cache[value]
            if got is None:
                return None
            opts = list(got)
        where = self.at(tp)
        have = {o.name for o in opts}
        for name in REMOTE_OPTIONS:
            if name in have:
                continue
            if name == "Routes":
                opts.append(Option("Routes", ListValue([Atom("__mx__", True, where)], where), where))
            else:
                o = S.BY_KEY[name.lower()]
                opts.append(Option(name, Atom(o.format(o.default).strip('"'), False, where), where))
        return opts

    def domains_of(self, rule: dict, op: str, path: Path) -> set[str] | None:
        v = rule[op]
        if op in ("eq", "ne"):
            if not self.want(v, str, (*path, op), "a domain name"):
                return None
            return {v.lower().rstrip(".")}
        if not self.want(v, str, (*path, op), '"list/NAME"'):
            return None
        name = v[5:] if v.startswith("list/") else None
        lists = self.data.get("list", {})
        if name is None or name not in lists:
            close = difflib.get_close_matches(name or v, list(lists), n=1, cutoff=0.6)
            hint = f"; did you mean 'list/{close[0]}'?" if close else "; expected \"list/NAME\" of a key in [list]"
            self.fail((*path, op), f"unknown list '{v}'{hint}")
            return None
        items = lists[name]
        if not self.want(items, list, ("list", name), "a list of domain names"):
            return None
        return {str(x).lower().rstrip(".") for x in items}

    def parse_rules(self, rules: Any, path: Path) -> list[tuple] | None:
        """The rules as (variable or None for else, operator, domains, (target, path))."""
        if isinstance(rules, (str, bool)):
            rules = [{"else": rules}]
        if not self.want(rules, list, path, "a list of { if = ..., then = ... } and { else = ... }"):
            return None
        out: list[tuple] = []
        for k, rule in enumerate(rules):
            rp = (*path, k)
            if not isinstance(rule, dict):
                self.fail(rp, "bad next-hop rule: expected { if = \"rcpt-domain\", eq = \"D\", then = \"REMOTE\" } "
                              "or { else = false }")
                return None
            unknown = [key for key in rule if key not in ("if", "then", "else", *_OPERATORS)]
            for key in unknown:
                close = difflib.get_close_matches(key, ["if", "then", "else", *_OPERATORS], n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else \
                    "; expected if, then, else, " + ", ".join(_OPERATORS)
                self.fail((*rp, key), f"unknown key '{_dotted((*rp, key))}'{hint}")
            if unknown:
                return None
            if "else" in rule:
                if len(rule) != 1:
                    self.fail(rp, "bad next-hop rule: an else rule has nothing but else; expected { else = REMOTE }")
                    return None
                out.append((None, None, None, (rule["else"], (*rp, "else"))))
                continue
            var = rule.get("if")
            if var not in _VARIABLES:
                self.fail((*rp, "if"), f"bad next-hop rule: got if = {var!r}; expected "
                                       + " or ".join(f'"{v}"' for v in _VARIABLES))
                return None
            ops = [o for o in _OPERATORS if o in rule]
            if len(ops) != 1 or "then" not in rule:
                self.fail(rp, "bad next-hop rule: expected one of " + ", ".join(_OPERATORS) + " and then")
                return None
            doms = self.domains_of(rule, ops[0], rp)
            if doms is None:
                return None
            out.append((var, ops[0], doms, (rule["then"], (*rp, "then"))))
        return out

    @staticmethod
    def by_recipient(rules: list[tuple]) -> tuple[dict[str, tuple], tuple | None]:
        """Recipient-domain rules (first match wins) as (domain -> target, target of every other
        domain or None). `pending` holds the domains still undecided once a rule took every other
        domain; a domain no rule matches goes by DNS (Stalwart's default)."""
        explicit: dict[str, tuple] = {}
        rest: tuple | None = None
        pending: set[str] = set()
        for var, op, doms, target in rules:
            if var is None:  # else
                if rest is None:
                    rest = target
                else:
                    for dom in pending:
                        explicit.setdefault(dom, target)
                    pending = set()
            elif op in ("eq", "in-list"):
                for dom in sorted(doms):
                    if rest is None or dom in pending:
                        explicit.setdefault(dom, target)
                pending -= doms
            elif rest is None:  # ne, not-in-list: every domain but these
                rest = target
                pending = doms - set(explicit)
            else:
                for dom in pending - doms:
                    explicit.setdefault(dom, target)
                pending &= doms
        for dom in pending:
            explicit.setdefault(dom, (False, target[1] if rules else ()))
        return explicit, rest

    @staticmethod
    def for_sender(rules: list[tuple], sender: str | None) -> list[tuple]:
        """The rules as they stand for mail from `sender`'s domain (None: a domain no rule names):
        a sender-domain rule becomes an else if it matches, and goes if it does not."""
        out = []
        for rule in rules:
            var, op, doms, target = rule
            if var == "sender-domain":
                inside = sender is not None and sender in doms
                if inside == (op in ("eq", "in-list")):
                    out.append((None, None, None, target))
            else:
                out.append(rule)
        return out

    def emit(self, rules: list[tuple], into: list, domain_stanzas: list, path: Path) -> bool:
        """Recipient rules into scope options (`into`) and Domain stanzas; with `domain_stanzas` is
        `into` (the global scope) the rest goes there only when it is a remote; in a Binding it is
        always written, so that nothing falls through to the default binding's Domain stanzas."""
        explicit, rest = self.by_recipient(rules)
        in_binding = into is not domain_stanzas
        rest_value = False if rest is None else rest[0]
        if rest is not None and (rest_value is not False or in_binding):
            got = self.full(rest_value, rest[1])
            if got is None:
                return False
            into.extend(got)
        elif in_binding:
            got = self.full(False, path)
            if got is None:
                return False
            into.extend(got)
        for dom in sorted(explicit):
            value, tp = explicit[dom]
            if value == rest_value:
                continue
            got = self.full(value, tp)
            if got is None:
                return False
            where = self.at(tp)
            domain_stanzas.append(Stanza("Domain", Atom(dom, True, where), where, got))
        return True

    def next_hop(self, rules: Any, path: Path) -> None:
        """Compile the rules (first match wins, as Stalwart evaluates them): recipient-domain
        rules into Domain stanzas and global options; sender-domain rules into Bindings that
        take the mail of those sender domains (Sender_Domains), each with the recipient rules
        as they stand for those senders, as Routes and binding::domain stanzas."""
        parsed = self.parse_rules(rules, path)
        if parsed is None:
            return
        self._remote_cache: dict[str, list[Option] | None] = {}
        if not self.emit(self.for_sender(parsed, None), self.globals, self.globals, path):
            return
        senders = sorted({d for var, _, doms, _ in parsed if var == "sender-domain" for d in doms})
        base = self.by_recipient(self.for_sender(parsed, None))

        def key(compiled: tuple) -> tuple:
            explicit, rest = compiled
            return (False if rest is None else rest[0], tuple(sorted((d, t[0]) for d, t in explicit.items())))

        groups: dict[tuple, list[str]] = {}
        for dom in senders:
            k = key(self.by_recipient(self.for_sender(parsed, dom)))
            if k != key(base):
                groups.setdefault(k, []).append(dom)
        for n, doms in enumerate(groups.values(), start=1):
            where = self.at(path)
            children: list = [Option("Sender_Domains", ListValue([Atom(d, True, where) for d in doms], where), where)]
            if not self.emit(self.for_sender(parsed, doms[0]), children, children_domains := [], path):
                return
            children.extend(children_domains)
            self.globals.append(Stanza("Binding", Atom(f"next-hop-{n}", True, where), where, children))

    # -- [fastrelay]: ecelerity.conf options under their own names ---------------------------------
    def fastrelay(self, table: Any) -> None:
        if table is None:
            return
        if not isinstance(table, dict):
            self.fail(("fastrelay",), "'fastrelay' is a table; expected [fastrelay] with ecelerity.conf options")
            return
        for k, v in table.items():
            p = ("fastrelay", k)
            if k.lower() in _STANZAS and isinstance(v, dict):
                for name, body in v.items():
                    sp = (*p, name)
                    if not isinstance(body, dict):
                        self.fail(sp, f"'{_dotted(sp)}' is a stanza; expected [{_dotted(sp)}] with its options")
                        continue
                    children: list = []
                    for ok, ov in body.items():
                        self.option(ok, ov, (*sp, ok), children)
                    self.globals.append(Stanza(_STANZAS[k.lower()], Atom(name, True, self.at(sp)), self.at(sp),
                                               children))
                continue
            self.option(k, v, p)


def translate(text: str, file: str) -> tuple[list, list[ConfigError]]:
    """TOML text -> (the parse tree ecelerity.conf would give, errors)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        line, col = (int(m.group(1)), int(m.group(2))) if m else (1, 1)
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e)) or "invalid TOML"
        if m is None and "end of document" in str(e):
            line = text.count("\n") + 1
        return [], [ConfigError(file, line, col, f"{msg}; expected TOML (https://toml.io)")]
    t = _Translator(file, text, data)
    nodes = t.run()
    return nodes, t.errors


def _build(text: str, file: str, lenient: bool):
    from fastrelay.config.model import build

    nodes, errors = translate(text, file)
    if errors:
        raise ConfigErrors(errors)
    try:
        return build(nodes, [file], lenient=lenient)
    except ConfigErrors as e:
        raise ConfigErrors(sorted(e.errors, key=lambda x: (x.line, x.col))) from None


def loads_toml(text: str, file: str = "<string>.toml", *, lenient: bool = False):
    """Model Stalwart TOML text."""
    return _build(text, file, lenient)


def load_toml(path: str, *, lenient: bool = False):
    """Read and model a Stalwart TOML file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigErrors([ConfigError(path, 1, 1, f"cannot read {path}: {e.strerror}; expected a readable file")]) \
            from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigErrors([ConfigError(path, line, 1, "not UTF-8; expected a UTF-8 TOML file")]) from None
    return _build(text, path, lenient)
