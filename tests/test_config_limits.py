"""Reading a conf is bounded: nesting depth, include targets (regular files only) and file size.

Issue 9: "check-config on a conf with stanzas nested a few hundred deep gives a RecursionError
traceback. `include "/dev/zero"` reads without bound; `include "/dev/stdin"` or a FIFO hangs.
Include only regular files, bounded in size (a named limit); cap nesting depth. Each case gives a
file:line:col error and exit 2."
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastrelay import limits
from fastrelay.config.errors import ConfigError
from fastrelay.config.parser import parse_file, parse_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = limits.MAX_CONF_NESTING


def nested(depth: int, inner: str = "max_retries = 1") -> str:
    # One stanza per line, so the error's line tells which level was refused.
    return "".join(f"Binding b{i} {{\n" for i in range(depth)) + inner + "\n" + "}\n" * depth


def check_config(path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastrelay", "check-config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, **kw)


def run(path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastrelay", "run", "-c", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, **kw)


def test_nesting_up_to_the_limit_parses(conf_impl):
    nodes = parse_text(nested(N).encode(), "t.conf")
    for _ in range(N):
        nodes = nodes[0].children
    assert nodes[0].name == "max_retries"


@pytest.mark.parametrize("depth", [N + 1, 300, 5000])
def test_nesting_past_the_limit_is_an_error_at_the_brace(conf_impl, depth):
    with pytest.raises(ConfigError) as ei:
        parse_text(nested(depth).encode(), "t.conf")
    assert str(ei.value) == (f"t.conf:{N + 1}:{len(f'Binding b{N} ') + 1}: stanzas nested more than {N} deep; "
                             "expected a shallower conf (limits.MAX_CONF_NESTING)")


def test_nesting_is_counted_across_includes(tmp_path, conf_impl):
    # 10 files, each 4 stanzas deep around the next include: 40 levels, none of them deep alone.
    for i in range(10):
        inner = f'include "f{i + 1}.conf"' if i < 9 else "max_retries = 1"
        (tmp_path / f"f{i}.conf").write_text(nested(4, inner))
    with pytest.raises(ConfigError) as ei:
        parse_file(str(tmp_path / "f0.conf"))
    e = ei.value
    assert e.file == str(tmp_path / f"f{N // 4}.conf") and e.line == 1
    assert e.message.startswith(f"stanzas nested more than {N} deep")


def test_check_config_and_run_on_300_deep_stanzas_exit_2_without_a_traceback(tmp_path):
    f = tmp_path / "deep.conf"
    f.write_text(nested(300))
    for out in (check_config(f), run(f)):
        assert out.returncode == 2
        assert out.stderr.splitlines() == [
            f"{f}:{N + 1}:{len(f'Binding b{N} ') + 1}: stanzas nested more than {N} deep; "
            "expected a shallower conf (limits.MAX_CONF_NESTING)"]


@pytest.mark.parametrize(("target", "kind"), [
    ("/dev/zero", "a character device"),
    ("/dev/null", "a character device"),
    ("/dev/urandom", "a character device"),
])
def test_include_of_a_device_is_an_error(tmp_path, conf_impl, target, kind):
    f = tmp_path / "main.conf"
    f.write_text(f'Domain a.test {{\n  include "{target}"\n}}\n')
    with pytest.raises(ConfigError) as ei:
        parse_file(str(f))
    assert str(ei.value) == f"{f}:2:11: cannot include '{target}': it is {kind}; expected a regular file"


def test_include_of_a_fifo_is_an_error_not_a_hang(tmp_path):
    """Nobody ever writes to this FIFO: opening it for reading would block forever."""
    fifo = tmp_path / "pipe.conf"
    os.mkfifo(fifo)
    f = tmp_path / "main.conf"
    f.write_text('include "pipe.conf"\n')
    for out in (check_config(f), run(f)):
        assert out.returncode == 2
        assert out.stderr == f"{f}:1:9: cannot include 'pipe.conf': it is a FIFO or pipe; expected a regular file\n"


def test_a_fifo_in_an_included_directory_is_skipped(tmp_path, conf_impl):
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / "00-pipe.conf")
    (tmp_path / "d" / "10-a.conf").write_text("max_retries = 3\n")
    f = tmp_path / "main.conf"
    f.write_text('include "d"\n')
    assert [n.name for n in parse_file(str(f))] == ["max_retries"]


def test_include_of_dev_stdin_on_a_pipe_is_an_error_not_a_hang(tmp_path):
    f = tmp_path / "main.conf"
    f.write_text('\ninclude "/dev/stdin"\n')
    # stdin is a pipe the test never writes to nor closes until the command is done.
    proc = subprocess.Popen([sys.executable, "-m", "fastrelay", "check-config", str(f)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _out, errs = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert errs == f"{f}:2:9: cannot include '/dev/stdin': it is a FIFO or pipe; expected a regular file\n"


def test_a_conf_file_that_is_not_a_regular_file_is_an_error():
    out = check_config("/dev/zero")
    assert (out.returncode, out.stderr) == (
        2, "/dev/zero: cannot read the conf file: it is a character device; expected a regular file\n")


def test_an_include_larger_than_the_limit_is_an_error(tmp_path, conf_impl):
    big = tmp_path / "big.conf"
    with open(big, "wb") as fh:
        fh.truncate(limits.MAX_CONF_FILE_SIZE + 1)  # sparse: no disk space used
    f = tmp_path / "main.conf"
    f.write_text('include "big.conf"\n')
    with pytest.raises(ConfigError) as ei:
        parse_file(str(f))
    assert str(ei.value) == (
        f"{f}:1:9: cannot include 'big.conf': it is {limits.MAX_CONF_FILE_SIZE + 1} bytes, more than "
        f"{limits.MAX_CONF_FILE_SIZE} (limits.MAX_CONF_FILE_SIZE); expected a smaller file")


def test_an_include_at_the_limit_is_read(tmp_path, conf_impl):
    ok = tmp_path / "ok.conf"
    ok.write_bytes(b"max_retries = 2\n" + b"#" * (limits.MAX_CONF_FILE_SIZE - 17) + b"\n")
    assert os.path.getsize(ok) == limits.MAX_CONF_FILE_SIZE
    f = tmp_path / "main.conf"
    f.write_text('include "ok.conf"\n')
    assert [n.name for n in parse_file(str(f))] == ["max_retries"]
