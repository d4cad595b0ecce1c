"""The reconciler: a periodic controller task comparing desired state with what DPs reported.

Server side.  Celery messages are hints (at-least-once, a SIGKILLed worker can
lose one); Redis state is the truth.  Every ``interval_s`` (Celery beat runs
task ``controller.reconcile``; ``mcdeploy worker --beat`` or ``mcdeploy beat``)
one pass:

1. **re-dispatches sessions whose DP lease lapsed**: a live session a DP had
   started (staging/waiting/transferring) whose lease key is gone, or a session
   still ``created`` long after its job was sent while its DP is alive with a
   free slot (the job message was lost), gets its job published again to its
   DP's queue.  Same session id, group, port and key material on the client
   side: clients rejoin and resume from their journals; the new sender takes a
   new fencing number, so nonces never repeat;
2. **times out clients that vanished**: a collection client that is
   transferring but whose progress the DP has not seen move for
   ``client_timeout_s`` fails with the reason;
3. **finishes deployments whose clients are all accounted for**: sessions that
   ended without their ``session_closed`` follow-up get it, and deployments
   whose counts add up are closed;
4. **enforces deadlines**: a deployment still open ``deadline_s`` after it was
   created fails its unfinished clients and tells its DPs to abort.

Idempotent and safe to run twice at once: a pass takes a short Redis lock, and
each re-dispatch claims a per-session key with a TTL, so two reconcilers never
both re-send one job; every state move is a forward-only Lua update.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from celery import Celery
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from mcproto.codec import to_body
from mcproto.messages import CancelSession, SessionReport
from mcsite.settings import _Component
from mcsite.state import TERMINAL, State

log = logging.getLogger("mcdeploy.reconciler")


class ReconcilerSettings(_Component):
    """How often the reconciler runs and when it acts (env ``MCDEPLOY_RECONCILE_*``, TOML ``[reconcile]``)."""

    model_config = SettingsConfigDict(env_prefix="MCDEPLOY_RECONCILE_", extra="ignore")
    toml_table: ClassVar[str] = "reconcile"

    interval_s: float = Field(10.0, gt=0, description="Seconds between passes (Celery beat schedule).")
    redispatch_after_s: float = Field(30.0, gt=0, description="A session still 'created' this long after its "
                                      "job was sent (its DP alive with a free slot) is sent again; also the "
                                      "least time between two re-dispatches of one session.")
    client_timeout_s: float = Field(120.0, gt=0, description="A transferring client whose progress did not "
                                    "move for this long has vanished: it fails.")
    close_grace_s: float = Field(5.0, ge=0, description="An ended session's clients without a result are failed "
                                 "by the reconciler only this long after it ended (results in flight land first).")


@dataclass
class Pass:
    """What one pass did (the task's result; Flower shows it)."""

    redispatched: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    skipped: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"redispatched": self.redispatched, "vanished": self.vanished, "closed": self.closed,
                "expired": self.expired, "skipped": self.skipped}


def _f(rec: dict[str, Any], key: str, default: float = 0.0) -> float:
    try:
        return float(rec.get(key) or default)
    except (TypeError, ValueError):
        return default


def run(state: State, app: Celery, cfg: ReconcilerSettings | None = None, now: float | None = None) -> Pass:
    """One reconciler pass (see the module doc)."""
    cfg = cfg or ReconcilerSettings()
    out = Pass()
    lock = f"{time.time():.6f}"
    if not state.r.set(state.k.reconcile_lock, lock, nx=True, px=int(max(5.0, 3 * cfg.interval_s) * 1000)):
        out.skipped = True
        return out
    try:
        now = time.time() if now is None else now
        _deadlines(state, app, now, out)
        _sessions(state, app, cfg, now, out)
        _vanished(state, cfg, now, out)
        _finish(state, now, out, cfg.close_grace_s)
    finally:
        if state.r.get(state.k.reconcile_lock) == lock.encode():
            state.r.delete(state.k.reconcile_lock)
    if out.redispatched or out.vanished or out.closed or out.expired:
        log.info("reconcile redispatched=%s vanished=%s closed=%s expired=%s", ",".join(out.redispatched) or "-",
                 ",".join(out.vanished) or "-", ",".join(out.closed) or "-", ",".join(out.expired) or "-")
    return out


def _open_deployments(state: State, limit: int = 10_000) -> list[dict[str, Any]]:
    return [d for d in state.list_deployments(limit) if d.get("state") not in TERMINAL]


