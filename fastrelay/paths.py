"""Default places: the embedded conf, and the spool and mainlog when the conf names none."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from importlib import resources

# The embedded default configuration, shipped inside the package (conf/fastrelay.conf is the
# same file, kept at the top of the clone for reading; tests/test_paths.py holds them equal).
DEFAULT_CONF_RESOURCE = "data/fastrelay.conf"

# As root the relay keeps the system's places (FHS: /var/spool for queues, /var/log for logs).
SYSTEM_SPOOL = "/var/spool/fastrelay"
SYSTEM_MAINLOG = "/var/log/fastrelay/mainlog"


@contextlib.contextmanager
def default_conf() -> Iterator[str]:
    """The embedded default conf as a file path, for the time of the `with`."""
    with resources.as_file(resources.files("fastrelay").joinpath(DEFAULT_CONF_RESOURCE)) as p:
        yield str(p)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def state_dir() -> str:
    """A user's own place for the relay's data: $XDG_STATE_HOME/fastrelay, or
    ~/.local/state/fastrelay (XDG Base Directory Specification: "state data that should persist
    between (application) restarts")."""
    base = os.environ.get("XDG_STATE_HOME") or ""
    if not os.path.isabs(base):  # the spec: relative values are invalid and ignored
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "fastrelay")


def default_spool() -> str:
    """Spool_Base when the conf sets none: /var/spool/fastrelay as root, else <state_dir>/spool."""
    return SYSTEM_SPOOL if _is_root() else os.path.join(state_dir(), "spool")


def default_mainlog() -> str:
    """Mainlog when the conf sets neither it nor Spool_Base: /var/log/fastrelay/mainlog as root,
    else <state_dir>/mainlog."""
    return SYSTEM_MAINLOG if _is_root() else os.path.join(state_dir(), "mainlog")
