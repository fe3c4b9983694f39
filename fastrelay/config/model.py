"""The typed settings model: scoped option values with Momentum's fallback, and where each was set."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fastrelay import limits
from fastrelay.config import momentum
from fastrelay.config import schema as S
from fastrelay.config.errors import ConfigError, ConfigErrors, UnsupportedMomentumName
from fastrelay.config.parser import Atom, Option, Pos, Stanza, parse_file, parse_text
from fastrelay.config.types import DISABLED, HostPort, Invalid, MomentumValue


class Setting(NamedTuple):
    """An effective value, where it was written (None for a default) and in which scope."""

    value: Any
    pos: Pos | None
    scope: str

    @property
    def origin(self) -> str:
        return "default" if self.pos is None else f"{self.pos.file}:{self.pos.line}"


class Scope:
    """The options written in one stanza (or the global scope): key -> (value, pos)."""

    __slots__ = ("description", "kind", "name", "values")

    def __init__(self, kind: str, name: str | None, description: str):
        self.kind = kind
        self.name = name
        self.description = description
        self.values: dict[str, tuple[Any, Pos]] = {}

    def get(self, key: str) -> tuple[Any, Pos] | None:
        return self.values.get(key)


@dataclass
class BindingScope:
    scope: Scope
    group: str | None = None
    domains: dict[str, Scope] = field(default_factory=dict)
    # Regex Domain stanzas inside this binding, in file order (Momentum's regex domains).
    regex_domains: list[tuple[re.Pattern, Scope]] = field(default_factory=list)
    # binding::host (issue #10: the binding's own Host-scope throttles), literal and regex.
    hosts: dict[str, Scope] = field(default_factory=dict)
    regex_hosts: list[tuple[re.Pattern, Scope]] = field(default_factory=list)


def _is_regex(name: str) -> bool:
    return len(name) >= 2 and name[0] == "/" and name[-1] == "/"


def match_scope(name: str, literal: dict[str, Scope], regexes: list[tuple[re.Pattern, Scope]]) -> Scope | None:
    """Momentum's domain page: "Option resolution will always match a value defined in a normal
    domain stanza before looking for a matching regex domain stanza in the same container", and
    among regexes "in the order that the regex domain stanzas were declared". An unanchored regex
    matches anywhere in the name (PCRE search), as Momentum warns."""
    sc = literal.get(name)
    if sc is not None:
        return sc
    for rx, sc in regexes:
        if rx.search(name):
            return sc
    return None


def _domain_key(domain: str) -> str:
    d = domain.lower().rstrip(".")
    if d.startswith("[") or d[:1].isdigit():
        lit = S.domain_literal(d)
        if lit is not None:
            return lit
    return d


@dataclass
class ListenScope:
    """One Listen entry of an ESMTP_Listener or HTTP_Listener, with its fallback chain."""

    address: HostPort
    pos: Pos
    chain: list[Scope]  # innermost first: Listen, Listener, global
    defaults_scope: str

    def lookup(self, option: str) -> Setting:
        opt = _opt(option)
        for sc in self.chain:
            hit = sc.get(opt.key)
            if hit is not None:
                return Setting(hit[0], hit[1], sc.description)
        return Setting(opt.default, None, "default")

    def get(self, option: str) -> Any:
        return self.lookup(option).value


def _invisible(ch: str) -> bool:
    # Format characters (U+FEFF, U+200B...), spaces other than the ASCII one (U+00A0...), controls.
    return ch != " " and unicodedata.category(ch) in ("Cf", "Zs", "Zl", "Zp", "Cc", "Co", "Cn")


def shown(name: str) -> str:
    """`name` quoted for an error, with each invisible character written as <U+XXXX> and named
    after it: a UTF-8 BOM or a no-break space in a name otherwise shows as a name that looks right."""
    bad = [ch for ch in dict.fromkeys(name) if _invisible(ch)]
    text = "".join(f"<U+{ord(ch):04X}>" if _invisible(ch) else ch for ch in name)
    if not bad:
        return f"'{text}'"
    what = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, 'an unnamed character')}"
                     + (" (a byte order mark)" if c == "\ufeff" else "") for c in bad)
    return f"'{text}' (it contains {what}, which does not show)"


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiouh" and word.lower() != "host" else "a ") + word


def _opt(option: str) -> S.OptionDef:
    try:
        return S.BY_KEY[option.lower()]
    except KeyError:
        raise KeyError(f"unknown option {option!r}") from None


class Config:
    """A loaded configuration. Ask it for an option's effective value with get() or lookup()."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self.global_ = Scope(S.GLOBAL, None, "global")
        self.domains: dict[str, Scope] = {}
        self.binding_groups: dict[str, Scope] = {}
        # binding_group::domain (Momentum): Domain stanzas inside a Binding_Group, by group name,
        # literal and regex (file order).
        self.group_domains: dict[str, dict[str, Scope]] = {}
        self.group_regex_domains: dict[str, list[tuple[re.Pattern, Scope]]] = {}
        self.bindings: dict[str, BindingScope] = {}
        self.hosts: dict[str, Scope] = {}
        self.regex_domains: list[tuple[re.Pattern, Scope]] = []  # file order
        self.regex_hosts: list[tuple[re.Pattern, Scope]] = []
        self.esmtp_listens: list[ListenScope] = []
        self.http_listens: list[ListenScope] = []
        self.admin_listens: list[ListenScope] = []
        self.scripts: dict[str, tuple[str, Pos]] = {}  # source -> (script name, pos)
        self.security = Scope(S.SECURITY, None, "Security")  # User and Group (Momentum's privilege drop)
        # Momentum names ignored under --lenient (check_runnable() returns its own warnings).
        self.warnings: list[ConfigError] = []
        # eventloop stanzas by lower-cased name: (concurrency, pos of the stanza).
        self.event_loops: dict[str, tuple[int, Pos]] = {}
        self.worker_count = 1  # resolved Workers / delivery_pool (see _Builder.workers)
        self._cache: dict[tuple[str, str | None, str | None], Setting] = {}

    # -- queries ----------------------------------------------------------------------------
    def lookup(self, option: str, domain: str | None = None, binding: str | None = None) -> Setting:
        """The effective value of `option` for mail to `domain` sent on `binding`, and its origin.

        Fallback (Momentum's "Configuration Scopes and Fallback"): binding::domain (the binding
        may be in a group), binding_group::domain, binding, binding_group, domain, global, default.
        """
        # Binding names are case-sensitive (Momentum); domains are not.
        key = (option.lower(), _domain_key(domain) if domain else None, binding)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        opt = _opt(option)
        k = opt.key
        for sc in self._chain(key[1], key[2]):
            v = sc.get(k)
            if v is not None:
                res = Setting(v[0], v[1], sc.description)
                break
        else:
            res = Setting(opt.default, None, "default")
        self._cache[key] = res
        return res

    def get(self, option: str, domain: str | None = None, binding: str | None = None) -> Any:
        return self.lookup(option, domain, binding).value

    def host_scopes(self) -> list[Scope]:
        """Every Host stanza, literal and regex, plain and inside a Binding."""
        out = [*self.hosts.values(), *(sc for _, sc in self.regex_hosts)]
        for b in self.bindings.values():
            out += [*b.hosts.values(), *(sc for _, sc in b.regex_hosts)]
        return out

    def all_scopes(self) -> list[Scope]:
        """Every scope an option can be set in: global, Domain, Host, Binding, Binding_Group and
        the Domain and Host stanzas inside them (literal and regex)."""
        out = [self.global_, *self.domains.values(), *(sc for _, sc in self.regex_domains),
               *self.binding_groups.values(), *self.host_scopes()]
        for gd in self.group_domains.values():
            out += gd.values()
        for grd in self.group_regex_domains.values():
            out += [sc for _, sc in grd]
        for b in self.bindings.values():
            out += [b.scope, *b.domains.values(), *(sc for _, sc in b.regex_domains)]
        return out

    def set_anywhere(self, option: str) -> bool:
        """Whether `option` has a value for any mail at all: a default, or a setting in some
        scope. False lets a per-message check be skipped whole (its lookups cost a message)."""
        opt = _opt(option)
        if opt.default is not None:
            return True
        return any(sc.get(opt.key) is not None for sc in self.all_scopes())

    def _chain(self, domain: str | None, binding: str | None) -> list[Scope]:
        chain: list[Scope] = []
        b = self.bindings.get(binding) if binding else None
        if b is not None:
            if domain:
                bd = match_scope(domain, b.domains, b.regex_domains)
                if bd is not None:
                    chain.append(bd)
            if domain and b.group:
                # "Value given in a domain stanza within a binding_group" comes before the
                # binding's own value (Momentum's precedence list).
                gd = match_scope(domain, self.group_domains.get(b.group, {}),
                                 self.group_regex_domains.get(b.group, []))
                if gd is not None:
                    chain.append(gd)
            chain.append(b.scope)
            if b.group and b.group in self.binding_groups:
                chain.append(self.binding_groups[b.group])
        if domain:
            d = match_scope(domain, self.domains, self.regex_domains)
            if d is not None:
                chain.append(d)
        chain.append(self.global_)
        return chain

    def binding_scope(self, binding: str | None) -> BindingScope | None:
        return self.bindings.get(binding) if binding else None

    def group_members(self, group: str) -> list[str]:
        """The bindings of a Binding_Group, in file order (a group declared twice is merged)."""
        return [name for name, b in self.bindings.items() if b.group == group]

    def host_lookup(self, option: str, host: str, binding: str | None = None) -> Setting | None:
        """The value set for `option` in the Host stanza of `host` (binding::host first, then
        host; no fallback to the binding/domain/global value, as Momentum), or None."""
        key = _opt(option).key
        name = host.lower()
        b = self.bindings.get(binding) if binding else None
        for sc in (match_scope(name, b.hosts, b.regex_hosts) if b is not None else None,
                   match_scope(name, self.hosts, self.regex_hosts)):
            if sc is not None:
                v = sc.get(key)
                if v is not None:
                    return Setting(v[0], v[1], sc.description)
        return None

    def reroute_target(self, option: str, domain: str, binding: str | None = None) -> str | None:
        """reroute_domain / delayed_reroute_domain for `domain`, with "disabled" as None."""
        v = self.get(option, domain, binding)
        return None if v in (None, DISABLED) else v

    def delivery_domain(self, domain: str, binding: str | None = None) -> str:
        """The domain whose delivery options (retries, expiry, TLS, timeouts, routes) apply to mail
        for `domain`: its reroute_domain target (seeds 000/001), or the domain itself."""
        return self.reroute_target("reroute_domain", domain, binding) or domain

    @property
    def xfer_server_enabled(self) -> bool:
        return "msys.xfer.server" in self.scripts

    @property
    def xfer_client_enabled(self) -> bool:
        return "msys.xfer.client" in self.scripts

    @property
    def workers(self) -> int:
        """How many worker processes `fastrelay run` starts (1: a single process)."""
        return self.worker_count

    @property
    def spool_dir(self) -> str:
        s = self.lookup("Spool_Base")
        if s.value is None:
            from fastrelay.paths import default_spool

            return default_spool()
        path = s.value
        if not os.path.isabs(path) and s.pos is not None:
            path = os.path.join(os.path.dirname(os.path.abspath(s.pos.file)), path)
        return os.path.normpath(path)

    @staticmethod
    def conf_path(setting: Setting) -> str | None:
        """A path option's value, relative to the directory of the conf file that set it."""
        if setting.value is None:
            return None
        if os.path.isabs(setting.value) or setting.pos is None:
            return setting.value
        return os.path.join(os.path.dirname(os.path.abspath(setting.pos.file)), setting.value)

    @property
    def mainlog_path(self) -> str:
        """The mainlog file: Mainlog, or beside a Spool_Base the conf sets, or the default place."""
        s = self.lookup("Mainlog")
        if s.value is None:
            if self.lookup("Spool_Base").value is None:
                from fastrelay.paths import default_mainlog

                return default_mainlog()
            return os.path.join(os.path.dirname(self.spool_dir), "mainlog")
        if os.path.isabs(s.value) or s.pos is None:
            return s.value
        return os.path.join(os.path.dirname(os.path.abspath(s.pos.file)), s.value)