def _deadlines(state: State, app: Celery, now: float, out: Pass) -> None:
    for dep in _open_deployments(state):
        deadline = _f(dep, "deadline_s")
        start = _f(dep, "retried_at") or _f(dep, "created_at")
        if not deadline or not start or now < start + deadline:
            continue
        reason = f"deadline passed: not finished {deadline:g} s after the deployment started"
        for sid, dp in state.expire_deployment(dep["id"], reason):
            app.send_task("dp.cancel_session", kwargs={"body": to_body(CancelSession(
                deployment=dep["id"], session_id=sid, dp=dp, reason=reason))})
        out.expired.append(dep["id"])
        log.warning("deployment deadline passed deployment=%s deadline_s=%g", dep["id"], deadline)


def _sessions(state: State, app: Celery, cfg: ReconcilerSettings, now: float, out: Pass) -> None:
    dps = dict(state.list_dps())
    for sid in state.live_sessions():
        sess = state.session(sid)
        st = sess.get("state")
        if not sess or st in TERMINAL:
            state.end_session(sid)  # ended (or vanished) without its ports being given back
            continue
        if state.lease_holder(sid) is not None:
            continue
        dispatched = _f(sess, "dispatched_at") or _f(sess, "created_at")
        if st == "created":
            info = dps.get(sess.get("dp", ""))
            if info is None or now - dispatched < cfg.redispatch_after_s:
                continue  # its DP is down (the queue keeps the job) or may still be busy with it
            if int(info.get("sessions", "0") or 0) >= int(info.get("concurrency", "1") or 1):
                continue  # every slot busy: the job is queued behind running sessions
            why = f"job not picked up {now - dispatched:.0f} s after it was sent"
        else:
            # The DP had started it and its lease lapsed: the sender died (or lost Redis for a whole TTL).
            if now - dispatched < 2.0:
                continue  # just re-sent: the DP has not taken the lease yet
            why = f"lease of DP {sess.get('dp')} lapsed while {st}"
        job = state.session_job_by_id(sid)
        if job is None or not state.claim_redispatch(sid, cfg.redispatch_after_s):
            continue
        n = state.mark_redispatched(sid, why)
        app.send_task("dp.open_session", kwargs={"body": to_body(job)})
        out.redispatched.append(f"{int(sid):x}")
        log.warning("session redispatched deployment=%s session=%x dp=%s count=%d reason=%s", job.deployment,
                    job.session_id, job.dp, n, why)


def _vanished(state: State, cfg: ReconcilerSettings, now: float, out: Pass) -> None:
    for dep in _open_deployments(state):
        if dep.get("kind") != "collection":
            continue
        seen = state.last_seen(dep["id"])
        gone = []
        for name, t in state.targets(dep["id"]).items():
            if t.get("state") != "transferring":
                continue
            last = max(seen.get(name, 0.0), _f(t, "transferring_at"), _f(t, "joined_at"))
            if last and now - last > cfg.client_timeout_s:
                gone.append(name)
        if gone:
            reason = f"client vanished: no progress for {cfg.client_timeout_s:g} s"
            if state.fail_targets(dep["id"], gone, reason):
                out.vanished += [f"{dep['id']}/{n}" for n in gone]


def _finish(state: State, now: float, out: Pass, grace: float) -> None:
    for dep in _open_deployments(state):
        sessions = state.list_sessions(dep["id"])
        if dep.get("kind") == "collection":
            for s in sessions:
                ended = max((_f(s, f"{x}_at") for x in TERMINAL), default=0.0)
                if s.get("state") in ("finished", "failed") and ended and now - ended >= grace:
                    rep = SessionReport(deployment=dep["id"], session_id=int(s["id"]), dp=s["dp"], state=s["state"],
                                        reason=s.get("reason", "")[:500])
                    if state.close_session(rep):
                        out.closed.append(dep["id"])
            # Every client accounted for but the deployment still open (a lost update): close it.
            targets = state.targets(dep["id"])
            if targets and all(t.get("state") in TERMINAL for t in targets.values()):
                failed = sum(1 for t in targets.values() if t["state"] == "failed")
                cancelled = sum(1 for t in targets.values() if t["state"] == "cancelled")
                final = "failed" if failed else "cancelled" if cancelled else "finished"
                why = f"{failed} of {len(targets)} client(s) failed" if failed else ""
                if state.close_deployment(dep["id"], final, why):
                    out.closed.append(dep["id"])
        else:
            expected = int(_f(dep, "expected"))
            done, failed = int(_f(dep, "clients_done")), int(_f(dep, "clients_failed"))
            if expected and done + failed >= expected:
                final = "failed" if failed else "finished"
                if state.close_deployment(dep["id"], final, f"{failed} client(s) failed" if failed else ""):
                    out.closed.append(dep["id"])
