"""Run a Relay in the foreground: event loop choice, logging, signals, clean shutdown; with
Workers > 1, a supervisor (fastrelay.supervisor) runs one of these per worker process."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastrelay import __version__, _impl
from fastrelay.config import Config

if TYPE_CHECKING:
    from fastrelay.relay import WorkerInfo

log = logging.getLogger("fastrelay")


def setup_logging(level: str = "info", tag: str = "fastrelay") -> None:
    """Log to stderr; `tag` names the process (fastrelay, fastrelay[supervisor], fastrelay[w1])."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {tag} %(levelname)s %(name)s: %(message)s"))
    handler.fastrelay_tag = tag  # type: ignore[attr-defined]  # kept by admin.logfmt.apply (Log_Format)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


async def serve(cfg: Config, stop: asyncio.Event, worker: WorkerInfo | None = None,
                ready: Callable[[], None] | None = None) -> int:
    """Start the relay (or worker `worker` of it), wait for `stop`, then shut it down cleanly.
    `ready()` is called once it serves (a worker tells its supervisor)."""
    from fastrelay.relay import Relay, StartupError

    relay = Relay(cfg, worker)
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
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    if worker is None:
        log.info(
            "fastrelay %s ready (%s hot paths, %s loop): %s",
            __version__, _impl.IMPL, loop_name, ", ".join(relay.describe_listeners()) or "no listeners",
        )
    else:
        log.info("worker %d of %d started (pid %d, %s loop, spool shard %s, %d recovered)",
                 worker.index, worker.count, os.getpid(), loop_name, relay.spool_dir, relay.recovered)
    loop = asyncio.get_running_loop()
    # SIGHUP reloads the configuration (the admin API's reload does the same; the supervisor
    # forwards it to every worker); SIGUSR1 reopens the mainlog after logrotate moved it.
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload(relay)))
    if relay.mainlog is not None:
        loop.add_signal_handler(signal.SIGUSR1, relay.mainlog.reopen)
    if ready is not None:
        ready()
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


def run(cfg: Config, use_uvloop: bool = True, log_level: str = "info") -> int:
    """`fastrelay run`: one process when Workers = 1 (no supervisor at all), else a supervisor
    and its workers."""
    if cfg.workers > 1:
        from fastrelay.supervisor import Supervisor

        setup_logging(log_level, "fastrelay[supervisor]")
        return Supervisor(cfg, cfg.workers, use_uvloop=use_uvloop, log_level=log_level).run()
    setup_logging(log_level)
    from fastrelay.admin import logfmt

    logfmt.apply(cfg)  # Log_Format: JSON lines from the first one on
    return run_loop(cfg, use_uvloop)


def run_loop(cfg: Config, use_uvloop: bool = True, worker: WorkerInfo | None = None,
             ready: Callable[[], None] | None = None) -> int:
    """Run the relay (or one worker of it) on a new event loop until SIGTERM or SIGINT."""
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
    # Once the relay serves, serve() replaces this with the reload.
    loop.add_signal_handler(signal.SIGHUP, _sighup)
    try:
        return loop.run_until_complete(serve(cfg, stop, worker, ready))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


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
