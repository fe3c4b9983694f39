"""Pure-Python twin of the SMTP framing: command lines, DATA/BDAT bodies, client reply parsing.

SPEC (the Cython version in fastrelay/_framing.pxi must match it exactly). Sans-I/O: bytes in,
events out; no sockets, no logging. RFC 5321 §4.1.1.4 (only CRLF.CRLF ends DATA), §4.5.2
(dot-stuffing), §4.5.3.1 (line limits); RFC 3030 (BDAT); docs/reliability.md cases 1-2, 8-11, 25, 27, 29.

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
  (defaults from fastrelay.limits; ValueError unless max_line >= 3, max_text_line >= 3,
  max_size >= 0 and hard_cap >= max_line)
  feed(data: bytes) -> None        append received bytes (any bytes-like object; ignored once dead).
                                   feed() only buffers: all parsing, and so every change of
                                   flags, size and pending(), happens in next_event().
  next_event() -> tuple | None     next event in the current mode, or None when more input is needed
  begin_data() -> None             switch to DATA mode (the caller has just sent 354)
  begin_bdat(size: int, last: bool) -> None   consume the next `size` bytes as a BDAT chunk
                                   (size: an int, 0 <= size < 2**63, else ValueError)
  begin_data() and begin_bdat() raise RuntimeError unless the mode is MODE_COMMAND.
  reset() -> None                  forget the message being received (body, flags), back to command
                                   mode; buffered input is kept (RSET). A dead framer stays dead.
  pending() -> int                 number of buffered bytes not yet consumed
  discard_pending() -> int         drop buffered bytes not yet consumed, return how many (STARTTLS,
                                   docs/reliability.md case 6). A partly received line is forgotten too
                                   (in every mode), so the next byte fed starts a new line; the
                                   mode and the message (body, flags, BDAT count) are unchanged.
  flags (read-only int)            flags of the message being received so far
  size (read-only int)             bytes of body kept so far
  mode (read-only int)             MODE_COMMAND = 0, MODE_DATA = 1, MODE_BDAT = 2, MODE_DEAD = 3

Command mode. A line is everything up to and including the next LF.
  - If the line's length without its line ending (CRLF, or the lone LF) is over hard_cap - 2:
    EV_OVERFLOW (even if its LF already arrived). Bytes of a line still without LF are discarded
    as they arrive once it is longer than max_line, so memory stays bounded; only its length counts.
    (next_event() does this when it finds no LF: a partial line of more than max_line bytes is
    dropped and counted, and EV_OVERFLOW comes as soon as the partial line is sure to be too
    long: its length so far, not counting a final CR that may be half of its CRLF, is over
    hard_cap - 2. The same bytes give the same events however they are split.)
  - Else if longer than max_line - 2 (without line ending): (EV_COMMAND_ERROR, ERR_TOO_LONG).
  - Else if it ends in LF without CR before it: ERR_BARE_LF.
  - Else if it contains a CR (a CR not followed by LF): ERR_BARE_CR.
  - Else if it contains NUL: ERR_NUL.
  - Else (EV_COMMAND, line without CRLF). An empty line b"" is a valid EV_COMMAND.
Never split a command on CR alone.

DATA mode (after begin_data()). Lines are split on LF only. The body starts at a line start.
For each complete line, in this order:
  - exactly b".\r\n", and the line before it ended in CRLF (the first line of the body follows
    the CRLF of the DATA command): end. Emit (EV_DATA, body, flags); reset body and flags; back
    to command mode. Bytes after it stay buffered for command mode. (Without the CRLF condition
    b"x\n.\r\n" would end DATA: the fake end b"\n.\r\n", CVE-2023-51764. So b"x\n.\r\n" is
    body b"x\n\r\n" and DATA goes on; the line ending of a dropped line counts too.)
  - if F_TOO_BIG is already set: the line is dropped, nothing else is checked.
  - unstuff: a line starting with b"." loses that first byte (RFC 5321 §4.5.2).
  - if size + len(unstuffed line, its line ending included) > max_size: set F_TOO_BIG, drop the
    line, check nothing else for it. (A partial line that already makes size + its length
    exceed max_size sets F_TOO_BIG at once and is dropped as it arrives: bounded memory; the
    framer keeps just enough to recognise a later b".\r\n" line.)
    Precisely, when next_event() finds no LF: a partial line that is b"." or b".\r" (it may
    still become the end) is always kept. Any other partial line is dropped, with the rest of
    that line up to and including its LF as it arrives, if F_TOO_BIG is set or if size + its
    unstuffed length so far > max_size (then F_TOO_BIG is set). Dropping b"." or b".\r" too
    would let a body of exactly max_size bytes miss its real end.
  - no CR before the LF: F_BARE_LF. A CR anywhere else in the line: F_BARE_CR. A NUL: F_NUL.
    Length without the line ending over max_text_line - 2: F_LONG_LINE (the length of the
    unstuffed line: §4.5.3.1.6 does not count the dot added for transparency).
  - append the unstuffed line, line ending included, to the body.
  So the body of b"Subject: x\r\n\r\nhi\r\n.\r\n" is b"Subject: x\r\n\r\nhi\r\n", and of b".\r\n" is b"".
  Fake ends (b"\n.\n", b"\r.\r", b"\n.\r\n", ...) never end DATA. With F_TOO_BIG the body in
  EV_DATA is what was kept before the limit (the caller answers 552 and throws it away).

BDAT mode (after begin_bdat(size, last)). The next `size` bytes are raw content, not unstuffed.
  - At begin_bdat: if F_TOO_BIG is not set and size + chunk size > max_size, set F_TOO_BIG.
  - Unless F_TOO_BIG, bytes are appended to the body and checked for flags with state carried
    across chunks: a LF not preceded by CR -> F_BARE_LF; a CR not followed by LF (a CR that is the
    last byte of the LAST chunk counts) -> F_BARE_CR; NUL -> F_NUL; a line (bytes between LFs,
    line ending excluded) longer than max_text_line - 2 -> F_LONG_LINE.
    Each check is made when the byte that decides it is consumed (a line's length at its LF;
    an unterminated last line, and a CR as the very last byte, at the end of the LAST chunk).
    Once F_TOO_BIG is set nothing more is checked (the message is refused anyway).
  - When the chunk is complete: if last, (EV_DATA, body, flags) and reset as for DATA; else
    (EV_BDAT_CHUNK, size) and back to command mode with the body kept. begin_bdat(0, True) gives
    EV_DATA at the next next_event().

Split invariance (docs/reliability.md case 8): for any input cut at any offsets and fed piece by piece,
with the same begin_* calls after the same events, the events are identical.

class ReplyParser(max_line=2048, max_lines=100)     replies from a server, for our own clients
  (defaults from fastrelay.limits; ValueError unless max_line >= 4 and max_lines >= 1)
  feed(data: bytes) -> None                         (any bytes-like object; ignored once dead)
  next_reply() -> tuple[int, list[bytes]] | None    (code, [text of each line]) once a complete reply
                                                     is buffered, else None
  A reply line is 3 digits, the first 2-5, then b"-" (more lines follow), b" " or nothing (last
  line), then the text; it ends in CRLF or LF (lenient). The text excludes code, separator and line
  ending. All lines of one reply must have the same code. On a hostile or broken reply it returns
  (-1, [reason]) once, with reason b"line too long" (no LF within max_line bytes), b"too many lines"
  (more than max_lines lines in one reply) or b"malformed" (anything else), and is dead afterwards
  (next_reply() returns None). Memory stays bounded by max_line * max_lines.
  Precisely: a line may be max_line bytes long, line ending included; b"line too long" comes as
  soon as max_line bytes without LF are buffered. A NUL, or a CR other than the one just before
  the LF, anywhere in a line is b"malformed" (no legitimate server sends them, and they are log
  and header injection material, docs/reliability.md case 26). b"too many lines" comes when line
  number max_lines of a reply says more lines follow (b"-"). Each line is checked in the order
  too long, malformed, code differs from the first line's (malformed), too many lines.

encode_data(body: bytes) -> bytes
  What a client sends after a 354 (docs/reliability.md case 3): every CRLF kept, every bare CR and bare
  LF turned into CRLF, every line that starts with b"." gets another b"." in front, a CRLF added
  if the non-empty body does not end with one, then b".\r\n". encode_data(b"") == b".\r\n".
  (b"\r\r\n" is a bare CR then a CRLF; b"\n\r" is a bare LF then a bare CR. NUL is carried.)
"""

