"""Client discovery answers (offer / wait with an expected start / nothing for you) and the unicast fallback.

Real processes on the test's Redis: a controller worker, a DP agent (with its HTTP image server on a
free port), client agents; plus the DP's image server in-process for the HTTP edge cases.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from clientagent import unicast
from controller import api
from dpagent.imageserver import ImageServer, served_for
from mcproto.messages import DeployRequest
from mcsite.celeryapp import app
from mcsite.embedded_redis import EmbeddedRedis
from tests.conftest import Site, start_site, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def site(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The usual site, with small FEC blocks (16 symbols): a throttled client completes some blocks by
    multicast before it is dropped, so the HTTP fetch has something not to fetch."""
    saved = os.environ.get("MCDEPLOY_DP_BLOCK_SYMBOLS")
    os.environ["MCDEPLOY_DP_BLOCK_SYMBOLS"] = "16"
    try:
        s = start_site(redis_server, tmp_path_factory.mktemp("site"), "dp-unicast")
    finally:
        if saved is None:
            os.environ.pop("MCDEPLOY_DP_BLOCK_SYMBOLS", None)
        else:
            os.environ["MCDEPLOY_DP_BLOCK_SYMBOLS"] = saved
    try:
        yield s
    finally:
        s.procs.stop()


def _json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _image(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def test_dropped_client_fetches_only_what_it_lacks_over_http(site: Site, tmp_path: Path) -> None:
    image = _image(tmp_path, "drop.img", 12 * 1024 * 1024 + 4321)
    api.add_image(site.state, str(image), name="uni-drop")
    dep_id, _, _ = api.deploy(site.state, app, DeployRequest(
        image="uni-drop", dp=site.dp, clients=2, max_rate_mbps=160, slow_policy="drop", drop_below_mbps=80,
        slow_grace_s=0.5, unicast_fallback=True))
    fast = site.spawn_client("--out", str(tmp_path / "fast.img"), "--id", "uni-fast", "--json", "--wait", "30",
                             "--deployment", dep_id)
    slow = site.spawn_client("--out", str(tmp_path / "slow.img"), "--id", "uni-slow", "--json", "--wait", "30",
                             "--deployment", dep_id, "--test-impair", "cap=20")
    fout, ferr = fast.communicate(timeout=60)
    sout, serr = slow.communicate(timeout=60)
    assert fast.returncode == 0, ferr
    assert slow.returncode == 0, serr
    f, s = _json(fout), _json(sout)
    assert f["path"] == "multicast" and "unicast_bytes" not in f
    assert s["verified"] and s["acknowledged"] and s["path"] == "mixed", s
    assert "dropped by the DP" in s["unicast_reason"]
    # Only what it lacked crossed HTTP: the blocks multicast had not delivered, byte for byte.
    assert 0 < s["lacked_bytes"] < image.stat().st_size
    assert s["unicast_bytes"] == s["lacked_bytes"]
    assert s["blocks_received"] + s["lacked_blocks"] == s["blocks"]
    assert s["unicast_blocks"] == s["lacked_blocks"]
    assert "unicast fallback (dropped by the DP" in serr
    original = image.read_bytes()
    assert (tmp_path / "slow.img").read_bytes() == original
    assert (tmp_path / "fast.img").read_bytes() == original
    dep = wait_for(lambda: (d := site.state.get_deployment(dep_id))["state"] == "finished" and d)
    assert dep, site.state.get_deployment(dep_id)
    assert {c: (r["outcome"], r.get("path")) for c, r in dep["clients"].items()} == {
        "uni-fast": ("done", "multicast"), "uni-slow": ("done", "mixed")}
    assert dep["clients"]["uni-slow"]["sha256"] == hashlib.sha256(original).hexdigest()
    report = site.mcdeploy("deploy", "report", dep_id, "--format", "csv")
    assert report.returncode == 0, report.stderr
    rows = report.stdout.strip().splitlines()
    assert rows[0].endswith(",address,path")
    assert {r.split(",")[0]: r.split(",")[-1] for r in rows[1:]} == {"uni-fast": "multicast", "uni-slow": "mixed"}
    print(f"\nunicast: dropped client fetched {s['unicast_bytes']} of {image.stat().st_size} bytes "
          f"({s['unicast_mb_per_s']} MB/s)")


def test_forced_unicast_from_the_start_then_nothing_for_you(site: Site, tmp_path: Path) -> None:
    image = _image(tmp_path, "forced.img", 6 * 1024 * 1024 + 99)
    api.add_image(site.state, str(image), name="uni-forced")
    dep_id, _, _ = api.deploy(site.state, app, DeployRequest(
        image="uni-forced", dp=site.dp, clients=1, unicast_fallback=True))
    out = site.client("--out", str(tmp_path / "forced-out.img"), "--id", "uni-forced", "--json", "--wait", "30",
                      "--deployment", dep_id, "--unicast", timeout=60)
    assert out.returncode == 0, out.stderr
    res = _json(out.stdout)
    assert res["path"] == "unicast" and res["packets"] == 0 and res["blocks_received"] == 0
    assert res["unicast_bytes"] == res["lacked_bytes"] == image.stat().st_size
    assert res["encrypted"] and res["manifest"] == "unverified"  # sealed session: HTTP body sealed too
    assert (tmp_path / "forced-out.img").read_bytes() == image.read_bytes()
    assert "delivered by unicast" in out.stderr
    dep = wait_for(lambda: (d := site.state.get_deployment(dep_id))["state"] == "finished" and d)
    assert dep and dep["clients"]["uni-forced"]["path"] == "unicast", site.state.get_deployment(dep_id)
    # Asking again for the same deployment: "nothing for you", at once, exit 3 with the reason.
    began = time.monotonic()
    again = site.client("--out", str(tmp_path / "again.img"), "--id", "uni-forced", "--wait", "30",
                        "--deployment", dep_id, timeout=60)
    assert again.returncode == 3, again.stderr
    assert time.monotonic() - began < 10
    assert f"nothing for you: deployment {dep_id} already delivered its image to uni-forced" in again.stderr


def test_forced_unicast_refused_when_the_deployment_is_multicast_only(site: Site, tmp_path: Path) -> None:
    image = _image(tmp_path, "mconly.img", 1024 * 1024)
    api.add_image(site.state, str(image), name="uni-mconly")
    dep_id, _, _ = api.deploy(site.state, app, DeployRequest(image="uni-mconly", dp=site.dp, clients=1,
                                                             start_timeout_s=2.0))
    out = site.client("--out", str(tmp_path / "x.img"), "--id", "uni-mconly", "--wait", "20", "--deployment",
                      dep_id, "--unicast", timeout=60)
    assert out.returncode == 4, out.stderr
    assert "does not allow unicast fallback" in out.stderr


def test_real_dp_refuses_fetches_without_the_offer_token(site: Site, tmp_path: Path) -> None:
    image = _image(tmp_path, "tok.img", 2 * 1024 * 1024)
    api.add_image(site.state, str(image), name="uni-token")
    dep_id, job, _ = api.deploy(site.state, app, DeployRequest(
        image="uni-token", dp=site.dp, clients=2, unicast_fallback=True, start_timeout_s=2.0))
    base = wait_for(lambda: (site.state.get_dp(site.dp) or {}).get("unicast_http"))
    assert base and base.startswith("http://127.0.0.1:"), site.state.get_dp(site.dp)
    url = urllib.parse.urlsplit(f"{base}/sessions/{job.session_id}/image")

    def get(headers: dict[str, str]) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        try:
            conn.request("GET", url.path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def session_open() -> bool:
        return get({"Range": "bytes=0-9"})[0] == 403  # 404 until the DP has the session

    assert wait_for(session_open, timeout=20)
    for headers in ({}, {unicast.CLIENT_HEADER: "stranger", unicast.TOKEN_HEADER: "0" * 32},
                    {unicast.CLIENT_HEADER: "stranger", unicast.TOKEN_HEADER: "not hex"}):
        status, body = get({**headers, "Range": "bytes=0-1048575"})
        assert status == 403, (headers, status)
        assert b"forbidden" in body and len(body) < 200
    assert "unicast: refused GET" in site.log("dp")
    site.mcdeploy("deploy", "cancel", dep_id)


def test_waiting_message_names_the_expected_start_once(site: Site, tmp_path: Path) -> None:
    image = _image(tmp_path, "later.img", 1024 * 1024)
    api.add_image(site.state, str(image), name="uni-later")
    start_at = time.time() + 90
    dep_id, _, _ = api.deploy(site.state, app, DeployRequest(
        image="uni-later", dp=site.dp, clients=2, start_at=start_at, start_timeout_s=600))
    try:
        began = time.monotonic()
        out = site.client("--out", str(tmp_path / "later.img"), "--id", "uni-early", "--deployment", dep_id,
                          "--wait", "8", timeout=60)
        assert out.returncode == 3, out.stderr
        assert time.monotonic() - began < 20
        waits = [line for line in out.stderr.splitlines() if "waiting:" in line]
        assert len(waits) == 1, out.stderr  # once per change, not once per retry
        assert f"waiting: deployment {dep_id} on DP {site.dp} has not started, 1 of 2 clients ready" in waits[0]
        m = re.search(r"expected start (\d\d:\d\d:\d\d) \(in (\d+) s\)", waits[0])
        assert m, waits[0]
        assert m.group(1) == time.strftime("%H:%M:%S", time.localtime(start_at))
        assert 60 <= int(m.group(2)) <= 90
        assert "no session after waiting 8 s" in out.stderr and "expected start" in out.stderr.splitlines()[-1]
    finally:
        site.mcdeploy("deploy", "cancel", dep_id)


# --------------------------------------------------------------------------- the HTTP server in-process


@pytest.fixture
def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    size = 3 * 1024 * 1024 + 1000  # a last partial block
    path = _image(tmp_path, "served.img", size)
    server = ImageServer("127.0.0.1", 0).start()
    secret = os.urandom(32)
    server.add(served_for(77, str(path), size, None, lambda c: c == "pc1", secret))
    try:
        yield server, path, unicast.token(secret, 77, "pc1")
    finally:
        server.stop()


def _get(server: ImageServer, path: str, headers: dict[str, str], method: str = "GET"
         ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.address[1], timeout=10)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_http_ranges_tokens_and_edges(served) -> None:  # type: ignore[no-untyped-def]
    server, path, tok = served
    data = path.read_bytes()
    size = len(data)
    auth = {unicast.CLIENT_HEADER: "pc1", unicast.TOKEN_HEADER: tok}
    url = "/sessions/77/image"
    assert _get(server, url, {"Range": "bytes=0-9"})[0] == 403
    assert _get(server, url, {unicast.CLIENT_HEADER: "pc2", unicast.TOKEN_HEADER: tok})[0] == 403  # another's token
    assert _get(server, url, {**auth, unicast.TOKEN_HEADER: tok[:-1] + ("1" if tok[-1] == "0" else "0")})[0] == 403
    assert _get(server, "/sessions/78/image", auth)[0] == 404
    assert _get(server, "/etc/passwd", auth)[0] == 404
    status, headers, body = _get(server, url, {**auth, "Range": "bytes=10-19"})
    assert status == 206 and body == data[10:20] and headers["Content-Range"] == f"bytes 10-19/{size}"
    status, headers, body = _get(server, url, {**auth, "Range": f"bytes={size - 1000}-"})  # the last partial block
    assert status == 206 and body == data[-1000:]
    status, _, body = _get(server, url, {**auth, "Range": f"bytes={size - 5}-{size + 100}"})  # end clipped
    assert status == 206 and body == data[-5:]
    status, _, body = _get(server, url, {**auth, "Range": "bytes=-7"})
    assert status == 206 and body == data[-7:]
    status, _, body = _get(server, url, auth)
    assert status == 200 and body == data
    for bad in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=20-10", "bytes=-0", "bytes=0-1,5-9",
                "items=0-9", "bytes=-"):
        status, headers, _ = _get(server, url, {**auth, "Range": bad})
        assert status == 416, bad
        assert headers["Content-Range"] == f"bytes */{size}"
    status, headers, body = _get(server, url, {**auth, "Range": "bytes=0-99"}, method="HEAD")
    assert status == 206 and body == b"" and headers["Content-Length"] == "100"


def test_fetcher_reads_block_runs_including_the_last_partial_block(served) -> None:  # type: ignore[no-untyped-def]
    server, path, tok = served
    data = path.read_bytes()
    block = 256 * 1024
    blocks = -(-len(data) // block)
    got: dict[int, bytes] = {}
    f = unicast.Fetcher(server.url(77), 77, "pc1", tok, None)
    try:
        for start, end in unicast.runs([1, 2, 5, blocks - 1], block, len(data)):
            f.fetch(start, end, block, lambda off, b: got.__setitem__(off, b))
    finally:
        f.close()
    assert sorted(got) == [block, 2 * block, 5 * block, (blocks - 1) * block]
    assert all(got[o] == data[o:o + len(b)] for o, b in got.items())
    assert len(got[(blocks - 1) * block]) == len(data) - (blocks - 1) * block
    assert f.stats.requests == 3 and f.stats.bytes == sum(len(b) for b in got.values())
    bad = unicast.Fetcher(server.url(77), 77, "pc1", "0" * 32, None)
    with pytest.raises(unicast.UnicastError, match="403"):
        bad.fetch(0, block, block, lambda off, b: pytest.fail("no byte may arrive"))
    bad.close()


def test_sealed_body_round_trips_at_any_offset() -> None:
    key = os.urandom(32)
    data = os.urandom(3 * 1024 * 1024 + 77)
    whole = unicast.crypt(key, 5, 0, data)
    assert whole != data
    for start in (0, 1, 63, 64, 1024 * 1024 - 3, 2 * 1024 * 1024 + 5):
        piece = unicast.crypt(key, 5, start, data[start:start + 1_500_000])
        assert piece == whole[start:start + 1_500_000]
        assert unicast.crypt(key, 5, start, piece) == data[start:start + 1_500_000]
    assert unicast.crypt(key, 6, 0, data[:64]) != whole[:64]  # another session, another stream
