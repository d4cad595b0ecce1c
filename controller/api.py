"""Operations the CLI and the controller's tasks share: add images, create deployments.

Server side.  One implementation for the operator's command line and for a
deployment triggered by a queue message, so both validate the same way.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from celery import Celery

from mcproto.codec import to_body
from mcproto.errors import ConfigError, NotFoundError
from mcproto.messages import DeployRequest, SessionJob
from mcsite.settings import ControllerSettings
from mcsite.state import State


def add_image(state: State, path: str, name: str | None = None) -> dict[str, str]:
    """Hash a file and record it as an image (idempotent for the same content)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise NotFoundError(f"no such file: {path}")
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(4 * 1024 * 1024):
                h.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return state.add_image(name or os.path.basename(path), path, size, h.hexdigest())


def deploy(state: State, app: Celery, req: DeployRequest, ctl: ControllerSettings | None = None
           ) -> tuple[str, SessionJob, bool]:
    """Create a deployment and publish its session job to the DP's queue.

    Returns (deployment id, job, created).  An unknown image or DP raises
    :class:`NotFoundError` before anything is written.
    """
    ctl = ctl or ControllerSettings()
    image = state.get_image(req.image)
    known_dps = [n for n, _ in state.list_dps()]
    if req.dp not in known_dps:
        known = ", ".join(known_dps) or "none registered"
        raise NotFoundError(f"unknown DP {req.dp!r} (known: {known}); start it with `mcdeploy-dp --name {req.dp}`")
    dep_id, job, created = state.create_deployment(image, req, ctl)
    if created:
        app.send_task("dp.open_session", kwargs={"body": to_body(job)})
    return dep_id, job, created


def summary(dep: dict[str, Any]) -> dict[str, Any]:
    """A deployment record reduced to the figures reports and the demo show."""
    clients = dep.get("clients", {})
    return {
        "deployment": dep.get("id"),
        "state": dep.get("state"),
        "image": dep.get("image"),
        "dp": dep.get("dp"),
        "expected": int(dep.get("expected", 0)),
        "clients_done": sum(1 for c in clients.values() if c.get("outcome") == "done"),
        "clients_failed": sum(1 for c in clients.values() if c.get("outcome") == "failed"),
        "bytes_sent": int(dep.get("bytes_sent", 0) or 0),
        "reason": dep.get("reason", ""),
    }
