"""The fastrelay command: --version, check-config, config eval, and run starting and stopping cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from fastrelay import _impl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fr(*args: str, cwd: str = ROOT, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastrelay", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_version_names_the_implementation():
    out = fr("--version")
    assert out.returncode == 0
    assert re.fullmatch(r"fastrelay \d+\.\d+\.\d+ \((cython|python) hot paths\)\n", out.stdout)
    assert f"({_impl.IMPL} hot paths)" in out.stdout


def test_check_config_ok():
    out = fr("check-config", "conf/fastrelay.conf")
    assert (out.returncode, out.stdout) == (0, "conf/fastrelay.conf: OK\n")


def test_check_config_prints_every_error(tmp_path):
    f = tmp_path / "bad.conf"
    f.write_text("Domain a.com {\n  Rotues = ( __mx__ )\n  max_retries = x\n}\n")
    out = fr("check-config", str(f))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"{f}:2:3: unknown option 'Rotues'; did you mean 'Routes'?",
        f"{f}:3:17: bad value for 'max_retries': got 'x'; expected a whole number from 0 to 1000000",
    ]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('Domain a.com {\n  Gateway = "x\n}\n', ":2:13: unterminated string"),
        ("Domain a.com {\n", ":1:14: unclosed '{'"),
        ('include "missing.conf"\n', ":1:9: cannot include 'missing.conf'"),
        ("/* never closed\n", ":1:1: unterminated comment"),
    ],
)
def test_check_config_syntax_errors_exit_2(tmp_path, text, needle):
    f = tmp_path / "bad.conf"
    f.write_text(text)
    out = fr("check-config", str(f))
    assert out.returncode == 2
    assert out.stderr.startswith(str(f) + needle)
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr


def test_check_config_missing_file(tmp_path):
    out = fr("check-config", str(tmp_path / "none.conf"))
    assert out.returncode == 2 and "cannot read the file" in out.stderr and "Traceback" not in out.stderr


def test_config_eval(tmp_path):
    out = fr("config", "eval", "-c", "conf/examples/seed000_xfer_client.conf", "--domain", "xfer.test",
             "delivery_response_timeout")
    assert out.returncode == 0
    assert out.stdout == (
        "Delivery_Response_Timeout = 10s\t# conf/examples/seed000_xfer_client.conf:15 (Domain xfer.test)\n"
    )
    out = fr("config", "eval", "-c", "conf/examples/seed000_xfer_client.conf", "retry_interval")
    assert out.stdout == "retry_interval = 20m\t# default\n"
    out = fr("config", "eval", "-c", "conf/examples/seed000_xfer_client.conf", "retry_intervall")
    assert out.returncode == 2
    assert out.stderr == "fastrelay: unknown option 'retry_intervall'; did you mean 'retry_interval'?\n"


def test_config_eval_binding(tmp_path):
    f = tmp_path / "b.conf"
    f.write_text("Gateway = a.example\nBinding b1 { Gateway = b.example }\n")
    out = fr("config", "eval", "-c", str(f), "--binding", "b1", "--domain", "x.com", "Gateway")
    assert out.stdout == f"Gateway = b.example\t# {f}:2 (Binding b1)\n"


def test_config_eval_says_where_a_shared_throttle_lives():
    """Issue #10: "`fastrelay config eval --binding B --domain D OPTION` answers for throttles,
    saying in which scope the shared throttle lives"."""
    ex = "conf/examples/momentum_throttle_by_reference.conf"
    out = fr("config", "eval", "-c", ex, "--binding", "mybinding2", "--domain", "mydomain1",
             "outbound_throttle_messages")
    assert out.returncode == 0
    assert out.stdout == (f'outbound_throttle_messages = "10/1"\t# {ex}:4 (Binding_Group mygroup); one throttle '
                          "shared by everything that falls back to Binding_Group mygroup\n")
    out = fr("config", "eval", "-c", ex, "--binding", "separate", "outbound_throttle_messages")
    assert out.stdout.endswith("falls back to Binding separate\n")
    out = fr("config", "eval", "-c", ex, "--domain", "www.example.co.uk", "outbound_throttle_messages")
    assert "(Domain /(?:^|[.])example[.](com|co[.]uk)$/); one throttle" in out.stdout
    out = fr("config", "eval", "-c", ex, "--host", "smtp.example.com", "outbound_throttle_connections")
    assert out.stdout == (f'outbound_throttle_connections = "5/10"\t# {ex}:19 (Host smtp.example.com); one '
                          "throttle shared by everything that falls back to Host smtp.example.com\n")
    out = fr("config", "eval", "-c", ex, "--host", "mx.other.test", "outbound_throttle_connections")
    assert out.stdout == "outbound_throttle_connections = (unset)\t# no Host stanza for mx.other.test sets it\n"
    out = fr("config", "eval", "-c", ex, "--domain", "a.test", "outbound_throttle_messages")
    assert out.stdout == "outbound_throttle_messages = (unset)\t# default\n"


def _start(conf: str, *extra: str) -> tuple[subprocess.Popen, list[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastrelay", "run", "-c", conf, *extra],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )
    lines = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if " ready " in line:
            return proc, lines, line
    proc.kill()
    raise AssertionError("relay did not log that it is ready:\n" + "".join(lines))


def _conf(tmp_path, listens: str) -> str:
    f = tmp_path / "r.conf"
    f.write_text(f'Spool_Base = "spool"\nESMTP_Listener {{ {listens} }}\n')
    return str(f)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_run_listens_and_stops_cleanly(tmp_path, sig, loop):
    conf = _conf(tmp_path, 'Listen "127.0.0.1:0" { } Listen "[::1]:0" { }')
    proc, _, ready = _start(conf, *(["--asyncio"] if loop == "asyncio" else []))
    try:
        assert f"({_impl.IMPL} hot paths, {loop} loop)" in ready
        ports = re.findall(r"smtp on (\S+):(\d+)", ready)
        assert [h for h, _ in ports] == ["127.0.0.1", "[::1]"]
        for host, port in ports:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5) as s:
                assert s.recv(3)[:1] in (b"2", b"5")  # a greeting (220, or 554 until the server lands)
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        rest = proc.stderr.read()
        assert "stopped" in rest and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()


def test_run_reports_a_listener_that_cannot_bind(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        conf = _conf(tmp_path, f'Listen "127.0.0.1:{port}" {{ }}')
        out = subprocess.run([sys.executable, "-m", "fastrelay", "run", "-c", conf], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1
        assert f"cannot start: ESMTP listener 127.0.0.1:{port}" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        busy.close()


def test_run_bad_conf_exits_2(tmp_path):
    f = tmp_path / "bad.conf"
    f.write_text("Spool_Base = \n")
    out = fr("run", "-c", str(f))
    assert out.returncode == 2 and out.stderr.startswith(f"{f}:2:1: unexpected end of the file")
