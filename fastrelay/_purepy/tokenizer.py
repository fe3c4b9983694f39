r"""Pure-Python twin of the conf tokeniser: bytes of a conf file -> tokens with file, line and column.

SPEC (the Cython version in fastrelay/_tokenizer.pxi must match it exactly, errors included).
This docstring is raw: each backslash below is one backslash byte.

tokenize(data: bytes, filename: str = "<string>") -> list[tuple[int, str, str, int, int]]
    Each token is a plain tuple (kind, text, filename, line, col); kinds are the ints in
    fastrelay.config.tokens. line and col are 1-based; col counts BYTES from the start of the line.
    Lines are counted on LF only. data must be bytes (a subclass too); anything else raises
    TypeError("tokenize() expects bytes, got <type name>").
  - whitespace: space, TAB, CR, LF, FF, VT. It separates tokens and is otherwise ignored.
  - '#' starts a comment that runs to the end of the line (LF). '/*' starts a comment that runs to the
    first '*/' after it (no nesting; '/*/' does not close itself). Comment bytes are not checked
    (any byte is allowed inside a comment).
  - '=', '{', '}', '(', ')' are one-character tokens EQUALS, LBRACE, RBRACE, LPAREN, RPAREN.
  - '[' and ']' are LBRACKET and RBRACKET (they open and close Momentum's hash values,
    `[ key = value ... ]`), except inside a bare word (below) and where '[' starts a bracketed IPv6
    literal: a '[' followed by one or more bytes of [0-9A-Za-z:.%_-] of which one at least is ':',
    then ']' (so [::1], [2001:db8::1]:25 and [fe80::1%eth0] are words, while [uri = "x"], [a] and
    [] are brackets).
  - '"' starts a STRING that ends at the next unescaped '"'. A string may continue on the next
    lines, as Momentum's own confs write long SQL queries; each line break inside it is kept in
    the text as written (LF, or CR LF). Escapes: \\ -> \, \" -> ", \n -> LF, \t -> TAB, \r -> CR;
    any other backslash pair is kept as both characters, so a backslash before a line break is kept
    too, and the line break after it as well.
    The token's text is the unescaped content without the quotes; its position is the opening quote.
  - anything else starts a bare word, which runs until whitespace, one of = { } ( ) " #, the
    two bytes '/*' ('*/' and a lone '/' are word bytes), or a ']' that closes no '[' of the word
    ('[' and a ']' closing one are word bytes). A word made only of ASCII digits is a NUMBER, any
    other is a WORD.
    (So 10.0.0.1, [::1], 10s, __mx__, smtp://x?y=1, smtp://[::1]:25 and /var/spool are WORDs;
    8080 is a NUMBER; `b]` is the WORD b then RBRACKET.)
  - text is decoded as UTF-8 (strict).
Errors raise fastrelay.config.errors.ConfigError(filename, line, col, message), first error only.
A token is scanned to its end before its text is decoded, so within one token a control byte or a
missing closing quote is reported before invalid UTF-8:
  - a control byte (0x00-0x1F other than the whitespace above, or 0x7F) outside a comment:
    at that byte: "unexpected control character 0x%02X; expected printable text"
  - a string not closed before the end of the file:
    at the opening quote: "unterminated string; expected a closing '"' before the end of the file";
    if an earlier string ran over several lines (the first such, opened at L:C), the message goes
    on: " (the string opened at L:C runs over several lines; is its closing '"' missing?)", since a
    quote missing there pairs every later quote wrongly
  - '/*' with no '*/' after it: at the '/': "unterminated comment; expected '*/' before the end of the file"
  - a word or string that is not valid UTF-8: at the token's first byte:
    "invalid UTF-8 in word; expected UTF-8 text" (or "... in string; ...")
"""

from __future__ import annotations

from fastrelay.config.errors import ConfigError
from fastrelay.config.tokens import (
    EQUALS,
    LBRACE,
    LBRACKET,
    LPAREN,
    NUMBER,
    RBRACE,
    RBRACKET,
    RPAREN,
    STRING,
    WORD,
)

_LF = 0x0A
_QUOTE = ord('"')
_BACKSLASH = ord("\\")
_HASH = ord("#")
_SLASH = ord("/")

_WHITESPACE = frozenset(b" \t\r\n\f\v")
_PUNCTUATION = {ord("="): EQUALS, ord("{"): LBRACE, ord("}"): RBRACE, ord("("): LPAREN, ord(")"): RPAREN}
# Bytes that end a bare word (besides the two bytes "/*", checked separately).
_WORD_END = _WHITESPACE | frozenset(b'={}()"#')
_LBRACKET = ord("[")
_RBRACKET = ord("]")
# Bytes that need a closer look inside a word.
_WORD_SPECIAL = _WORD_END | frozenset(b for b in range(0x20) if b not in _WHITESPACE) | {0x7F, _SLASH, _LBRACKET,
                                                                                       _RBRACKET}
# What may stand between the brackets of an IPv6 literal, zone included ([fe80::1%eth0]).
_IPV6_BYTES = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz:.%_-")
_CONTROL = frozenset(b for b in range(0x20) if b not in _WHITESPACE) | {0x7F}
_ESCAPES = {ord("\\"): b"\\", ord('"'): b'"', ord("n"): b"\n", ord("t"): b"\t", ord("r"): b"\r"}

