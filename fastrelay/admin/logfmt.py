"""The process log's JSON format (Log_Format = json): one JSON object per line for log collectors."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message"} (+ "exc" with the traceback when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s fastrelay %(levelname)s %(name)s: %(message)s"  # runner.setup_logging's


def apply(cfg: Any) -> None:
    """Give the process log (the root logger's stderr handlers) the format Log_Format names.
    Handlers others installed (pytest's capture, a syslog handler) are left alone."""
    fmt: logging.Formatter = JsonFormatter() if cfg.get("Log_Format") == "json" else logging.Formatter(TEXT_FORMAT)
    for h in logging.getLogger().handlers:
        if type(h) is logging.StreamHandler and getattr(h, "stream", None) is sys.stderr:
            h.setFormatter(fmt)
