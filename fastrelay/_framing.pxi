# SMTP framing in Cython: command lines, DATA/BDAT bodies, replies, DATA encoding.
#
# The spec is fastrelay/_purepy/framing.py; this file must behave exactly like it (the tests run both).
# Everything here works on whole buffers: memchr finds each LF, CR and NUL (never a C string function,
# which would stop at a NUL: docs/reliability.md case 25), runs of body lines that need no unstuffing go to
# the body in one memcpy, and a `bytes` fed into an empty buffer is parsed in place without a copy.

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcpy, memmove

from fastrelay.limits import COMMAND_HARD_CAP as _FR_COMMAND_HARD_CAP
from fastrelay.limits import MAX_COMMAND_LINE as _FR_MAX_COMMAND_LINE
from fastrelay.limits import MAX_MESSAGE_SIZE as _FR_MAX_MESSAGE_SIZE
from fastrelay.limits import MAX_REPLY_LINE as _FR_MAX_REPLY_LINE
from fastrelay.limits import MAX_REPLY_LINES as _FR_MAX_REPLY_LINES
from fastrelay.limits import MAX_TEXT_LINE as _FR_MAX_TEXT_LINE

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

cdef enum:
    _FR_F_BARE_LF = 1
    _FR_F_BARE_CR = 2
    _FR_F_LONG_LINE = 4
    _FR_F_TOO_BIG = 8
    _FR_F_NUL = 16
    _FR_MODE_COMMAND = 0
    _FR_MODE_DATA = 1
    _FR_MODE_BDAT = 2
    _FR_MODE_DEAD = 3
    # Which buffer holds the next unconsumed byte.
    _FR_SEG_NONE = 0
    _FR_SEG_OWN = 1
    _FR_SEG_REF = 2

# A BDAT count must fit a signed 64-bit integer (docs/reliability.md case 29: a bounded integer).
cdef object _FR_MAX_CHUNK = 2**63 - 1
# Buffers bigger than this are freed when they empty, so an idle connection does not keep them.
cdef Py_ssize_t _FR_KEEP_BUFFER = 256 * 1024


