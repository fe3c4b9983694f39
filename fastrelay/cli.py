"""The `fastrelay` command: run the relay, check a conf file, evaluate an option, run the bench."""

from __future__ import annotations

import argparse
import difflib
import sys

from fastrelay import __version__, _impl

DEFAULT_CONF = "conf/fastrelay.conf"

# Exit statuses: 2 for configuration errors (as the issue and Momentum's tools use), 1 for
# runtime failures (a listener that cannot bind, an unreadable spool).
EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def _version() -> str:
    return f"fastrelay {__version__} ({_impl.IMPL} hot paths)"


def _load(path: str):
    from fastrelay.config import ConfigErrors, load

    try:
        return load(path), None
    except ConfigErrors as e:
        return None, e


def cmd_check_config(args: argparse.Namespace) -> int:
    _cfg, err = _load(args.file)
    if err is not None:
        for e in err.errors:
            print(e, file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.file}: OK")
    return EXIT_OK


def cmd_config_eval(args: argparse.Namespace) -> int:
    from fastrelay.config import schema

    cfg, err = _load(args.conf)
    if err is not None:
        for e in err.errors:
            print(e, file=sys.stderr)
        return EXIT_CONFIG
    opt = schema.BY_KEY.get(args.option.lower())
    if opt is None:
        close = difflib.get_close_matches(args.option.lower(), list(schema.BY_KEY), n=1, cutoff=0.75)
        hint = f"; did you mean '{schema.BY_KEY[close[0]].name}'?" if close else ""
        print(f"fastrelay: unknown option '{args.option}'{hint}", file=sys.stderr)
        return EXIT_CONFIG
    s = cfg.lookup(opt.name, args.domain, args.binding)
    where = "default" if s.pos is None else f"{s.pos.file}:{s.pos.line} ({s.scope})"
    print(f"{opt.name} = {opt.format(s.value)}\t# {where}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from fastrelay.runner import run

    cfg, err = _load(args.conf)
    if err is not None:
        for e in err.errors:
            print(e, file=sys.stderr)
        return EXIT_CONFIG
    return run(cfg, use_uvloop=not args.asyncio, log_level=args.log_level)


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.e2e import main as bench_main

    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastrelay", description="A durable, high-throughput mail relay.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the relay")
    r.add_argument("-c", "--conf", default=DEFAULT_CONF, help=f"conf file (default {DEFAULT_CONF})")
    r.add_argument("--asyncio", action="store_true", help="plain asyncio instead of uvloop (debugging)")
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check-config", help="check a conf file: prints OK or every error")
    c.add_argument("file")
    c.set_defaults(func=cmd_check_config)

    cfg = sub.add_parser("config", help="query the configuration")
    csub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    ev = csub.add_parser("eval", help="print an option's effective value and the file:line that set it")
    ev.add_argument("-c", "--conf", default=DEFAULT_CONF)
    ev.add_argument("--domain", help="evaluate for mail to this domain")
    ev.add_argument("--binding", help="evaluate for this binding")
    ev.add_argument("option")
    ev.set_defaults(func=cmd_config_eval)

    from fastrelay.admin.cli import add_admin_commands  # queue, suspend, resume, reroute-queue, reload

    add_admin_commands(sub, DEFAULT_CONF)

    b = sub.add_parser("bench", help="end-to-end throughput tool (same as python -m bench.e2e)",
                       add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # Everything after `bench` belongs to the bench tool (options like --messages included).
        from bench.e2e import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
