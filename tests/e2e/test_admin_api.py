"""Issue 12, item 1: the admin HTTP API over the queue API, on a real relay, real sinks, real HTTP."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest

from tests.e2e.conftest import body, drained, records, send

ADMIN = '\nAdmin_Listener {\n  Listen "127.0.0.1:0" { }\n}\n'


def admin_url(h) -> str:
    port = h.relay.admin_servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def call(h, method: str, path: str, token: str | None = None, headers: dict | None = None,
               **kw) -> tuple[int, dict]:
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as s, s.request(method, admin_url(h) + path, headers=headers, **kw) as r:
        assert r.content_type == "application/json", (r.status, await r.text())
        return r.status, await r.json()


async def wait_state(h, want: dict, timeout: float = 10.0) -> dict:
    end = asyncio.get_running_loop().time() + timeout
    while True:
        _, s = await call(h, "GET", "/api/v1/queue/summary")
        if all(s["by_state"][k] == v for k, v in want.items()):
            return s
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"summary never reached {want}: {s['by_state']}")
        await asyncio.sleep(0.05)


async def test_summary_list_show_hold_release_by_state(sinks, relay):
    """"queue summary: counts per domain and binding, by age bucket (qshape) and by state (ready,
    deferred, held, in delivery)"; "list messages with filters ... and paging"; "show one message"."""
    (sink,) = await sinks(1)
    h = await relay("Gateway = 127.0.0.2\n" + ADMIN)
    st, _ = await call(h, "POST", "/api/v1/suspensions", json={"domain": "held.test"})
    assert st == 200
    for i in range(3):
        await send(h, [f"u{i}@held.test"], body(f"s{i}"), sender=f"s{i}@example.com")
    await send(h, ["x@other.test"], body("other"))
    await sink.wait_for(1)  # other.test is not suspended
    s = await wait_state(h, {"ready": 3, "held": 0})
    while s["total"] != 3:  # the other.test message leaves the queue just after the sink has it
        await asyncio.sleep(0.02)
        _, s = await call(h, "GET", "/api/v1/queue/summary")
    (row,) = s["destinations"]
    assert (row["domain"], row["binding"], row["total"], row["by_age"][0]) == ("held.test", "default", 3, 3)
    assert s["suspended"] == [{"domain": "held.test", "binding": None, "until": None}]

    st, page = await call(h, "GET", "/api/v1/messages?domain=held.test&limit=2")
    assert st == 200 and page["total"] == 3 and len(page["messages"]) == 2
    st, page2 = await call(h, "GET", "/api/v1/messages?domain=held.test&limit=2&offset=2")
    ids = [m["id"] for m in page["messages"] + page2["messages"]]
    assert len(set(ids)) == 3
    st, one = await call(h, "GET", "/api/v1/messages?sender=s1@example")
    assert [m["sender"] for m in one["messages"]] == ["s1@example.com"]
    st, one = await call(h, "GET", "/api/v1/messages?recipient=U2@held.test")
    assert [m["recipients"] for m in one["messages"]] == [["u2@held.test"]]
    target = one["messages"][0]["id"]

    st, shown = await call(h, "GET", f"/api/v1/messages/{target}?body=true")
    assert st == 200 and shown["sender"] == "s2@example.com"
    assert shown["recipients"] == [{"address": "u2@held.test", "params": "", "state": "pending", "detail": ""}]
    assert ["X-Test-Id", "s2"] in shown["headers"] and shown["body"].endswith("hello\r\n")
    st, shown = await call(h, "GET", f"/api/v1/messages/{target}")
    assert "body" not in shown

    assert (await call(h, "POST", f"/api/v1/messages/{target}/hold"))[0] == 200
    await wait_state(h, {"ready": 2, "held": 1})
    st, held = await call(h, "GET", "/api/v1/messages?state=held")
    assert [m["id"] for m in held["messages"]] == [target]
    # Resume: the two ready go, the held one stays.
    assert (await call(h, "DELETE", "/api/v1/suspensions?domain=held.test"))[0] == 200
    await sink.wait_for(3)
    await asyncio.sleep(0.3)
    assert len(sink.messages) == 3
    s = await wait_state(h, {"held": 1, "ready": 0, "in_delivery": 0})
    assert s["total"] == 1
    st, _ = await call(h, "POST", f"/api/v1/messages/{target}/release")
    assert st == 200
    await sink.wait_for(4)
    await drained(h)


