"""The conf language: tokens, parser, typed schema and the scoped settings model."""

from fastrelay.config.errors import ConfigError, ConfigErrors
from fastrelay.config.model import Config, Setting, load, loads

__all__ = ["Config", "ConfigError", "ConfigErrors", "Setting", "load", "loads"]