_UNTERMINATED_STRING = "unterminated string; expected a closing '\"' before the end of the file"
_UNTERMINATED_COMMENT = "unterminated comment; expected '*/' before the end of the file"


def _control_error(filename: str, line: int, col: int, byte: int) -> ConfigError:
    message = f"unexpected control character 0x{byte:02X}; expected printable text"
    return ConfigError(filename, line, col, message)


def _unterminated(filename: str, line: int, col: int, multiline: tuple[int, int] | None) -> ConfigError:
    message = _UNTERMINATED_STRING
    if multiline is not None:
        message += (f" (the string opened at {multiline[0]}:{multiline[1]} runs over several lines; "
                    "is its closing '\"' missing?)")
    return ConfigError(filename, line, col, message)


def _ipv6_literal(data: bytes, i: int) -> bool:
    """Does data[i:] (just after a '[') hold an IPv6 literal's inside and its ']'?"""
    colon = False
    n = len(data)
    while i < n and data[i] in _IPV6_BYTES:
        colon = colon or data[i] == 0x3A
        i += 1
    return colon and i < n and data[i] == _RBRACKET


def _decode(raw: bytes, what: str, filename: str, line: int, col: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(filename, line, col, f"invalid UTF-8 in {what}; expected UTF-8 text") from None


def tokenize(data: bytes, filename: str = "<string>") -> list[tuple[int, str, str, int, int]]:
    """Split a conf file's bytes into (kind, text, filename, line, col) tokens, as the SPEC above says."""
    if not isinstance(data, bytes):
        raise TypeError(f"tokenize() expects bytes, got {type(data).__name__}")
    tokens: list[tuple[int, str, str, int, int]] = []
    n = len(data)
    pos = 0
    line = 1
    line_start = 0  # offset of the first byte of the current line, for col
    multiline: tuple[int, int] | None = None  # the first string that ran over several lines
    while pos < n:
        byte = data[pos]
        if byte == _LF:
            pos += 1
            line += 1
            line_start = pos
            continue
        if byte in _WHITESPACE:
            pos += 1
            continue
        col = pos - line_start + 1

        if byte == _HASH:
            # Stop at the LF, not after it, so the loop above counts the line.
            end = data.find(b"\n", pos)
            pos = n if end < 0 else end
            continue

        if byte == _SLASH and data[pos + 1 : pos + 2] == b"*":
            end = data.find(b"*/", pos + 2)  # from pos + 2, so "/*/" does not close itself
            if end < 0:
                raise ConfigError(filename, line, col, _UNTERMINATED_COMMENT)
            newlines = data.count(b"\n", pos, end)
            if newlines:
                line += newlines
                line_start = data.rfind(b"\n", pos, end) + 1
            pos = end + 2
            continue

        kind = _PUNCTUATION.get(byte)
        if kind is not None:
            tokens.append((kind, chr(byte), filename, line, col))
            pos += 1
            continue

        if byte == _RBRACKET or (byte == _LBRACKET and not _ipv6_literal(data, pos + 1)):
            tokens.append((RBRACKET if byte == _RBRACKET else LBRACKET, chr(byte), filename, line, col))
            pos += 1
            continue

        if byte == _QUOTE:
            # Scan to the closing quote, unescaping as we go; line breaks are content and counted.
            text = bytearray()
            i = pos + 1
            s_line, s_line_start = line, line_start  # where the scan is, for errors inside the string
            while True:
                if i >= n:
                    raise _unterminated(filename, line, col, multiline)
                c = data[i]
                if c == _QUOTE:
                    break
                if c == _LF:
                    s_line += 1
                    s_line_start = i + 1
                    text.append(c)
                    i += 1
                    continue
                if c in _CONTROL:
                    raise _control_error(filename, s_line, i - s_line_start + 1, c)
                if c == _BACKSLASH and i + 1 < n and data[i + 1] in _ESCAPES:
                    text += _ESCAPES[data[i + 1]]
                    i += 2
                else:
                    # An unknown escape keeps its backslash; the next byte is handled on its own.
                    text.append(c)
                    i += 1
            tokens.append((STRING, _decode(bytes(text), "string", filename, line, col), filename, line, col))
            if s_line != line:
                if multiline is None:
                    multiline = (line, col)
                line, line_start = s_line, s_line_start
            pos = i + 1
            continue

        # A bare word: everything up to whitespace, punctuation, a quote, '#', "/*" or a ']' that
        # closes no '[' of the word.
        i = pos
        brackets = 0
        while i < n:
            c = data[i]
            if c in _WORD_SPECIAL:  # one test for the plain bytes that make most of a word
                if c in _WORD_END or (c == _SLASH and data[i + 1 : i + 2] == b"*"):
                    break
                if c in _CONTROL:
                    raise _control_error(filename, line, i - line_start + 1, c)
                if c == _LBRACKET:
                    brackets += 1
                elif c == _RBRACKET:
                    if not brackets:
                        break
                    brackets -= 1
            i += 1
        raw = data[pos:i]
        kind = NUMBER if raw.isdigit() else WORD  # bytes.isdigit() is ASCII digits only
        tokens.append((kind, _decode(raw, "word", filename, line, col), filename, line, col))
        pos = i
    return tokens
