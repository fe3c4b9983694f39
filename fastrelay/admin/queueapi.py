"""The queue API the admin talks to: one interface, a local queue behind it, or several workers'."""

from __future__ import annotations

from typing import Any, Protocol

from fastrelay.message import DELIVERED, FAILED, PENDING

# Message states as the operator sees them (Postfix's active/deferred/hold queues, plus ready).
STATES = ("ready", "deferred", "held", "in_delivery")
RCPT_STATES = {PENDING: "pending", DELIVERED: "delivered", FAILED: "failed"}
# qshape's default age buckets, in minutes: a message counts in the first bucket its age fits.
AGE_BUCKETS = ("5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+")
_BUCKET_LIMITS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
# Headers shown by `show` are cut here (a message is for reading, not for the whole header block).
MAX_SHOWN_HEADERS = 200


class QueueAPIError(Exception):
    """A refused queue operation: the HTTP status, a short machine code and a sentence."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def age_bucket(age_seconds: float) -> int:
    minutes = age_seconds / 60.0
    for i, lim in enumerate(_BUCKET_LIMITS):
        if minutes < lim:
            return i
    return len(_BUCKET_LIMITS)


def split_headers(data: bytes) -> list[list[str]]:
    """The header fields of an RFC 5322 message as [name, value] (unfolded, RFC 5322 §2.2.3)."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    out: list[list[str]] = []
    for line in head.decode("utf-8", "replace").split("\r\n"):
        if line[:1] in (" ", "\t") and out:
            out[-1][1] += " " + line.strip()
        elif ":" in line:
            name, _, value = line.partition(":")
            out.append([name.strip(), value.strip()])
        if len(out) >= MAX_SHOWN_HEADERS:
            break
    return out


class QueueAPI(Protocol):
    """What the admin needs from a queue. Every answer is JSON-ready; ids are strings so a front
    over several workers can qualify them."""

    async def summary(self) -> dict: ...
    async def list(self, **filters: Any) -> dict: ...
    async def show(self, id: str, body: bool = False) -> dict: ...
    async def delete(self, id: str, dsn: bool = False) -> dict: ...
    async def hold(self, id: str) -> dict: ...
    async def release(self, id: str) -> dict: ...
    async def flush_one(self, id: str) -> dict: ...
    async def flush(self, domain: str | None = None) -> dict: ...
    async def suspensions(self) -> list[dict]: ...
    async def suspend(self, domain: str | None, binding: str | None, seconds: float | None) -> dict: ...
    async def resume(self, domain: str | None, binding: str | None) -> dict: ...
    async def reroute(self, src: str, dst: str, dry_run: bool = False) -> dict: ...


class LocalQueueAPI:
    """The QueueAPI of the queue in this process (fastrelay.queue.Queue's queue API section)."""

    def __init__(self, queue: Any):
        self.q = queue

    async def summary(self) -> dict:
        return await self.q.api_summary()

    async def list(self, **filters: Any) -> dict:
        return await self.q.api_list(**filters)

    async def show(self, id: str, body: bool = False) -> dict:
        return await self.q.api_show(id, body)

    async def delete(self, id: str, dsn: bool = False) -> dict:
        return await self.q.api_delete(id, dsn)

    async def hold(self, id: str) -> dict:
        return await self.q.api_hold(id)

    async def release(self, id: str) -> dict:
        return await self.q.api_release(id)

    async def flush_one(self, id: str) -> dict:
        return await self.q.api_flush_one(id)

    async def flush(self, domain: str | None = None) -> dict:
        return await self.q.api_flush(domain)

    async def suspensions(self) -> list[dict]:
        return self.q.api_suspensions()

    async def suspend(self, domain: str | None, binding: str | None, seconds: float | None) -> dict:
        return await self.q.api_suspend(domain, binding, seconds)

    async def resume(self, domain: str | None, binding: str | None) -> dict:
        return await self.q.api_resume(domain, binding)

    async def reroute(self, src: str, dst: str, dry_run: bool = False) -> dict:
        return await self.q.api_reroute(src, dst, dry_run)


