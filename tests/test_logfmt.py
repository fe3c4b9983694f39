"""Log_Format (fastrelay.admin.logfmt) keeps the process tag: a worker's lines stay fastrelay[wK]."""

from __future__ import annotations

import logging

from fastrelay import runner
from fastrelay.admin import logfmt


class _Cfg:
    def __init__(self, fmt: str | None):
        self.fmt = fmt

    def get(self, name: str):
        return self.fmt if name == "Log_Format" else None


def test_text_format_keeps_the_worker_tag_and_json_replaces_it():
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        runner.setup_logging("info", "fastrelay[w1]")
        (h,) = root.handlers
        rec = logging.LogRecord("fastrelay.xfer", logging.INFO, __file__, 1, "hello", None, None)
        logfmt.apply(_Cfg(None))  # what the admin's start does
        assert " fastrelay[w1] INFO fastrelay.xfer: hello" in h.format(rec)
        logfmt.apply(_Cfg("json"))
        assert h.format(rec).startswith("{") and '"message": "hello"' in h.format(rec)
        logfmt.apply(_Cfg("text"))
        assert " fastrelay[w1] INFO " in h.format(rec)
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
