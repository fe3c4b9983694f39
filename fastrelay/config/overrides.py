"""Command-line overrides of a loaded conf for quick trials: `run --listen`, `--spool`, `--route`."""

from __future__ import annotations

import os

from fastrelay.config import schema as S
from fastrelay.config.errors import ConfigError
from fastrelay.config.model import Config, ListenScope, Scope
from fastrelay.config.parser import Atom, ListValue, Pos
from fastrelay.config.types import Invalid


def _pos(flag: str) -> Pos:
    # Shown by `config eval` and errors as where the value was set: "--listen:0".
    return Pos(flag, 0, 0)


def _convert(option: str, value, flag: str, text: str):
    try:
        return S.BY_KEY[option.lower()].type.convert(value)
    except Invalid as e:
        raise ConfigError(flag, 0, 0, f"{text}: {e.message}") from None


def apply(cfg: Config, listen: list[str] | None = None, spool: str | None = None,
          routes: list[str] | None = None) -> None:
    """Change `cfg` in place. `listen` replaces every ESMTP Listen of the conf (the first
    ESMTP_Listener's own options still apply to them); `spool` sets Spool_Base; each `routes`
    entry "DOMAIN=ROUTE[,ROUTE...]" sets that domain's Routes. ConfigError for a bad value."""
    if listen:
        parent = cfg.esmtp_listens[0].chain[1] if cfg.esmtp_listens else Scope(S.ESMTP_LISTENER, None,
                                                                                  "ESMTP_Listener")
        new: list[ListenScope] = []
        for text in listen:
            pos = _pos("--listen")
            try:
                addr = S.STANZA_BY_KEY["listen"].name_type.convert(Atom(text, True, pos))  # type: ignore[union-attr]
            except Invalid as e:
                raise ConfigError("--listen", 0, 0, f"{text}: {e.message}") from None
            sc = Scope(S.ESMTP_LISTEN, str(addr), f'Listen "{text}" (--listen)')
            new.append(ListenScope(addr, pos, [sc, parent, cfg.global_], S.ESMTP_LISTEN))
        cfg.esmtp_listens[:] = new
    if spool:
        cfg.global_.values["spool_base"] = (os.path.abspath(spool), _pos("--spool"))
    for entry in routes or []:
        domain, sep, rest = entry.partition("=")
        domain = domain.strip().lower().rstrip(".")
        if not sep or not domain or not rest.strip():
            raise ConfigError("--route", 0, 0, f"{entry}: expected DOMAIN=ROUTE, e.g. "
                                               "example.com=smtp://127.0.0.1?port=2526")
        pos = _pos("--route")
        items = [Atom(r.strip(), True, pos) for r in rest.split(",") if r.strip()]
        value = _convert("Routes", ListValue(items, pos), "--route", entry)
        sc = cfg.domains.setdefault(domain, Scope(S.DOMAIN, domain, f"Domain {domain}"))
        sc.values["routes"] = (value, pos)
    cfg._cache.clear()
