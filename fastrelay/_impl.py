"""Choose between the Cython hot paths and their pure-Python twins: the only module that imports _core.

FASTRELAY_NO_EXTENSIONS=1 forces the twins everywhere (as AIOHTTP_NO_EXTENSIONS does for aiohttp).
If the extension is missing, the twins are used, IMPL says so and one ExtensionFallbackWarning on
stderr says how to build it (a source tree imported without its build, as `python -m ...` from a
clone does, must not be silently slower); FASTRELAY_REQUIRE_EXTENSIONS=1 turns that fallback into an
ImportError, so a CI run meant for the Cython build cannot silently test the twins instead.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

from fastrelay._purepy import framing as _py_framing
from fastrelay._purepy import routetable as _py_routetable
from fastrelay._purepy import shm as _py_shm
from fastrelay._purepy import tokenizer as _py_tokenizer


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


class ExtensionFallbackWarning(RuntimeWarning):
    """The compiled extension is missing, so the pure-Python twins run (FASTRELAY_NO_EXTENSIONS=1 not set)."""


NO_EXTENSIONS = _flag("FASTRELAY_NO_EXTENSIONS")

_core: ModuleType | None
if NO_EXTENSIONS:
    _core = None
else:
    try:
        # import_module, not `from fastrelay import _core`: while the package initialises, that
        # form reports a missing module as a "partially initialized module" circular import.
        _core = importlib.import_module("fastrelay._core")
    except ImportError as e:
        if _flag("FASTRELAY_REQUIRE_EXTENSIONS"):
            raise
        _core = None
        # Once per process (this module runs once); tests of the twins set FASTRELAY_NO_EXTENSIONS=1.
        warnings.warn(
            f"fastrelay: the compiled extension is not available ({e}), so the pure-Python twins in "
            f"{os.path.dirname(os.path.abspath(__file__))} run, slower. Build it in place (`pip install -e .` "
            "or `python setup.py build_ext --inplace`), run from outside the source tree to use an "
            "installed build, or set FASTRELAY_NO_EXTENSIONS=1 to choose the twins and silence this.",
            ExtensionFallbackWarning,
            stacklevel=2,
        )

#: "cython" or "python": which implementation of the hot paths this process uses.
IMPL = "cython" if _core is not None else "python"


class Impl:
    """One implementation of the hot paths, with the same names in both."""

    def __init__(self, name: str, tokenizer: ModuleType, framing: ModuleType, routetable: ModuleType,
                 shm: ModuleType):
        self.name = name
        self.SharedCounters = shm.SharedCounters
        self.hash_key = shm.hash_key
        self.tokenize = tokenizer.tokenize
        self.ServerFramer = framing.ServerFramer
        self.ReplyParser = framing.ReplyParser
        self.encode_data = framing.encode_data
        self.RouteTable = routetable.RouteTable

    def __repr__(self) -> str:
        return f"<Impl {self.name}>"


PY = Impl("python", _py_tokenizer, _py_framing, _py_routetable, _py_shm)
C = Impl("cython", _core, _core, _core, _core) if _core is not None else None

#: The implementation every module uses.
ACTIVE: Impl = C if C is not None else PY

tokenize = ACTIVE.tokenize
ServerFramer = ACTIVE.ServerFramer
ReplyParser = ACTIVE.ReplyParser
encode_data = ACTIVE.encode_data
RouteTable = ACTIVE.RouteTable
SharedCounters = ACTIVE.SharedCounters


def core_available() -> bool:
    """True if the compiled extension could be imported (whether or not it is selected)."""
    if _core is not None:
        return True
    try:
        from fastrelay import _core as probe  # noqa: F401
    except ImportError:
        return False
    return True


def compiled() -> Impl | None:
    """The Cython implementation even when the twins are selected (for tests that compare both)."""
    if C is not None:
        return C
    try:
        from fastrelay import _core as probe
    except ImportError:
        return None
    return Impl("cython", probe, probe, probe, probe)
