"""Collection deployments: plan clients onto DPs, create, cancel, retry, report.

Server side.  A collection deployment targets exactly the clients of a
collection: each client goes to a DP by the boundary group of its last-known
address (the group's first DP that is alive, else its first DP), or, with no
known address or no group holding it, to the deployment's ``dp``.  One
session per DP that has targeted clients; the session job lists their
identities so the DP offers the session key only to them.

Cancel marks the deployment, its clients and open sessions cancelled and
tells each DP to abort (task ``dp.cancel_session``).  Retry gives the clients
that failed (or were cancelled) a new attempt: new sessions, planned again.
"""

from __future__ import annotations

import csv
import io
import json
import time
from typing import Any

from celery import Celery

from controller.inventory import Inventory
from mcproto.codec import to_body
from mcproto.errors import ConfigError, NotFoundError
from mcproto.messages import CancelSession, DeployRequest, SessionJob, Target
from mcsite.settings import ControllerSettings
from mcsite.state import TERMINAL, State

STATES = ("created", "staging", "waiting", "transferring", "finished", "failed", "cancelled")


def _known_dps(state: State) -> dict[str, bool]:
    """Every DP ever registered -> whether it is alive (heartbeat not expired)."""
    return {name: info is not None for name, info in state.list_dps()}


def plan(state: State, clients: list[dict[str, Any]], fallback_dp: str | None) -> dict[str, list[Target]]:
    """Targets per DP for these client records (see the module doc); ConfigError if one has no DP.

    Drained DPs get no clients (the boundary group's next DP does), and a DP with ``max_clients`` set
    (``mcdeploy dp set``) gets at most that many; both are read here, at each deployment.
    """
    inv = Inventory(state)
    dps = _known_dps(state)
    if fallback_dp is not None and fallback_dp not in dps:
        raise NotFoundError(f"unknown DP {fallback_dp!r} (known: {', '.join(sorted(dps)) or 'none registered'}); "
                            f"start it with `mcdeploy-dp --name {fallback_dp}`")
    config = {d: state.dp_config(d) for d in dps}
    drained = {d for d, c in config.items() if c.get("drained") == "1"}
    cap = {d: int(c.get("max_clients") or 0) for d, c in config.items()}
    load: dict[str, int] = {}

    def room(d: str) -> bool:
        return d not in drained and (not cap[d] or load.get(d, 0) < cap[d])

    out: dict[str, list[Target]] = {}
    homeless = []
    for c in clients:
        dp = None
        boundary = inv.boundary_of(c.get("address", "")) if c.get("address") else None
        if boundary is not None:
            order = [d for d in boundary["dps"] if d in dps and room(d)]
            dp = next((d for d in order if dps[d]), order[0] if order else None)
        if dp is None and fallback_dp is not None and room(fallback_dp):
            dp = fallback_dp
        if dp is None:
            homeless.append(c["name"])
            continue
        load[dp] = load.get(dp, 0) + 1
        out.setdefault(dp, []).append(Target(name=c["name"], mac=c.get("mac") or None,
                                             smbios_uuid=c.get("smbios_uuid") or None))
    if homeless:
        shown = ", ".join(homeless[:5]) + (f" and {len(homeless) - 5} more" if len(homeless) > 5 else "")
        why = ("their address is unknown or in no boundary group, or every DP they map to is drained or full "
               f"(drained: {', '.join(sorted(drained))})" if drained or any(cap.values()) else
               "their address is unknown or in no boundary group")
        raise ConfigError(f"no DP for client(s) {shown}: {why}; name a DP for them with --dp (or add a boundary "
                          "group)")
    return out


def create(state: State, app: Celery, image: dict[str, str], req: DeployRequest, ctl: ControllerSettings
           ) -> tuple[str, list[SessionJob], bool]:
    """Create a collection deployment and publish one session job per DP; nothing is written on bad input."""
    assert req.collection is not None
    inv = Inventory(state)
    names = inv.members(req.collection)
    if not names:
        raise ConfigError(f"collection {req.collection} is empty: add clients first "
                          f"(`mcdeploy collection add {req.collection} CLIENT...` or `client import FILE.csv`)")
    clients = [inv.get_client(n) for n in names]
    targets = plan(state, clients, req.dp)
    dep_id, jobs, created = state.create_deployment(image, req, ctl, targets)
    if created:
        for job in jobs:
            app.send_task("dp.open_session", kwargs={"body": to_body(job)})
    return dep_id, jobs, created


def cancel(state: State, app: Celery, dep_id: str, reason: str = "cancelled by the operator") -> int | None:
    """Cancel a deployment; returns how many sessions the DPs were told to abort (None: already cancelled)."""
    sessions = state.cancel_deployment(dep_id, reason)
    if sessions is None:
        return None
    for sid, dp in sessions:
        msg = CancelSession(deployment=dep_id, session_id=sid, dp=dp, reason=reason[:500])
        app.send_task("dp.cancel_session", kwargs={"body": to_body(msg)})
    return len(sessions)


