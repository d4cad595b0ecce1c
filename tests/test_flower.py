"""Flower, with the shipped configuration, shows the site's workers and the session task's progress."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from controller import api
from mcproto.messages import DeployRequest
from mcsite.celeryapp import app
from tests.conftest import Site, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, auth: str | None) -> tuple[int, object]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


def _get_text(url: str, auth: str) -> str | None:
    req = urllib.request.Request(url)
    req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def test_flower_requires_auth_and_shows_workers_and_session_progress(site: Site, tmp_path: Path) -> None:
    port = _free_tcp_port()
    env = {**site.env, "FLOWER_BASIC_AUTH": "ops:s3cret", "FLOWER_PORT": str(port)}
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "mcsite.celeryapp:app", "flower",
                               f"--conf={ROOT / 'deploy' / 'flowerconfig.py'}"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "flower.log", "wb"))  # noqa: SIM115
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _get(f"{base}/api/workers", None)[0] == 401, timeout=30), \
            (tmp_path / "flower.log").read_text()[-2000:]
        image = tmp_path / "img"
        image.write_bytes(os.urandom(24 * 1024 * 1024))  # ~5 s at 40 Mbit/s: long enough to watch
        api.add_image(site.state, str(image), name="flower-img")
        dep_id, _, _ = api.deploy(site.state, app, DeployRequest(image="flower-img", dp=site.dp, clients=1,
                                                                   max_rate_mbps=40))
        client = site.spawn_client("--out", str(tmp_path / "o"), "--id", "watched", "--deployment", dep_id)

        def session_page() -> str | None:
            """The session task's page while it runs: format_task puts the live progress there."""
            status, tasks = _get(f"{base}/api/tasks?taskname=dp.open_session", "ops:s3cret")
            if status != 200 or not isinstance(tasks, dict):
                return None
            for uuid in tasks:
                page = _get_text(f"{base}/task/{uuid}", "ops:s3cret")
                if page and "joined=1" in page:
                    return page
            return None

        page = wait_for(session_page, timeout=30)
        assert page, (tmp_path / "flower.log").read_text()[-2000:]
        assert "sent=" in page and "%" in page
        assert client.wait(timeout=60) == 0
        status, workers = _get(f"{base}/api/workers?refresh=1", "ops:s3cret")
        assert status == 200 and isinstance(workers, dict)
        names = set(workers)
        assert any(n.startswith(f"dp-{site.dp}@") for n in names), names
        assert any(n.startswith("controller@") for n in names), names
    finally:
        flower.terminate()
        try:
            flower.wait(timeout=10)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait()