from __future__ import annotations

from fastrelay.limits import (
    COMMAND_HARD_CAP,
    MAX_COMMAND_LINE,
    MAX_MESSAGE_SIZE,
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    MAX_TEXT_LINE,
)

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

# A BDAT count must fit a signed 64-bit integer (docs/reliability.md case 29: a bounded integer).
_MAX_CHUNK = 2**63 - 1
_CR = 13
_DOT = 46


class ServerFramer:
    """Server side: command lines, then DATA or BDAT bodies, as events."""

    def __init__(self, max_line: int = MAX_COMMAND_LINE, max_text_line: int = MAX_TEXT_LINE,
                 max_size: int = MAX_MESSAGE_SIZE, hard_cap: int = COMMAND_HARD_CAP) -> None:
        if max_line < 3 or max_text_line < 3 or max_size < 0 or hard_cap < max_line:
            raise ValueError("ServerFramer: need max_line >= 3, max_text_line >= 3, "
                             "max_size >= 0, hard_cap >= max_line")
        self._max_line = max_line
        self._max_text_line = max_text_line
        self._max_size = max_size
        self._hard_cap = hard_cap
        self._buf = bytearray()
        self._pos = 0           # first byte not yet consumed
        self._scan = 0          # buf[pos:scan] is known to hold no LF (no rescans of a long line)
        self._mode = MODE_COMMAND
        # Command line in progress: bytes already discarded because it is too long.
        self._skipped = 0
        self._skipped_cr = False    # the last discarded byte was a CR
        self._new_message()

    def _new_message(self) -> None:
        self._body = bytearray()
        self._flags = 0
        self._drop_line = False     # DATA: the rest of the current line is dropped up to its LF
        self._drop_cr = False       # DATA: the last byte dropped so was a CR
        self._after_crlf = True     # DATA: the last line ended in CRLF (the DATA command's, first)
        self._remaining = 0         # BDAT: bytes of the chunk still to consume
        self._chunk = 0
        self._last = False
        self._cr = False            # BDAT: the last body byte was a CR (bare unless a LF follows)
        self._line_len = 0          # BDAT: body bytes since the last LF

    @property
    def flags(self) -> int:
        return self._flags

    @property
    def size(self) -> int:
        return len(self._body)

    @property
    def mode(self) -> int:
        return self._mode

    def feed(self, data: bytes) -> None:
        if self._mode == MODE_DEAD:
            return
        if self._pos:
            del self._buf[:self._pos]
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    def pending(self) -> int:
        return len(self._buf) - self._pos

    def discard_pending(self) -> int:
        n = len(self._buf) - self._pos
        self._buf = bytearray()
        self._pos = self._scan = 0
        self._skipped = 0
        self._skipped_cr = False
        self._drop_line = False
        return n

    def reset(self) -> None:
        if self._mode == MODE_DEAD:
            return
        self._new_message()
        self._mode = MODE_COMMAND

    def begin_data(self) -> None:
        if self._mode != MODE_COMMAND:
            raise RuntimeError("begin_data() outside command mode")
        self._mode = MODE_DATA

    def begin_bdat(self, size: int, last: bool) -> None:
        if self._mode != MODE_COMMAND:
            raise RuntimeError("begin_bdat() outside command mode")
        if not isinstance(size, int) or size < 0 or size > _MAX_CHUNK:
            raise ValueError("BDAT chunk size must be an int in 0 .. 2**63-1")
        # RFC 3030 §2, docs/reliability.md case 29: a chunk over the limit is still read in full (then 552).
        if not self._flags & F_TOO_BIG and len(self._body) + size > self._max_size:
            self._flags |= F_TOO_BIG
        self._remaining = self._chunk = size
        self._last = bool(last)
        self._mode = MODE_BDAT

    def next_event(self) -> tuple | None:
        mode = self._mode
        if mode == MODE_COMMAND:
            return self._next_command()
        if mode == MODE_DATA:
            return self._next_data()
        if mode == MODE_BDAT:
            return self._next_bdat()
        return None

    # -- command mode ---------------------------------------------------------------------------

    def _next_command(self) -> tuple | None:
        buf = self._buf
        lf = buf.find(b"\n", self._scan)
        if lf < 0:
            self._scan = len(buf)
            return self._partial_command()
        start = self._pos
        line = bytes(buf[start:lf])     # without its LF
        self._pos = self._scan = lf + 1
        skipped = self._skipped
        self._skipped = 0
        has_cr = line[-1] == _CR if line else (skipped > 0 and self._skipped_cr)
        self._skipped_cr = False
        length = skipped + len(line) - has_cr
        if length > self._hard_cap - 2:
            return self._overflow()
        if length > self._max_line - 2:     # RFC 5321 §4.5.3.1.4
            return (EV_COMMAND_ERROR, ERR_TOO_LONG)
        if not has_cr:
            return (EV_COMMAND_ERROR, ERR_BARE_LF)
        line = line[:-1]
        # docs/reliability.md case 2: a CR alone never splits a command; the whole line is refused.
        if b"\r" in line:
            return (EV_COMMAND_ERROR, ERR_BARE_CR)
        if b"\0" in line:
            return (EV_COMMAND_ERROR, ERR_NUL)
        return (EV_COMMAND, line)

    def _partial_command(self) -> tuple | None:
        buf = self._buf
        new = len(buf) - self._pos
        n = self._skipped + new
        ends_cr = buf[-1] == _CR if new else self._skipped_cr
        # A final CR may be half of the CRLF, so it does not count (split invariance).
        if n - ends_cr > self._hard_cap - 2:
            return self._overflow()
        if n > self._max_line:
            # Sure to be ERR_TOO_LONG: keep only its length (docs/reliability.md case 9).
            self._skipped = n
            self._skipped_cr = ends_cr
            self._pos = self._scan = len(buf)
        return None

    def _overflow(self) -> tuple:
        self._mode = MODE_DEAD
        self._buf = bytearray()
        self._pos = self._scan = 0
        self._new_message()
        return (EV_OVERFLOW,)

    # -- DATA mode ------------------------------------------------------------------------------

    def _next_data(self) -> tuple | None:
        buf = self._buf
        max_size = self._max_size
        long_line = self._max_text_line - 2
        while True:
            lf = buf.find(b"\n", self._scan)
            if lf < 0:
                self._scan = len(buf)
                self._partial_data()
                return None
            start = self._pos
            self._pos = self._scan = lf + 1
            after_crlf = self._after_crlf
            if self._drop_line:
                self._drop_line = False
                self._after_crlf = buf[lf - 1] == _CR if lf > start else self._drop_cr
                continue
            line = bytes(buf[start:lf + 1])
            self._after_crlf = line.endswith(b"\r\n")
            # RFC 5321 §4.1.1.4: only CRLF.CRLF ends the data: a line ".\r\n" right after a CRLF.
            if after_crlf and line == b".\r\n":
                return self._finish()
            if self._flags & F_TOO_BIG:
                continue
            if line[0] == _DOT:     # RFC 5321 §4.5.2 transparency
                line = line[1:]
            if len(self._body) + len(line) > max_size:
                self._flags |= F_TOO_BIG
                continue
            if len(line) >= 2 and line[-2] == _CR:
                content = line[:-2]
            else:
                self._flags |= F_BARE_LF
                content = line[:-1]
            if b"\r" in content:
                self._flags |= F_BARE_CR
            if b"\0" in content:
                self._flags |= F_NUL
            if len(content) > long_line:    # RFC 5321 §4.5.3.1.6
                self._flags |= F_LONG_LINE
            self._body += line

    def _partial_data(self) -> None:
        buf = self._buf
        n = len(buf) - self._pos      # a line without its LF yet
        if not self._drop_line:
            if b".\r\n".startswith(buf[self._pos:self._pos + 3]):
                return      # empty, or b"." or b".\r": may still become the end line
            if not self._flags & F_TOO_BIG:
                unstuffed = n - (buf[self._pos] == _DOT)
                if len(self._body) + unstuffed <= self._max_size:
                    return
                self._flags |= F_TOO_BIG
        if n:
            self._drop_cr = buf[-1] == _CR
        self._drop_line = True
        self._pos = self._scan = len(buf)

    def _finish(self) -> tuple:
        event = (EV_DATA, bytes(self._body), self._flags)
        self._new_message()
        self._mode = MODE_COMMAND
        return event

    # -- BDAT mode ------------------------------------------------------------------------------

    def _next_bdat(self) -> tuple | None:
        take = min(self._remaining, len(self._buf) - self._pos)
        if take:
            start = self._pos
            self._pos += take
            self._scan = max(self._scan, self._pos)
            self._remaining -= take
            if not self._flags & F_TOO_BIG:
                data = bytes(self._buf[start:start + take])
                self._check_bdat(data)
                self._body += data
        if self._remaining:
            return None
        if not self._last:
            self._mode = MODE_COMMAND
            return (EV_BDAT_CHUNK, self._chunk)
        if not self._flags & F_TOO_BIG:
            if self._cr:        # RFC 3030: the content is raw; a final CR has no LF after it
                self._flags |= F_BARE_CR
            if self._line_len > self._max_text_line - 2:
                self._flags |= F_LONG_LINE
        return self._finish()

    def _check_bdat(self, data: bytes) -> None:
        long_line = self._max_text_line - 2
        pos = 0
        while True:
            lf = data.find(b"\n", pos)
            segment = data[pos:] if lf < 0 else data[pos:lf]
            if segment:
                if self._cr:    # the CR that ended the previous segment is not before a LF
                    self._flags |= F_BARE_CR
                if b"\r" in segment[:-1]:
                    self._flags |= F_BARE_CR
                if b"\0" in segment:
                    self._flags |= F_NUL
                self._cr = segment[-1] == _CR
                self._line_len += len(segment)
            if lf < 0:
                return
            if not self._cr:
                self._flags |= F_BARE_LF
            if self._line_len - self._cr > long_line:
                self._flags |= F_LONG_LINE
            self._cr = False
            self._line_len = 0
            pos = lf + 1


