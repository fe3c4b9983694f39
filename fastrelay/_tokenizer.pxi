# The conf tokeniser, compiled: bytes of a conf file -> tokens (spec: fastrelay/_purepy/tokenizer.py).
#
# One pass over the bytes buffer with C-level indexing and 256-entry byte tables; each token's text
# is decoded once (ASCII fast path when no byte >= 0x80, else strict UTF-8) and its tuple built
# directly. Most of the time goes to allocating and freeing the result's objects, so repeated
# ASCII texts share one str (a per-call cache) and token tuples are untracked by the GC at birth.
# Names are prefixed _tok_/_TOK_ because _core.pyx includes the other hot paths into one module.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.ref cimport PyObject
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcpy

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)

from fastrelay.config.errors import ConfigError as _tok_ConfigError

# Token kinds: the same values as fastrelay/config/tokens.py (tests compare _tok_kinds with it).
cdef enum _TokKind:
    _TOK_WORD = 1
    _TOK_STRING = 2
    _TOK_NUMBER = 3
    _TOK_EQUALS = 4
    _TOK_LBRACE = 5
    _TOK_RBRACE = 6
    _TOK_LPAREN = 7
    _TOK_RPAREN = 8
    _TOK_LBRACKET = 9
    _TOK_RBRACKET = 10

_tok_kinds = {
    "WORD": _TOK_WORD,
    "STRING": _TOK_STRING,
    "NUMBER": _TOK_NUMBER,
    "EQUALS": _TOK_EQUALS,
    "LBRACE": _TOK_LBRACE,
    "RBRACE": _TOK_RBRACE,
    "LPAREN": _TOK_LPAREN,
    "RPAREN": _TOK_RPAREN,
    "LBRACKET": _TOK_LBRACKET,
    "RBRACKET": _TOK_RBRACKET,
}

# Byte classes. The three word-byte classes come first and are small so a word's bytes can be
# OR-ed into a bit set: bit 0 = digit, bit 1 = other ASCII, bit 2 = byte >= 0x80.
cdef enum _TokClass:
    _TOK_C_DIGIT = 0
    _TOK_C_OTHER = 1
    _TOK_C_HIGH = 2
    _TOK_C_SLASH = 3      # a word byte, unless followed by '*'
    _TOK_C_SPACE = 4      # whitespace other than LF
    _TOK_C_LF = 5
    _TOK_C_PUNCT = 6      # = { } ( )
    _TOK_C_QUOTE = 7
    _TOK_C_HASH = 8
    _TOK_C_CONTROL = 9
    _TOK_C_LBRACKET = 10  # a bracket, or a word byte: see the twin's spec
    _TOK_C_RBRACKET = 11

cdef unsigned char _tok_class[256]
cdef int _tok_punct_kind[128]
# Word bytes as bits to OR together: 1 = ASCII digit, 2 = other ASCII, 4 = byte >= 0x80; 0 = not a
# word byte by itself ('/' is one unless "/*" follows, checked apart).
cdef unsigned char _tok_word_bits[256]
# 1 for bytes that are plain string content (no quote, backslash, LF or control byte).
cdef unsigned char _tok_string_plain[256]
# The byte a known escape stands for, 0 if the backslash pair is not a known escape.
cdef unsigned char _tok_escape[256]
# 1 for the bytes that may stand between the brackets of an IPv6 literal ([fe80::1%eth0]).
cdef unsigned char _tok_ipv6[256]


cdef void _tok_init_tables() noexcept:
    cdef int b
    for b in range(256):
        if b >= 0x80:
            _tok_class[b] = _TOK_C_HIGH
        elif b in (0x20, 0x09, 0x0D, 0x0C, 0x0B):
            _tok_class[b] = _TOK_C_SPACE
        elif b == 0x0A:
            _tok_class[b] = _TOK_C_LF
        elif b < 0x20 or b == 0x7F:
            _tok_class[b] = _TOK_C_CONTROL
        elif 0x30 <= b <= 0x39:
            _tok_class[b] = _TOK_C_DIGIT
        else:
            _tok_class[b] = _TOK_C_OTHER
    for b in range(128):
        _tok_punct_kind[b] = 0
    _tok_class[ord('/')] = _TOK_C_SLASH
    _tok_class[ord('"')] = _TOK_C_QUOTE
    _tok_class[ord('#')] = _TOK_C_HASH
    _tok_class[ord('[')] = _TOK_C_LBRACKET
    _tok_class[ord(']')] = _TOK_C_RBRACKET
    _tok_punct_kind[ord('=')] = _TOK_EQUALS
    _tok_punct_kind[ord('{')] = _TOK_LBRACE
    _tok_punct_kind[ord('}')] = _TOK_RBRACE
    _tok_punct_kind[ord('(')] = _TOK_LPAREN
    _tok_punct_kind[ord(')')] = _TOK_RPAREN
    for b in range(128):
        if _tok_punct_kind[b]:
            _tok_class[b] = _TOK_C_PUNCT
    for b in range(256):
        _tok_word_bits[b] = (1 << _tok_class[b]) if _tok_class[b] <= _TOK_C_HIGH else 0
        _tok_string_plain[b] = (_tok_class[b] != _TOK_C_CONTROL and _tok_class[b] != _TOK_C_LF
                                and b != ord('"') and b != ord('\\'))
        _tok_escape[b] = 0
        _tok_ipv6[b] = (b < 0x80 and (chr(b).isalnum() or b in (ord(':'), ord('.'), ord('%'), ord('_'), ord('-'))))
    _tok_escape[ord('\\')] = ord('\\')
    _tok_escape[ord('"')] = ord('"')
    _tok_escape[ord('n')] = ord('\n')
    _tok_escape[ord('t')] = ord('\t')
    _tok_escape[ord('r')] = ord('\r')


