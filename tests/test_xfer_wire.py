"""The XFER wire format (fastrelay.xfer.wire): round trips, every validation failure, HMAC signatures.

docs/reliability.md cases 22/26 (control bytes), 32 (authentication, replay), 35 (loop guard), 36 (the
idempotency key), 37 (malformed payloads). Sans-I/O: bytes in, values out, no sockets here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrelay.message import DELIVERED, Envelope, Recipient
from fastrelay.xfer import wire
from fastrelay.xfer.wire import NonceCache, WireError

NOW = 1_700_000_000.0
BODY = b"Received: from x\r\nSubject: t\r\n\r\nline\r\n.\r\n..dot\r\nNUL\x00 8bit \xe9\xff\r\n"


def envelope(**kw: Any) -> Envelope:
    base: dict[str, Any] = dict(
        sender="s@src.test",
        recipients=[Recipient("a@dst.test", "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@dst.test"),
                    Recipient("b@dst.test"), Recipient("c@dst.test", state=DELIVERED)],
        domain="xfer.test",
        mail_params="SIZE=1234 BODY=8BITMIME",
        client_ip="192.0.2.7",
        helo="client.example",
        protocol="esmtp",
        binding="pool-a",
        msgid="17.aaaaaaaaaaaaaaaa",
        received_at=NOW - 100,
        first_queued=NOW - 90,
        attempts=3,
        next_attempt=NOW - 5,
        meta={"rerouted_from": "dst.test", "delayed_rerouted": True, "xfer_path": ["n0"], "tag": {"k": [1, "v"]}},
    )
    base.update(kw)
    return Envelope(**base)


def encoded(env: Envelope | None = None, idx=(0, 1), body: bytes = BODY, key=("node-a", "17"), teleport=False):
    return wire.encode_request(env or envelope(), list(idx), body, key, teleport=teleport)


def valid_doc() -> dict:
    payload, n = encoded()
    return json.loads(payload[:n])


def decode_doc(doc: Any, body: bytes = b"x") -> wire.Transfer:
    head = json.dumps(doc, separators=(",", ":")).encode()
    return wire.decode_request(head + body, str(len(head)))


# --- round trips ----------------------------------------------------------------------------------


def test_round_trip_every_field_without_teleport():
    payload, n = encoded()
    assert payload[n:] == BODY and payload[:1] == b"{" and payload[n - 1 : n] == b"}"
    doc = json.loads(payload[:n])
    assert doc == {
        "version": 1,
        "origin": {"node": "node-a", "id": "17", "msgid": "17.aaaaaaaaaaaaaaaa"},
        "path": ["n0"],
        "sender": "s@src.test",
        "mail_params": "SIZE=1234 BODY=8BITMIME",
        "recipients": [{"address": "a@dst.test", "params": "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@dst.test"},
                       {"address": "b@dst.test", "params": ""}],
        "domain": "dst.test",  # rerouted_from, not the XFER domain
        "client_ip": "192.0.2.7",
        "helo": "client.example",
        "received_at": NOW - 100,
        "binding": "pool-a",
    }
    t = wire.decode_request(payload, str(n))
    assert t == wire.Transfer(
        origin_node="node-a", origin_id="17", origin_msgid="17.aaaaaaaaaaaaaaaa", path=("n0",),
        sender="s@src.test", mail_params="SIZE=1234 BODY=8BITMIME",
        recipients=(("a@dst.test", "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@dst.test"), ("b@dst.test", "")),
        rcpt_domains=("dst.test", "dst.test"), domain="dst.test", client_ip="192.0.2.7", helo="client.example",
        received_at=NOW - 100, binding="pool-a", context=None, body=BODY, version=1,
    )
    assert t.key == ("node-a", "17") and t.hops == ("n0", "node-a")
    (env, body), = t.envelopes(now=NOW)
    assert body == BODY
    assert env == Envelope(
        sender="s@src.test",
        recipients=[Recipient("a@dst.test", "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@dst.test"), Recipient("b@dst.test")],
        domain="dst.test", mail_params="SIZE=1234 BODY=8BITMIME", client_ip="192.0.2.7", helo="client.example",
        protocol="xfer", binding="pool-a", msgid="", received_at=NOW, first_queued=NOW, attempts=0, next_attempt=NOW,
        meta={"xfer_path": ["n0", "node-a"],
              "xfer_origin": {"node": "node-a", "id": "17", "msgid": "17.aaaaaaaaaaaaaaaa", "domain": "dst.test",
                              "received_at": NOW - 100}},
    )


def test_round_trip_with_teleport_keeps_the_context():
    payload, n = encoded(teleport=True)
    doc = json.loads(payload[:n])
    # xfer_path travels as `path`, not twice; the rest of meta goes along as it is.
    assert doc["context"] == {"attempts": 3, "first_queued": NOW - 90, "next_attempt": NOW - 5,
                              "meta": {"rerouted_from": "dst.test", "delayed_rerouted": True, "tag": {"k": [1, "v"]}}}
    t = wire.decode_request(payload, n)
    assert t.context == wire.Context(3, NOW - 90, NOW - 5, {"rerouted_from": "dst.test", "delayed_rerouted": True,
                                                              "tag": {"k": [1, "v"]}})
    (env, _), = t.envelopes(now=NOW)
    assert (env.attempts, env.first_queued, env.next_attempt, env.received_at) == (3, NOW - 90, NOW - 5, NOW)
    # The sender's own routing marks are not taken over: the receiver routes by its own conf.
    assert env.meta == {"tag": {"k": [1, "v"]}, "xfer_path": ["n0", "node-a"],
                        "xfer_origin": {"node": "node-a", "id": "17", "msgid": "17.aaaaaaaaaaaaaaaa",
                                        "domain": "dst.test", "received_at": NOW - 100}}


def test_several_domains_are_split_like_smtp_ingress():
    env = envelope(recipients=[Recipient("a@y.test"), Recipient("b@z.test", "NOTIFY=NEVER"), Recipient("c@Y.TEST."),
                               Recipient('"q u"@[192.0.2.1]')], meta={})
    t = wire.decode_request(*encoded(env, idx=(0, 1, 2, 3)))
    assert t.rcpt_domains == ("y.test", "z.test", "y.test", "[192.0.2.1]")
    items = t.envelopes(now=NOW)
    assert [(e.domain, [(r.address, r.params) for r in e.recipients]) for e, _ in items] == [
        ("y.test", [("a@y.test", ""), ("c@Y.TEST.", "")]),
        ("z.test", [("b@z.test", "NOTIFY=NEVER")]),
        ("[192.0.2.1]", [('"q u"@[192.0.2.1]', "")]),
    ]
    assert all(body is t.body and e.msgid == "" and e.protocol == "xfer" for e, body in items)
    assert items[0][0].meta is not items[1][0].meta  # each entry owns its metadata
    assert t.domain == "xfer.test"  # not rerouted: the envelope's own routing domain


def test_body_is_byte_exact_whatever_it_holds():
    body = bytes(range(256)) * 4 + b"\r\n.\r\n" + b"\x00" * 10 + b"{}" + b"\r.\r\n.\n"
    t = wire.decode_request(*encoded(body=body))
    assert t.body == body
    assert wire.decode_request(*encoded(body=b"")).body == b""


def test_non_ascii_fields_round_trip_as_json_escapes():
    env = envelope(sender="sé@src.test", mail_params="SMTPUTF8", recipients=[Recipient("ü@dst.test")],
                   helo="héllo", meta={})
    payload, n = encoded(env, idx=(0,))
    assert payload[:n].isascii()
    t = wire.decode_request(payload, n)
    assert (t.sender, t.recipients, t.helo) == ("sé@src.test", (("ü@dst.test", ""),), "héllo")


def test_null_sender_and_unknown_fields_and_absent_optional_fields():
    doc = valid_doc()
    doc["sender"] = ""
    doc["a_future_field"] = {"anything": [1, 2]}
    doc["origin"]["also_new"] = True
    doc["recipients"][0]["future"] = 1
    for k in ("mail_params", "client_ip", "helo", "received_at", "binding"):
        del doc[k]
    del doc["origin"]["msgid"]
    t = decode_doc(doc)
    assert (t.sender, t.mail_params, t.client_ip, t.helo, t.received_at, t.binding, t.origin_msgid) == \
        ("", "", "", "", 0.0, "default", "")
    doc["context"] = None  # null context = no context
    assert decode_doc(doc).context is None


# --- validation: every failure is a WireError with the right status and code word ------------------

LONG = "x" * 256


def _set(path: str, value: Any):
    def f(doc: dict) -> None:
        *parents, last = path.split(".")
        d = doc
        for p in parents:
            d = d[int(p)] if p.isdigit() else d[p]
        if value is _DEL:
            del d[int(last) if last.isdigit() else last]
        elif last.isdigit():
            d[int(last)] = value
        else:
            d[last] = value
    return f


_DEL = object()
CTX = {"attempts": 1, "first_queued": NOW, "next_attempt": NOW, "meta": {}}

INVALID = [
    ("version missing", _set("version", _DEL), 400, "bad_field"),
    ("version as string", _set("version", "1"), 400, "bad_field"),
    ("version as bool", _set("version", True), 400, "bad_field"),
    ("version 0", _set("version", 0), 400, "bad_field"),
    ("version 2", _set("version", 2), 415, "unsupported_version"),
    ("origin missing", _set("origin", _DEL), 400, "bad_field"),
    ("origin a list", _set("origin", ["n", "1"]), 400, "bad_field"),
    ("origin node with a space", _set("origin.node", "a b"), 400, "bad_field"),
    ("origin node empty", _set("origin.node", ""), 400, "bad_field"),
    ("origin node with LF", _set("origin.node", "a\nb"), 400, "control_character"),
    ("origin id empty", _set("origin.id", ""), 400, "bad_field"),
    ("origin id number", _set("origin.id", 17), 400, "bad_field"),
    ("origin id with a space", _set("origin.id", "1 7"), 400, "bad_field"),
    ("origin msgid with CR", _set("origin.msgid", "a\rb"), 400, "control_character"),
    ("path missing", _set("path", _DEL), 400, "bad_field"),
    ("path a string", _set("path", "n0"), 400, "bad_field"),
    ("path with a number", _set("path", ["n0", 5]), 400, "bad_field"),
    ("path too long", _set("path", [f"n{i}" for i in range(101)]), 400, "bad_field"),
    ("sender missing", _set("sender", _DEL), 400, "bad_field"),
    ("sender not a string", _set("sender", None), 400, "bad_field"),
    ("sender in brackets", _set("sender", "<s@src.test>"), 400, "bad_sender"),
    ("sender with a source route", _set("sender", "@r.test:s@src.test"), 400, "bad_sender"),
    ("sender with params glued on", _set("sender", "s@src.test> SIZE=1"), 400, "bad_sender"),
    ("sender with CRLF", _set("sender", "s@src.test\r\nRCPT TO:<x@y>"), 400, "control_character"),
    ("sender unqualified", _set("sender", "postmaster"), 400, "bad_sender"),
    ("recipients missing", _set("recipients", _DEL), 400, "bad_field"),
    ("recipients an object", _set("recipients", {"address": "a@b.test"}), 400, "bad_field"),
    ("recipients empty", _set("recipients", []), 400, "no_recipients"),
    ("recipient a string", _set("recipients.0", "a@dst.test"), 400, "bad_field"),
    ("recipient address missing", _set("recipients.0.address", _DEL), 400, "bad_field"),
    ("recipient address null", _set("recipients.0.address", None), 400, "bad_field"),
    ("recipient address empty (null path)", _set("recipients.0.address", ""), 400, "bad_recipient"),
    ("recipient without @", _set("recipients.0.address", "nobody"), 400, "bad_recipient"),
    ("recipient a@@b", _set("recipients.0.address", "a@@dst.test"), 400, "bad_recipient"),
    ("recipient with a port", _set("recipients.0.address", "a@dst.test:25"), 400, "bad_recipient"),
    ("recipient local part over 64", _set("recipients.0.address", "l" * 65 + "@dst.test"), 400, "bad_recipient"),
    ("recipient unbalanced quote", _set("recipients.0.address", '"a@dst.test'), 400, "bad_recipient"),
    ("recipient with NUL", _set("recipients.0.address", "a\x00@dst.test"), 400, "control_character"),
    ("recipient with LF", _set("recipients.0.address", "a@dst.test\n"), 400, "control_character"),
    ("recipient with DEL", _set("recipients.0.address", "a\x7f@dst.test"), 400, "control_character"),
    ("recipient with a lone surrogate", _set("recipients.0.address", "a\ud800@dst.test"), 400, "bad_field"),
    ("recipient params with CR", _set("recipients.0.params", "NOTIFY=NEVER\r"), 400, "control_character"),
    ("recipient params malformed", _set("recipients.0.params", "=x"), 400, "bad_params"),
    ("recipient params not a string", _set("recipients.0.params", ["NOTIFY=NEVER"]), 400, "bad_field"),
    ("recipient params too long", _set("recipients.0.params", "X=" + "y" * 1100), 400, "bad_field"),
    ("UTF-8 recipient without SMTPUTF8", _set("recipients.0.address", "ü@dst.test"), 400, "utf8_needs_smtputf8"),
    ("UTF-8 sender without SMTPUTF8", _set("sender", "ü@src.test"), 400, "utf8_needs_smtputf8"),
    ("mail params malformed", _set("mail_params", "SIZE==1 ="), 400, "bad_params"),
    ("mail params with LF", _set("mail_params", "SIZE=1\nX"), 400, "control_character"),
    ("domain missing", _set("domain", _DEL), 400, "bad_field"),
    ("domain empty", _set("domain", ""), 400, "bad_field"),
    ("domain with a space", _set("domain", "dst test"), 400, "bad_field"),
    ("domain an address", _set("domain", "a@dst.test"), 400, "bad_field"),
    ("domain with a bad label", _set("domain", "-dst.test"), 400, "bad_field"),
    ("client_ip not an IP", _set("client_ip", "client.example"), 400, "bad_field"),
    ("client_ip with LF", _set("client_ip", "1.2.3.4\n"), 400, "control_character"),
    ("helo too long", _set("helo", LONG), 400, "bad_field"),
    ("helo with NUL", _set("helo", "a\x00b"), 400, "control_character"),
    ("helo with a lone surrogate", _set("helo", "\udcff"), 400, "bad_field"),
    ("received_at a string", _set("received_at", "now"), 400, "bad_field"),
    ("received_at negative", _set("received_at", -1), 400, "bad_field"),
    ("received_at huge", _set("received_at", 1e300), 400, "bad_field"),
    ("received_at bool", _set("received_at", True), 400, "bad_field"),
    ("binding empty", _set("binding", ""), 400, "bad_field"),
    ("binding with TAB", _set("binding", "a\tb"), 400, "control_character"),
    ("context a list", _set("context", [1]), 400, "bad_field"),
    ("context attempts negative", _set("context", {**CTX, "attempts": -1}), 400, "bad_field"),
    ("context attempts a float", _set("context", {**CTX, "attempts": 1.5}), 400, "bad_field"),
    ("context attempts bool", _set("context", {**CTX, "attempts": True}), 400, "bad_field"),
    ("context first_queued missing", _set("context", {"attempts": 1, "next_attempt": NOW}), 400, "bad_field"),
    ("context next_attempt a string", _set("context", {**CTX, "next_attempt": "soon"}), 400, "bad_field"),
    ("context meta a list", _set("context", {**CTX, "meta": []}), 400, "bad_field"),
    ("context meta with CRLF", _set("context", {**CTX, "meta": {"k": ["a\r\nb"]}}), 400, "control_character"),
    ("context meta key with LF", _set("context", {**CTX, "meta": {"k\n": 1}}), 400, "control_character"),
    ("context meta too deep", _set("context", {**CTX, "meta": {"a": json.loads("[" * 20 + "]" * 20)}}), 400, "bad_field"),
    ("context meta too big", _set("context", {**CTX, "meta": {"k": "v" * (64 * 1024)}}), 400, "bad_field"),
]


@pytest.mark.parametrize(("mutate", "status", "code"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_each_malformed_field_is_refused(mutate, status, code):
    doc = valid_doc()
    mutate(doc)
    with pytest.raises(WireError) as ei:
        decode_doc(doc)
    assert (ei.value.status, ei.value.code) == (status, code), ei.value.message
    assert ei.value.message and "\n" not in ei.value.message


def test_too_many_recipients_is_refused_by_the_named_cap():
    doc = valid_doc()
    doc["recipients"] = [{"address": "a@dst.test"}] * (wire.MAX_RECIPIENTS + 1)
    with pytest.raises(WireError) as ei:
        decode_doc(doc)
    assert (ei.value.status, ei.value.code) == (400, "too_many_recipients")
    doc["recipients"] = doc["recipients"][: wire.MAX_RECIPIENTS]
    assert len(decode_doc(doc).recipients) == wire.MAX_RECIPIENTS


RAW_INVALID = [
    ("no length header", lambda p, n: (p, None), "bad_envelope_length"),
    ("length not a number", lambda p, n: (p, "12a"), "bad_envelope_length"),
    ("length negative", lambda p, n: (p, "-5"), "bad_envelope_length"),
    ("length zero", lambda p, n: (p, "0"), "bad_envelope_length"),
    ("length past the body", lambda p, n: (p, str(len(p) + 1)), "bad_envelope_length"),
    ("length a bool", lambda p, n: (p, True), "bad_envelope_length"),
    ("length one short", lambda p, n: (p, str(n - 1)), "bad_json"),
    ("length one long", lambda p, n: (p, str(n + 1)), "bad_json"),
    ("blank before the JSON", lambda p, n: (b" " + p, str(n + 1)), "bad_json"),
    ("blank after the JSON", lambda p, n: (p[:n] + b" " + p[n:], str(n + 1)), "bad_json"),
    ("a JSON array", lambda p, n: (b"[1]" + p[n:], "3"), "bad_json"),
    ("not JSON", lambda p, n: (b"{nope}" + p[n:], "6"), "bad_json"),
    ("not UTF-8", lambda p, n: (b'{"\xff":1}', "7"), "bad_json"),
    ("UTF-16", lambda p, n: ('{"a":1}'.encode("utf-16-le"), "14"), "bad_json"),
    ("duplicate keys", lambda p, n: (b'{"version":1,"version":1}', "25"), "bad_json"),
    ("NaN", lambda p, n: (b'{"version":NaN}', "15"), "bad_json"),
    ("5000-digit number", lambda p, n: (b'{"version":' + b"9" * 5000 + b"}", str(5012)), "bad_json"),
    ("nested 100000 deep", lambda p, n: (b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", str(200006)), "bad_json"),
]


@pytest.mark.parametrize(("make", "code"), [c[1:] for c in RAW_INVALID], ids=[c[0] for c in RAW_INVALID])
def test_each_malformed_body_is_refused(make, code):
    payload, n = encoded()
    data, length = make(payload, n)
    with pytest.raises(WireError) as ei:
        wire.decode_request(data, length)
    assert (ei.value.status, ei.value.code) == (400, code), ei.value.message


def test_loop_guard():
    t = wire.decode_request(*encoded())  # path ["n0"], origin node-a
    assert wire.loop_check(t, "node-b", 10) is None
    for me in ("n0", "node-a"):
        e = wire.loop_check(t, me, 10)
        assert e is not None and (e.status, e.code) == (508, "loop_detected")
    assert wire.loop_check(t, "node-b", 2) is None  # it left 2 nodes: n0 and node-a
    e = wire.loop_check(t, "node-b", 1)
    assert e is not None and (e.status, e.code) == (508, "too_many_hops")


# --- responses ------------------------------------------------------------------------------------


def test_response_round_trip_and_bad_responses():
    body = wire.encode_response("5.bbbb", "bbbbbbbbbbbbbbbb", True)
    assert json.loads(body) == {"status": "accepted", "id": "5.bbbb", "node": "bbbbbbbbbbbbbbbb", "duplicate": True}
    assert wire.decode_response(body) == wire.Accepted("5.bbbb", "bbbbbbbbbbbbbbbb", True)
    for bad in (b"", b"OK", b"{}", b'{"status":"accepted","id":"","node":"n","duplicate":false}',
                b'{"status":"queued","id":"1","node":"n","duplicate":false}',
                b'{"status":"accepted","id":"1","node":"n","duplicate":"no"}',
                b'{"status":"accepted","id":"1\\r\\n","node":"n","duplicate":false}',
                b'{"status":"accepted","id":"1","node":"a b","duplicate":false}',
                b'{"status":"accepted","id":"1","node":"n","duplicate":false}' + b" " * (64 * 1024)):
        with pytest.raises(WireError) as ei:
            wire.decode_response(bad)
        assert (ei.value.status, ei.value.code) == (502, "bad_response")
    assert wire.decode_error(wire.encode_error("spool_full", "later")) == ("spool_full", "later")
    assert wire.decode_error(b"<html>") == ("", "")
    assert wire.decode_error(b'{"error": 5}') == ("", "")


# --- authentication (case 32) ---------------------------------------------------------------------

SECRET = "correct horse battery staple"
SHA = hashlib.sha256(b"the body").hexdigest()
NONCE = "00112233445566778899aabbccddeeff"


def test_known_answer_signature():
    # A known answer (independent of the JSON encoder): any implementation must produce this signature.
    base = wire.string_to_sign("POST", "/delay_message", SHA, 1700000000, NONCE)
    assert base == (b"POST\n/delay_message\n" + SHA.encode() + b"\n1700000000\n" + NONCE.encode())
    sig = wire.sign(SECRET, "POST", "/delay_message", SHA, 1700000000, NONCE)
    assert sig == hmac.new(SECRET.encode(), base, hashlib.sha256).hexdigest()
    assert sig == "7b487fda0560a4ed6b3e3f4bd7efd5c968a45894a5467136c56b0d05bef3a232"
    assert wire.authorization(SECRET, "POST", "/delay_message", SHA, ts=1700000000, nonce=NONCE) == \
        f"XFER-HMAC-SHA256 ts=1700000000, nonce={NONCE}, sig={sig}"


def test_docs_worked_example():
    # docs/xfer.md §2.3, byte for byte (the signature was also checked with `openssl dgst -hmac`).
    env = Envelope("alice@example.com", [Recipient("bob@gmail.com", "NOTIFY=FAILURE")], "xfer.test",
                   mail_params="BODY=8BITMIME", client_ip="192.0.2.10", helo="mx.example.com", binding="default",
                   msgid="2A.9f8e7d6c5b4a3921", received_at=1700000000.25, first_queued=1700000000.25, attempts=1,
                   next_attempt=1700000060.0, meta={"rerouted_from": "gmail.com", "delayed_rerouted": True})
    payload, n = wire.encode_request(env, [0], b"Subject: hi\r\n\r\nHello Bob.\r\n", ("9f8e7d6c5b4a3921", "42"))
    assert payload[:n] == (
        b'{"version":1,"origin":{"node":"9f8e7d6c5b4a3921","id":"42","msgid":"2A.9f8e7d6c5b4a3921"},"path":[],'
        b'"sender":"alice@example.com","mail_params":"BODY=8BITMIME","recipients":[{"address":"bob@gmail.com",'
        b'"params":"NOTIFY=FAILURE"}],"domain":"gmail.com","client_ip":"192.0.2.10","helo":"mx.example.com",'
        b'"received_at":1700000000.25,"binding":"default"}'
    )
    assert (n, len(payload)) == (346, 373)
    sha = wire.content_sha256(payload)
    assert sha == "9d1d05fa24b9719c5069daa4275e54ae87ce0859205c616f3b38f91de9cb88bd"
    nonce = "0123456789abcdef0123456789abcdef"
    assert wire.authorization("correct horse battery staple", "POST", "/delay_message", sha, ts=1700000100,
                              nonce=nonce) == (
        "XFER-HMAC-SHA256 ts=1700000100, nonce=0123456789abcdef0123456789abcdef, "
        "sig=4379808f0b09bea37d10984887438fccd35f17eb9c269df4c7ebaef7c5edad20")


def _verify(header, method="POST", path="/delay_message", sha=SHA, secret=SECRET, tokens=(), nonces=None,
            now=NOW):
    return wire.verify(header, method, path, sha, secret=secret, tokens=tokens, nonces=nonces, window=300, now=now)


def _auth(ts=int(NOW), nonce=None, method="POST", path="/delay_message", sha=SHA, secret=SECRET):
    return wire.authorization(secret, method, path, sha, ts=ts, nonce=nonce)


def _code(fn) -> tuple[int, str]:
    with pytest.raises(WireError) as ei:
        fn()
    return ei.value.status, ei.value.code


def test_hmac_good_and_every_way_it_fails():
    nonces = NonceCache(300)
    assert _verify(_auth(), nonces=nonces) == "hmac"
    assert _code(lambda: _verify(_auth(secret="wrong"))) == (401, "bad_signature")
    assert _code(lambda: _verify(_auth(), sha=hashlib.sha256(b"the bodY").hexdigest())) == (401, "bad_signature")
    assert _code(lambda: _verify(_auth(), path="/other")) == (401, "bad_signature")
    assert _code(lambda: _verify(_auth(), method="PUT")) == (401, "bad_signature")
    assert _code(lambda: _verify(_auth(ts=int(NOW) - 301))) == (401, "stale_timestamp")
    assert _code(lambda: _verify(_auth(ts=int(NOW) + 301))) == (401, "stale_timestamp")
    assert _verify(_auth(ts=int(NOW) - 299)) == "hmac"
    h = _auth(nonce=NONCE)
    assert _verify(h, nonces=nonces) == "hmac"
    assert _code(lambda: _verify(h, nonces=nonces)) == (401, "replayed_nonce")
    # A tampered signature, timestamp or nonce in the header:
    good = _auth(nonce="ab" * 16)
    assert _code(lambda: _verify(good.replace("sig=", "sig=0")[:-1])) == (401, "bad_signature")
    assert _code(lambda: _verify(good.replace(f"ts={int(NOW)}", f"ts={int(NOW) + 1}"))) == (401, "bad_signature")
    assert _code(lambda: _verify(good.replace("nonce=ab", "nonce=ba"))) == (401, "bad_signature")


def test_malformed_or_missing_credentials():
    assert _code(lambda: _verify(None)) == (401, "auth_required")
    assert _code(lambda: _verify("")) == (401, "auth_required")
    assert _code(lambda: _verify("Basic dXNlcjpwYXNz")) == (401, "bad_authorization")
    for bad in ("XFER-HMAC-SHA256", "XFER-HMAC-SHA256 ts=1", f"XFER-HMAC-SHA256 ts=x, nonce={NONCE}, sig={'0' * 64}",
                f"XFER-HMAC-SHA256 ts=1, nonce=short, sig={'0' * 64}",
                f"XFER-HMAC-SHA256 ts=1, nonce={NONCE}, sig={'0' * 63}",
                f"XFER-HMAC-SHA256 ts=1, nonce={NONCE}, sig={'A' * 64}",
                f"XFER-HMAC-SHA256 ts=1, ts=1, nonce={NONCE}, sig={'0' * 64}",
                f"XFER-HMAC-SHA256 ts=1, nonce={NONCE}, sig={'0' * 64}, extra=1"):
        assert _code(lambda b=bad: _verify(b)) == (401, "bad_authorization"), bad
    assert _code(lambda: _verify(_auth(), secret=None)) == (401, "bad_authorization")
    assert _code(lambda: _verify(_auth(), sha=None)) == (401, "missing_content_hash")
    assert _code(lambda: _verify(_auth(), sha="XYZ")) == (401, "missing_content_hash")
    # Case-insensitive scheme, extra blanks: still fine.
    assert _verify("xfer-hmac-sha256   " + _auth()[len("XFER-HMAC-SHA256 "):].replace(", ", " ,  ")) == "hmac"


def test_bearer_tokens():
    assert _verify("Bearer t0k3n", tokens=("other", "t0k3n")) == "bearer"
    assert _verify("bearer t0k3n", secret=None, tokens=("t0k3n",)) == "bearer"
    assert _code(lambda: _verify("Bearer t0k3n-", tokens=("t0k3n",))) == (401, "bad_token")
    assert _code(lambda: _verify("Bearer t0k3n", tokens=())) == (401, "bad_token")
    assert _code(lambda: _verify("Bearer ", tokens=("t0k3n",))) == (401, "bad_token")
    assert _code(lambda: _verify("Bearer t\udcffk", tokens=("t0k3n",))) == (401, "bad_token")


def test_nonce_cache_is_bounded_in_time_and_size_without_reopening_replays():
    c = NonceCache(window=10, max_size=3)
    assert all(c.use(f"n{i}", 100 + i, 105) for i in range(3))
    assert len(c) == 3 and not c.use("n1", 101, 105)
    assert c.use("n3", 104, 105)  # full: n0 (signed at 100) is dropped, and 100 becomes the floor
    assert len(c) == 3
    assert not c.use("n0", 100, 105)  # the dropped nonce still cannot be replayed
    assert not c.use("fresh", 100, 105)  # nor anything signed that early (the sender re-signs)
    assert c.use("fresh", 105, 105)
    # Time: entries expire window seconds after their timestamp.
    assert c.use("late", 200, 200) and len(c) == 1
    assert not c.use("late", 200, 205)


def test_nonce_cache_resize_on_reload_never_reopens_a_replay():
    """A reload's wider xfer_replay_window (issue 12) must not accept again a nonce the narrower
    window already forgot; a smaller size drops the oldest and raises the floor."""
    c = NonceCache(window=10, max_size=10)
    assert c.use("old", 100, 100)
    assert c.use("new", 108, 111)  # at 111, "old" (signed at 100) has expired and is forgotten
    c.resize(window=60, max_size=10, now=111)
    assert not c.use("old", 100, 111), "signed before the old window began: still stale"
    assert not c.use("new", 108, 111)
    assert c.use("fresh", 110, 111)
    c.resize(window=60, max_size=1, now=111)
    assert len(c) == 1 and not c.use("new", 108, 111)


# --- Hypothesis: decoding never raises anything but WireError -------------------------------------

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
FIELDS = ["version", "origin", "path", "sender", "mail_params", "recipients", "domain", "client_ip", "helo",
          "received_at", "binding", "context"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), length=st.one_of(st.none(), st.integers(-5, 400), st.text(max_size=6)))
def test_decode_raises_only_wire_error_on_arbitrary_bytes(data, length):
    try:
        wire.decode_request(data, length)
    except WireError as e:
        assert 400 <= e.status < 500


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=JSONISH, sub=st.sampled_from([None, "origin", "recipients", "context"]))
def test_decode_raises_only_wire_error_on_arbitrary_json_fields(field, value, sub):
    doc = valid_doc()
    doc["context"] = dict(CTX)
    if sub == "origin":
        doc["origin"][field] = value
    elif sub == "recipients":
        doc["recipients"][0][field] = value
    elif sub == "context":
        doc["context"][field if field in CTX else "meta"] = value
    else:
        doc[field] = value
    try:
        t = decode_doc(doc)
    except WireError as e:
        assert e.status in (400, 415)
    else:
        t.envelopes(now=NOW)


@settings(max_examples=200, deadline=None)
@given(doc=JSONISH)
def test_decode_raises_only_wire_error_on_arbitrary_json(doc):
    try:
        decode_doc(doc)
    except WireError:
        pass


# --- Deterministic regressions (issue 9, part 3: "XFER: `X-Xfer-Envelope-Length: 0\x1f` raises
# ValueError ... Every malformed request is a 4xx with a JSON error, and nothing is spooled.") -----

@pytest.mark.parametrize("length", [
    "0\x1f", "2\x1c", "\x1e2", "12\x85", " 1\u2028", "²", "\uff15", "1\u0663", "0x10", "+5", "-1", "", " ", "1 2",
])
def test_envelope_length_that_is_not_ascii_digits_is_400(length):
    """"Numbers are ASCII digits only": what str.strip() or str.isdigit() would let through is refused,
    never a ValueError."""
    payload, _n = encoded()
    with pytest.raises(WireError) as e:
        wire.decode_request(payload, length)
    assert (e.value.status, e.value.code) == (400, "bad_envelope_length")


@pytest.mark.parametrize("pad", ["", " ", "\t", " \t "])
def test_envelope_length_with_http_whitespace_is_read(pad):
    payload, n = encoded()
    assert wire.decode_request(payload, f"{pad}{n}{pad}").origin_id == "17"


@pytest.mark.parametrize("meta_json", [
    b'{"big":1e999}', b'{"neg":-1e999}', b'{"deep":[{"x":1E400}]}', b'{"k":{"k":[1,2,1e309]}}',
])
def test_context_meta_holding_json_infinity_is_400(meta_json):
    """A context meta value of 1e999 (JSON infinity) used to give 500 with a traceback, and the
    sender treats 500 as transient and retries forever."""
    doc = valid_doc()
    doc["context"] = dict(CTX)
    head = json.dumps(doc, separators=(",", ":")).encode().replace(b'"meta":{}', b'"meta":' + meta_json)
    with pytest.raises(WireError) as e:
        wire.decode_request(head + b"x", str(len(head)))
    assert (e.value.status, e.value.code) == (400, "bad_field")


@pytest.mark.parametrize(("value", "expected"), [
    ("1", 1), (" 1\t", 1), ("007", 7), ("²", None), ("\uff15", None), ("1\x1f", None), ("\x1c1", None),
    ("", None), (None, None), ("1234567", None), ("1.0", None),
])
def test_header_uint_takes_ascii_digits_only(value, expected):
    assert wire.header_uint(value, max_digits=6) == expected
