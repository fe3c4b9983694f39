"""Issue 17, outbound: AUTH PLAIN, LOGIN and XOAUTH2 to a next hop that requires it (an aiosmtpd sink
with AUTH), Momentum's outbound_smtp_auth_* options in their scopes, and failures as deferrals."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time

import pytest
from aiosmtpd.smtp import AuthResult

from fastrelay.config import loads
from fastrelay.delivery import OK, TEMP, Hop, Settings
from fastrelay.delivery.auth import OutboundAuth, outbound_auth
from fastrelay.delivery.connect import connect
from fastrelay.queue import delivery_settings
from tests.support import Sink, tls_pair
from tests.support.relay import RelayHarness
from tests.support.sink import _FaultySMTP, _Handler

USERS = {"relay-user": "relay-pass", "other": "other-pass"}
TOKENS = {"oauth-user@example.com": "ya29.token"}
FAST = Settings(helo_name="relay.test", connect_timeout=2, greeting_timeout=2, ehlo_timeout=2, tls_timeout=5,
                mail_timeout=2, rcpt_timeout=2, data_timeout=2, done_timeout=2, rset_timeout=2)
BODY = b"Subject: hello\r\n\r\nline one\r\n"


class _AuthHandler(_Handler):
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        lines = await super().handle_EHLO(server, session, envelope, hostname, responses)
        if len(lines) > 1 and (not server._auth_require_tls or server._tls_protocol):
            lines.insert(-1, "250-AUTH " + " ".join(sorted(server._auth_methods)))
        return lines

    async def auth_XOAUTH2(self, server, args):
        """Google's XOAUTH2: user=U^Aauth=Bearer T^A^A; a bad token gets a 334 with a JSON error."""
        raw = base64.b64decode(args[1]) if len(args) > 1 else b""
        fields = dict(f.split("=", 1) for f in raw.decode().split("\x01") if "=" in f)
        user, token = fields.get("user", ""), fields.get("auth", "").removeprefix("Bearer ")
        self.sink.logins.append(("XOAUTH2", user))
        if TOKENS.get(user) == token:
            return AuthResult(success=True, auth_data=user)
        await server.challenge_auth(json.dumps({"status": "401", "schemes": "bearer"}))
        return AuthResult(success=False, handled=False)


class AuthSink(Sink):
    """A sink that requires AUTH before MAIL (aiosmtpd's auth_required), under TLS unless told."""

    def __init__(self, *a, require_tls: bool = True, exclude: tuple = (), **kw):
        super().__init__(*a, **kw)
        self.require_tls = require_tls
        self.exclude = exclude
        self.logins: list[tuple[str, str]] = []

    def _check(self, server, session, envelope, mechanism, data):
        self.logins.append((mechanism, data.login.decode()))
        return AuthResult(success=USERS.get(data.login.decode()) == data.password.decode(), handled=False)

    def _make_protocol(self):
        proto = _FaultySMTP(
            self, _AuthHandler(self), hostname=self.hostname, ident="fastrelay-test-auth-sink",
            tls_context=self.tls_context, data_size_limit=self.data_size_limit, decode_data=False,
            timeout=self.idle_timeout, loop=asyncio.get_running_loop(),
            authenticator=self._check, auth_required=True, auth_require_tls=self.require_tls,
            auth_exclude_mechanism=list(self.exclude),
        )
        self._protocols.add(proto)
        return proto


@pytest.fixture(scope="module")
def tls():
    return tls_pair()


async def deliver(sink: Sink, auth: OutboundAuth | None, **kw):
    s = dataclasses.replace(FAST, auth=auth, **kw)
    conn = await connect(Hop(sink.host, sink.port, "smtp", "sink.test", 10), s)
    try:
        return await conn.deliver("s@src.test", "", [("r@dst.test", "")], BODY), conn
    finally:
        await conn.close()