_tok_init_tables()

# Texts of the one-character tokens, indexed by kind (created once, shared by every token).
cdef tuple _tok_punct_text = (None, None, None, None, "=", "{", "}", "(", ")", "[", "]")

cdef str _TOK_UNTERMINATED_STRING = (
    "unterminated string; expected a closing '\"' before the end of the file")
cdef str _TOK_UNTERMINATED_COMMENT = "unterminated comment; expected '*/' before the end of the file"


cdef object _tok_control_error(object filename, Py_ssize_t line, Py_ssize_t col, unsigned char byte):
    return _tok_ConfigError(
        filename, line, col, "unexpected control character 0x%02X; expected printable text" % byte)


cdef object _tok_unterminated(object filename, Py_ssize_t line, Py_ssize_t col,
                              Py_ssize_t ml_line, Py_ssize_t ml_col):
    # ml_line/ml_col: the first earlier string that ran over several lines (0 if none).
    cdef str message = _TOK_UNTERMINATED_STRING
    if ml_line:
        message += (f" (the string opened at {ml_line}:{ml_col} runs over several lines; "
                    "is its closing '\"' missing?)")
    return _tok_ConfigError(filename, line, col, message)


cdef inline bint _tok_ipv6_literal(const unsigned char* buf, Py_ssize_t i) noexcept:
    # Just after a '[': an IPv6 literal's inside (one ':' at least), then ']'. The NUL terminator
    # at buf[n] is in neither set, so the scan needs no bounds test.
    cdef bint colon = False
    while _tok_ipv6[buf[i]]:
        if buf[i] == b':':
            colon = True
        i += 1
    return colon and buf[i] == b']'


cdef inline str _tok_decode(const unsigned char* s, Py_ssize_t size, bint ascii, str what,
                            object filename, Py_ssize_t line, Py_ssize_t col):
    # Decode one token's bytes: ASCII is a plain copy; anything else is strict UTF-8.
    if ascii:
        return PyUnicode_DecodeASCII(<char*>s, size, NULL)
    try:
        return PyUnicode_DecodeUTF8(<char*>s, size, NULL)
    except UnicodeDecodeError:
        raise _tok_ConfigError(filename, line, col, f"invalid UTF-8 in {what}; expected UTF-8 text") from None


cdef str _tok_unescape(const unsigned char* s, Py_ssize_t size, bint ascii,
                       object filename, Py_ssize_t line, Py_ssize_t col):
    # Only for strings holding a known escape: copy into a scratch buffer, replacing each pair.
    cdef bytes scratch = PyBytes_FromStringAndSize(NULL, size)
    cdef unsigned char* out = <unsigned char*>PyBytes_AS_STRING(scratch)
    cdef Py_ssize_t i = 0, m = 0
    cdef unsigned char c
    while i < size:
        c = s[i]
        if c == b'\\' and i + 1 < size and _tok_escape[s[i + 1]]:
            out[m] = _tok_escape[s[i + 1]]
            i += 2
        else:
            # A plain byte, or the backslash of an unknown escape (the next byte stays on its own).
            out[m] = c
            i += 1
        m += 1
    return _tok_decode(out, m, ascii, "string", filename, line, col)


# A per-call cache of ASCII token texts: conf files repeat the same option names, numbers and
# values thousands of times, and reusing one str object for each spares an allocation, a free and
# memory in the result. Direct-mapped (a miss just replaces the slot), keyed by the token's bytes
# in the input buffer. The cache borrows its references: every cached str is already held by a
# token in the result list, which outlives the cache.
cdef enum:
    _TOK_CACHE_MAX_SLOTS = 4096  # powers of two; small inputs get a small table (one calloc)
    _TOK_CACHE_MIN_SLOTS = 64
    _TOK_CACHE_MAX_LEN = 64  # longer texts rarely repeat; don't spend a hash on them

