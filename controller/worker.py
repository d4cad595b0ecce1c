"""``mcdeploy worker``: the controller's Celery worker on queue ``controller``.

Server side.
"""

from __future__ import annotations

from mcsite.celeryapp import CONTROLLER_QUEUE, app, configure
from mcsite.site import resolve_redis_url


def run_worker(concurrency: int = 4, loglevel: str = "INFO") -> int:
    """Consume the controller queue until stopped (SIGTERM/Ctrl-C)."""
    configure(app, resolve_redis_url())
    import controller.tasks  # noqa: F401  (registers the tasks)

    app.worker_main([
        "worker", "-Q", CONTROLLER_QUEUE, "-n", "controller@%h", "--pool", "threads", "-c", str(concurrency),
        "--loglevel", loglevel, "-E", "--without-gossip", "--without-mingle",
    ])
    return 0