@pytest.mark.parametrize(("mech", "user", "pw", "sent_as"), [
    ("PLAIN", "relay-user", "relay-pass", "PLAIN"),
    ("LOGIN", "relay-user", "relay-pass", "LOGIN"),
    (None, "relay-user", "relay-pass", "PLAIN"),  # unset type: PLAIN when offered
    ("XOAUTH2", "oauth-user@example.com", "ya29.token", "XOAUTH2"),
])
async def test_auth_mechanisms_deliver(tls, mech, user, pw, sent_as):
    """"outbound_smtp_auth_type (PLAIN, LOGIN, XOAUTH2)", sent only under TLS."""
    async with AuthSink(tls_context=tls.server) as sink:
        [res], conn = await deliver(sink, OutboundAuth(user, pw, mech))
        assert res.status == OK, res
        assert conn.tls and sink.logins == [(sent_as, user)] and len(sink.messages) == 1


@pytest.mark.parametrize(("auth", "sink_kw", "expect"), [
    # wrong password: the peer's reason is the result's text
    (OutboundAuth("relay-user", "wrong", "PLAIN"), {}, "failed: 535 5.7.8 Authentication credentials invalid"),
    (OutboundAuth("relay-user", "wrong", "LOGIN"), {}, "failed: 535 5.7.8 Authentication credentials invalid"),
    (OutboundAuth("oauth-user@example.com", "expired", "XOAUTH2"), {}, "failed: 535 5.7.8"),
    # the mechanism asked for is not offered
    (OutboundAuth("relay-user", "relay-pass", "LOGIN"), {"exclude": ("LOGIN",)}, "does not offer AUTH LOGIN"),
    # no TLS: the credentials are not sent (the sink offers AUTH in plaintext here)
    (OutboundAuth("relay-user", "relay-pass", "PLAIN"), {"require_tls": False, "tls_context": None},
     "sent only under TLS"),
    (OutboundAuth("relay-user", "", "PLAIN", error="4.3.5 Cannot read outbound_smtp_auth_pass_file x: gone"), {},
     "4.3.5 Cannot read"),
])
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_auth_failures_are_temporary_with_the_reason(tls, auth, sink_kw, expect):
    """"An authentication failure is a temporary failure with the peer's reason"."""
    kw = {"tls_context": tls.server, **sink_kw}
    async with AuthSink(**kw) as sink:
        [res], _ = await deliver(sink, auth)
        assert res.status == TEMP and expect in res.text, res
        assert sink.messages == []
        if "TLS" in expect or "Cannot read" in expect:
            assert not any(c.startswith("AUTH") for s in sink.sessions for c in s.commands)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_plaintext_auth_only_when_allowed():
    async with AuthSink(require_tls=False) as sink:
        [res], conn = await deliver(sink, OutboundAuth("relay-user", "relay-pass", "PLAIN", allow_plaintext=True),
                                    tls="disabled")
        assert res.status == OK and not conn.tls and len(sink.messages) == 1


async def test_one_auth_per_session_after_a_failure(tls):
    """A failed session answers each further message with the failure, without another AUTH."""
    async with AuthSink(tls_context=tls.server) as sink:
        s = dataclasses.replace(FAST, auth=OutboundAuth("relay-user", "wrong", "PLAIN"))
        conn = await connect(Hop(sink.host, sink.port, "smtp", "sink.test", 10), s)
        try:
            for _ in range(3):
                [res] = await conn.deliver("s@src.test", "", [("r@dst.test", "")], BODY)
                assert res.status == TEMP and "535" in res.text
        finally:
            await conn.close()
        assert len(sink.logins) == 1 and sink.messages == []


# --- options and scopes -------------------------------------------------------------------------------


