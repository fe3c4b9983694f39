"""The OpenAPI 3 document of the admin API, served at /openapi.json (and what the fuzz test uses)."""

from __future__ import annotations

from typing import Any

from fastrelay import __version__, limits
from fastrelay.admin.queueapi import AGE_BUCKETS, STATES

_NAME = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^[!-~]+$"}
_ERR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict, desc: str = "OK") -> dict:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: str) -> dict:
    # Every refusal has the one error shape; 4XX covers 400 (bad input), 401/403 (auth),
    # 404 (unknown id or endpoint), 409 (in delivery), 413 (too large), 422, 503 (no queue).
    out = {"4XX": _json(_ERR, "Refused: bad input, not authorised, unknown or in conflict")}
    for c in codes:
        out[c] = _json(_ERR, "Not available")
    return out


def _q(name: str, schema: dict, desc: str, required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": desc}


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": 64},
       "description": "The queue id (from the list or the summary)."}
_OBJ = {"type": "object"}
_MSG_ROW = {
    "type": "object",
    "required": ["id", "domain", "binding", "state", "age", "attempts", "next_attempt", "size"],
    "properties": {
        "id": {"type": "string"}, "domain": {"type": "string"}, "binding": {"type": "string"},
        "state": {"type": "string", "enum": list(STATES)}, "age": {"type": "number"},
        "attempts": {"type": "integer"}, "next_attempt": {"type": ["number", "null"]}, "size": {"type": "integer"},
        "sender": {"type": "string"}, "msgid": {"type": "string"},
    },
}
_SUSP = {"type": "object", "required": ["domain", "binding", "until"],
         "properties": {"domain": {"type": ["string", "null"]}, "binding": {"type": ["string", "null"]},
                        "until": {"type": ["number", "null"]}}}
_COUNTS = {"type": "object", "properties": {s: {"type": "integer"} for s in STATES}, "required": list(STATES)}


def _op(summary: str, ok: dict, params: list | None = None, body: dict | None = None, tags: str = "queue",
        extra: tuple[str, ...] = (), body_required: bool = True) -> dict:
    op: dict[str, Any] = {"summary": summary, "tags": [tags], "responses": {"200": _json(ok), **_errors(*extra)}}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": body}}}
    return op


