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


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `needs_compiled` compare the twin with the Cython build. In the run with
    FASTRELAY_NO_EXTENSIONS=1 there is nothing to compare with, so they are deselected there (they
    ran in the Cython run); anywhere else a missing extension is an error, not a skip."""
    if not _impl.NO_EXTENSIONS:
        if _impl.compiled() is None and any(i.get_closest_marker("needs_compiled") for i in items):
            raise pytest.UsageError(
                "fastrelay._core is not built; build it (pip install -e .) or set FASTRELAY_NO_EXTENSIONS=1"
            )
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("needs_compiled") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 2 MiB filesystem (tmpfs), so that the disk really fills up. Needs root, as CI runs
    (RELIABILITY.md recipe step 7); elsewhere the test fails with the reason instead of skipping."""
    import subprocess

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
