"""Write docs/config.md, the option reference, from the schema (a test keeps the file in sync)."""

from __future__ import annotations

import re
import sys

from fastrelay.config import schema as S

HEADER = """# fastrelay configuration reference

Generated from `fastrelay/config/schema.py` by `python -m fastrelay.config.doc > docs/config.md`;
a test fails when this file is out of date.

The language is Momentum's ecelerity.conf: `option = value`; stanzas `Type [NAME] { ... }` (a
stanza without a name may also be written `Type = { ... }`, as Momentum's own examples do); lists
`( a "b" c )` with space-separated values; hashes `[ key = value ... ]` (keys are words, numbers or
strings, each once; values are values, lists or hashes; used by Momentum's module and listener
parameters such as `AuthLoginParameters = [ uri = "ac_auth://" ]`); double-quoted strings with the
escapes `\\\\ \\" \\n \\t \\r`, which may continue on the next lines (the line breaks are part of the
string, as in Momentum's multi-line SQL queries; the `»` that Momentum's printed documentation puts
at the end of a wrapped line is not conf syntax: join such lines when copying); `#` comments to the
end of the line and non-nesting `/* ... */` comments; `include "PATH"` (a regular file of at most
16 MiB, or a directory whose regular files are read in alphabetical order without its dot-files;
relative to the including file). Stanzas, lists and hashes nest at most 32 deep, includes counted.
Option and stanza names are case-insensitive.

An option or stanza of Momentum's reference that fastrelay does not implement (the list is
`fastrelay/config/momentum_names.txt`) is refused as "X is a Momentum option that fastrelay does not
support"; `check-config --lenient` and `run --lenient` warn about those instead, and only those,
for operators migrating a Momentum configuration. `check-config` also makes the checks `run` makes
before it starts (a listener to serve, a `Listen` in each listener, the XFER client loaded for
`Delivery_Method = delay_xfer`, an HTTP_Listener for the XFER server), so the two always agree.

Times: a plain number is seconds (milliseconds where noted, as Momentum does), or a number with a
unit: `500ms`, `10s`, `3m`, `2h`, `7d`. Sizes: bytes, or `64k`, `10m`, `1g`. Booleans: `1 0 true
false yes no on off`. IPv6 literals go in brackets: `[2001:db8::1]`, `"[::1]:2525"`.

Outbound options fall back as Momentum's do: the Domain stanza inside the message's Binding, the
Binding, its Binding_Group, the Domain, the global scope, the default.
`fastrelay config eval [-c FILE] [--domain D] [--binding B] OPTION` prints the effective value and
the file:line that set it; `fastrelay check-config FILE` checks a file.

## Stanzas

| stanza | valid in | holds |
| --- | --- | --- |
| `Domain NAME { }` | global, Binding, Binding_Group | options for mail to NAME (inside: that mail only) |
| `Binding_Group NAME { }` | global | options, Binding stanzas and Domain stanzas (binding_group::domain) |
| `Binding NAME { }` | global, Binding_Group | options, Domain (binding::domain) and Host (binding::host) stanzas |
| `Host ADDR { }` | global, Binding | per-host options (IP, [IPv6] or hostname) |

An option for mail to a domain on a binding is looked up, most specific first (Momentum's
"Configuration Scopes and Fallback"): the Domain inside the Binding, the Domain inside the
binding's Binding_Group, the Binding, the Binding_Group, the global Domain, the global value.
`fastrelay config eval --binding B --domain D OPTION` says which one answered.
| `ESMTP_Listener { Listen "ADDR:PORT" { } }` | global | listener options, and Listen stanzas with their own |
| `HTTP_Listener { Listen ":PORT" { } }` | global | the XFER server's listeners |
| `Admin_Listener { Listen "127.0.0.1:8025" { } }` | global | the admin API, /metrics and the status page |
| `scriptlet "NAME" { script NAME { source = "msys.xfer.server" } }` | global | XFER server / client modules |
| `eventloop "NAME" { concurrency = N }` | global | a pool of N worker processes (named by delivery_pool, event_loop) |

## Options
"""