class _Builder:
    """Walk the parsed tree into a Config, collecting every semantic error."""

    def __init__(self) -> None:
        self.cfg = Config()
        self.errors: list[ConfigError] = []
        self.listener_pools: list[tuple[str, Pos]] = []  # (event_loop value, pos) per listener

    def fail(self, pos: Pos, message: str) -> None:
        self.errors.append(pos.error(message))

    def momentum(self, name: str, pos: Pos) -> bool:
        """A name fastrelay does not know but Momentum's reference does: say so, with no guess
        (`ehlo_hostname` is not a misspelt `Hostname`). True if it was one."""
        hit = momentum.lookup(name)
        if hit is None:
            return False
        kind = hit[0]
        self.errors.append(UnsupportedMomentumName(
            pos.file, pos.line, pos.col,
            f"{name} is a Momentum {kind} that fastrelay does not support; expected an option or stanza "
            "of docs/config.md (--lenient ignores it with a warning)",
        ))
        return True

    def build(self, nodes: list) -> None:
        self.items(nodes, S.GLOBAL, self.cfg.global_, ctx={})

    def items(self, nodes: list, scope_kind: str, scope: Scope, ctx: dict) -> None:
        for node in nodes:
            if isinstance(node, Option):
                self.option(node, scope_kind, scope)
            else:
                self.stanza(node, scope_kind, ctx)

    def option(self, node: Option, scope_kind: str, scope: Scope) -> None:
        opt = S.BY_KEY.get(node.key)
        if opt is None and node.key not in S.STANZA_BY_KEY and self.momentum(node.name, node.pos):
            return
        if opt is None:
            msg = f"unknown option {shown(node.name)}"
            close = difflib.get_close_matches(node.key, list(S.BY_KEY), n=1, cutoff=0.75)
            if close:
                msg += f"; did you mean '{S.BY_KEY[close[0]].name}'?"
            elif node.key in S.STANZA_BY_KEY:
                stanza = S.STANZA_BY_KEY[node.key].name
                msg += f"; '{stanza}' is a stanza: write {stanza} NAME {{ ... }}"
            else:
                msg += "; expected a known option name (see docs/config.md)"
            self.fail(node.pos, msg)
            return
        if scope_kind == S.BINDING_HOST and opt.key not in S.BINDING_HOST_OPTIONS:
            self.fail(node.pos, f"option '{opt.name}' is not valid in {S.SCOPE_NAMES[scope_kind]}; expected "
                                "outbound_throttle_connections or outbound_throttle_messages there")
            return
        if (opt.key, scope_kind) in S.MOMENTUM_ONLY_SCOPES:
            self.errors.append(UnsupportedMomentumName(
                node.pos.file, node.pos.line, node.pos.col,
                f"{opt.name} in {S.SCOPE_NAMES[scope_kind]} is a Momentum option that fastrelay does "
                f"not support there (it is valid in {S.valid_in(opt)}; --lenient ignores it with a warning)"))
            return
        # A Domain in a Binding_Group takes what a Domain in a Binding takes (Momentum).
        checked = {S.BINDING_HOST: S.HOST, S.BINDING_GROUP_DOMAIN: S.BINDING_DOMAIN}.get(scope_kind, scope_kind)
        if checked not in opt.scopes:
            self.fail(
                node.pos,
                f"option '{opt.name}' is not valid in {S.SCOPE_NAMES[scope_kind]}; "
                f"expected it in {S.valid_in(opt)}",
            )
            return
        try:
            value = opt.type.convert(node.value)
        except Invalid as e:
            pos = e.atom.pos if e.atom is not None else node.value.pos
            if isinstance(e, MomentumValue):
                self.errors.append(UnsupportedMomentumName(
                    pos.file, pos.line, pos.col,
                    f"{opt.name}: {e.message}, a Momentum feature that fastrelay does not support "
                    "(--lenient ignores the option with a warning)"))
            else:
                self.fail(pos, f"bad value for '{opt.name}': {e.message}")
            return
        scope.values[opt.key] = (value, node.pos)

    def stanza(self, node: Stanza, parent_kind: str, ctx: dict) -> None:
        sdef = S.STANZA_BY_KEY.get(node.key)
        if sdef is None and node.key not in S.BY_KEY and self.momentum(node.type, node.pos):
            return
        if sdef is None:
            msg = f"unknown stanza {shown(node.type)}"
            # Only the stanzas valid here are offered (a Host inside a Domain would be another error).
            here = [sd for sd in S.STANZAS if parent_kind in sd.parents]
            close = difflib.get_close_matches(node.key, [sd.key for sd in here], n=1, cutoff=0.7)
            if node.key in S.BY_KEY:
                msg += f"; '{S.BY_KEY[node.key].name}' is an option: write {S.BY_KEY[node.key].name} = value"
            elif close:
                msg += f"; did you mean '{S.STANZA_BY_KEY[close[0]].name}'?"
            elif here:
                msg += f"; expected one of the stanzas valid in {S.SCOPE_NAMES[parent_kind]}: " + ", ".join(
                    sd.name for sd in here)
            else:
                msg += f"; {S.SCOPE_NAMES[parent_kind]} holds no stanzas, only options"
            self.fail(node.pos, msg)
            return
        if parent_kind not in sdef.parents:
            where = " or ".join(S.SCOPE_NAMES[p] for p in sorted(sdef.parents))
            self.fail(node.pos, f"{_a(sdef.name)} stanza is not valid in {S.SCOPE_NAMES[parent_kind]}; "
                                f"expected it in {where}")
            return
        kind = S.NESTED_SCOPE.get((parent_kind, sdef.scope), sdef.scope)
        name: Any = None
        if node.name is None:
            if sdef.needs_name:
                self.fail(node.pos, f"{_a(sdef.name)} stanza needs a name; expected {sdef.name} NAME {{ ... }}")
                return
        else:
            if not sdef.needs_name:
                self.fail(node.name.pos, f"{_a(sdef.name)} stanza takes no name; expected {sdef.name} {{ ... }}")
                return
            assert sdef.name_type is not None
            try:
                name = sdef.name_type.convert(node.name)
            except Invalid as e:
                self.fail(node.name.pos, f"bad {sdef.name} name: {e.message}")
                return
        getattr(self, f"s_{kind}")(node, name, ctx)

    # one handler per scope kind -------------------------------------------------------------
    def _named(self, literal: dict[str, Scope], regexes: list[tuple[re.Pattern, Scope]], kind: str, name: str,
               description: str) -> Scope:
        """The scope of a Domain or Host stanza: a literal name, or a "/regex/" kept in file
        order; one written twice is merged."""
        if not _is_regex(name):
            return literal.setdefault(name, Scope(kind, name, description))
        for _rx, sc in regexes:
            if sc.name == name:
                return sc
        sc = Scope(kind, name, description)
        regexes.append((re.compile(name[1:-1], re.IGNORECASE), sc))
        return sc

    def s_domain(self, node: Stanza, name: str, ctx: dict) -> None:
        sc = self._named(self.cfg.domains, self.cfg.regex_domains, S.DOMAIN, name, f"Domain {name}")
        self.items(node.children, S.DOMAIN, sc, ctx)

    def s_binding_group(self, node: Stanza, name: str, ctx: dict) -> None:
        # Case-sensitive (Momentum); a group declared in several places is one group.
        sc = self.cfg.binding_groups.setdefault(name, Scope(S.BINDING_GROUP, name, f"Binding_Group {name}"))
        self.items(node.children, S.BINDING_GROUP, sc, {**ctx, "group": name})

    def s_binding(self, node: Stanza, name: str, ctx: dict) -> None:
        b = self.cfg.bindings.get(name)
        if b is None:
            b = self.cfg.bindings[name] = BindingScope(Scope(S.BINDING, name, f"Binding {name}"))
        if ctx.get("group"):
            b.group = ctx["group"]
        self.items(node.children, S.BINDING, b.scope, {**ctx, "binding": b})

    def s_binding_domain(self, node: Stanza, name: str, ctx: dict) -> None:
        b: BindingScope = ctx["binding"]
        sc = self._named(b.domains, b.regex_domains, S.BINDING_DOMAIN, name,
                         f"{b.scope.description}::Domain {name}")
        self.items(node.children, S.BINDING_DOMAIN, sc, ctx)

    def s_binding_group_domain(self, node: Stanza, name: str, ctx: dict) -> None:
        g = ctx["group"]
        sc = self._named(self.cfg.group_domains.setdefault(g, {}), self.cfg.group_regex_domains.setdefault(g, []),
                         S.BINDING_GROUP_DOMAIN, name, f"Binding_Group {g}::Domain {name}")
        self.items(node.children, S.BINDING_GROUP_DOMAIN, sc, ctx)

    def s_host(self, node: Stanza, name: str, ctx: dict) -> None:
        sc = self._named(self.cfg.hosts, self.cfg.regex_hosts, S.HOST, name, f"Host {name}")
        self.items(node.children, S.HOST, sc, ctx)

    def _needs_listen(self, node: Stanza) -> None:
        # A listener with no Listen would listen nowhere: an error, never silently ignored.
        if not any(isinstance(c, Stanza) and c.key == "listen" for c in node.children):
            self.fail(node.pos, f"{node.type} has no Listen stanza, so it would listen nowhere; "
                                f'expected {node.type} {{ Listen "ADDRESS:PORT" {{ }} }}')
    def s_binding_host(self, node: Stanza, name: str, ctx: dict) -> None:
        b: BindingScope = ctx["binding"]
        sc = self._named(b.hosts, b.regex_hosts, S.BINDING_HOST, name, f"{b.scope.description}::Host {name}")
        self.items(node.children, S.BINDING_HOST, sc, ctx)

    def s_esmtp_listener(self, node: Stanza, name: None, ctx: dict) -> None:
        sc = Scope(S.ESMTP_LISTENER, None, "ESMTP_Listener")
        self.items(node.children, S.ESMTP_LISTENER, sc, {**ctx, "listener": sc})
        self._needs_listen(node)
        self._pool_of(sc)

    def s_http_listener(self, node: Stanza, name: None, ctx: dict) -> None:
        sc = Scope(S.HTTP_LISTENER, None, "HTTP_Listener")
        self.items(node.children, S.HTTP_LISTENER, sc, {**ctx, "listener": sc})
        self._needs_listen(node)
        self._pool_of(sc)

    def _pool_of(self, sc: Scope) -> None:
        hit = sc.get("event_loop")
        if hit is not None:
            self.listener_pools.append(hit)

    def _listen(self, node: Stanza, addr: HostPort, ctx: dict, kind: str, into: list[ListenScope]) -> None:
        sc = Scope(kind, str(addr), f"Listen \"{node.name.text if node.name else addr}\"")
        self.items(node.children, kind, sc, ctx)
        for other in into:
            if other.address == addr and addr.port != 0:  # port 0: each gets its own free port
                self.fail(node.pos, f"Listen address {addr} is already used at {other.pos}; expected each address once")
                return
        into.append(ListenScope(addr, node.pos, [sc, ctx["listener"], self.cfg.global_], kind))

    def s_esmtp_listen(self, node: Stanza, addr: HostPort, ctx: dict) -> None:
        self._listen(node, addr, ctx, S.ESMTP_LISTEN, self.cfg.esmtp_listens)

    def s_http_listen(self, node: Stanza, addr: HostPort, ctx: dict) -> None:
        self._listen(node, addr, ctx, S.HTTP_LISTEN, self.cfg.http_listens)

    def s_admin_listener(self, node: Stanza, name: None, ctx: dict) -> None:
        sc = Scope(S.ADMIN_LISTENER, None, "Admin_Listener")
        self.items(node.children, S.ADMIN_LISTENER, sc, {**ctx, "listener": sc})

    def s_admin_listen(self, node: Stanza, addr: HostPort, ctx: dict) -> None:
        self._listen(node, addr, ctx, S.ADMIN_LISTEN, self.cfg.admin_listens)

    def s_eventloop(self, node: Stanza, name: str, ctx: dict) -> None:
        """Momentum's `eventloop "NAME" { concurrency = N }` (multi-event-loops.md)."""
        sc = Scope(S.EVENTLOOP, name, f"eventloop {name}")
        before = len(self.errors)
        self.items(node.children, S.EVENTLOOP, sc, ctx)
        if name.lower() in self.cfg.event_loops:
            self.fail(node.pos, f"eventloop {name} is already defined at {self.cfg.event_loops[name.lower()][1]}; "
                                "expected each eventloop once")
            return
        conc = sc.get("concurrency")
        if conc is None:
            if len(self.errors) == before:
                self.fail(node.pos, f"eventloop {name} has no concurrency; expected concurrency = N "
                                    f"(1 to {limits.MAX_WORKERS})")
            return
        if conc[0] > limits.MAX_WORKERS:
            self.fail(conc[1], f"bad value for 'concurrency': got {conc[0]}; expected at most "
                               f"{limits.MAX_WORKERS} event loops (worker processes)")
            return
        self.cfg.event_loops[name.lower()] = (conc[0], node.pos)

    def workers(self, listener_pools: list[tuple[str, Pos]]) -> None:
        """Resolve Workers, delivery_pool and the listeners' event_loop into one worker count.

        Reception and delivery run in the same worker processes, so everything that names a pool
        must name the same one, and Workers (when also written) must agree with its concurrency."""
        cfg = self.cfg
        g = cfg.global_
        pools: list[tuple[str, Pos, str]] = []
        dp = g.get("delivery_pool")
        if dp is not None:
            pools.append((dp[0], dp[1], "delivery_pool"))
        pools += [(n, p, "event_loop") for n, p in listener_pools]
        chosen: tuple[str, Pos, str] | None = None
        for name, pos, what in pools:
            if name.lower() not in cfg.event_loops:
                known = ", ".join(sorted(cfg.event_loops)) or "none is defined"
                self.fail(pos, f"{what} names eventloop '{name}', which is not defined; expected the name of an "
                               f"eventloop stanza ({known})")
                return
            if chosen is None:
                chosen = (name, pos, what)
            elif name.lower() != chosen[0].lower():
                self.fail(pos, f"{what} names eventloop '{name}' but {chosen[2]} at {chosen[1]} names "
                               f"'{chosen[0]}'; expected one pool: reception and delivery share the workers")
                return
        w = g.get("workers")
        n = None
        if w is not None:
            n = (os.cpu_count() or 1) if w[0] == "auto" else w[0]
        if chosen is not None:
            conc = cfg.event_loops[chosen[0].lower()][0]
            if n is not None and n != conc:
                self.fail(w[1], f"Workers = {n} but eventloop '{chosen[0]}' (named by {chosen[2]} at "
                                f"{chosen[1]}) has concurrency = {conc}; expected one of them, or both equal")
                return
            n = conc
        cfg.worker_count = min(max(1, n or 1), limits.MAX_WORKERS)
    def s_security(self, node: Stanza, name: None, ctx: dict) -> None:
        self.items(node.children, S.SECURITY, self.cfg.security, ctx)

    def s_scriptlet(self, node: Stanza, name: str, ctx: dict) -> None:
        sc = Scope(S.SCRIPTLET, name, f"scriptlet {name}")
        self.items(node.children, S.SCRIPTLET, sc, ctx)

    def s_script(self, node: Stanza, name: str, ctx: dict) -> None:
        sc = Scope(S.SCRIPT, name, f"script {name}")
        before = len(self.errors)
        self.items(node.children, S.SCRIPT, sc, ctx)
        src = sc.get("source")
        if src is None:
            if len(self.errors) == before:
                self.fail(node.pos, f"script {name} has no source; "
                                    'expected source = "msys.xfer.server" or "msys.xfer.client"')
            return
        self.cfg.scripts[src[0]] = (name, src[1])


