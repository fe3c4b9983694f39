"""Turn conf files into a tree of stanzas and options, following `include` (no meaning attached yet)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from fastrelay import _impl, limits
from fastrelay.config import tokens as T
from fastrelay.config.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Pos:
    """Where something was written: file, 1-based line and 1-based byte column."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def error(self, message: str) -> ConfigError:
        return ConfigError(self.file, self.line, self.col, message)


@dataclass(frozen=True, slots=True)
class Atom:
    """One written value: a bare word, a number or a quoted string."""

    text: str
    quoted: bool
    pos: Pos


@dataclass(slots=True)
class ListValue:
    """A parenthesised list of values: ( "a" "b" c )."""

    items: list[Atom]
    pos: Pos


@dataclass(slots=True)
class HashValue:
    """A bracketed hash of key = value pairs, as Momentum writes module and listener parameters:
    [ uri = "ac_auth://" log_authentication = "true" ]. Keys are words, numbers or strings;
    values are atoms, lists or hashes. Pairs keep their written order."""

    items: list[tuple[Atom, Value]]
    pos: Pos

    def get(self, key: str) -> Value | None:
        for k, v in self.items:
            if k.text == key:
                return v
        return None


Value = Atom | ListValue | HashValue


@dataclass(slots=True)
class Option:
    """`name = value`."""

    name: str
    value: Value
    pos: Pos

    @property
    def key(self) -> str:
        return self.name.lower()


@dataclass(slots=True)
class Stanza:
    """`Type [name] { ... }`."""

    type: str
    name: Atom | None
    pos: Pos
    children: list[Option | Stanza] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.type.lower()


Node = Option | Stanza

# Words that open stanzas (the parser knows them only to word its errors well).
STANZA_WORDS = frozenset(
    {"domain", "binding", "binding_group", "host", "esmtp_listener", "http_listener", "listen", "scriptlet", "script",
     "security"}
)

# Includes deeper than this are surely a mistake (and would exhaust the stack).
MAX_INCLUDE_DEPTH = limits.MAX_CONF_INCLUDE_DEPTH
# Stanzas and values nested deeper than this, across includes (the parser and the model recurse).
MAX_NESTING = limits.MAX_CONF_NESTING
MAX_FILE_SIZE = limits.MAX_CONF_FILE_SIZE


def _tok_pos(tok: tuple) -> Pos:
    return Pos(tok[2], tok[3], tok[4])


def _describe(tok: tuple | None) -> str:
    if tok is None:
        return "end of the file"
    kind, text = tok[0], tok[1]
    if kind == T.STRING:
        return f'string "{text}"'
    if kind in (T.WORD, T.NUMBER):
        return f"'{text}'"
    return T.NAMES[kind]


