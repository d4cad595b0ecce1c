"""Celery tasks a DP agent consumes on its queue ``dp.<name>``.

Server side.  ``dp.open_session`` is acked early (Celery's default): a
session can run for hours and must never be redelivered to a second sender.
Instead the session takes a lease in Redis with a fencing number; a
duplicate delivery finds the lease held (or the session known to this host)
and does nothing.  The task runs for the session's whole life so Flower
shows it, with ``task-progress`` events carrying the session's figures.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from dpagent import runtime
from dpagent.host import Targeting
from dpagent.session import SessionRunner
from dpagent.staging import verify_content
from mcproto.codec import from_body
from mcproto.errors import McdeployError, MessageError
from mcproto.messages import CancelSession, ClientResult, Message, SessionJob, SessionReport
from mcsite.celeryapp import app

log = logging.getLogger("mcdeploy.dp.tasks")

# The lease of a running session: renewed every progress tick (1 s); if the agent dies, the reconciler
# re-dispatches the session once it lapsed.  MCDEPLOY_DP_LEASE_S shortens it (tests).
LEASE_TTL_S = float(os.environ.get("MCDEPLOY_DP_LEASE_S", "") or 30.0)
# After a session ended its lease stays this long, marked ended: the final report is on its way.
ENDED_LEASE_S = 600.0


class SessionRelay:
    """The DP's relay as one session sees it: names targeted clients by their target name.

    A client of a collection deployment joins with its own id (and MAC/UUID); results and progress
    reach the controller under the name the site knows it by, with the address it joined from, and
    clients that joined since the last report are announced (``SessionReport.joined``).
    """

    def __init__(self, relay: Any, job: SessionJob, targeting: Targeting) -> None:
        self._relay = relay
        self._job = job
        self._targeting = targeting
        self._state = "waiting"
        self._announced: set[str] = set()
        self._lock = threading.Lock()

    def send(self, msg: Message) -> bool:
        if isinstance(msg, ClientResult) and not self._targeting.any:
            name = self._targeting.name_of(msg.client_id)
            msg = msg.model_copy(update={"client_id": name,
                                         "address": self._targeting.address.get(name, msg.address)[:128]})
        elif isinstance(msg, SessionReport):
            self._state = msg.state
        return bool(self._relay.send(msg))

    def progress(self, deployment: str, per_client: dict[str, int]) -> None:
        named = {self._targeting.name_of(c): v for c, v in per_client.items()}
        self._relay.progress(deployment, named)
        if self._targeting.any:
            return
        with self._lock:
            new = sorted(set(named) - self._announced)
            self._announced.update(new)
        if new and self._state in ("waiting", "transferring"):
            job = self._job
            self._relay.send(SessionReport(deployment=job.deployment, session_id=job.session_id, dp=job.dp,
                                           state=self._state, joined=new))

    def flush(self) -> bool:
        return bool(self._relay.flush())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._relay, name)


PROGRESS_FIELDS = ("clients_joined", "clients_done", "clients_failed", "bytes_sent", "rate_mbps", "percent",
                   "eta_s", "blocks_total", "session_state", "dp_name", "deployment_id")


class Eta:
    """Seconds left of the first pass, from the pace since the transfer started (None until it can tell)."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self._p0 = 0.0

    def __call__(self, state: str, percent: float, now: float) -> float | None:
        if state != "transferring" and self._t0 is None:
            return None
        if self._t0 is None:
            self._t0, self._p0 = now, percent
            return None
        if percent >= 100.0:
            return 0.0
        done, elapsed = percent - self._p0, now - self._t0
        if done <= 0 or elapsed <= 0:
            return None
        return round(elapsed * (100.0 - percent) / done, 1)


def _dp_settings(rt: Any) -> Any:
    """The agent's settings with the operator's run-time overrides (``mcdeploy dp set``), read per session."""
    try:
        cfg = rt.state.dp_config(rt.settings.name)
    except Exception as exc:  # Redis away: the agent's own settings
        log.warning("DP settings not read: %s", exc)
        return rt.settings
    try:
        rate = float(cfg.get("max_rate_mbps") or 0)
    except ValueError:
        rate = 0.0
    if rate > 0 and rate != rt.settings.max_rate_mbps:
        log.info("session max rate %g Mbit/s (set by the operator; agent default %g)", rate,
                 rt.settings.max_rate_mbps)
        return rt.settings.model_copy(update={"max_rate_mbps": rate})
    return rt.settings


