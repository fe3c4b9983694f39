"""Pure-Python twin of the conf tokeniser: bytes of a conf file -> tokens with file, line and column.

SPEC (the Cython version in fastrelay/_tokenizer.pxi must match it exactly, errors included):

tokenize(data: bytes, filename: str = "<string>") -> list[tuple[int, str, str, int, int]]
    Each token is a plain tuple (kind, text, filename, line, col); kinds are the ints in
    fastrelay.config.tokens. line and col are 1-based; col counts BYTES from the start of the line.
    Lines are counted on LF only.
  - whitespace: space, TAB, CR, LF, FF, VT. It separates tokens and is otherwise ignored.
  - '#' starts a comment that runs to the end of the line (LF). '/*' starts a comment that runs to the
    first '*/' (no nesting). Comment bytes are not checked (any byte is allowed inside a comment).
  - '=', '{', '}', '(', ')' are one-character tokens EQUALS, LBRACE, RBRACE, LPAREN, RPAREN.
  - '"' starts a STRING that ends at the next unescaped '"' on the same line. Escapes: \\ -> \,
    \" -> ", \n -> LF, \t -> TAB, \r -> CR; any other backslash pair is kept as both characters.
    The token's text is the unescaped content without the quotes; its position is the opening quote.
  - anything else starts a bare word, which runs until whitespace, one of = { } ( ) " #, or the
    two bytes '/*'. A word made only of ASCII digits is a NUMBER, any other is a WORD.
    (So 10.0.0.1, [::1], 10s, __mx__, smtp://x?y=1 and /var/spool are WORDs; 8080 is a NUMBER.)
  - text is decoded as UTF-8 (strict).
Errors raise fastrelay.config.errors.ConfigError(filename, line, col, message), first error only:
  - a control byte (0x00-0x1F other than the whitespace above, or 0x7F) outside a comment:
    at that byte: "unexpected control character 0x%02X; expected printable text"
  - a string not closed before the end of the line (or file):
    at the opening quote: "unterminated string; expected a closing '\"' before the end of the line"
  - '/*' with no '*/' after it: at the '/': "unterminated comment; expected '*/' before the end of the file"
  - a word or string that is not valid UTF-8: at the token's first byte:
    "invalid UTF-8 in word; expected UTF-8 text" (or "... in string; ...")
"""

from __future__ import annotations

from fastrelay.config.errors import ConfigError  # noqa: F401  (raised by the implementation)


def tokenize(data: bytes, filename: str = "<string>") -> list[tuple[int, str, str, int, int]]:
    raise NotImplementedError("tokenize: not written yet")
