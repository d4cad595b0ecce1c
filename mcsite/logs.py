"""Log setup for server-side processes: one line per event, fields as key=value.

Server side only.  Readable by a person at a terminal and by a log shipper.
"""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once (idempotent)."""
    root = logging.getLogger()
    if any(getattr(h, "_mcdeploy", False) for h in root.handlers):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._mcdeploy = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
