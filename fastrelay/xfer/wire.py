"""The XFER wire format, version 1, sans-I/O: transfers, responses and signatures as bytes in, values out.

A transfer is one HTTP request whose body is a JSON envelope followed by the raw message:

    POST /delay_message HTTP/1.1
    Content-Type: application/vnd.fastrelay.xfer+v1
    X-Xfer-Version: 1
    X-Xfer-Envelope-Length: <bytes of the JSON part>
    X-Xfer-Content-SHA256: <sha256 hex of the whole body>
    Authorization: XFER-HMAC-SHA256 ts=<unix>, nonce=<hex>, sig=<hex>     (or Bearer <token>)

    {"version":1,"origin":{...},"path":[...],"sender":...,"recipients":[...],...}<message bytes>

docs/xfer.md is the normative description; this module is the reference implementation, used
by both ends (fastrelay.xfer.server, fastrelay.delivery.xfer) so they cannot drift apart.

Why it looks like this:
  * The message travels as raw bytes after a length-delimited JSON part, not base64 inside the
    JSON: byte-exact (NUL and 8-bit bytes included, docs/reliability.md case 25), no 33% growth, and
    the JSON stays small enough to validate before the body is touched.
  * Decoding validates every field (case 37: 400, nothing spooled) with the same address rules as
    SMTP ingress (fastrelay.smtp.address.parse_path) and refuses control characters everywhere
    (cases 22, 26), so a transfer cannot plant what SMTP would have refused: a poison message on
    the receiver, or CR/LF in a log line or a DSN.
  * Extensible: unknown JSON fields are ignored; a `version` above ours is refused with 415 and
    the code word `unsupported_version` (the sender treats it as a configuration problem between
    nodes and retries; it does not bounce), never half-understood.
  * Authentication (case 32): HMAC-SHA256 over method, path, body hash, timestamp and nonce with a
    shared secret, a +-window on the timestamp and a nonce cache, or a bearer token. The body
    hash travels in X-Xfer-Content-SHA256 so the server can check the signature from the headers
    alone and refuse a stranger before reading up to xfer_max_body bytes from it; it then checks
    the body against that hash.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import hmac
import ipaddress
import json
import math
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastrelay.message import Envelope, Recipient
from fastrelay.smtp import replies as R
from fastrelay.smtp.address import AddressError, parse_params, parse_path

__all__ = [
    "AUTH_SCHEME",
    "CONTENT_TYPE",
    "H_CONTENT_SHA256",
    "H_ENVELOPE_LENGTH",
    "H_VERSION",
    "VERSION",
    "Accepted",
    "Context",
    "NonceCache",
    "Transfer",
    "WireError",
    "authorization",
    "bearer",
    "content_sha256",
    "decode_error",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_response",
    "loop_check",
    "new_nonce",
    "sign",
    "string_to_sign",
    "verify",
]

VERSION = 1
CONTENT_TYPE = "application/vnd.fastrelay.xfer+v1"
RESPONSE_CONTENT_TYPE = "application/json"
H_VERSION = "X-Xfer-Version"
H_ENVELOPE_LENGTH = "X-Xfer-Envelope-Length"
H_CONTENT_SHA256 = "X-Xfer-Content-SHA256"
AUTH_SCHEME = "XFER-HMAC-SHA256"

# --- Caps (named so docs/xfer.md and the tests can cite them) -----------------------------------
# Recipients per transfer: the largest max_recipients_per_message fastrelay accepts at ingress, so
# any message it took can be transferred whole. Splitting one entry into several transfers would
# need one idempotency key per part, stable across retries: not worth it.
MAX_RECIPIENTS = 100_000
# The JSON part. 100,000 recipients of ordinary length fit; the body is capped by xfer_max_body.
MAX_ENVELOPE_BYTES = 32 * 1024 * 1024
# Node ids on the path: xfer_max_hops is at most 100.
MAX_PATH = 100
# Free-text fields (HELO name, binding, msgid): the HELO cap of SMTP ingress.
MAX_TEXT = 255
# ESMTP parameter strings: a command line is 512 octets (RFC 5321 §4.5.3.1.4); be a little lenient.
MAX_PARAMS = 1024
# Teleported metadata: a small bag of flags and ids, not a place for data.
MAX_META_BYTES = 64 * 1024
MAX_META_DEPTH = 16
# max_retries is at most 1,000,000.
MAX_ATTEMPTS = 1_000_000
# Timestamps: seconds since the epoch, below the year 5138.
MAX_TIME = 1e11
# A response body the client reads at most (hostile peers: bounded memory, case 44's spirit).
MAX_RESPONSE_BYTES = 64 * 1024
# Nonces remembered at most (see NonceCache).
NONCE_CACHE_SIZE = 100_000

# Metadata keys the receiver sets itself or that describe only the sender's own routing: never
# taken from a teleported context.
RESERVED_META = frozenset({"xfer_path", "xfer_origin", "rerouted_from", "delayed_rerouted"})

_CTRL = re.compile(r"[\x00-\x1f\x7f]")  # the set SMTP ingress refuses (fastrelay.smtp.address)
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_ORIGIN_ID = re.compile(r"[\x21-\x7e]{1,128}")
_NONCE = re.compile(r"[0-9a-f]{16,128}")
_SIG = re.compile(r"[0-9a-f]{64}")
_HEX64 = _SIG
_TS = re.compile(r"[0-9]{1,12}")
_DOMAIN_LIKE = re.compile(r"[^\s<>@\"\\]{1,255}")  # no room for a local part or a second address
_MISSING = object()


class WireError(Exception):
    """A request or response that must be refused: `status` is the HTTP status to answer with,
    `code` a stable code word for programs, `message` human text (no secrets, no client bytes)."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after  # a 503's own Retry-After; None: the server's default


