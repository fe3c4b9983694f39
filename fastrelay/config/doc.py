"""Write docs/config.md, the option reference, from the schema (a test keeps the file in sync)."""

from __future__ import annotations

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
| `Domain NAME { }` | global, Binding | options for mail to NAME |
| `Binding_Group NAME { }` | global | options and Binding stanzas |
| `Binding NAME { }` | global, Binding_Group | options, and Domain stanzas (binding::domain) |
| `Host ADDR { }` | global | per-host options (IP, [IPv6] or hostname) |
| `ESMTP_Listener { Listen "ADDR:PORT" { } }` | global | listener options, and Listen stanzas with their own |
| `HTTP_Listener { Listen ":PORT" { } }` | global | the XFER server's listeners |
| `scriptlet "NAME" { script NAME { source = "msys.xfer.server" } }` | global | XFER server / client modules |

## Options
"""


def render() -> str:
    out = [HEADER]
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
