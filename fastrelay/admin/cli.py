"""The operator's commands over the admin API: queue, suspend/resume, reroute-queue, reload.

Each reads the conf (-c FILE, the same default as `run`) to find the Admin_Listener and its token,
calls the running relay's API, and prints a table (or the JSON answer with --json).

Exit statuses, for scripts: 0 done; 1 the relay cannot be reached (or failed); 2 configuration
error (the conf has no Admin_Listener or does not load; a reload the relay refused); 3 a message,
suspension or endpoint was not found; 4 refused because of the message's state (being delivered,
not held); 5 not authorised (token); 6 refused as bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_CONFIG = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_AUTH = 5
EXIT_BAD = 6
# How long the CLI waits for the relay's answer (a reroute of a large queue takes a while).
TIMEOUT = 60.0


class CliError(Exception):
    def __init__(self, code: int, message: str, body: Any = None):
        super().__init__(message)
        self.code, self.message, self.body = code, message, body


def _status_exit(status: int) -> int:
    if status in (401, 403):
        return EXIT_AUTH
    if status == 404:
        return EXIT_NOT_FOUND
    if status == 409:
        return EXIT_CONFLICT
    if status == 422:
        return EXIT_CONFIG
    if 400 <= status < 500:
        return EXIT_BAD
    return EXIT_UNREACHABLE


class Client:
    """A small blocking client of one relay's admin API."""

    def __init__(self, base: str, token: str | None):
        self.base, self.token = base.rstrip("/"), token

    @classmethod
    def from_conf(cls, path: str) -> Client:
        from fastrelay.admin.api import read_token
        from fastrelay.config import ConfigErrors, load

        try:
            if path is None:  # the embedded default conf, as `fastrelay run` with no -c (issue 15)
                from fastrelay.paths import default_conf

                with default_conf() as embedded:
                    cfg = load(embedded)
                path = "the embedded default conf"
            else:
                cfg = load(path)
        except ConfigErrors as e:
            raise CliError(EXIT_CONFIG, "\n".join(str(x) for x in e.errors)) from None
        if not cfg.admin_listens:
            raise CliError(EXIT_CONFIG, f"{path}: no Admin_Listener; add Admin_Listener {{ Listen \"127.0.0.1:8025\" "
                                        "{ } } to use these commands")
        listen = cfg.admin_listens[0]
        host, port = listen.address.host, listen.address.port
        if not host or host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host != "::" else "::1"
        if not port:
            raise CliError(EXIT_CONFIG, f"{listen.pos}: the Admin_Listener has no fixed port (port 0); "
                                        "the CLI cannot find it")
        try:
            token = read_token(listen)
        except (OSError, ValueError) as e:
            raise CliError(EXIT_CONFIG, f"{listen.pos}: Admin_Token_File: {e}") from None
        h = f"[{host}]" if ":" in host else host
        return cls(f"http://{h}:{port}", token)

    def call(self, method: str, path: str, query: dict | None = None, body: dict | None = None) -> Any:
        q = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.base + path + ("?" + urllib.parse.urlencode(q) if q else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read())
                msg = err["error"]["message"]
            except (ValueError, KeyError, TypeError):
                err, msg = None, f"HTTP {e.code}"
            raise CliError(_status_exit(e.code), msg, err) from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            raise CliError(EXIT_UNREACHABLE, f"cannot reach the admin API at {self.base}: {why} "
                                             "(is the relay running?)") from None


