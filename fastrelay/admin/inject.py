"""HTTP injection: POST a message with its envelope; 200 with its id only once it is on disk.

Two forms (as Momentum's REST injection and KumoMTA's inject API take them):
- application/json: {"sender": "a@x", "recipients": ["b@y", ...], "content": "RFC 5322 text"}
  (or "content_base64" for 8-bit content), optional "binding";
- multipart/form-data: a part "envelope" (that JSON without the content) and a part "message"
  (the RFC 5322 message as bytes).

The same policy as SMTP reception: a client outside relay_hosts may only send to relay_domains
(docs/reliability.md case 21); max_message_size (552 in SMTP, 413 here); max_recipients_per_message;
the text line limit (case 10) and the hop limit (case 16); the spool's free space (case 17). The
answer comes after the spool commit (P1: the same durability as the SMTP 250). Bad input is
refused whole, with every reason: nothing of a refused call is queued.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import ipaddress
import json
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from fastrelay.admin.api import ApiError, error_response
from fastrelay.message import Envelope, Recipient
from fastrelay.smtp import replies as R
from fastrelay.smtp.address import AddressError, parse_path

# JSON and base64 take more bytes than the message: the request may be this much larger.
REQUEST_OVERHEAD = 1.4
REQUEST_SLACK = 64 * 1024


class _Policy:
    """The reception limits injection shares with SMTP: the first ESMTP listener's, else global."""

    def __init__(self, relay: Any):
        servers = getattr(relay, "smtp_servers", [])
        if servers:
            s = servers[0].s
            self.relay_hosts, self.relay_domains = s.relay_hosts, s.relay_domains
            self.max_size, self.max_rcpts, self.hostname = s.max_size, s.max_recipients, s.hostname
            self.hop_limit, self.max_line = s.hop_limit, s.max_text_line
        else:
            g = relay.cfg.get
            self.relay_hosts, self.relay_domains = tuple(g("relay_hosts")), frozenset(g("relay_domains"))
            self.max_size, self.max_rcpts = g("max_message_size"), g("max_recipients_per_message")
            self.hostname, self.hop_limit = relay.hostname, g("hop_count_limit")
            self.max_line = g("max_text_line")

    def trusted(self, peer: str) -> bool:
        try:
            ip = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip.version == n.version and ip in n for n in self.relay_hosts)


def _envelope_fields(env: Any, errors: list[str]) -> tuple[str, list[str], str]:
    if not isinstance(env, dict):
        raise ApiError(400, "bad_request", "expected a JSON object envelope")
    for k in env:
        if k not in ("sender", "recipients", "binding", "content", "content_base64"):
            errors.append(f"unknown field '{str(k)[:64]}'")
    sender = env.get("sender")
    rcpts = env.get("recipients")
    binding = env.get("binding", "default")
    if not isinstance(sender, str):
        errors.append("'sender' must be a string (\"\" for the null sender <>)")
    if not isinstance(rcpts, list) or not rcpts or not all(isinstance(r, str) for r in rcpts):
        errors.append("'recipients' must be a non-empty list of addresses")
    if not isinstance(binding, str) or not binding:
        errors.append("'binding' must be a binding name")
    if errors:
        raise ApiError(400, "bad_request", "; ".join(errors))
    return sender, rcpts, binding  # type: ignore[return-value]


def _normalize(content: bytes) -> bytes:
    # JSON clients write "\n": every line end becomes CRLF (as Postfix's normalize mode,
    # docs/reliability.md case 2), and the message ends with one.
    body = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return body if body.endswith(b"\r\n") else body + b"\r\n"


def _hops(body: bytes) -> int:
    end = body.find(b"\r\n\r\n")
    head = (body if end < 0 else body[: end + 2]).lower()
    return head.count(b"\nreceived:") + (1 if head.startswith(b"received:") else 0)


async def _read(request: web.Request, limit: int) -> tuple[dict, bytes | None]:
    """The envelope object and the message bytes (None when the content is inside the JSON)."""
    ctype = request.content_type
    if ctype == "multipart/form-data":
        env: dict | None = None
        msg: bytes | None = None
        try:
            reader = await request.multipart()
            async for part in reader:
                data = bytearray()
                while chunk := await part.read_chunk():
                    data += chunk
                    if len(data) > limit + REQUEST_SLACK:  # never buffer more than the limit allows
                        raise ApiError(413, "too_large", f"the message is over max_message_size ({limit} bytes)")
                if part.name == "envelope":
                    try:
                        env = json.loads(data)
                    except (ValueError, RecursionError):
                        raise ApiError(400, "bad_json", "the envelope part is not valid JSON") from None
                elif part.name == "message":
                    msg = bytes(data)
                    if len(msg) > limit:
                        raise ApiError(413, "too_large", f"{R.SIZE_EXCEEDED.esc} the message is over "
                                                         f"max_message_size ({limit} bytes)")
        except (ValueError, AssertionError, HttpProcessingError) as e:  # malformed multipart framing
            raise ApiError(400, "bad_request", f"malformed multipart body: {str(e)[:200]}") from None
        if env is None or msg is None:
            raise ApiError(400, "bad_request", "a multipart injection needs an 'envelope' and a 'message' part")
        if not isinstance(env, dict):
            raise ApiError(400, "bad_request", "expected a JSON object envelope")
        return env, msg
    cap = int(limit * REQUEST_OVERHEAD) + REQUEST_SLACK
    if request.content_length is not None and request.content_length > cap:
        raise ApiError(413, "too_large", f"the message is over max_message_size ({limit} bytes)")
    raw = await request.content.read(cap + 1)
    if len(raw) > cap:
        raise ApiError(413, "too_large", f"the message is over max_message_size ({limit} bytes)")
    try:
        v = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_json", "the request body is not valid JSON") from None
    if not isinstance(v, dict):
        raise ApiError(400, "bad_request", "expected a JSON object")
    return v, None