async def test_hold_survives_a_restart(sinks, relay, tmp_path):
    """A held message stays held across a restart (the hold is in the spool, not only in memory)."""
    (sink,) = await sinks(1)
    h = await relay("Gateway = 127.0.0.2\n" + ADMIN)
    await call(h, "POST", "/api/v1/suspensions", json={"domain": "keep.test"})
    await send(h, ["x@keep.test"], body("keep"))
    (m,) = (await call(h, "GET", "/api/v1/messages"))[1]["messages"]
    assert (await call(h, "POST", f"/api/v1/messages/{m['id']}/hold"))[0] == 200
    await h.stop()
    await h.start()
    s = await wait_state(h, {"held": 1})
    assert s["total"] == 1
    await asyncio.sleep(0.3)
    assert sink.messages == []
    await call(h, "POST", f"/api/v1/messages/{m['id']}/release")
    await sink.wait_for(1)
    await drained(h)


async def test_delete_silently_and_with_dsn(sinks, relay):
    """"delete (silently, or with a DSN to the sender)"."""
    (sink,) = await sinks(1)
    h = await relay("Gateway = 127.0.0.2\n" + ADMIN)
    await call(h, "POST", "/api/v1/suspensions", json={"domain": "gone.test"})
    await send(h, ["a@gone.test"], body("quiet"), sender="q@example.com")
    await send(h, ["b@gone.test"], body("loud"), sender="l@example.com")
    msgs = {m["sender"]: m["id"] for m in (await call(h, "GET", "/api/v1/messages"))[1]["messages"]}
    st, r = await call(h, "DELETE", f"/api/v1/messages/{msgs['q@example.com']}")
    assert (st, r["result"]) == (200, "deleted")
    st, r = await call(h, "DELETE", f"/api/v1/messages/{msgs['l@example.com']}?dsn=true")
    assert (st, r["result"]) == (200, "bounced")
    # The DSN goes to l@example.com (via the gateway); nothing for the silent one.
    (dsn,) = await sink.wait_for(1)
    assert dsn.rcpt_tos == ["l@example.com"] and dsn.mail_from == "<>"
    assert b"Deleted by the administrator" in dsn.data
    await drained(h)
    p = records(h, "P")
    assert sorted(f[3] for f in p) == ["a@gone.test", "b@gone.test"]
    assert (await call(h, "GET", f"/api/v1/messages/{msgs['q@example.com']}"))[0] == 404


async def test_a_message_in_delivery_is_never_changed(sinks, relay):
    """"A state change on a message that is in flight is refused (409), so a message is never on
    two paths.\""""
    (sink,) = await sinks(1)
    sink.faults.slow_delay = 2.0
    h = await relay("Gateway = 127.0.0.2\n" + ADMIN)
    await send(h, ["slow@busy.test"], body("busy"))
    await wait_state(h, {"in_delivery": 1})
    (m,) = (await call(h, "GET", "/api/v1/messages?state=in_delivery"))[1]["messages"]
    for method, path in [("POST", "hold"), ("POST", "flush"), ("DELETE", "")]:
        st, err = await call(h, method, f"/api/v1/messages/{m['id']}/{path}".rstrip("/"))
        assert (st, err["error"]["code"]) == (409, "in_delivery"), (method, path, err)
    st, r = await call(h, "POST", "/api/v1/reroute", json={"from": "busy.test", "to": "x.test"})
    assert (st, r["moved"], r["in_delivery"]) == (200, 0, [m["id"]])
    await sink.wait_for(1)
    await drained(h)
    assert len(sink.messages) == 1


async def test_flush_retries_deferred_mail_now(sinks, relay):
    """"flush: retry now, for everything, a domain or one message"."""
    (sink,) = await sinks(1)
    h = await relay("Gateway = 127.0.0.2\nretry_interval = 1h\nmax_retry_interval = 2h\n" + ADMIN)
    sink.faults.set("rcpt", reply="451 4.3.0 try later", times=3)
    await send(h, ["a@f1.test"], body("f1"))
    await send(h, ["b@f2.test"], body("f2"))
    await send(h, ["c@f3.test"], body("f3"))
    await wait_state(h, {"deferred": 3})
    st, r = await call(h, "POST", "/api/v1/flush", json={"domain": "F1.test"})
    assert (st, r["flushed"]) == (200, 1)
    (m,) = await sink.wait_for(1)
    assert m.rcpt_tos == ["a@f1.test"]
    (f2,) = (await call(h, "GET", "/api/v1/messages?domain=f2.test"))[1]["messages"]
    assert (await call(h, "POST", f"/api/v1/messages/{f2['id']}/flush"))[0] == 200
    await sink.wait_for(2)
    assert (await call(h, "POST", "/api/v1/flush"))[1]["flushed"] == 1
    await sink.wait_for(3)
    await drained(h)