def _bad(code: str, message: str, status: int = 400) -> WireError:
    return WireError(status, code, message)


# --- Values -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Context:
    """A message's scheduling context, carried only with teleport_enabled (seeds 000/001)."""

    attempts: int
    first_queued: float
    next_attempt: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Transfer:
    """A decoded, validated transfer request."""

    origin_node: str  # the node the request comes from (its spool's node_id)
    origin_id: str  # that node's id for the message: with origin_node, the idempotency key
    origin_msgid: str
    path: tuple[str, ...]  # nodes the message left before origin_node, in order
    sender: str  # "" is the null sender
    mail_params: str
    recipients: tuple[tuple[str, str], ...]  # (address, params)
    rcpt_domains: tuple[str, ...]  # each recipient's routing domain (lowercase, no trailing dot)
    domain: str  # the sender's original routing domain (before any reroute)
    client_ip: str
    helo: str
    received_at: float
    binding: str
    context: Context | None
    body: bytes
    version: int = VERSION

    @property
    def key(self) -> tuple[str, str]:
        """(origin node, origin id): the receiver stores a transfer at most once per key (case 36)."""
        return (self.origin_node, self.origin_id)

    @property
    def hops(self) -> tuple[str, ...]:
        """Every node the message has left, the sender included."""
        return (*self.path, self.origin_node)

    def envelopes(self, now: float | None = None) -> list[tuple[Envelope, bytes]]:
        """What the receiver spools: one Envelope per recipient domain (as SMTP ingress splits),
        protocol "xfer", msgid empty (the spool assigns one). Without a context the message starts
        afresh here (attempts 0, first queued now, due now); with one it keeps its schedule."""
        now = time.time() if now is None else now
        by_domain: dict[str, list[Recipient]] = {}
        for (address, params), dom in zip(self.recipients, self.rcpt_domains, strict=True):
            by_domain.setdefault(dom, []).append(Recipient(address, params))
        ctx = self.context
        items = []
        for dom, rcpts in by_domain.items():
            meta: dict[str, Any] = {}
            if ctx is not None:
                meta.update((k, copy.deepcopy(v)) for k, v in ctx.meta.items() if k not in RESERVED_META)
            meta["xfer_path"] = list(self.hops)
            meta["xfer_origin"] = {
                "node": self.origin_node,
                "id": self.origin_id,
                "msgid": self.origin_msgid,
                "domain": self.domain,
                "received_at": self.received_at,
            }
            env = Envelope(
                sender=self.sender,
                recipients=rcpts,
                domain=dom,
                mail_params=self.mail_params,
                client_ip=self.client_ip,
                helo=self.helo,
                protocol="xfer",
                binding=self.binding,
                msgid="",
                received_at=now,
                first_queued=ctx.first_queued if ctx is not None else now,
                attempts=ctx.attempts if ctx is not None else 0,
                next_attempt=ctx.next_attempt if ctx is not None else now,
                meta=meta,
            )
            items.append((env, self.body))
        return items


