"""Finding the site's Redis: configured URL, or the one a running `mcdeploy up` published.

Server side only.  CLI commands run as separate processes, so an embedded
Redis started per command would forget everything at exit; instead
``mcdeploy up`` publishes its private Redis in a small site file and later
commands find it there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import redis

from mcproto.errors import ConfigError
from mcsite.settings import SiteSettings

NO_SITE = (
    "no Redis configured: set MCDEPLOY_REDIS_URL=redis://HOST:PORT/0, "
    "or start a one-machine site with `mcdeploy up` (or just try `mcdeploy demo`)"
)


def site_file_path(settings: SiteSettings) -> Path:
    """Where `mcdeploy up` publishes its URL (private to the user: mode 0600)."""
    if settings.site_file:
        return Path(settings.site_file)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path.home() / ".cache"
    return base / "mcdeploy" / "site.json"


def publish_site(settings: SiteSettings, url: str) -> Path:
    """Record the running site's Redis URL for other commands of this user."""
    path = site_file_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"redis_url": url, "pid": os.getpid()}, fh)
    os.replace(tmp, path)
    return path


def unpublish_site(settings: SiteSettings) -> None:
    """Remove the site file if it is ours."""
    path = site_file_path(settings)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def resolve_redis_url(settings: SiteSettings | None = None) -> str:
    """The Redis URL to use, or :class:`ConfigError` saying how to get one."""
    settings = settings or SiteSettings()
    if settings.redis_url:
        return settings.redis_url
    path = site_file_path(settings)
    try:
        info = json.loads(path.read_text())
        url = str(info["redis_url"])
    except (OSError, ValueError, KeyError):
        raise ConfigError(NO_SITE) from None
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
    except redis.RedisError:
        raise ConfigError(f"the site in {path} is not running; {NO_SITE}") from None
    return url