STALWART_INTRO = """
## Stalwart SMTP keys (seed 003)

A file named `*.toml` is read as Stalwart SMTP's TOML (`fastrelay run -c relay.toml`,
`check-config relay.toml`, `config eval -c relay.toml`), into the same settings model: `config eval`
names the TOML line that set a value. A key fastrelay does not know is `file:line:col: unknown key
'a.b.c'; did you mean 'a.b.d'?` (exit 2), as for ecelerity.conf. Any ecelerity.conf global option
goes in a `[fastrelay]` table under its own name (`Spool_Base`, `relay_hosts`, `Prohibited_Hosts`,
`DNS_Servers`, ...), and Domain, Host, Binding and Binding_Group stanzas in
`[fastrelay.domain."NAME"]`, `[fastrelay.host."NAME"]`, `[fastrelay.binding."NAME"]` and
`[fastrelay.binding_group."NAME"]`. conf/examples/seed003_*.toml hold the seed's examples as written,
each beside its ecelerity.conf equivalent (`.conf`).

Next-hop rules are compiled, first match wins as Stalwart evaluates them, into Domain stanzas
(one per domain a rule names) and, for a rule that matches every other domain (`ne`,
`not-in-list`, `else`), the global scope. That is how ecelerity.conf already says "mail for these
domains goes there, with these settings" (Routes plus per-domain options), so `config eval
--domain D Routes` shows what the rules decided for D. A remote's keys become options of the same
scopes, each scope writing all of them (at their defaults where the remote says nothing), so no
scope inherits another remote's settings. Rules test `rcpt-domain` or `sender-domain` with `eq`,
`ne`, `in-list = "list/NAME"` and `not-in-list`. Sender-domain rules become Bindings named
`next-hop-N` that take the mail of those sender domains (`Sender_Domains`), each holding the rules
as they stand for those senders (Routes in the Binding, binding::domain stanzas): the route of a
message is chosen by its recipient domain and its binding, and the binding by its sender.
`queue.outbound.source-ip.v4/.v6` is the default binding's
`Bind_Address` as a list: a Binding may hold one address (Momentum's bind_address) or several, and
each new connection binds one of those of the next hop's family at random; with none of that
family, the kernel chooses. Where the TOML says nothing, ecelerity.conf's defaults apply (no MX
limits, A and AAAA addresses mixed at one preference), not Stalwart's; except MTA-STS (RFC 8461),
which Stalwart always applies: a TOML file has `use_mta_sts = true` (see use_mta_sts below).

| Stalwart key | ecelerity.conf |
| --- | --- |
"""


def render_stalwart() -> str:
    from fastrelay.config.stalwart import MAPPING

    out = [STALWART_INTRO]
    for key, eq in MAPPING:
        out.append(f"| `{key}` | {eq} |\n")
    out.append("\n| ecelerity.conf | Stalwart key |\n| --- | --- |\n")
    back: dict[str, list[str]] = {}
    for key, eq in MAPPING:
        if key.startswith("[fastrelay"):
            continue  # any option: not one name
        for name in re.findall(r"[A-Za-z_]+", eq):
            opt = S.BY_KEY.get(name.lower())
            if opt is not None and opt.name == name and key not in back.get(name, []):
                back.setdefault(name, []).append(key)
    for name in sorted(back, key=str.lower):
        out.append(f"| `{name}` | " + "; ".join(f"`{k}`" for k in back[name]) + " |\n")
    return "".join(out)


def render() -> str:
    out = [HEADER, render_stalwart()]
    for opt in sorted(S.OPTIONS, key=lambda o: o.name.lower()):
        out.append(f"\n### {opt.name}\n")
        out.append(f"- type: {opt.type.expected}")
        out.append(f"- valid in: {S.valid_in(opt)}")
        out.append(f"- default: `{opt.format(opt.default)}`")
        if opt.aliases:
            out.append("- also accepted as: " + ", ".join(f"`{a}`" for a in opt.aliases))
        out.append("")
        out.append(opt.doc)
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(render())
