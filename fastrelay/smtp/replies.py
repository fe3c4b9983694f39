"""Every SMTP reply the server sends, named, with its enhanced status code (RFC 3463, RFC 5321 §4.2)."""

from __future__ import annotations


class Reply:
    """A reply: code, enhanced status code and text; `wire` is the pre-encoded line."""

    __slots__ = ("code", "esc", "text", "wire")

    def __init__(self, code: int, esc: str, text: str):
        self.code = code
        self.esc = esc
        self.text = text
        self.wire = f"{code} {esc} {text}\r\n".encode() if esc else f"{code} {text}\r\n".encode()

    def with_text(self, text: str) -> bytes:
        """The same code and status with other text (e.g. the queue id)."""
        return f"{self.code} {self.esc} {text}\r\n".encode() if self.esc else f"{self.code} {text}\r\n".encode()

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.esc!r}, {self.text!r})"


# --- Connection -------------------------------------------------------------------------------
GREETING = Reply(220, "", "ESMTP fastrelay")  # text is replaced with "<hostname> ESMTP fastrelay"
BYE = Reply(221, "2.0.0", "Bye")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_CLIENT = Reply(421, "4.7.0", "Too many connections from your address, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
EARLY_TALKER = Reply(554, "5.5.0", "SMTP protocol synchronization: talked before the greeting")  # case 5
IDLE_TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")  # case 14
COMMAND_DEADLINE = Reply(421, "4.4.2", "Command took too long, closing connection")  # case 14
DATA_TOO_SLOW = Reply(421, "4.4.2", "Data rate too low, closing connection")  # case 14
DATA_DEADLINE = Reply(421, "4.4.2", "Message took too long to arrive, closing connection")  # case 14
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")  # case 15

# --- Generic command handling ------------------------------------------------------------------
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
NOOP_OK = Reply(250, "2.0.0", "OK")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
QUEUED = Reply(250, "2.0.0", "OK queued")  # text is "OK queued as <id>"
BDAT_CHUNK_OK = Reply(250, "2.0.0", "Chunk accepted")  # text is "<n> octets received"
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")

# --- Syntax and sequence (RFC 5321 §4.2.4, §4.3.2) ----------------------------------------------
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")  # case 9
BARE_LF_COMMAND = Reply(500, "5.5.2", "Bare LF or CR in command; lines must end with CRLF")  # case 2
NUL_IN_COMMAND = Reply(500, "5.5.2", "NUL byte in command")  # case 25
HTTP_COMMAND = Reply(500, "5.5.2", "This is an SMTP server, not an HTTP server")  # case 7 (then close)
SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
HELO_NEEDS_DOMAIN = Reply(501, "5.5.4", "EHLO/HELO needs a domain or address literal")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")  # case 28
NEED_EHLO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL before RCPT")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT before DATA")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "DATA is not allowed after BDAT")  # case 29 (RFC 3030 §3)
UNKNOWN_PARAM = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
BAD_DSN_PARAM = Reply(501, "5.5.4", "Invalid DSN parameter (NOTIFY, ORCPT, RET or ENVID; RFC 3461)")
PIPELINING_VIOLATION = Reply(554, "5.5.0", "SMTP protocol synchronization error")  # case 4 (then close)

# --- Addresses (cases 20-23) ---------------------------------------------------------------------
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RCPT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_UTF8 = Reply(501, "5.5.2", "Invalid UTF-8 in address")  # case 23
UTF8_NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")  # case 23
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")  # case 21
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")  # case 12

# --- Size and content (cases 10, 11, 16, 25) ---------------------------------------------------------
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_LF_DATA = Reply(550, "5.5.2", "Message contains bare CR or LF; lines must end with CRLF")  # case 2
LONG_LINE_DATA = Reply(550, "5.5.2", "Message contains a line longer than the text line limit")  # case 10
TOO_MANY_HOPS = Reply(554, "5.4.0", "Too many hops (Received: headers); mail loop?")  # case 16
# Case 25 / issue 9: "<CR><LF><NUL>.<CR><LF>" ends DATA at a next hop that strips NULs (SMTP
# smuggling). Postfix refuses NUL in content by default too.
NUL_IN_DATA = Reply(554, "5.6.0", "Message contains NUL characters")

# --- BDAT (RFC 3030; case 29) ------------------------------------------------------------------------
BDAT_NOT_OFFERED = Reply(521, "5.5.1", "CHUNKING was not offered; closing connection")
BDAT_BAD_COUNT = Reply(521, "5.5.4", "Malformed BDAT chunk size; closing connection")
BDAT_ZERO_NOT_LAST = Reply(551, "5.5.4", "BDAT 0 is only valid with LAST")

# --- STARTTLS (RFC 3207; case 6) ---------------------------------------------------------------------
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_ALREADY = Reply(554, "5.5.1", "TLS already active")
TLS_NO_PARAMS = Reply(501, "5.5.4", "STARTTLS takes no parameters")

# --- AUTH (RFC 4954; case 30: never in plaintext; issue 17) ------------------------------------------
AUTH_NEEDS_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_NOT_AVAILABLE = Reply(502, "5.5.1", "AUTH not available")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_CONTINUE = Reply(334, "", "")  # RFC 4954 §4: an empty challenge ("334 ")
AUTH_LOGIN_USERNAME = Reply(334, "", "VXNlcm5hbWU6")  # base64 "Username:"
AUTH_LOGIN_PASSWORD = Reply(334, "", "UGFzc3dvcmQ6")  # base64 "Password:"
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMP_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_LOCKED_OUT = Reply(454, "4.7.0", "Too many failed authentications from your address, try again later")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode the response (base64)")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH is not permitted during a mail transaction")
AUTH_NEEDS_EHLO = Reply(503, "5.5.1", "Send EHLO first: AUTH is an ESMTP extension")
AUTH_SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not allowed for the authenticated user")

# --- Transaction limits and local trouble (cases 13, 17) ---------------------------------------------
TOO_MANY_MESSAGES = Reply(452, "4.5.3", "Too many messages in this connection")  # case 13 (at MAIL)
SPOOL_LOW_SPACE = Reply(452, "4.3.1", "Insufficient system storage")  # case 17 (at MAIL)
SPOOL_FAILED = Reply(451, "4.3.0", "Local error: message not queued, try again later")  # P1, case 17