cdef struct _TokCacheEntry:
    const unsigned char* src
    Py_ssize_t size
    PyObject* text

cdef struct _TokCache:
    _TokCacheEntry* slots
    size_t mask


cdef inline size_t _tok_hash(const unsigned char* s, Py_ssize_t size) noexcept:
    cdef uint64_t h = <uint64_t>size * 0x9E3779B97F4A7C15ULL
    cdef uint64_t w
    while size >= 8:
        memcpy(&w, s, 8)  # unaligned load, compiled to one instruction
        h = (h ^ w) * 0x9E3779B97F4A7C15ULL
        s += 8
        size -= 8
    w = 0
    while size > 0:
        size -= 1
        w = (w << 8) | s[size]
    h = (h ^ w) * 0x9E3779B97F4A7C15ULL
    return <size_t>(h >> 32)


cdef inline bint _tok_same(const unsigned char* a, const unsigned char* b, Py_ssize_t size) noexcept:
    # memcmp for the short texts the cache holds, inlined: eight bytes at a time, then the tail.
    cdef uint64_t x, y
    while size >= 8:
        memcpy(&x, a, 8)
        memcpy(&y, b, 8)
        if x != y:
            return False
        a += 8
        b += 8
        size -= 8
    while size > 0:
        size -= 1
        if a[size] != b[size]:
            return False
    return True


cdef inline str _tok_ascii_text(_TokCache* cache, const unsigned char* s, Py_ssize_t size):
    cdef _TokCacheEntry* entry
    cdef str text
    if size > _TOK_CACHE_MAX_LEN:
        return PyUnicode_DecodeASCII(<char*>s, size, NULL)
    entry = &cache.slots[_tok_hash(s, size) & cache.mask]
    if entry.text != NULL and entry.size == size and _tok_same(entry.src, s, size):
        return <str>entry.text
    text = PyUnicode_DecodeASCII(<char*>s, size, NULL)
    entry.src = s
    entry.size = size
    entry.text = <PyObject*>text
    return text


cdef inline int _tok_emit(list tokens, int kind, str text, object filename, object line_obj,
                          Py_ssize_t col, bint untrack) except -1:
    cdef tuple token = (kind, text, filename, line_obj, col)
    if untrack:
        # The tuple holds only str and int, so it can never be part of a cycle; CPython would
        # untrack it at its first collection anyway. Untracking now spares the collector from
        # walking every token while the list grows.
        PyObject_GC_UnTrack(<void*>token)
    tokens.append(token)
    return 0


