"""Issue 17, inbound: SMTP AUTH PLAIN and LOGIN (RFC 4954) under STARTTLS and implicit TLS (RFC 8314),
with swaks, smtplib and a raw client; relay for authenticated users; the failure delay and lockout."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import smtplib
import ssl
import subprocess
import time

import pytest
import trustme

from fastrelay.cli import main as cli_main
from fastrelay.relay import StartupError
from fastrelay.smtp import replies as R
from fastrelay.smtp.auth import PasswordFile
from tests.support import RawClient
from tests.support.relay import RelayHarness

USER, PASSWORD = "alice@example.com", "c0rrect-Horse:battery"
MSG = b"From: alice@example.com\r\nTo: bob@far.example\r\nSubject: hi\r\n\r\nhello\r\n"
PLAIN_OK = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
PLAIN_BAD = base64.b64encode(f"\0{USER}\0wrong-password".encode()).decode()


def wire(reply: R.Reply) -> tuple[int, list[str]]:
    return reply.code, [f"{reply.esc} {reply.text}".strip()]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def auth_conf(extra: str = "") -> str:
    # 127.0.0.1 is outside relay_hosts: only AUTH lets it relay.
    return (
        'suspend_delivery = 1\nrelay_hosts = ( "10.99.0.0/16" )\n'
        'TLS_Certificate = "relay.pem"\nTLS_Key = "relay.pem"\n'
        'Enable_Authentication = true\nAuthPlainParameters = "file://passwd"\n'
        'AuthLoginParameters = "file:passwd"\nauth_failure_delay = 0\n'
        + extra
        + 'ESMTP_Listener {\n  Listen "127.0.0.1:0" { }\n  Listen "127.0.0.1:0" { Use_SSL = true }\n}\n'
    )


def write_files(tmp_path, ca) -> None:
    ca.issue_cert("relay.test", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
    pf = PasswordFile(str(tmp_path / "passwd"))
    pf.set(USER, PASSWORD)


@pytest.fixture
def client_ctx(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
async def relay(tmp_path, ca):
    write_files(tmp_path, ca)
    h = RelayHarness(tmp_path, auth_conf())
    await h.start()
    yield h
    await h.stop()


def ports(h: RelayHarness) -> tuple[int, int]:
    """(STARTTLS port, implicit-TLS port)."""
    s = h.relay.smtp_servers
    return s[0].sockets[0].getsockname()[1], s[1].sockets[0].getsockname()[1]


async def tls_client(h, ctx, implicit: bool = False, local: str | None = None) -> RawClient:
    starttls, smtps = ports(h)
    la = (local, 0) if local else None
    if implicit:
        c = await RawClient.connect("127.0.0.1", smtps, ssl_context=ctx, server_hostname="relay.test", local_addr=la)
        await c.expect(220)
    else:
        c = await RawClient.connect("127.0.0.1", starttls, local_addr=la)
        await c.expect(220)
        await c.command("EHLO client.test")
        assert (await c.command("STARTTLS"))[0] == 220
        await c.starttls(ctx, server_hostname="relay.test")
    assert (await c.command("EHLO client.test"))[0] == 250
    return c


# --- offering AUTH ---------------------------------------------------------------------------------


async def test_auth_offered_only_under_tls(relay, client_ctx):
    """"AUTH PLAIN and LOGIN (RFC 4954) only under TLS (STARTTLS or implicit TLS)"."""
    starttls, _ = ports(relay)
    async with await RawClient.connect("127.0.0.1", starttls) as c:
        await c.expect(220)
        _, lines = await c.command("EHLO client.test")
        assert "STARTTLS" in lines and not any(ln.startswith("AUTH") for ln in lines)
        assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_NEEDS_TLS)
    for implicit in (False, True):
        c = await tls_client(relay, client_ctx, implicit)
        async with c:
            _, lines = await c.command("EHLO client.test")
            assert "AUTH PLAIN LOGIN" in lines and "STARTTLS" not in lines


async def test_plaintext_auth_on_loopback_only_when_the_listener_allows_it(tmp_path, ca):
    """"... unless a listener explicitly allows plaintext on loopback"."""
    write_files(tmp_path, ca)
    async with RelayHarness(tmp_path, auth_conf("auth_plaintext_loopback = true\n")) as h:
        async with await RawClient.connect("127.0.0.1", ports(h)[0]) as c:
            await c.expect(220)
            assert "AUTH PLAIN LOGIN" in (await c.command("EHLO client.test"))[1]
            assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_OK)
            assert (await c.command("MAIL FROM:<alice@example.com>"))[0] == 250
            assert (await c.command("RCPT TO:<bob@far.example>"))[0] == 250
        async with await RawClient.connect("127.0.0.1", ports(h)[0], local_addr=("127.0.0.7", 0)) as c:
            await c.expect(220)  # 127.0.0.7 is loopback too; a non-loopback source cannot be tested here
            assert "AUTH PLAIN LOGIN" in (await c.command("EHLO client.test"))[1]
    async with RelayHarness(tmp_path, auth_conf()) as h:
        async with await RawClient.connect("127.0.0.1", ports(h)[0]) as c:
            await c.expect(220)
            assert not any(ln.startswith("AUTH") for ln in (await c.command("EHLO client.test"))[1])
            assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_NEEDS_TLS)


# --- swaks and smtplib ----------------------------------------------------------------------------


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("tls_flag", ["--tls", "--tlsc"])
async def test_swaks_auth_relays_and_records_the_user(relay, mech, tls_flag):
    """swaks `--auth PLAIN` and `--auth LOGIN` over STARTTLS (--tls) and over implicit TLS (--tlsc):
    "An authenticated client may relay whatever its address", "The user is recorded in the spool,
    the mainlog and the Received header ("with ESMTPSA", RFC 3848)"."""
    assert shutil.which("swaks"), "swaks is needed (apt-get install swaks; .ci/peers installs it)"
    starttls, smtps = ports(relay)
    port = smtps if tls_flag == "--tlsc" else starttls
    cmd = ["swaks", "--server", f"127.0.0.1:{port}", "--ehlo", "client.test", "--from", "alice@example.com",
           "--to", "bob@far.example", tls_flag, "--auth", mech, "--auth-user", USER, "--auth-password", PASSWORD,
           "--timeout", "20"]
    r = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "235 2.7.0 Authentication successful" in r.stdout
    log = relay.mainlog()
    await relay.stop()
    [(env, body)] = await relay.spooled()
    assert env.meta["auth_user"] == USER and env.protocol == "esmtpsa"
    assert [r.address for r in env.recipients] == ["bob@far.example"]
    assert b"by relay.test (fastrelay) with ESMTPSA id " in body.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")
    [rec] = [f for f in log if f[1] == "R"]
    assert rec[3] == "bob@far.example" and rec[7] == "esmtpsa" and rec[9] == USER


