"""Celery tasks the controller worker consumes on queue ``controller``.

Server side.  Every body is validated by its pydantic model before anything
is written (a malformed body fails the task with a one-line
``MessageError`` and changes nothing); every write is idempotent because
Celery on Redis delivers at least once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from controller import api
from controller import reconcile as reconciler
from mcproto.codec import from_body
from mcproto.messages import ClientResult, DeployRequest, SessionReport
from mcsite.celeryapp import app
from mcsite.settings import SiteSettings
from mcsite.state import State

log = logging.getLogger("mcdeploy.controller")

_state: State | None = None
_lock = threading.Lock()


def state() -> State:
    """The worker's state handle, bound to the broker's Redis."""
    global _state
    with _lock:
        if _state is None:
            _state = State.from_url(app.conf.broker_url, SiteSettings().key_prefix)
        return _state


@app.task(name="controller.client_result")
def client_result(body: Any) -> dict[str, Any]:
    """Record one client's terminal result (first result wins)."""
    res = from_body(ClientResult, body)
    new = state().record_client_result(res)
    log.info("client result deployment=%s client=%s outcome=%s new=%s %s", res.deployment, res.client_id,
             res.outcome, new, res.reason)
    return {"recorded": new}


# A session's client results travel before its final report, but the controller worker handles
# messages concurrently: the clients of an ended collection session that still have no result are
# failed only this long after its final report, once results in flight have landed.
CLOSE_DELAY_S = 2.0


@app.task(name="controller.session_report")
def session_report(body: Any) -> dict[str, Any]:
    """Advance a deployment's state from its DP's session report."""
    rep = from_body(SessionReport, body)
    moved = state().record_session_report(rep)
    log.info("session report deployment=%s state=%s moved=%s joined=%d %s", rep.deployment, rep.state, moved,
             len(rep.joined), rep.reason)
    if rep.state in ("finished", "failed"):
        app.send_task("controller.session_closed", kwargs={"body": body}, countdown=CLOSE_DELAY_S)
    return {"advanced": moved}


@app.task(name="controller.session_closed")
def session_closed(body: Any) -> dict[str, Any]:
    """An ended session's targeted clients without a result are failed (idempotent)."""
    rep = from_body(SessionReport, body)
    failed = state().close_session(rep)
    if failed:
        log.info("session closed deployment=%s session=%x: %d client(s) without a result failed", rep.deployment,
                 rep.session_id, failed)
    return {"failed": failed}


@app.task(name="controller.deploy")
def deploy(body: Any) -> dict[str, Any]:
    """Create a deployment from a queue message (see ``mcdeploy schema`` for the body)."""
    req = from_body(DeployRequest, body)
    dep_id, _job, created = api.deploy(state(), app, req)
    log.info("deploy trigger image=%s dp=%s collection=%s deployment=%s created=%s", req.image, req.dp,
             req.collection, dep_id, created)
    return {"deployment": dep_id, "created": created}


@app.task(name="controller.reconcile")
def reconcile() -> dict[str, Any]:
    """One reconciler pass (Celery beat runs it every ``MCDEPLOY_RECONCILE_INTERVAL_S``; see controller.reconcile)."""
    return reconciler.run(state(), app).as_dict()