cdef list _tok_run(object data, object filename, _TokCache* cache):
    # data is bytes or a subclass (checked by tokenize); a typed `bytes` argument would refuse subclasses.
    cdef const unsigned char* buf = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t pos = 0, start, i, col
    cdef Py_ssize_t line = 1, line_start = 0  # line_start: offset of the current line's first byte
    cdef Py_ssize_t comment_line, comment_line_start
    cdef Py_ssize_t s_line, s_line_start  # where a string's scan is (strings may cross lines)
    cdef Py_ssize_t ml_line = 0, ml_col = 0  # the first string that ran over several lines
    cdef Py_ssize_t brackets
    # The int object for the current line, made once per line that has tokens, not per token.
    cdef Py_ssize_t cached_line = 0
    cdef object line_obj = None
    cdef list tokens = []
    cdef unsigned char c, k
    cdef unsigned int seen
    cdef bint escaped
    cdef int kind
    cdef const void* hit
    cdef str text
    cdef bint untrack = PyUnicode_CheckExact(filename)

    while pos < n:
        c = buf[pos]
        k = _tok_class[c]
        if k == _TOK_C_SPACE:
            pos += 1
            continue
        if k == _TOK_C_LF:
            pos += 1
            line += 1
            line_start = pos
            continue
        col = pos - line_start + 1
        if cached_line != line:
            line_obj = line
            cached_line = line

        if k == _TOK_C_PUNCT:
            kind = _tok_punct_kind[c]
            _tok_emit(tokens, kind, _tok_punct_text[kind], filename, line_obj, col, untrack)
            pos += 1

        elif k == _TOK_C_RBRACKET or (k == _TOK_C_LBRACKET and not _tok_ipv6_literal(buf, pos + 1)):
            kind = _TOK_RBRACKET if k == _TOK_C_RBRACKET else _TOK_LBRACKET
            _tok_emit(tokens, kind, _tok_punct_text[kind], filename, line_obj, col, untrack)
            pos += 1

        elif k == _TOK_C_QUOTE:
            # Scan to the closing quote first (errors in byte order), then decode once.
            start = pos + 1
            i = start
            seen = 0
            escaped = False
            s_line = line
            s_line_start = line_start
            # The bytes object's NUL terminator (buf[n] == 0) stops every scan below, so the
            # bounds test is only made on the slow path.
            while True:
                c = buf[i]
                if _tok_string_plain[c]:
                    seen |= c
                    i += 1
                elif c == b'"':
                    break
                elif c == b'\\':
                    # buf[i + 1] is at worst the terminator, which is no escape.
                    if _tok_escape[buf[i + 1]]:
                        escaped = True
                        i += 2
                    else:
                        i += 1
                elif c == b'\n':
                    # Line breaks are string content (Momentum writes long values over lines).
                    s_line += 1
                    s_line_start = i + 1
                    i += 1
                elif i >= n:
                    raise _tok_unterminated(filename, line, col, ml_line, ml_col)
                else:
                    raise _tok_control_error(filename, s_line, i - s_line_start + 1, c)
            if escaped:
                text = _tok_unescape(buf + start, i - start, seen < 0x80, filename, line, col)
            elif seen < 0x80:
                text = _tok_ascii_text(cache, buf + start, i - start)
            else:
                text = _tok_decode(buf + start, i - start, False, "string", filename, line, col)
            _tok_emit(tokens, _TOK_STRING, text, filename, line_obj, col, untrack)
            if s_line != line:
                if not ml_line:
                    ml_line = line
                    ml_col = col
                line = s_line
                line_start = s_line_start
            pos = i + 1

        elif k == _TOK_C_HASH:
            # Stop at the LF, not after it, so the LF branch counts the line.
            hit = memchr(buf + pos, b'\n', <size_t>(n - pos))
            pos = n if hit == NULL else <const unsigned char*>hit - buf

        elif k == _TOK_C_SLASH and pos + 1 < n and buf[pos + 1] == b'*':
            # Commit the line count only once '*/' is found: the error points at the '/'.
            comment_line = line
            comment_line_start = line_start
            i = pos + 2
            while True:
                if i + 1 >= n:
                    raise _tok_ConfigError(filename, line, col, _TOK_UNTERMINATED_COMMENT)
                c = buf[i]
                if c == b'*' and buf[i + 1] == b'/':
                    break
                if c == b'\n':
                    comment_line += 1
                    comment_line_start = i + 1
                i += 1
            line = comment_line
            line_start = comment_line_start
            pos = i + 2

        elif k == _TOK_C_CONTROL:
            raise _tok_control_error(filename, line, col, c)

        else:
            # A bare word: digit/other/high bytes, and '/' unless it starts "/*".
            # The NUL terminator at buf[n] has no word bits, so it ends the loop without a bounds
            # test; a '/' seen here is before it, so buf[pos + 1] is readable.
            start = pos
            seen = 0
            brackets = 0
            while True:
                c = buf[pos]
                if _tok_word_bits[c]:
                    seen |= _tok_word_bits[c]
                    pos += 1
                elif c == b'/' and buf[pos + 1] != b'*':
                    seen |= 1u << _TOK_C_OTHER
                    pos += 1
                elif c == b'[':
                    # '[' and a ']' that closes one are word bytes ([::1]:25, smtp://[::1]).
                    brackets += 1
                    seen |= 1u << _TOK_C_OTHER
                    pos += 1
                elif c == b']' and brackets:
                    brackets -= 1
                    seen |= 1u << _TOK_C_OTHER
                    pos += 1
                else:
                    break
            if pos < n and _tok_class[c] == _TOK_C_CONTROL:
                raise _tok_control_error(filename, line, pos - line_start + 1, c)
            if seen & (1u << _TOK_C_HIGH):
                text = _tok_decode(buf + start, pos - start, False, "word", filename, line, col)
            else:
                text = _tok_ascii_text(cache, buf + start, pos - start)
            kind = _TOK_NUMBER if seen == (1u << _TOK_C_DIGIT) else _TOK_WORD
            _tok_emit(tokens, kind, text, filename, line_obj, col, untrack)
    return tokens


def tokenize(data, filename="<string>"):
    """Split a conf file's bytes into (kind, text, filename, line, col) tuples; see the twin's spec."""
    cdef _TokCache cache
    cdef size_t slots = _TOK_CACHE_MIN_SLOTS
    if not isinstance(data, bytes):
        raise TypeError(f"tokenize() expects bytes, got {type(data).__name__}")
    # About one slot per 16 input bytes, up to the maximum.
    while slots < _TOK_CACHE_MAX_SLOTS and slots * 16 < <size_t>PyBytes_GET_SIZE(data):
        slots *= 2
    cache.slots = <_TokCacheEntry*>PyMem_Calloc(slots, sizeof(_TokCacheEntry))
    if cache.slots == NULL:
        raise MemoryError()
    cache.mask = slots - 1
    try:
        return _tok_run(data, filename, &cache)
    finally:
        PyMem_Free(cache.slots)
