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
        f"{f}:3:17: bad value for 'max_retries': got 'x'; expected a whole number from 0 to 1000000, \"auto\" or \"none\"",
    ]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('Domain a.com {\n  Gateway = "x\n}\n', ":2:13: unterminated string"),
        ("Domain a.com {\n", ":1:14: unclosed '{'"),
        ('include "missing.conf"\n', ":1:9: cannot include 'missing.conf'"),
        ("/* never closed\n", ":1:1: unterminated comment"),
        # cpu_scheduling (fastrelay.cpu): a bad word, and the option outside the global scope.
        ("cpu_scheduling = fast\n", ":1:18: bad value for 'cpu_scheduling': got 'fast'; expected one of batch, inherit"),
        ("Domain d.test {\n  cpu_scheduling = batch\n}\n",
         ":2:3: option 'cpu_scheduling' is not valid in a Domain stanza; expected it in the global scope"),
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
    """Issue 15: "A missing conf file gets a plain message, not `:1:1`"."""
    for argv in (["check-config", str(tmp_path / "none.conf")], ["run", "-c", str(tmp_path / "none.conf")],
                 ["config", "show", "-c", str(tmp_path / "none.conf")]):
        out = fr(*argv)
        assert (out.returncode, out.stderr) == (
            2, f"{tmp_path / 'none.conf'}: cannot read the conf file: No such file or directory\n"), argv


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


# --- check-config and run agree (issue 9) ------------------------------------------------------------

AGREE = {
    "no listener": 'Spool_Base = "spool"\nDomain a.test { Gateway = "10.0.0.1" }\n',
    "ESMTP_Listener without Listen": 'Spool_Base = "spool"\nESMTP_Listener {\n  Listener_Sessions = 10\n}\n',
    "delay_xfer without msys.xfer.client": (
        'Spool_Base = "spool"\nDomain xfer.test {\n  Delivery_Method = "delay_xfer"\n}\n'
        'ESMTP_Listener { Listen "127.0.0.1:0" { } }\n'),
    "msys.xfer.server without HTTP_Listener": (
        'Spool_Base = "spool"\nscriptlet "scriptlet" {\n  script xfer_server {\n    source = "msys.xfer.server"\n'
        '  }\n}\nESMTP_Listener { Listen "127.0.0.1:0" { } }\n'),
    "Momentum option": 'Spool_Base = "spool"\ntls_verify_mode = "mx.test"\nESMTP_Listener { Listen "127.0.0.1:0" { } }\n',
}


@pytest.mark.parametrize("name", list(AGREE))
def test_check_config_and_run_refuse_the_same_confs_with_the_same_errors(tmp_path, name):
    """Issue 9: "`check-config` and `run` always agree: `run` must never refuse a file that
    `check-config` passes." Each of these once passed check-config, or started and said "ready"."""
    f = tmp_path / "r.conf"
    f.write_text(AGREE[name])
    check = fr("check-config", str(f))
    run = fr("run", "-c", str(f))
    assert (check.returncode, run.returncode) == (2, 2)
    assert check.stderr == run.stderr and check.stderr.startswith(f"{f}:")
    assert "Traceback" not in check.stderr


def test_check_config_errors_name_the_place(tmp_path):
    f = tmp_path / "r.conf"
    f.write_text(AGREE["delay_xfer without msys.xfer.client"])
    assert fr("check-config", str(f)).stderr.startswith(f"{f}:3:3: Delivery_Method = delay_xfer needs the XFER client")
    f.write_text(AGREE["ESMTP_Listener without Listen"])
    assert fr("check-config", str(f)).stderr.startswith(f"{f}:2:1: ESMTP_Listener has no Listen stanza")
    f.write_text(AGREE["no listener"])
    assert fr("check-config", str(f)).stderr.startswith(f"{f}:1:1: no listener: nothing would receive mail")
    f.write_text(AGREE["Momentum option"])
    assert fr("check-config", str(f)).stderr == (
        f"{f}:2:1: tls_verify_mode is a Momentum option that fastrelay does not support; expected an option or "
        "stanza of docs/config.md (--lenient ignores it with a warning)\n")


