"""fastrelay: a durable, high-throughput mail relay with Cython hot paths."""

# Choose the hot-path implementation before anything else can import fastrelay._core on its own.
# _core's initialisation imports fastrelay.config (for ConfigError), whose parser imports _impl,
# which binds _core's names: started from `import fastrelay._core`, that chain met a partially
# initialised _core (issue #9). Started here, _impl is the one that imports _core, the parser gets
# the partly initialised _impl (it only reads _impl.tokenize when called) and every name is bound.
from fastrelay import _impl  # noqa: F401  (imported for its side effect: the selection)
from fastrelay.__version__ import __version__

__all__ = ["__version__"]
