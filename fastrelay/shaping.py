"""Traffic shaping state (Momentum 25.4): connection slots and rate throttles behind one small interface.

The scheduler (fastrelay.queue) asks a `Shaper` three things and keeps no shaping state itself:

- `acquire(key, limit)` / `release(key)`: a slot of a limit on things open at once
  (Server_Max_Outbound_Connections);
- `take(key, rate, now)`: one token of a throttle, or the seconds until one is due (nothing is
  taken then);
- `wait(key, rate, now)`: the seconds until the next token, without taking it.

Keys are strings chosen by the caller. A throttle's key is the scope that sets it (Setting.scope,
"Binding_Group g", "Domain /^(aol|yahoo)\\.com$/", "global"), which is what makes throttles "by
reference" as Momentum's outbound_throttle_messages page explains: every binding and domain that
falls back to one scope's throttle shares that one throttle, and a throttle set again in a
narrower scope is a separate one.

`LocalShaper` keeps the state in this process (a dict of GCRA theoretical arrival times, a dict
of counts). Another backend (shared memory for worker processes, Redis for a cluster:
fastrelay.cluster uses the same GCRA) plugs in by implementing the same four methods; the
scheduler does not change.

GCRA (the generic cell rate algorithm, ITU-T I.371) with no burst tolerance: a rate of N per S
seconds has an emission interval T = S/N; each event moves the throttle's theoretical arrival
time (TAT) to max(TAT, now) + T, and an event is allowed once now >= TAT. So no window of S
seconds ever holds more than N events, which is what Momentum's page promises ("no more than the
specified number of messages are sent in a given second"); a GCRA with a burst of N would let
up to 2N - 1 through in some window of S. O(1) state per throttle: one float.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from fastrelay import limits
from fastrelay.config.types import Rate

# How soon a connection refused by Server_Max_Outbound_Connections asks again (a release also
# wakes it: the scheduler kicks destinations when a connection closes).
SLOT_RECHECK = 0.5


class Shaper(Protocol):
    def acquire(self, key: str, limit: int) -> bool:
        """Take one of `limit` slots of `key`; False (nothing taken) if all are held."""
        ...

    def release(self, key: str) -> None:
        """Give back a slot taken with acquire (ValueError if none is held)."""
        ...

    def take(self, key: str, rate: Rate, now: float) -> float:
        """One token of throttle `key`: 0.0 if taken, else the seconds until one is due."""
        ...

    def wait(self, key: str, rate: Rate, now: float) -> float:
        """The seconds until throttle `key` has a token (0.0: now), taking nothing."""
        ...


class LocalShaper:
    """The in-process backend: GCRA throttles and slot counts in two dicts."""

    __slots__ = ("_held", "_tat")

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def acquire(self, key: str, limit: int) -> bool:
        n = self._held.get(key, 0)
        if n >= limit:
            return False
        self._held[key] = n + 1
        return True

    def release(self, key: str) -> None:
        n = self._held.get(key, 0)
        if n <= 0:
            raise ValueError(f"release of {key!r} without an acquire")
        if n == 1:
            del self._held[key]
        else:
            self._held[key] = n - 1

    def held(self, key: str | None = None) -> int:
        """Slots held under `key` (all keys together for None): for tests and the stats."""
        return sum(self._held.values()) if key is None else self._held.get(key, 0)

    def take(self, key: str, rate: Rate, now: float) -> float:
        tat = self._tat.get(key, now)
        if tat - now > 1e-9:
            return tat - now
        self._tat[key] = (tat if tat > now else now) + rate.period / rate.count
        return 0.0

    def wait(self, key: str, rate: Rate, now: float) -> float:
        tat = self._tat.get(key, now)
        return tat - now if tat - now > 1e-9 else 0.0


class Admission(NamedTuple):
    """The answer to "may a connection open now?": yes with the slots it holds, or not yet."""

    retry_in: float  # 0.0: go ahead; else seconds to wait (nothing is held then)
    slots: tuple[str, ...] = ()
    reason: str = ""  # "", "limit", "throttle" or "host throttle"


def has_host_throttles(cfg) -> bool:
    """Whether any Host stanza (plain or in a Binding) sets outbound_throttle_connections: only
    then does the scheduler look for throttled MXs before it picks one."""
    return any(sc.get("outbound_throttle_connections") is not None for sc in cfg.host_scopes())


class OutboundShaping:
    """Momentum's shaping options turned into keys of a `Shaper`: outbound_throttle_messages and
    outbound_throttle_connections (binding::domain, binding, binding_group, domain, global; and
    Host, on top), Server_Max_Outbound_Connections (global, and per binding or group)."""

    def __init__(self, cfg, backend: Shaper | None = None, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.backend: Shaper = backend if backend is not None else LocalShaper()
        self.clock = clock
        # No message throttle anywhere in the conf (the usual case): before_message is a no-op.
        # A reload builds a new OutboundShaping, so this follows the conf in force.
        self.message_throttles = cfg.set_anywhere("outbound_throttle_messages")

    # --- keys (by reference: the scope that sets the option) ------------------------------------
    def throttle(self, option: str, domain: str, binding: str) -> tuple[str, Rate] | None:
        s = self.cfg.lookup(option, domain, binding)
        if s.value is None:
            return None
        return f"{option.lower()}@{s.scope}", s.value

    def host_throttle(self, option: str, host: str, binding: str | None = None) -> tuple[str, Rate] | None:
        """The Host stanza's throttle, binding::host first (a regex Host stanza is one throttle
        for all it matches)."""
        s = self.cfg.host_lookup(option, host, binding)
        if s is None or s.value is None:
            return None
        return f"{option.lower()}@{s.scope}", s.value

    def server_limits(self, binding: str) -> list[tuple[str, int]]:
        """Server_Max_Outbound_Connections: the global cap always, and the binding's (or its
        group's) own where one is set."""
        g = self.cfg.lookup("Server_Max_Outbound_Connections")
        out = [(f"server@{g.scope}", g.value)]
        b = self.cfg.lookup("Server_Max_Outbound_Connections", None, binding)
        if b.scope != g.scope:
            out.append((f"server@{b.scope}", b.value))
        return out

    # --- what the scheduler asks ------------------------------------------------------------------
    def host_wait(self, hosts: list[str], binding: str | None = None) -> float:
        """The seconds until the Host-scope connection throttle of one of `hosts` (name or IP)
        lets a connection through for `binding`; 0.0 if none is throttled."""
        now = self.clock()
        waits = []
        for h in hosts:
            th = self.host_throttle("outbound_throttle_connections", h, binding)
            if th is not None:
                waits.append(self.backend.wait(th[0], th[1], now))
        return max(waits, default=0.0)

    def open_connection(self, domain: str, binding: str, hosts: list[str]) -> Admission:
        """A connection to a host known as `hosts` (its name, its IP) for (domain, binding): the
        server-wide slots and one token of every connection throttle that applies, all or
        nothing."""
        now = self.clock()
        b = self.backend
        throttles = [t for t in (self.throttle("outbound_throttle_connections", domain, binding),
                                 *(self.host_throttle("outbound_throttle_connections", h, binding) for h in hosts))
                     if t is not None]
        # Ask first, then take: a token is never spent on a connection that does not open.
        for key, rate in throttles:
            w = b.wait(key, rate, now)
            if w > 0:
                return Admission(min(w, limits.MAX_THROTTLE_WAIT), (),
                                 "host throttle" if "@Host " in key else "throttle")
        held: list[str] = []
        for key, limit in self.server_limits(binding):
            if not b.acquire(key, limit):
                for k in held:
                    b.release(k)
                return Admission(SLOT_RECHECK, (), "limit")
            held.append(key)
        for key, rate in throttles:
            b.take(key, rate, now)
        return Admission(0.0, tuple(held))

    def close_connection(self, slots: tuple[str, ...]) -> None:
        for k in slots:
            self.backend.release(k)

    def has_message_throttle(self, domain: str, binding: str) -> bool:
        """Whether an outbound_throttle_messages applies to (domain, binding)."""
        return self.throttle("outbound_throttle_messages", domain, binding) is not None

    def message_wait(self, domain: str, binding: str) -> float:
        """The seconds until the message throttle of (domain, binding) lets one through, taking
        nothing: a connection opened before then would only wait."""
        th = self.throttle("outbound_throttle_messages", domain, binding)
        if th is None:
            return 0.0
        return min(self.backend.wait(th[0], th[1], self.clock()), limits.MAX_THROTTLE_WAIT)

    def before_message(self, domain: str, binding: str, hosts: list[str]) -> float:
        """One token of the message throttles of (domain, binding) and of the host: 0.0 if
        taken, else the seconds until they let a message through (nothing taken then)."""
        if not self.message_throttles:
            return 0.0
        now = self.clock()
        b = self.backend
        throttles = [t for t in (self.throttle("outbound_throttle_messages", domain, binding),
                                 *(self.host_throttle("outbound_throttle_messages", h, binding) for h in hosts))
                     if t is not None]
        if not throttles:
            return 0.0
        waits = [b.wait(key, rate, now) for key, rate in throttles]
        if max(waits) > 0:
            return min(max(waits), limits.MAX_THROTTLE_WAIT)
        for key, rate in throttles:
            b.take(key, rate, now)
        return 0.0

    def where(self, option: str, domain: str | None, binding: str | None) -> str:
        """Which scope's throttle applies (for `fastrelay config eval`)."""
        s = self.cfg.lookup(option, domain, binding)
        return "no throttle" if s.value is None else f"the shared throttle of {s.scope}"
