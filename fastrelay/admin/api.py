"""The admin HTTP API (aiohttp): small JSON handlers over the queue API, with one error shape.

Every answer is JSON; every refusal is `{"error": {"code": ..., "message": ...}}` with a 4xx
status (a bug is logged and answered 500 with the same shape, never a traceback). Calls that
change something are written to the audit log ("fastrelay.admin.audit") with their caller.

Authentication: `Authorization: Bearer TOKEN` when Admin_Token or Admin_Token_File is set;
without a token only loopback clients are served. /health and /ready answer anyone (probes
carry no token and learn nothing from them).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import time
from typing import Any

from aiohttp import web

from fastrelay import limits
from fastrelay.admin.queueapi import STATES, LocalQueueAPI, QueueAPI, QueueAPIError

log = logging.getLogger("fastrelay.admin")
audit_log = logging.getLogger("fastrelay.admin.audit")

# Served to anyone: probes, and the status page's assets (which carry no data; the data they
# fetch needs the token).
OPEN_PATHS = frozenset({"/health", "/ready", "/status", "/status/app.js", "/status/style.css"})
API = "/api/v1"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
MAX_LINE = 16384
MAX_SUSPEND = 9999 * 86400.0  # what the OpenAPI pattern allows: up to 4 digits and a unit


class ApiError(QueueAPIError):
    """Bad input found by a handler (same shape as a refused queue operation)."""


def error_response(status: int, code: str, message: str, **extra: Any) -> web.Response:
    body = {"error": {"code": code, "message": message, **extra}}
    return web.json_response(body, status=status)


def parse_duration(v: Any, what: str = "for") -> float:
    """Seconds from a number or a string such as 90, "90s", "5m", "1h", "2d"."""
    if isinstance(v, bool):
        raise ApiError(400, "bad_request", f"'{what}' must be a duration such as 600, \"10m\" or \"1h\"")
    if isinstance(v, int | float):
        secs = float(v)
    elif isinstance(v, str) and (m := _DURATION.match(v)):
        secs = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ApiError(400, "bad_request", f"'{what}' must be a duration such as 600, \"10m\" or \"1h\"")
    if not 0 < secs <= MAX_SUSPEND:
        raise ApiError(400, "bad_request", f"'{what}' must be more than 0 and at most 9999 days")
    return secs


_ABSENT = object()


def _name(v: Any, what: str, optional: bool | None = True) -> str | None:
    """A domain or binding name: 1-255 printable ASCII characters, no spaces (as the OpenAPI
    document says; an internationalised domain is given in its A-label form). _ABSENT (a field not
    sent) is None when optional; a JSON null sent explicitly is refused like any non-string.
    optional=None is for query parameters, where None means absent."""
    if v is _ABSENT and optional:
        return None
    if v is None and optional is None:
        return None
    if not isinstance(v, str) or not 0 < len(v) <= 255 or not all("!" <= c <= "~" for c in v):
        raise ApiError(400, "bad_request", f"'{what}' must be 1 to 255 printable ASCII characters without spaces")
    return v


class _Query:
    """Typed query parameters; a bad one is a 400 naming it."""

    def __init__(self, request: web.Request, known: tuple[str, ...]):
        self.q = request.query
        for k in self.q:
            if k not in known:
                raise ApiError(400, "bad_request", f"unknown query parameter '{k[:64]}'; expected one of "
                                                   + ", ".join(known))

    def str(self, name: str, maxlen: int = 255, printable: bool = True) -> str | None:
        v = self.q.get(name)
        if v is None:
            return None
        if not 0 < len(v) <= maxlen or (printable and not v.isprintable()):
            raise ApiError(400, "bad_request", f"'{name}' must be 1 to {maxlen} printable characters")
        return v

    def int(self, name: str, default: int, lo: int, hi: int) -> int:
        v = self.q.get(name)
        if v is None:
            return default
        if not re.fullmatch(r"\d{1,10}", v) or not lo <= int(v) <= hi:
            raise ApiError(400, "bad_request", f"'{name}' must be a whole number from {lo} to {hi}")
        return int(v)

    def num(self, name: str) -> float | None:
        v = self.q.get(name)
        if v is None:
            return None
        try:
            f = float(v) if len(v) <= 64 else -1.0
        except ValueError:
            f = -1.0
        if not 0 <= f < float("inf"):  # also refuses nan
            raise ApiError(400, "bad_request", f"'{name}' must be a number of seconds (0 or more)")
        return f

    def bool(self, name: str) -> bool:
        v = self.q.get(name)
        if v is None:
            return False
        if v.lower() not in ("true", "false", "1", "0"):
            raise ApiError(400, "bad_request", f"'{name}' must be true or false")
        return v.lower() in ("true", "1")


async def _json_body(request: web.Request, allow_empty: bool = True) -> dict:
    if request.content_length is not None and request.content_length > limits.ADMIN_MAX_REQUEST:
        raise ApiError(413, "too_large", f"the request body is over {limits.ADMIN_MAX_REQUEST} bytes")
    raw = await request.content.read(limits.ADMIN_MAX_REQUEST + 1)
    if len(raw) > limits.ADMIN_MAX_REQUEST:
        raise ApiError(413, "too_large", f"the request body is over {limits.ADMIN_MAX_REQUEST} bytes")
    if not raw:  # no body at all; whitespace alone is not JSON
        if allow_empty:
            return {}
        raise ApiError(400, "bad_request", "expected a JSON object in the request body")
    try:
        v = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_json", "the request body is not valid JSON") from None
    if not isinstance(v, dict):
        raise ApiError(400, "bad_request", "expected a JSON object in the request body")
    return v


def _keys(body: dict, known: tuple[str, ...]) -> None:
    for k in body:
        if k not in known:
            raise ApiError(400, "bad_request", f"unknown field '{str(k)[:64]}'; expected " + ", ".join(known))


def _is_loopback(peer: str | None) -> bool:
    if not peer:
        return False
    try:
        return ipaddress.ip_address(peer.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def read_token(listen: Any) -> str | None:
    """The bearer token of an Admin_Listener Listen entry (Admin_Token, else Admin_Token_File)."""
    tok = listen.get("Admin_Token")
    if tok:
        return tok
    s = listen.lookup("Admin_Token_File")
    if s.value is None:
        return None
    path = s.value
    if not os.path.isabs(path) and s.pos is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(s.pos.file)), path)
    with open(path, encoding="utf-8") as f:
        tok = f.readline().strip()
    if not tok:
        raise ValueError(f"Admin_Token_File {path} is empty")
    return tok


class AdminApp:
    """The aiohttp application of one Admin_Listener. `relay` is a fastrelay.relay.Relay (or
    anything with the same few attributes); `queue` answers the queue calls."""

    def __init__(self, relay: Any, token: str | None, queue: QueueAPI | None = None, front: Any = None):
        self.relay = relay
        self.token = token
        self._queue = queue
        # With Workers > 1, worker 0's fastrelay.admin.workers.WorkerFront: the queue, reload and
        # /metrics of every worker, not only this one's.
        self.front = front
        self.metrics: Any = None  # fastrelay.admin.metrics.RelayMetrics, when serving a started relay
        self.audit: collections.deque[dict] = collections.deque(maxlen=limits.ADMIN_AUDIT_KEEP)
        self.app = web.Application(middlewares=[self._middleware], client_max_size=limits.ADMIN_MAX_REQUEST)
        self.app.add_routes(self.routes())
        self.extra_routes()

    def extra_routes(self) -> None:
        """Metrics, injection and the status page add their routes here."""
        from fastrelay.admin import inject, metrics, page

        metrics.add_routes(self)
        inject.add_routes(self)
        page.add_routes(self)

    @property
    def queue(self) -> QueueAPI:
        if self._queue is not None:
            return self._queue
        if self.front is not None:
            return self.front.queue
        q = getattr(self.relay, "queue", None)
        if q is None:
            raise ApiError(503, "no_queue", "delivery is not running (suspend_delivery is set): the queue API "
                                            "is not available")
        return LocalQueueAPI(q)

    def routes(self) -> list:
        r = web
        return [
            r.get("/openapi.json", self.h_openapi),
            r.get("/health", self.h_health),
            r.get("/ready", self.h_ready),
            r.get(f"{API}/queue/summary", self.h_summary),
            r.get(f"{API}/messages", self.h_list),
            r.get(f"{API}/messages/{{id}}", self.h_show),
            r.delete(f"{API}/messages/{{id}}", self.h_delete),
            r.post(f"{API}/messages/{{id}}/hold", self.h_hold),
            r.post(f"{API}/messages/{{id}}/release", self.h_release),
            r.post(f"{API}/messages/{{id}}/flush", self.h_flush_one),
            r.post(f"{API}/flush", self.h_flush),
            r.get(f"{API}/suspensions", self.h_suspensions),
            r.post(f"{API}/suspensions", self.h_suspend),
            r.delete(f"{API}/suspensions", self.h_resume),
            r.post(f"{API}/reroute", self.h_reroute),
            r.post(f"{API}/reload", self.h_reload),
            r.get(f"{API}/config/eval", self.h_config_eval),
            r.get(f"{API}/audit", self.h_audit),
        ]

    # --- middleware: auth, errors, audit ----------------------------------------------------------
    def _caller(self, request: web.Request) -> tuple[str, str | None]:
        peer = request.remote or ""
        if request.path in OPEN_PATHS:
            return peer, None
        if self.token is not None:
            got = request.headers.get("Authorization", "")
            scheme, _, cred = got.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(cred.strip().encode(), self.token.encode()):
                raise ApiError(401, "unauthorized", "send Authorization: Bearer TOKEN (the Admin_Token of the conf)")
            return peer, "token"
        if not _is_loopback(peer):
            raise ApiError(403, "forbidden", "no Admin_Token is configured: only loopback clients are served")
        return peer, "loopback"

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        peer, how = request.remote or "", None
        try:
            peer, how = self._caller(request)
            resp = await handler(request)
        except QueueAPIError as e:
            resp = error_response(e.status, e.code, e.message)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(e.status, "bad_request")
            msg = {404: f"no such endpoint {request.path[:200]!r} (see /openapi.json)",
                   405: f"{request.method} is not allowed on {request.path[:200]}"}.get(e.status, e.reason)
            resp = error_response(e.status, code, msg)
            if "Allow" in e.headers:
                resp.headers["Allow"] = e.headers["Allow"]  # RFC 9110 §15.5.6: 405 lists the methods
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("admin API: error handling %s %s", request.method, request.path)
            resp = error_response(500, "internal_error", f"internal error ({type(e).__name__}); see the process log")
        if request.method not in ("GET", "HEAD", "OPTIONS") and request.path not in OPEN_PATHS:
            self._audit(request, peer, how, resp.status)
        return resp

    def _audit(self, request: web.Request, peer: str, how: str | None, status: int) -> None:
        rec = {"time": round(time.time(), 3), "caller": peer, "auth": how or "refused", "method": request.method,
               "path": request.path[:500], "query": request.query_string[:500], "status": status}
        self.audit.append(rec)
        audit_log.info("admin %s %s%s by %s (%s): %d", rec["method"], rec["path"],
                       "?" + rec["query"] if rec["query"] else "", peer, rec["auth"], status)

    # --- handlers ---------------------------------------------------------------------------------
    async def h_openapi(self, request: web.Request) -> web.Response:
        from fastrelay.admin.openapi import document

        return web.json_response(document())

    async def h_health(self, request: web.Request) -> web.Response:
        cluster = getattr(self.relay, "cluster", None)
        if cluster is None:
            return web.json_response({"status": "ok"})
        # Alive either way: with Redis unreachable the node delivers under its local share
        # (docs/cluster.md), and says so.
        return web.json_response({"status": "degraded" if cluster.degraded else "ok", "cluster": cluster.health()})

    async def h_ready(self, request: web.Request) -> web.Response:
        r = self.relay
        spool = getattr(r, "spool", None)
        checks = {
            "spool": spool is not None and bool(spool.space_ok()),
            "listeners": all(bool(s.sockets) for s in getattr(r, "smtp_servers", [])),
            "delivery": getattr(r, "queue", None) is not None or bool(r.cfg.get("suspend_delivery")),
        }
        ok = all(checks.values())
        return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    async def h_summary(self, request: web.Request) -> web.Response:
        _Query(request, ())
        return web.json_response(await self.queue.summary())

    async def h_list(self, request: web.Request) -> web.Response:
        q = _Query(request, ("domain", "binding", "state", "sender", "recipient", "min_age", "max_age",
                             "offset", "limit"))
        state = q.str("state", 32)
        if state is not None and state not in STATES:
            raise ApiError(400, "bad_request", "'state' must be one of " + ", ".join(STATES))
        filters = {
            "domain": _name(q.str("domain"), "domain", None),
            "binding": _name(q.str("binding"), "binding", None),
            "state": state, "sender": q.str("sender", 254, False), "recipient": q.str("recipient", 254, False),
            "min_age": q.num("min_age"), "max_age": q.num("max_age"),
            "offset": q.int("offset", 0, 0, 10**9),
            "limit": q.int("limit", limits.ADMIN_PAGE_DEFAULT, 1, limits.ADMIN_PAGE_MAX),
        }
        return web.json_response(await self.queue.list(**filters))

    async def h_show(self, request: web.Request) -> web.Response:
        q = _Query(request, ("body",))
        return web.json_response(await self.queue.show(request.match_info["id"], q.bool("body")))

    async def h_delete(self, request: web.Request) -> web.Response:
        q = _Query(request, ("dsn",))
        return web.json_response(await self.queue.delete(request.match_info["id"], q.bool("dsn")))

    async def h_hold(self, request: web.Request) -> web.Response:
        _Query(request, ())
        return web.json_response(await self.queue.hold(request.match_info["id"]))

    async def h_release(self, request: web.Request) -> web.Response:
        _Query(request, ())
        return web.json_response(await self.queue.release(request.match_info["id"]))

    async def h_flush_one(self, request: web.Request) -> web.Response:
        _Query(request, ())
        return web.json_response(await self.queue.flush_one(request.match_info["id"]))

    async def h_flush(self, request: web.Request) -> web.Response:
        _Query(request, ())
        body = await _json_body(request)
        _keys(body, ("domain",))
        return web.json_response(await self.queue.flush(_name(body.get("domain", _ABSENT), "domain")))

    async def h_suspensions(self, request: web.Request) -> web.Response:
        _Query(request, ())
        return web.json_response({"suspensions": await self.queue.suspensions()})

    async def h_suspend(self, request: web.Request) -> web.Response:
        _Query(request, ())
        body = await _json_body(request, allow_empty=False)
        _keys(body, ("domain", "binding", "for"))
        domain = _name(body.get("domain", _ABSENT), "domain")
        binding = _name(body.get("binding", _ABSENT), "binding")
        secs = None if body.get("for") is None else parse_duration(body["for"])  # null: no expiry
        return web.json_response(await self.queue.suspend(domain, binding, secs))

    async def h_resume(self, request: web.Request) -> web.Response:
        q = _Query(request, ("domain", "binding"))
        domain, binding = _name(q.str("domain"), "domain", None), _name(q.str("binding"), "binding", None)
        if domain is None and binding is None:  # no target: every suspension ends
            ended = []
            for sp in await self.queue.suspensions():
                ended.append(await self.queue.resume(sp["domain"], sp["binding"]))
            return web.json_response({"resumed": len(ended), "suspensions": ended})
        return web.json_response(await self.queue.resume(domain, binding))

    async def h_reroute(self, request: web.Request) -> web.Response:
        _Query(request, ())
        body = await _json_body(request, allow_empty=False)
        _keys(body, ("from", "to", "dry_run"))
        src, dst = _name(body.get("from", _ABSENT), "from", False), _name(body.get("to", _ABSENT), "to", False)
        dry = body.get("dry_run", False)
        if not isinstance(dry, bool):
            raise ApiError(400, "bad_request", "'dry_run' must be true or false")
        return web.json_response(await self.queue.reroute(src, dst, dry))  # type: ignore[arg-type]

    async def h_reload(self, request: web.Request) -> web.Response:
        _Query(request, ())
        await _json_body(request)
        reload = self.front.reload if self.front is not None else getattr(self.relay, "reload", None)
        if reload is None:
            raise ApiError(503, "no_reload", "this process cannot reload its configuration")
        result = await reload()
        if not result["reloaded"]:
            return error_response(422, "invalid_config", "the new configuration does not validate; the old one "
                                                         "stays in force", errors=result["errors"])
        return web.json_response(result)

    async def h_config_eval(self, request: web.Request) -> web.Response:
        from fastrelay.config import schema

        q = _Query(request, ("option", "domain", "binding"))
        name = q.str("option", 128, printable=False)
        if name is None:
            raise ApiError(400, "bad_request", "'option' is required (an option name, see docs/config.md)")
        opt = schema.BY_KEY.get(name.lower())
        if opt is None:
            raise ApiError(404, "unknown_option", f"unknown option '{name}'")
        cfg = self.relay.cfg
        s = cfg.lookup(opt.name, _name(q.str("domain"), "domain", None), _name(q.str("binding"), "binding", None))
        secret = opt.name.lower() in ("admin_token", "xfer_secret", "xfer_token", "xfer_tokens")
        return web.json_response({
            "option": opt.name, "value": "(secret)" if secret and s.value is not None else opt.format(s.value),
            "origin": s.origin, "scope": s.scope})

    async def h_audit(self, request: web.Request) -> web.Response:
        _Query(request, ())
        return web.json_response({"audit": list(self.audit)})


class _RequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, with the one JSON error shape for the errors it answers
    itself (a request it cannot parse never reaches the middleware: docs/reliability.md case 7)."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if status == 400:
            why = "".join(c if c.isprintable() else " " for c in str(exc or message)[:200])
            log.info("admin API: malformed HTTP request from %s: %s", request.remote, why)
            resp = error_response(400, "bad_request", "malformed HTTP request")
        elif status == 504:
            resp = error_response(504, "timeout", "the request took too long")
        else:
            log.error("admin API: error handling a request", exc_info=exc)
            resp = error_response(500, "internal_error", "internal error; see the process log")
        resp.force_close()
        return resp


class AdminServer:
    """One Admin_Listener Listen address serving an AdminApp."""

    def __init__(self, relay: Any, listen: Any, queue: QueueAPI | None = None, front: Any = None):
        self.listen = listen
        self.api = AdminApp(relay, read_token(listen), queue, front)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str | None, port: int, sock: socket.socket | None = None) -> None:
        """Listen on host:port, or on `sock` (bound by the supervisor with Workers > 1)."""
        # A request line may carry every list filter at its longest, percent-encoded (RFC 5321
        # §4.5.3.1.3: a path is at most 256 octets): twice aiohttp's default 8190 bytes.
        runner = web.AppRunner(self.api.app, access_log=None, shutdown_timeout=5.0, max_line_size=MAX_LINE)
        await runner.setup()
        server = runner.server
        loop = asyncio.get_running_loop()
        assert server is not None

        def protocol() -> web.RequestHandler:
            return _RequestHandler(server, loop=loop, **server._kwargs)

        try:
            if sock is not None:
                self._server = await loop.create_server(protocol, sock=sock)
            else:
                self._server = await loop.create_server(protocol, host, port, reuse_address=True)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._server.sockets) if self._server is not None else []

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if getattr(self.api, "metrics", None) is not None:
            from fastrelay.admin.metrics import release

            release(self.api.relay)
            self.api.metrics = None
        if self.api.front is not None:
            await self.api.front.close()
