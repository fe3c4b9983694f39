"""Server side of SMTP AUTH: the scrypt password file, SASL PLAIN and LOGIN decoding, and the failure guard.

The password file holds one `user:$scrypt$n=N,r=R,p=P$SALT$HASH` line per user (salt and hash in
base64; `#` lines and blank lines are kept as they are). `fastrelay passwd add|remove|list` writes
it; the listener re-reads it when it changes, so users can be added while the relay runs.
Passwords are never stored, logged or kept after the check (issue 17).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import tempfile
import time
import weakref
from dataclasses import dataclass

from fastrelay import limits

__all__ = ["AuthGuard", "ListenerAuth", "PasswordFile", "PasswordFileError", "SaslError", "check_hash",
           "decode_b64", "hash_password", "listener_auth", "parse_plain", "shared_failures", "valid_username"]

_PREFIX = "$scrypt$"


class PasswordFileError(Exception):
    """The password file cannot be read or has a bad line (`path:line: ...`)."""


class SaslError(Exception):
    """A SASL response that is not well-formed (RFC 4954 §4: 501 for bad base64)."""


def valid_username(user: str) -> bool:
    """Printable, no white space, no ':' (the file's separator), at most 255 characters."""
    return 0 < len(user) <= 255 and user.isprintable() and ":" not in user and not any(c.isspace() for c in user)


def hash_password(password: str, n: int = limits.SCRYPT_N, r: int = limits.SCRYPT_R,
                  p: int = limits.SCRYPT_P) -> str:
    """A salted scrypt hash (RFC 7914) in the password file's format."""
    salt = secrets.token_bytes(16)
    dk = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=_maxmem(n, r, p))
    return f"{_PREFIX}n={n},r={r},p={p}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def _maxmem(n: int, r: int, p: int) -> int:
    return 128 * r * (n + p + 2) + (1 << 20)


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """(n, r, p, salt, hash) of a stored hash; ValueError if it is not one."""
    if not stored.startswith(_PREFIX):
        raise ValueError("expected a $scrypt$ hash (written by `fastrelay passwd add`)")
    parts = stored[len(_PREFIX):].split("$")
    if len(parts) != 3:
        raise ValueError("expected $scrypt$n=N,r=R,p=P$SALT$HASH")
    try:
        params = dict(kv.split("=", 1) for kv in parts[0].split(","))
        n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
        salt = base64.b64decode(parts[1], validate=True)
        dk = base64.b64decode(parts[2], validate=True)
    except (ValueError, KeyError, binascii.Error):
        raise ValueError("expected $scrypt$n=N,r=R,p=P$SALT$HASH (base64 salt and hash)") from None
    if n < 2 or n & (n - 1) or n > limits.SCRYPT_MAX_N or not 1 <= r <= 64 or not 1 <= p <= 16 or not dk:
        raise ValueError(f"scrypt parameters out of range (n a power of 2 up to {limits.SCRYPT_MAX_N}, "
                         "r 1-64, p 1-16)")
    return n, r, p, salt, dk


def check_hash(stored: str, password: str) -> bool:
    """Whether `password` matches `stored` (compared in constant time)."""
    n, r, p, salt, dk = _parse_hash(stored)
    got = hashlib.scrypt(password.encode("utf-8", "surrogateescape"), salt=salt, n=n, r=r, p=p, dklen=len(dk),
                         maxmem=_maxmem(n, r, p))
    return hmac.compare_digest(got, dk)


_dummy: list[str] = []


def _dummy_hash() -> str:
    """Checked for unknown users, so that "no such user" takes as long as "wrong password" (made
    on first use: hashing costs what a login costs)."""
    if not _dummy:
        _dummy.append(hash_password(secrets.token_urlsafe(16)))
    return _dummy[0]


class PasswordFile:
    """One password file, re-read when it changes (size, mtime or inode)."""

    def __init__(self, path: str):
        self.path = path
        self._stamp: tuple | None = None
        self.users: dict[str, str] = {}
        self.lines: list[str] = []  # as written, for rewriting with comments kept

    def load(self) -> PasswordFile:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp == self._stamp:
                return self
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PasswordFileError(f"{self.path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise PasswordFileError(f"{self.path}: not UTF-8 text") from None
        users: dict[str, str] = {}
        lines = text.splitlines()
        for no, line in enumerate(lines, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            user, sep, stored = s.partition(":")
            if not sep or not valid_username(user):
                raise PasswordFileError(
                    f"{self.path}:{no}: expected user:$scrypt$... (written by `fastrelay passwd add`)")
            try:
                _parse_hash(stored)
            except ValueError as e:
                raise PasswordFileError(f"{self.path}:{no}: user {user}: {e}") from None
            if user in users:
                raise PasswordFileError(f"{self.path}:{no}: user {user} is already listed; expected each user once")
            users[user] = stored
        self.users, self.lines, self._stamp = users, lines, stamp
        return self

    def verify(self, user: str, password: str) -> bool:
        """Check a password (slow on purpose: run it off the event loop). Re-reads a changed file;
        PasswordFileError if it cannot."""
        self.load()
        stored = self.users.get(user)
        ok = check_hash(stored or _dummy_hash(), password)
        return ok and stored is not None

    # -- editing (the `fastrelay passwd` command) --------------------------------------------------

    def set(self, user: str, password: str) -> bool:
        """Add or replace `user`; True if it was new."""
        new = user not in self.users
        entry = f"{user}:{hash_password(password)}"
        if new:
            self.lines.append(entry)
        else:
            self.lines = [entry if _line_user(ln) == user else ln for ln in self.lines]
        self.users[user] = entry.split(":", 1)[1]
        self._save()
        return new

    def remove(self, user: str) -> bool:
        if user not in self.users:
            return False
        self.lines = [ln for ln in self.lines if _line_user(ln) != user]
        del self.users[user]
        self._save()
        return True

    def _save(self) -> None:
        """Write the whole file to a temporary file beside it and rename it over (readers see the
        old or the new file, never half of one), mode 0600: hashes are still worth guessing at."""
        d = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".passwd.", dir=d)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(ln + "\n" for ln in self.lines))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._stamp = None