class _Parser:
    """Recursive descent over one file's tokens; `include` re-enters parse_file."""

    def __init__(self, tokens: list, filename: str, stack: tuple[str, ...], eof: Pos, depth: int = 0):
        self.toks = tokens
        self.i = 0
        self.filename = filename
        self.stack = stack
        self.eof = eof
        self.depth = depth  # stanzas and values open around the current token, includes counted

    def enter(self, tok: tuple, what: str) -> None:
        """One more level of nesting, refused past MAX_NESTING (a conf 300 stanzas deep used to
        end in a RecursionError)."""
        if self.depth >= MAX_NESTING:
            raise _tok_pos(tok).error(
                f"{what} nested more than {MAX_NESTING} deep; expected a shallower conf (limits.MAX_CONF_NESTING)")
        self.depth += 1

    def peek(self, k: int = 0) -> tuple | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def parse_items(self, opener: tuple | None, opener_stanza: str | None) -> list[Node]:
        items: list[Node] = []
        while True:
            tok = self.peek()
            if tok is None:
                if opener is not None:
                    raise _tok_pos(opener).error(
                        f"unclosed '{{' of the {opener_stanza} stanza opened here; "
                        "expected '}' before the end of the file"
                    )
                return items
            kind = tok[0]
            if kind == T.RBRACE:
                if opener is None:
                    raise _tok_pos(tok).error("unexpected '}' with no stanza open; expected an option or a stanza")
                self.i += 1
                return items
            if kind not in (T.WORD, T.STRING):
                raise _tok_pos(tok).error(f"unexpected {_describe(tok)}; expected an option name or a stanza")
            if kind == T.WORD and tok[1].lower() in ("include", "readonly_include"):
                # Momentum's readonly_include reads the file as include does; "readonly" only keeps
                # its console from writing changes back into it, and fastrelay writes no conf.
                self.i += 1
                items.extend(self.parse_include(tok))
                continue
            item = self.parse_item(tok, items[-1] if items else None)
            items.append(item)

    def _after_value(self, name_tok: tuple, prev: Node | None) -> None:
        """A word that cannot start an item, on the line of the previous option's value: the value
        goes on (`retry_interval = 5 minutes`). Say so there, not at the end of the file."""
        if isinstance(prev, Option) and isinstance(prev.value, Atom) and prev.value.pos.line == name_tok[3] \
                and prev.value.pos.file == name_tok[2]:
            v = prev.value
            raise _tok_pos(name_tok).error(
                f"unexpected '{name_tok[1]}' after {prev.name} = {v.text}; expected one value per option "
                "(a time or size takes its unit joined to the number: 5m, 2h, 10k; a value with spaces is quoted)")

    def parse_item(self, name_tok: tuple, prev: Node | None = None) -> Node:
        self.i += 1
        nxt = self.peek()
        if name_tok[0] == T.STRING:
            raise _tok_pos(name_tok).error(
                f"unexpected string \"{name_tok[1]}\"; expected an option name or a stanza type (a bare word)"
            )
        if nxt is not None and nxt[0] == T.EQUALS:
            self.i += 1
            brace = self.peek()
            if brace is not None and brace[0] == T.LBRACE:
                # Momentum also writes a stanza as `ESMTP_Listener = { ... }` (inbound-ssl.md).
                self.i += 1
                stanza = Stanza(name_tok[1], None, _tok_pos(name_tok))
                stanza.children = self.stanza_body(brace, name_tok[1])
                return stanza
            return Option(name_tok[1], self.parse_value(), _tok_pos(name_tok))
        if nxt is not None and nxt[0] == T.LBRACE:
            self.i += 1
            stanza = Stanza(name_tok[1], None, _tok_pos(name_tok))
            stanza.children = self.stanza_body(nxt, name_tok[1])
            return stanza
        after = self.peek(1)
        if (
            nxt is not None
            and nxt[0] in (T.WORD, T.STRING, T.NUMBER)
            and after is not None
            and after[0] == T.LBRACE
        ):
            self.i += 2
            name = Atom(nxt[1], nxt[0] == T.STRING, _tok_pos(nxt))
            stanza = Stanza(name_tok[1], name, _tok_pos(name_tok))
            stanza.children = self.stanza_body(after, name_tok[1])
            return stanza
        self._after_value(name_tok, prev)
        if nxt is not None and nxt[0] in (T.WORD, T.STRING, T.NUMBER) and name_tok[1].lower() in STANZA_WORDS:
            # `Domain a b {`: a stanza type and a name, then something other than '{'.
            where = _tok_pos(after) if after is not None else self.eof
            raise where.error(f"unexpected {_describe(after)} after '{name_tok[1]} {nxt[1]}'; expected '{{'")
        where = _tok_pos(nxt) if nxt is not None else self.eof
        raise where.error(
            f"unexpected {_describe(nxt)} after '{name_tok[1]}'; expected '=' and a value, "
            "or a stanza name and '{'"
        )

    def stanza_body(self, opener: tuple, stanza_type: str) -> list[Node]:
        self.enter(opener, "stanzas")
        children = self.parse_items(opener, stanza_type)
        self.depth -= 1
        return children

    def parse_value(self) -> Value:
        tok = self.peek()
        if tok is None:
            raise self.eof.error("unexpected end of the file; expected a value after '='")
        kind = tok[0]
        if kind in (T.WORD, T.STRING, T.NUMBER):
            self.i += 1
            return Atom(tok[1], kind == T.STRING, _tok_pos(tok))
        if kind == T.LPAREN:
            self.i += 1
            self.enter(tok, "lists")
            items: list[Atom] = []
            while True:
                t = self.peek()
                if t is None:
                    raise _tok_pos(tok).error("unclosed '(' opened here; expected ')' before the end of the file")
                if t[0] == T.RPAREN:
                    self.i += 1
                    self.depth -= 1
                    return ListValue(items, _tok_pos(tok))
                if t[0] not in (T.WORD, T.STRING, T.NUMBER):
                    raise _tok_pos(t).error(
                        f"unexpected {_describe(t)} in a list; expected values separated by spaces, then ')'"
                    )
                items.append(Atom(t[1], t[0] == T.STRING, _tok_pos(t)))
                self.i += 1
        if kind == T.LBRACKET:
            self.i += 1
            return self.parse_hash(tok)
        raise _tok_pos(tok).error(
            f"unexpected {_describe(tok)}; expected a value (a word, a number, a string, a list or a hash)"
        )

    def parse_hash(self, opener: tuple) -> HashValue:
        """`[ key = value ... ]` after its '['; pairs are separated by white space only."""
        self.enter(opener, "lists and hashes")
        items: list[tuple[Atom, Value]] = []
        seen: dict[str, Pos] = {}
        while True:
            t = self.peek()
            if t is None:
                raise _tok_pos(opener).error("unclosed '[' opened here; expected ']' before the end of the file")
            if t[0] == T.RBRACKET:
                self.i += 1
                self.depth -= 1
                return HashValue(items, _tok_pos(opener))
            if t[0] not in (T.WORD, T.STRING, T.NUMBER):
                raise _tok_pos(t).error(f"unexpected {_describe(t)} in a hash; expected key = value pairs, then ']'")
            key = Atom(t[1], t[0] == T.STRING, _tok_pos(t))
            self.i += 1
            eq = self.peek()
            if eq is None or eq[0] != T.EQUALS:
                where = _tok_pos(eq) if eq is not None else self.eof
                raise where.error(f"unexpected {_describe(eq)} after the key '{key.text}' in a hash; expected '='")
            self.i += 1
            if self.peek() is None:
                raise self.eof.error(f"unexpected end of the file; expected a value for '{key.text}' in the hash")
            value = self.parse_value()
            if key.text in seen:
                # Which of the two would count is a guess either way: refuse it.
                raise key.pos.error(f"the key '{key.text}' is already in this hash (at {seen[key.text]}); "
                                    "expected each key once")
            seen[key.text] = key.pos
            items.append((key, value))

    def parse_include(self, inc_tok: tuple) -> list[Node]:
        tok = self.peek()
        if tok is None or tok[0] not in (T.STRING, T.WORD):
            where = _tok_pos(tok) if tok is not None else self.eof
            raise where.error(f"unexpected {_describe(tok)} after include; expected a file or directory path")
        self.i += 1
        path = tok[1]
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(self.filename), path)
        pos = _tok_pos(tok)
        if not os.path.exists(path):
            raise pos.error(f"cannot include '{tok[1]}': no such file or directory; expected an existing path")
        if os.path.isdir(path):
            try:
                names = sorted(n for n in os.listdir(path) if not n.startswith("."))
            except OSError as e:
                raise pos.error(f"cannot include '{tok[1]}': {e.strerror}; expected a readable directory") from None
            nodes: list[Node] = []
            for n in names:
                full = os.path.join(path, n)
                if os.path.isfile(full):  # regular files only (no FIFO, device or socket)
                    nodes.extend(parse_file(full, self.stack, pos, self.depth, shown=n))
            return nodes
        return parse_file(path, self.stack, pos, self.depth, shown=tok[1])


