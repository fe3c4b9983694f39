"""Token kinds of the conf language, shared by the Cython tokeniser and its pure-Python twin.

A token is a plain tuple ``(kind, text, file, line, col)``; line and col are 1-based and col counts
bytes from the start of the line. The Cython side repeats these values as a C enum, and a test
checks that the two agree.
"""

WORD = 1  # a bare word: Domain, example.com, 10.0.0.1, [::1], 10s, __mx__
STRING = 2  # a double-quoted string, text unescaped and without the quotes
NUMBER = 3  # a bare word of ASCII digits only
EQUALS = 4  # =
LBRACE = 5  # {
RBRACE = 6  # }
LPAREN = 7  # (
RPAREN = 8  # )
LBRACKET = 9  # [ opening a hash value (Momentum's `AuthLoginParameters = [ uri = "..." ]`)
RBRACKET = 10  # ]

NAMES = {
    WORD: "word",
    STRING: "string",
    NUMBER: "number",
    EQUALS: "'='",
    LBRACE: "'{'",
    RBRACE: "'}'",
    LPAREN: "'('",
    RPAREN: "')'",
    LBRACKET: "'['",
    RBRACKET: "']'",
}