def test_lenient_check_config_and_run_warn_about_momentum_names_and_go_on(tmp_path):
    """Issue 9: "check-config `--lenient` turns those errors, and only those, into warnings, for
    operators migrating a Momentum configuration." run --lenient starts on the same file."""
    f = tmp_path / "r.conf"
    f.write_text(AGREE["Momentum option"] + 'ac_auth { }\n')
    warning = f"{f}:2:1: warning: tls_verify_mode is a Momentum option that fastrelay does not support"
    check = fr("check-config", "--lenient", str(f))
    assert check.returncode == 0 and check.stdout == f"{f}: OK\n"
    assert [ln.split(";")[0] for ln in check.stderr.splitlines()] == [
        warning, f"{f}:4:1: warning: ac_auth is a Momentum module that fastrelay does not support"]
    proc, lines, _ready = _start(str(f), "--lenient")
    try:
        assert any(f"{f}:2:1: tls_verify_mode is a Momentum option" in ln for ln in lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # --lenient turns nothing else into a warning.
    f.write_text(AGREE["Momentum option"] + "max_retries = x\n")
    for out in (fr("check-config", "--lenient", str(f)), fr("run", "--lenient", "-c", str(f))):
        assert out.returncode == 2
        assert f"{f}:4:15: bad value for 'max_retries'" in out.stderr


def test_seed_xfer_server_conf_runs_as_written_and_takes_a_transfer_from_loopback(tmp_path):
    """Issue 9: "The seed's XFER server configuration runs as written. Today `run` refuses it without
    `xfer_secret` while `check-config` accepts it. New rule: with no secret or token, the XFER
    server accepts only from `xfer_allowed_clients`, whose default is loopback."
    conf/examples/seed000_xfer_server.conf (seed 000, "Server Configuration To Receive XFER
    messages"), included unchanged but for its port (8080 may be taken on a shared machine), beside a
    spool directory."""
    import urllib.request

    from fastrelay.message import Envelope, Recipient
    from fastrelay.xfer import wire
    from tests.support import free_port

    port = free_port()
    seed = open(os.path.join(ROOT, "conf", "examples", "seed000_xfer_server.conf")).read()
    assert 'Listen ":8080" {}' in seed and "xfer_secret" not in seed
    (tmp_path / "seed.conf").write_text(seed.replace('":8080"', f'":{port}"'))
    f = tmp_path / "r.conf"
    f.write_text('Spool_Base = "spool"\nsuspend_delivery = 1\ninclude "seed.conf"\n')
    check = fr("check-config", str(f))
    assert (check.returncode, check.stderr) == (0, "")
    proc, _lines, ready = _start(str(f))
    try:
        assert f"xfer on 0.0.0.0:{port}" in ready or f"xfer on [::]:{port}" in ready
        env = Envelope("s@src.test", [Recipient("r@dst.test")], "dst.test", client_ip="192.0.2.1", helo="h.test",
                       msgid="1.aaaa", received_at=time.time())
        payload, n = wire.encode_request(env, [0], b"Subject: x\r\n\r\nhi\r\n", ("node-a", "1"))
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/delay_message", data=payload, method="POST",
            headers={"Content-Type": wire.CONTENT_TYPE, wire.H_VERSION: "1", wire.H_ENVELOPE_LENGTH: str(n)})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
            assert wire.decode_response(r.read()).duplicate is False
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_config_eval_names_a_momentum_option_without_a_guess(tmp_path):
    """Issue 9: a real Momentum option "gets "unknown option" or a misleading "did you mean"
    (`ehlo_hostname` suggests `Hostname`)"."""
    out = fr("config", "eval", "-c", "conf/fastrelay.conf", "tls_verify_mode")
    assert (out.returncode, out.stderr) == (
        2, "fastrelay: tls_verify_mode is a Momentum option that fastrelay does not support\n")
    f = tmp_path / "m.conf"
    f.write_text('tls_verify_mode = "mx.test"\nmax_retries = 4\n')
    assert fr("config", "eval", "-c", str(f), "max_retries").returncode == 2
    out = fr("config", "eval", "--lenient", "-c", str(f), "max_retries")
    assert out.stdout == f"max_retries = 4\t# {f}:2 (global)\n"