async def test_smtplib_login_starttls_and_smtp_ssl(relay, client_ctx):
    """smtplib `login()` (it picks PLAIN here), over STARTTLS and over SMTP_SSL."""
    starttls, smtps = ports(relay)

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", starttls, timeout=20) as s:
            s.starttls(context=client_ctx)
            s.ehlo("client.test")
            assert s.login(USER, PASSWORD)[0] == 235
            assert s.sendmail("alice@example.com", ["bob@far.example"], MSG) == {}
        with smtplib.SMTP_SSL("127.0.0.1", smtps, context=client_ctx, timeout=20) as s:
            s.ehlo("client.test")
            s.user, s.password = USER, PASSWORD
            assert s.auth("LOGIN", s.auth_login)[0] == 235
            assert s.sendmail("alice@example.com", ["carol@far.example"], MSG) == {}

    await asyncio.to_thread(send)
    await relay.stop()
    spooled = await relay.spooled()
    assert sorted(e.recipients[0].address for e, _ in spooled) == ["bob@far.example", "carol@far.example"]
    assert all(e.meta["auth_user"] == USER for e, _ in spooled)


async def test_outside_relay_hosts_refused_without_auth_and_allowed_with_it(relay, client_ctx):
    """"A source outside relay_hosts is refused relay without AUTH and allowed with it"."""
    async with await tls_client(relay, client_ctx) as c:
        assert (await c.command("MAIL FROM:<alice@example.com>"))[0] == 250
        assert await c.command("RCPT TO:<bob@far.example>") == wire(R.RELAY_DENIED)
        assert (await c.command("RSET"))[0] == 250
        assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_OK)
        # RFC 4954 §5: AUTH= on MAIL is taken when AUTH is offered.
        assert (await c.command("MAIL FROM:<alice@example.com> AUTH=<>"))[0] == 250
        assert (await c.command("RCPT TO:<bob@far.example>"))[0] == 250
    async with await tls_client(relay, client_ctx, implicit=True) as c:
        assert (await c.command("MAIL FROM:<alice@example.com>"))[0] == 250
        assert await c.command("RCPT TO:<bob@far.example>") == wire(R.RELAY_DENIED)


