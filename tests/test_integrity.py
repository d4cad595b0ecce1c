"""The signed manifest at work: chunk bookkeeping, held pipe output, checked writes, and an insider.

Pure parts (ChunkMap, Receiver.forget, trust decisions) are tested directly; the outputs on real
files and pipes; and end to end on a real site an *enrolled* client (it joins, receives the
session key, so its packets authenticate) forges every block before the transfer starts: the
honest clients must reject every forged chunk, receive those blocks again, and end bit-exact.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from clientagent import integrity
from clientagent.output import ChunkRejected, FileOutput, PipeOutput
from controller import api
from mcproto import manifest as mf
from mcproto.chunks import ChunkMap
from mcproto.events import TransferComplete
from mcproto.messages import DeployRequest, Offer
from mcproto.receiver import Receiver
from mcsite.celeryapp import app
from tests.conftest import Site, wait_for

KIB = 1024


def _manifest(data: bytes, chunk: int) -> mf.Manifest:
    return mf.build("img", [data[i:i + chunk] for i in range(0, len(data), chunk)], chunk)


# --------------------------------------------------------------------------- ChunkMap (pure)


def test_chunk_geometry_covers_every_byte_once() -> None:
    cm = ChunkMap(image_size=10_000, chunk_size=4096, block_bytes=1500, blocks=7)
    assert cm.chunks == 3
    assert list(cm.blocks_of(0)) == [0, 1, 2]  # bytes 0..4095 lie in blocks 0..2
    assert list(cm.blocks_of(2)) == [5, 6]
    assert list(cm.chunks_of(2)) == [0, 1]  # block 2 (3000..4499) straddles chunks 0 and 1
    assert cm.chunk_range(2) == (8192, 1808)
    assert cm.writable_spans(2) == [(3000, 1500)]


def test_a_block_is_committed_only_when_every_chunk_it_touches_checked() -> None:
    cm = ChunkMap(image_size=10_000, chunk_size=4096, block_bytes=1500, blocks=7)
    assert cm.written(0) == [] and cm.written(1) == []
    assert cm.written(2) == [0]  # chunk 0 complete
    assert cm.verified(0) == [0, 1]  # block 2 also touches chunk 1: not yet
    for b in (3, 4):
        assert cm.written(b) == []
    assert cm.written(5) == [1]
    assert cm.verified(1) == [2, 3, 4]  # block 5 touches chunk 2 too
    # Block 5 straddles the verified chunk 1: only its chunk-2 part may be written again.
    assert cm.writable_spans(5) == [(8192, 7500 - 8192 + 1500)]


def test_a_rejected_chunk_gives_back_its_uncommitted_blocks() -> None:
    cm = ChunkMap(image_size=10_000, chunk_size=4096, block_bytes=1500, blocks=7)
    for b in range(3):
        cm.written(b)
    cm.verified(0)
    for b in range(3, 6):
        cm.written(b)
    assert cm.rejected(1) == [2, 3, 4, 5]
    assert cm.failures == {1: 1}
    assert not cm.is_verified(1) and cm.is_verified(0)
    # Received again: the same chunk becomes complete once more.
    assert [c for b in (2, 3, 4, 5) for c in cm.written(b)] == [1]


def test_resumed_blocks_count_as_committed_and_their_full_chunks_as_checked() -> None:
    cm = ChunkMap(image_size=10_000, chunk_size=4096, block_bytes=1500, blocks=7, committed=[0, 1, 2, 3])
    assert cm.is_verified(0) and not cm.is_verified(1)
    assert cm.written(4) == [] and cm.written(5) == [1]
    assert cm.verified(1) == [4]  # 2 and 3 were committed already; 5 waits for chunk 2


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_order_with_any_rejections_commits_each_block_once_after_its_chunks(data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 40_000))
    chunk = data.draw(st.sampled_from([4096, 8192]))
    bb = data.draw(st.integers(500, 9000))
    blocks = -(-size // bb)
    cm = ChunkMap(size, chunk, bb, blocks)
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    pending = list(range(blocks))
    committed: list[int] = []
    for _ in range(20 * blocks + 20):  # bounded
        if not pending:
            break
        b = pending.pop(rng.randrange(len(pending)))
        for c in cm.written(b):
            if rng.random() < 0.3:
                again = cm.rejected(c)
                assert not set(again) & set(committed)
                pending.extend(x for x in again if x not in pending)
            else:
                ready = cm.verified(c)
                assert all(cm.is_verified(x) for r in ready for x in cm.chunks_of(r))
                committed += ready
    assert not pending
    assert sorted(committed) == list(range(blocks))


# --------------------------------------------------------------------------- Receiver.forget (pure)


def test_forgetting_blocks_after_completion_resumes_receiving_and_asks_for_them() -> None:
    offer = Offer(session_id=7, deployment="d", group="239.255.77.1", port=5000, image_size=4000,
                  image_sha256="0" * 64, symbol_size=500, block_symbols=2)
    rx = Receiver(offer, "c1", 0.0, done_blocks=range(4))
    assert rx.blocks_done == 4 and isinstance(rx.next_event(), TransferComplete)
    rx2 = Receiver(offer, "c1", 0.0, done_blocks=range(4))
    rx2.forget([1, 3], 1.0)
    assert rx2.blocks_done == 2 and rx2.next_event() is None  # the completion was withdrawn
    status = [m for m in rx2.datagrams_to_send(1.0) if m.type == "status"]
    assert status and [1, 1, 2] in status[0].needs and [3, 1, 2] in status[0].needs


# --------------------------------------------------------------------------- outputs with a manifest


def test_a_pipe_emits_only_checked_chunks_and_takes_a_rejected_range_again(tmp_path: Path) -> None:
    data = os.urandom(20 * KIB + 123)
    m = _manifest(data, 8 * KIB)
    r, w = os.pipe()
    try:
        out = PipeOutput(len(data), 3 * KIB, fd=w, manifest=m)
        forged = bytearray(data[6 * KIB:9 * KIB])
        forged[100] ^= 1
        out.write_at(0, data[:3 * KIB])
        out.write_at(3 * KIB, data[3 * KIB:6 * KIB])
        assert out.written == 0  # 6 KiB held: chunk 0 is not complete
        with pytest.raises(ChunkRejected) as bad:
            out.write_at(6 * KIB, bytes(forged))
        assert (bad.value.chunk, bad.value.start, bad.value.end) == (0, 0, 9 * KIB)
        assert out.written == 0 and out.rejected_chunks == 1
        for off in range(0, len(data), 3 * KIB):  # the rejected range received again, then the rest
            out.write_at(off, data[off:off + 3 * KIB])
        out.finish()
        os.close(w)
        w = -1
        got = b""
        while chunk := os.read(r, 65536):
            got += chunk
        assert got == data
        assert out.sha256() == hashlib.sha256(data).hexdigest() and out.checked_chunks == 3
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_checked_writer_never_commits_a_forged_block_and_keeps_verified_bytes(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    m = _manifest(data, 4096)
    out = FileOutput(str(tmp_path / "img"), len(data))

    class Commits:
        def __init__(self) -> None:
            self.blocks: list[int] = []

        def add(self, block: int, now: float) -> None:
            self.blocks.append(block)

    commits = Commits()
    w = integrity.CheckedWriter(out, commits, m, 1500, 7, set())  # type: ignore[arg-type]
    bad = bytearray(data[4500:6000])
    bad[7] ^= 0x80
    for b in range(7):
        piece = bytes(bad) if b == 3 else data[b * 1500:(b + 1) * 1500]
        again = w.write(b * 1500, piece, 0.0)
        if b == 5:  # chunk 1 (4096..8191) complete with forged block 3 in it
            assert again == [2, 3, 4, 5]
    assert 3 not in commits.blocks and 2 not in commits.blocks and w.rejected_chunks == 1
    for b in (2, 3, 4, 5):
        assert w.write(b * 1500, data[b * 1500:(b + 1) * 1500], 0.0) == []
    assert sorted(commits.blocks) == list(range(7))
    out.finish()
    assert (tmp_path / "img").read_bytes() == data


def test_the_same_chunk_failing_again_and_again_fails_the_receive(tmp_path: Path) -> None:
    data = os.urandom(8192)
    m = _manifest(data, 4096)
    out = FileOutput(str(tmp_path / "img"), len(data))
    w = integrity.CheckedWriter(out, None, m, 4096, 2, set())
    with pytest.raises(integrity.IntegrityError, match="3 times"):
        for _ in range(3):
            assert w.write(0, os.urandom(4096), 0.0) == [0]


# --------------------------------------------------------------------------- trust decisions


def _offer(data: bytes, **kw: object) -> Offer:
    return Offer(session_id=1, deployment="d", group="239.255.77.1", port=5000, image_size=len(data),
                 image_sha256=hashlib.sha256(data).hexdigest(), symbol_size=1000, block_symbols=4, **kw)


def test_trust_follows_the_pinned_key() -> None:
    data = os.urandom(5000)
    key = Ed25519PrivateKey.generate()
    blob = mf.sign(_manifest(data, 4096), key)
    pinned = mf.public_bytes(key.public_key()).hex()
    assert integrity.settle(_offer(data), blob, pinned).status == "signed"
    assert integrity.settle(_offer(data), blob, None).status == "unverified"
    assert integrity.settle(_offer(data), None, None).status == "none"
    with pytest.raises(integrity.IntegrityError, match="no signed manifest"):
        integrity.settle(_offer(data), None, pinned)
    with pytest.raises(mf.ManifestError, match="pinned"):
        integrity.settle(_offer(data), blob, mf.public_bytes(Ed25519PrivateKey.generate().public_key()).hex())
    with pytest.raises(integrity.IntegrityError, match="another image"):
        integrity.settle(_offer(os.urandom(5000)), blob, pinned)


# --------------------------------------------------------------------------- on a real site

INSIDER = r"""
import json, os, socket, sys, time
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from mcproto import codec, keyexchange, seal, packets
from mcproto.messages import Join, Offer, Failed
dp_host, dp_port, deployment, start_in = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
me = X25519PrivateKey.generate()
ctrl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ctrl.settimeout(0.5)
join = Join(client_id="insider", deployment=deployment, client_key=keyexchange.raw_public(me.public_key()).hex())
offer = None
for _ in range(40):
    ctrl.sendto(codec.encode(join), (dp_host, dp_port))
    try:
        msg = codec.decode(ctrl.recvfrom(4096)[0])
    except (TimeoutError, Exception):
        continue
    if isinstance(msg, Offer):
        offer = msg
        break
