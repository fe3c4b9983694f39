# PYTHON_ARGCOMPLETE_OK
"""The `fastrelay` command: run the relay, check a conf file, evaluate an option, run the bench."""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any

from fastrelay import __version__, _impl

# No -c: the default conf embedded in the package (fastrelay/data/fastrelay.conf, the same file
# as conf/fastrelay.conf), so `fastrelay run` works from any directory after `pip install`.
DEFAULT_CONF = None
CONF_HELP = "the conf file (default: the embedded default conf, a copy of conf/fastrelay.conf)"

# Exit statuses: 2 for configuration errors (as the issue and Momentum's tools use), 1 for
# runtime failures (a listener that cannot bind, an unreadable spool).
EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2

LENIENT_HELP = ("warn about Momentum options and stanzas fastrelay does not support instead of refusing "
                "them (for a migrated Momentum conf); every other error stays an error")


def _version() -> str:
    return f"fastrelay {__version__} ({_impl.IMPL} hot paths)"


def _load(path: str | None, lenient: bool = False):
    from fastrelay.config import ConfigErrors, load

    try:
        if path is None:
            from fastrelay.paths import default_conf

            with default_conf() as embedded:
                return load(embedded, lenient=lenient), None
        return load(path, lenient=lenient), None
    except ConfigErrors as e:
        return None, e


def _load_runnable(path: str, lenient: bool) -> tuple[Any, list, list]:
    """load() and check_runnable(): the one path of check-config and run, so they always agree.
    Returns (cfg, errors, warnings); cfg is None when there are errors."""
    from fastrelay.config.model import check_runnable

    cfg, err = _load(path, lenient)
    if err is not None:
        return None, err.errors, []
    errors, warnings = check_runnable(cfg)
    return (None if errors else cfg), errors, [*cfg.warnings, *warnings]


def warning_line(e: Any) -> str:
    """A ConfigError as a warning line: file:line:col: warning: message."""
    return f"{e.file}:{e.line}:{e.col}: warning: {e.message}"


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg, errors, warnings = _load_runnable(args.file, args.lenient)
    for w in warnings:
        print(warning_line(w), file=sys.stderr)
    if cfg is None:
        for e in errors:
            print(e, file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.file}: OK")
    return EXIT_OK


def cmd_config_eval(args: argparse.Namespace) -> int:
    from fastrelay.config import momentum, schema

    cfg, err = _load(args.conf, args.lenient)
    if err is not None:
        for e in err.errors:
            print(e, file=sys.stderr)
        return EXIT_CONFIG
    opt = schema.BY_KEY.get(args.option.lower())
    if opt is None and momentum.lookup(args.option) is not None:
        kind = momentum.lookup(args.option)[0]
        print(f"fastrelay: {args.option} is a Momentum {kind} that fastrelay does not support", file=sys.stderr)
        return EXIT_CONFIG
    if opt is None:
        close = difflib.get_close_matches(args.option.lower(), list(schema.BY_KEY), n=1, cutoff=0.75)
        hint = f"; did you mean '{schema.BY_KEY[close[0]].name}'?" if close else ""
        print(f"fastrelay: unknown option '{args.option}'{hint}", file=sys.stderr)
        return EXIT_CONFIG
    domain, via = args.domain, ""
    if args.host:
        hs = cfg.host_lookup(opt.name, args.host, args.binding)
        # Momentum: a Host scope does not fall back to the binding/domain/global value.
        if hs is None:
            print(f"{opt.name} = (unset)\t# no Host stanza for {args.host} sets it")
            return EXIT_OK
        s = hs
    else:
        if domain and schema.DOMAIN in opt.scopes and opt.key != "reroute_domain":
            # The runtime delivers rerouted mail with the target domain's options (Queue, seed 000).
            target = cfg.delivery_domain(domain, args.binding)
            if target != domain:
                r = cfg.lookup("reroute_domain", domain, args.binding)
                at = "" if r.pos is None else f" at {r.pos.file}:{r.pos.line} ({r.scope})"
                domain, via = target, f"; mail to {args.domain} is rerouted to {target} (reroute_domain{at})"
        s = cfg.lookup(opt.name, domain, args.binding)
    where = "default" if s.pos is None else f"{s.pos.file}:{s.pos.line} ({s.scope})"
    line = f"{opt.name} = {opt.format(s.value)}\t# {where}{via}"
    if opt.key in _THROTTLES and s.value is not None:
        # By reference (Momentum): the throttle lives in the scope that sets it.
        line += f"; one throttle shared by everything that falls back to {s.scope}"
    print(line)
    return EXIT_OK


