"""Run a Relay in the foreground: event loop choice, logging, signals, clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from fastrelay import __version__, _impl
from fastrelay.config import Config

log = logging.getLogger("fastrelay")


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s fastrelay %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


async def serve(cfg: Config, stop: asyncio.Event) -> int:
    """Start the relay, wait for `stop`, then shut it down cleanly."""
    from fastrelay.relay import Relay, StartupError

    relay = Relay(cfg)
    try:
        await relay.start()
    except StartupError as e:
        log.error("cannot start: %s", e)
        await relay.stop()
        return 1
    except Exception as e:  # a bug: one clear line for the operator, the trace at debug level
        log.error("cannot start: unexpected %s: %s (run with --log-level debug for details)",
                  type(e).__name__, e)
        log.debug("startup failure", exc_info=True)
        await relay.stop()
        return 1
    loop = asyncio.get_running_loop()
    # SIGHUP reloads the configuration (the admin API's reload does the same); SIGUSR1 reopens
    # the mainlog after logrotate moved it.
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload(relay)))
    if relay.mainlog is not None:
        loop.add_signal_handler(signal.SIGUSR1, relay.mainlog.reopen)
    loop_name = type(loop).__module__.split(".")[0]
    log.info(
        "fastrelay %s ready (%s hot paths, %s loop): %s",
        __version__, _impl.IMPL, loop_name, ", ".join(relay.describe_listeners()) or "no listeners",
    )
    await stop.wait()
    route = cfg.get("Drain_On_Shutdown")
    if route is not None:
        log.info("stopping: draining the queue to %s first", route.text)
        left = await relay.drain(route, cfg.get("Drain_Timeout"))
        if left:
            log.warning("drain to %s: %d messages left in the spool", route.text, left)
    log.info("stopping")
    await relay.stop()
    log.info("stopped")
    return 0


def _sighup() -> None:
    # Until the relay is up there is nothing to reload; SIGHUP must still never kill it.
    log.warning("SIGHUP received while starting: ignored (send it again once the relay is ready)")


async def _reload(relay) -> None:
    try:
        result = await relay.reload()
    except Exception:  # a reload must never take the relay down
        log.exception("SIGHUP: reload failed; the configuration in force is unchanged")
        return
    if result.get("reloaded"):
        changes = result.get("changes") or []
        log.info("SIGHUP: configuration reloaded: %s", "; ".join(changes) if changes else "nothing changed")
    else:
        log.error("SIGHUP: reload refused, the configuration in force is unchanged: %s",
                  "; ".join(result.get("errors") or []))


def run(cfg: Config, use_uvloop: bool = True, log_level: str = "info") -> int:
    setup_logging(log_level)
    from fastrelay.admin import logfmt

    logfmt.apply(cfg)  # Log_Format: JSON lines from the first one on
    if use_uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP's default action terminates the process, silently (issue 9: "SIGHUP kills the relay,
    # with nothing logged"). Operators and init systems send it to mean "reload": never die of it.
    loop.add_signal_handler(signal.SIGHUP, _sighup)
    try:
        return loop.run_until_complete(serve(cfg, stop))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