assert offer is not None and offer.encrypted
key = keyexchange.unwrap(me, offer.eph_key, offer.key_box, offer.session_id, "insider")
time.sleep(start_in)  # the honest clients have joined and listen; the sender has not started yet
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
sealer = seal.PacketSealer(key, 4_000_000_000)  # any epoch: only the key is checked
ss, k = offer.symbol_size, offer.block_symbols
block_bytes = ss * k
blocks = -(-offer.image_size // block_bytes)
sent = 0
for b in range(blocks):
    left = min(block_bytes, offer.image_size - b * block_bytes)
    for esi in range(-(-left // ss)):
        tx.sendto(sealer.seal(packets.KIND_DATA, offer.session_id, b, esi, os.urandom(ss)), (offer.group, offer.port))
        sent += 1
        if sent % 64 == 0:
            time.sleep(0.001)
ctrl.sendto(codec.encode(Failed(session_id=offer.session_id, client_id="insider", reason="insider done")),
            (dp_host, dp_port))
print(json.dumps({"forged": sent, "blocks": blocks}), flush=True)
"""


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_an_enrolled_client_cannot_make_others_commit_forged_data(site: Site, tmp_path: Path) -> None:
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(5 * 1024 * 1024 + 4321))
    api.add_image(site.state, str(image), name="insider-img")
    controller_key = json.loads(site.mcdeploy("key", "--json").stdout)["public_key"]
    fingerprint = site.state.get_dp(site.dp)["key_fingerprint"]
    # Start only after a fixed delay, so the insider's forgeries are all there before any real symbol.
    dep_id, _, _ = api.deploy(site.state, app, DeployRequest(image="insider-img", dp=site.dp, clients=3,
                                                             start_clients=50, start_timeout_s=8.0))
    insider = subprocess.Popen([sys.executable, "-c", INSIDER, "127.0.0.1", str(site.control_port), dep_id, "3"],
                               env=site.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    honest = [site.spawn_client("--out", str(tmp_path / f"h{i}.img"), "--id", f"honest{i}", "--deployment", dep_id,
                                "--dp-key", fingerprint, "--controller-key", controller_key, "--json", "--wait", "30")
              for i in range(2)]
    try:
        out, err = insider.communicate(timeout=60)
        assert insider.returncode == 0, err
        forged = json.loads(out.strip().splitlines()[-1])
        assert forged["forged"] > 0
        for i, p in enumerate(honest):
            stdout, stderr = p.communicate(timeout=120)
            assert p.returncode == 0, stderr
            res = json.loads(stdout.strip().splitlines()[-1])
            assert res["verified"] and res["acknowledged"] and res["manifest"] == "signed"
            assert res["rejected_chunks"] >= 1  # the forgeries authenticated, decoded, and were caught
            assert (tmp_path / f"h{i}.img").read_bytes() == image.read_bytes()
    finally:
        for p in (insider, *honest):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    dep = wait_for(lambda: (d := site.state.get_deployment(dep_id))["state"] in ("finished", "failed") and d,
                   timeout=30)
    assert dep, site.state.get_deployment(dep_id)
    assert {c: r["outcome"] for c, r in dep["clients"].items()} == {
        "honest0": "done", "honest1": "done", "insider": "failed"}, dep


@pytest.mark.integration
def test_a_client_refuses_a_manifest_not_signed_by_its_pinned_key_and_the_site_hears_why(
        site: Site, image_file: Path, tmp_path: Path) -> None:
    api.add_image(site.state, str(image_file), name="pinned-img")
    dep_id, _, _ = api.deploy(site.state, app, DeployRequest(image="pinned-img", dp=site.dp, clients=1))
    stranger = mf.public_bytes(Ed25519PrivateKey.generate().public_key()).hex()
    res = site.client("--out", str(tmp_path / "x.img"), "--id", "wary-pc", "--deployment", dep_id,
                      "--controller-key", stranger, "--wait", "20")
    assert res.returncode == 3 and "pinned controller key" in res.stderr
    assert not (tmp_path / "x.img").exists()
    rec = wait_for(lambda: site.state.get_deployment(dep_id)["clients"].get("wary-pc"), timeout=20)
    assert rec and rec["outcome"] == "failed" and "refused the DP's offer" in rec["reason"]


@pytest.mark.integration
def test_image_records_carry_a_manifest_signed_by_the_controller_key(site: Site, image_file: Path) -> None:
    add = site.mcdeploy("image", "add", str(image_file), "--name", "signed-img")
    assert add.returncode == 0 and "signed by ed25519:" in add.stdout, add.stderr
    shown = json.loads(site.mcdeploy("image", "show", "signed-img").stdout)
    assert shown["manifest"]["chunks"] == -(-image_file.stat().st_size // mf.CHUNK_SIZE)
    key = json.loads(site.mcdeploy("key", "--json").stdout)
    blob = base64.b64decode(site.state.get_image("signed-img")["manifest"])
    m = mf.verify(blob, mf.load_public_key(key["public_key"]))
    assert m.sha256 == hashlib.sha256(image_file.read_bytes()).hexdigest() and m.key_id == key["key_id"]


@pytest.mark.integration
def test_a_deployment_can_turn_encryption_off_and_says_so(site: Site, image_file: Path, tmp_path: Path) -> None:
    api.add_image(site.state, str(image_file), name="clear-img")
    dep = site.mcdeploy("deploy", "clear-img", "--dp", site.dp, "--clients", "1", "--no-encrypt")
    assert dep.returncode == 0 and "NOT ENCRYPTED" in dep.stdout, dep.stderr
    dep_id = dep.stdout.strip().splitlines()[-1]
    res = site.client("--out", str(tmp_path / "c.img"), "--id", "clear-pc", "--deployment", dep_id, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["encrypted"] is False and out["manifest"] == "unverified" and out["checked_chunks"] >= 1
    assert (tmp_path / "c.img").read_bytes() == image_file.read_bytes()
    assert wait_for(lambda: "NOT ENCRYPTED" in site.log("dp"), timeout=10)


def test_a_client_that_refused_the_offer_is_recorded_but_not_counted_as_an_expected_machine() -> None:
    from mcproto.messages import Failed, Join
    from mcproto.sender import WAITING, Sender, SenderConfig, StartPolicy

    data = os.urandom(50_000)
    cfg = SenderConfig(session_id=9, deployment="d", group="239.255.77.1", port=5000, image_size=len(data),
                       image_sha256=hashlib.sha256(data).hexdigest(), expected_clients=2,
                       start=StartPolicy(clients=2, delay=60.0))
    s = Sender(cfg, lambda o, n: data[o:o + n], 0.0)
    s.handle_message(Join(client_id="impostor-victim"), ("127.0.0.1", 1), 0.1)
    s.handle_message(Failed(session_id=9, client_id="impostor-victim", reason="refused the DP's offer: x",
                            refused=True), ("127.0.0.1", 1), 0.2)
    s.handle_message(Join(client_id="pc1"), ("127.0.0.1", 2), 0.3)
    s.handle_timer(0.4)
    assert s.state == WAITING  # one real machine of two: still waiting for the second
    s.handle_message(Join(client_id="pc2"), ("127.0.0.1", 3), 0.5)
    s.handle_timer(0.6)
    assert s.state != WAITING
    assert s.clients["impostor-victim"].state == "failed" and s.clients["impostor-victim"].refused


def test_a_lagging_receiver_holds_bounded_memory_and_asks_again_for_what_it_did_not_keep() -> None:
    from mcproto import packets

    ss, k = 1000, 8
    data = os.urandom(ss * k * 20)
    offer = Offer(session_id=7, deployment="d", group="239.255.77.1", port=5000, image_size=len(data),
                  image_sha256=hashlib.sha256(data).hexdigest(), symbol_size=ss, block_symbols=k, fec="rs")
    rx = Receiver(offer, "c1", 0.0, max_partial_bytes=10 * ss)
    for b in range(20):  # every block one symbol short: nothing completes, all would stay in memory
        for e in range(k - 1):
            rx.receive_datagram(packets.encode_data(7, b, e, data[(b * k + e) * ss:(b * k + e + 1) * ss]), 0.1)
        assert rx._partial_bytes <= 10 * ss + k * ss  # the bound, plus at most the block that crossed it
    assert rx.window_dropped >= 15 * (k - 1)
    needs = {first + i: need for m in rx.datagrams_to_send(0.2) if m.type == "status"
             for first, count, need in m.needs for i in range(count)}
    assert needs[0] == 1 and needs[18] == k  # started blocks need their last symbol; the rest whole
    out = bytearray(len(data))
    for b in range(20):  # the sender serves what was asked: all complete, bit-exact
        for e in range(k):
            w = rx.receive_datagram(packets.encode_data(7, b, e, data[(b * k + e) * ss:(b * k + e + 1) * ss]), 0.3)
            if w is not None:
                out[w[0]:w[0] + len(w[1])] = w[1]
    assert bytes(out) == data and rx.blocks_done == 20
