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


# runner.setup_logging's; {tag} names the process (fastrelay, fastrelay[supervisor], fastrelay[w1]).
TEXT_FORMAT = "%(asctime)s {tag} %(levelname)s %(name)s: %(message)s"


def apply(cfg: Any) -> None:
    """Give the process log (the root logger's stderr handlers) the format Log_Format names.
    Handlers others installed (pytest's capture, a syslog handler) are left alone."""
    json_lines = cfg.get("Log_Format") == "json"
    for h in logging.getLogger().handlers:
        if type(h) is logging.StreamHandler and getattr(h, "stream", None) is sys.stderr:
            # The text format keeps the handler's process tag: a worker's lines stay fastrelay[wK].
            tag = getattr(h, "fastrelay_tag", "fastrelay")
            h.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT.format(tag=tag)))