async def h_inject(admin: Any, request: web.Request) -> web.Response:
    relay = admin.relay
    pol = _Policy(relay)
    env_in, msg = await _read(request, pol.max_size)
    errors: list[str] = []
    sender, rcpts, binding = _envelope_fields(env_in, errors)
    if msg is None:
        if isinstance(env_in.get("content"), str) and "content_base64" not in env_in:
            msg = env_in["content"].encode("utf-8", "surrogateescape")
        elif isinstance(env_in.get("content_base64"), str) and "content" not in env_in:
            try:
                msg = base64.b64decode(env_in["content_base64"], validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "bad_request", "'content_base64' is not valid base64") from None
        else:
            raise ApiError(400, "bad_request", "give the message as 'content' (text) or 'content_base64'")
    elif "content" in env_in or "content_base64" in env_in:
        raise ApiError(400, "bad_request", "the message is in the 'message' part; the envelope has no content")
    if binding != "default" and binding.lower() not in relay.cfg.bindings:
        errors.append(f"unknown binding '{binding[:64]}'")
    if len(rcpts) > pol.max_rcpts:
        errors.append(f"{len(rcpts)} recipients; at most {pol.max_rcpts} (max_recipients_per_message)")
    utf8 = False
    try:
        spath, _ = parse_path(f"<{sender}>", R.BAD_SENDER_SYNTAX, allow_null=True)
        utf8 = spath.utf8
        if _ or "\r" in sender or "\n" in sender:
            raise AddressError(R.BAD_SENDER_SYNTAX)
    except AddressError:
        errors.append(f"bad sender address '{sender[:254]}'")
        spath = None
    trusted = pol.trusted(request.remote or "")
    paths = []
    for i, addr in enumerate(rcpts):
        try:
            p, rest = parse_path(f"<{addr}>", R.BAD_RCPT_SYNTAX, allow_null=False)
            if rest or "\r" in addr or "\n" in addr:
                raise AddressError(R.BAD_RCPT_SYNTAX)
        except AddressError:
            errors.append(f"recipient {i}: bad address '{addr[:254]}'")
            continue
        if not trusted and (p.literal or p.domain.lower().rstrip(".") not in pol.relay_domains
                            or "%" in p.local or "!" in p.local):
            errors.append(f"recipient {i}: {R.RELAY_DENIED.esc} {R.RELAY_DENIED.text} (case 21)")
            continue
        utf8 = utf8 or p.utf8
        paths.append(p)
    if errors:
        return error_response(400 if not any("Relay access" in e for e in errors) else 403,
                              "refused", "; ".join(errors[:20]), errors=errors[:100])
    if len(msg) > pol.max_size:
        raise ApiError(413, "too_large", f"{R.SIZE_EXCEEDED.esc} the message is {len(msg)} bytes; at most "
                                         f"{pol.max_size} (max_message_size)")
    body = _normalize(msg)
    if any(len(line) > pol.max_line for line in body.split(b"\r\n")):
        raise ApiError(400, "long_line", f"{R.LONG_LINE_DATA.esc} a line is longer than {pol.max_line} bytes")
    if _hops(body) > pol.hop_limit:
        raise ApiError(400, "too_many_hops", f"{R.TOO_MANY_HOPS.esc} {R.TOO_MANY_HOPS.text}")
    if not relay.space_ok():
        raise ApiError(503, "no_space", f"{R.SPOOL_LOW_SPACE.esc} {R.SPOOL_LOW_SPACE.text}; try again later")
    from fastrelay.smtp.server import new_msgid
    from fastrelay.spool import SpoolError

    msgid = new_msgid()
    now = time.time()
    peer = request.remote or ""
    received = (f"Received: from api ([{peer}])\r\n\tby {pol.hostname} (fastrelay) with HTTP id {msgid}; "
                f"{email.utils.formatdate(now, localtime=True)}\r\n").encode("utf-8", "replace")
    full = received + body
    by_domain: dict[str, list[Recipient]] = {}
    for p in paths:
        by_domain.setdefault(p.domain.lower().rstrip("."), []).append(Recipient(p.address))
    items = [(Envelope(sender=spath.address if spath else "", recipients=rs, domain=dom,
                       mail_params="SMTPUTF8" if utf8 else "", client_ip=peer, helo="api", protocol="http",
                       binding=binding, msgid=msgid, received_at=now, first_queued=now, next_attempt=now), full)
             for dom, rs in by_domain.items()]
    try:
        await relay.submit(items)
    except SpoolError as e:
        # P1: never a 200 for mail that is not on disk.
        raise ApiError(503, "not_queued", f"{R.SPOOL_FAILED.esc} not queued: {e}; try again later") from None
    return web.json_response({"id": msgid, "recipients": len(paths), "entries": len(items)})


def add_routes(admin: Any) -> None:
    if getattr(admin.relay, "spool", None) is None:
        return

    async def handler(request: web.Request) -> web.Response:
        return await h_inject(admin, request)

    admin.app.router.add_post("/api/v1/inject", handler)

