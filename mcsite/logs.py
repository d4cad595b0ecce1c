"""Log setup for server-side processes: one line per event, as key=value text or as JSON.

Server side only.  ``MCDEPLOY_LOG_FORMAT=json`` (or ``setup_logging(fmt="json")``) writes one JSON
object per line (``ts``, ``level``, ``logger``, ``msg``, plus every ``key=value`` pair of the message as
its own field), for a log shipper; the default text form stays readable at a terminal, and its
messages already carry their figures as ``key=value``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

_PAIR = re.compile(r"(?<![\w.])([a-z_][a-z0-9_]*)=(\S+)")
_RESERVED = frozenset({"ts", "level", "logger", "msg", "exc"})


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``key=value`` pairs in the message also become fields."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out: dict[str, object] = {
            "ts": f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "msg": msg,
        }
        for key, value in _PAIR.findall(msg):
            if key not in _RESERVED and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def log_format() -> str:
    fmt = os.environ.get("MCDEPLOY_LOG_FORMAT", "text").strip().lower()
    return fmt if fmt in ("text", "json") else "text"


def formatter(fmt: str | None = None) -> logging.Formatter:
    if (fmt or log_format()) == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Configure the root logger once (idempotent); ``fmt``: "text" or "json" (default: MCDEPLOY_LOG_FORMAT)."""
    root = logging.getLogger()
    for h in root.handlers:
        if getattr(h, "_mcdeploy", False):
            h.setFormatter(formatter(fmt))
            root.setLevel(level.upper())
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler._mcdeploy = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