def parse_text(data: bytes, filename: str = "<string>", stack: tuple[str, ...] = (), depth: int = 0) -> list[Node]:
    """Parse the bytes of one conf file; `include`s are read relative to `filename`. `depth` is the
    nesting around an included file's text, so MAX_NESTING holds across includes."""
    tokens = _impl.tokenize(data, filename)
    lines = data.count(b"\n")
    last_nl = data.rfind(b"\n")
    eof = Pos(filename, lines + 1, len(data) - last_nl)
    return _Parser(tokens, filename, stack, eof, depth).parse_items(None, None)


_FILE_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO or pipe"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


def _read_conf(path: str) -> bytes:
    """A conf file's bytes: a regular file of at most MAX_FILE_SIZE bytes, else ValueError with the
    reason. Opened without blocking and checked on the open descriptor, so a FIFO (or
    /dev/stdin on a terminal) cannot hang the read and /dev/zero cannot make it endless; OSError
    if it cannot be opened or read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")
            raise ValueError(f"it is {kind}; expected a regular file")
        if st.st_size > MAX_FILE_SIZE:
            raise ValueError(f"it is {st.st_size} bytes, more than {MAX_FILE_SIZE} (limits.MAX_CONF_FILE_SIZE); "
                             "expected a smaller file")
        chunks = []
        left = MAX_FILE_SIZE + 1  # one byte more tells a file that grew past the limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise ValueError(f"it is more than {MAX_FILE_SIZE} bytes (limits.MAX_CONF_FILE_SIZE); "
                             "expected a smaller file")
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_file(path: str, stack: tuple[str, ...] = (), included_at: Pos | None = None, depth: int = 0,
               shown: str | None = None) -> list[Node]:
    """Parse a conf file and everything it includes; ConfigError on the first syntax error.
    `shown` is how the include named the file, for its errors."""
    real = os.path.realpath(path)
    if real in stack:
        chain = " -> ".join([*stack[stack.index(real):], real])
        where = included_at or Pos(path, 1, 1)
        raise where.error(f"include loop: {chain}; expected each file to be included once per chain")
    if len(stack) >= MAX_INCLUDE_DEPTH:
        where = included_at or Pos(path, 1, 1)
        raise where.error(f"includes nested more than {MAX_INCLUDE_DEPTH} deep; expected a shallower include tree")
    try:
        data = _read_conf(path)
    except ValueError as e:
        if included_at is not None:
            raise included_at.error(f"cannot include '{shown or path}': {e}") from None
        raise ConfigError(path, 0, 0, f"cannot read the conf file: {e}") from None
    except OSError as e:
        if included_at is not None:
            raise included_at.error(f"cannot read '{path}': {e.strerror}; expected a readable file") from None
        # The whole file, not a place in it: no :1:1 (issue 15: "a plain message").
        raise ConfigError(path, 0, 0, f"cannot read the conf file: {e.strerror}") from None
    return parse_text(data, path, (*stack, real), depth)
