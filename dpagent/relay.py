"""Relays what happens in sessions to the controller, spooling while Redis is away.

Server side.  Client results and session reports travel as Celery tasks to
the ``controller`` queue (the controller owns the record; DPs never write
results themselves).  If publishing fails, the message waits in a local
spool and is retried on the next flush; the controller's writes are
idempotent, so a retry that had in fact succeeded changes nothing.
Volatile progress (blocks received per client) goes straight to Redis:
losing a progress sample is harmless.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from celery import Celery

from mcproto.codec import to_body
from mcproto.messages import ClientResult, Message, SessionReport
from mcsite.state import State

log = logging.getLogger("mcdeploy.dp.relay")

TASK_FOR = {ClientResult: "controller.client_result", SessionReport: "controller.session_report"}
SPOOL_MAX = 100_000


class Relay:
    """Publishes results to the controller with an in-memory spool."""

    def __init__(self, app: Celery, state: State) -> None:
        self.app = app
        self.state = state
        self._spool: deque[Message] = deque(maxlen=SPOOL_MAX)
        self._lock = threading.Lock()

    def send(self, msg: ClientResult | SessionReport) -> bool:
        """Publish now if possible; returns False if it was spooled for later."""
        with self._lock:
            self._spool.append(msg)
        return self.flush()

    def flush(self) -> bool:
        """Publish everything spooled, oldest first; stops at the first failure."""
        with self._lock:
            while self._spool:
                msg = self._spool[0]
                try:
                    self.app.send_task(TASK_FOR[type(msg)], kwargs={"body": to_body(msg)},
                                       retry=True, retry_policy={"max_retries": 2, "interval_start": 0.1})
                except Exception as exc:  # broker unreachable: keep it, try later
                    log.warning("controller unreachable, %d message(s) spooled: %s", len(self._spool), exc)
                    return False
                self._spool.popleft()
        return True

    @property
    def spooled(self) -> int:
        return len(self._spool)

    def progress(self, deployment: str, per_client: dict[str, int]) -> None:
        try:
            self.state.set_progress(deployment, per_client)
        except Exception as exc:
            log.debug("progress not written: %s", exc)

    def stats(self) -> dict[str, Any]:
        return {"spooled": self.spooled}