# --- the exchange ------------------------------------------------------------------------------------


LOGIN_STEPS = [
    # (commands, expected final reply): each row one AUTH exchange an operator's clients write.
    (["AUTH PLAIN", PLAIN_OK], R.AUTH_OK),  # no initial response: 334, then the response
    (["AUTH plain " + PLAIN_OK], R.AUTH_OK),  # mechanism names are case-insensitive
    (["AUTH LOGIN", b64(USER), b64(PASSWORD)], R.AUTH_OK),
    (["AUTH LOGIN " + b64(USER), b64(PASSWORD)], R.AUTH_OK),  # user as initial response
    (["AUTH PLAIN " + base64.b64encode(f"{USER}\0{USER}\0{PASSWORD}".encode()).decode()], R.AUTH_OK),
    (["AUTH PLAIN " + base64.b64encode(f"bob\0{USER}\0{PASSWORD}".encode()).decode()], R.AUTH_FAILED),
    (["AUTH PLAIN " + PLAIN_BAD], R.AUTH_FAILED),
    (["AUTH LOGIN", b64(USER), b64("nope")], R.AUTH_FAILED),
    (["AUTH LOGIN", b64("nobody"), b64(PASSWORD)], R.AUTH_FAILED),
    (["AUTH PLAIN", "*"], R.AUTH_CANCELLED),
    (["AUTH LOGIN", b64(USER), "*"], R.AUTH_CANCELLED),
    (["AUTH PLAIN not-base64!"], R.AUTH_BAD_BASE64),
    (["AUTH PLAIN ="], R.AUTH_FAILED),  # "=" is the empty response: no credentials
    (["AUTH CRAM-MD5"], R.AUTH_UNKNOWN_MECHANISM),
    (["AUTH"], R.SYNTAX),
    (["AUTH PLAIN a b"], R.SYNTAX),
]


@pytest.mark.parametrize(("steps", "final"), LOGIN_STEPS, ids=range(len(LOGIN_STEPS)))
async def test_auth_exchanges(relay, client_ctx, steps, final):
    async with await tls_client(relay, client_ctx) as c:
        for line in steps[:-1]:
            assert (await c.command(line))[0] == 334
        assert await c.command(steps[-1]) == wire(final)
        # The session goes on either way; only a success lets it relay.
        assert (await c.command("MAIL FROM:<alice@example.com>"))[0] == 250
        code, _ = await c.command("RCPT TO:<bob@far.example>")
        assert code == (250 if final is R.AUTH_OK else 554)