class ReplyParser:
    """Client side: server replies (code, text lines), with bounded memory."""

    def __init__(self, max_line: int = MAX_REPLY_LINE, max_lines: int = MAX_REPLY_LINES) -> None:
        if max_line < 4 or max_lines < 1:
            raise ValueError("ReplyParser: need max_line >= 4 and max_lines >= 1")
        self._max_line = max_line
        self._max_lines = max_lines
        self._buf = bytearray()
        self._pos = 0
        self._scan = 0
        self._code = 0
        self._lines: list[bytes] = []
        self._dead = False

    def feed(self, data: bytes) -> None:
        if self._dead:
            return
        if self._pos:
            del self._buf[:self._pos]
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    def next_reply(self) -> tuple[int, list[bytes]] | None:
        if self._dead:
            return None
        buf = self._buf
        while True:
            # RFC 5321 §4.5.3.1.5 caps a reply line; look for its LF only within max_line bytes.
            lf = buf.find(b"\n", self._scan, self._pos + self._max_line)
            if lf < 0:
                if len(buf) - self._pos >= self._max_line:
                    return self._fail(b"line too long")
                self._scan = len(buf)
                return None
            line = bytes(buf[self._pos:lf])
            self._pos = self._scan = lf + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            # RFC 5321 §4.2: Reply-code [ SP textstring ] CRLF, or Reply-code "-" text CRLF.
            if (len(line) < 3 or not line[:3].isdigit() or line[0] not in b"2345"
                    or line[3:4] not in (b"", b" ", b"-")
                    or b"\r" in line or b"\0" in line):
                return self._fail(b"malformed")
            code = int(line[:3])
            if self._lines and code != self._code:
                return self._fail(b"malformed")
            self._code = code
            self._lines.append(line[4:])
            if line[3:4] != b"-":
                reply = (code, self._lines)
                self._lines = []
                return reply
            if len(self._lines) >= self._max_lines:
                return self._fail(b"too many lines")

    def _fail(self, reason: bytes) -> tuple[int, list[bytes]]:
        self._dead = True
        self._buf = bytearray()
        self._pos = self._scan = 0
        self._lines = []
        return (-1, [reason])


def encode_data(body: bytes) -> bytes:
    """Body -> DATA content: CRLF-normalised, dot-stuffed, ending in CRLF.CRLF (RFC 5321 §4.5.2)."""
    out = []
    # bytes.splitlines() breaks on exactly CRLF, a bare CR and a bare LF.
    for line in memoryview(body).tobytes().splitlines():
        if line[:1] == b".":
            out.append(b"." + line)
        else:
            out.append(line)
    out.append(b".\r\n")
    return b"\r\n".join(out)
