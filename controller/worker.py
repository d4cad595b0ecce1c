"""``mcdeploy worker`` / ``mcdeploy beat``: the controller's Celery worker on queue ``controller``, and the
beat that runs the reconciler.

Server side.  ``mcdeploy worker --beat`` embeds the beat in the worker (one process for a small site);
``mcdeploy beat`` runs it alone.  Several beats are harmless: a reconciler pass takes a Redis lock and
every step is idempotent.  The schedule lives in memory (no schedule file to keep).
"""

from __future__ import annotations

from mcsite.celeryapp import CONTROLLER_QUEUE, app, configure
from mcsite.logs import setup_logging
from mcsite.site import resolve_redis_url


def _schedule() -> None:
    from controller.reconcile import ReconcilerSettings

    cfg = ReconcilerSettings()
    app.conf.beat_schedule = {
        "reconcile": {"task": "controller.reconcile", "schedule": cfg.interval_s,
                      "options": {"queue": CONTROLLER_QUEUE, "expires": max(1.0, cfg.interval_s)}},
    }
    app.conf.beat_scheduler = "celery.beat:Scheduler"  # in memory: nothing written to the working directory
    app.conf.beat_max_loop_interval = min(5.0, cfg.interval_s)


def run_worker(concurrency: int = 4, loglevel: str = "INFO", beat: bool = False) -> int:
    """Consume the controller queue until stopped (SIGTERM/Ctrl-C); with ``beat``, also run the reconciler."""
    configure(app, resolve_redis_url())
    setup_logging(loglevel)
    import controller.tasks  # noqa: F401  (registers the tasks)

    argv = ["worker", "-Q", CONTROLLER_QUEUE, "-n", "controller@%h", "--pool", "threads", "-c", str(concurrency),
            "--loglevel", loglevel, "-E", "--without-gossip", "--without-mingle"]
    if beat:
        _schedule()
        argv.append("--beat")
    app.worker_main(argv)
    return 0


def run_beat(loglevel: str = "INFO") -> int:
    """Only the beat: publishes ``controller.reconcile`` every interval for the controller workers."""
    configure(app, resolve_redis_url())
    setup_logging(loglevel)
    _schedule()
    app.start(["beat", "--loglevel", loglevel])
    return 0
