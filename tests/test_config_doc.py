"""docs/config.md is generated from the schema and must be current."""

import os

from fastrelay.config import doc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_reference_is_current():
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        assert f.read() == doc.render(), "regenerate: python -m fastrelay.config.doc > docs/config.md"