@dataclass(frozen=True, slots=True)
class Accepted:
    """A 200 answer: the receiver's durable id for the message (P4), its node, and whether it had
    taken this transfer before (a resend after a lost 200)."""

    id: str
    node: str
    duplicate: bool


# --- Requests: encode ---------------------------------------------------------------------------

# ASCII-only JSON (non-ASCII as \\u escapes): still UTF-8, and encoding can never fail on a string
# the spool holds. No NaN/Infinity (not JSON). Compact: the receiver refuses surrounding blanks.
_encode_json = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode


def encode_request(env: Envelope, idx: Sequence[int], body: bytes, key: tuple[str, str], *,
                   teleport: bool = False) -> tuple[bytes, int]:
    """The request body for recipients `idx` of `env` and the length of its JSON part (the value
    of X-Xfer-Envelope-Length). `key` is (this node's id, this node's id for the message)."""
    meta = env.meta
    doc: dict[str, Any] = {
        "version": VERSION,
        "origin": {"node": key[0], "id": key[1], "msgid": env.msgid},
        "path": list(meta.get("xfer_path") or ()),
        "sender": env.sender,
        "mail_params": env.mail_params,
        "recipients": [{"address": env.recipients[i].address, "params": env.recipients[i].params} for i in idx],
        # The routing domain the message had before a (delayed) reroute sent it to the XFER domain.
        "domain": meta.get("rerouted_from") or env.domain,
        "client_ip": env.client_ip,
        "helo": env.helo,
        "received_at": env.received_at,
        "binding": env.binding,
    }
    if teleport:
        doc["context"] = {
            "attempts": env.attempts,
            "first_queued": env.first_queued,
            "next_attempt": env.next_attempt,
            "meta": {k: v for k, v in meta.items() if k not in ("xfer_path", "xfer_origin")},
        }
    head = _encode_json(doc).encode("ascii")
    return head + body, len(head)


# --- Requests: decode ---------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two implementations could take the first or the last of a repeated key: refuse the ambiguity
    # (the same reason duplicate Content-Length headers are refused, case 34).
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return d


_decoder = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)