def test_xfer_server_open_beyond_loopback_without_a_secret_starts_with_a_warning(tmp_path):
    """Issue 9: "A non-loopback allow-list without a secret starts with a warning naming the risk."
    check-config prints the same warning and passes the file."""
    from tests.support import free_port

    port = free_port()
    f = tmp_path / "x.conf"
    f.write_text('Spool_Base = "spool"\nsuspend_delivery = 1\n'
                 'scriptlet "scriptlet" { script xfer_server { source = "msys.xfer.server" } }\n'
                 f'HTTP_Listener {{\n  xfer_allowed_clients = ( 10.0.0.0/8 127.0.0.0/8 )\n  Listen "127.0.0.1:{port}" {{}}\n}}\n')
    warning = (f"{f}:5:3: warning: the XFER server on 127.0.0.1:{port} takes unauthenticated transfers from "
               "10.0.0.0/8 (xfer_allowed_clients, no xfer_secret or xfer_tokens): any host there can relay mail "
               "through this node")
    check = fr("check-config", str(f))
    assert check.returncode == 0 and check.stderr.startswith(warning)
    proc, lines, _ready = _start(str(f))
    try:
        logged = [ln for ln in lines if "takes unauthenticated transfers from 10.0.0.0/8" in ln]
        assert len(logged) == 1 and "WARNING" in logged[0]
        assert warning.replace(": warning:", ":") in logged[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    ("argv", "err"),
    [
        (["--listen", "nowhere"], "--listen: nowhere: got 'nowhere' with no port; expected an address and port"),
        (["--route", "sink.test"], "--route: sink.test: expected DOMAIN=ROUTE"),
        (["--route", "sink.test=smtp://[::1"], "--route: sink.test=smtp://[::1: "),
    ],
)
def test_run_overrides_with_a_bad_value_exit_2(tmp_path, argv, err):
    out = fr("run", "--spool", str(tmp_path / "spool"), *argv, cwd=str(tmp_path))
    assert out.returncode == 2 and out.stderr.startswith(err), out.stderr
    assert "Traceback" not in out.stderr


def test_config_show_non_default_prints_what_the_conf_sets(tmp_path):
    """Issue 15: "`fastrelay config show [--non-default]` prints the whole effective configuration,
    as `postconf -n` and Momentum's `config showrecurse` do"."""
    f = tmp_path / "relay.conf"
    f.write_text('retry_interval = 5m\nDomain a.test {\n  Routes = ( "10.0.0.1" )\n}\n'
                 'ESMTP_Listener {\n  Listen "127.0.0.1:2600" {\n    max_message_size = 1m\n  }\n}\n')
    out = fr("config", "show", "-n", "-c", str(f))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:2] == ["# global", f"retry_interval = 5m\t# {f}:1"]
    assert f'Routes = ( "10.0.0.1" )\t# {f}:3' in out.stdout
    assert f"max_message_size = 1048576\t# {f}:7" in out.stdout
    assert "Connect_Timeout" not in out.stdout
    full = fr("config", "show", "-c", str(f))
    assert "Connect_Timeout = 5m\t# default" in full.stdout and f"retry_interval = 5m\t# {f}:1" in full.stdout


def _all_parsers(p):
    import argparse

    yield p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                yield from _all_parsers(sp)


def test_every_argument_has_help_and_every_command_examples():
    """Issue 15: "Help text for every argument, with examples in the epilog"."""
    import argparse

    from fastrelay.cli import build_parser

    for p in _all_parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            assert a.help and a.help != argparse.SUPPRESS, (p.prog, a.dest)
        if p.prog.split()[-1] not in ("fastrelay", "config"):
            assert "example" in (p.epilog or ""), p.prog
