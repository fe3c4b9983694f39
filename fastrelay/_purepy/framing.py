"""Pure-Python twin of the SMTP framing: command lines, DATA/BDAT bodies, client reply parsing.

SPEC (the Cython version in fastrelay/_framing.pxi must match it exactly). Sans-I/O: bytes in,
events out; no sockets, no logging. RFC 5321 §4.1.1.4 (only CRLF.CRLF ends DATA), §4.5.2
(dot-stuffing), §4.5.3.1 (line limits); RFC 3030 (BDAT); RELIABILITY.md cases 1-2, 8-11, 25, 27, 29.

Module constants (ints):
  EV_COMMAND = 1        (EV_COMMAND, line: bytes)          a command line, CRLF removed
  EV_COMMAND_ERROR = 2  (EV_COMMAND_ERROR, err: int)       a command line consumed, not delivered
  EV_OVERFLOW = 3       (EV_OVERFLOW,)                     a command line longer than hard_cap:
                                                           the caller must close; the framer is dead
                                                           and next_event() returns None from then on
  EV_DATA = 4           (EV_DATA, body: bytes, flags: int) end of DATA, or end of the LAST BDAT chunk
  EV_BDAT_CHUNK = 5     (EV_BDAT_CHUNK, nbytes: int)       a BDAT chunk without LAST fully consumed
  ERR_TOO_LONG = 1  line longer than max_line (CRLF included)
  ERR_BARE_LF = 2   line ended by LF without CR before it
  ERR_BARE_CR = 3   a CR not followed by LF inside the line
  ERR_NUL = 4       a NUL byte inside the line
  F_BARE_LF = 1, F_BARE_CR = 2, F_LONG_LINE = 4, F_TOO_BIG = 8, F_NUL = 16   (message flags)

class ServerFramer(max_line=512, max_text_line=1000, max_size=10240000, hard_cap=65536)
  feed(data: bytes) -> None        append received bytes
  next_event() -> tuple | None     next event in the current mode, or None when more input is needed
  begin_data() -> None             switch to DATA mode (the caller has just sent 354)
  begin_bdat(size: int, last: bool) -> None   consume the next `size` bytes as a BDAT chunk
  reset() -> None                  forget the message being received (body, flags), back to command
                                   mode; buffered input is kept (RSET)
  pending() -> int                 number of buffered bytes not yet consumed
  discard_pending() -> int         drop buffered bytes not yet consumed, return how many (STARTTLS,
                                   RELIABILITY.md case 6)
  flags (read-only int)            flags of the message being received so far
  size (read-only int)             bytes of body kept so far
  mode (read-only int)             MODE_COMMAND = 0, MODE_DATA = 1, MODE_BDAT = 2, MODE_DEAD = 3

Command mode. A line is everything up to and including the next LF.
  - If the line's length without its line ending (CRLF, or the lone LF) is over hard_cap - 2:
    EV_OVERFLOW (even if its LF already arrived). Bytes of a line still without LF are discarded
    as they arrive once it is longer than max_line, so memory stays bounded; only its length counts.
  - Else if longer than max_line - 2 (without line ending): (EV_COMMAND_ERROR, ERR_TOO_LONG).
  - Else if it ends in LF without CR before it: ERR_BARE_LF.
  - Else if it contains a CR (a CR not followed by LF): ERR_BARE_CR.
  - Else if it contains NUL: ERR_NUL.
  - Else (EV_COMMAND, line without CRLF). An empty line b"" is a valid EV_COMMAND.
Never split a command on CR alone.

DATA mode (after begin_data()). Lines are split on LF only. The body starts at a line start.
For each complete line, in this order:
  - exactly b".\r\n": end. Emit (EV_DATA, body, flags); reset body and flags; back to command mode.
    Bytes after it stay buffered for command mode.
  - if F_TOO_BIG is already set: the line is dropped, nothing else is checked.
  - unstuff: a line starting with b"." loses that first byte (RFC 5321 §4.5.2).
  - if size + len(unstuffed line, its line ending included) > max_size: set F_TOO_BIG, drop the
    line, check nothing else for it. (A partial line that already makes size + its length
    exceed max_size sets F_TOO_BIG at once and is dropped as it arrives: bounded memory; the
    framer keeps just enough to recognise a later b".\r\n" line.)
  - no CR before the LF: F_BARE_LF. A CR anywhere else in the line: F_BARE_CR. A NUL: F_NUL.
    Length without the line ending over max_text_line - 2: F_LONG_LINE.
  - append the unstuffed line, line ending included, to the body.
  So the body of b"Subject: x\r\n\r\nhi\r\n.\r\n" is b"Subject: x\r\n\r\nhi\r\n", and of b".\r\n" is b"".
  Fake ends (b"\n.\n", b"\r.\r", b"\n.\r\n", ...) never end DATA.

BDAT mode (after begin_bdat(size, last)). The next `size` bytes are raw content, not unstuffed.
  - At begin_bdat: if F_TOO_BIG is not set and size + chunk size > max_size, set F_TOO_BIG.
  - Unless F_TOO_BIG, bytes are appended to the body and checked for flags with state carried
    across chunks: a LF not preceded by CR -> F_BARE_LF; a CR not followed by LF (a CR that is the
    last byte of the LAST chunk counts) -> F_BARE_CR; NUL -> F_NUL; a line (bytes between LFs,
    line ending excluded) longer than max_text_line - 2 -> F_LONG_LINE.
  - When the chunk is complete: if last, (EV_DATA, body, flags) and reset as for DATA; else
    (EV_BDAT_CHUNK, size) and back to command mode with the body kept. begin_bdat(0, True) gives
    EV_DATA at the next next_event().

Split invariance (RELIABILITY.md case 8): for any input cut at any offsets and fed piece by piece,
with the same begin_* calls after the same events, the events are identical.

class ReplyParser(max_line=2048, max_lines=100)     replies from a server, for our own clients
  feed(data: bytes) -> None
  next_reply() -> tuple[int, list[bytes]] | None    (code, [text of each line]) once a complete reply
                                                     is buffered, else None
  A reply line is 3 digits, the first 2-5, then b"-" (more lines follow), b" " or nothing (last
  line), then the text; it ends in CRLF or LF (lenient). The text excludes code, separator and line
  ending. All lines of one reply must have the same code. On a hostile or broken reply it returns
  (-1, [reason]) once, with reason b"line too long" (no LF within max_line bytes), b"too many lines"
  (more than max_lines lines in one reply) or b"malformed" (anything else), and is dead afterwards
  (next_reply() returns None). Memory stays bounded by max_line * max_lines.

encode_data(body: bytes) -> bytes
  What a client sends after a 354 (RELIABILITY.md case 3): every CRLF kept, every bare CR and bare
  LF turned into CRLF, every line that starts with b"." gets another b"." in front, a CRLF added
  if the non-empty body does not end with one, then b".\r\n". encode_data(b"") == b".\r\n".
"""

from __future__ import annotations

EV_COMMAND = 1
EV_COMMAND_ERROR = 2
EV_OVERFLOW = 3
EV_DATA = 4
EV_BDAT_CHUNK = 5
ERR_TOO_LONG = 1
ERR_BARE_LF = 2
ERR_BARE_CR = 3
ERR_NUL = 4
F_BARE_LF = 1
F_BARE_CR = 2
F_LONG_LINE = 4
F_TOO_BIG = 8
F_NUL = 16
MODE_COMMAND = 0
MODE_DATA = 1
MODE_BDAT = 2
MODE_DEAD = 3


class ServerFramer:
    def __init__(self, max_line: int = 512, max_text_line: int = 1000, max_size: int = 10240000,
                 hard_cap: int = 65536) -> None:
        raise NotImplementedError("ServerFramer: not written yet")


class ReplyParser:
    def __init__(self, max_line: int = 2048, max_lines: int = 100) -> None:
        raise NotImplementedError("ReplyParser: not written yet")


def encode_data(body: bytes) -> bytes:
    raise NotImplementedError("encode_data: not written yet")