async def test_auth_sequence_errors(relay, client_ctx):
    async with await tls_client(relay, client_ctx) as c:
        assert (await c.command("MAIL FROM:<alice@example.com>"))[0] == 250
        assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_IN_TRANSACTION)
        assert (await c.command("RSET"))[0] == 250
        assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_OK)
        assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_ALREADY)
    async with await tls_client(relay, client_ctx, implicit=True) as c:
        assert (await c.command("HELO client.test"))[0] == 250
        assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_NEEDS_EHLO)


async def test_password_file_is_reread_when_it_changes(relay, client_ctx, tmp_path):
    PasswordFile(str(tmp_path / "passwd")).load().set("dave", "pw-of-dave")
    async with await tls_client(relay, client_ctx) as c:
        assert await c.command("AUTH PLAIN " + b64("\0dave\0pw-of-dave")) == wire(R.AUTH_OK)


# --- abuse ---------------------------------------------------------------------------------------------


async def test_wrong_passwords_get_a_growing_delay_then_a_lockout(tmp_path, ca, client_ctx):
    """"failed attempts get 535 5.7.8 and a growing delay, and a source with too many failures is
    locked out for a while (named limits)"; "Wrong passwords hit the delay and the lockout"."""
    write_files(tmp_path, ca)
    conf = auth_conf("auth_failure_delay = 200ms\nauth_max_failures = 3\nauth_lockout_time = 2s\n")
    async with RelayHarness(tmp_path, conf) as h:
        async with await tls_client(h, client_ctx) as c:
            waits = []
            for _ in range(3):
                t0 = time.monotonic()
                assert await c.command("AUTH PLAIN " + PLAIN_BAD, timeout=10) == wire(R.AUTH_FAILED)
                waits.append(time.monotonic() - t0)
            # 0.2 s, then 0.4 s, then 0.8 s (lower bounds only: the machine may be slow, not fast).
            assert waits[0] >= 0.2 and waits[1] >= 0.4 and waits[2] >= 0.8
            # Locked out: even the right password is not checked.
            assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_LOCKED_OUT)
        async with await tls_client(h, client_ctx) as c:  # a new connection from the same address
            assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_LOCKED_OUT)
        async with await tls_client(h, client_ctx, implicit=True) as c:  # the relay's other listener
            assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_LOCKED_OUT)
        async with await tls_client(h, client_ctx, local="127.0.0.7") as c:
            # Another source address is not locked out.
            assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_OK)
        await asyncio.sleep(2.2)  # auth_lockout_time after the last failure
        async with await tls_client(h, client_ctx) as c:
            assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_OK)


async def test_credentials_never_reach_a_log(relay, client_ctx, caplog, tmp_path):
    """"The AUTH line and the credentials never reach a log"."""
    caplog.set_level(logging.DEBUG)
    async with await tls_client(relay, client_ctx) as c:
        assert (await c.command("AUTH LOGIN " + b64("typed-password-as-user")))[0] == 334
        assert await c.command(b64("x")) == wire(R.AUTH_FAILED)
        assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_OK)
        assert (await c.command("MAIL FROM:<alice@example.com>"))[0] == 250
        assert (await c.command("RCPT TO:<bob@far.example>"))[0] == 250
        assert (await c.command("DATA"))[0] == 354
        assert (await c.command(MSG.decode() + "."))[0] == 250
    mainlog = "\n".join("\t".join(f) for f in relay.mainlog())
    await relay.stop()
    [(env, body)] = await relay.spooled()
    seen = caplog.text + mainlog + repr(env.to_json()) + body.decode()
    assert "AUTH" in caplog.text  # the events are logged...
    for secret in (PASSWORD, PLAIN_OK, b64(PASSWORD), "typed-password-as-user", b64("typed-password-as-user")):
        assert secret not in seen  # ...the credentials are not


