"""The live status page: shipped HTML, CSS and JS (no CDN) drawing SVG charts from /status/data.json."""

from __future__ import annotations

import os
import time
from typing import Any

from aiohttp import web

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = {"/status": ("index.html", "text/html"), "/status/app.js": ("app.js", "application/javascript"),
          "/status/style.css": ("style.css", "text/css")}
# Domains the page lists (by queue size), each with its last error.
TOP_DOMAINS = 10


def _asset(name: str, ctype: str) -> Any:
    with open(os.path.join(HERE, name), "rb") as f:
        data = f.read()

    async def handler(request: web.Request) -> web.Response:
        # The assets carry no data: they are served without a token; the data they fetch is not.
        return web.Response(body=data, content_type=ctype, charset="utf-8",
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                                     "Content-Security-Policy": "default-src 'self'; img-src 'self' data:"})

    return handler


async def data(admin: Any) -> dict:
    """Everything the page shows, in one answer."""
    q = admin.queue
    summary = await q.summary()
    per_domain: dict[str, dict] = {}
    for r in summary["destinations"]:
        d = per_domain.setdefault(r["domain"], {"domain": r["domain"], "total": 0, "by_state": dict.fromkeys(
            r["by_state"], 0), "size": 0, "last_error": None})
        d["total"] += r["total"]
        d["size"] += r["size"]
        for k, v in r["by_state"].items():
            d["by_state"][k] += v
    top = sorted(per_domain.values(), key=lambda d: (-d["total"], d["domain"]))[:TOP_DOMAINS]
    for d in top:
        if d["by_state"]["deferred"] or d["by_state"]["held"]:
            page = await q.list(domain=d["domain"], state="deferred", limit=1)
            if page["messages"]:
                try:
                    d["last_error"] = (await q.show(page["messages"][0]["id"]))["last_error"]
                except Exception:  # gone in between: no error to show
                    d["last_error"] = None
    m = admin.metrics
    return {
        "time": time.time(),
        "total": summary["total"], "by_state": summary["by_state"], "top_domains": top,
        "suspended": summary["suspended"],
        "history": list(m.history) if m is not None else [],
        "disk": m.spool_disk() if m is not None else None,
        "connections": m.connections() if m is not None else None,
    }


def add_routes(admin: Any) -> None:
    for path, (name, ctype) in ASSETS.items():  # fastrelay.admin.api.OPEN_PATHS lists them
        admin.app.router.add_get(path, _asset(name, ctype))

    async def h_data(request: web.Request) -> web.Response:
        return web.json_response(await data(admin))

    admin.app.router.add_get("/status/data.json", h_data)
