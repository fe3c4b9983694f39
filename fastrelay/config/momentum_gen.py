"""Regenerate momentum_names.txt from an unpacked copy of Momentum 4's public reference (docs pages)."""

from __future__ import annotations

import glob
import os
import re
import sys

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HEADER = """\
# Momentum 4 option, stanza and module names, from its public reference (content/momentum/4/).
# Regenerate: python -m fastrelay.config.momentum_gen DOCS_DIR > fastrelay/config/momentum_names.txt
# Derived, without any text copied beyond the names, from:
#   - the titles of config/*.md and config/mta-sts/*.md (one option per page, e.g. ref-ehlo-hostname.md
#     is "ehlo_hostname"; a title listing several names gives each), skipping titles that are not
#     names ("ecelerity.conf File", "Category File", ...);
#   - config-options-summary.md, the option table: its first column (a "(scope)" mark makes it a
#     stanza) and every scope named in its Scopes column (a stanza);
#   - the titles of modules/*.md ("ac_auth - Authentication Handler" is the module ac_auth, which a
#     stanza of that name configures; "spf Modules - spf_macros, spf_v1, and senderid" gives three).
# One name a line: KIND NAME, KIND being option, stanza or module; the first kind seen wins.
# Names that fastrelay implements are in this list too; the schema is asked first.
"""


def _title(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("title:"):
                return line.split(":", 1)[1].strip().strip('"')
    return ""


def derive(root: str) -> list[tuple[str, str]]:
    """(kind, name) pairs in a stable order, first kind seen kept."""
    seen: dict[str, tuple[str, str]] = {}

    def add(kind: str, name: str) -> None:
        if _IDENT.fullmatch(name) and name.lower() not in seen:
            seen[name.lower()] = (kind, name)

    summary = os.path.join(root, "config-options-summary.md")
    with open(summary, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.split("|")]
            if len(cells) < 7 or not cells[1] or cells[1].startswith(("Option", "---")):
                continue
            m = re.match(r"\[?\*{0,2}([A-Za-z_][A-Za-z0-9_]*)", cells[1])
            if m:
                add("stanza" if "*(scope)*" in cells[1] else "option", m.group(1))
            for scope in cells[5].split(","):
                if scope.strip() != "global":  # the top level, not a stanza
                    add("stanza", scope.strip())
    for path in sorted(glob.glob(os.path.join(root, "config", "*.md")) +
                       glob.glob(os.path.join(root, "config", "*", "*.md"))):
        for name in re.split(r",\s*", _title(path)):
            add("option", name)
    for path in sorted(glob.glob(os.path.join(root, "modules", "*.md"))):
        title = re.sub(r"\s*\([^)]*\)", "", _title(path))  # "senderid (SPF v2)": the name only
        parts = re.split(r"\s+[\u2013-]\s+", title, maxsplit=1)
        head, rest = parts[0], parts[1] if len(parts) > 1 else ""
        if head.lower().endswith(" modules"):  # "spf Modules - spf_macros, spf_v1, and senderid"
            for name in re.split(r",\s*|\s+", rest.replace(" and ", " ")):
                add("module", name)
            continue
        head = head.removesuffix(" Module")
        add("module", head.lower() if head.startswith("EC_") else head)
    return sorted(seen.values(), key=lambda kn: (kn[0], kn[1].lower()))


def render(root: str) -> str:
    return HEADER + "".join(f"{kind} {name}\n" for kind, name in derive(root))


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(render(sys.argv[1]))