def document() -> dict:
    dur = {"oneOf": [{"type": "null"}, {"type": "number", "exclusiveMinimum": 0, "maximum": 9999 * 86400},
                     {"type": "string", "pattern": r"^[1-9][0-9]{0,3}(ms|s|m|h|d)$"}]}
    paths = {
        "/health": {"get": {"summary": "Liveness", "tags": ["health"], "security": [],
                            "responses": {"200": _json({"type": "object", "required": ["status"],
                                                        "properties": {"status": {"enum": ["ok", "degraded"]},
                                                                       "cluster": _OBJ}})}}},
        "/ready": {"get": {"summary": "Readiness: spool open, listeners bound, disk space", "tags": ["health"],
                           "security": [],
                           "responses": {"200": _json({"type": "object", "required": ["ready", "checks"]}),
                                         "503": _json({"type": "object", "required": ["ready", "checks"]},
                                                      "Not ready")}}},
        "/api/v1/queue/summary": {"get": _op(
            "Queue summary: counts by state, and per binding and domain by state and qshape age bucket",
            {"type": "object", "required": ["total", "by_state", "age_buckets", "destinations", "suspended"],
             "properties": {"total": {"type": "integer"}, "by_state": _COUNTS,
                            "age_buckets": {"type": "array", "items": {"enum": list(AGE_BUCKETS)}},
                            "destinations": {"type": "array", "items": _OBJ},
                            "suspended": {"type": "array", "items": _SUSP},
                            "drain": {"oneOf": [{"type": "null"}, _OBJ]}}}, extra=("503",))},
        "/api/v1/messages": {"get": _op(
            "List queued messages (filters combine; paging by offset and limit)",
            {"type": "object", "required": ["total", "offset", "limit", "truncated", "messages"],
             "properties": {"total": {"type": "integer"}, "messages": {"type": "array", "items": _MSG_ROW}}},
            [_q("domain", _NAME, "queued for this domain"), _q("binding", _NAME, "on this binding"),
             _q("state", {"type": "string", "enum": list(STATES)}, "in this state"),
             _q("sender", {"type": "string", "minLength": 1, "maxLength": 254}, "sender contains this"),
             _q("recipient", {"type": "string", "minLength": 1, "maxLength": 254}, "a recipient contains this"),
             _q("min_age", {"type": "number", "minimum": 0}, "queued at least this many seconds"),
             _q("max_age", {"type": "number", "minimum": 0}, "queued at most this many seconds"),
             _q("offset", {"type": "integer", "minimum": 0, "maximum": 10**9}, "skip this many"),
             _q("limit", {"type": "integer", "minimum": 1, "maximum": limits.ADMIN_PAGE_MAX}, "page size")],
            extra=("503",))},
        "/api/v1/messages/{id}": {
            "get": _op("One message: envelope, recipients' states, attempts, last error, headers (body on request)",
                       _OBJ, [_ID, _q("body", {"type": "boolean"}, "include the body")], extra=("503",)),
            "delete": _op("Delete a message, silently or with a DSN to the sender (409 while in delivery)",
                          {"type": "object", "required": ["id", "result"]},
                          [_ID, _q("dsn", {"type": "boolean"}, "bounce it to the sender")], extra=("503",)),
        },
        "/api/v1/messages/{id}/hold": {"post": _op("Hold a message (not tried until released)", _OBJ, [_ID],
                                                   extra=("503",))},
        "/api/v1/messages/{id}/release": {"post": _op("Release a held message (due now)", _OBJ, [_ID],
                                                      extra=("503",))},
        "/api/v1/messages/{id}/flush": {"post": _op("Retry one message now", _OBJ, [_ID], extra=("503",))},
        "/api/v1/flush": {"post": _op(
            "Retry now every deferred message, or those of one domain", {"type": "object", "required": ["flushed"]},
            body={"type": "object", "additionalProperties": False, "properties": {"domain": _NAME}},
            extra=("503",), body_required=False)},
        "/api/v1/suspensions": {
            "get": _op("Suspended destinations", {"type": "object", "required": ["suspensions"],
                                                  "properties": {"suspensions": {"type": "array", "items": _SUSP}}},
                       extra=("503",)),
            "post": _op("Suspend delivery to a domain, a binding or binding::domain, optionally for a while",
                        _SUSP, body={"type": "object", "additionalProperties": False,
                                     "properties": {"domain": _NAME, "binding": _NAME, "for": dur},
                                     "anyOf": [{"required": ["domain"]}, {"required": ["binding"]}]},
                        extra=("503",)),
            "delete": _op("Resume delivery (end a suspension; with neither parameter, every one)", _OBJ,
                          [_q("domain", _NAME, "the suspended domain"), _q("binding", _NAME, "the suspended binding")],
                          extra=("503",)),
        },
        "/api/v1/reroute": {"post": _op(
            "Reroute the queue of domain `from` to domain `to` (Momentum's reroute queue)",
            {"type": "object", "required": ["from", "to", "dry_run", "moved", "would_move", "ids", "in_delivery"]},
            body={"type": "object", "additionalProperties": False, "required": ["from", "to"],
                  "properties": {"from": _NAME, "to": _NAME, "dry_run": {"type": "boolean"}}}, extra=("503",))},
        "/api/v1/reload": {"post": _op("Re-read, validate and apply the configuration file", _OBJ, tags="config",
                                       extra=("503",))},
        "/api/v1/config/eval": {"get": _op(
            "An option's effective value and where it was set (config eval)",
            {"type": "object", "required": ["option", "value", "origin", "scope"]},
            [_q("option", {"type": "string", "minLength": 1, "maxLength": 128}, "option name", True),
             _q("domain", _NAME, "for mail to this domain"), _q("binding", _NAME, "on this binding")],
            tags="config")},
        "/api/v1/inject": {"post": {
            "summary": "Inject a message: JSON envelope plus RFC 5322 content (or multipart: an envelope part and a "
                       "message part); 200 with its id once it is on disk. SMTP's relay policy and limits apply.",
            "tags": ["inject"],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {
                    "type": "object", "additionalProperties": False, "required": ["sender", "recipients"],
                    "properties": {
                        "sender": {"type": "string", "maxLength": 254, "description": "\"\" for the null sender"},
                        "recipients": {"type": "array", "minItems": 1, "maxItems": 1000,
                                       "items": {"type": "string", "minLength": 3, "maxLength": 254}},
                        "binding": {"type": "string", "minLength": 1, "maxLength": 255},
                        "content": {"type": "string", "description": "the RFC 5322 message"},
                        "content_base64": {"type": "string", "contentEncoding": "base64"}},
                    "oneOf": [{"required": ["content"]}, {"required": ["content_base64"]}]}},
                "multipart/form-data": {"schema": {
                    "type": "object", "required": ["envelope", "message"],
                    "properties": {"envelope": {"type": "string", "description": "the JSON envelope"},
                                   "message": {"type": "string", "format": "binary"}}}}}},
            "responses": {"200": _json({"type": "object", "required": ["id", "recipients", "entries"],
                                        "properties": {"id": {"type": "string"}, "recipients": {"type": "integer"},
                                                       "entries": {"type": "integer"}}}),
                          **_errors("503")}}},
        "/api/v1/audit": {"get": _op("The latest audited changes", {"type": "object", "required": ["audit"]},
                                     tags="config")},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "fastrelay admin API", "version": __version__,
                 "description": "Queue, suspensions, reroute, reload and config of a fastrelay process. "
                                "Errors are {\"error\": {\"code\", \"message\"}}."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}},
        },
        "security": [{"bearer": []}, {}],
    }
