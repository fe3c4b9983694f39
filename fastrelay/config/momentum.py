"""Momentum's own option and stanza names (momentum_names.txt), to tell "not supported" from a typo."""

from __future__ import annotations

import functools
import os

_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "momentum_names.txt")


@functools.cache
def names() -> dict[str, tuple[str, str]]:
    """lower-case name -> (kind, spelling as Momentum's reference writes it); kind is "option",
    "stanza" or "module" (a module is configured with a stanza of its name)."""
    out: dict[str, tuple[str, str]] = {}
    with open(_FILE, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            kind, _, name = line.partition(" ")
            out.setdefault(name.lower(), (kind, name))
    return out


def lookup(name: str) -> tuple[str, str] | None:
    """(kind, spelling) if `name` (any case) is a Momentum option, stanza or module name."""
    return names().get(name.lower())
