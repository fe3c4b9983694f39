"""Build delivery status notifications (RFC 3464 multipart/report, RFC 3461, RFC 6533) as spool items."""

from __future__ import annotations

import functools
import ipaddress
import re
import time
from email.utils import formatdate

from fastrelay.delivery import Hop
from fastrelay.message import NOTIFY_DELAY, NOTIFY_FAILURE, NOTIFY_SUCCESS, Envelope, Recipient, domain_of

# How much of the original message's header section a DSN carries (text/rfc822-headers).
MAX_RETURNED_HEADERS = 64 * 1024
# RET=FULL (RFC 3461 §4.3) returns the whole message up to this size, else its headers only, so a
# big message does not make a DSN too big to come back (Postfix's bounce_size_limit is 50 kB).
MAX_RETURNED_MESSAGE = 256 * 1024

# Actions (RFC 3464 §2.3.3).
FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"  # final delivery here (LMTP, RFC 3461 §5.2.3): nothing after us reports it
RELAYED = "relayed"  # handed to a next hop that does not offer DSN (RFC 3461 §5.2.2)

# The NOTIFY word that asks for each action (RFC 3461 §4.1).
_WANTS = {FAILED: NOTIFY_FAILURE, DELAYED: NOTIFY_DELAY, DELIVERED: NOTIFY_SUCCESS, RELAYED: NOTIFY_SUCCESS}

_SUBJECT = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    DELIVERED: "Successful Mail Delivery Report",
    RELAYED: "Successful Mail Delivery Report",
}

_ESC = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


def _status(detail: str, action: str = FAILED) -> str:
    """The enhanced status code (RFC 3463) for `action`, from the response when it has one."""
    m = _ESC.search(detail)
    klass = {FAILED: "5", DELAYED: "4"}.get(action, "2")
    if m is None:
        return f"{klass}.0.0"
    # A failure reported with a 4.x.x code (e.g. expiry after transient errors) is final now.
    return f"{klass}.{m.group(2)}.{m.group(3)}"


def _clean(text: str) -> str:
    # docs/reliability.md case 26: remote reply text goes into the DSN without control characters.
    return "".join(c if c.isprintable() else " " for c in text)[:900]


def _addr(kind: str, address: str, global_: bool) -> str:
    """An address field value: `rfc822; a@b`, or RFC 6533 §3 `utf-8; ü@b` in a global DSN."""
    if not address.isascii() and global_:
        return f"utf-8; {_clean(address)}"
    return f"{kind}; {_clean(address)}"


@functools.lru_cache(maxsize=4096)  # called per delivery; hops repeat, and parsing an IP is not free
def mta_name(hop: Hop) -> str:
    """The next hop as Remote-MTA names it (RFC 3464 §2.3.5: `dns; <host name>`, never ip:port):
    its host name (MX exchange, route host), or an address literal when it was given as an IP."""
    name = (hop.name or "").rstrip(".")
    if not name:
        return f"[{hop.ip}]"
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return name
    return f"[{name.strip('[]')}]"


def wants(r: Recipient, action: str) -> bool:
    """Whether the sender asked to be told `action` about this recipient (NOTIFY, RFC 3461 §4.1)."""
    return _WANTS[action] in r.notify


