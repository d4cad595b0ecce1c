"""Relays what happens in sessions to the controller, spooling while Redis is away.

Server side.  Client results and session reports travel as Celery tasks to
the ``controller`` queue (the controller owns the record; DPs never write
results themselves).  Every message is first written to a spool directory
(one fsynced file per message) and removed only once published, so a
client's ``Ack`` ("recorded or spooled") survives Redis being away *and*
the DP agent being killed: a restarted agent publishes what its spool
holds.  The controller's writes are idempotent, so a message published
twice (killed between publishing and removing its file) changes nothing.
Without a spool directory the spool is in memory only.
Volatile progress (blocks received per client) goes straight to Redis:
losing a progress sample is harmless.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections import deque
from typing import Any

import msgpack
from celery import Celery

from mcproto.codec import from_body, to_body
from mcproto.errors import ConfigError, MessageError
from mcproto.messages import ClientResult, Message, SessionReport
from mcsite.state import State

log = logging.getLogger("mcdeploy.dp.relay")

TASK_FOR = {ClientResult: "controller.client_result", SessionReport: "controller.session_report"}
_MODEL: dict[str, type[Message]] = {"client_result": ClientResult, "session_report": SessionReport}
SPOOL_MAX = 100_000


class Relay:
    """Publishes results to the controller through a durable spool (in memory when ``spool_dir`` is None)."""

    def __init__(self, app: Celery, state: State, spool_dir: str | None = None) -> None:
        self.app = app
        self.state = state
        self.spool_dir = spool_dir
        self._spool: deque[tuple[Message, str]] = deque(maxlen=SPOOL_MAX)
        self._lock = threading.Lock()
        self._seq = 0
        self.recovered = 0
        if spool_dir:
            self._recover(spool_dir)

    def _recover(self, spool_dir: str) -> None:
        """Load messages a previous run spooled but did not publish, oldest first."""
        try:
            os.makedirs(spool_dir, mode=0o700, exist_ok=True)
            names = sorted(n for n in os.listdir(spool_dir) if n.endswith(".msg"))
        except OSError as exc:
            raise ConfigError(f"cannot use the relay spool {spool_dir}: {exc.strerror}") from None
        for name in names:
            path = os.path.join(spool_dir, name)
            try:
                with open(path, "rb") as fh:
                    rec = msgpack.unpackb(fh.read(), raw=False)
                msg = from_body(_MODEL[rec["type"]], rec["body"])
            except (OSError, ValueError, KeyError, TypeError, MessageError, msgpack.ExtraData,
                    msgpack.FormatError, msgpack.StackError):
                log.warning("unreadable spool file %s (torn by a crash?): set aside", path)
                with contextlib.suppress(OSError):
                    os.replace(path, path + ".bad")
                continue
            self._spool.append((msg, path))
            prefix = name.split("-", 1)[0]
            if prefix.isdigit():
                self._seq = max(self._seq, int(prefix))
        self.recovered = len(self._spool)
        if self.recovered:
            log.info("relay spool: %d message(s) from a previous run to publish", self.recovered)

    def send(self, msg: ClientResult | SessionReport) -> bool:
        """Spool (durably, with a spool directory), then publish if possible; False if it stays spooled."""
        with self._lock:
            path = self._persist(msg)
            self._spool.append((msg, path))
        return self.flush()

    def _persist(self, msg: Message) -> str:
        if not self.spool_dir:
            return ""
        self._seq += 1
        name = f"{self._seq:012d}-{uuid.uuid4().hex[:8]}.msg"
        path = os.path.join(self.spool_dir, name)
        data = msgpack.packb({"type": msg.type, "body": to_body(msg)}, use_bin_type=True)  # type: ignore[attr-defined]
        try:
            tmp = path + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.spool_dir)
        except OSError as exc:  # a full disk must not lose the result: it stays in memory
            log.error("cannot write the relay spool %s: %s (kept in memory only)", self.spool_dir, exc)
            return ""
        return path

    def flush(self) -> bool:
        """Publish everything spooled, oldest first; stops at the first failure."""
        with self._lock:
            while self._spool:
                msg, path = self._spool[0]
                try:
                    # ignore_result: nobody waits for these, and a result subscription would block on a
                    # Redis that is away (the backend retries its connection for ~20 s) instead of spooling.
                    self.app.send_task(TASK_FOR[type(msg)], kwargs={"body": to_body(msg)}, ignore_result=True,
                                       retry=True, retry_policy={"max_retries": 2, "interval_start": 0.1})
                except Exception as exc:  # broker unreachable: keep it, try later
                    log.warning("controller unreachable, %d message(s) spooled: %s", len(self._spool), exc)
                    return False
                self._spool.popleft()
                if path:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
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
        return {"spooled": self.spooled, "recovered": self.recovered}


def _fsync_dir(path: str) -> None:
    """Make a new file's name durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