def build(nodes: list, files: list[str] | None = None, *, lenient: bool = False) -> Config:
    """Model a parsed tree. With `lenient`, Momentum options and stanzas fastrelay does not
    support become warnings (cfg.warnings) instead of errors; nothing else does."""
    b = _Builder()
    b.build(nodes)
    errors = b.errors
    if lenient:
        b.cfg.warnings.extend(e for e in errors if isinstance(e, UnsupportedMomentumName))
        errors = [e for e in errors if not isinstance(e, UnsupportedMomentumName)]
    if errors:
        raise ConfigErrors(errors)
    before = len(b.errors)  # under --lenient, Momentum names already reported as warnings
    b.workers(b.listener_pools)
    if len(b.errors) > before:
        raise ConfigErrors(b.errors[before:])
    b.cfg.files = files or []
    return b.cfg


def load(path: str, *, lenient: bool = False) -> Config:
    """Read, check and model a conf file (and its includes). Raises ConfigErrors with every error.
    A file named *.toml is Stalwart's TOML (fastrelay.config.stalwart), into the same model."""
    if path.lower().endswith(".toml"):
        from fastrelay.config.stalwart import load_toml

        return load_toml(path, lenient=lenient)
    try:
        nodes = parse_file(path)
    except ConfigError as e:
        raise ConfigErrors([e]) from None
    return build(nodes, [path], lenient=lenient)