def make_dsn(env: Envelope, body: bytes, failed: list[int], hostname: str, remote: str,
             action: str = FAILED, retry_until: float | None = None) -> list[tuple[Envelope, bytes]]:
    """One DSN to `env.sender` about the recipients at `failed` that asked for `action` (NOTIFY),
    as a spool item with the null sender; [] if none asked. `remote` is the next hop's host name
    (Remote-MTA, RFC 3464 §2.3.5), "" when no host was reached; `retry_until` goes in a delay
    notice (Will-Retry-Until, §2.3.7)."""
    rcpts = [env.recipients[i] for i in failed if wants(env.recipients[i], action)]
    if not rcpts or not env.sender:  # RFC 5321 §6.1, docs/reliability.md case 18: never to <>
        return []
    now = time.time()
    date = formatdate(now, localtime=True)
    boundary = f"{env.msgid}.{int(now)}/{hostname}"
    # RFC 6533 §3, §6: a report about a UTF-8 address is a message/global-delivery-status, with
    # the utf-8 address type and message/global-headers (or message/global) for the original.
    origs = [r.orcpt for r in rcpts]
    global_ = any(not r.address.isascii() for r in rcpts) or any(o and not o[1].isascii() for o in origs)
    human = "\r\n".join(f"<{_clean(r.address)}>: {_clean(r.detail) or action}" for r in rcpts)
    per_rcpt = []
    for r, orig in zip(rcpts, origs, strict=True):
        block = []
        if orig is not None:
            block.append(f"Original-Recipient: {_addr(orig[0], orig[1], global_)}")
        block += [
            f"Final-Recipient: {_addr('rfc822', r.address, global_)}",
            f"Action: {action}",
            f"Status: {_status(r.detail, action)}",
        ]
        if remote:
            block.append(f"Remote-MTA: dns; {remote}")
        if r.detail:
            block.append(f"Diagnostic-Code: smtp; {_clean(r.detail)}")
        if action == DELAYED and retry_until is not None:
            block.append(f"Will-Retry-Until: {formatdate(retry_until, localtime=True)}")
        per_rcpt.append("\r\n".join(block))
    per_message = [f"Reporting-MTA: dns; {hostname}"]
    if env.envid:
        per_message.insert(0, f"Original-Envelope-Id: {_clean(env.envid)}")  # RFC 3464 §2.2.1
    per_message += [
        f"X-Fastrelay-Queue-ID: {env.msgid}",
        f"Arrival-Date: {formatdate(env.received_at or now, localtime=True)}",
    ]
    # RFC 3461 §4.3: RET decides what a failure DSN returns; other DSNs return the headers only.
    full = action == FAILED and env.ret == "FULL" and len(body) <= MAX_RETURNED_MESSAGE
    end = body.find(b"\r\n\r\n")
    headers = body[: end + 2 if end >= 0 else len(body)][:MAX_RETURNED_HEADERS]
    returned = body if full else headers
    # RFC 6532/6533: UTF-8 in the returned header section makes it message/global(-headers); an
    # 8-bit body alone (BODY=8BITMIME) stays message/rfc822, sent as 8bit, no SMTPUTF8 needed.
    global_orig = global_ or not headers.isascii()
    if full:
        orig_type = "message/global" if global_orig else "message/rfc822"
    else:
        orig_type = "message/global-headers" if global_orig else "text/rfc822-headers"
    orig_cte = _cte(returned)
    undelivered = "Undelivered " if action in (FAILED, DELAYED) else ""
    report = "global-delivery-status" if global_ else "delivery-status"
    notice = f"{_explain(action, env, retry_until)}\r\n\r\n{human}"
    fields = "\r\n".join(per_message) + "\r\n\r\n" + "\r\n\r\n".join(per_rcpt)
    text = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{env.sender}>\r\n"
        f"Subject: {_SUBJECT[action]}\r\n"
        f"Date: {date}\r\n"
        f"Message-ID: <{env.msgid}.{int(now * 1000)}.{action}@{hostname}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type={report}; boundary="{boundary}"\r\n'
        "\r\n"
        "This is a MIME-encapsulated message.\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Notification\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"{_cte(notice)}"
        "\r\n"
        f"This is the mail system at host {hostname}.\r\n"
        "\r\n"
        f"{notice}\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Delivery report\r\n"
        f"Content-Type: message/{report}\r\n"
        f"{_cte(fields)}"
        "\r\n"
        f"{fields}\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: {undelivered}{'Message' if full else 'Message Headers'}\r\n"
        f"Content-Type: {orig_type}\r\n"
        f"{orig_cte}"
        "\r\n"
    ).encode("utf-8", "surrogateescape")  # a sender kept byte for byte (case 19) comes back as sent
    dsn_body = text + returned + f"\r\n--{boundary}--\r\n".encode()
    # RFC 6533 §3 / RFC 6531: a DSN to a UTF-8 address, or holding UTF-8 addresses or headers,
    # goes out with SMTPUTF8 (and 8BITMIME for its 8-bit body).
    mail_params = ""
    if not dsn_body.isascii():
        mail_params = "BODY=8BITMIME"
    if global_orig or not env.sender.isascii():
        mail_params = (mail_params + " SMTPUTF8").strip()
    dsn = Envelope(
        sender="",  # RFC 5321 §4.5.5: DSNs are sent with the null reverse-path
        recipients=[Recipient(env.sender)],
        domain=domain_of(env.sender),
        mail_params=mail_params,
        protocol="local",
        binding=env.binding,
        received_at=now,
        first_queued=now,
        next_attempt=now,
        meta={"dsn_for": env.msgid, "dsn_action": action},
    )
    return [(dsn, dsn_body)]


def _cte(part: str | bytes) -> str:
    """The Content-Transfer-Encoding line an 8-bit part needs (RFC 2045 §6.2; 7bit is the default)."""
    return "" if part.isascii() else "Content-Transfer-Encoding: 8bit\r\n"


def _explain(action: str, env: Envelope, retry_until: float | None) -> str:
    if action == FAILED:
        return "Your message could not be delivered to one or more recipients:"
    if action == DELAYED:
        hours = (time.time() - (env.first_queued or env.received_at or time.time())) / 3600
        until = f" It will be retried until {formatdate(retry_until, localtime=True)}." if retry_until else ""
        return ("THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND YOUR MESSAGE.\r\n\r\n"
                f"Your message could not be delivered for {hours:.1f} hours.{until}")
    if action == RELAYED:
        return ("Your message was relayed to the following recipients, to a host that does not\r\n"
                "offer delivery notifications, as you asked (NOTIFY=SUCCESS):")
    return "Your message was delivered to the following recipients, as you asked (NOTIFY=SUCCESS):"