def retry(state: State, app: Celery, dep_id: str, ctl: ControllerSettings | None = None
          ) -> tuple[list[str], list[SessionJob]]:
    """New sessions for the clients of a finished deployment that failed or were cancelled."""
    from controller import api

    ctl = ctl or ControllerSettings()
    dep = state.get_deployment(dep_id)
    if dep.get("kind") != "collection":
        raise ConfigError(f"deployment {dep_id} is not a collection deployment: deploy again instead")
    if dep["state"] not in TERMINAL:
        raise ConfigError(f"deployment {dep_id} is still {dep['state']}: retry once it has ended "
                          f"(or cancel it first)")
    targets = state.targets(dep_id)
    names = sorted(n for n, t in targets.items() if t["state"] in ("failed", "cancelled"))
    if not names:
        raise ConfigError(f"deployment {dep_id}: nothing to retry, every client finished")
    req = state.deployment_request(dep_id)
    image = api.ensure_manifest(state, state.get_image(req.image), ctl)
    inv = Inventory(state)
    records = []
    for n in names:
        try:
            records.append(inv.get_client(n))
        except NotFoundError:  # removed since: its identity as the deployment knew it, no address
            records.append({"name": n, "mac": targets[n].get("mac"), "smbios_uuid": targets[n].get("smbios_uuid")})
    fallback = dep.get("fallback_dp") or None
    per_dp = plan(state, records, fallback)
    attempt = int(dep.get("attempt", 1)) + 1
    jobs: list[SessionJob] = []
    try:
        for dp, ts in sorted(per_dp.items()):
            jobs.append(state.new_job(dep_id, dp, image, req, ctl, len(ts), ts, attempt))
        state.retry_targets(dep_id, names, jobs)
    except Exception:
        state.release_jobs(jobs)  # nothing half-created: the ports go back
        raise
    for job in jobs:
        app.send_task("dp.open_session", kwargs={"body": to_body(job)})
    return names, jobs


# ---------------------------------------------------------------------- reports

REPORT_COLUMNS = ("client", "mac", "smbios_uuid", "dp", "session", "attempt", "state", "reason", "created_at",
                  "staging_at", "waiting_at", "joined_at", "transferring_at", "ended_at", "seconds",
                  "bytes", "sha256", "address", "path")


def _iso(ts: Any) -> str:
    if ts is None or ts == "":
        return ""
    t = float(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def client_rows(dep: dict[str, Any], targets: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per client: state, reason, timings (Unix seconds), result figures."""
    rows = []
    results = dep.get("clients", {})
    if dep.get("kind") == "collection":
        for name in sorted(targets):
            t = targets[name]
            r = results.get(name, {})
            rows.append({"client": name, "mac": t.get("mac", ""), "smbios_uuid": t.get("smbios_uuid", ""),
                         "dp": t.get("dp", ""), "session": t.get("session", ""), "attempt": t.get("attempt", 1),
                         "state": t["state"], "reason": t.get("reason", ""),
                         **{f"{s}_at": t.get(f"{s}_at", "") for s in ("created", "staging", "waiting", "joined",
                                                                     "transferring", "ended")},
                         "seconds": r.get("seconds", ""), "bytes": r.get("bytes", ""), "sha256": r.get("sha256") or "",
                         "address": r.get("address", ""),
                         "path": r.get("path", "") if r.get("outcome") == "done" else "",
                         "history": t.get("history", [])})
        return rows
    progress = dep.get("progress", {})
    for name in sorted(set(results) | set(progress)):
        r = results.get(name)
        state = ("finished" if r["outcome"] == "done" else "failed") if r else (
            "cancelled" if dep["state"] == "cancelled" else "transferring")
        rows.append({"client": name, "mac": "", "smbios_uuid": "", "dp": r.get("dp", "") if r else dep.get("dp", ""),
                     "session": str(r.get("session_id", "")) if r else dep.get("session_id", ""), "attempt": 1,
                     "state": state, "reason": r.get("reason", "") if r else "",
                     "created_at": dep.get("created_at", ""), "staging_at": "", "waiting_at": "", "joined_at": "",
                     "transferring_at": "", "ended_at": f"{r['recorded_at']:.3f}" if r else "",
                     "seconds": r.get("seconds", "") if r else "", "bytes": r.get("bytes", "") if r else "",
                     "sha256": (r.get("sha256") or "") if r else "", "address": r.get("address", "") if r else "",
                     "path": r.get("path", "") if r and r.get("outcome") == "done" else "", "history": []})
    return rows


def report(state: State, dep_id: str) -> dict[str, Any]:
    """The whole record of one deployment: its states and timings, sessions, and every client."""
    dep = state.get_deployment(dep_id)
    targets = state.targets(dep_id)
    rows = client_rows(dep, targets)
    for row in rows:
        for k in [k for k in row if k.endswith("_at")]:
            row[k] = float(row[k]) if row[k] not in ("", None) else None
    summary = {k: v for k, v in dep.items() if k not in ("clients", "progress", "request")}
    for k in ("expected", "clients_done", "clients_failed", "clients_cancelled", "attempt", "bytes_sent"):
        if k in summary:
            summary[k] = int(summary[k] or 0)
    summary["timings"] = {s: float(dep[f"{s}_at"]) for s in STATES if dep.get(f"{s}_at")}
    sessions = state.list_sessions(dep_id)
    for s in sessions:
        s["timings"] = {st: float(s[f"{st}_at"]) for st in STATES if s.get(f"{st}_at")}
    return {"deployment": summary, "sessions": sessions, "clients": rows}


def report_csv(rep: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(REPORT_COLUMNS)
    for row in rep["clients"]:
        w.writerow([_iso(row[c]) if c.endswith("_at") else row[c] for c in REPORT_COLUMNS])
    return buf.getvalue()


def report_json(rep: dict[str, Any]) -> str:
    return json.dumps(rep, indent=2, sort_keys=True)
