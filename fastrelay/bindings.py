"""Assign received mail to a binding (Momentum's MultiVIP, 25.3): by listener option, by a trusted header, by group.

Momentum assigns bindings by policy scripts; fastrelay assigns them by conf:

- `Binding` or `Binding_Group` in the ESMTP_Listener or Listen scope assigns all mail received there
  (Binding wins when both are set);
- the header named by `Binding_Header` (for example "X-Binding") names a binding or a binding group;
  it is honoured only from clients in relay_hosts, and removed from every message before it is
  queued, so that it never reaches a next hop (nor can an outside client pick a source IP);
- a message assigned to a group gets one of the group's bindings that is not suspended
  (suspend_delivery), spread evenly (round robin);
- an unknown name falls back to `default` and is logged once.
"""

from __future__ import annotations

import logging
import re

from fastrelay import limits

log = logging.getLogger("fastrelay.bindings")

DEFAULT = "default"

# The empty line that ends the header section (RFC 5322 §2.1); group 1 is that line.
_HEADER_END = re.compile(rb"\n(\r?\n)")


def split_header(body: bytes, name: str) -> tuple[bytes | None, bytes]:
    """The first value of header field `name` in `body` (unfolded, stripped; None if absent) and
    `body` with every occurrence of that field removed, continuation lines included (RFC 5322
    §2.2.3). Only the header section is looked at; the rest is kept byte for byte."""
    if body[:1] == b"\n" or body[:2] == b"\r\n":
        return None, body  # no header section at all: nothing in the body is a header
    m = _HEADER_END.search(body)
    head_end = m.start(1) if m else len(body)
    head = body[:head_end]
    field = name.lower().encode("ascii") + b":"
    if field not in head.lower():  # the common case: nothing to do, nothing copied
        return None, body
    kept: list[bytes] = []
    value: bytes | None = None
    dropping = first = False
    for ln in head.splitlines(keepends=True):
        if dropping and ln[:1] in (b" ", b"\t"):
            if first:
                value += b" " + ln.strip()
            continue
        dropping = ln.lower().startswith(field)
        if dropping:
            first = value is None
            if first:
                value = ln[len(field):].strip()
            continue
        kept.append(ln)
    return value, b"".join(kept) + body[head_end:]


class Assigner:
    """One per relay: the listeners share its round-robin positions and its "logged once" set."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._next: dict[str, int] = {}  # group -> position of the next binding to hand out
        self._warned: set[str] = set()
        # Sender_Domains: envelope sender domain -> binding (the first binding listing it).
        self.by_sender: dict[str, str] = {}
        for name, b in cfg.bindings.items():
            hit = b.scope.get("sender_domains")
            for dom in sorted(hit[0]) if hit is not None else ():
                self.by_sender.setdefault(dom, name)

    def resolve(self, name: str | None) -> str:
        """The binding a binding or group name stands for; `default` for None or an unknown name."""
        if not name or name == DEFAULT:
            return DEFAULT
        cfg = self.cfg
        if name in cfg.bindings:
            return name
        if name in cfg.binding_groups:
            return self.pick(name)
        if name not in self._warned:
            self._warned.add(name)
            log.warning("unknown binding or binding group %r: its mail goes out on the default binding", name)
        return DEFAULT

    def pick(self, group: str) -> str:
        """One of `group`'s bindings, round robin over those not suspended; if every one is
        suspended the mail still gets one (it waits in the spool like any suspended mail)."""
        members = self.cfg.group_members(group)
        if not members:
            if group not in self._warned:
                self._warned.add(group)
                log.warning("binding group %r has no bindings: its mail goes out on the default binding", group)
            return DEFAULT
        start = self._next.get(group, 0)
        n = len(members)
        for k in range(n):
            b = members[(start + k) % n]
            if not self.cfg.get("suspend_delivery", None, b):
                self._next[group] = (start + k + 1) % n
                return b
        self._next[group] = (start + 1) % n
        return members[start % n]

    def for_listener(self, listen) -> ListenerBinding:
        return ListenerBinding(self, listen.get("Binding"), listen.get("Binding_Group"), listen.get("Binding_Header"))


class ListenerBinding:
    """What one Listen address assigns: its Binding/Binding_Group, and its Binding_Header."""

    __slots__ = ("assigner", "binding", "group", "header")

    def __init__(self, assigner: Assigner, binding: str | None, group: str | None, header: str | None):
        self.assigner = assigner
        self.binding = binding
        self.group = group
        self.header = header

    def assign(self, body: bytes, trusted: bool, sender: str = "") -> tuple[str, bytes]:
        """The binding of a message received here with `body` from a client (`trusted`: in
        relay_hosts) for envelope sender `sender`, and the body to queue (without the
        Binding_Header field). Sender_Domains comes after the listener's own assignment."""
        a = self.assigner
        if self.header:
            value, body = split_header(body, self.header)
            if value is not None and trusted:
                name = value.decode("ascii", "replace")
                if 0 < len(name) <= limits.MAX_BINDING_NAME and name.isprintable():
                    return a.resolve(name), body
        if self.binding:
            return a.resolve(self.binding), body
        if self.group:
            return a.resolve(self.group), body
        if a.by_sender and "@" in sender:
            hit = a.by_sender.get(sender.rpartition("@")[2].lower().rstrip("."))
            if hit is not None:
                return hit, body
        return DEFAULT, body
