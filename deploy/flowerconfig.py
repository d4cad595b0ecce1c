"""Flower configuration for an mcdeploy site.

Use:  celery -A mcsite.celeryapp:app flower --conf=deploy/flowerconfig.py

Flower (tornado.options) executes this file and takes every top-level name that matches one
of its options (``port``, ``address``, ``basic_auth``, ``format_task``...).  Anything else is
ignored, so helpers here start with ``_`` and the file imports only modules whose names are
not Flower/tornado options (``logging`` is one: do not import it here).

Environment:
  FLOWER_BASIC_AUTH   required: ``user:password`` (several: ``u1:p1,u2:p2``; a password
                      cannot contain a comma).  Flower refuses to start without it.
  FLOWER_PORT         default 5555
  FLOWER_ADDRESS      default 127.0.0.1 (put a TLS reverse proxy in front for remote access)
  MCDEPLOY_REDIS_URL  the site's Redis, as for every mcdeploy role (empty: the site a running
                      ``mcdeploy up`` published).  ``celery --broker=...`` overrides it.

Options given on the command line (``--port=...``) still override this file.
"""

import copy
import os
import threading

_AUTH_ENV = "FLOWER_BASIC_AUTH"


def _basic_auth_from_env() -> list[str]:
    """The credentials from FLOWER_BASIC_AUTH, or SystemExit with a clear message."""
    raw = os.environ.get(_AUTH_ENV, "").strip()
    if not raw:
        raise SystemExit(
            f"mcdeploy flowerconfig: {_AUTH_ENV} is not set. Flower shows and controls every "
            f"worker and task of the site, so it must not run without authentication. "
            f"Set {_AUTH_ENV}=user:password (several: user1:pw1,user2:pw2) and start again."
        )
    pairs = [item.strip() for item in raw.split(",") if item.strip()]
    for pair in pairs:
        user, sep, password = pair.partition(":")
        if not (sep and user and password):
            raise SystemExit(
                f"mcdeploy flowerconfig: {_AUTH_ENV} must be user:password pairs separated "
                f"by commas, each with a non-empty user and password."
            )
    return pairs


def _configure_site_app() -> None:
    """Point mcsite's Celery app at the site's Redis with the site's serializers.

    ``celery -A mcsite.celeryapp:app`` imports the app unconfigured; the mcdeploy commands
    call ``mcsite.celeryapp.configure`` themselves, and so does this file for Flower (it runs
    before Flower connects).  ``celery --broker=URL`` (CELERY_BROKER_URL) still wins.
    """
    try:
        from mcproto.errors import McdeployError
        from mcsite.celeryapp import app as site_app
        from mcsite.celeryapp import configure
        from mcsite.site import resolve_redis_url
    except ImportError as exc:
        raise SystemExit(f"mcdeploy flowerconfig: mcdeploy is not importable here: {exc}") from None
    try:
        configure(site_app, resolve_redis_url())
    except McdeployError as exc:
        raise SystemExit(f"mcdeploy flowerconfig: {exc}") from None


basic_auth = _basic_auth_from_env()
if not os.environ.get("CELERY_BROKER_URL"):
    _configure_site_app()
port = int(os.environ.get("FLOWER_PORT", "5555"))
address = os.environ.get("FLOWER_ADDRESS", "127.0.0.1")
persistent = False
max_tasks = 10000
# Show kwargs and result on the tasks page: that is where format_task puts session progress.
tasks_columns = "name,uuid,state,kwargs,result,received,runtime,worker"

_MAX_CHARS = 200
_SESSION_TASK = "dp.open_session"
_FINISHED_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED", "REJECTED"})
# Fields of the task-progress events sent by DP session tasks.  Never named like Flower's own
# task attributes (sent, received, started, result, state...), which they would overwrite.
_PROGRESS_FIELDS = (
    "clients_joined",
    "clients_done",
    "clients_failed",
    "bytes_sent",
    "rate_mbps",
    "percent",
    "eta_s",
    "session_state",
    "dp_name",
)


def _shorten(value: object, limit: int = _MAX_CHARS) -> object:
    """``value`` as text of at most ``limit`` characters (None stays None)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def _live_record(task: object) -> object | None:
    """Flower's own record of ``task``, which holds the merged task-progress fields.

    Flower 2.2 hands format_task ``copy.copy(task)``, and Celery's ``Task.__reduce__``
    rebuilds the copy from ``Task._fields`` only, so the copy has lost every custom event
    field.  The record itself lives in Flower's event thread (``flower.events.Events``,
    attribute ``state``); it is read here, never written.  Internal to Flower: if it moves,
    this returns None and the summary is simply not shown.
    """
    try:
        from flower.events import Events
    except ImportError:
        return None
    for thread in threading.enumerate():
        state = getattr(thread, "state", None) if isinstance(thread, Events) else None
        if state is not None:
            return state.tasks.get(getattr(task, "uuid", None))
    return None


def _progress_summary(task: object) -> str | None:
    """``dp1 transferring joined=3 done=2 failed=0 sent=123MB 40.1Mb/s 67% eta=12s`` (last progress event)."""
    source = task
    if all(getattr(task, name, None) is None for name in _PROGRESS_FIELDS):
        source = _live_record(task)
        if source is None or all(getattr(source, name, None) is None for name in _PROGRESS_FIELDS):
            return None
    values = {name: _number(getattr(source, name, None)) for name in _PROGRESS_FIELDS}
    phase = getattr(source, "session_state", None)

    def count(name: str) -> str:
        value = values[name]
        return "?" if value is None else str(int(value))

    sent, rate, percent, eta = values["bytes_sent"], values["rate_mbps"], values["percent"], values["eta_s"]
    dp = getattr(source, "dp_name", None)
    return " ".join(
        (
            *((dp,) if isinstance(dp, str) and dp else ()),
            phase.lower() if isinstance(phase, str) and phase else "session",
            f"joined={count('clients_joined')}",
            f"done={count('clients_done')}",
            f"failed={count('clients_failed')}",
            "sent=?" if sent is None else f"sent={sent / 1e6:.0f}MB",
            "?Mb/s" if rate is None else f"{rate:.1f}Mb/s",
            "?%" if percent is None else f"{percent:.0f}%",
            "eta=?" if eta is None else f"eta={eta:.0f}s",
        )
    )


def format_task(task):
    """Flower display hook: short args/kwargs, and a progress line for session tasks.

    Flower 2.2 already passes a copy (``custom_format_task(copy.copy(task))``); copying
    again is cheap and keeps Flower's stored task intact should that ever change.  Only
    attributes of the copy are reassigned; nothing nested is mutated.  Progress fields are
    read through ``_live_record`` because that copy no longer carries them.
    """
    summary = None
    if task.name == _SESSION_TASK and task.state not in _FINISHED_STATES:
        summary = _progress_summary(task)  # before copying: a copy loses the progress fields
    task = copy.copy(task)
    task.args = _shorten(task.args)
    task.kwargs = _shorten(task.kwargs)
    # A running session has no result yet: show its progress there.  A finished one shows its
    # result, which carries the final figures (progress events are throttled, so the last one
    # is older than the end of the session).
    task.result = summary if summary is not None else _shorten(task.result)
    return task
