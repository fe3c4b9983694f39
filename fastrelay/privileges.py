"""Drop root privileges to the Security stanza's User and Group once the listeners are bound."""

from __future__ import annotations

import grp
import importlib
import logging
import os
import pwd

log = logging.getLogger("fastrelay.privileges")

# Loaded before the drop: the installed files (a venv under /root, say) may not be readable by the
# user the relay becomes, and these are imported on first use.
_PRELOAD = ("fastrelay.queue", "fastrelay.delivery.connect", "fastrelay.delivery.smtp", "fastrelay.delivery.lmtp",
            "fastrelay.delivery.xfer", "fastrelay.dns", "fastrelay.routing", "fastrelay.bounce",
            "fastrelay.xfer.server", "fastrelay.cluster", "encodings.idna", "email.utils", "email.headerregistry")


class PrivilegeError(Exception):
    """The drop cannot be made (unknown user or group, not root): the relay does not start."""


def target(user: str, group: str | None) -> tuple[int, int, str]:
    """(uid, gid, name) for `user` and `group` (default: the user's own group)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"Security User = \"{user}\": no such user") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"Security Group = \"{group}\": no such group") from None
    return pw.pw_uid, gid, pw.pw_name


def drop(user: str, group: str | None) -> None:
    """Become `user` (and `group`) for good: supplementary groups first, then the gid, then the uid,
    so that nothing of root is left (setuid last, or setgid would be refused). Already that user:
    nothing to do. Not root: PrivilegeError."""
    uid, gid, name = target(user, group)
    if os.geteuid() == uid and os.getegid() == gid:
        return
    if os.geteuid() != 0:
        raise PrivilegeError(f"Security User = \"{user}\" needs the relay to be started as root "
                             f"(it runs as uid {os.geteuid()}); expected root, or no Security stanza")
    for mod in _PRELOAD:
        try:
            importlib.import_module(mod)
        except ImportError:  # an optional dependency (redis) that is not installed: not needed then
            pass
    os.initgroups(name, gid)
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:  # pragma: no cover - the kernel refused
        raise PrivilegeError(f"could not drop privileges to {user}")
    log.info("running as user %s (uid %d, gid %d)", name, uid, gid)