@app.task(name="dp.open_session", bind=True)
def open_session(self: Any, body: Any) -> dict[str, Any]:
    """Run one multicast session for a deployment; returns its final figures."""
    job = from_body(SessionJob, body)
    rt = runtime.current()
    if job.dp != rt.settings.name:
        raise MessageError(f"job for DP {job.dp!r} reached DP {rt.settings.name!r}")
    if rt.host.has_session(job.session_id):
        return {"state": "duplicate", "reason": "session already running or finished on this DP"}
    known = rt.state.session_state(job.session_id)
    if rt.host.cancelled(job.session_id) or known == "cancelled":
        return {"state": "cancelled", "reason": "the deployment was cancelled before the session opened"}
    if known in ("finished", "failed"):
        return {"state": "duplicate", "reason": f"session already {known}"}
    holder = f"{rt.settings.name}:{self.request.hostname or ''}"
    fence = rt.state.acquire_lease(job.session_id, holder, LEASE_TTL_S)
    if fence is None:
        return {"state": "duplicate", "reason": "session lease held by another sender"}
    targeting = Targeting(job.targets)
    relay = SessionRelay(rt.relay, job, targeting)

    def report(state: str, reason: str = "") -> None:
        relay.send(SessionReport(deployment=job.deployment, session_id=job.session_id, dp=job.dp,
                                 state=state, reason=reason[:500]))

    try:
        report("staging")
        problem = verify_content(job.image)
        if problem:
            log.error("session refused deployment=%s: %s", job.deployment, problem)
            report("failed", problem)
            return {"state": "failed", "reason": problem}
        last_event = [0.0]
        eta = Eta()
        settings = _dp_settings(rt)

        def progress(stats: dict[str, Any]) -> None:
            now = time.monotonic()
            blocks = getattr(getattr(runner.config, "layout", None), "blocks", None)
            stats = {**stats, "eta_s": eta(str(stats.get("session_state", "")), float(stats.get("percent", 0)), now),
                     "blocks_total": blocks, "dp_name": job.dp, "deployment_id": job.deployment}
            fields = {k: stats[k] for k in PROGRESS_FIELDS if k in stats and stats[k] is not None}
            self.update_state(state="PROGRESS", meta=fields)
            if now - last_event[0] >= 1.0:
                last_event[0] = now
                self.send_event("task-progress", **fields)
                try:
                    rt.state.set_session_progress(job.session_id, fields)
                except Exception as exc:
                    log.debug("session progress not written: %s", exc)
            try:
                held = rt.state.renew_lease(job.session_id, holder, fence, LEASE_TTL_S)
            except Exception as exc:  # Redis away for a moment: keep sending, the lease has a TTL of its own
                log.warning("lease not renewed session=%x: %s", job.session_id, exc)
                return
            if not held:
                runner.abort("session lease lost")

        advertised = rt.settings.advertise_host or rt.host.address[0]
        if advertised in ("0.0.0.0", "::"):
            advertised = ""  # clients take the announce's source address
        runner = SessionRunner(job, settings, rt.host.reply, relay, progress,
                               control=(advertised, rt.host.address[1]), identity=rt.identity, epoch=fence)
        rt.host.register(runner, targeting)
        report("waiting")
        log.info("session open deployment=%s session=%x group=%s port=%d image=%s expected=%d fence=%d rate_mbps=%g",
                 job.deployment, job.session_id, job.group, job.port, job.image.name, job.expected_clients, fence,
                 min(job.max_rate_mbps or settings.max_rate_mbps, settings.max_rate_mbps))
        try:
            stats = runner.run()
        except McdeployError as exc:  # e.g. the multicast interface cannot be used: say why, don't hang
            log.error("session failed deployment=%s: %s", job.deployment, exc)
            report("failed", str(exc))
            return {"state": "failed", "reason": str(exc)}
        finally:
            rt.host.unregister(runner)
        relay.send(runner.final_report())
        return {"state": "finished", **stats}
    finally:
        try:
            rt.state.end_lease(job.session_id, holder, fence, ENDED_LEASE_S)
        except Exception as exc:
            log.warning("lease not marked ended session=%x: %s", job.session_id, exc)



@app.task(name="dp.cancel_session")
def cancel_session(body: Any) -> dict[str, Any]:
    """Abort a session of this DP (its clients are failed with the reason); idempotent."""
    msg = from_body(CancelSession, body)
    rt = runtime.current()
    if msg.dp != rt.settings.name:
        raise MessageError(f"cancel for DP {msg.dp!r} reached DP {rt.settings.name!r}")
    running = rt.host.cancel(msg.session_id, msg.reason)
    log.info("cancel deployment=%s session=%x running=%s: %s", msg.deployment, msg.session_id, running, msg.reason)
    return {"cancelled": True, "was_running": running}