class GatherQueueAPI:
    """A front over several workers' queues (each a QueueAPI): ids are "WORKER.ID", counts are
    summed, lists are merged, and steering commands go to every worker (suspend, flush,
    reroute) or to the one an id names."""

    def __init__(self, workers: list[QueueAPI]):
        self.workers = workers

    def _split(self, id: str) -> tuple[QueueAPI, str]:
        w, sep, local = str(id).partition(".")
        if not sep or not w.isdigit() or int(w) >= len(self.workers):
            raise QueueAPIError(404, "not_found", f"no queued message {id!r}")
        return self.workers[int(w)], local

    @staticmethod
    def _qualify(n: int, row: dict) -> dict:
        return {**row, "id": f"{n}.{row['id']}"}

    async def summary(self) -> dict:
        out: dict = {"total": 0, "by_state": dict.fromkeys(STATES, 0), "age_buckets": list(AGE_BUCKETS),
                     "destinations": [], "suspended": []}
        rows: dict[tuple[str, str], dict] = {}
        for w in self.workers:
            s = await w.summary()
            out["total"] += s["total"]
            for k, v in s["by_state"].items():
                out["by_state"][k] += v
            for r in s["destinations"]:
                acc = rows.get((r["binding"], r["domain"]))
                if acc is None:
                    rows[(r["binding"], r["domain"])] = {**r, "by_state": dict(r["by_state"]),
                                                         "by_age": list(r["by_age"])}
                    continue
                acc["total"] += r["total"]
                acc["size"] += r["size"]
                for k, v in r["by_state"].items():
                    acc["by_state"][k] += v
                acc["by_age"] = [a + b for a, b in zip(acc["by_age"], r["by_age"], strict=True)]
            for sp in s["suspended"]:
                if sp not in out["suspended"]:
                    out["suspended"].append(sp)
        out["destinations"] = sorted(rows.values(), key=lambda r: (-r["total"], r["domain"], r["binding"]))
        return out

    async def list(self, offset: int = 0, limit: int = 100, **filters: Any) -> dict:
        msgs: list[dict] = []
        total, truncated = 0, False
        for n, w in enumerate(self.workers):
            page = await w.list(offset=0, limit=offset + limit, **filters)
            total += page["total"]
            truncated = truncated or page["truncated"]
            msgs += [self._qualify(n, r) for r in page["messages"]]
        msgs.sort(key=lambda r: (r["age"], r["id"]), reverse=True)
        return {"total": total, "offset": offset, "limit": limit, "truncated": truncated,
                "messages": msgs[offset: offset + limit]}

    async def _one(self, method: str, id: str, *args: Any) -> dict:
        w, local = self._split(id)
        n = self.workers.index(w)
        return self._qualify(n, await getattr(w, method)(local, *args))

    async def show(self, id: str, body: bool = False) -> dict:
        return await self._one("show", id, body)

    async def delete(self, id: str, dsn: bool = False) -> dict:
        return await self._one("delete", id, dsn)

    async def hold(self, id: str) -> dict:
        return await self._one("hold", id)

    async def release(self, id: str) -> dict:
        return await self._one("release", id)

    async def flush_one(self, id: str) -> dict:
        return await self._one("flush_one", id)

    async def flush(self, domain: str | None = None) -> dict:
        n = 0
        for w in self.workers:
            n += (await w.flush(domain))["flushed"]
        return {"flushed": n, "domain": domain.lower() if domain else None}

    async def suspensions(self) -> list[dict]:
        return (await self.workers[0].suspensions()) if self.workers else []

    async def suspend(self, domain: str | None, binding: str | None, seconds: float | None) -> dict:
        out: dict = {}
        for w in self.workers:
            out = await w.suspend(domain, binding, seconds)
        return out

    async def resume(self, domain: str | None, binding: str | None) -> dict:
        out: dict = {}
        for w in self.workers:
            out = await w.resume(domain, binding)
        return out

    async def reroute(self, src: str, dst: str, dry_run: bool = False) -> dict:
        out: dict = {"from": src.lower(), "to": dst.lower(), "dry_run": dry_run, "moved": 0, "would_move": 0,
                     "ids": [], "in_delivery": []}
        for n, w in enumerate(self.workers):
            r = await w.reroute(src, dst, dry_run)
            out["moved"] += r["moved"]
            out["would_move"] += r["would_move"]
            out["ids"] += [f"{n}.{i}" for i in r["ids"]]
            out["in_delivery"] += [f"{n}.{i}" for i in r["in_delivery"]]
        return out
