"""A private Postfix instance (master, smtpd, smtp, qmgr...) from the dpkg -x tree .ci/peers unpacks, and a
private Dovecot auth service for its SASL (smtpd_sasl_type = dovecot), each in its own directory.

The Postfix package conflicts with exim4 (both are the system MTA), so its binaries are not installed:
they run from /opt/fastrelay-postfix with LD_LIBRARY_PATH passed on by import_environment, a config
directory written here, and the maillog in a file (maillog_file, no syslog needed). Needs root (master
starts its daemons as mail_owner), the postfix user and postdrop group, and dovecot-core; .ci/peers
provides them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PFX = Path("/opt/fastrelay-postfix")
LIB = PFX / "usr/lib/postfix"
SBIN = LIB / "sbin"

__all__ = ["Dovecot", "Postfix", "missing"]


def missing() -> str | None:
    """Why these peers cannot run here (None if they can): the test fails with it as instructions."""
    if os.geteuid() != 0:
        return "Postfix's master must start as root (CI runs the suite as root)"
    if not (SBIN / "master").exists():
        return f"{SBIN}/master is missing: run .ci/peers (it unpacks the postfix package)"
    if shutil.which("dovecot") is None or shutil.which("doveadm") is None:
        return "dovecot is missing: apt-get install dovecot-core (.ci/peers installs it)"
    for cmd in (["id", "postfix"], ["getent", "group", "postdrop"]):
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            return "the postfix user and postdrop group are missing: .ci/peers creates them"
    return None


def _wait_port(host: str, port: int, timeout: float, what: str, log: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {host}:{port}: {log.read_text() if log.exists() else ''}")


def _not_hot(*files: Path) -> None:
    """Date freshly written config files a minute back. Postfix reads a file modified within the
    last second or two again and again until it has "cooled" (util/load_file.c), which made every
    `postfix check` and master start here wait about 2 s."""
    then = time.time() - 60
    for f in files:
        os.utime(f, (then, then))


def _tmpdir(prefix: str) -> Path:
    # Postfix's daemons run as the postfix user: every directory above the queue must be
    # traversable by it, which pytest's tmp_path (mode 0700, root's) is not.
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    return d


class Dovecot:
    """Dovecot's auth service only (no IMAP/POP), users from a passwd-file, socket at `.socket`."""

    def __init__(self, users: dict[str, str]):
        self.dir = _tmpdir("fr-dovecot-")
        self.socket = self.dir / "auth-postfix"
        self.log = self.dir / "dovecot.log"
        lines = []
        for user, pw in users.items():
            h = subprocess.run(["doveadm", "pw", "-s", "SHA512-CRYPT", "-p", pw], capture_output=True, text=True,
                               check=True).stdout.strip()
            lines.append(f"{user}:{h}\n")
        (self.dir / "users").write_text("".join(lines))
        (self.dir / "dovecot.conf").write_text(f"""
base_dir = {self.dir}/run
state_dir = {self.dir}/state
protocols =
log_path = {self.log}
ssl = no
auth_mechanisms = plain login
disable_plaintext_auth = no
# A test peer answers at once: no 2 s delay of a failed AUTH's reply, and no growing penalty
# (anvil) for the client address that failed, which delayed the next, good AUTH by 4 s.
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = username_format=%u {self.dir}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  unix_listener {self.socket} {{
    mode = 0666
  }}
}}
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Dovecot:
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", str(self.dir / "dovecot.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        end = time.monotonic() + 15
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"dovecot did not start: {self.log.read_text() if self.log.exists() else ''}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Postfix:
    """master with one smtpd on host:port, the queue manager and the smtp client; `main` adds or
    overrides main.cf parameters (relayhost, smtpd_sasl_*, smtp_sasl_*, TLS files...)."""

    def __init__(self, host: str, port: int, main: dict[str, str]):
        self.host, self.port = host, port
        self.dir = _tmpdir("fr-postfix-")
        self.conf = self.dir / "conf"
        self.conf.mkdir()
        (self.dir / "queue").mkdir()
        self.maillog = self.dir / "maillog"
        params = {
            "compatibility_level": "3.6",
            "queue_directory": f"{self.dir}/queue",
            "data_directory": f"{self.dir}/data",
            "daemon_directory": str(SBIN),
            "command_directory": str(PFX / "usr/sbin"),
            "shlib_directory": str(LIB),
            "meta_directory": str(PFX / "etc/postfix"),
            "import_environment": f"MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C LD_LIBRARY_PATH={LIB}",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix.test",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",  # must exist as an interface address; services name their own
            "inet_protocols": "ipv4",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": "/tmp",
            "alias_maps": "",
            "alias_database": "",
            "smtp_host_lookup": "native",  # no DNS: only loopback literals are used
        }
        params.update(main)
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in params.items()))
        services = [f"{host}:{port} inet n - n - - smtpd"] + [
            f"{name} {kind} {priv} - n {wake} {limit} {cmd}" for name, kind, priv, wake, limit, cmd in (
                ("pickup", "unix", "n", "60", "1", "pickup"), ("cleanup", "unix", "n", "-", "0", "cleanup"),
                ("qmgr", "unix", "n", "300", "1", "qmgr"), ("tlsmgr", "unix", "-", "1000?", "1", "tlsmgr"),
                ("rewrite", "unix", "-", "-", "-", "trivial-rewrite"), ("bounce", "unix", "-", "-", "0", "bounce"),
                ("defer", "unix", "-", "-", "0", "bounce"), ("trace", "unix", "-", "-", "0", "bounce"),
                ("verify", "unix", "-", "-", "1", "verify"), ("flush", "unix", "n", "1000?", "0", "flush"),
                ("proxymap", "unix", "-", "-", "-", "proxymap"), ("smtp", "unix", "-", "-", "-", "smtp"),
                ("relay", "unix", "-", "-", "-", "smtp"), ("showq", "unix", "n", "-", "-", "showq"),
                ("error", "unix", "-", "-", "-", "error"), ("retry", "unix", "-", "-", "-", "error"),
                ("discard", "unix", "-", "-", "-", "discard"), ("anvil", "unix", "-", "-", "1", "anvil"),
                ("scache", "unix", "-", "-", "1", "scache"), ("postlog", "unix-dgram", "n", "-", "1", "postlogd"),
            )]
        (self.conf / "master.cf").write_text("\n".join(services) + "\n")
        _not_hot(self.conf / "main.cf", self.conf / "master.cf")
        self.env = {**os.environ, "LD_LIBRARY_PATH": str(LIB)}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Postfix:
        # `postfix check` creates the queue's directories with their owners and modes.
        r = subprocess.run([str(PFX / "usr/sbin/postfix"), "-c", str(self.conf), "check"], env=self.env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"postfix check failed: {r.stderr} {self.log_text()}")
        self.proc = subprocess.Popen([str(SBIN / "master"), "-c", str(self.conf), "-s"], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.host, self.port, 20, "postfix smtpd", self.maillog)
        return self

    def log_text(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def wait_log(self, text: str, timeout: float = 30) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            log = self.log_text()
            if text in log:
                return log
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in the Postfix maillog:\n{self.log_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # master stops its children on SIGTERM; its own session holds them all.
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
