"""Bad input gets a clear error and loses nothing: datagrams, task bodies, operator mistakes, lost clients."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import msgpack
import pytest

from controller import api
from mcproto import codec
from mcproto.errors import MessageError
from mcproto.messages import DeployRequest, Join, Status
from mcsite.celeryapp import app
from mcsite.procs import python_module
from tests.conftest import Site, free_udp_port, wait_for

pytestmark = pytest.mark.integration


def _bad_datagrams() -> list[bytes]:
    good = codec.encode(Join(client_id="x"))
    return [
        b"",
        b"\x00" * 10,
        os.urandom(200),
        good[:-4],  # truncated
        b"\xc1" * 50,  # msgpack "never used" byte
        msgpack.packb({"type": "join", "version": 99, "client_id": "x"}),  # wrong version
        msgpack.packb({"type": "nope", "version": 1}),  # unknown type
        msgpack.packb({"type": "join", "version": 1, "client_id": "x", "evil": True}),  # unknown field
        msgpack.packb({"type": "offer", "version": 1}),  # a DP->client type sent to the DP
        msgpack.packb([1, 2, 3]),
        b"\x81" + b"\xa1a" * 3000,  # oversized (> 1,400 bytes)
        codec.encode(Status(session_id=12345, client_id="ghost", blocks_done=0)),  # unknown session
    ]


def test_garbage_to_control_port_is_dropped_counted_logged_once_and_session_unharmed(
        site: Site, tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(os.urandom(6 * 1024 * 1024))
    api.add_image(site.state, str(image), name="bad-input-img")
    dep_id, _, _ = api.deploy(site.state, app, DeployRequest(image="bad-input-img", dp=site.dp, clients=1))
    client = site.spawn_client("--out", str(tmp_path / "out"), "--id", "victim", "--test-loss", "3", "--wait", "30")
    bad = _bad_datagrams()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(40):  # bounded flood, during the transfer
            for d in bad:
                s.sendto(d, ("127.0.0.1", site.control_port))
            time.sleep(0.005)
    _, err = client.communicate(timeout=120)
    assert client.returncode == 0, err
    assert (tmp_path / "out").read_bytes() == image.read_bytes()
    sent = 40 * len(bad)
    dp = wait_for(lambda: (info := site.state.get_dp(site.dp)) and int(info["bad_datagrams"]) >= sent and info,
                  timeout=10)
    assert dp and int(dp["bad_datagrams"]) >= sent
    # Logged once per source per interval, not once per datagram.
    assert 1 <= site.log("dp").count("dropped datagram from 127.0.0.1") <= 2
    assert wait_for(lambda: site.state.get_deployment(dep_id)["state"] == "finished")


def _state_keys(site: Site) -> set[bytes]:
    """The site's records, without DP liveness keys (they expire and reappear with heartbeats)."""
    return {k for k in site.state.r.keys(b"mcd:*") if not k.startswith(b"mcd:dp:")}


def test_malformed_task_body_is_rejected_and_nothing_is_written(site: Site) -> None:
    before = _state_keys(site)
    bodies = [
        {"garbage": 1},
        {"type": "client_result", "version": 1, "deployment": "d-1"},  # missing fields
        {"type": "client_result", "version": 1, "deployment": "d-1", "session_id": 1, "dp": "x",
         "client_id": "c", "outcome": "exploded"},  # bad enum
        ["not", "a", "map"],
    ]
    for body in bodies:
        res = app.send_task("controller.client_result", kwargs={"body": body})
        exc = res.get(timeout=30, propagate=False)
        assert res.state == "FAILURE"
        assert isinstance(exc, Exception) and "MessageError" in type(exc).__name__, exc
    res = app.send_task("dp.open_session", kwargs={"body": {"dp": site.dp, "junk": 1}})
    exc = res.get(timeout=30, propagate=False)
    assert res.state == "FAILURE" and "MessageError" in type(exc).__name__
    assert "invalid" in str(exc) or "unknown message type" in str(exc)
    assert _state_keys(site) == before
    # The workers survived: a valid trigger still works.
    assert site.state.get_dp(site.dp) is not None


def test_routing_a_dp_task_without_a_dp_is_refused_at_publish() -> None:
    with pytest.raises(MessageError, match="no 'dp'"):
        app.send_task("dp.open_session", kwargs={"body": {"junk": 1}})


@pytest.fixture(scope="module")
def known_image(site: Site, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("known") / "known.img"
    path.write_bytes(b"known image" * 1000)
    return api.add_image(site.state, str(path), name="known-img")["name"]


@pytest.mark.parametrize("args, needle", [
    (["deploy", "no-such-image", "--dp", "PLACEHOLDER"], "unknown image 'no-such-image'"),
    (["deploy", "known-img", "--dp", "no-such-dp"], "unknown DP 'no-such-dp'"),
    (["image", "add", "/no/such/file"], "no such file"),
    (["status", "d-nope"], "unknown deployment 'd-nope'"),
])
def test_operator_mistakes_give_one_clear_line_and_nonzero_exit(site: Site, known_image: str, args: list[str],
                                                                needle: str) -> None:
    args = [site.dp if a == "PLACEHOLDER" else a for a in args]
    before = len(site.state.list_deployments(1000))
    proc = site.mcdeploy(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(site.state.list_deployments(1000)) == before


def test_no_redis_configured_says_how_to_get_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCDEPLOY_")}
    env["MCDEPLOY_SITE_FILE"] = str(tmp_path / "none.json")
    proc = subprocess.run(python_module("controller", "image", "list"), env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert "no Redis configured" in proc.stderr and "mcdeploy up" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_client_pointed_at_dp_without_session_exits_clearly_without_hanging(site: Site, tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = site.client("--out", str(tmp_path / "x"), "--id", "lonely", "--deployment", "d-nothing", "--wait", "2",
                       timeout=30)
    assert proc.returncode == 3
    assert "no session" in proc.stderr
    assert time.monotonic() - t0 < 15
    assert not (tmp_path / "x").exists()  # nothing written for a session that never was


def test_client_pointed_at_nothing_exits_clearly(tmp_path: Path) -> None:
    port = free_udp_port()
    t0 = time.monotonic()
    proc = subprocess.run(python_module("clientagent", "--dp", f"127.0.0.1:{port}", "--out", str(tmp_path / "x"),
                                        "--wait", "1.5"), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3
    assert "did not answer" in proc.stderr
    assert time.monotonic() - t0 < 15


def test_client_usage_errors(tmp_path: Path) -> None:
    proc = subprocess.run(python_module("clientagent", "--dp", "nonsense:99999", "--out", str(tmp_path / "x")),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr
