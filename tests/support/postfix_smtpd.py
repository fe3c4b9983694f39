"""A real Postfix smtpd, up to RCPT, for the XCLIENT tests (issue #10).

Postfix's master runs in the foreground from the binaries .ci/peers unpacks under
/opt/fastrelay-postfix, in a throwaway config and queue directory.

Only what an SMTP session up to RCPT needs runs: smtpd, trivial-rewrite, proxymap, anvil and
postlogd (its log goes to `log_path`). RCPT is answered from a cidr table keyed by the client
address, so the reply and the log say which client Postfix believes it is talking to.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PREFIX = Path("/opt/fastrelay-postfix")
MASTER = PREFIX / "usr/lib/postfix/sbin/master"
HOW = ("Postfix is unpacked by .ci/peers (run it as root: sudo .ci/peers); these tests start a real "
       "Postfix master, which needs root and the postfix user and postdrop group")


class PostfixError(RuntimeError):
    pass


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Postfix:
    def __init__(self, host: str = "127.0.0.9", xclient_hosts: str = "127.0.0.0/8",
                 clients: dict[str, str] | None = None):
        if not MASTER.exists():
            raise PostfixError(f"{MASTER} is missing. {HOW}")
        if os.geteuid() != 0:
            raise PostfixError(f"not running as root. {HOW}")
        try:
            import grp
            import pwd

            pwd.getpwnam("postfix")
            grp.getgrnam("postdrop")
        except KeyError:
            raise PostfixError(f"no postfix user or postdrop group. {HOW}") from None
        self.host = host
        self.port = _free_port(host)
        self.xclient_hosts = xclient_hosts
        self.clients = clients or {}
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "maillog"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> Postfix:
        # Under /tmp with 0755 parents: the daemons drop to the postfix user and must reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="fastrelay-postfix-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        etc, queue, data = self.dir / "etc", self.dir / "queue", self.dir / "data"
        for d in (etc, queue, queue / "pid", queue / "public", queue / "private", data):
            d.mkdir(parents=True)
        for d in (queue / "public", queue / "private", data):
            shutil.chown(d, "postfix", "postfix")
        lib = PREFIX / "usr/lib/postfix"
        (etc / "clients.cidr").write_text("".join(f"{net} {action}\n" for net, action in self.clients.items()))
        (etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
daemon_directory = {lib}/sbin
command_directory = {PREFIX}/usr/sbin
shlib_directory = {lib}
meta_directory = {etc}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.test
mydestination =
local_recipient_maps =
inet_interfaces = loopback-only
inet_protocols = ipv4
import_environment = LD_LIBRARY_PATH={lib} MAIL_CONFIG
maillog_file = /dev/stdout
smtpd_authorized_xclient_hosts = {self.xclient_hosts}
smtpd_peername_lookup = no
smtpd_relay_restrictions = check_client_access cidr:{etc}/clients.cidr, reject
""")
        (etc / "master.cf").write_text(f"""\
{self.host}:{self.port} inet n - n - - smtpd
rewrite   unix  -       -       n       -       -       trivial-rewrite
proxymap  unix  -       -       n       -       -       proxymap
anvil     unix  -       -       n       -       1       anvil
postlog   unix-dgram n  -       n       -       1       postlogd
""")
        # Dated a minute back: Postfix reads a file modified within the last second or two again
        # and again until it has "cooled" (util/load_file.c), which made each start wait ~2 s.
        then = time.time() - 60
        for f in ("main.cf", "master.cf", "clients.cidr"):
            os.utime(etc / f, (then, then))
        env = {**os.environ, "LD_LIBRARY_PATH": str(lib)}
        logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(MASTER), "-c", str(etc), "-d"], stdout=logf, stderr=subprocess.STDOUT,
                                     env=env, cwd=str(self.dir))
        logf.close()
        end = time.monotonic() + 15
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise PostfixError(f"Postfix master exited ({self.proc.returncode}): {self.log()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.settimeout(5)
                    if s.recv(100).startswith(b"220"):
                        return self
            except OSError:
                time.sleep(0.1)
        tail = self.log()[-2000:]
        self.stop()
        raise PostfixError(f"Postfix smtpd did not greet on {self.host}:{self.port}: {tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # master takes its children down with it
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