@pytest.mark.parametrize("target", [
    {"domain": "s.test"},
    {"binding": "default"},
    {"domain": "s.test", "binding": "default"},
])
async def test_suspend_with_expiry_then_delivered(sinks, relay, target):
    """"suspend and resume delivery per domain, binding or binding::domain, optionally with an
    expiry time"."""
    (sink,) = await sinks(1)
    h = await relay("Gateway = 127.0.0.2\n" + ADMIN)
    st, r = await call(h, "POST", "/api/v1/suspensions", json={**target, "for": "1s"})
    assert st == 200 and r["until"] is not None
    await send(h, ["x@s.test"], body("susp"))
    await asyncio.sleep(0.4)
    assert sink.messages == []
    assert len((await call(h, "GET", "/api/v1/suspensions"))[1]["suspensions"]) == 1
    await sink.wait_for(1)  # the suspension ran out
    assert (await call(h, "GET", "/api/v1/suspensions"))[1]["suspensions"] == []
    await drained(h)


async def test_reroute_queue_dry_run_then_for_real(sinks, relay):
    """"reroute the queue from domain A to B (Momentum's `reroute queue`, with `--dry-run`)"."""
    a, b = await sinks(2)
    h = await relay("Domain old.test { Gateway = 127.0.0.2 }\nDomain new.test { Gateway = 127.0.0.3 }\n" + ADMIN)
    await call(h, "POST", "/api/v1/suspensions", json={"domain": "old.test"})
    for i in range(2):
        await send(h, [f"u{i}@old.test"], body(f"rr{i}"))
    st, r = await call(h, "POST", "/api/v1/reroute", json={"from": "old.test", "to": "new.test", "dry_run": True})
    assert (st, r["would_move"], r["moved"]) == (200, 2, 0)
    (row,) = (await call(h, "GET", "/api/v1/queue/summary"))[1]["destinations"]
    assert row["domain"] == "old.test"
    st, r = await call(h, "POST", "/api/v1/reroute", json={"from": "old.test", "to": "new.test"})
    assert (st, r["moved"]) == (200, 2)
    got = await b.wait_for(2)
    assert sorted(m.rcpt_tos[0] for m in got) == ["u0@old.test", "u1@old.test"]
    await drained(h)
    assert a.messages == []


async def test_token_auth_and_audit_log(sinks, relay, caplog):
    """"an Admin_Token (or Admin_Token_File) bearer token"; "Every call that changes something is
    logged with its caller.\""""
    caplog.set_level(logging.INFO, logger="fastrelay.admin.audit")
    h = await relay('Admin_Listener {\n  Admin_Token = "s3cret"\n  Listen "127.0.0.1:0" { }\n}\n')
    assert (await call(h, "GET", "/api/v1/queue/summary"))[0] == 401
    assert (await call(h, "GET", "/api/v1/queue/summary", token="wrong"))[0] == 401
    assert (await call(h, "GET", "/api/v1/queue/summary", token="s3cret"))[0] == 200
    assert (await call(h, "GET", "/health"))[0] == 200  # probes carry no token
    st, _ = await call(h, "POST", "/api/v1/suspensions", token="s3cret", json={"domain": "a.test"})
    assert st == 200
    st, _ = await call(h, "POST", "/api/v1/flush", json={})
    assert st == 401
    st, log = await call(h, "GET", "/api/v1/audit", token="s3cret")
    assert [(e["method"], e["path"], e["auth"], e["status"], e["caller"]) for e in log["audit"]] == [
        ("POST", "/api/v1/suspensions", "token", 200, "127.0.0.1"),
        ("POST", "/api/v1/flush", "refused", 401, "127.0.0.1"),
    ]
    lines = [r.getMessage() for r in caplog.records if r.name == "fastrelay.admin.audit"]
    assert lines[0] == "admin POST /api/v1/suspensions by 127.0.0.1 (token): 200"


async def test_token_file(relay, tmp_path):
    (tmp_path / "relay").mkdir(exist_ok=True)
    (tmp_path / "relay" / "admin.token").write_text("from-file\n")
    h = await relay('Admin_Listener {\n  Admin_Token_File = "admin.token"\n  Listen "127.0.0.1:0" { }\n}\n')
    assert (await call(h, "GET", "/api/v1/suspensions"))[0] == 401
    assert (await call(h, "GET", "/api/v1/suspensions", token="from-file"))[0] == 200