def test_options_in_binding_group_binding_domain_and_global_scope(tmp_path):
    """"in binding_group, binding, domain and global scope, as Momentum documents them", and
    "A password can also come from a file (outbound_smtp_auth_pass_file)"."""
    (tmp_path / "secret").write_text("from-file\n")
    cfg = loads('''
outbound_smtp_auth_user = "global-user"
outbound_smtp_auth_pass = "global-pass"
Domain "d.test" { Outbound_SMTP_AUTH_Type = "LOGIN"  Outbound_SMTP_AUTH_user = "domain-user" }
Domain "f.test" { outbound_smtp_auth_pass_file = "secret" }
Binding_Group "g" {
  outbound_smtp_auth_user = "group-user"
  Binding "b" { outbound_smtp_auth_type = "XOAUTH2" }
  Binding "c" { outbound_smtp_auth_user = "binding-user"  outbound_smtp_auth_pass = "binding-pass" }
}
''', str(tmp_path / "x.conf"))

    def a(domain, binding="default"):
        r = outbound_auth(cfg, domain, binding)
        return (r.user, r.password, r.mech, r.error)

    assert a("x.test") == ("global-user", "global-pass", None, None)
    assert a("d.test") == ("domain-user", "global-pass", "LOGIN", None)
    assert a("f.test") == ("global-user", "from-file", None, None)
    assert a("x.test", "b") == ("group-user", "global-pass", "XOAUTH2", None)
    assert a("d.test", "b") == ("group-user", "global-pass", "XOAUTH2", None)  # binding before domain
    assert a("x.test", "c") == ("binding-user", "binding-pass", None, None)
    assert outbound_auth(loads(""), "x.test", "default") is None
    missing = outbound_auth(loads('outbound_smtp_auth_user = "u"\noutbound_smtp_auth_pass_file = "/nonexistent/pw"\n'),
                            "x.test", "default")
    assert missing.error.startswith("4.3.5 Cannot read outbound_smtp_auth_pass_file /nonexistent/pw")
    # The password never shows in a repr (logs, tracebacks).
    s = delivery_settings(cfg, "x.test", "c", "relay.test")
    assert "binding-pass" not in repr(s) and "binding-user" in repr(s)


# --- through the relay: mainlog, and the host stays up for other credentials ------------------------------


async def test_relay_defers_on_auth_failure_and_keeps_the_host_for_other_credentials(tmp_path, tls):
    """"An authentication failure is a temporary failure with the peer's reason in the mainlog, and
    the host is not marked down for other credentials"."""
    async with AuthSink(tls_context=tls.server) as sink:
        (tmp_path / "pw").write_text("relay-pass\n")
        route = f'Routes = ( "smtp://127.0.0.2?port={sink.port}" )'
        conf = (f'Prohibited_Hosts = ( "0.0.0.0/8" )\nretry_interval = 60\nhost_failure_retry = 600\n'
                f'Domain bad.test {{ {route}\n outbound_smtp_auth_user = "relay-user"\n'
                f' outbound_smtp_auth_pass = "wrong" }}\n'
                f'Domain good.test {{ {route}\n outbound_smtp_auth_user = "relay-user"\n'
                f' outbound_smtp_auth_pass_file = "pw" }}\n')
        async with RelayHarness(tmp_path, conf) as h:
            import aiosmtplib

            c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port)
            await c.connect()
            await c.sendmail("a@example.com", ["u@bad.test"], BODY)

            def recs(kind):
                return [f for f in h.mainlog() if f[1] == kind]

            end = time.monotonic() + 20
            while not recs("T") and time.monotonic() < end:
                await asyncio.sleep(0.05)
            [t] = recs("T")
            assert t[3] == "u@bad.test" and "535 5.7.8 Authentication credentials invalid" in t[-1]
            assert "wrong" not in "\n".join("\t".join(f) for f in h.mainlog())
            # The same host, other credentials: delivered at once (host_failure_retry would be 10 min).
            await c.sendmail("a@example.com", ["u@good.test"], BODY)
            await c.quit()
            while not recs("D") and time.monotonic() < end:
                await asyncio.sleep(0.05)
            [d] = recs("D")
            assert d[3] == "u@good.test"
        assert [m.rcpt_tos for m in sink.messages] == [["u@good.test"]]
        assert ("PLAIN", "relay-user") in sink.logins