def _line_user(line: str) -> str | None:
    s = line.strip()
    if not s or s.startswith("#"):
        return None
    return s.partition(":")[0]


# --- SASL (RFC 4954 §4, RFC 4616 PLAIN, draft-murchison-sasl-login LOGIN) ----------------------------

def decode_b64(text: str) -> bytes:
    """A client's base64 response; "=" is the empty response (RFC 4954 §4)."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise SaslError("bad base64") from None


def parse_plain(data: bytes) -> tuple[str, str]:
    """(user, password) of a PLAIN message `[authzid] NUL authcid NUL passwd` (RFC 4616 §2). An
    authorization identity other than the user is refused: acting for another user is not offered."""
    parts = data.split(b"\0")
    if len(parts) != 3:
        raise ValueError("not a PLAIN message")
    try:
        authz, user, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if not user or (authz and authz != user):
        raise ValueError("empty user or another authorization identity")
    return user, password


@dataclass
class ListenerAuth:
    """A listener's AUTH settings: mechanism -> password file, and plaintext on loopback."""

    files: dict[str, PasswordFile]
    plaintext_loopback: bool = False

    @property
    def mechanisms(self) -> str:
        return " ".join(self.files)


def listener_auth(listen, conf_path) -> ListenerAuth | None:
    """The AUTH settings of a Listen entry (None: AUTH is not offered). `conf_path` resolves a path
    relative to the conf file that set it. ValueError for settings that cannot work."""
    if not listen.get("Enable_Authentication"):
        return None
    files: dict[str, PasswordFile] = {}
    by_path: dict[str, PasswordFile] = {}
    for mech, option in (("PLAIN", "AuthPlainParameters"), ("LOGIN", "AuthLoginParameters")):
        setting = listen.lookup(option)
        if setting.value is None:
            continue
        path = conf_path(setting._replace(value=setting.value["uri"]))
        pf = by_path.get(path)
        if pf is None:
            pf = by_path[path] = PasswordFile(path)
            try:
                pf.load()  # a missing or bad file stops the start, not the first AUTH
            except PasswordFileError as e:
                raise ValueError(f"{option}: {e}") from None
        files[mech] = pf
    if not files:
        raise ValueError("Enable_Authentication is set but neither AuthPlainParameters nor AuthLoginParameters "
                         "names a password file")
    return ListenerAuth(files, bool(listen.get("auth_plaintext_loopback")))


_failures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_failures(owner: object) -> dict:
    """The failure record of `owner` (the relay): its listeners share it, so that a client locked
    out on port 587 is locked out on 465 too. An owner that cannot be weakly referenced gets its own."""
    try:
        return _failures.setdefault(owner, {})
    except TypeError:
        return {}


class AuthGuard:
    """Failed AUTH attempts per client address: a growing delay before each 535, then a lockout.
    `fails` is the record (address -> (failures, time of the last)), shared between listeners."""

    def __init__(self, max_failures: int = limits.AUTH_MAX_FAILURES, lockout: float = limits.AUTH_LOCKOUT_TIME,
                 delay: float = limits.AUTH_FAILURE_DELAY,
                 max_delay: float = limits.AUTH_FAILURE_DELAY * limits.AUTH_FAILURE_DELAY_CAP,
                 tracked: int = limits.AUTH_TRACKED_CLIENTS, fails: dict | None = None):
        self.max_failures = max_failures
        self.lockout = lockout
        self.delay = delay
        self.max_delay = max_delay
        self.tracked = tracked
        self._fails: dict[str, tuple[int, float]] = {} if fails is None else fails

    def _count(self, ip: str, now: float) -> int:
        hit = self._fails.get(ip)
        if hit is None:
            return 0
        if now - hit[1] > self.lockout:
            del self._fails[ip]  # forgiven: AUTH_LOCKOUT_TIME without a failure
            return 0
        return hit[0]

    def locked(self, ip: str, now: float | None = None) -> bool:
        return self._count(ip, time.monotonic() if now is None else now) >= self.max_failures

    def failed(self, ip: str, now: float | None = None) -> float:
        """Count a failure; the delay before its 535 (doubling per failure, capped)."""
        now = time.monotonic() if now is None else now
        n = self._count(ip, now) + 1
        self._fails.pop(ip, None)
        if len(self._fails) >= self.tracked:
            del self._fails[next(iter(self._fails))]  # the one not heard from longest
        self._fails[ip] = (n, now)
        return min(self.delay * (2 ** (n - 1)), self.max_delay) if self.delay > 0 else 0.0

    def succeeded(self, ip: str) -> None:
        self._fails.pop(ip, None)
