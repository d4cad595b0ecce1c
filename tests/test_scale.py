"""Scale: three DP agents (separate worker processes, each its own queue), one collection deployment
spread over them by boundary group, every client acknowledged; Flower lists every worker.

The controller worker here runs with ``--beat`` (the reconciler every second), as ``mcdeploy up`` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controller import api, deployments
from controller.inventory import Inventory
from mcproto.messages import DeployRequest
from mcsite.celeryapp import app, configure
from mcsite.embedded_redis import EmbeddedRedis
from mcsite.procs import ProcessGroup, python_module, site_env
from mcsite.state import State
from tests.conftest import free_udp_port, wait_for
from tests.test_flower import ROOT, _free_tcp_port, _get

pytestmark = pytest.mark.integration

DPS = ("scale-dp1", "scale-dp2", "scale-dp3")


def test_three_dps_one_deployment_spread_by_boundary_group_and_flower_lists_them(redis_server: EmbeddedRedis,
                                                                                 tmp_path: Path) -> None:
    configure(app, redis_server.url)
    state = State.from_url(redis_server.url)
    env = site_env(redis_server.url, MCDEPLOY_DP_HEARTBEAT_S="0.5", MCDEPLOY_RECONCILE_INTERVAL_S="1",
                   MCDEPLOY_DP_MAX_RATE_MBPS="400")
    procs = ProcessGroup()
    flower = None
    try:
        procs.spawn("controller", python_module("controller", "worker", "--beat", "--loglevel", "INFO"), env,
                    stdout=open(tmp_path / "controller.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        ports = {}
        for name in DPS:
            ports[name] = free_udp_port()
            procs.spawn(name, python_module("dpagent", "--name", name, "--control-port", str(ports[name])),
                        {**env, "MCDEPLOY_DP_KEY_FILE": str(tmp_path / f"{name}.key"),
                         "MCDEPLOY_DP_SPOOL_DIR": str(tmp_path / f"{name}-spool")},
                        stdout=open(tmp_path / f"{name}.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        assert wait_for(lambda: all(state.get_dp(n) for n in DPS), timeout=30), \
            [(tmp_path / f"{n}.log").read_text()[-1000:] for n in DPS]
        port = _free_tcp_port()
        flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "mcsite.celeryapp:app", "flower",
                                   f"--conf={ROOT / 'deploy' / 'flowerconfig.py'}"],
                                  env={**env, "FLOWER_BASIC_AUTH": "ops:s3cret", "FLOWER_PORT": str(port)},
                                  cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=open(tmp_path / "flower.log", "wb"))  # noqa: SIM115

        image = tmp_path / "scale.img"
        image.write_bytes(os.urandom(2 * 1024 * 1024 + 99))
        api.add_image(state, str(image), name="scale-img")
        inv = Inventory(state)
        inv.create_collection("scale-lab")
        for i, name in enumerate(DPS):  # fallback order: the next DP of the ring
            inv.add_boundary(f"scale-site{i + 1}", [f"127.0.{31 + i}.0/24"], [name, DPS[(i + 1) % 3]])
        clients = []
        for k in range(6):
            cid, mac = f"scale-pc{k + 1}", f"02:00:00:00:a0:{k + 1:02x}"
            inv.add_client(cid, mac, None, f"127.0.{31 + k % 3}.{10 + k}", collection="scale-lab")
            clients.append((cid, mac))
        dep_id, jobs, _ = api.deploy_all(state, app, DeployRequest(image="scale-img", collection="scale-lab",
                                                                   start_timeout_s=15))
        dp_of = {t.name: j.dp for j in jobs for t in j.targets or []}
        assert sorted(j.dp for j in jobs) == list(DPS)
        assert {n: sorted(c for c, d in dp_of.items() if d == n) for n in DPS} == {
            "scale-dp1": ["scale-pc1", "scale-pc4"], "scale-dp2": ["scale-pc2", "scale-pc5"],
            "scale-dp3": ["scale-pc3", "scale-pc6"]}
        assert len({(j.group, j.port) for j in jobs}) == 3 and len({j.port for j in jobs}) == 3
        running = []
        for cid, mac in clients:
            dp = dp_of[cid]
            running.append((cid, subprocess.Popen(python_module(
                "clientagent", "--dp", f"127.0.0.1:{ports[dp]}", "--out", str(tmp_path / f"{cid}.out"), "--id", cid,
                "--mac", mac, "--wait", "30", "--json"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)))
        original = image.read_bytes()
        for cid, p in running:
            stdout, stderr = p.communicate(timeout=90)
            assert p.returncode == 0, (cid, stderr)
            res = json.loads(stdout.strip().splitlines()[-1])
            assert res["acknowledged"] and res["verified"], res
            assert (tmp_path / f"{cid}.out").read_bytes() == original
        dep = wait_for(lambda: (d := state.get_deployment(dep_id))["state"] == "finished" and d, timeout=20)
        assert dep, state.get_deployment(dep_id)
        rows = deployments.report(state, dep_id)["clients"]
        assert {r["client"]: r["dp"] for r in rows if r["state"] == "finished"} == dp_of
        assert wait_for(lambda: all(s["state"] == "finished" for s in state.list_sessions(dep_id)), timeout=20)
        # The beat runs the reconciler: its task shows up in the controller's log.
        assert wait_for(lambda: "controller.reconcile" in (tmp_path / "controller.log").read_text(), timeout=15)

        # Flower lists every worker: the controller and the three DP agents.
        def workers() -> set[str] | None:
            if flower is not None and flower.poll() is not None:
                return None
            status, data = _get(f"http://127.0.0.1:{port}/api/workers?refresh=1", "ops:s3cret")
            names = set(data) if status == 200 and isinstance(data, dict) else set()
            want = [f"dp-{n}@" for n in DPS] + ["controller@"]
            return names if all(any(x.startswith(w) for x in names) for w in want) else None

        deadline = time.monotonic() + 25
        names = None
        while names is None and time.monotonic() < deadline and flower.poll() is None:
            names = workers()
            time.sleep(0.5)
        if names is None and flower.poll() is not None:
            pytest.skip("flower could not start: " + (tmp_path / "flower.log").read_text()[-500:])
        assert names, (tmp_path / "flower.log").read_text()[-2000:]
    finally:
        if flower is not None:
            flower.terminate()
            try:
                flower.wait(timeout=10)
            except subprocess.TimeoutExpired:
                flower.kill()
        procs.stop()
        for i in range(3):
            try:
                Inventory(state).remove_boundary(f"scale-site{i + 1}")
            except Exception:
                pass