cdef class _FrInput:
    """Received bytes not yet consumed: an owned buffer, then possibly a `bytes` parsed in place.

    Order: own[ipos:ilen] comes before ref[rpos:rlen]. feed() moves any rest of the old ref into
    own, so at most one referenced `bytes` is held; a line that straddles the two is completed by
    copying the ref's bytes up to its first LF into own (_pull_line), so a 64 KB feed is not copied.
    *scan marks how far the unconsumed bytes are known to hold no LF (no rescans of a long line).
    """

    cdef char* _own
    cdef Py_ssize_t _cap, _ilen, _ipos, _iscan
    cdef object _ref
    cdef const char* _rb
    cdef Py_ssize_t _rlen, _rpos, _rscan

    def __dealloc__(self):
        free(self._own)
        self._own = NULL

    @cython.final
    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t used = self._ilen - self._ipos
        cdef Py_ssize_t newcap
        cdef char* p
        # Compact occasionally: when it makes room, or when the consumed part outweighs the rest
        # (each byte is then moved O(1) times on average).
        if self._ipos and (self._ilen + extra > self._cap or self._ipos >= used):
            memmove(self._own, self._own + self._ipos, used)
            self._iscan -= self._ipos
            self._ilen = used
            self._ipos = 0
        if self._ilen + extra > self._cap:
            newcap = self._cap * 2
            if newcap < self._ilen + extra:
                newcap = self._ilen + extra
            if newcap < 4096:
                newcap = 4096
            p = <char*>realloc(self._own, newcap)
            if p == NULL:
                raise MemoryError()
            self._own = p
            self._cap = newcap
        return 0

    @cython.final
    cdef int _own_append(self, const char* data, Py_ssize_t n) except -1:
        self._reserve(n)
        memcpy(self._own + self._ilen, data, n)
        self._ilen += n
        return 0

    @cython.final
    cdef int _unref(self) except -1:
        # Move the rest of the referenced bytes into own, keeping what is known about LFs.
        cdef Py_ssize_t n = self._rlen - self._rpos
        cdef Py_ssize_t scanned = self._rscan - self._rpos
        cdef bint own_scanned = self._iscan == self._ilen
        if n:
            self._own_append(self._rb + self._rpos, n)
            if own_scanned:
                self._iscan = self._ilen - n + scanned
        self._drop_ref()
        return 0

    @cython.final
    cdef inline void _drop_ref(self) noexcept:
        self._ref = None
        self._rb = NULL
        self._rlen = self._rpos = self._rscan = 0

    @cython.final
    cdef int _feed(self, object data) except -1:
        cdef Py_buffer view
        if self._ref is not None:
            self._unref()
        if PyBytes_CheckExact(data):
            if PyBytes_GET_SIZE(data):
                self._ref = data
                self._rb = PyBytes_AS_STRING(data)
                self._rlen = PyBytes_GET_SIZE(data)
                self._rpos = self._rscan = 0
            return 0
        # bytearray, memoryview...: the caller may change them later, so copy.
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._own_append(<const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return 0

    @cython.final
    cdef int _pull_line(self) except -1:
        # own[ipos:] holds no LF: complete it with the ref's bytes up to its first LF (or all).
        cdef const char* start = self._rb + self._rpos
        cdef const char* lf = <const char*>memchr(self._rb + self._rscan, b'\n', self._rlen - self._rscan)
        cdef Py_ssize_t n = (lf + 1 - start) if lf != NULL else (self._rlen - self._rpos)
        self._own_append(start, n)
        self._rpos += n
        if self._rscan < self._rpos:
            self._rscan = self._rpos
        if self._rpos == self._rlen:
            self._drop_ref()
        return 0

    @cython.final
    cdef inline int _seg(self, const char** base, Py_ssize_t* pos, Py_ssize_t* scan,
                         Py_ssize_t* end) noexcept:
        if self._ipos < self._ilen:
            base[0] = self._own
            pos[0] = self._ipos
            scan[0] = self._iscan
            end[0] = self._ilen
            return _FR_SEG_OWN
        if self._rpos < self._rlen:
            base[0] = self._rb
            pos[0] = self._rpos
            scan[0] = self._rscan
            end[0] = self._rlen
            return _FR_SEG_REF
        return _FR_SEG_NONE

    @cython.final
    cdef inline void _set(self, int seg, Py_ssize_t pos, Py_ssize_t scan) noexcept:
        # Consume up to pos; drops the ref when it is used up (pointers into it become invalid).
        if scan < pos:
            scan = pos
        if seg == _FR_SEG_OWN:
            self._ipos = pos
            self._iscan = scan
            if pos == self._ilen:
                self._ipos = self._ilen = self._iscan = 0
                if self._cap > _FR_KEEP_BUFFER:
                    free(self._own)
                    self._own = NULL
                    self._cap = 0
        elif seg == _FR_SEG_REF:
            self._rpos = pos
            self._rscan = scan
            if pos == self._rlen:
                self._drop_ref()

    @cython.final
    cdef inline bint _more_ref(self) noexcept:
        return self._rpos < self._rlen

    @cython.final
    cdef Py_ssize_t _pending(self) noexcept:
        return (self._ilen - self._ipos) + (self._rlen - self._rpos)

    @cython.final
    cdef Py_ssize_t _clear(self) noexcept:
        cdef Py_ssize_t n = self._pending()
        self._drop_ref()
        self._ipos = self._ilen = self._iscan = 0
        if self._cap > _FR_KEEP_BUFFER:
            free(self._own)
            self._own = NULL
            self._cap = 0
        return n


cdef class ServerFramer(_FrInput):
    """Server side: command lines, then DATA or BDAT bodies, as events."""

    cdef Py_ssize_t _max_line, _max_text_line, _max_size, _hard_cap
    cdef int _mode
    # Command line in progress: bytes already discarded because it is too long.
    cdef Py_ssize_t _skipped
    cdef bint _skipped_cr
    # The message: body in a growable buffer, built into `bytes` once at the end.
    cdef char* _ob
    cdef Py_ssize_t _ocap, _olen
    cdef int _flags
    cdef bint _drop_line            # DATA: the rest of the current line is dropped up to its LF
    cdef bint _drop_cr              # DATA: the last byte dropped so was a CR
    cdef bint _after_crlf           # DATA: the last line ended in CRLF (the DATA command's, first)
    cdef long long _remaining, _chunk   # BDAT
    cdef bint _last
    cdef bint _cr                   # BDAT: the last body byte was a CR
    cdef Py_ssize_t _line_len       # BDAT: body bytes since the last LF

    def __init__(self, Py_ssize_t max_line=_FR_MAX_COMMAND_LINE, Py_ssize_t max_text_line=_FR_MAX_TEXT_LINE,
                 Py_ssize_t max_size=_FR_MAX_MESSAGE_SIZE, Py_ssize_t hard_cap=_FR_COMMAND_HARD_CAP):
        if max_line < 3 or max_text_line < 3 or max_size < 0 or hard_cap < max_line:
            raise ValueError("ServerFramer: need max_line >= 3, max_text_line >= 3, "
                             "max_size >= 0, hard_cap >= max_line")
        self._max_line = max_line
        self._max_text_line = max_text_line
        self._max_size = max_size
        self._hard_cap = hard_cap
        self._mode = _FR_MODE_COMMAND
        self._skipped = 0
        self._skipped_cr = 0
        self._new_message()

    def __dealloc__(self):
        free(self._ob)
        self._ob = NULL

    @cython.final
    cdef void _new_message(self) noexcept:
        self._olen = 0
        if self._ocap > _FR_KEEP_BUFFER:
            free(self._ob)
            self._ob = NULL
            self._ocap = 0
        self._flags = 0
        self._drop_line = 0
        self._drop_cr = 0
        self._after_crlf = 1
        self._remaining = self._chunk = 0
        self._last = 0
        self._cr = 0
        self._line_len = 0

    @cython.final
    cdef int _out_write(self, const char* data, Py_ssize_t n) except -1:
        cdef Py_ssize_t newcap
        cdef char* p
        if self._olen + n > self._ocap:
            newcap = self._ocap * 2
            if newcap < self._olen + n:
                newcap = self._olen + n
            if newcap < 16384:
                newcap = 16384
            p = <char*>realloc(self._ob, newcap)
            if p == NULL:
                raise MemoryError()
            self._ob = p
            self._ocap = newcap
        memcpy(self._ob + self._olen, data, n)
        self._olen += n
        return 0

    @property
    def flags(self):
        return self._flags

    @property
    def size(self):
        return self._olen

    @property
    def mode(self):
        return self._mode

    def feed(self, data):
        if self._mode == _FR_MODE_DEAD:
            return
        self._feed(data)

    def pending(self):
        return self._pending()

    def discard_pending(self):
        self._skipped = 0
        self._skipped_cr = 0
        self._drop_line = 0
        return self._clear()

    def reset(self):
        if self._mode == _FR_MODE_DEAD:
            return
        self._new_message()
        self._mode = _FR_MODE_COMMAND

    def begin_data(self):
        if self._mode != _FR_MODE_COMMAND:
            raise RuntimeError("begin_data() outside command mode")
        self._mode = _FR_MODE_DATA

    def begin_bdat(self, size, last):
        if self._mode != _FR_MODE_COMMAND:
            raise RuntimeError("begin_bdat() outside command mode")
        if not isinstance(size, int) or size < 0 or size > _FR_MAX_CHUNK:
            raise ValueError("BDAT chunk size must be an int in 0 .. 2**63-1")
        cdef long long n = size
        # RFC 3030 §2, docs/reliability.md case 29: a chunk over the limit is still read in full (then 552).
        if not (self._flags & _FR_F_TOO_BIG) and n > self._max_size - self._olen:
            self._flags |= _FR_F_TOO_BIG
        self._remaining = self._chunk = n
        self._last = bool(last)
        self._mode = _FR_MODE_BDAT

    def next_event(self):
        cdef int mode = self._mode
        if mode == _FR_MODE_COMMAND:
            return self._next_command()
        if mode == _FR_MODE_DATA:
            return self._next_data()
        if mode == _FR_MODE_BDAT:
            return self._next_bdat()
        return None

    # -- command mode ---------------------------------------------------------------------------

    @cython.final
    cdef object _next_command(self):
        cdef const char* base
        cdef const char* p
        cdef const char* lf
        cdef Py_ssize_t pos, scan, end, n, length, skipped
        cdef bint has_cr
        cdef int seg
        cdef object event
        while True:
            seg = self._seg(&base, &pos, &scan, &end)
            if seg == _FR_SEG_NONE:
                return None
            lf = <const char*>memchr(base + scan, b'\n', end - scan)
            if lf == NULL:
                if seg == _FR_SEG_OWN and self._more_ref():
                    self._iscan = end
                    self._pull_line()
                    continue
                self._set(seg, pos, end)
                return self._partial_command(seg, base, pos, end)
            p = base + pos
            n = lf - p      # without its LF
            skipped = self._skipped
            self._skipped = 0
            if n:
                has_cr = (lf - 1)[0] == b'\r'
            else:
                has_cr = skipped > 0 and self._skipped_cr
            self._skipped_cr = 0
            length = skipped + n - has_cr
            if length > self._hard_cap - 2:
                return self._overflow()
            if length > self._max_line - 2:     # RFC 5321 §4.5.3.1.4
                event = (2, 1)
            elif not has_cr:
                event = (2, 2)
            # docs/reliability.md case 2: a CR alone never splits a command; the whole line is refused.
            elif memchr(p, b'\r', n - 1) != NULL:
                event = (2, 3)
            elif memchr(p, 0, n - 1) != NULL:
                event = (2, 4)
            else:
                event = (1, PyBytes_FromStringAndSize(p, n - 1))
            self._set(seg, lf + 1 - base, lf + 1 - base)
            return event

    @cython.final
    cdef object _partial_command(self, int seg, const char* base, Py_ssize_t pos, Py_ssize_t end):
        cdef Py_ssize_t new = end - pos
        cdef Py_ssize_t n = self._skipped + new
        cdef bint ends_cr = (base[end - 1] == b'\r') if new else self._skipped_cr
        # A final CR may be half of the CRLF, so it does not count (split invariance).
        if n - ends_cr > self._hard_cap - 2:
            return self._overflow()
        if n > self._max_line:
            # Sure to be ERR_TOO_LONG: keep only its length (docs/reliability.md case 9).
            self._skipped = n
            self._skipped_cr = ends_cr
            self._set(seg, end, end)
        return None

    @cython.final
    cdef object _overflow(self):
        self._mode = _FR_MODE_DEAD
        self._clear()
        self._new_message()
        return (3,)

    # -- DATA mode ------------------------------------------------------------------------------

    @cython.final
    cdef object _next_data(self):
        cdef const char* base
        cdef Py_ssize_t pos, scan, end
        cdef int seg
        while True:
            seg = self._seg(&base, &pos, &scan, &end)
            if seg == _FR_SEG_NONE:
                return None
            if self._data_lines(base, &pos, scan, end):
                self._set(seg, pos, pos)
                return self._finish()
            # No LF in base[pos:end]: complete that line from the ref, or deal with it as partial.
            if seg == _FR_SEG_OWN and self._more_ref():
                self._set(seg, pos, end)
                if self._ipos < self._ilen:
                    self._pull_line()
                continue
            self._partial_data(base, &pos, end)
            self._set(seg, pos, end)
            return None

    @cython.final
    cdef int _data_lines(self, const char* base, Py_ssize_t* ppos, Py_ssize_t scan,
                         Py_ssize_t end) except -1:
        # Consume the complete lines of base[*ppos:end]; 1 if the end line was one of them.
        cdef const char* p = base + ppos[0]     # start of the current line
        cdef const char* q = base + scan        # where its LF may be
        cdef const char* e = base + end
        cdef const char* lf
        cdef const char* nxt
        cdef const char* s
        cdef const char* run_s = NULL           # unstuffed lines not yet copied to the body
        cdef const char* run_e = NULL
        cdef Py_ssize_t size = self._olen       # body size, pending run included
        cdef Py_ssize_t max_size = self._max_size
        cdef Py_ssize_t long_line = self._max_text_line - 2
        cdef Py_ssize_t ul, clen
        cdef int flags = self._flags
        cdef int ended = 0
        cdef bint after_crlf = self._after_crlf
        cdef bint crlf
        while True:
            lf = <const char*>memchr(q, b'\n', e - q)
            if lf == NULL:
                break
            nxt = lf + 1
            crlf = lf > p and (lf - 1)[0] == b'\r'
            if self._drop_line:
                self._drop_line = 0
                if lf == p:
                    crlf = self._drop_cr
            # RFC 5321 §4.1.1.4: only CRLF.CRLF ends the data: a line ".\r\n" right after a CRLF.
            elif after_crlf and nxt - p == 3 and p[0] == b'.' and p[1] == b'\r':
                ended = 1
                p = nxt
                break
            elif not (flags & _FR_F_TOO_BIG):
                s = p + (p[0] == b'.')          # RFC 5321 §4.5.2 transparency
                ul = nxt - s
                if size + ul > max_size:
                    flags |= _FR_F_TOO_BIG
                else:
                    # (a wire line ending in CRLF keeps it after unstuffing: ".\n" is bare LF)
                    if crlf:
                        clen = ul - 2
                    else:
                        flags |= _FR_F_BARE_LF
                        clen = ul - 1
                    if not (flags & _FR_F_BARE_CR) and memchr(s, b'\r', clen) != NULL:
                        flags |= _FR_F_BARE_CR
                    if not (flags & _FR_F_NUL) and memchr(s, 0, clen) != NULL:
                        flags |= _FR_F_NUL
                    if clen > long_line:        # RFC 5321 §4.5.3.1.6
                        flags |= _FR_F_LONG_LINE
                    if s != run_e:              # an unstuffed or dropped line breaks the run
                        if run_e != run_s:
                            self._out_write(run_s, run_e - run_s)
                        run_s = s
                    run_e = nxt
                    size += ul
            after_crlf = crlf
            p = q = nxt
        if run_e != run_s:
            self._out_write(run_s, run_e - run_s)
        self._flags = flags
        self._after_crlf = after_crlf
        ppos[0] = p - base
        return ended

    @cython.final
    cdef void _partial_data(self, const char* base, Py_ssize_t* ppos, Py_ssize_t end) noexcept:
        cdef Py_ssize_t pos = ppos[0]
        cdef Py_ssize_t n = end - pos
        cdef bint dot
        if not self._drop_line:
            if n == 0:
                return
            dot = base[pos] == b'.'
            if dot and (n == 1 or (n == 2 and base[pos + 1] == b'\r')):
                return      # may still become the end line
            if not (self._flags & _FR_F_TOO_BIG):
                if self._olen + n - dot <= self._max_size:
                    return
                self._flags |= _FR_F_TOO_BIG
        if n:
            self._drop_cr = base[end - 1] == b'\r'
        self._drop_line = 1
        ppos[0] = end

    @cython.final
    cdef object _finish(self):
        cdef object event = (4, PyBytes_FromStringAndSize(self._ob, self._olen), self._flags)
        self._new_message()
        self._mode = _FR_MODE_COMMAND
        return event

    # -- BDAT mode ------------------------------------------------------------------------------

    @cython.final
    cdef object _next_bdat(self):
        cdef const char* base
        cdef Py_ssize_t pos, scan, end, take
        cdef int seg
        while self._remaining > 0:
            seg = self._seg(&base, &pos, &scan, &end)
            if seg == _FR_SEG_NONE:
                return None
            take = end - pos
            if take > self._remaining:
                take = <Py_ssize_t>self._remaining
            if not (self._flags & _FR_F_TOO_BIG):
                self._bdat_check(base + pos, take)
                self._out_write(base + pos, take)
            self._remaining -= take
            self._set(seg, pos + take, scan)
        if not self._last:
            self._mode = _FR_MODE_COMMAND
            return (5, self._chunk)
        if not (self._flags & _FR_F_TOO_BIG):
            if self._cr:        # RFC 3030: the content is raw; a final CR has no LF after it
                self._flags |= _FR_F_BARE_CR
            if self._line_len > self._max_text_line - 2:
                self._flags |= _FR_F_LONG_LINE
        return self._finish()

    @cython.final
    cdef void _bdat_check(self, const char* data, Py_ssize_t n) noexcept:
        cdef const char* q = data
        cdef const char* e = data + n
        cdef const char* lf
        cdef const char* seg_end
        cdef Py_ssize_t seg_len
        cdef Py_ssize_t long_line = self._max_text_line - 2
        cdef int flags = self._flags
        while True:
            lf = <const char*>memchr(q, b'\n', e - q)
            seg_end = lf if lf != NULL else e
            seg_len = seg_end - q
            if seg_len:
                if self._cr:        # the CR that ended the previous segment is not before a LF
                    flags |= _FR_F_BARE_CR
                if memchr(q, b'\r', seg_len - 1) != NULL:
                    flags |= _FR_F_BARE_CR
                if memchr(q, 0, seg_len) != NULL:
                    flags |= _FR_F_NUL
                self._cr = (seg_end - 1)[0] == b'\r'
                self._line_len += seg_len
            if lf == NULL:
                break
            if not self._cr:
                flags |= _FR_F_BARE_LF
            if self._line_len - self._cr > long_line:
                flags |= _FR_F_LONG_LINE
            self._cr = 0
            self._line_len = 0
            q = lf + 1
        self._flags = flags


cdef class ReplyParser(_FrInput):
    """Client side: server replies (code, text lines), with bounded memory."""

    cdef Py_ssize_t _max_line, _max_lines
    cdef int _code
    cdef list _lines
    cdef bint _dead

    def __init__(self, Py_ssize_t max_line=_FR_MAX_REPLY_LINE, Py_ssize_t max_lines=_FR_MAX_REPLY_LINES):
        if max_line < 4 or max_lines < 1:
            raise ValueError("ReplyParser: need max_line >= 4 and max_lines >= 1")
        self._max_line = max_line
        self._max_lines = max_lines
        self._code = 0
        self._lines = []
        self._dead = 0

    def feed(self, data):
        if self._dead:
            return
        self._feed(data)

    def next_reply(self):
        cdef const char* base
        cdef const char* p
        cdef const char* lf
        cdef Py_ssize_t pos, scan, end, limit, n
        cdef int seg, code
        cdef char sep
        cdef object text
        if self._dead:
            return None
        while True:
            seg = self._seg(&base, &pos, &scan, &end)
            if seg == _FR_SEG_NONE:
                return None
            # RFC 5321 §4.5.3.1.5 caps a reply line; look for its LF only within max_line bytes.
            limit = pos + self._max_line
            if limit > end:
                limit = end
            lf = NULL
            if limit > scan:
                lf = <const char*>memchr(base + scan, b'\n', limit - scan)
            if lf == NULL:
                if end - pos >= self._max_line:
                    return self._fail(b"line too long")
                if seg == _FR_SEG_OWN and self._more_ref():
                    self._iscan = end
                    self._pull_line()
                    continue
                self._set(seg, pos, end)
                return None
            p = base + pos
            n = lf - p
            if n and p[n - 1] == b'\r':
                n -= 1
            # RFC 5321 §4.2: Reply-code [ SP textstring ] CRLF, or Reply-code "-" text CRLF.
            sep = p[3] if n > 3 else b' '
            if (n < 3 or not (b'2' <= p[0] <= b'5') or not (b'0' <= p[1] <= b'9')
                    or not (b'0' <= p[2] <= b'9') or (sep != b' ' and sep != b'-')
                    or memchr(p, b'\r', n) != NULL or memchr(p, 0, n) != NULL):
                return self._fail(b"malformed")
            code = (p[0] - 48) * 100 + (p[1] - 48) * 10 + (p[2] - 48)
            if self._lines and code != self._code:
                return self._fail(b"malformed")
            self._code = code
            text = PyBytes_FromStringAndSize(p + 4, n - 4) if n > 4 else b""
            self._set(seg, lf + 1 - base, lf + 1 - base)
            self._lines.append(text)
            if sep == b'-':
                if len(self._lines) >= self._max_lines:
                    return self._fail(b"too many lines")
                continue
            reply = (code, self._lines)
            self._lines = []
            return reply

    @cython.final
    cdef object _fail(self, bytes reason):
        self._dead = 1
        self._clear()
        self._lines = []
        return (-1, [reason])


cdef Py_ssize_t _fr_encode(const char* q, Py_ssize_t n, char* o) noexcept:
    # The DATA content of q[:n]: written to o, or with o == NULL only measured, so the caller can
    # allocate the result at its exact size (two passes, as bytes.replace does).
    cdef const char* e = q + n
    cdef const char* lf
    cdef const char* cr
    cdef const char* le
    cdef const char* brk
    cdef const char* run_s = q          # input bytes that go out unchanged, not yet copied
    cdef Py_ssize_t w = 0, k
    cdef bint need_crlf = 0
    while q < e:
        # q is at a line start (RFC 5321 §4.5.2: a leading dot is doubled).
        if q[0] == b'.':
            # Copy the run up to here, then the extra dot; the line's own dot starts the next run.
            k = q - run_s
            if o != NULL:
                memcpy(o + w, run_s, k)
                o[w + k] = b'.'
            w += k + 1
            run_s = q
        lf = <const char*>memchr(q, b'\n', e - q)
        le = lf if lf != NULL else e
        cr = <const char*>memchr(q, b'\r', le - q)
        if cr != NULL:
            if cr + 1 == lf:            # CRLF: kept as it is, in the run
                q = lf + 1
                continue
            brk = cr                    # bare CR
        elif lf != NULL:
            brk = lf                    # bare LF
        else:
            need_crlf = 1               # last line without a line ending
            q = e
            break
        # docs/reliability.md case 3: the bare CR or LF at brk goes out as CRLF.
        k = brk - run_s
        if o != NULL:
            memcpy(o + w, run_s, k)
            o[w + k] = b'\r'
            o[w + k + 1] = b'\n'
        w += k + 2
        q = run_s = brk + 1
    k = q - run_s
    if o != NULL:
        memcpy(o + w, run_s, k)
    w += k
    if need_crlf:
        if o != NULL:
            o[w] = b'\r'
            o[w + 1] = b'\n'
        w += 2
    if o != NULL:
        memcpy(o + w, b".\r\n", 3)
    return w + 3


# encode_data's first pass, in C: 64-byte blocks compared with SIMD (AVX2 if the CPU has it, picked
# once at import, else SSE2, the x86-64 baseline; elsewhere encode_data uses memchr, in two passes).
# Every change encode_data makes is the insertion of one byte, so this pass only has to find where:
# '\n' after a bare CR, '\r' before a bare LF, '.' before a dot that starts a line (docs/reliability.md
# case 3, RFC 5321 §4.5.2); then the result is allocated once at its exact size and filled by memcpy.
cdef extern from *:
    """
    #include <stdint.h>
    #include <stdlib.h>
    #include <string.h>

    static inline int fr_ctz64(uint64_t x) {
    #if defined(__GNUC__) || defined(__clang__)
        return __builtin_ctzll(x);
    #else
        int k = 0;
        while (!(x & 1)) { x >>= 1; k++; }
        return k;
    #endif
    }

    /* FR_DEFINE_PLAN(NAME, ATTR, SPECIALS): SPECIALS(p) is the bit mask of the 64 bytes at p (p[-1]
       and p[64] readable) that need an insertion: a CR not before a LF, a LF not after a CR, a dot
       after a CR or LF. NAME returns the exact output size and the insertions, each
       position * 4 + index in ".\\r\\n", in *pmarks (malloc'd, the caller frees), or -1 if there are
       more than `limit` of them. The body start counts as after a LF (a line start). */
    #define FR_DEFINE_PLAN(NAME, ATTR, SPECIALS)                                                \\
    ATTR static Py_ssize_t NAME(const unsigned char *b, Py_ssize_t n, Py_ssize_t **pmarks,      \\
                                Py_ssize_t *pnm, Py_ssize_t limit) {                            \\
        Py_ssize_t nm = 0, cap = 0, i, j, len, *marks = NULL, *tmp;                             \\
        const unsigned char *p;                                                                 \\
        unsigned char pad[66];                                                                  \\
        uint64_t s;                                                                             \\
        for (i = 0; i < n; i += 64) {                                                           \\
            if (i >= 1 && n - i >= 65) {                                                        \\
                p = b + i;                                                                      \\
                s = SPECIALS(p);                                                                \\
            } else {        /* first and last blocks: neighbours copied into pad */             \\
                len = n - i < 64 ? n - i : 64;                                                  \\
                memset(pad, 0, sizeof pad);                                                     \\
                pad[0] = i ? b[i - 1] : '\\n';                                                  \\
                memcpy(pad + 1, b + i, (size_t)len);                                            \\
                if (i + len < n) pad[1 + len] = b[i + len];                                     \\
                p = pad + 1;                                                                    \\
                s = SPECIALS(p);                                                                \\
                if (len < 64) s &= ((uint64_t)1 << len) - 1;                                    \\
            }                                                                                   \\
            for (; s; s &= s - 1) {                                                             \\
                j = fr_ctz64(s);                                                                \\
                if (nm == cap) {                                                                \\
                    if (cap >= limit) { free(marks); return -1; }                               \\
                    cap = cap * 2 + 16;                                                         \\
                    tmp = (Py_ssize_t *)realloc(marks, (size_t)cap * sizeof(Py_ssize_t));       \\
                    if (tmp == NULL) { free(marks); return -1; }                                \\
                    marks = tmp;                                                                \\
                }                                                                               \\
                marks[nm++] = p[j] == '\\r' ? (i + j + 1) * 4 + 2    /* LF after a bare CR */   \\
                            : p[j] == '\\n' ? (i + j) * 4 + 1        /* CR before a bare LF */  \\
                            : (i + j) * 4;                           /* '.' before a line's dot */\\
            }                                                                                   \\
        }                                                                                       \\
        *pmarks = marks;                                                                        \\
        *pnm = nm;                                                                              \\
        /* the last line gets a CRLF if it has no line end; then ".\\r\\n" */                   \\
        return n + nm + 3 + ((n > 0 && b[n - 1] != '\\r' && b[n - 1] != '\\n') ? 2 : 0);        \\
    }

    #if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
    #include <immintrin.h>
    #define FR_X86 1

    static inline __attribute__((always_inline)) uint64_t fr_specials16_sse2(const unsigned char *p) {
        const __m128i cr = _mm_set1_epi8('\\r'), lf = _mm_set1_epi8('\\n'), dot = _mm_set1_epi8('.');
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        __m128i before = _mm_loadu_si128((const __m128i *)(p - 1));
        __m128i after = _mm_loadu_si128((const __m128i *)(p + 1));
        __m128i cr_before = _mm_cmpeq_epi8(before, cr);
        __m128i s = _mm_andnot_si128(_mm_cmpeq_epi8(after, lf), _mm_cmpeq_epi8(v, cr));
        s = _mm_or_si128(s, _mm_andnot_si128(cr_before, _mm_cmpeq_epi8(v, lf)));
        s = _mm_or_si128(s, _mm_and_si128(_mm_cmpeq_epi8(v, dot),
                                          _mm_or_si128(cr_before, _mm_cmpeq_epi8(before, lf))));
        return (uint64_t)(uint16_t)_mm_movemask_epi8(s);
    }
    static inline __attribute__((always_inline)) uint64_t fr_specials_sse2(const unsigned char *p) {
        return fr_specials16_sse2(p) | fr_specials16_sse2(p + 16) << 16
            | fr_specials16_sse2(p + 32) << 32 | fr_specials16_sse2(p + 48) << 48;
    }
    FR_DEFINE_PLAN(fr_plan_sse2, , fr_specials_sse2)

    __attribute__((target("avx2"))) static inline uint64_t fr_specials32_avx2(const unsigned char *p) {
        const __m256i cr = _mm256_set1_epi8('\\r'), lf = _mm256_set1_epi8('\\n'), dot = _mm256_set1_epi8('.');
        __m256i v = _mm256_loadu_si256((const __m256i *)p);
        __m256i before = _mm256_loadu_si256((const __m256i *)(p - 1));
        __m256i after = _mm256_loadu_si256((const __m256i *)(p + 1));
        __m256i cr_before = _mm256_cmpeq_epi8(before, cr);
        __m256i s = _mm256_andnot_si256(_mm256_cmpeq_epi8(after, lf), _mm256_cmpeq_epi8(v, cr));
        s = _mm256_or_si256(s, _mm256_andnot_si256(cr_before, _mm256_cmpeq_epi8(v, lf)));
        s = _mm256_or_si256(s, _mm256_and_si256(_mm256_cmpeq_epi8(v, dot),
                                                _mm256_or_si256(cr_before, _mm256_cmpeq_epi8(before, lf))));
        return (uint64_t)(uint32_t)_mm256_movemask_epi8(s);
    }
    __attribute__((target("avx2"))) static inline uint64_t fr_specials_avx2(const unsigned char *p) {
        return fr_specials32_avx2(p) | fr_specials32_avx2(p + 32) << 32;
    }
    FR_DEFINE_PLAN(fr_plan_avx2, __attribute__((target("avx2"))), fr_specials_avx2)
    #endif

    /* 0 none (encode_data measures and writes with memchr), 1 SSE2, 2 AVX2 */
    static int fr_simd_max = 0;
    static int fr_simd_level = 0;

    static void fr_simd_init(void) {
    #ifdef FR_X86
        __builtin_cpu_init();
        fr_simd_max = 1;
        if (__builtin_cpu_supports("avx2")) fr_simd_max = 2;
    #endif
        fr_simd_level = fr_simd_max;
    }

    static Py_ssize_t fr_plan(const char *b, Py_ssize_t n, Py_ssize_t **pmarks, Py_ssize_t *pnm,
                              Py_ssize_t limit) {
        const unsigned char *u = (const unsigned char *)b;
        *pmarks = NULL;
        *pnm = 0;
        switch (fr_simd_level) {
    #ifdef FR_X86
        case 2: return fr_plan_avx2(u, n, pmarks, pnm, limit);
        case 1: return fr_plan_sse2(u, n, pmarks, pnm, limit);
    #endif
        default: return -1;
        }
    }
    """
    int fr_simd_max
    int fr_simd_level
    void fr_simd_init()
    Py_ssize_t fr_plan(const char* b, Py_ssize_t n, Py_ssize_t** pmarks, Py_ssize_t* pnm,
                       Py_ssize_t limit) noexcept

fr_simd_init()


def _framing_simd(level=None):
    """Testing aid: the SIMD level encode_data uses (0 none: memchr, 1 SSE2, 2 AVX2); set it
    (capped at what the CPU has) when level is given. Returns the level in use."""
    global fr_simd_level
    if level is not None:
        fr_simd_level = max(0, min(int(level), fr_simd_max))
    return fr_simd_level


def encode_data(body):
    """Body -> DATA content: CRLF-normalised, dot-stuffed, ending in CRLF.CRLF (RFC 5321 §4.5.2)."""
    cdef Py_buffer view
    cdef object out
    cdef const char* b
    cdef char* o
    cdef Py_ssize_t n, total, i, pos, prev = 0, w = 0
    cdef Py_ssize_t nm = 0
    cdef Py_ssize_t* marks = NULL
    PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
    try:
        b = <const char*>view.buf
        n = view.len
        # One pass finds the insertions, so the result is allocated once at its exact size.
        total = fr_plan(b, n, &marks, &nm, (n >> 4) + 64)
        if total < 0:
            # No SIMD, or too many insertions to list (a body of bare line ends): measure, write.
            out = PyBytes_FromStringAndSize(NULL, _fr_encode(b, n, NULL))
            _fr_encode(b, n, PyBytes_AS_STRING(out))
            return out
        out = PyBytes_FromStringAndSize(NULL, total)
        o = PyBytes_AS_STRING(out)
        for i in range(nm):
            pos = marks[i] >> 2
            memcpy(o + w, b + prev, pos - prev)
            w += pos - prev
            o[w] = b".\r\n"[marks[i] & 3]
            w += 1
            prev = pos
        memcpy(o + w, b + prev, n - prev)
        w += n - prev
        if total - w == 5:
            o[w] = b'\r'
            o[w + 1] = b'\n'
            w += 2
        memcpy(o + w, b".\r\n", 3)
        return out
    finally:
        free(marks)
        PyBuffer_Release(&view)