# --- output ---------------------------------------------------------------------------------------
def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[("-" if v is None else str(v)) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        lines.append("  ".join(v.ljust(w) if i < len(r) - 1 else v for i, (v, w) in enumerate(zip(r, widths,
                                                                                                 strict=True))))
    return "\n".join(lines)


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def show_summary(s: dict) -> str:
    """qshape's table: one row per binding/domain, states, then the age buckets (minutes)."""
    head = ["DOMAIN", "BINDING", "T", "READY", "DEFER", "HELD", "ACTIVE"] + s["age_buckets"]
    rows = [["TOTAL", "", s["total"], s["by_state"]["ready"], s["by_state"]["deferred"], s["by_state"]["held"],
             s["by_state"]["in_delivery"]] + [sum(r["by_age"][i] for r in s["destinations"])
                                              for i in range(len(s["age_buckets"]))]]
    for r in s["destinations"]:
        b = r["by_state"]
        rows.append([r["domain"], r["binding"], r["total"], b["ready"], b["deferred"], b["held"], b["in_delivery"]]
                    + r["by_age"])
    out = _table(rows, head)
    if s["suspended"]:
        out += "\n\nsuspended: " + ", ".join(_susp_name(x) + (f" until {_when(x['until'])}" if x["until"] else "")
                                             for x in s["suspended"])
    return out


def _susp_name(x: dict) -> str:
    if x["domain"] and x["binding"]:
        return f"{x['binding']}::{x['domain']}"
    return x["domain"] or f"binding {x['binding']}"


def show_list(page: dict) -> str:
    rows = [[m["id"], m["state"], _age(m["age"]), m["attempts"], m["domain"], m.get("sender") or "<>",
             ",".join(m.get("recipients", []))] for m in page["messages"]]
    out = _table(rows, ["ID", "STATE", "AGE", "TRIES", "DOMAIN", "SENDER", "RECIPIENTS"])
    shown = len(page["messages"])
    if page["total"] > shown:
        out += f"\n({shown} of {page['total']}; --offset {page['offset'] + shown} for more)"
    return out


def show_message(m: dict) -> str:
    lines = [f"id:           {m['id']}", f"msgid:        {m['msgid']}", f"state:        {m['state']}",
             f"sender:       <{m['sender']}>", f"domain:       {m['domain']} (binding {m['binding']})",
             f"received:     {_when(m['received_at'])} from {m['client_ip'] or '-'} ({m['protocol']})",
             f"attempts:     {m['attempts']}", f"next attempt: {_when(m['next_attempt'])}",
             f"last error:   {m['last_error'] or '-'}", f"size:         {m['size']}", "recipients:"]
    for r in m["recipients"]:
        lines.append(f"  {r['state']:<9} <{r['address']}>" + (f"  {r['detail']}" if r["detail"] else ""))
    lines.append("headers:")
    lines += [f"  {n}: {v}" for n, v in m["headers"]]
    if "body" in m:
        lines += ["", m["body"]]
    return "\n".join(lines)


# --- commands -------------------------------------------------------------------------------------
def _each(args: argparse.Namespace, fn: Any) -> int:
    """Run `fn(client, id)` for every id; print one line each; the worst exit status wins."""
    c = Client.from_conf(args.conf)
    worst, results = EXIT_OK, []
    for i in args.ids:
        try:
            r = fn(c, i)
            results.append(r)
            if not args.json:
                print(f"{i}: {r.get('result') or r.get('state') or 'done'}")
        except CliError as e:
            if e.code == EXIT_UNREACHABLE:
                raise
            worst = max(worst, e.code)
            results.append({"id": i, "error": e.body["error"] if e.body else {"message": e.message}})
            if not args.json:
                print(f"{i}: {e.message}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    return worst


def _out(args: argparse.Namespace, data: Any, human: Any) -> int:
    print(json.dumps(data, indent=2) if args.json else human(data))
    return EXIT_OK


def cmd_summary(args: argparse.Namespace) -> int:
    return _out(args, Client.from_conf(args.conf).call("GET", "/api/v1/queue/summary"), show_summary)


def cmd_list(args: argparse.Namespace) -> int:
    q = {"domain": args.domain, "binding": args.binding, "state": args.state, "sender": args.sender,
         "recipient": args.recipient, "min_age": args.min_age, "max_age": args.max_age, "offset": args.offset,
         "limit": args.limit}
    return _out(args, Client.from_conf(args.conf).call("GET", "/api/v1/messages", q), show_list)


def cmd_show(args: argparse.Namespace) -> int:
    c = Client.from_conf(args.conf)
    m = c.call("GET", f"/api/v1/messages/{urllib.parse.quote(args.id, safe='')}",
               {"body": "true" if args.body else None})
    return _out(args, m, show_message)


def _path(i: str, tail: str = "") -> str:
    return f"/api/v1/messages/{urllib.parse.quote(i, safe='')}{tail}"


def cmd_delete(args: argparse.Namespace) -> int:
    dsn = "true" if getattr(args, "dsn", False) else None
    return _each(args, lambda c, i: c.call("DELETE", _path(i), {"dsn": dsn}))


def cmd_bounce(args: argparse.Namespace) -> int:
    return _each(args, lambda c, i: c.call("DELETE", _path(i), {"dsn": "true"}))


def cmd_hold(args: argparse.Namespace) -> int:
    return _each(args, lambda c, i: c.call("POST", _path(i, "/hold")))


def cmd_release(args: argparse.Namespace) -> int:
    return _each(args, lambda c, i: c.call("POST", _path(i, "/release")))


def cmd_flush(args: argparse.Namespace) -> int:
    c = Client.from_conf(args.conf)
    if args.id:
        args.ids = args.id
        return _each(args, lambda c, i: c.call("POST", _path(i, "/flush")))
    r = c.call("POST", "/api/v1/flush", body={"domain": args.domain} if args.domain else {})
    return _out(args, r, lambda r: f"{r['flushed']} message(s) to retry now")


def cmd_suspend(args: argparse.Namespace) -> int:
    if not args.domain and not args.binding:
        raise CliError(EXIT_BAD, "suspend needs a DOMAIN, --binding B, or both")
    body: dict[str, Any] = {}
    if args.domain:
        body["domain"] = args.domain
    if args.binding:
        body["binding"] = args.binding
    if args.for_:
        body["for"] = float(args.for_) if args.for_.replace(".", "", 1).isdigit() else args.for_
    r = Client.from_conf(args.conf).call("POST", "/api/v1/suspensions", body=body)
    return _out(args, r, lambda r: f"suspended {_susp_name(r)}" + (f" until {_when(r['until'])}" if r["until"] else ""))


def cmd_resume(args: argparse.Namespace) -> int:
    if not args.domain and not args.binding and not args.all:
        raise CliError(EXIT_BAD, "resume needs a DOMAIN, --binding B, both, or --all")
    r = Client.from_conf(args.conf).call("DELETE", "/api/v1/suspensions",
                                         {"domain": args.domain, "binding": args.binding})
    return _out(args, r, lambda r: f"resumed {r['resumed']} suspension(s)" if "suspensions" in r
                else f"resumed {_susp_name(r)}")


def cmd_reroute(args: argparse.Namespace) -> int:
    r = Client.from_conf(args.conf).call("POST", "/api/v1/reroute",
                                         body={"from": args.src, "to": args.dst, "dry_run": args.dry_run})

    def human(r: dict) -> str:
        verb = f"would move {r['would_move']}" if r["dry_run"] else f"moved {r['moved']}"
        out = f"{verb} message(s) from {r['from']} to {r['to']}"
        if r["in_delivery"]:
            out += f"; {len(r['in_delivery'])} in delivery left where they are: " + " ".join(r["in_delivery"])
        return out

    return _out(args, r, human)


def cmd_reload(args: argparse.Namespace) -> int:
    c = Client.from_conf(args.conf)
    try:
        r = c.call("POST", "/api/v1/reload")
    except CliError as e:
        if e.code == EXIT_CONFIG and e.body:
            if args.json:
                print(json.dumps(e.body, indent=2))
            else:
                print("reload refused; the running configuration stays:", file=sys.stderr)
                for line in e.body["error"].get("errors", []):
                    print(f"  {line}", file=sys.stderr)
            return EXIT_CONFIG
        raise
    return _out(args, r, lambda r: "reloaded: " + "; ".join(r["changes"]))


def _guard(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except CliError as e:
            print(f"fastrelay: {e.message}", file=sys.stderr)
            return e.code

    return run


def add_admin_commands(sub: argparse._SubParsersAction, default_conf: str | None) -> None:
    """Add queue, suspend, resume, reroute-queue and reload to the `fastrelay` parser."""
    conf_help = ("the relay's conf file, where the Admin_Listener and its token are found (default: "
                 + (default_conf or "the embedded default conf, as `fastrelay run`") + ")")

    def cmd(parent, name: str, text: str, examples: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=text, description=text, epilog="examples:\n" + examples,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-c", "--conf", default=default_conf, metavar="FILE", help=conf_help)
        p.add_argument("--json", action="store_true", help="print the API's JSON answer (for scripts)")
        return p

    q = sub.add_parser("queue", help="see and steer the queue of the running relay",
                       epilog="examples:\n  fastrelay queue summary\n  fastrelay queue list --domain example.com",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    qs = q.add_subparsers(dest="queue_command", required=True, metavar="SUBCOMMAND")
    cmd(qs, "summary", "counts by domain, binding, state and age (qshape)",
        "  fastrelay queue summary\n  fastrelay queue summary --json | jq .domains").set_defaults(
        func=_guard(cmd_summary))
    ls = cmd(qs, "list", "list queued messages, filtered and paged",
             "  fastrelay queue list --domain example.com --state deferred\n"
             "  fastrelay queue list --min-age 3600 --limit 20 --offset 20")
    ls.add_argument("--domain", help="only messages to this domain")
    ls.add_argument("--binding", help="only messages on this binding")
    ls.add_argument("--state", choices=["ready", "deferred", "held", "in_delivery"], help="only messages in this state")
    ls.add_argument("--sender", help="sender contains this")
    ls.add_argument("--recipient", help="a recipient contains this")
    ls.add_argument("--min-age", type=float, metavar="SECONDS", help="seconds in the queue, at least")
    ls.add_argument("--max-age", type=float, metavar="SECONDS", help="seconds in the queue, at most")
    ls.add_argument("--offset", type=int, default=0, help="skip this many messages (paging; default 0)")
    ls.add_argument("--limit", type=int, default=100, help="at most this many messages (default 100)")
    ls.set_defaults(func=_guard(cmd_list))
    sh = cmd(qs, "show", "one message: envelope, recipients, attempts, last error, headers",
             "  fastrelay queue show 42\n  fastrelay queue show 42 --body")
    sh.add_argument("id", metavar="ID", help="the message id (as queue list prints it)")
    sh.add_argument("--body", action="store_true", help="print the body too")
    sh.set_defaults(func=_guard(cmd_show))
    for name, fn, text in [("delete", cmd_delete, "delete messages (silently; --dsn to bounce)"),
                           ("bounce", cmd_bounce, "delete messages with a DSN to the sender"),
                           ("hold", cmd_hold, "hold messages (not tried until released)"),
                           ("release", cmd_release, "release held messages")]:
        p = cmd(qs, name, text, f"  fastrelay queue {name} 42\n  fastrelay queue {name} 42 43 44")
        p.add_argument("ids", nargs="+", metavar="ID", help="message ids (as queue list prints them)")
        if name == "delete":
            p.add_argument("--dsn", action="store_true", help="send a DSN to the sender")
        p.set_defaults(func=_guard(fn))
    fl = cmd(qs, "flush", "retry deferred mail now: all, one DOMAIN, or --id ID",
             "  fastrelay queue flush\n  fastrelay queue flush example.com\n  fastrelay queue flush --id 42")
    fl.add_argument("domain", nargs="?", metavar="DOMAIN", help="only mail to this domain")
    fl.add_argument("--id", action="append", help="one message (repeatable)")
    fl.set_defaults(func=_guard(cmd_flush))

    sp = cmd(sub, "suspend", "stop delivery to a domain, binding or binding::domain",
             "  fastrelay suspend example.com --for 1h\n  fastrelay suspend --binding mkt\n"
             "  fastrelay suspend example.com --binding mkt")
    sp.add_argument("domain", nargs="?", metavar="DOMAIN", help="the domain (with --binding: binding::domain)")
    sp.add_argument("--binding", help="the binding (alone: all its mail)")
    sp.add_argument("--for", dest="for_", metavar="TIME", help="for a while only: 600, 10m, 1h, 2d")
    sp.set_defaults(func=_guard(cmd_suspend))
    rs = cmd(sub, "resume", "end a suspension",
             "  fastrelay resume example.com\n  fastrelay resume --binding mkt\n  fastrelay resume --all")
    rs.add_argument("domain", nargs="?", metavar="DOMAIN", help="the domain suspended")
    rs.add_argument("--binding", help="the binding suspended")
    rs.add_argument("--all", action="store_true", help="end every suspension")
    rs.set_defaults(func=_guard(cmd_resume))
    rr = cmd(sub, "reroute-queue", "move the queued mail of domain A to domain B's route (Momentum's reroute queue)",
             "  fastrelay reroute-queue old.example new.example --dry-run\n"
             "  fastrelay reroute-queue old.example new.example")
    rr.add_argument("src", metavar="A", help="the domain whose queued mail moves")
    rr.add_argument("dst", metavar="B", help="the domain whose route it takes")
    rr.add_argument("--dry-run", action="store_true", help="only say what would move")
    rr.set_defaults(func=_guard(cmd_reroute))
    cmd(sub, "reload", "re-read, validate and apply the conf in the running relay (as SIGHUP)",
        "  fastrelay reload -c /etc/fastrelay/fastrelay.conf").set_defaults(func=_guard(cmd_reload))
