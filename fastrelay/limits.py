"""Every built-in limit as a named constant; the conf file can override each one."""

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, CRLF included.
MAX_COMMAND_LINE = 512
# RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets, CRLF included.
MAX_TEXT_LINE = 1000
# A command line with no LF is discarded as it arrives; past this many octets the client is
# dropped (RELIABILITY.md case 9: bounded memory for 10 MB with no LF).
COMMAND_HARD_CAP = 65536
# Postfix's message_size_limit default.
MAX_MESSAGE_SIZE = 10_240_000

# Replies read by our own clients (LMTP): RFC 5321 §4.5.3.1.5 says 512 octets; be lenient but
# bounded (RELIABILITY.md case 44: hostile replies with bounded memory).
MAX_REPLY_LINE = 2048
MAX_REPLY_LINES = 100
