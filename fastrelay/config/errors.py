"""Configuration errors: each one names file:line:col, what was wrong and what was expected."""

from __future__ import annotations


class ConfigError(Exception):
    """One configuration error at a position in a conf file.

    str(err) is the one-line form the CLI prints: ``file:line:col: message``, or ``file: message``
    for an error about the whole file (line 0: it could not be read, so no position means anything).
    """

    def __init__(self, file: str, line: int, col: int, message: str):
        super().__init__(file, line, col, message)
        self.file = file
        self.line = line
        self.col = col
        self.message = message

    def __str__(self) -> str:
        if self.line == 0:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}:{self.col}: {self.message}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfigError):
            return NotImplemented
        return self.args == other.args

    def __hash__(self) -> int:
        return hash(self.args)


class UnsupportedMomentumName(ConfigError):
    """A Momentum option or stanza that fastrelay does not implement (fastrelay/config/momentum_names.txt).

    The one kind of error `check-config --lenient` and `run --lenient` turn into a warning, for
    operators migrating a Momentum configuration.
    """


class ConfigErrors(Exception):
    """Every error found in a configuration, in file order."""

    def __init__(self, errors: list[ConfigError]):
        super().__init__(errors)
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)