def _parse_json(raw: bytes, what: str) -> Any:
    try:
        text = raw.decode("utf-8")  # strictly UTF-8 (json.loads on bytes would also take UTF-16/32)
        return _decoder.decode(text)
    except UnicodeDecodeError:
        raise _bad("bad_json", f"{what} is not valid UTF-8") from None
    except RecursionError:
        raise _bad("bad_json", f"{what} is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, duplicate keys, NaN, an integer of 5,000 digits
        raise _bad("bad_json", f"{what} is not valid JSON: {str(e)[:120]}") from None


def _text(d: dict, key: str, where: str, *, cap: int = MAX_TEXT, default: Any = _MISSING,
          empty: bool = True) -> str:
    v = d.get(key, _MISSING)
    name = f"{where}{key}"
    if v is _MISSING:
        if default is _MISSING:
            raise _bad("bad_field", f"{name} is missing")
        return default
    if not isinstance(v, str):
        raise _bad("bad_field", f"{name} must be a string")
    return _check_text(v, name, cap=cap, empty=empty)


def _check_text(v: str, name: str, *, cap: int = MAX_TEXT, empty: bool = True) -> str:
    if len(v) > cap:
        raise _bad("bad_field", f"{name} is longer than {cap} characters")
    if not v and not empty:
        raise _bad("bad_field", f"{name} is empty")
    if _CTRL.search(v):
        raise _bad("control_character", f"{name} contains a control character (CR, LF, NUL, ...)")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \\ud800 escape
        raise _bad("bad_field", f"{name} is not valid Unicode") from None
    return v


def _number(d: dict, key: str, where: str, *, lo: float = 0.0, hi: float = MAX_TIME,
            default: Any = _MISSING) -> float:
    v = d.get(key, _MISSING)
    name = f"{where}{key}"
    if v is _MISSING:
        if default is _MISSING:
            raise _bad("bad_field", f"{name} is missing")
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
        raise _bad("bad_field", f"{name} must be a number from {lo:g} to {hi:g}")
    return float(v)


def _object(v: Any, name: str) -> dict:
    if not isinstance(v, dict):
        raise _bad("bad_field", f"{name} must be an object")
    return v


def _params(v: str, name: str) -> dict[str, str | None]:
    if not v:
        return {}
    try:
        return parse_params(" " + v, R.SYNTAX)  # the parser SMTP ingress ran on the same text
    except AddressError:
        raise _bad("bad_params", f"{name} is not a valid list of ESMTP parameters") from None


def _path(v: str, name: str, code: str, allow_null: bool):
    # The same rules as MAIL FROM / RCPT TO at SMTP ingress (docs/reliability.md cases 20, 22), and the
    # address must be exactly what the parser makes of it: no source route, no trailing parameters.
    try:
        p, rest = parse_path(f"<{v}>", R.BAD_RCPT_SYNTAX, allow_null)
    except AddressError:
        raise _bad(code, f"{name} is not a valid address") from None
    if rest or p.address != v:
        raise _bad(code, f"{name} is not a valid address")
    return p


def _check_meta(v: Any, name: str, depth: int = 0) -> None:
    if depth > MAX_META_DEPTH:
        raise _bad("bad_field", f"{name} is nested too deeply")
    if isinstance(v, str):
        _check_text(v, name, cap=MAX_META_BYTES)
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_text(k, f"{name} key", cap=MAX_TEXT)
            _check_meta(x, name, depth + 1)
    elif isinstance(v, list):
        for x in v:
            _check_meta(x, name, depth + 1)
    elif isinstance(v, float) and not math.isfinite(v):
        # 1e999 parses as infinity, which JSON cannot carry on (allow_nan=False refuses it when the
        # size is checked): a 400 here, not a 500 there.
        raise _bad("bad_field", f"{name} holds a number too large for JSON")
    elif v is not None and not isinstance(v, bool | int | float):
        raise _bad("bad_field", f"{name} holds a value that is not JSON")


def header_uint(value: str | None, max_digits: int = 12) -> int | None:
    """A header holding a whole number: ASCII digits only (not '²' or a fullwidth 5, which str.isdigit()
    accepts), around them only the optional whitespace HTTP allows (SP and HTAB, RFC 9110 §5.6.3),
    not what str.strip() removes (\x1c-\x1f, NEL, ...). None if it is anything else."""
    if value is None:
        return None
    text = value.strip(" \t")
    if not 1 <= len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def decode_request(data: bytes, envelope_length: str | int | None) -> Transfer:
    """Split and validate a request body (X-Xfer-Envelope-Length = `envelope_length`); raises
    WireError (400, or 415 for a version above ours) for anything else than a well-formed v1
    transfer. Unknown fields are ignored."""
    if isinstance(envelope_length, str):
        # The check and the conversion see the same string (a \x1f that str.strip() removed used to
        # pass the check and then make int() raise).
        parsed = header_uint(envelope_length)
        n = -1 if parsed is None else parsed
    elif isinstance(envelope_length, int) and not isinstance(envelope_length, bool):
        n = envelope_length
    else:
        n = -1
    if n < 2 or n > len(data) or n > MAX_ENVELOPE_BYTES:
        raise _bad("bad_envelope_length",
                   f"{H_ENVELOPE_LENGTH} must be the byte length of the JSON part (2 to {MAX_ENVELOPE_BYTES}, "
                   "at most the body)")
    raw = data[:n]
    # Exactly one JSON object, no blanks around it: then a changed X-Xfer-Envelope-Length cannot
    # move bytes between the envelope and the message and still parse.
    if raw[:1] != b"{" or raw[-1:] != b"}":
        raise _bad("bad_json", "the envelope must be one JSON object with nothing around it")
    doc = _parse_json(raw, "the envelope")
    if not isinstance(doc, dict):  # pragma: no cover - "{...}" that parses is an object
        raise _bad("bad_json", "the envelope must be a JSON object")
    version = doc.get("version", _MISSING)
    if isinstance(version, bool) or not isinstance(version, int):
        raise _bad("bad_field", "version must be an integer")
    if version > VERSION:
        raise _bad("unsupported_version", f"version {version} is not supported; this node speaks version {VERSION}",
                   415)
    if version < 1:
        raise _bad("bad_field", "version must be 1 or more")

    origin = _object(doc.get("origin"), "origin")
    origin_node = _text(origin, "node", "origin.", cap=64)
    if not _NODE.fullmatch(origin_node):
        raise _bad("bad_field", "origin.node must be a node id (letters, digits, . _ : -; 1 to 64)")
    origin_id = _text(origin, "id", "origin.", cap=128)
    if not _ORIGIN_ID.fullmatch(origin_id):
        raise _bad("bad_field", "origin.id must be 1 to 128 printable ASCII characters without spaces")
    origin_msgid = _text(origin, "msgid", "origin.", default="")

    path_v = doc.get("path", _MISSING)
    if not isinstance(path_v, list):
        raise _bad("bad_field", "path must be a list of node ids")
    if len(path_v) > MAX_PATH:
        raise _bad("bad_field", f"path has more than {MAX_PATH} nodes")
    for i, node in enumerate(path_v):
        if not isinstance(node, str) or not _NODE.fullmatch(node):
            raise _bad("bad_field", f"path[{i}] must be a node id")

    mail_params = _text(doc, "mail_params", "", cap=MAX_PARAMS, default="")
    mparams = _params(mail_params, "mail_params")
    smtputf8 = "SMTPUTF8" in mparams
    sender = _text(doc, "sender", "", cap=512)
    spath = _path(sender, "sender", "bad_sender", allow_null=True)
    if spath.utf8 and not smtputf8:
        raise _bad("utf8_needs_smtputf8", "sender is not ASCII but mail_params has no SMTPUTF8 (RFC 6531)")

    rcpts_v = doc.get("recipients", _MISSING)
    if not isinstance(rcpts_v, list):
        raise _bad("bad_field", "recipients must be a list")
    if not rcpts_v:
        raise _bad("no_recipients", "recipients is empty")
    if len(rcpts_v) > MAX_RECIPIENTS:
        raise _bad("too_many_recipients", f"more than {MAX_RECIPIENTS} recipients")
    recipients = []
    domains = []
    for i, r in enumerate(rcpts_v):
        where = f"recipients[{i}]."
        r = _object(r, f"recipients[{i}]")
        address = _text(r, "address", where, cap=512)
        p = _path(address, f"{where}address", "bad_recipient", allow_null=False)
        if p.utf8 and not smtputf8:
            raise _bad("utf8_needs_smtputf8", f"{where}address is not ASCII but mail_params has no SMTPUTF8")
        params = _text(r, "params", where, cap=MAX_PARAMS, default="")
        _params(params, f"{where}params")
        recipients.append((address, params))
        domains.append(p.domain.lower().rstrip("."))  # as SMTP ingress keys its split

    domain = _text(doc, "domain", "", empty=False)
    if _DOMAIN_LIKE.fullmatch(domain) is None:
        raise _bad("bad_field", "domain is not a valid domain")
    _path(f"x@{domain}", "domain", "bad_field", allow_null=False)  # the label rules of RCPT TO domains
    client_ip = _text(doc, "client_ip", "", cap=64, default="")
    if client_ip:
        try:
            ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            raise _bad("bad_field", "client_ip must be an IP address or empty") from None
    helo = _text(doc, "helo", "", default="")
    received_at = _number(doc, "received_at", "", default=0.0)
    binding = _text(doc, "binding", "", default="default", empty=False)

    context = None
    ctx_v = doc.get("context")
    if ctx_v is not None:
        ctx = _object(ctx_v, "context")
        attempts = ctx.get("attempts", _MISSING)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 0 <= attempts <= MAX_ATTEMPTS:
            raise _bad("bad_field", f"context.attempts must be an integer from 0 to {MAX_ATTEMPTS}")
        first_queued = _number(ctx, "first_queued", "context.")
        next_attempt = _number(ctx, "next_attempt", "context.")
        meta = _object(ctx.get("meta", {}), "context.meta")
        _check_meta(meta, "context.meta")
        if len(_encode_json(meta)) > MAX_META_BYTES:
            raise _bad("bad_field", f"context.meta is larger than {MAX_META_BYTES} bytes")
        context = Context(attempts, first_queued, next_attempt, meta)

    return Transfer(
        origin_node=origin_node,
        origin_id=origin_id,
        origin_msgid=origin_msgid,
        path=tuple(path_v),
        sender=sender,
        mail_params=mail_params,
        recipients=tuple(recipients),
        rcpt_domains=tuple(domains),
        domain=domain.lower(),
        client_ip=client_ip,
        helo=helo,
        received_at=received_at,
        binding=binding,
        context=context,
        body=data[n:],
        version=version,
    )


def loop_check(t: Transfer, node_id: str, max_hops: int) -> WireError | None:
    """The loop guard (docs/reliability.md case 35; KumoMTA compares xfer_prior_node with its own id):
    508 if this node already sent the message on, or if it has left `max_hops` nodes already."""
    if node_id in t.hops:
        return _bad("loop_detected", f"this node ({node_id}) is already on the transfer's path", 508)
    if len(t.path) >= max_hops:
        return _bad("too_many_hops", f"the message has passed through {len(t.hops)} XFER nodes, more than "
                                     f"{max_hops}", 508)
    return None


# --- Responses ----------------------------------------------------------------------------------


def encode_response(msgid: str, node: str, duplicate: bool) -> bytes:
    return _encode_json({"status": "accepted", "id": msgid, "node": node, "duplicate": duplicate}).encode("ascii")


def encode_error(code: str, message: str) -> bytes:
    return _encode_json({"error": code, "message": message}).encode("ascii")


def decode_response(body: bytes) -> Accepted:
    """A 200's body; WireError(502, "bad_response") if it is not exactly what a v1 server sends:
    then the outcome is unknown and the sender resends with the same idempotency key (case 49)."""
    if len(body) > MAX_RESPONSE_BYTES:
        raise _bad("bad_response", "the response body is too large", 502)
    try:
        doc = _parse_json(body, "the response")
        doc = _object(doc, "the response")
        if doc.get("status") != "accepted":
            raise _bad("bad_field", 'status is not "accepted"')
        msgid = _text(doc, "id", "", empty=False)
        node = _text(doc, "node", "", cap=64)
        if not _NODE.fullmatch(node):
            raise _bad("bad_field", "node is not a node id")
        dup = doc.get("duplicate", _MISSING)
        if not isinstance(dup, bool):
            raise _bad("bad_field", "duplicate must be true or false")
    except WireError as e:
        raise _bad("bad_response", e.message, 502) from None
    return Accepted(msgid, node, dup)


def decode_error(body: bytes) -> tuple[str, str]:
    """(code word, message) of an error body, or ("", "") when it is not one; never raises. The
    message is the peer's text: callers clean it before logging it (case 26)."""
    if len(body) > MAX_RESPONSE_BYTES:
        return "", ""
    try:
        doc = _parse_json(body, "the response")
    except WireError:
        return "", ""
    if not isinstance(doc, dict):
        return "", ""
    code, message = doc.get("error"), doc.get("message")
    return (code if isinstance(code, str) else "")[:64], (message if isinstance(message, str) else "")[:500]


# --- Authentication (docs/reliability.md case 32) ----------------------------------------------------


def is_sha256_hex(text: str) -> bool:
    """64 lowercase ASCII hex digits: the form of X-Xfer-Content-SHA256."""
    return bool(_HEX64.fullmatch(text))


def content_sha256(body: bytes) -> str:
    """The lowercase hex SHA-256 of the whole request body (JSON part and message)."""
    return hashlib.sha256(body).hexdigest()


def new_nonce() -> str:
    """128 random bits as 32 lowercase hex digits."""
    return secrets.token_hex(16)


def string_to_sign(method: str, path: str, body_sha256: str, ts: int, nonce: str) -> bytes:
    """METHOD LF PATH LF sha256hex(body) LF TIMESTAMP LF NONCE, UTF-8, no trailing LF. PATH is the
    request-target exactly as sent on the request line."""
    return f"{method.upper()}\n{path}\n{body_sha256}\n{ts}\n{nonce}".encode("utf-8", "surrogateescape")


def sign(secret: str, method: str, path: str, body_sha256: str, ts: int, nonce: str) -> str:
    """HMAC-SHA256 of string_to_sign with the shared secret (UTF-8) as key, lowercase hex."""
    return hmac.new(secret.encode("utf-8"), string_to_sign(method, path, body_sha256, ts, nonce),
                    hashlib.sha256).hexdigest()


def authorization(secret: str, method: str, path: str, body_sha256: str, *, ts: int | None = None,
                  nonce: str | None = None) -> str:
    """The Authorization header value for a signed request (now and a fresh nonce by default)."""
    ts = int(time.time()) if ts is None else ts
    nonce = new_nonce() if nonce is None else nonce
    return f"{AUTH_SCHEME} ts={ts}, nonce={nonce}, sig={sign(secret, method, path, body_sha256, ts, nonce)}"


def bearer(token: str) -> str:
    return f"Bearer {token}"


def _unauthorized(code: str, message: str) -> WireError:
    return WireError(401, code, message)


def _parse_hmac(params: str) -> tuple[int, str, str]:
    fields: dict[str, str] = {}
    for part in params.split(","):
        k, eq, v = part.strip().partition("=")
        k = k.strip().lower()
        if not eq or k in fields:
            raise _unauthorized("bad_authorization", f"malformed {AUTH_SCHEME} credentials")
        fields[k] = v.strip()
    ts, nonce, sig = fields.get("ts", ""), fields.get("nonce", ""), fields.get("sig", "")
    if set(fields) != {"ts", "nonce", "sig"} or not _TS.fullmatch(ts) or not _NONCE.fullmatch(nonce) \
            or not _SIG.fullmatch(sig):
        raise _unauthorized("bad_authorization",
                            f"{AUTH_SCHEME} needs ts=<unix seconds>, nonce=<16-128 lowercase hex>, "
                            "sig=<64 lowercase hex>")
    return int(ts), nonce, sig


def verify(header: str | None, method: str, path: str, body_sha256: str | None, *, secret: str | None,
           tokens: Sequence[str] = (), nonces: NonceCache | None = None, window: float = 300.0,
           now: float | None = None) -> str:
    """Check a request's Authorization header; return the scheme that passed ("hmac" or "bearer")
    or raise WireError(401, code, message). For HMAC, `body_sha256` is the hash the signature is
    checked over (the caller makes sure the body has it); the timestamp must be within `window`
    seconds of `now` and the nonce unused (it is then recorded in `nonces`). Comparisons of
    secrets are constant-time."""
    if not header:
        raise _unauthorized("auth_required", "this XFER server needs an Authorization header")
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        token = rest.strip().encode("utf-8", "surrogateescape")
        ok = False
        for t in tokens:  # no early exit: the time taken does not tell which token nearly matched
            ok |= hmac.compare_digest(token, t.encode("utf-8"))
        if not tokens or not token or not ok:
            raise _unauthorized("bad_token", "the bearer token is not accepted")
        return "bearer"
    if scheme.upper() != AUTH_SCHEME:
        raise _unauthorized("bad_authorization", f"unknown authorization scheme; use {AUTH_SCHEME} or Bearer")
    if not secret:
        raise _unauthorized("bad_authorization", f"{AUTH_SCHEME} is not enabled on this server (no xfer_secret)")
    ts, nonce, sig = _parse_hmac(rest)
    if body_sha256 is None or not _HEX64.fullmatch(body_sha256):
        raise _unauthorized("missing_content_hash", f"a signed request needs {H_CONTENT_SHA256} (lowercase hex)")
    expected = sign(secret, method, path, body_sha256, ts, nonce)
    if not hmac.compare_digest(expected.encode("ascii"), sig.encode("ascii")):
        raise _unauthorized("bad_signature", "the signature does not match (secret, method, path or body)")
    now = time.time() if now is None else now
    if abs(now - ts) > window:
        raise _unauthorized("stale_timestamp", f"the timestamp is more than {window:g} s from this server's clock")
    if nonces is not None and not nonces.use(nonce, ts, now):
        raise _unauthorized("replayed_nonce", "this nonce was used already (a replayed request)")
    return "hmac"


class NonceCache:
    """Nonces of signed requests seen within the replay window, bounded in time and in size.

    A nonce needs remembering only while its timestamp is within the window (older ones are
    refused as stale anyway), so entries expire window seconds after their timestamp. When the
    cache is full, the entry with the oldest timestamp is dropped and its timestamp becomes a
    floor: requests signed at or before it are refused (the sender retries with a fresh signature).
    So a flood can cost a legitimate sender a retry, but never reopens a replay.
    """

    def __init__(self, window: float, max_size: int = NONCE_CACHE_SIZE):
        self.window = window
        self.max_size = max(1, max_size)
        self._seen: set[str] = set()
        self._heap: list[tuple[float, str]] = []
        self._floor = -math.inf

    def __len__(self) -> int:
        return len(self._seen)

    def resize(self, window: float, max_size: int, now: float) -> None:
        """A reload's new xfer_replay_window or size, keeping what was seen: a wider window
        cannot reopen nonces already forgotten under the narrower one, because requests signed
        before the old window's start become the floor (they were stale until now anyway)."""
        if window > self.window:
            self._floor = max(self._floor, now - self.window)
        self.window = window
        self.max_size = max(1, max_size)
        self._evict_to(self.max_size)

    def _evict_to(self, n: int) -> None:
        """Drop the oldest entries until n are left; each one's timestamp becomes the floor."""
        heap = self._heap
        while len(self._seen) > n:
            old_ts, old = heapq.heappop(heap)
            self._seen.discard(old)
            self._floor = max(self._floor, old_ts)

    def use(self, nonce: str, ts: float, now: float) -> bool:
        """Record `nonce` (signed at `ts`); False if it was seen already or cannot be checked."""
        heap = self._heap
        while heap and heap[0][0] + self.window < now:
            self._seen.discard(heapq.heappop(heap)[1])
        if ts <= self._floor or nonce in self._seen:
            return False
        self._evict_to(self.max_size - 1)  # room for this one
        if ts <= self._floor:
            return False
        self._seen.add(nonce)
        heapq.heappush(heap, (ts, nonce))
        return True
