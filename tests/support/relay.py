"""Run a real fastrelay Relay in the test's event loop, on a conf written to a temp dir."""

from __future__ import annotations

import textwrap
from pathlib import Path

from fastrelay.config import load
from fastrelay.message import Envelope
from fastrelay.relay import Relay
from fastrelay.spool import Spool


class RelayHarness:
    """`conf` is added to a base conf with a spool in `dir`, a mainlog, and one ESMTP listener on
    127.0.0.1 with a kernel-chosen port (`.port`). On stop, every counter must be back to zero."""

    def __init__(self, dir: Path, conf: str = "", listen: str = "127.0.0.1:0"):
        self.dir = Path(dir)
        self.conf_path = self.dir / "relay.conf"
        text = (
            'Spool_Base = "spool"\n'
            'Mainlog = "mainlog"\n'
            'Hostname = "relay.test"\n'
            + textwrap.dedent(conf)
            + f'\nESMTP_Listener {{\n  Listen "{listen}" {{ }}\n}}\n'
        )
        self.conf_path.write_text(text)
        self.relay: Relay | None = None

    async def start(self) -> RelayHarness:
        self.relay = Relay(load(str(self.conf_path)))
        await self.relay.start()
        return self

    @property
    def smtp(self):
        return self.relay.smtp_servers[0]

    @property
    def port(self) -> int:
        return self.smtp.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.relay is None:
            return
        srv = self.relay.smtp_servers[:]
        await self.relay.stop()
        # Reserve and release in pairs: nothing may be left counted after teardown.
        for s in srv:
            assert not s.sessions, f"sessions left: {len(s.sessions)}"
            assert not s.per_ip, f"per-IP counts left: {s.per_ip}"
        if self.relay.queue is not None:
            assert self.relay.queue.router.total_active() == 0, "route-table slots left acquired"
            held = getattr(self.relay.queue.shaping.backend, "held", None)
            assert held is None or held() == 0, "Server_Max_Outbound_Connections slots left held"
        if self.relay.cluster is not None:
            assert self.relay.cluster.held() == 0, "cluster leases left held"
        self.relay = None

    async def __aenter__(self) -> RelayHarness:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def mainlog(self) -> list[list[str]]:
        if self.relay is not None and self.relay.mainlog is not None:
            self.relay.mainlog.flush()  # lines wait up to 100 ms in memory
        p = self.dir / "mainlog"
        if not p.exists():
            return []
        return [line.split("\t") for line in p.read_text().splitlines()]

    async def spooled(self) -> list[tuple[Envelope, bytes]]:
        """Everything in the spool, read through the spool's own API after the relay stopped."""
        assert self.relay is None, "stop the relay first: the spool allows one process at a time"
        sp = Spool(str(self.dir / "spool"))
        await sp.open()
        try:
            out = []
            for e in sp.recover():
                got = await sp.load(e.id)
                assert got is not None, f"entry {e.id} vanished or is corrupt"
                out.append(got)
            return out
        finally:
            await sp.close()


class TomlRelayHarness(RelayHarness):
    """A relay run from a Stalwart TOML file (fastrelay.config.stalwart): `toml` as written, then a
    [fastrelay] table with the spool, mainlog and `fastrelay` (ecelerity.conf global options as
    TOML lines), and a listener on 127.0.0.1 with a kernel-chosen port."""

    def __init__(self, dir: Path, toml: str, fastrelay: str = "", hostname: str | None = "relay.test"):
        self.dir = Path(dir)
        self.conf_path = self.dir / "relay.toml"
        text = (
            textwrap.dedent(toml)
            + '\n[fastrelay]\nSpool_Base = "spool"\nMainlog = "mainlog"\n'
            + (f'Hostname = "{hostname}"\n' if hostname else "")
            + textwrap.dedent(fastrelay)
            + '\n[server.listener."test"]\nbind = ["127.0.0.1:0"]\nprotocol = "smtp"\n'
        )
        self.conf_path.write_text(text)
        self.relay = None
