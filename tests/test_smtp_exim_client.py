"""Issue 16 with Exim itself as the client: every message arrives exactly once at the sink.

Exim (Debian's exim4-daemon-light, /usr/sbin/exim4) runs only as a client, on a config file the test
writes: its own spool and log directory, one manualroute router that sends everything to the relay
on 127.0.0.1, no DNS router, so it can never send anywhere but loopback. It submits with -odi
(deliver at once, in the foreground) and then runs its queue with -qff, as its queue runner would:
a message it had to defer is sent a second time.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from fastrelay import _impl
from tests.support import Sink
from tests.support.relay import RelayHarness

EXIM = shutil.which("exim4") or "/usr/sbin/exim4"



@pytest.fixture(autouse=True)
def _needs_exim() -> None:
    # Never skipped: .ci/peers installs Exim (the README's "Test it" section).
    assert os.path.exists(EXIM), "needs exim4-daemon-light: sudo bash .ci/peers (or apt-get install -y exim4-daemon-light)"

EXIM_CONF = """\
primary_hostname = exim-client.test
qualify_domain = exim-client.test
spool_directory = {dir}/spool
log_file_path = {dir}/log/%slog
exim_user = {user}
exim_group = {group}
trusted_users = {user}
host_lookup =
rfc1413_hosts =
keep_environment =
# Our relay is the only destination; freeze nothing, retry at once on -qff.
ignore_bounce_errors_after = 0s
timeout_frozen_after = 1m

begin routers

to_relay:
  driver = manualroute
  domains = *
  route_list = * 127.0.0.1
  self = send
  transport = relay_smtp
  no_more

begin transports

relay_smtp:
  driver = smtp
  port = {port}
  allow_localhost
  hosts_avoid_tls = *
  hosts_try_chunking = {chunking}
  command_timeout = 20s
  data_timeout = 20s
  final_timeout = 20s

begin retry

* * F,1h,1m
"""


@pytest.fixture
def framing(impl, monkeypatch):
    monkeypatch.setattr(_impl, "ServerFramer", impl.ServerFramer)
    return impl


@pytest.fixture
def exim_dir():
    """A directory exim's user can reach (pytest's tmp_path parents are 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="fastrelay-exim-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def exim_identity() -> tuple[str, str]:
    """The user exim delivers as. Not root: exim refuses to run a transport as root
    (fixed_never_users), so as root it is Debian's exim user; else exim runs as the caller (a -C
    config drops exim's privilege), which must then be its exim_user too."""
    if os.getuid() == 0:
        for name in ("Debian-exim", "exim"):
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                continue
            return pw.pw_name, grp.getgrgid(pw.pw_gid).gr_name
        pytest.fail("running as root and there is no exim user to deliver as (install exim4-daemon-light)")
    return pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name


async def exim(conf: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        EXIM, "-C", str(conf), *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 60)
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.parametrize("chunking", ["*", ":"], ids=["bdat", "data"])
async def test_exim_through_the_relay_delivers_each_message_once(tmp_path, exim_dir, framing, chunking):
    """Issue 16: "fastrelay sees EOF and closes the connection before it writes the 250 for the
    message and the 221. The message was committed and is relayed. Exim logs "Remote host closed
    connection in response to end of data", defers it, and sends it again on its next queue run.
    Every message arrives twice." """
    sink = await Sink("127.0.0.2", 0).start()
    h = RelayHarness(tmp_path, 'Prohibited_Hosts = ( "0.0.0.0/8" )\n'
                     f'Domain example.net {{ Routes = ( "smtp://127.0.0.2?port={sink.port}" ) }}\n')
    await h.start()
    try:
        user, group = exim_identity()
        for sub in ("spool", "log"):
            (exim_dir / sub).mkdir()
            shutil.chown(exim_dir / sub, user, group)
        conf = exim_dir / "exim.conf"
        conf.write_text(EXIM_CONF.format(dir=exim_dir, user=user, group=group, port=h.port, chunking=chunking))
        n = 3
        said: list[str] = []  # exim's own output (without root it logs there, not to log/)

        def mainlog() -> str:
            f = exim_dir / "log" / "mainlog"
            return f.read_text() if f.exists() and f.stat().st_size else "".join(said)

        for i in range(n):
            msg = (f"From: a@example.com\nTo: b{i}@example.net\nSubject: exim {i}\nX-Test-Id: exim-{i}\n\n"
                   f"hello {i}\n").encode()
            rc, out = await exim(conf, "-odi", "-f", "a@example.com", f"b{i}@example.net", stdin=msg)
            said.append(out)
            assert rc == 0, out
        # What exim would do on its next queue run: anything it deferred is sent again.
        rc, out = await exim(conf, "-qff")
        said.append(out)
        assert rc == 0, out
        rc, out = await exim(conf, "-bpc")
        assert (rc, out.splitlines()[-1:]) == (0, ["0"]), "exim still has mail queued:\n" + mainlog()
        got = await sink.wait_for(n, timeout=20)
        await asyncio.sleep(1.0)  # a duplicate would come right behind
        ids = sorted(m.test_id for m in sink.messages)
        log = mainlog()
        assert ids == [f"exim-{i}" for i in range(n)], log
        assert "closed connection" not in log, log
        # Exim marks a delivery made with CHUNKING (BDAT) with K in its => line.
        deliveries = [ln for ln in log.splitlines() if " => " in ln]
        assert len(deliveries) == n, log
        assert all((" K " in ln) == (chunking == "*") for ln in deliveries), log
        assert all(m.rcpt_tos == [f"b{int(m.test_id[5:])}@example.net"] for m in got)
    finally:
        await h.stop()
        await sink.stop()