_THROTTLES = frozenset({"outbound_throttle_messages", "outbound_throttle_connections",
                        "cluster_outbound_throttle_messages", "cluster_outbound_throttle_connections",
                        "server_max_outbound_connections"})
def _scopes_for_show(cfg: Any) -> list[tuple[str, Any]]:
    """(stanza header, Scope) for every stanza with settings, in the conf's nesting order."""
    out: list[tuple[str, Any]] = []
    for _key, sc in sorted(cfg.binding_groups.items(), key=lambda kv: kv[0]):
        out.append((f"Binding_Group {sc.name}", sc))
        group_domains = {**cfg.group_domains.get(sc.name, {}),
                         **{dsc.name: dsc for _rx, dsc in cfg.group_regex_domains.get(sc.name, [])}}
        for dname, dsc in sorted(group_domains.items()):
            out.append((f"Binding_Group {sc.name} :: Domain {dname}", dsc))
    for _key, b in sorted(cfg.bindings.items(), key=lambda kv: kv[0]):
        out.append((f"Binding {b.scope.name}", b.scope))
        for dname, dsc in sorted({**b.domains, **{d.name: d for _rx, d in b.regex_domains}}.items()):
            out.append((f"Binding {b.scope.name} :: Domain {dname}", dsc))
        for hname, hsc in sorted({**b.hosts, **{h.name: h for _rx, h in b.regex_hosts}}.items()):
            out.append((f"Binding {b.scope.name} :: Host {hname}", hsc))
    for name, sc in sorted(cfg.domains.items(), key=lambda kv: kv[0]):
        out.append((f"Domain {name}", sc))
    for name, sc in sorted(cfg.hosts.items(), key=lambda kv: kv[0]):
        out.append((f"Host {name}", sc))
    for kind, listens in (("ESMTP_Listener", cfg.esmtp_listens), ("HTTP_Listener", cfg.http_listens)):
        seen: set[int] = set()
        for listen in listens:
            parent = listen.chain[1]
            if id(parent) not in seen:
                seen.add(id(parent))
                out.append((kind, parent))
            out.append((f"{kind} :: Listen \"{listen.address}\"", listen.chain[0]))
    return out


