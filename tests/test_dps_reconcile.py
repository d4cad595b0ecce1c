"""DPs (drain, run-time settings), central group/port allocation, the reconciler, status --watch.

Real Redis and real workers (the ``site`` fixture); the kill -9 test starts its own DP agent so it
can kill it.  Reconciler passes are run in the test process (the same code the beat's task runs),
so each step is observed as it happens; ``tests/test_scale.py`` runs it from a real beat.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from controller import api, deployments
from controller import reconcile as rc
from controller.inventory import Inventory
from mcproto.errors import ConfigError
from mcproto.messages import DeployRequest, SessionReport, Target
from mcsite.celeryapp import app
from mcsite.procs import ProcessGroup, python_module
from mcsite.settings import ControllerSettings
from mcsite.state import State
from tests.conftest import Site, free_udp_port, wait_for

pytestmark = pytest.mark.integration

IMAGE = {"name": "alloc-img", "path": "/nonexistent", "size": "1000", "sha256": "0" * 64, "manifest": ""}


def _fresh(site: Site, prefix: str) -> State:
    """A state on the site's Redis under its own key prefix: allocation and reconciler tests see only theirs."""
    return State(redis.Redis.from_url(site.url), prefix)


def test_allocation_never_collides_under_concurrent_deployments_and_ports_come_back(site: Site) -> None:
    st = _fresh(site, "alloc1")
    ctl = ControllerSettings(port_min=47200, port_max=47259)  # 60 ports
    req = DeployRequest(image="alloc-img", dp="some-dp", clients=1, slow_policy="tier")  # 3 streams each
    made: list[tuple[str, list]] = []
    errors: list[Exception] = []

    def worker() -> None:
        for _ in range(5):
            try:
                dep_id, jobs, _ = st.create_deployment(IMAGE, req, ctl)
                made.append((dep_id, jobs))
            except ConfigError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]  # 40 deployments want 120 streams
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ports = [p for _, jobs in made for j in jobs for p in (j.port, *(t.port for t in j.tiers))]
    pairs = [(g, p) for _, jobs in made for j in jobs for g, p in ((j.group, j.port),
                                                                    *((t.group, t.port) for t in j.tiers))]
    # Never one port twice; a deployment that could not get all its streams gave back what it got.
    assert len(set(ports)) == len(ports) == 3 * len(made) and len(set(pairs)) == len(pairs)
    assert 18 <= len(made) <= 20 and len(made) + len(errors) == 40
    assert all("no free multicast port" in str(e) for e in errors)
    held = len(st.allocated())
    assert held == len(ports)
    # A session that ends gives its ports back; the next deployment gets them.
    dep_id, jobs = made[0]
    st.record_session_report(SessionReport(deployment=dep_id, session_id=jobs[0].session_id, dp="some-dp",
                                           state="finished"))
    assert len(st.allocated()) == held - 3 and str(jobs[0].session_id) not in st.live_sessions()
    _, again, _ = st.create_deployment(IMAGE, req, ctl)
    mine = {again[0].port, *(t.port for t in again[0].tiers)}
    others = {p for _, js in made[1:] for j in js for p in (j.port, *(t.port for t in j.tiers))}
    assert len(mine) == 3 and not mine & others and len(st.allocated()) == held
    # A cancelled deployment gives its ports back too.
    st.cancel_deployment(made[1][0], "test")
    assert len(st.allocated()) == held - 3


