"""Momentum's `Security { User = "…" Group = "…" }`: started as root, the relay binds its listeners
(a privileged port too), then runs as that user before it opens the spool and the mainlog."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from tests.e2e.test_default_conf import relay_one, start_relay, stop
from tests.e2e.test_install import _NOT_SOURCE, ROOT
from tests.support import Sink

# Run as root, as CI does: the test binds a privileged port and becomes `nobody`.
pytestmark = pytest.mark.slow

SYSTEM_PYTHON = "/usr/bin/python3"  # a Python whose files the unprivileged user can read


def _privileged_free_port() -> int:
    # In random order: CI runs two passes of the suite at once, and a scan from 700 in both would
    # pick the same port in the moment between this check and the relay's bind.
    for port in random.sample(range(700, 1000), 300):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no privileged port free on 127.0.0.1")


def _abi_tag(python: str) -> str:
    out = subprocess.run([python, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


@pytest.fixture(scope="module")
def installed(built_wheel):
    """fastrelay installed with the system Python in a directory every user may read: the
    session's wheel (test_install.py's) when it was built for that Python's version, else
    `pip install .` of a copy of the tree."""
    d = tempfile.mkdtemp(prefix="fastrelay-privdrop-")
    os.chmod(d, 0o755)
    try:
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", os.path.join(d, "venv")], check=True, timeout=300)
        pip = [os.path.join(d, "venv", "bin", "python"), "-m", "pip", "install", "-q"]
        if f"-{_abi_tag(SYSTEM_PYTHON)}-" in built_wheel.name:
            out = subprocess.run([*pip, str(built_wheel)], capture_output=True, text=True, timeout=900)
        else:
            shutil.copytree(ROOT, os.path.join(d, "src"), ignore=_NOT_SOURCE)
            out = subprocess.run([*pip, "."], cwd=os.path.join(d, "src"), capture_output=True, text=True,
                                 timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_binds_as_root_then_runs_as_the_user(installed):
    """Issue 15: "Privilege drop: Momentum's `Security { User = "…" Group = "…" }`. Bind the
    listeners, then drop to that user before the spool is opened"."""
    nobody = pwd.getpwnam("nobody")
    work = tempfile.mkdtemp(prefix="run-", dir=installed)
    os.chmod(work, 0o755)
    data = os.path.join(work, "data")
    os.mkdir(data)
    os.chown(data, nobody.pw_uid, nobody.pw_gid)  # the user's to write, as an operator would set it up
    sink = Sink("127.0.0.1", 0)
    await sink.start()
    port = _privileged_free_port()
    conf = os.path.join(work, "relay.conf")
    with open(conf, "w") as f:
        f.write(f'Security {{\n  User = "nobody"\n  Group = "nogroup"\n}}\n'
                f'Spool_Base = "{data}/spool"\nMainlog = "{data}/mainlog"\n'
                f'Prohibited_Hosts = ( "0.0.0.0/8" )\n'
                f'ESMTP_Listener {{\n  Listen "127.0.0.1:{port}" {{ }}\n}}\n'
                f'Domain sink.test {{\n  Routes = ( "smtp://127.0.0.1?port={sink.port}" )\n}}\n')
    proc, got_port = await start_relay([os.path.join(installed, "venv", "bin", "fastrelay"), "run", "-c", conf],
                                       cwd=work)
    try:
        assert got_port == port
        with open(f"/proc/{proc.pid}/status") as f:
            ids = {line.split(":")[0]: line.split()[1:] for line in f if line.startswith(("Uid", "Gid"))}
        assert ids == {"Uid": [str(nobody.pw_uid)] * 4, "Gid": [str(nobody.pw_gid)] * 4}
        await relay_one(port, sink, "privdrop")
        for name in ("spool", "mainlog"):
            assert os.stat(os.path.join(data, name)).st_uid == nobody.pw_uid, name
        assert os.stat(os.path.join(data, "spool", "spool.db")).st_uid == nobody.pw_uid
    finally:
        stop(proc)
        await sink.stop()


@pytest.mark.parametrize(("security", "error"), [
    ('User = "no-such-user-x"', 'Security User = "no-such-user-x": no such user'),
    ('User = "nobody"\n  Group = "no-such-group-x"', 'Security Group = "no-such-group-x": no such group'),
])
def test_an_unknown_user_or_group_stops_the_start(tmp_path, security, error):
    conf = tmp_path / "relay.conf"
    conf.write_text(f'Security {{\n  {security}\n}}\nSpool_Base = "spool"\n'
                    'ESMTP_Listener {\n  Listen "127.0.0.1:0" { }\n}\n')
    out = subprocess.run([sys.executable, "-m", "fastrelay", "run", "-c", str(conf)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and f"cannot start: {error}" in out.stderr, out.stderr
    assert not (tmp_path / "spool").exists(), "nothing opened before the drop"
    assert "Traceback" not in out.stderr