def cmd_config_show(args: argparse.Namespace) -> int:
    """Every option's effective value with where it was set (as Momentum's `config showrecurse`
    and Postfix's `postconf`); --non-default only what the conf writes (`postconf -n`)."""
    from fastrelay.config import schema

    cfg, err = _load(args.conf, args.lenient)
    if err is not None:
        for e in err.errors:
            print(e, file=sys.stderr)
        return EXIT_CONFIG
    print("# global")
    for opt in sorted(schema.OPTIONS, key=lambda o: o.key):
        if schema.GLOBAL not in opt.scopes:
            continue
        s = cfg.lookup(opt.name)
        if s.pos is None and args.non_default:
            continue
        where = "default" if s.pos is None else f"{s.pos.file}:{s.pos.line}"
        print(f"{opt.name} = {opt.format(s.value)}\t# {where}")
    if cfg.lookup("Spool_Base").pos is None:
        print(f"# Spool_Base unset: the spool is {cfg.spool_dir}")
    if cfg.lookup("Mainlog").pos is None:
        print(f"# Mainlog unset: the mainlog is {cfg.mainlog_path}")
    for header, sc in _scopes_for_show(cfg):
        if not sc.values and args.non_default and "Listen" not in header:
            continue
        print(f"\n# {header}")
        for key, (value, pos) in sorted(sc.values.items()):
            opt = schema.BY_KEY[key]
            print(f"{opt.name} = {opt.format(value)}\t# {pos.file}:{pos.line}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from fastrelay.config import ConfigError, overrides
    from fastrelay.runner import run

    cfg, errors, _warnings = _load_runnable(args.conf, args.lenient)
    if cfg is not None and (args.listen or args.spool or args.route):
        try:
            overrides.apply(cfg, listen=args.listen, spool=args.spool, routes=args.route)
        except ConfigError as e:
            cfg, errors = None, [e]
    if cfg is None:
        for e in errors:
            print(e, file=sys.stderr)
        return EXIT_CONFIG
    # The warnings are logged by the relay as it starts (the same ones check-config prints).
    if args.quiet_messages:
        import logging

        logging.getLogger("fastrelay.events").setLevel(logging.WARNING)
    return run(cfg, use_uvloop=not args.asyncio, log_level=args.log_level)


def cmd_drain(args: argparse.Namespace) -> int:
    from fastrelay.cluster import drain
    from fastrelay.config.types import parse_route
    from fastrelay.runner import setup_logging

    try:
        route = parse_route(args.to)
    except ValueError as e:
        print(f"fastrelay drain: --to {args.to}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if route.scheme != "xfer":
        print(f"fastrelay drain: --to {args.to}: expected an XFER peer, xfer://host?port=N", file=sys.stderr)
        return EXIT_CONFIG
    cfg, err = _load(args.conf)
    if err is not None:
        for e in err.errors:
            print(e, file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(args.log_level)
    return drain(cfg, route, args.timeout)


def cmd_bench(args: argparse.Namespace) -> int:
    from fastrelay.bench.e2e import main as bench_main

    return bench_main(args.rest)


def cmd_passwd(args: argparse.Namespace) -> int:
    """`fastrelay passwd add|remove|list [USER] -f FILE`: the SMTP AUTH password file (scrypt)."""
    import getpass
    import os

    from fastrelay.smtp.auth import PasswordFile, PasswordFileError, valid_username

    pf = PasswordFile(args.file)
    try:
        if os.path.exists(args.file) or args.action != "add":
            pf.load()
    except PasswordFileError as e:
        print(f"fastrelay passwd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.action == "list":
        for user in pf.users:
            print(user)
        return EXIT_OK
    if not args.user or not valid_username(args.user):
        print("fastrelay passwd: expected a USER: printable, no spaces, no ':'", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.action == "remove":
            if not pf.remove(args.user):
                print(f"fastrelay passwd: no user {args.user} in {args.file}", file=sys.stderr)
                return EXIT_RUNTIME
            return EXIT_OK
        # The password comes from the terminal or one line of stdin (never an argument: argv is
        # visible to every user on the machine).
        if sys.stdin.isatty():
            password = getpass.getpass(f"password for {args.user}: ")
            if getpass.getpass("again: ") != password:
                print("fastrelay passwd: the passwords differ", file=sys.stderr)
                return EXIT_RUNTIME
        else:
            password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            print("fastrelay passwd: empty password refused", file=sys.stderr)
            return EXIT_RUNTIME
        pf.set(args.user, password)
    except OSError as e:
        print(f"fastrelay passwd: {args.file}: {e.strerror or e}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def _add_passwd_parser(sub) -> None:
    pw = sub.add_parser("passwd", help="manage an SMTP AUTH password file (scrypt hashes)",
                        epilog="the password is read from the terminal, or as one line from stdin\n\nexamples:\n"
                               "  fastrelay passwd add alice@example.com -f /etc/fastrelay/passwd\n"
                               "  echo \"$PW\" | fastrelay passwd add app1 -f passwd\n"
                               "  fastrelay passwd list -f /etc/fastrelay/passwd",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pw.add_argument("action", choices=["add", "remove", "list"],
                    help="add (or change) a user, remove one, or list the users")
    pw.add_argument("user", nargs="?", metavar="USER", help="the user name (for add and remove)")
    pw.add_argument("-f", "--file", required=True, help="the password file (AuthPlainParameters' uri)")
    pw.set_defaults(func=cmd_passwd)


LOG_LEVELS = ["debug", "info", "warning", "error"]
LOG_LEVEL_HELP = "how much the process log on stderr says (default info)"

RUN_EPILOG = """examples:
  fastrelay run                                   # the embedded default conf: SMTP on 127.0.0.1:2525
  fastrelay run -c /etc/fastrelay/fastrelay.conf
  fastrelay run --listen 127.0.0.1:2600 --spool /tmp/trial-spool
  fastrelay run --route sink.test=smtp://127.0.0.1?port=2700   # mail for sink.test to a local sink
  fastrelay run --lenient -c migrated-ecelerity.conf
"""
CHECK_EPILOG = """examples:
  fastrelay check-config conf/fastrelay.conf
  fastrelay check-config --lenient ecelerity.conf   # Momentum names fastrelay lacks become warnings
exit status: 0 when the file is good, 2 with every error printed as file:line:col: message
"""
EVAL_EPILOG = """examples:
  fastrelay config eval Routes
  fastrelay config eval -c relay.conf --domain example.com retry_interval
  fastrelay config eval -c relay.conf --binding b1 --domain example.com max_outbound_connections
"""
SHOW_EPILOG = """examples:
  fastrelay config show                     # every option, with its value and where it was set
  fastrelay config show -c relay.conf --non-default   # only what the conf sets (as postconf -n)
"""


def _add_conf(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--conf", default=DEFAULT_CONF, metavar="FILE", help=CONF_HELP)


def _add_run(sub: Any) -> None:
    r = sub.add_parser("run", help="run the relay in the foreground", epilog=RUN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run the relay in the foreground until SIGINT or SIGTERM.")
    _add_conf(r)
    r.add_argument("--listen", action="append", metavar="ADDR:PORT",
                   help="accept SMTP here instead of the conf's Listen entries (repeat for more; "
                        "\"[::1]:2525\" for IPv6, port 0 for a free port)")
    r.add_argument("--spool", metavar="DIR", help="keep the spool in DIR instead of the conf's Spool_Base")
    r.add_argument("--route", action="append", metavar="DOMAIN=ROUTE",
                   help="send mail for DOMAIN to ROUTE (as Routes; several routes separated by commas), "
                        "e.g. example.com=smtp://127.0.0.1?port=2526")
    r.add_argument("--asyncio", action="store_true", help="plain asyncio instead of uvloop (debugging)")
    r.add_argument("--log-level", default="info", choices=LOG_LEVELS, help=LOG_LEVEL_HELP)
    r.add_argument("--quiet-messages", action="store_true",
                   help="no process-log line per message event (accepted, delivered, deferred, bounced, "
                        "transferred); the mainlog has them all either way")
    r.add_argument("--lenient", action="store_true", help=LENIENT_HELP)
    r.set_defaults(func=cmd_run)


def _add_check_config(sub: Any) -> None:
    c = sub.add_parser("check-config", help="check a conf file: prints OK or every error", epilog=CHECK_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("file", metavar="FILE", help="the conf file to check (its includes are checked too)")
    c.add_argument("--lenient", action="store_true", help=LENIENT_HELP)
    c.set_defaults(func=cmd_check_config)


def _add_config(sub: Any) -> None:
    cfg = sub.add_parser("config", help="query the configuration")
    csub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    ev = csub.add_parser("eval", help="print an option's effective value and the file:line that set it",
                         epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_conf(ev)
    ev.add_argument("--domain", metavar="DOMAIN", help="evaluate for mail to this domain")
    ev.add_argument("--binding", metavar="NAME", help="evaluate for mail sent on this binding")
    ev.add_argument("--lenient", action="store_true", help=LENIENT_HELP)
    ev.add_argument("--host", help="evaluate in the Host stanza of this MX (name or IP; regex stanzas match)")
    ev.add_argument("option", metavar="OPTION", help="the option's name (case-insensitive), e.g. retry_interval")
    ev.set_defaults(func=cmd_config_eval)
    sh = csub.add_parser("show", help="print the whole effective configuration",
                         epilog=SHOW_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_conf(sh)
    sh.add_argument("-n", "--non-default", action="store_true",
                    help="only the options the conf sets (as postconf -n)")
    sh.add_argument("--lenient", action="store_true", help=LENIENT_HELP)
    sh.set_defaults(func=cmd_config_show)


def _add_drain(sub: Any) -> None:
    d = sub.add_parser("drain", help="move every queued message to a peer over XFER (the relay must be stopped)",
                       epilog="example: fastrelay drain -c relay.conf --to 'xfer://10.0.0.2?port=8080'")
    _add_conf(d)
    d.add_argument("--to", required=True, metavar="PEER", help="the XFER peer: xfer://host?port=N")
    d.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="give up after this many seconds (default 300)")
    d.add_argument("--log-level", default="info", choices=LOG_LEVELS, help=LOG_LEVEL_HELP)
    d.set_defaults(func=cmd_drain)


def _add_bench(sub: Any) -> None:
    b = sub.add_parser("bench", help="end-to-end throughput tool (same as python -m fastrelay.bench.e2e)",
                       add_help=False, epilog="examples: fastrelay bench --runs 3; fastrelay bench --help")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="the bench tool's own options (fastrelay bench --help)")
    b.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastrelay", description="A durable, high-throughput mail relay.",
                                epilog="run `fastrelay COMMAND --help` for a command's options and examples",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_check_config(sub)
    _add_config(sub)
    _add_drain(sub)
    from fastrelay.admin.cli import add_admin_commands  # queue, suspend, resume, reroute-queue, reload

    add_admin_commands(sub, DEFAULT_CONF)
    _add_passwd_parser(sub)
    _add_bench(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # Everything after `bench` belongs to the bench tool (options like --messages included).
        from fastrelay.bench.e2e import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    try:  # shell completion (the `completion` extra): a no-op unless the shell asks for completions
        import argcomplete

        argcomplete.autocomplete(parser)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fastrelay config show | head`: the reader left, nothing to say
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
