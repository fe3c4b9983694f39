"""The typed settings model: scoped option values with Momentum's fallback, and where each was set."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fastrelay.config import schema as S
from fastrelay.config.errors import ConfigError, ConfigErrors
from fastrelay.config.parser import Atom, Option, Pos, Stanza, parse_file, parse_text
from fastrelay.config.types import DISABLED, HostPort, Invalid


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
        self.bindings: dict[str, BindingScope] = {}
        self.hosts: dict[str, Scope] = {}
        self.regex_domains: list[tuple[re.Pattern, Scope]] = []  # file order
        self.regex_hosts: list[tuple[re.Pattern, Scope]] = []
        self.esmtp_listens: list[ListenScope] = []
        self.http_listens: list[ListenScope] = []
        self.scripts: dict[str, tuple[str, Pos]] = {}  # source -> (script name, pos)
        self._cache: dict[tuple[str, str | None, str | None], Setting] = {}

    # -- queries ----------------------------------------------------------------------------
    def lookup(self, option: str, domain: str | None = None, binding: str | None = None) -> Setting:
        """The effective value of `option` for mail to `domain` sent on `binding`, and its origin.

        Fallback (Momentum): binding::domain, binding, binding_group, domain, global, default.
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

    def _chain(self, domain: str | None, binding: str | None) -> list[Scope]:
        chain: list[Scope] = []
        b = self.bindings.get(binding) if binding else None
        if b is not None:
            if domain:
                bd = match_scope(domain, b.domains, b.regex_domains)
                if bd is not None:
                    chain.append(bd)
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

    @property
    def xfer_server_enabled(self) -> bool:
        return "msys.xfer.server" in self.scripts

    @property
    def xfer_client_enabled(self) -> bool:
        return "msys.xfer.client" in self.scripts

    @property
    def spool_dir(self) -> str:
        s = self.lookup("Spool_Base")
        path = s.value
        if not os.path.isabs(path) and s.pos is not None:
            path = os.path.join(os.path.dirname(os.path.abspath(s.pos.file)), path)
        return os.path.normpath(path)


class _Builder:
    """Walk the parsed tree into a Config, collecting every semantic error."""

    def __init__(self) -> None:
        self.cfg = Config()
        self.errors: list[ConfigError] = []

    def fail(self, pos: Pos, message: str) -> None:
        self.errors.append(pos.error(message))

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
        if opt is None:
            msg = f"unknown option '{node.name}'"
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
        if (S.HOST if scope_kind == S.BINDING_HOST else scope_kind) not in opt.scopes:
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
            self.fail(pos, f"bad value for '{opt.name}': {e.message}")
            return
        scope.values[opt.key] = (value, node.pos)

    def stanza(self, node: Stanza, parent_kind: str, ctx: dict) -> None:
        sdef = S.STANZA_BY_KEY.get(node.key)
        if sdef is None:
            msg = f"unknown stanza '{node.type}'"
            close = difflib.get_close_matches(node.key, list(S.STANZA_BY_KEY), n=1, cutoff=0.7)
            if node.key in S.BY_KEY:
                msg += f"; '{S.BY_KEY[node.key].name}' is an option: write {S.BY_KEY[node.key].name} = value"
            elif close:
                msg += f"; did you mean '{S.STANZA_BY_KEY[close[0]].name}'?"
            else:
                msg += "; expected one of " + ", ".join(s.name for s in S.STANZAS)
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

    def s_host(self, node: Stanza, name: str, ctx: dict) -> None:
        sc = self._named(self.cfg.hosts, self.cfg.regex_hosts, S.HOST, name, f"Host {name}")
        self.items(node.children, S.HOST, sc, ctx)

    def s_binding_host(self, node: Stanza, name: str, ctx: dict) -> None:
        b: BindingScope = ctx["binding"]
        sc = self._named(b.hosts, b.regex_hosts, S.BINDING_HOST, name, f"{b.scope.description}::Host {name}")
        self.items(node.children, S.BINDING_HOST, sc, ctx)

    def s_esmtp_listener(self, node: Stanza, name: None, ctx: dict) -> None:
        sc = Scope(S.ESMTP_LISTENER, None, "ESMTP_Listener")
        self.items(node.children, S.ESMTP_LISTENER, sc, {**ctx, "listener": sc})

    def s_http_listener(self, node: Stanza, name: None, ctx: dict) -> None:
        sc = Scope(S.HTTP_LISTENER, None, "HTTP_Listener")
        self.items(node.children, S.HTTP_LISTENER, sc, {**ctx, "listener": sc})

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


def build(nodes: list, files: list[str] | None = None) -> Config:
    b = _Builder()
    b.build(nodes)
    if b.errors:
        raise ConfigErrors(b.errors)
    b.cfg.files = files or []
    return b.cfg


def load(path: str) -> Config:
    """Read, check and model a conf file (and its includes). Raises ConfigErrors with every error."""
    try:
        nodes = parse_file(path)
    except ConfigError as e:
        raise ConfigErrors([e]) from None
    return build(nodes, [path])


def loads(text: str | bytes, filename: str = "<string>") -> Config:
    """Model conf text; includes are read relative to `filename`'s directory."""
    data = text.encode() if isinstance(text, str) else text
    try:
        nodes = parse_text(data, filename)
    except ConfigError as e:
        raise ConfigErrors([e]) from None
    return build(nodes, [filename])


__all__ = ["Atom", "Config", "Setting", "load", "loads"]
