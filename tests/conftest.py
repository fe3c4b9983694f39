"""Shared fixtures: the `impl` fixture runs hot-path tests on both implementations."""

from __future__ import annotations

import pytest

from fastrelay import _impl


def _impl_params() -> list:
    # FASTRELAY_NO_EXTENSIONS=1 promises the twins everywhere, so only "py" runs then.
    if _impl.NO_EXTENSIONS:
        return [pytest.param(_impl.PY, id="py")]
    compiled = _impl.compiled()
    if compiled is None:
        raise RuntimeError(
            "fastrelay._core is not built; build it (pip install -e .) or set FASTRELAY_NO_EXTENSIONS=1"
        )
    return [pytest.param(_impl.PY, id="py"), pytest.param(compiled, id="c")]


@pytest.fixture(params=_impl_params())
def impl(request) -> _impl.Impl:
    """A hot-path implementation: the pure-Python twin ("py") and the Cython one ("c")."""
    return request.param



@pytest.fixture
def conf_impl(impl, monkeypatch) -> _impl.Impl:
    """Parse conf files with `impl`'s tokeniser (the parser calls _impl.tokenize)."""
    monkeypatch.setattr(_impl, "tokenize", impl.tokenize)
    return impl