def loads(text: str | bytes, filename: str = "<string>", *, lenient: bool = False) -> Config:
    """Model conf text; includes are read relative to `filename`'s directory."""
    data = text.encode() if isinstance(text, str) else text
    try:
        nodes = parse_text(data, filename)
    except ConfigError as e:
        raise ConfigErrors([e]) from None
    return build(nodes, [filename], lenient=lenient)


_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _loopback_only(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return any(net.version == lo.version and net.subnet_of(lo) for lo in _LOOPBACK)  # type: ignore[arg-type]


def _outbound_scopes(cfg: Config) -> list[Scope]:
    out = [cfg.global_, *cfg.domains.values(), *cfg.binding_groups.values()]
    for b in cfg.bindings.values():
        out.append(b.scope)
        out.extend(b.domains.values())
    return out


def check_runnable(cfg: Config) -> tuple[list[ConfigError], list[ConfigError]]:
    """What a whole configuration must hold to be run: (errors, warnings).

    `check-config` and `run` both make exactly these checks (after load), so run never refuses a
    file check-config passes. A conf fragment (a seed snippet, a unit test's loads()) need not pass
    them: they are about the whole relay, not the language.
    """
    errors: list[ConfigError] = []
    warnings: list[ConfigError] = []
    top = Pos(cfg.files[0] if cfg.files else "<string>", 1, 1)
    xfer_server = cfg.scripts.get("msys.xfer.server")
    if xfer_server is not None and not cfg.http_listens:
        errors.append(xfer_server[1].error(
            "msys.xfer.server is loaded but there is no HTTP_Listener to serve it on; "
            'expected HTTP_Listener { Listen ":8080" { } }'))
    if not cfg.esmtp_listens and not (xfer_server is not None and cfg.http_listens):
        hint = " (an HTTP_Listener serves only the msys.xfer.server script, which is not loaded)" \
            if cfg.http_listens else ""
        errors.append(top.error(
            f"no listener: nothing would receive mail{hint}; expected an ESMTP_Listener with a Listen, "
            "or an HTTP_Listener with the msys.xfer.server script"))
    if "msys.xfer.client" not in cfg.scripts:
        # Momentum: the delay_xfer delivery method exists only once the XFER client is loaded.
        hits = [sc.get("delivery_method") for sc in _outbound_scopes(cfg)]
        for hit in sorted((h for h in hits if h is not None and h[0] == "delay_xfer"),
                          key=lambda h: (h[1].file, h[1].line, h[1].col)):
            errors.append(hit[1].error(
                    "Delivery_Method = delay_xfer needs the XFER client, which is not loaded; expected "
                    'scriptlet "scriptlet" { script xfer_client { source = "msys.xfer.client" } }'))
    for sc in _outbound_scopes(cfg):
        cert, key = sc.get("tls_certificate"), sc.get("tls_key")
        if (cert is None) != (key is None):
            # A client certificate without its key (or a key alone) cannot be presented.
            have, want = ("TLS_Certificate", "TLS_Key") if cert is not None else ("TLS_Key", "TLS_Certificate")
            errors.append((cert or key)[1].error(f"{have} is set in {sc.description} without {want}; "
                                                 "expected both, for the client certificate presented outbound"))
    for listen in cfg.esmtp_listens:
        idle = listen.lookup("Idle_Time")
        if 0 < idle.value < limits.RFC5321_SERVER_TIMEOUT:
            # RFC 5321 §4.5.3.2.7: "at least 5 minutes". Allowed (a test relay, a trusted
            # network), but never silently: a Momentum conf's outbound idle_timeout = 5 used to land here.
            warnings.append((idle.pos or listen.pos).error(
                f"Idle_Time = {S.BY_KEY['idle_time'].format(idle.value)} on {listen.address} disconnects "
                "silent clients sooner than RFC 5321 §4.5.3.2.7's 5 minutes; expected at least 5m "
                "(the outbound idle connection time is idle_timeout)"))
    if xfer_server is not None:
        for listen in cfg.http_listens:
            if listen.get("xfer_secret") or listen.get("xfer_tokens"):
                continue
            allowed = listen.lookup("xfer_allowed_clients")
            open_to = [str(n) for n in allowed.value if not _loopback_only(n)]
            if open_to:
                # Network authentication only, as relay_hosts is for SMTP: say what that means.
                warnings.append((allowed.pos or listen.pos).error(
                    f"the XFER server on {listen.address} takes unauthenticated transfers from "
                    f"{', '.join(open_to)} (xfer_allowed_clients, no xfer_secret or xfer_tokens): any host "
                    "there can relay mail through this node; expected xfer_secret set, or a loopback-only "
                    "xfer_allowed_clients"))
    return errors, warnings


__all__ = ["Atom", "Config", "Setting", "check_runnable", "load", "loads"]
