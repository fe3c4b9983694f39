"""Every conf example from the seeds, and the embedded default, parses as written."""

from __future__ import annotations

import glob
import os

import pytest

from fastrelay.config import load
from fastrelay.config.types import HostPort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "conf", "examples", "*.conf")))


def test_there_are_examples():
    # One file per conf snippet of seeds 000, 001, 002 and 004 (003 is Stalwart TOML).
    assert len(EXAMPLES) >= 13


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_example_parses(conf_impl, path):
    load(path)


def test_default_conf(conf_impl):
    cfg = load(os.path.join(ROOT, "conf", "fastrelay.conf"))
    assert [str(li.address) for li in cfg.esmtp_listens] == ["127.0.0.1:2525"]
    assert cfg.get("spool_fsync") is True


def example(name: str):
    return load(os.path.join(ROOT, "conf", "examples", name))


def test_seed000_client_values(conf_impl):
    cfg = example("seed000_xfer_client.conf")
    d = "xfer.test"
    assert cfg.xfer_client_enabled
    assert cfg.get("Delivery_Method", d) == "delay_xfer"
    assert cfg.get("Delivery_Response_Timeout", d) == 10.0
    assert cfg.get("host_failure_retry", d) == 1.0
    assert cfg.get("max_retry_interval", d) == 2.0
    assert cfg.get("teleport_enabled", d) is True
    assert [(r.scheme, r.host, r.port) for r in cfg.get("Routes", d)] == [("xfer", "10.10.10.10", 8080)]
    assert (cfg.get("HTTP_URI", d), cfg.get("HTTP_METHOD", d), cfg.get("HTTP_HOST", d)) == (
        "/delay_message", "POST", "localhost",
    )
    assert cfg.get("reroute_domain", d) == "disabled"


def test_seed000_server_values(conf_impl):
    cfg = example("seed000_xfer_server.conf")
    assert cfg.xfer_server_enabled
    assert [li.address for li in cfg.http_listens] == [HostPort("", 8080)]


def test_seed001_delayed(conf_impl):
    cfg = example("seed001_delayed.conf")
    assert cfg.reroute_target("delayed_reroute_domain", "example.com") == "xfer.test"
    assert cfg.reroute_target("delayed_reroute_domain", "xfer.test") is None


def test_seed002_gateway(conf_impl):
    cfg = example("seed002_routing.conf")
    assert cfg.get("Gateway", "example.com") == HostPort("10.10.10.50", None)
    assert cfg.get("Gateway", "local.example.com") == HostPort("10.10.10.20", None)
    assert cfg.get("Delivery_Method", "local.example.com") == "LMTP"
    assert cfg.get("Delivery_Method", "example.com") == "ESMTP"


def test_seed004_balance(conf_impl):
    cfg = example("seed004_routes_balance.conf")
    assert [(r.host, r.pref) for r in cfg.get("Routes")] == [
        ("10.0.11.7", 10), ("10.0.11.8", 10), ("10.0.11.10", 10), ("10.0.11.13", 10), ("10.0.11.56", 10),
    ]


@pytest.mark.parametrize("name", ["seed000_xfer_server.conf", "seed001_xfer_server.conf"])
def test_seed_xfer_server_confs_are_runnable_as_written(conf_impl, name):
    """Issue 9: "The seed's XFER server configuration runs as written": no secret, so the XFER
    server authenticates by xfer_allowed_clients (loopback by default), with nothing to warn about."""
    from fastrelay.config.model import check_runnable

    cfg = example(name)
    assert check_runnable(cfg) == ([], [])
    (listen,) = cfg.http_listens
    assert listen.get("xfer_secret") is None and [str(n) for n in listen.get("xfer_allowed_clients")] == [
        "127.0.0.0/8", "::1/128"]
