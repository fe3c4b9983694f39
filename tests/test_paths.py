"""The embedded default conf and the default spool and mainlog places (fastrelay/paths.py)."""

from __future__ import annotations

import os
from importlib import resources

import pytest

from fastrelay import paths
from fastrelay.config import loads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_embedded_conf_is_the_annotated_copy():
    """Issue 15: "Keep conf/fastrelay.conf as the annotated copy, and test that the two are the same file"."""
    embedded = resources.files("fastrelay").joinpath("data/fastrelay.conf").read_bytes()
    with open(os.path.join(ROOT, "conf", "fastrelay.conf"), "rb") as f:
        assert embedded == f.read()
    with paths.default_conf() as p:
        assert os.path.isfile(p)


@pytest.mark.parametrize(
    ("euid", "xdg", "spool", "mainlog"),
    [
        (0, None, "/var/spool/fastrelay", "/var/log/fastrelay/mainlog"),
        (0, "/x/state", "/var/spool/fastrelay", "/var/log/fastrelay/mainlog"),
        (1000, None, "{home}/.local/state/fastrelay/spool", "{home}/.local/state/fastrelay/mainlog"),
        (1000, "/x/state", "/x/state/fastrelay/spool", "/x/state/fastrelay/mainlog"),
        # The XDG spec: a relative $XDG_STATE_HOME is invalid and ignored.
        (1000, "rel/state", "{home}/.local/state/fastrelay/spool", "{home}/.local/state/fastrelay/mainlog"),
    ],
)
def test_default_spool_and_mainlog(monkeypatch, tmp_path, euid, xdg, spool, mainlog):
    """Issue 15: "Its spool and mainlog go to a sane per-user place when not root"; "The mainlog's
    default path is documented and sane (not `/var/spool/mainlog` beside the spool)"."""
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    monkeypatch.setenv("HOME", str(tmp_path))
    if xdg is None:
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_STATE_HOME", xdg)
    with paths.default_conf() as p, open(p, "rb") as f:
        cfg = loads(f.read(), p)
    assert (cfg.spool_dir, cfg.mainlog_path) == (spool.format(home=tmp_path), mainlog.format(home=tmp_path))


@pytest.mark.parametrize(
    ("conf", "spool", "mainlog"),
    [
        ('Spool_Base = "/srv/relay/spool"\n', "/srv/relay/spool", "/srv/relay/mainlog"),
        ('Spool_Base = "spool"\n', "{d}/spool", "{d}/mainlog"),
        ('Spool_Base = "/srv/relay/spool"\nMainlog = "/var/log/relay.log"\n', "/srv/relay/spool", "/var/log/relay.log"),
        ('Mainlog = "log/mainlog"\n', "/var/spool/fastrelay", "{d}/log/mainlog"),
    ],
)
def test_written_spool_and_mainlog(monkeypatch, tmp_path, conf, spool, mainlog):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    cfg = loads(conf, str(tmp_path / "relay.conf"))
    assert (cfg.spool_dir, cfg.mainlog_path) == (spool.format(d=tmp_path), mainlog.format(d=tmp_path))
