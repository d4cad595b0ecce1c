"""Clients, collections, boundary groups and collection deployments on real parts.

Real Redis, a real controller worker and DP agent (the ``site`` fixture), real
client agents on loopback multicast.  Clients on one host share a MAC, so each
client agent is given its identity with --mac / --smbios-uuid.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import pytest

from controller import api, deployments
from controller.inventory import Inventory
from mcproto.errors import ConfigError
from tests.conftest import Site, wait_for

pytestmark = pytest.mark.integration

UUID_A = "4c4c4544-0042-3510-8052-b4c04f4e4b31"


def _ok(proc) -> str:  # type: ignore[no-untyped-def]
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _fails(proc, *words: str) -> str:  # type: ignore[no-untyped-def]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("mcdeploy: error:"), line
    for w in words:
        assert w in line, line
    return line


def _image(site: Site, tmp_path: Path, name: str, size: int = 3 * 1024 * 1024 + 321) -> Path:
    path = tmp_path / f"{name}.img"
    path.write_bytes(os.urandom(size))
    api.add_image(site.state, str(path), name=name)
    return path


def _deployments(site: Site) -> int:
    return len(site.state.list_deployments(10_000))


def test_csv_import_reports_bad_rows_by_line_and_imports_nothing(site: Site, cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("name,mac,uuid,collection\n"
                   "csv-ok,02:00:00:00:10:01,,csv-lab\n"
                   "csv-badmac,zz:00:00:00:10:02,,csv-lab\n"
                   "csv-short,02:00:00:00:10:03\n"
                   "csv-dupmac,02:00:00:00:10:01,,csv-lab\n"
                   "csv-none,,,csv-lab\n")
    line = _fails(site.mcdeploy("client", "import", str(bad)), "4 bad row(s), nothing imported", "line 3",
                  "not a MAC address", "line 4", "line 5", "also on csv-ok", "line 6")
    assert "line 2" not in line
    _fails(cli("client", "show", "csv-ok"), "unknown client 'csv-ok'")  # nothing half-imported
    _fails(cli("collection", "show", "csv-lab"), "unknown collection")

    good = tmp_path / "good.csv"
    good.write_text("name,mac,uuid,collection\n"
                    "csv-ok,02-00-00-00-10-01,,csv-lab\n"
                    f"csv-uuid,,{UUID_A.upper()},csv-lab\n"
                    "csv-both,0200.0000.1004,{0c8f2a52-7ad0-4a2e-9f46-2b8f1e3c0a11},\n")
    assert "3 new" in _ok(cli("client", "import", str(good)))
    assert "0 new" in _ok(cli("client", "import", str(good)))  # idempotent
    shown = json.loads(_ok(cli("collection", "show", "csv-lab", "--json")))
    assert [c["name"] for c in shown["clients"]] == ["csv-ok", "csv-uuid"]
    rec = json.loads(_ok(cli("client", "show", "csv-both")))
    assert rec["mac"] == "02:00:00:00:10:04" and rec["smbios_uuid"] == "0c8f2a52-7ad0-4a2e-9f46-2b8f1e3c0a11"
    assert json.loads(_ok(cli("client", "show", "csv-uuid")))["smbios_uuid"] == UUID_A

    # An identity already owned by another client: the whole file is refused, with the line.
    clash = tmp_path / "clash.csv"
    clash.write_text("csv-new1,02:00:00:00:10:09,,\ncsv-new2,02:00:00:00:10:01,,\n")
    _fails(cli("client", "import", str(clash)), "line 2", "already belongs to client csv-ok",
           "nothing imported")
    _fails(cli("client", "show", "csv-new1"), "unknown client")

    # collection import, add/remove members, delete; client add/remove.
    into = tmp_path / "into.csv"
    into.write_text("csv-into,02:00:00:00:10:0a,,\n")
    _ok(cli("collection", "import", "csv-other", str(into)))
    assert json.loads(_ok(cli("client", "show", "csv-into")))["collections"] == ["csv-other"]
    _ok(cli("collection", "add", "csv-other", "csv-both"))
    _fails(cli("collection", "add", "csv-other", "csv-ghost"), "unknown client(s) csv-ghost")
    _ok(cli("collection", "remove", "csv-other", "csv-into"))
    assert [c["name"] for c in json.loads(_ok(cli("collection", "show", "csv-other", "--json")))[
        "clients"]] == ["csv-both"]
    _ok(cli("client", "add", "csv-added", "--mac", "02:00:00:00:10:0b", "--collection", "csv-other"))
    _fails(cli("client", "add", "csv-added", "--mac", "02:00:00:00:10:0c"), "already exists")
    _fails(cli("client", "add", "csv-nothing"), "give a MAC address or an SMBIOS UUID")
    _ok(cli("client", "remove", "csv-added"))
    assert "csv-added" not in _ok(cli("collection", "show", "csv-other"))
    _ok(cli("collection", "delete", "csv-other"))
    assert json.loads(_ok(cli("client", "show", "csv-both")))["collections"] == []
    names = {c["name"] for c in json.loads(_ok(cli("client", "list", "--json")))}
    assert {"csv-ok", "csv-uuid", "csv-both", "csv-into"} <= names and "csv-added" not in names


def test_boundaries_refuse_overlaps_map_ipv4_and_ipv6_with_fallback(site: Site, cli) -> None:  # type: ignore[no-untyped-def]
    _ok(cli("boundary", "add", "b-east", "--subnet", "10.77.0.0/16", "--subnet", "2001:db8:77::/48",
                      "--dp", site.dp))
    _ok(cli("boundary", "add", "b-east", "--subnet", "10.77.0.0/16,2001:db8:77::/48", "--dp", site.dp))
    _fails(cli("boundary", "add", "b-west", "--subnet", "10.77.128.0/17", "--dp", site.dp),
           "10.77.128.0/17 overlaps 10.77.0.0/16 of boundary b-east")
    _fails(cli("boundary", "add", "b-v6", "--subnet", "2001:db8::/32", "--dp", site.dp),
           "overlaps 2001:db8:77::/48")
    _fails(cli("boundary", "add", "b-x", "--subnet", "10.78.0.0/16", "--dp", "no-such-dp"),
           "unknown DP(s) no-such-dp")
    _fails(cli("boundary", "add", "b-x", "--subnet", "10.78.0.1/16", "--dp", site.dp), "host bits set")
    assert {b["name"] for b in json.loads(_ok(cli("boundary", "list", "--json")))} >= {"b-east"}
    assert "b-west" not in _ok(cli("boundary", "list"))

    # Fallback order: the first DP of the group that is alive.  "ghost" registered once and died.
    site.state.register_dp("b-ghost", {"control": "127.0.0.1:1"}, ttl=0.05)
    time.sleep(0.2)
    _ok(cli("boundary", "add", "b-south", "--subnet", "10.79.0.0/16", "--subnet", "fd00:79::/64",
                      "--dp", f"b-ghost,{site.dp}"))
    inv = Inventory(site.state)
    inv.add_client("b-pc4", "02:00:00:00:20:01", None, "10.79.3.4")
    inv.add_client("b-pc6", "02:00:00:00:20:02", None, "fd00:79::1234")
    inv.add_client("b-east6", "02:00:00:00:20:03", None, "2001:db8:77:1::5")
    inv.add_client("b-nowhere", "02:00:00:00:20:04", None)
    recs = [inv.get_client(n) for n in ("b-pc4", "b-pc6", "b-east6")]
    placed = deployments.plan(site.state, recs, None)
    assert {dp: sorted(t.name for t in ts) for dp, ts in placed.items()} == {site.dp: ["b-east6", "b-pc4", "b-pc6"]}
    with pytest.raises(ConfigError, match=r"no DP for client.*b-nowhere.*--dp"):
        deployments.plan(site.state, [inv.get_client("b-nowhere")], None)
    assert [t.name for t in deployments.plan(site.state, [inv.get_client("b-nowhere")], site.dp)[site.dp]] == [
        "b-nowhere"]
    for name in ("b-east", "b-south"):
        _ok(cli("boundary", "remove", name))
    _fails(cli("boundary", "remove", "b-east"), "unknown boundary")


def test_collection_deployment_serves_only_its_clients_with_states_timings_and_reports(site: Site, cli,
                                                                                     tmp_path: Path) -> None:
    image = _image(site, tmp_path, "coll-img")
    inv = Inventory(site.state)
    inv.add_client("lab-pc1", "02:00:00:00:30:01", None, collection=None)
    inv.add_client("lab-pc2", None, "6f1e8f5c-0a3b-4d2e-8c1a-3b2c1d0e9f88")
    inv.create_collection("lab-a")
    inv.add_members("lab-a", ["lab-pc1", "lab-pc2"])
    out = _ok(site.mcdeploy("deploy", "create", "coll-img", "--collection", "lab-a", "--dp", site.dp,
                            "--start-timeout", "20", "--deadline", "10m"))
    dep_id = out.strip().splitlines()[-1]
    assert "2 client(s) in 1 session(s)" in out
    # A machine the deployment does not target is told so and waits; it never gets the offer.
    intruder = site.spawn_client("--out", str(tmp_path / "intruder"), "--id", "intruder", "--mac",
                                 "02:00:00:00:30:99", "--wait", "4", "--json")
    # Targeted machines join under their own agent ids: matched by MAC, and by SMBIOS UUID.
    by_mac = site.spawn_client("--out", str(tmp_path / "pc1"), "--id", "agent-1", "--mac", "02-00-00-00-30-01",
                               "--json", "--wait", "30")
    by_uuid = site.spawn_client("--out", str(tmp_path / "pc2"), "--id", "agent-2", "--mac", "02:00:00:00:30:77",
                                "--smbios-uuid", "6F1E8F5C-0A3B-4D2E-8C1A-3B2C1D0E9F88", "--json", "--wait", "30")
    for p in (by_mac, by_uuid):
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
        assert json.loads(stdout.strip().splitlines()[-1])["deployment"] == dep_id
    stdout, stderr = intruder.communicate(timeout=60)
    assert intruder.returncode == 3, stderr
    assert "not targeted by any deployment on this DP" in stderr
    original = image.read_bytes()
    assert (tmp_path / "pc1").read_bytes() == original and (tmp_path / "pc2").read_bytes() == original
    assert not (tmp_path / "intruder").exists() or (tmp_path / "intruder").stat().st_size == 0

    dep = wait_for(lambda: (d := site.state.get_deployment(dep_id))["state"] == "finished" and d, timeout=20)
    assert dep, site.state.get_deployment(dep_id)
    assert set(dep["clients"]) == {"lab-pc1", "lab-pc2"}  # results under the site's names
    rep = deployments.report(site.state, dep_id)
    d = rep["deployment"]
    assert d["kind"] == "collection" and d["expected"] == 2 and d["clients_done"] == 2 and d["deadline_s"] == "600"
    t = d["timings"]
    assert t["created"] <= t["staging"] <= t["waiting"] <= t["transferring"] <= t["finished"]
    assert [s["state"] for s in rep["sessions"]] == ["finished"]
    for row in rep["clients"]:
        assert row["state"] == "finished" and row["dp"] == site.dp and row["attempt"] == 1
        assert row["created_at"] <= row["staging_at"] <= row["waiting_at"] <= row["transferring_at"] <= row[
            "ended_at"]
        assert row["joined_at"] is not None and row["address"] == "127.0.0.1" and row["bytes"] == len(original)
    assert inv.get_client("lab-pc1")["address"] == "127.0.0.1"  # last-known address learnt from the result

    csv_out = _ok(site.mcdeploy("deploy", "report", dep_id, "--format", "csv"))
    rows = list(csv.DictReader(io.StringIO(csv_out)))
    assert [(r["client"], r["state"]) for r in rows] == [("lab-pc1", "finished"), ("lab-pc2", "finished")]
    assert rows[0]["mac"] == "02:00:00:00:30:01" and rows[0]["transferring_at"].startswith("20")
    js = json.loads(_ok(cli("deploy", "report", dep_id, "--format", "json")))
    assert js["deployment"]["state"] == "finished" and len(js["clients"]) == 2
    shown = _ok(cli("deploy", "show", dep_id))
    assert "finished" in shown and "lab-pc2" in shown
    assert dep_id in {x["id"] for x in json.loads(_ok(cli("deploy", "list", "--json")))}


def test_a_client_that_never_came_fails_and_retry_gives_it_a_new_session(site: Site, cli, tmp_path: Path) -> None:
    image = _image(site, tmp_path, "retry-img")
    inv = Inventory(site.state)
    inv.add_client("rt-pc1", "02:00:00:00:40:01", None)
    inv.add_client("rt-pc2", "02:00:00:00:40:02", None)
    inv.create_collection("lab-retry")
    inv.add_members("lab-retry", ["rt-pc1", "rt-pc2"])
    dep_id = _ok(cli("deploy", "retry-img", "--collection", "lab-retry", "--dp",
                               site.dp, "--start-timeout", "2")).strip().splitlines()[-1]
    one = site.client("--out", str(tmp_path / "r1"), "--id", "rt-pc1", "--mac", "02:00:00:00:40:01", "--wait", "20",
                      timeout=60)
    assert one.returncode == 0, one.stderr
    dep = wait_for(lambda: (d := site.state.get_deployment(dep_id))["state"] == "failed" and d, timeout=20)
    assert dep, site.state.get_deployment(dep_id)
    assert "1 of 2 client(s) failed" in dep["reason"]
    targets = site.state.targets(dep_id)
    assert targets["rt-pc1"]["state"] == "finished"
    assert targets["rt-pc2"]["state"] == "failed" and "no result" in targets["rt-pc2"]["reason"]
    _fails(cli("deploy", "cancel", dep_id), "already failed")

    out = _ok(cli("deploy", "retry", dep_id))
    assert "retrying 1 client(s) (rt-pc2)" in out and "attempt 2" in out
    _fails(cli("deploy", "retry", dep_id), "is still", "retry once it has ended")
    two = site.client("--out", str(tmp_path / "r2"), "--id", "rt-pc2", "--mac", "02:00:00:00:40:02", "--wait", "20",
                      timeout=60)
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "r2").read_bytes() == image.read_bytes()
    dep = wait_for(lambda: (d := site.state.get_deployment(dep_id))["state"] == "finished" and d, timeout=20)
    assert dep, site.state.get_deployment(dep_id)
    rep = deployments.report(site.state, dep_id)
    assert rep["deployment"]["attempt"] == 2 and rep["deployment"]["clients_failed"] == 0
    row = next(r for r in rep["clients"] if r["client"] == "rt-pc2")
    assert row["attempt"] == 2 and row["state"] == "finished"
    assert [h["state"] for h in row["history"]] == ["failed"]
    assert [s["attempt"] for s in rep["sessions"]] == ["1", "2"]
    _fails(cli("deploy", "retry", dep_id), "nothing to retry")


def test_cancel_tells_the_dp_to_abort_and_marks_clients_cancelled(site: Site, cli, tmp_path: Path) -> None:
    _image(site, tmp_path, "cancel-img")
    inv = Inventory(site.state)
    inv.add_client("cx-pc1", "02:00:00:00:50:01", None)
    inv.add_client("cx-pc2", "02:00:00:00:50:02", None)
    inv.create_collection("lab-cancel")
    inv.add_members("lab-cancel", ["cx-pc1", "cx-pc2"])
    dep_id = _ok(cli("deploy", "cancel-img", "--collection", "lab-cancel", "--dp", site.dp,
                               "--start-timeout", "120")).strip().splitlines()[-1]
    waiting = site.spawn_client("--out", str(tmp_path / "c1"), "--id", "cx-pc1", "--mac", "02:00:00:00:50:01",
                                "--wait", "30", "--idle-timeout", "10")
    assert wait_for(lambda: site.state.targets(dep_id)["cx-pc1"].get("joined_at"), timeout=20), \
        site.state.targets(dep_id)
    assert "1 session(s) told to stop" in _ok(cli("deploy", "cancel", dep_id))
    assert "already cancelled" in _ok(cli("deploy", "cancel", dep_id))
    _, stderr = waiting.communicate(timeout=60)
    assert waiting.returncode == 4 and "the session ended before the image was complete" in stderr, stderr
    dep = site.state.get_deployment(dep_id)
    assert dep["state"] == "cancelled" and dep.get("cancelled_at")
    assert {n: t["state"] for n, t in site.state.targets(dep_id).items()} == {"cx-pc1": "cancelled",
                                                                              "cx-pc2": "cancelled"}
    assert [s["state"] for s in site.state.list_sessions(dep_id)] == ["cancelled"]
    assert wait_for(lambda: "cancelled by the operator" in site.log("dp"), timeout=10)
    late = site.client("--out", str(tmp_path / "c2"), "--id", "cx-pc2", "--mac", "02:00:00:00:50:02",
                       "--deployment", dep_id, "--wait", "3", timeout=30)
    assert late.returncode == 3, late.stderr
    rows = list(csv.DictReader(io.StringIO(_ok(cli("deploy", "report", dep_id)))))
    assert {r["state"] for r in rows} == {"cancelled"} and rows[0]["ended_at"]


def test_bad_deployments_are_refused_with_one_line_and_nothing_created(site: Site, cli, tmp_path: Path) -> None:
    _image(site, tmp_path, "bad-img", size=64 * 1024)
    inv = Inventory(site.state)
    inv.create_collection("bad-empty")
    inv.add_client("bad-pc", "02:00:00:00:60:01", None, collection=None)
    inv.create_collection("bad-homeless")
    inv.add_members("bad-homeless", ["bad-pc"])
    before = _deployments(site)
    _fails(cli("deploy", "create", "no-such-img", "--collection", "bad-empty"), "unknown image 'no-such-img'")
    _fails(cli("deploy", "create", "bad-img", "--collection", "no-such-coll"),
           "unknown collection 'no-such-coll'")
    _fails(cli("deploy", "create", "bad-img", "--collection", "bad-empty", "--dp", site.dp),
           "collection bad-empty is empty")
    _fails(cli("deploy", "create", "bad-img", "--collection", "bad-homeless"), "no DP for client(s) bad-pc")
    _fails(cli("deploy", "bad-img", "--collection", "bad-homeless", "--dp", "no-such-dp"),
           "unknown DP 'no-such-dp'")
    _fails(cli("deploy", "bad-img"), "give --collection")
    _fails(cli("deploy", "show", "d-nope"), "unknown deployment 'd-nope'")
    _fails(cli("deploy", "retry", "d-nope"), "unknown deployment")
    assert _deployments(site) == before
