"""Benchmark the conf tokeniser on a ~1 MB generated ecelerity-style conf: twin ("py") vs Cython ("c")."""

from __future__ import annotations

import pytest

from fastrelay import _impl
from fastrelay.bench.confgen import generate_conf

TARGET_BYTES = 1_000_000
CONF = generate_conf(TARGET_BYTES, seed=1)
# Momentum's hash values and a string over two lines (modules/ac-auth.md, auth-ds.md).
MOMENTUM_FORMS = (b'\nESMTP_Listener {\n  AuthLoginParameters = [\n    uri = "ac_auth://"\n  ]\n'
                  b'  query = "SELECT 1 and\n    password = :pass"\n  Listen "[::1]:25" { }\n}\n')


def _impl_params() -> list:
    params = [pytest.param(_impl.PY, id="py")]
    compiled = None if _impl.NO_EXTENSIONS else _impl.compiled()
    if compiled is not None:
        params.append(pytest.param(compiled, id="c"))
    return params


@pytest.mark.parametrize("tok_impl", _impl_params())
def test_tokenize_1mb_conf(benchmark, tok_impl: _impl.Impl) -> None:
    tokens = benchmark(tok_impl.tokenize, CONF, "bench.conf")
    assert len(tokens) > 50_000
    benchmark.extra_info["bytes"] = len(CONF)
    benchmark.extra_info["tokens"] = len(tokens)
    if benchmark.stats:  # None or empty with --benchmark-disable
        # From the fastest round: on a shared machine the others are slowed by unrelated work.
        benchmark.extra_info["MB_per_s"] = round(len(CONF) / benchmark.stats.stats.min / 1e6, 1)


def test_bench_input_is_1mb_and_implementations_agree() -> None:
    # Not timed: checks the benchmark measures what it claims, with or without --benchmark-disable.
    assert TARGET_BYTES <= len(CONF) < TARGET_BYTES + 5_000
    assert generate_conf(TARGET_BYTES, seed=1) == CONF  # deterministic for a seed
    assert generate_conf(TARGET_BYTES, seed=2) != CONF
    # The timed input is kept as it was before hashes and multi-line strings existed, so figures
    # compare across versions; the agreement check adds Momentum's forms so every kind occurs.
    data = CONF + MOMENTUM_FORMS
    expected = _impl.PY.tokenize(data, "bench.conf")
    kinds = {kind for kind, *_ in expected}
    assert kinds == set(range(1, 11))  # every token kind occurs
    for param in _impl_params()[1:]:
        assert param.values[0].tokenize(data, "bench.conf") == expected