# --- conf and start ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("conf", "error"), [
    ('Enable_Authentication = true\n', "neither AuthPlainParameters nor AuthLoginParameters"),
    ('Enable_Authentication = true\nAuthPlainParameters = "file:///nonexistent/passwd"\n', "/nonexistent/passwd"),
    ('ESMTP_Listener {\n Listen "127.0.0.1:0" { Use_SSL = true }\n}\n', "Use_SSL needs TLS_Certificate"),
])
async def test_settings_that_cannot_work_stop_the_start(tmp_path, conf, error):
    h = RelayHarness(tmp_path, "suspend_delivery = 1\n" + conf)
    with pytest.raises(StartupError, match=error):
        await h.start()
    await h.relay.stop()
    h.relay = None


@pytest.mark.parametrize(("value", "error"), [
    ('"mysqlauth://"', "'mysqlauth://' is a Momentum authentication backend (auth_ds); fastrelay reads "
                       "password files only: expected a file:// uri"),
    ('( "a" "b" )', "bad value for 'AuthPlainParameters': got a list"),
    ('""', "bad value for 'AuthPlainParameters': got ''; expected a password file"),
])
def test_bad_auth_parameters_are_conf_errors(tmp_path, value, error, capsys):
    p = tmp_path / "f.conf"
    p.write_text(f"\nAuthPlainParameters = {value}\n")
    assert cli_main(["check-config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{p}:2:") and error in err, err


def test_bad_password_file_lines_are_reported_with_file_and_line(tmp_path, capsys):
    p = tmp_path / "passwd"
    p.write_text(f"# users\n{USER}:plaintext\n")
    assert cli_main(["passwd", "list", "-f", str(p)]) == 2
    assert f"{p}:2: user {USER}: expected a $scrypt$ hash" in capsys.readouterr().err


def test_passwd_command_add_list_remove(tmp_path, monkeypatch, capsys):
    """"A `fastrelay passwd add|remove|list USER -f FILE` command manages it"."""
    import io

    p = str(tmp_path / "passwd")
    for user, pw in (("alice", "pw-a"), ("bob", "pw-b"), ("alice", "pw-a2")):
        monkeypatch.setattr("sys.stdin", io.StringIO(pw + "\n"))
        assert cli_main(["passwd", "add", user, "-f", p]) == 0
    assert os.stat(p).st_mode & 0o777 == 0o600
    text = open(p).read()
    assert "pw-a" not in text and text.count("$scrypt$") == 2
    pf = PasswordFile(p).load()
    assert pf.verify("alice", "pw-a2") and not pf.verify("alice", "pw-a") and pf.verify("bob", "pw-b")
    capsys.readouterr()
    assert cli_main(["passwd", "list", "-f", p]) == 0
    assert capsys.readouterr().out.split() == ["alice", "bob"]
    assert cli_main(["passwd", "remove", "bob", "-f", p]) == 0
    assert cli_main(["passwd", "remove", "bob", "-f", p]) == 1
    assert cli_main(["passwd", "add", "bad:name", "-f", p]) == 2
    assert PasswordFile(p).load().users.keys() == {"alice"}


async def test_binding_assignment_by_authenticated_user(tmp_path, ca, client_ctx):
    """"Binding assignment by authenticated user is a conf table"."""
    write_files(tmp_path, ca)
    PasswordFile(str(tmp_path / "passwd")).load().set("carol", "pw-carol")
    conf = auth_conf(f'auth_user_bindings = ( "{USER}=marketing" "dave=other" )\nrelay_domains = ( "local.test" )\n')
    async with RelayHarness(tmp_path, conf) as h:
        for creds, rcpt in (((USER, PASSWORD), "m1@far.example"), (("carol", "pw-carol"), "m2@far.example"),
                            (None, "m3@local.test")):
            async with await tls_client(h, client_ctx) as c:
                if creds:
                    assert await c.command("AUTH PLAIN " + b64(f"\0{creds[0]}\0{creds[1]}")) == wire(R.AUTH_OK)
                assert (await c.command("MAIL FROM:<alice@example.com>"))[0] == 250
                assert (await c.command(f"RCPT TO:<{rcpt}>"))[0] == 250
                assert (await c.command("DATA"))[0] == 354
                assert (await c.command(MSG.decode() + "."))[0] == 250
        log = h.mainlog()
    got = sorted((f[3], f[8], f[9]) for f in log if f[1] == "R")
    assert got == [("m1@far.example", "marketing", USER), ("m2@far.example", "default", "carol"),
                   ("m3@local.test", "default", "")]


@pytest.mark.parametrize(("value", "ok"), [
    ('( "alice@example.com=marketing" "bob=b2" )', {"alice@example.com": "marketing", "bob": "b2"}),
    ('"bob=b2"', {"bob": "b2"}),
    ('( "no-binding" )', None),
    ('( "=b" )', None),
    ('( "bob=a b" )', None),
])
def test_auth_user_bindings_values(value, ok, tmp_path):
    from fastrelay.config import ConfigErrors, loads

    if ok is None:
        with pytest.raises(ConfigErrors, match="auth_user_bindings"):
            loads(f"auth_user_bindings = {value}\n")
    else:
        assert loads(f"auth_user_bindings = {value}\n").get("auth_user_bindings") == ok


def test_guard_delay_doubles_is_capped_and_failures_are_forgiven():
    from fastrelay.smtp.auth import AuthGuard

    g = AuthGuard(max_failures=6, lockout=100.0, delay=1.0, max_delay=4.0)
    assert [g.failed("192.0.2.1", now=float(i)) for i in range(5)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert not g.locked("192.0.2.1", now=5.0) and not g.locked("192.0.2.2", now=5.0)
    g.failed("192.0.2.1", now=5.0)
    assert g.locked("192.0.2.1", now=104.9) and not g.locked("192.0.2.1", now=105.1)
    assert g.failed("192.0.2.1", now=106.0) == 1.0  # counted afresh after the lockout time
    g.succeeded("192.0.2.1")
    assert g.failed("192.0.2.1", now=107.0) == 1.0


@pytest.mark.parametrize(("sender", "ok"), [
    ("alice@example.com", True),
    ("Alice@EXAMPLE.NET", True),  # domains compare case-insensitively
    ("alice@other.test", False),
    ("alice@sub.example.com", False),  # a domain, not its subdomains
    ("", True),  # <>: bounces are always allowed
])
async def test_authenticated_user_limited_to_its_sender_domains(tmp_path, ca, client_ctx, sender, ok):
    """"A per-user list of allowed sender domains is optional" (Postfix reject_sender_login_mismatch)."""
    write_files(tmp_path, ca)
    conf = auth_conf(f'auth_sender_domains = ( "{USER}=example.com,example.net" "carol=carol.test" )\n')
    async with RelayHarness(tmp_path, conf) as h, await tls_client(h, client_ctx) as c:
        assert await c.command("AUTH PLAIN " + PLAIN_OK) == wire(R.AUTH_OK)
        reply = await c.command(f"MAIL FROM:<{sender}>")
        assert reply[0] == 250 if ok else reply == wire(R.AUTH_SENDER_NOT_OWNED)


@pytest.mark.parametrize(("value", "ok"), [
    ('( "alice=example.com,Example.NET." )', {"alice": frozenset({"example.com", "example.net"})}),
    ('( "alice=" )', None),
    ('( "alice=exa mple.com" )', None),
    ('( "example.com" )', None),
])
def test_auth_sender_domains_values(value, ok):
    from fastrelay.config import ConfigErrors, loads

    if ok is None:
        with pytest.raises(ConfigErrors, match="auth_sender_domains"):
            loads(f"auth_sender_domains = {value}\n")
    else:
        assert loads(f"auth_sender_domains = {value}\n").get("auth_sender_domains") == ok
