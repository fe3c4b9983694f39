"""Which hot-path implementation a fresh process gets: importing _core directly, and a loud fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ("FASTRELAY_NO_EXTENSIONS", "FASTRELAY_REQUIRE_EXTENSIONS")


def _python(code: str, cwd: Path, pythonpath: Path | None = None, **flags: str) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh process, with only the given FASTRELAY_* flags set."""
    env = {k: v for k, v in os.environ.items() if k not in FLAGS and k != "PYTHONWARNINGS"}
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env.update(flags)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


# This venv's editable install maps fastrelay.* names to this tree whatever __path__ says; a clone
# after a plain `pip install .` has no such finder, so the copies below run without it.
NO_EDITABLE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
               "if '__editable__' not in getattr(f, '__module__', '')]\n")


@pytest.mark.parametrize("stmt", ["import fastrelay._core as c", "from fastrelay import _core as c"])
@pytest.mark.parametrize("no_ext", ["", "1"])
def test_import_core_alone_in_a_fresh_process(stmt, no_ext, tmp_path):
    """Issue #9: "`import fastrelay._core` on its own fails with a circular import (`_core` → `_impl`
    → partially initialised `_core`). Benchmarks and users import it directly." """
    if not list((ROOT / "fastrelay").glob("_core*.so")):
        pytest.fail("fastrelay._core is not built in this tree; build it in place first")
    flags = {"FASTRELAY_NO_EXTENSIONS": no_ext} if no_ext else {}
    code = (f"{stmt}\n"
            "from fastrelay import _impl\n"
            "assert c.tokenize(b'a = b', 'x')\n"
            "assert c.RouteTable() is not None and c.ServerFramer and c.encode_data(b'x\\n').endswith(b'\\r\\n')\n"
            "print(_impl.IMPL)")
    out = _python(code, cwd=tmp_path, pythonpath=ROOT, **flags)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("python" if no_ext else "cython")
    assert "ExtensionFallbackWarning" not in out.stderr


@pytest.fixture
def tree_without_extension(tmp_path) -> Path:
    """A copy of the source tree's package without its build, as a clone after `pip install .` is."""
    shutil.copytree(ROOT / "fastrelay", tmp_path / "fastrelay",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__"))
    return tmp_path


def test_fallback_to_the_twins_is_loud(tree_without_extension):
    """Issue #9: "Running tools from a clone after `pip install .` ... imports the package from the
    source tree, without the extension, and silently uses the twins. ... make the fallback loud
    outside tests." One warning on stderr, naming the twins and how to build in place."""
    tree = tree_without_extension
    out = _python(NO_EDITABLE + "import fastrelay, fastrelay._impl as i, fastrelay.smtp.server, fastrelay.routing; "
                  "print(i.IMPL, i.__file__)", cwd=tree, pythonpath=tree)
    assert out.returncode == 0, out.stderr
    impl, path = out.stdout.split()
    assert impl == "python" and path.startswith(str(tree))
    assert out.stderr.count("ExtensionFallbackWarning") == 1, out.stderr
    assert "pure-Python twins" in out.stderr and "build_ext --inplace" in out.stderr
    assert "FASTRELAY_NO_EXTENSIONS=1" in out.stderr


def test_fallback_is_loud_for_a_tool_run_from_the_clone(tree_without_extension):
    """The issue's own case: `python -m fastrelay.bench.sink` (here its --help) from the clone."""
    tree = tree_without_extension
    env = {k: v for k, v in os.environ.items() if k not in FLAGS and k not in ("PYTHONPATH", "PYTHONWARNINGS")}
    code = NO_EDITABLE + "import runpy; sys.argv[1:] = ['--help']; runpy.run_module('fastrelay.bench.sink', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m fastrelay.bench.sink")
    assert out.stderr.count("ExtensionFallbackWarning") == 1, out.stderr


def test_no_extensions_flag_chooses_the_twins_quietly(tree_without_extension):
    tree = tree_without_extension
    out = _python(NO_EDITABLE + "import fastrelay._impl as i; print(i.IMPL)", cwd=tree, pythonpath=tree,
                  FASTRELAY_NO_EXTENSIONS="1")
    assert out.returncode == 0 and out.stdout.strip() == "python"
    assert out.stderr == ""


@pytest.mark.parametrize("also_no_ext", [False, True])
def test_require_extensions_refuses_the_fallback(tree_without_extension, also_no_ext):
    """FASTRELAY_REQUIRE_EXTENSIONS=1 keeps its meaning: a missing extension is an ImportError (no
    warning instead); FASTRELAY_NO_EXTENSIONS=1 still wins over it, as before."""
    tree = tree_without_extension
    flags = {"FASTRELAY_REQUIRE_EXTENSIONS": "1"} | ({"FASTRELAY_NO_EXTENSIONS": "1"} if also_no_ext else {})
    out = _python(NO_EDITABLE + "import fastrelay._impl as i; print(i.IMPL)", cwd=tree, pythonpath=tree, **flags)
    if also_no_ext:
        assert out.returncode == 0 and out.stdout.strip() == "python"
    else:
        assert out.returncode != 0
        assert "ImportError" in out.stderr or "ModuleNotFoundError" in out.stderr
        assert "ExtensionFallbackWarning" not in out.stderr