def test_drain_and_runtime_settings(site: Site, cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for name in ("dr-a", "dr-b"):
        site.state.register_dp(name, {"control": "127.0.0.1:9", "concurrency": 4, "sessions": 0}, ttl=60)
    inv = Inventory(site.state)
    inv.add_boundary("dr-site", ["10.91.0.0/16"], ["dr-a", "dr-b"])
    inv.add_client("dr-pc1", "02:00:00:00:91:01", None, "10.91.0.5")
    inv.add_client("dr-pc2", "02:00:00:00:91:02", None, "10.91.0.6")
    recs = [inv.get_client(n) for n in ("dr-pc1", "dr-pc2")]
    placed = deployments.plan(site.state, recs, None)
    assert {d: len(ts) for d, ts in placed.items()} == {"dr-a": 2}
    out = cli("dp", "drain", "dr-a")
    assert out.returncode == 0 and "drained" in out.stdout
    placed = deployments.plan(site.state, recs, None)
    assert {d: len(ts) for d, ts in placed.items()} == {"dr-b": 2}  # the boundary's next DP
    listed = json.loads(cli("dp", "list", "--json").stdout)
    assert {v["name"]: v["drained"] for v in listed}["dr-a"] is True
    assert "drained" in cli("dp", "show", "dr-a").stdout
    cli("dp", "drain", "dr-b")
    with pytest.raises(ConfigError, match="drained"):
        deployments.plan(site.state, recs, None)
    image = tmp_path / "rate.img"
    image.write_bytes(os.urandom(512 * 1024))
    api.add_image(site.state, str(image), name="rate-img")
    with pytest.raises(ConfigError, match="DP dr-a is drained"):
        api.deploy(site.state, app, DeployRequest(image="rate-img", dp="dr-a", clients=1))
    cli("dp", "undrain", "dr-a")
    cli("dp", "undrain", "dr-b")
    # max clients: the rest go to the next DP of the group
    assert cli("dp", "set", "dr-a", "--max-clients", "1").returncode == 0
    placed = deployments.plan(site.state, recs, None)
    assert {d: len(ts) for d, ts in placed.items()} == {"dr-a": 1, "dr-b": 1}
    cli("dp", "set", "dr-a", "--max-clients", "0")
    bad = cli("dp", "drain", "no-such-dp")
    assert bad.returncode == 2 and "unknown DP 'no-such-dp'" in bad.stderr
    inv.remove_boundary("dr-site")

    # A DP's max rate changes without a restart: the next session on the real DP uses it.
    assert "max_rate_mbps=40" in cli("dp", "set", site.dp, "--max-rate", "40").stdout
    dep_id, _, _ = api.deploy(site.state, app, DeployRequest(image="rate-img", dp=site.dp, clients=1))
    done = site.client("--out", str(tmp_path / "rate.out"), "--id", "rate-pc", "--deployment", dep_id,
                       "--wait", "20", timeout=60)
    assert done.returncode == 0, done.stderr
    assert wait_for(lambda: f"session open deployment={dep_id}" in site.log("dp"), timeout=10)
    line = next(ln for ln in site.log("dp").splitlines() if f"session open deployment={dep_id}" in ln)
    assert "rate_mbps=40" in line, line
    cli("dp", "set", site.dp, "--max-rate", "0")
    shown = json.loads(cli("dp", "show", site.dp, "--json").stdout)
    assert shown["alive"] and "max_rate_mbps" not in shown["config"]
    reg = shown["registration"]
    assert reg["port_range"] == "47200-47999" and reg["group_range"].startswith("239.255.77.1-")
    assert reg["capacity"] and reg["concurrency"] and reg["interfaces"] and reg["version"]


def test_reconciler_times_out_vanished_clients_enforces_deadlines_and_finishes(site: Site) -> None:
    st = _fresh(site, "rec1")
    ctl = ControllerSettings()
    cfg = rc.ReconcilerSettings(client_timeout_s=5, redispatch_after_s=5, close_grace_s=0)
    req = DeployRequest(image="alloc-img", collection="c", dp="rec-dp", deadline_s=60)
    targets = [Target(name="v-pc1", mac="02:00:00:00:92:01"), Target(name="v-pc2", mac="02:00:00:00:92:02")]
    dep_id, jobs, _ = st.create_deployment(IMAGE, req, ctl, {"rec-dp": targets})
    sid = jobs[0].session_id
    st.r.set(st.k.lease(sid), "rec-dp:x:1", px=60_000)  # a live sender holds it
    st.record_session_report(SessionReport(deployment=dep_id, session_id=sid, dp="rec-dp", state="transferring",
                                           joined=["v-pc1", "v-pc2"]))
    st.set_progress(dep_id, {"v-pc1": 3, "v-pc2": 3})
    now = time.time()
    assert rc.run(st, app, cfg, now=now).as_dict()["vanished"] == []
    st.set_progress(dep_id, {"v-pc1": 7, "v-pc2": 3})  # pc1 moves on, pc2 stalls
    st.r.hset(st.k.seen(dep_id), "v-pc2", f"{now - 10:.3f}")
    st.r.hset(st.k.targets(dep_id), "v-pc2", json.dumps({**st.targets(dep_id)["v-pc2"],
                                                            "transferring_at": f"{now - 10:.3f}",
                                                            "joined_at": f"{now - 10:.3f}"}))
    first = rc.run(st, app, cfg, now=now)
    assert first.vanished == [f"{dep_id}/v-pc2"]
    assert rc.run(st, app, cfg, now=now).vanished == []  # idempotent
    t = st.targets(dep_id)
    assert t["v-pc2"]["state"] == "failed" and "vanished" in t["v-pc2"]["reason"]
    assert t["v-pc1"]["state"] == "transferring" and st.get_deployment(dep_id)["state"] == "transferring"
    # Two passes at once: one runs, the other skips (the pass lock).
    st.r.set(st.k.reconcile_lock, "other", px=5000)
    assert rc.run(st, app, cfg).skipped
    st.r.delete(st.k.reconcile_lock)
    # The deadline: pc1 fails with the reason, the deployment fails, the session is told to stop.
    late = rc.run(st, app, cfg, now=now + 61)
    assert late.expired == [dep_id]
    dep = st.get_deployment(dep_id)
    assert dep["state"] == "failed" and "deadline passed" in dep["reason"]
    assert st.targets(dep_id)["v-pc1"]["state"] == "failed" and "deadline" in st.targets(dep_id)["v-pc1"]["reason"]
    assert st.list_sessions(dep_id)[0]["state"] == "failed" and not st.live_sessions() and not st.allocated()
    assert rc.run(st, app, cfg, now=now + 62).expired == []

    # Every client accounted for, but the deployment left open (a lost update): the reconciler closes it.
    dep2, _jobs2, _ = st.create_deployment(IMAGE, req, ctl, {"rec-dp": targets[:1]})
    st.r.hset(st.k.targets(dep2), "v-pc1", json.dumps({**st.targets(dep2)["v-pc1"], "state": "finished"}))
    assert dep2 in rc.run(st, app, cfg).closed
    assert st.get_deployment(dep2)["state"] == "finished"
    # An ended session whose session_closed follow-up was lost: its clients without a result fail.
    dep3, jobs3, _ = st.create_deployment(IMAGE, req, ctl, {"rec-dp": targets[:1]})
    st.record_session_report(SessionReport(deployment=dep3, session_id=jobs3[0].session_id, dp="rec-dp",
                                           state="finished"))
    rc.run(st, app, cfg)
    assert st.get_deployment(dep3)["state"] == "failed"
    assert "no result" in st.targets(dep3)["v-pc1"]["reason"]


def _dp_agent(site: Site, tmp: Path, name: str, port: int, procs: ProcessGroup, tag: str) -> None:
    env = {**site.env, "MCDEPLOY_DP_LEASE_S": "2", "MCDEPLOY_DP_KEY_FILE": str(tmp / f"{name}.key"),
           "MCDEPLOY_DP_SPOOL_DIR": str(tmp / f"{name}-spool")}
    procs.spawn(name, python_module("dpagent", "--name", name, "--control-port", str(port),
                                    "--max-rate-mbps", "40"), env,
                stdout=open(tmp / f"{name}-{tag}.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115


def test_reconciler_redispatches_a_session_after_its_dp_is_killed_and_clients_resume(site: Site,
                                                                                     tmp_path: Path) -> None:
    name, port = "dp-killed", free_udp_port()
    procs = ProcessGroup()
    try:
        site.state.r.delete(site.state.k.dp(name))
        _dp_agent(site, tmp_path, name, port, procs, "1")
        assert wait_for(lambda: site.state.get_dp(name), timeout=30)
        image = tmp_path / "kill.img"
        image.write_bytes(os.urandom(16 * 1024 * 1024))  # ~3.4 s at 40 Mbit/s
        api.add_image(site.state, str(image), name="kill-img")
        inv = Inventory(site.state)
        inv.add_client("kill-pc", "02:00:00:00:93:01", None, collection=None)
        inv.create_collection("kill-lab")
        inv.add_members("kill-lab", ["kill-pc"])
        dep_id, job, _ = api.deploy(site.state, app, DeployRequest(image="kill-img", collection="kill-lab", dp=name,
                                                                   start_timeout_s=20))
        out = tmp_path / "kill.out"
        args = ["--dp", f"127.0.0.1:{port}", "--out", str(out), "--id", "kill-pc", "--mac", "02:00:00:00:93:01",
                "--wait", "30", "--json"]
        first = subprocess.Popen(python_module("clientagent", *args, "--idle-timeout", "3"), env=site.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: int(site.state.get_deployment(dep_id)["progress"].get("kill-pc", 0)) >= 2,
                        timeout=30, interval=0.05), site.state.get_deployment(dep_id)
        procs.procs[0][1].send_signal(signal.SIGKILL)  # the DP dies mid-session
        procs.procs[0][1].wait()
        _, err1 = first.communicate(timeout=30)
        assert first.returncode != 0, err1  # its DP went silent
        # The lease lapses (2 s); the reconciler gives the session to the DP again (its queue keeps the
        # job until the agent is back), exactly once per window.
        cfg = rc.ReconcilerSettings(redispatch_after_s=30)
        assert wait_for(lambda: site.state.lease_holder(job.session_id) is None, timeout=10)
        passes = [rc.run(site.state, app, cfg), rc.run(site.state, app, cfg)]
        sid = f"{job.session_id:x}"
        assert [sid in p.redispatched for p in passes] == [True, False], [p.as_dict() for p in passes]
        assert site.state.session(job.session_id)["redispatches"] == "1"
        _dp_agent(site, tmp_path, name, port, procs, "2")  # the agent comes back (systemd restarts it)
        assert wait_for(lambda: (h := site.state.lease_holder(job.session_id)) and not h.startswith("ended"),
                        timeout=30), (tmp_path / f"{name}-2.log").read_text()[-2000:]
        again = subprocess.run(python_module("clientagent", *args), env=site.env, capture_output=True, text=True,
                               timeout=90)
        assert again.returncode == 0, again.stderr
        res = json.loads(again.stdout.strip().splitlines()[-1])
        assert res["resumed_blocks"] >= 2 and res["blocks_received"] < res["blocks"], res
        assert out.read_bytes() == image.read_bytes()
        dep = wait_for(lambda: (d := site.state.get_deployment(dep_id))["state"] == "finished" and d, timeout=20)
        assert dep, site.state.get_deployment(dep_id)
        assert wait_for(lambda: str(job.session_id) not in site.state.live_sessions(), timeout=20)
        assert site.state.session(job.session_id)["state"] == "finished"
    finally:
        procs.stop()


def test_status_watch_once_draws_bars_per_deployment_and_client(site: Site, cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "w.img"
    image.write_bytes(os.urandom(1024 * 1024))
    api.add_image(site.state, str(image), name="watch-img")
    inv = Inventory(site.state)
    inv.add_client("w-pc1", "02:00:00:00:94:01", None)
    inv.add_client("w-pc2", "02:00:00:00:94:02", None)
    inv.create_collection("w-lab")
    inv.add_members("w-lab", ["w-pc1", "w-pc2"])
    dep_id, _, _ = api.deploy(site.state, app, DeployRequest(image="watch-img", collection="w-lab", dp=site.dp,
                                                             start_timeout_s=2))
    done = site.client("--out", str(tmp_path / "w1"), "--id", "w-pc1", "--mac", "02:00:00:00:94:01", "--wait", "20",
                       timeout=60)
    assert done.returncode == 0, done.stderr
    assert wait_for(lambda: site.state.get_deployment(dep_id)["state"] == "failed", timeout=20)
    out = cli("status", dep_id, "--watch", "--once")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert dep_id in text and "1/2 done, 1 failed" in text and "━" in text
    assert "w-pc1" in text and "finished" in text and "w-pc2" in text and "no result" in text
    assert "session" in text and site.dp in text
    # Without --once the watch ends by itself once its deployments ended (bounded refresh).
    t0 = time.monotonic()
    assert cli("status", dep_id, "--watch", "--interval", "0.2").returncode == 0
    assert time.monotonic() - t0 < 5
    bad = cli("status", dep_id, "--watch", "--interval", "0.01")
    assert bad.returncode == 2 and "--interval" in bad.stderr
