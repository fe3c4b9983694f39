"""The admin of a relay with Workers > 1: each worker's queue API on an internal socket, one front.

Issue 13, item 4: "the queue summary and /metrics add up over all workers." The supervisor binds
the Admin_Listener sockets and hands them to worker 0 only (a second worker binding the same
address would fail). Every other worker serves its queue API, its /metrics text and its reload on
an internal loopback socket, also bound by the supervisor (so a restarted worker's successor gets the
same address, and requests queued on it wait for the successor). Worker 0's admin serves a
GatherQueueAPI (fastrelay.admin.queueapi) over its own queue and a RemoteQueueAPI per other
worker: ids are "WORKER.ID", counts are summed. Each request carries a per-run secret the
supervisor made, so nothing else on the host can call a worker's internal API.

Workers = 1 never gets here: its admin is the in-process one it always was.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from fastrelay import limits
from fastrelay.admin.queueapi import GatherQueueAPI, LocalQueueAPI, QueueAPI, QueueAPIError

log = logging.getLogger("fastrelay.admin")

SECRET_HEADER = "X-Fastrelay-Worker-Secret"
# The QueueAPI methods a front may call on a worker (nothing else is dispatched by name).
METHODS = frozenset({"summary", "list", "show", "delete", "hold", "release", "flush_one", "flush",
                     "suspensions", "suspend", "resume", "reroute"})
# Gauges that describe the one filesystem or cluster all workers share: not summed over workers.
_SHARED_GAUGES = {"fastrelay_spool_free_bytes": max, "fastrelay_cluster_redis_up": min,
                  "fastrelay_cluster_live_nodes": max}


def _no_queue() -> QueueAPIError:
    return QueueAPIError(503, "no_queue", "delivery is not running (suspend_delivery is set): the queue API "
                                          "is not available")


class RemoteQueueAPI:
    """The QueueAPI of worker `index`, reached over its internal loopback socket."""

    def __init__(self, index: int, addr: str, secret: str):
        self.index, self.base, self.secret = index, f"http://{addr}", secret
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=limits.WORKER_ADMIN_TIMEOUT),
                headers={SECRET_HEADER: self.secret})
        return self._session

    async def request(self, method: str, path: str, payload: Any = None) -> tuple[int, bytes]:
        try:
            async with self._client().request(method, self.base + path, json=payload) as r:
                return r.status, await r.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise QueueAPIError(503, "worker_unavailable",
                                f"worker {self.index} is not answering ({type(e).__name__}); it may be "
                                "restarting: try again") from None

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        status, raw = await self.request("POST", f"/q/{method}", {"args": list(args), "kwargs": kwargs})
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if status != 200 or not isinstance(doc, dict) or "result" not in doc:
            err = doc.get("error") if isinstance(doc, dict) else None
            if isinstance(err, dict):
                raise QueueAPIError(status, str(err.get("code")), str(err.get("message")))
            raise QueueAPIError(502, "worker_error", f"worker {self.index} answered {status}")
        return doc["result"]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def summary(self) -> dict:
        return await self._call("summary")

    async def list(self, **filters: Any) -> dict:
        return await self._call("list", **filters)

    async def show(self, id: str, body: bool = False) -> dict:
        return await self._call("show", id, body)

    async def delete(self, id: str, dsn: bool = False) -> dict:
        return await self._call("delete", id, dsn)

    async def hold(self, id: str) -> dict:
        return await self._call("hold", id)

    async def release(self, id: str) -> dict:
        return await self._call("release", id)

    async def flush_one(self, id: str) -> dict:
        return await self._call("flush_one", id)

    async def flush(self, domain: str | None = None) -> dict:
        return await self._call("flush", domain)

    async def suspensions(self) -> list[dict]:
        return await self._call("suspensions")

    async def suspend(self, domain: str | None, binding: str | None, seconds: float | None) -> dict:
        return await self._call("suspend", domain, binding, seconds)

    async def resume(self, domain: str | None, binding: str | None) -> dict:
        return await self._call("resume", domain, binding)

    async def reroute(self, src: str, dst: str, dry_run: bool = False) -> dict:
        return await self._call("reroute", src, dst, dry_run)


class InternalServer:
    """A worker's internal admin endpoint (its queue API, /metrics and reload) on the loopback
    socket the supervisor bound for it."""

    def __init__(self, relay: Any, sock: Any, secret: str):
        from fastrelay.admin.metrics import metrics_for

        self.relay, self.sock, self.secret = relay, sock, secret
        # The worker's own counters start with it (its admin listener is worker 0's front).
        self.metrics = metrics_for(relay)
        self.app = web.Application(middlewares=[self._auth], client_max_size=limits.ADMIN_MAX_REQUEST)
        self.app.add_routes([web.post("/q/{method}", self.h_call), web.get("/metrics", self.h_metrics),
                             web.post("/reload", self.h_reload)])
        self._runner: web.AppRunner | None = None

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        got = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(got.encode(), self.secret.encode()):
            return _error(403, "forbidden", "not a worker of this relay")
        try:
            return await handler(request)
        except QueueAPIError as e:
            return _error(e.status, e.code, e.message)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("internal admin API: error handling %s", request.path)
            return _error(500, "internal_error", f"internal error in a worker ({type(e).__name__}); see the "
                                                 "process log")

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.SockSite(self._runner, self.sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.metrics is not None:
            from fastrelay.admin.metrics import release

            release(self.relay)
            self.metrics = None

    async def h_call(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if method not in METHODS:
            return _error(404, "not_found", f"no queue method {method[:64]!r}")
        q = getattr(self.relay, "queue", None)
        if q is None:
            raise _no_queue()
        try:
            doc = await request.json()
            args, kwargs = list(doc["args"]), dict(doc["kwargs"])
        except (ValueError, KeyError, TypeError):
            return _error(400, "bad_request", "expected {\"args\": [...], \"kwargs\": {...}}")
        result = await getattr(LocalQueueAPI(q), method)(*args, **kwargs)
        return web.json_response({"result": result})

    async def h_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain")

    async def h_reload(self, request: web.Request) -> web.Response:
        return web.json_response(await self.relay.reload())


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class WorkerFront:
    """What worker 0's admin listeners serve with Workers > 1: the queue API, reload and /metrics
    of the whole relay (this worker's own, gathered with every other worker's)."""

    def __init__(self, relay: Any, peers: list[str], secret: str):
        self.relay = relay
        self.remotes = [RemoteQueueAPI(k, path, secret) for k, path in enumerate(peers) if k != relay.shard]

    @property
    def queue(self) -> QueueAPI:
        q = getattr(self.relay, "queue", None)
        if q is None:  # every worker runs the same conf: none of them delivers
            raise _no_queue()
        workers: list[QueueAPI] = [LocalQueueAPI(q), *self.remotes]
        return GatherQueueAPI(workers)

    async def reload(self) -> dict:
        """Reload here first: a conf that does not validate here is refused whole (all workers read
        the same files), and no other worker is asked."""
        result = await self.relay.reload()
        if not result.get("reloaded"):
            return result
        per = [{"worker": self.relay.shard, "reloaded": True}]
        errors: list[str] = []
        for r in self.remotes:
            try:
                status, raw = await r.request("POST", "/reload")
                doc = json.loads(raw) if status == 200 else {"reloaded": False, "errors": [f"answered {status}"]}
            except (QueueAPIError, ValueError) as e:
                doc = {"reloaded": False, "errors": [str(e)]}
            per.append({"worker": r.index, "reloaded": bool(doc.get("reloaded"))})
            errors += [f"worker {r.index}: {e}" for e in doc.get("errors") or []]
        per.sort(key=lambda w: w["worker"])
        return {**result, "workers": per, "errors": errors}

    async def metrics(self, local: bytes) -> bytes:
        """This worker's /metrics text and every other worker's, added up (a worker that does not
        answer is left out, and counted in fastrelay_admin_workers_unreachable)."""
        texts = [local.decode()]
        missing = 0
        for r in self.remotes:
            try:
                status, raw = await r.request("GET", "/metrics")
            except QueueAPIError:
                status, raw = 0, b""
            if status == 200:
                texts.append(raw.decode())
            else:
                missing += 1
        return merge_metrics(texts, missing)

    async def close(self) -> None:
        for r in self.remotes:
            await r.close()


def merge_metrics(texts: list[str], missing: int = 0) -> bytes:
    """Prometheus texts of several workers as one: every sample with the same name and labels
    summed (counters, histograms' buckets, counts and sums, queue and connection gauges), except
    gauges of the one filesystem or cluster they share, and *_created (the earliest)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            acc = values[fam.name]
            pick = _SHARED_GAUGES.get(fam.name)
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in acc:
                    acc[key] = s.value
                elif s.name.endswith("_created"):
                    acc[key] = min(acc[key], s.value)
                elif pick is not None:
                    acc[key] = pick(acc[key], s.value)
                else:
                    acc[key] += s.value
    unreachable = Metric("fastrelay_admin_workers_unreachable", "Workers whose metrics this scrape could not "
                         "read (left out of every sum above)", "gauge")
    unreachable.add_sample("fastrelay_admin_workers_unreachable", {}, missing)
    out = []
    for name, fam in families.items():
        for (sname, labels), v in values[name].items():
            fam.add_sample(sname, dict(labels), v)
        out.append(fam)
    out.append(unreachable)

    class _Static:
        def collect(self) -> Any:
            return out

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Static())
    return generate_latest(reg)
