"""Build failure DSNs (RFC 3464 multipart/report, RFC 3462) for recipients that failed for good."""

from __future__ import annotations

import re
import time
from email.utils import formatdate

from fastrelay.message import Envelope, Recipient, domain_of

# How much of the original message's header section a DSN carries (text/rfc822-headers).
MAX_RETURNED_HEADERS = 64 * 1024

_ESC = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


def _status(detail: str) -> str:
    """The enhanced status code in a response (RFC 3463), or 5.0.0."""
    m = _ESC.search(detail)
    if m is None or m.group(1) != "5":
        # A failure reported with a 4.x.x code (e.g. expiry after transient errors) is final now.
        return f"5.{m.group(2)}.{m.group(3)}" if m else "5.0.0"
    return m.group(0)


def _clean(text: str) -> str:
    # RELIABILITY.md case 26: remote reply text goes into the DSN without control characters.
    return "".join(c if c.isprintable() else " " for c in text)[:900]


def make_dsn(env: Envelope, body: bytes, failed: list[int], hostname: str, remote: str) -> list[tuple[Envelope, bytes]]:
    """One DSN to `env.sender` about the recipients at `failed`, as a spool item (sender <>)."""
    now = time.time()
    date = formatdate(now, localtime=True)
    boundary = f"{env.msgid}.{int(now)}/{hostname}"
    rcpts = [env.recipients[i] for i in failed]
    human = "\r\n".join(f"<{r.address}>: {_clean(r.detail) or 'delivery failed'}" for r in rcpts)
    per_rcpt = []
    for r in rcpts:
        block = [
            f"Final-Recipient: rfc822; {r.address}",
            "Action: failed",
            f"Status: {_status(r.detail)}",
        ]
        if remote:
            block.append(f"Remote-MTA: dns; {remote}")
        if r.detail:
            block.append(f"Diagnostic-Code: smtp; {_clean(r.detail)}")
        per_rcpt.append("\r\n".join(block))
    end = body.find(b"\r\n\r\n")
    headers = body[: end + 2 if end >= 0 else len(body)][:MAX_RETURNED_HEADERS]
    text = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{env.sender}>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {date}\r\n"
        f"Message-ID: <{env.msgid}.{int(now * 1000)}.dsn@{hostname}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        "\r\n"
        "This is a MIME-encapsulated message.\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Notification\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"This is the mail system at host {hostname}.\r\n"
        "\r\n"
        "Your message could not be delivered to one or more recipients:\r\n"
        "\r\n"
        f"{human}\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Delivery report\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        f"Reporting-MTA: dns; {hostname}\r\n"
        f"X-Fastrelay-Queue-ID: {env.msgid}\r\n"
        f"Arrival-Date: {formatdate(env.received_at or now, localtime=True)}\r\n"
        "\r\n"
        + "\r\n\r\n".join(per_rcpt)
        + "\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Undelivered Message Headers\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        "\r\n"
    ).encode("utf-8")
    dsn_body = text + headers + f"\r\n--{boundary}--\r\n".encode()
    dsn = Envelope(
        sender="",  # RFC 5321 §4.5.5: DSNs are sent with the null reverse-path
        recipients=[Recipient(env.sender)],
        domain=domain_of(env.sender),
        protocol="local",
        binding=env.binding,
        received_at=now,
        first_queued=now,
        next_attempt=now,
        meta={"dsn_for": env.msgid},
    )
    return [(dsn, dsn_body)]
