"""`mcdeploy up`: a one-machine site on the embedded default, driven by the CLI like an operator would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import redis

from mcsite.procs import python_module
from tests.conftest import free_udp_port, wait_for

pytestmark = pytest.mark.integration


def test_up_runs_a_site_that_later_commands_find_and_stops_cleanly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCDEPLOY_")}
    env["MCDEPLOY_SITE_FILE"] = str(tmp_path / "site.json")
    env["MCDEPLOY_DP_HEARTBEAT_S"] = "0.5"
    env["MCDEPLOY_DP_KEY_FILE"] = str(tmp_path / "dp.key")  # not the home directory
    port = free_udp_port()
    up = subprocess.Popen(python_module("controller", "up", "--dp-name", "up-dp", "--control-port", str(port)),
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(python_module(*args), env=env, capture_output=True, text=True, timeout=120)

        assert wait_for(lambda: "up-dp" in run("controller", "dp", "list").stdout, timeout=40), up.stderr
        url = json.loads((tmp_path / "site.json").read_text())["redis_url"]
        image = tmp_path / "img"
        image.write_bytes(os.urandom(2 * 1024 * 1024))
        assert run("controller", "image", "add", str(image), "--name", "up-img").returncode == 0
        dep = run("controller", "deploy", "up-img", "--dp", "up-dp", "--clients", "1")
        assert dep.returncode == 0, dep.stderr
        dep_id = dep.stdout.strip().splitlines()[-1]
        client = run("clientagent", "--dp", f"127.0.0.1:{port}", "--out", str(tmp_path / "o"), "--wait", "30")
        assert client.returncode == 0, client.stderr
        assert (tmp_path / "o").read_bytes() == image.read_bytes()
        assert wait_for(lambda: "finished" in run("controller", "status", dep_id).stdout, timeout=30)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    assert up.returncode == 0
    assert not (tmp_path / "site.json").exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1, retry=None).ping()
