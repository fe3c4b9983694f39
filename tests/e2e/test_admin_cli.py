"""Issue 12, item 2: the CLI over the admin API (`fastrelay queue ...`, suspend, resume,
reroute-queue, reload), run as real processes against a running relay found from its conf."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

import pytest

from tests.e2e.conftest import body, drained, send

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def fr(h, *args: str) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fastrelay", *args, "-c", str(h.conf_path), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 60)
    return p.returncode, out.decode(), err.decode()


@pytest.fixture
async def cli_relay(relay, sinks):
    (sink,) = await sinks(1)
    port = free_port()
    h = await relay(f'Gateway = 127.0.0.2\nAdmin_Listener {{\n  Admin_Token = "tok"\n'
                    f'  Listen "127.0.0.1:{port}" {{ }}\n}}\n')
    return h, sink


async def test_queue_commands_tables_json_and_exit_codes(cli_relay):
    """"`fastrelay queue summary | list | show ID | delete ID… | hold | release | flush [DOMAIN] |
    bounce ID…`, ... Each command takes `-c FILE` ... and finds the admin listener and token from
    it. Human tables by default, `--json` for scripts, and exit codes that scripts can use.\""""
    h, sink = cli_relay
    rc, out, err = await fr(h, "suspend", "c.test")
    assert (rc, out.strip()) == (0, "suspended c.test"), err
    for i in range(3):
        await send(h, [f"u{i}@c.test"], body(f"c{i}"), sender=f"s{i}@example.com")

    rc, out, _ = await fr(h, "queue", "summary")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:7] == ["DOMAIN", "BINDING", "T", "READY", "DEFER", "HELD", "ACTIVE"]
    assert lines[1].split()[:7] == ["TOTAL", "3", "3", "0", "0", "0", "3"]  # TOTAL has no binding
    assert lines[2].split()[:7] == ["c.test", "default", "3", "3", "0", "0", "0"]
    assert "suspended: c.test" in out
    rc, out, _ = await fr(h, "queue", "summary", "--json")
    assert rc == 0 and json.loads(out)["by_state"]["ready"] == 3

    rc, out, _ = await fr(h, "queue", "list", "--json", "--sender", "s1@")
    (m,) = json.loads(out)["messages"]
    rc, out, _ = await fr(h, "queue", "list", "--limit", "2")
    assert rc == 0 and len(out.splitlines()) == 4 and "(2 of 3; --offset 2 for more)" in out
    rc, out, _ = await fr(h, "queue", "show", m["id"])
    assert rc == 0 and "sender:       <s1@example.com>" in out and "  pending   <u1@c.test>" in out
    assert "  X-Test-Id: c1" in out

    rc, out, _ = await fr(h, "queue", "hold", m["id"])
    assert (rc, out.strip()) == (0, f"{m['id']}: held")
    # A missing id among good ones: the good one is done, the exit status says "not found".
    rc, out, err = await fr(h, "queue", "release", m["id"], "99999")
    assert rc == 3 and f"{m['id']}: ready" in out and "99999: no queued message 99999" in err
    rc, _, err = await fr(h, "queue", "release", m["id"])
    assert rc == 4 and "is not held" in err

    others = [x["id"] for x in json.loads((await fr(h, "queue", "list", "--json"))[1])["messages"] if x["id"] != m["id"]]
    rc, out, _ = await fr(h, "queue", "bounce", others[0])
    assert (rc, out.strip()) == (0, f"{others[0]}: bounced")
    rc, out, _ = await fr(h, "queue", "delete", others[1], "--json")
    assert rc == 0 and json.loads(out)[0]["result"] == "deleted"
    rc, out, _ = await fr(h, "queue", "show", "12345")
    assert rc == 3

    rc, out, _ = await fr(h, "resume", "c.test")
    assert (rc, out.strip()) == (0, "resumed c.test")
    msgs = await sink.wait_for(2)  # the released message, and the DSN of the bounced one
    rcpts = sorted(x.rcpt_tos[0] for x in msgs)
    assert rcpts[1] == "u1@c.test" and rcpts[0] in ("s0@example.com", "s2@example.com")
    await drained(h)
    rc, out, _ = await fr(h, "queue", "flush")
    assert (rc, out.strip()) == (0, "0 message(s) to retry now")


async def test_suspend_for_reroute_dry_run_and_reload(cli_relay):
    """"`fastrelay suspend DOMAIN [--binding B] [--for 1h]`, `fastrelay resume …`, `fastrelay
    reroute-queue A B [--dry-run]` and `fastrelay reload`.\""""
    h, sink = cli_relay
    rc, out, _ = await fr(h, "suspend", "a.test", "--for", "1h")
    assert rc == 0 and out.startswith("suspended a.test until ")
    rc, out, _ = await fr(h, "suspend", "--binding", "default", "--json")
    assert rc == 0 and json.loads(out) == {"domain": None, "binding": "default", "until": None}
    await send(h, ["x@a.test"], body("a1"))
    rc, out, _ = await fr(h, "reroute-queue", "a.test", "b.test", "--dry-run")
    assert (rc, out.strip()) == (0, "would move 1 message(s) from a.test to b.test")
    rc, out, _ = await fr(h, "reroute-queue", "a.test", "b.test")
    assert (rc, out.strip()) == (0, "moved 1 message(s) from a.test to b.test")
    rc, out, _ = await fr(h, "resume", "--all")
    assert (rc, out.strip()) == (0, "resumed 2 suspension(s)")
    (m,) = await sink.wait_for(1)
    assert m.rcpt_tos == ["x@a.test"]
    rc, _, err = await fr(h, "resume", "a.test")
    assert rc == 3 and "no such suspension" in err

    rc, out, _ = await fr(h, "reload")
    assert rc == 0 and out.startswith("reloaded: ")
    good = h.conf_path.read_text()
    h.conf_path.write_text(good + "\nretry_interval = soon\n")
    rc, out, err = await fr(h, "reload")
    # The CLI reads the same conf to find the relay: a broken one is reported, nothing is sent
    # (the relay's own refusal of a broken reload is tested in test_admin_reload.py).
    assert rc == 2 and "relay.conf:" in err and "retry_interval" in err, (out, err)
    h.conf_path.write_text(good)
    await drained(h)


async def test_wrong_token_no_listener_and_no_relay(cli_relay, tmp_path):
    h, _ = cli_relay
    good = h.conf_path.read_text()
    h.conf_path.write_text(good.replace('Admin_Token = "tok"', 'Admin_Token = "nope"'))
    rc, _, err = await fr(h, "queue", "summary")
    assert rc == 5 and "Bearer" in err
    h.conf_path.write_text(good.split("Admin_Listener")[0])
    rc, _, err = await fr(h, "queue", "summary")
    assert rc == 2 and "no Admin_Listener" in err
    h.conf_path.write_text(good)
    await h.stop()
    rc, _, err = await fr(h, "queue", "summary")
    assert rc == 1 and "cannot reach the admin API" in err
