"""Operations the CLI and the controller's tasks share: add images, create deployments.

Server side.  One implementation for the operator's command line and for a
deployment triggered by a queue message, so both validate the same way.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from celery import Celery

from controller.inventory import Inventory
from mcproto import manifest as mf
from mcproto.codec import to_body
from mcproto.errors import ConfigError, NotFoundError
from mcproto.messages import DeployRequest, SessionJob
from mcsite import identity
from mcsite.settings import ControllerSettings
from mcsite.state import State


def add_image(state: State, path: str, name: str | None = None, ctl: ControllerSettings | None = None
              ) -> dict[str, str]:
    """Digest a file, sign its manifest with the controller's key, and record it as an image.

    Idempotent for the same content.  The manifest (size, SHA-256, a digest per chunk; see
    :mod:`mcproto.manifest`) is built here once, in the same read as the whole-file digest.
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise NotFoundError(f"no such file: {path}")
    name = name or os.path.basename(path)
    key = identity.controller_key((ctl or ControllerSettings()).key_file)
    try:
        manifest = mf.build_file(name, path)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except mf.ManifestError as exc:
        raise ConfigError(f"cannot build the manifest of {path}: {exc}") from None
    signed = base64.b64encode(mf.sign(manifest, key)).decode()
    return state.add_image(name, path, manifest.size, manifest.sha256, manifest=signed)


def ensure_manifest(state: State, image: dict[str, str], ctl: ControllerSettings | None = None
                    ) -> dict[str, str]:
    """``image`` with a signed manifest: images recorded before manifests existed get one now."""
    if image.get("manifest"):
        return image
    key = identity.controller_key((ctl or ControllerSettings()).key_file)
    try:
        manifest = mf.build_file(image["name"], image["path"])
    except OSError as exc:
        raise ConfigError(f"cannot read image {image['name']} at {image['path']}: {exc.strerror}") from None
    if manifest.sha256 != image["sha256"] or manifest.size != int(image["size"]):
        raise ConfigError(f"image {image['name']} changed on disk since it was added ({image['path']}); "
                          "add it again under a new name")
    signed = base64.b64encode(mf.sign(manifest, key)).decode()
    state.set_image_manifest(image["name"], signed)
    return {**image, "manifest": signed}


def describe_image(image: dict[str, str]) -> dict[str, object]:
    """An image record for people: the manifest summarised (key, chunks), not dumped."""
    out: dict[str, object] = {k: v for k, v in image.items() if k != "manifest"}
    blob = image.get("manifest")
    if blob:
        try:
            m = parse_manifest(blob)
            out["manifest"] = {"signed_by": m.key_id, "chunk_size": m.chunk_size, "chunks": m.chunks,
                               "bytes": len(base64.b64decode(blob))}
        except (ValueError, mf.ManifestError):
            out["manifest"] = "unreadable"
    else:
        out["manifest"] = "none (built at the next deployment)"
    return out


def parse_manifest(blob_b64: str) -> mf.Manifest:
    """The manifest in a stored record, checked against the controller's own key."""
    return mf.verify(base64.b64decode(blob_b64), identity.controller_key(ControllerSettings().key_file).public_key())


def deploy(state: State, app: Celery, req: DeployRequest, ctl: ControllerSettings | None = None
           ) -> tuple[str, SessionJob, bool]:
    """Create a deployment and publish its session job(s) to the DPs' queues.

    Returns (deployment id, its first job, created).  An unknown image, DP or collection, an empty
    collection or a client without a DP raises (:class:`NotFoundError`, :class:`ConfigError`)
    before anything is written.  See :func:`deploy_all` for every job.
    """
    dep_id, jobs, created = deploy_all(state, app, req, ctl)
    return dep_id, jobs[0], created


def deploy_all(state: State, app: Celery, req: DeployRequest, ctl: ControllerSettings | None = None
               ) -> tuple[str, list[SessionJob], bool]:
    """:func:`deploy` returning every session job (a collection deployment has one per DP)."""
    ctl = ctl or ControllerSettings()
    image = state.get_image(req.image)
    if req.collection is not None:
        from controller import deployments

        Inventory(state).members(req.collection)  # unknown collection: say so before anything else
        image = ensure_manifest(state, image, ctl)
        return deployments.create(state, app, image, req, ctl)
    known_dps = [n for n, _ in state.list_dps()]
    if req.dp not in known_dps:
        known = ", ".join(known_dps) or "none registered"
        raise NotFoundError(f"unknown DP {req.dp!r} (known: {known}); start it with `mcdeploy-dp --name {req.dp}`")
    if state.dp_drained(req.dp) and not (req.idempotency_key and state.r.exists(state.k.idempotency(
            req.idempotency_key))):
        raise ConfigError(f"DP {req.dp} is drained: it takes no new sessions (`mcdeploy dp undrain {req.dp}`, "
                          "or deploy to another DP)")
    image = ensure_manifest(state, image, ctl)
    dep_id, jobs, created = state.create_deployment(image, req, ctl)
    if created:
        app.send_task("dp.open_session", kwargs={"body": to_body(jobs[0])})
    return dep_id, jobs, created


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
        "clients_cancelled": int(dep.get("clients_cancelled", 0) or 0),
        "bytes_sent": int(dep.get("bytes_sent", 0) or 0),
        "reason": dep.get("reason", ""),
    }
