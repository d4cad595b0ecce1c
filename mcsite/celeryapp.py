"""The one Celery app shared by the controller worker and every DP agent.

Server side only.  Control-plane facts this configuration is built on (see
DESIGN.md §2): msgpack only for tasks and results, JSON for events (msgpack
events break workers and Flower); one queue ``controller`` and one queue
``dp.<name>`` per DP, chosen by :func:`route_task` from the task body; early
acks (a session is long and must never be redelivered to a second sender:
leases in Redis guard it instead); prefetch 1 so a long session never hides
queued work.  Task bodies are one keyword argument, ``body``: a plain dict
dumped from a pydantic model in :mod:`mcproto.messages`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from mcproto.errors import MessageError

CONTROLLER_QUEUE = "controller"


def dp_queue(name: str) -> str:
    """The queue a DP agent consumes."""
    return f"dp.{name}"


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
               ) -> dict[str, str] | None:
    """Celery router: ``dp.*`` tasks go to the queue of the DP named in their body."""
    if name.startswith("dp."):
        body = (kwargs or {}).get("body")
        dp = body.get("dp") if isinstance(body, dict) else None
        if not isinstance(dp, str) or not dp:
            raise MessageError(f"task {name} has no 'dp' in its body; cannot route it")
        return {"queue": dp_queue(dp)}
    if name.startswith("controller."):
        return {"queue": CONTROLLER_QUEUE}
    return None


def configure(celery_app: Celery, redis_url: str) -> Celery:
    """Point the app at a site's Redis; call before publishing or starting a worker."""
    celery_app.conf.update(
        broker_url=redis_url,
        result_backend=redis_url,
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=["msgpack"],
        result_accept_content=["msgpack"],
        event_serializer="json",
        task_routes=(route_task,),
        task_default_queue=CONTROLLER_QUEUE,
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return celery_app


app = Celery("mcdeploy", include=["controller.tasks", "dpagent.tasks"])