BAD = [
    ("GET", "/api/v1/messages?state=frozen", None, 400),
    ("GET", "/api/v1/messages?limit=0", None, 400),
    ("GET", "/api/v1/messages?limit=abc", None, 400),
    ("GET", "/api/v1/messages?offset=-1", None, 400),
    ("GET", "/api/v1/messages?min_age=x", None, 400),
    ("GET", "/api/v1/messages?nonsense=1", None, 400),
    ("GET", "/api/v1/messages/999999", None, 404),
    ("GET", "/api/v1/messages/not-a-number", None, 404),
    ("GET", "/api/v1/messages/1?body=maybe", None, 400),
    ("POST", "/api/v1/messages/1/hold", None, 404),
    ("POST", "/api/v1/messages/1/release", None, 404),
    ("DELETE", "/api/v1/messages/1?dsn=yes", None, 400),
    ("POST", "/api/v1/suspensions", b"{not json", 400),
    ("POST", "/api/v1/suspensions", b"[1, 2]", 400),
    ("POST", "/api/v1/suspensions", b"", 400),
    ("POST", "/api/v1/suspensions", b'{"for": "1h"}', 400),
    ("POST", "/api/v1/suspensions", b'{"domain": "a.test", "for": "soon"}', 400),
    ("POST", "/api/v1/suspensions", b'{"domain": "a.test", "for": 0}', 400),
    ("POST", "/api/v1/suspensions", b'{"domain": "a.test", "for": true}', 400),
    ("POST", "/api/v1/reroute", b'{"from": "", "to": "b.test"}', 400),
    ("POST", "/api/v1/suspensions", b'{"domain": "a b"}', 400),
    ("POST", "/api/v1/suspensions", b'{"domain": 7}', 400),
    ("POST", "/api/v1/suspensions", b'{"domain": "a.test", "extra": 1}', 400),
    ("DELETE", "/api/v1/suspensions?domain=never.test", None, 404),
    ("POST", "/api/v1/reroute", b'{"from": "a.test"}', 400),
    ("POST", "/api/v1/reroute", b'{"from": "a.test", "to": "b.test", "dry_run": "yes"}', 400),
    ("POST", "/api/v1/flush", b'{"domain": ""}', 400),
    ("GET", "/api/v1/config/eval", None, 400),
    ("GET", "/api/v1/config/eval?option=no_such_option", None, 404),
    ("GET", "/api/v1/nowhere", None, 404),
    ("PUT", "/api/v1/queue/summary", None, 405),
    ("POST", "/api/v1/flush", b"x" * (1024 * 1024 + 10), 413),
]


@pytest.mark.parametrize(("method", "path", "data", "status"), BAD)
async def test_bad_input_gets_a_4xx_json_error(relay, method, path, data, status):
    """"Bad input gets a 4xx with a JSON error, never a 500 with a traceback.\""""
    h = await relay(ADMIN)
    st, err = await call(h, method, path, data=data,
                         **({"headers": {"Content-Type": "application/json"}} if data is not None else {}))
    assert st == status, err
    assert set(err) == {"error"} and err["error"]["code"] and err["error"]["message"]


async def test_config_eval_over_http(relay):
    """"the live config (`config eval` over HTTP)"."""
    h = await relay('Domain e.test { retry_interval = 7m }\nAdmin_Token = "t"\n' + ADMIN)
    st, r = await call(h, "GET", "/api/v1/config/eval?option=Retry_Interval&domain=e.test", token="t")
    conf = h.conf_path.read_text().splitlines()
    line = next(i for i, ln in enumerate(conf, 1) if "retry_interval = 7m" in ln)
    assert st == 200 and r["value"] == "7m" and r["origin"].endswith(f"relay.conf:{line}")
    st, r = await call(h, "GET", "/api/v1/config/eval?option=admin_token", token="t")
    assert r["value"] == "(secret)"


async def test_health_and_readiness(relay):
    """"health and readiness"."""
    h = await relay(ADMIN)
    assert await call(h, "GET", "/health") == (200, {"status": "ok"})
    st, r = await call(h, "GET", "/ready")
    assert st == 200 and r["ready"] is True and all(r["checks"].values())


async def test_malformed_http_gets_the_json_error_too(relay):
    """docs/reliability.md case 7 on the admin port: bytes that are not HTTP get a JSON 400, not a page."""
    h = await relay(ADMIN)
    port = h.relay.admin_servers[0].sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"EHLO example.com\r\n\r\n")
    await w.drain()
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400" and b"application/json" in head
    assert json.loads(payload)["error"]["code"] == "bad_request"


async def test_without_a_token_only_loopback_clients_are_served(relay):
    """"with no token configured, only loopback clients are served." The tests may only use
    loopback addresses, so the refusal is checked on the API's own request handling with a
    request whose peer is 192.0.2.7 (the HTTP server under test is not replaced)."""
    from aiohttp.test_utils import make_mocked_request

    h = await relay(ADMIN)
    api = h.relay.admin_servers[0].api
    transport = type("T", (), {"get_extra_info": lambda self, k, d=None: ("192.0.2.7", 4242) if k == "peername"
                               else d, "is_closing": lambda self: False})()
    req = make_mocked_request("GET", "/api/v1/queue/summary", app=api.app, transport=transport)
    match = await api.app.router.resolve(req)
    req._match_info = match
    resp = await api._middleware(req, match.handler)
    assert resp.status == 403 and json.loads(resp.body)["error"]["code"] == "forbidden"
