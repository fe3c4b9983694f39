"""fastrelay: a durable, high-throughput mail relay with Cython hot paths."""

from fastrelay.__version__ import __version__

__all__ = ["__version__"]
