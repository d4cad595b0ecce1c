"""Resume: the journal of committed blocks, its durability rule, and kill -9 + restart on real sockets.

The journal must never claim a block the disk does not hold: records are appended only after the
output was fsynced, and a torn last record (power loss mid-append) is ignored.  The real-socket test
kills a receiver by PID in the middle of a standalone transfer and restarts it with the same --out.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clientagent import journal as journal_mod
from clientagent.journal import Committer, Journal
from clientagent.transfer import ClientOptions, _open_output
from mcproto import codec, packets
from mcproto.events import TransferComplete
from mcproto.messages import Offer, Status
from mcproto.receiver import Receiver
from tests.test_standalone import ENV, REPO, Procs, finish, free_port, last_json, mcdeploy, procs  # noqa: F401

IDENT = {"version": 1, "image_sha256": "ab" * 32, "image_size": 1000}


def offer_for(image: bytes, symbol_size: int = 100, k: int = 4) -> Offer:
    return Offer(session_id=42, deployment="d", group="239.255.78.1", port=47301, image_size=len(image),
                 image_sha256=hashlib.sha256(image).hexdigest(), symbol_size=symbol_size, block_symbols=k)


# ----------------------------------------------------------------------------------- journal format


def test_journal_round_trip_and_ranges(tmp_path: Path) -> None:
    path = str(tmp_path / "j")
    j = Journal.create(path, IDENT)
    j.append([5, 3, 4, 9])
    j.append([4, 10, 0])  # 4 again: not recorded twice
    j.sync()
    j.close()
    c = journal_mod.read(path)
    assert c.identity == IDENT and c.blocks == {0, 3, 4, 5, 9, 10} and c.torn_bytes == 0 and not c.problem
    assert journal_mod.ranges([5, 3, 4, 9, 10, 0]) == [(0, 1), (3, 3), (9, 2)]
    # Tiny: a header and 12 bytes per range.
    assert os.path.getsize(path) < 200


@pytest.mark.parametrize("damage", ["cut-record", "garbage-tail", "zero-tail", "flipped-last"])
def test_a_torn_or_damaged_last_record_is_ignored_and_cut_before_appending(tmp_path: Path, damage: str) -> None:
    path = str(tmp_path / "j")
    j = Journal.create(path, IDENT)
    j.append([0, 1, 2])
    j.sync()
    j.append([7])  # the record a power loss tears
    j.sync()
    j.close()
    data = bytearray(Path(path).read_bytes())
    if damage == "cut-record":
        data = data[:-5]
    elif damage == "garbage-tail":
        data = data[:-12] + os.urandom(12) + os.urandom(7)
    elif damage == "zero-tail":  # what some file systems show after a crash: the size grew, the data did not
        data = data[:-12] + bytes(24)
    else:
        data[-1] ^= 0x40
    Path(path).write_bytes(bytes(data))
    c = journal_mod.read(path)
    assert c.blocks == {0, 1, 2}, c  # block 7's record is not trusted
    assert c.torn_bytes > 0
    j2 = Journal.reopen(path, c)
    j2.append([8, 9])
    j2.sync()
    j2.close()
    c2 = journal_mod.read(path)
    assert c2.blocks == {0, 1, 2, 8, 9} and c2.torn_bytes == 0


def test_a_damaged_header_or_stale_records_claim_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "j")
    j = Journal.create(path, IDENT)
    j.append([1, 2])
    j.sync()
    j.close()
    records = Path(path).read_bytes()[-12:]
    # Records of an older journal behind a new header do not count: their checksums are seeded by the old header.
    j = Journal.create(path, {**IDENT, "image_size": 2000})
    j.close()
    Path(path).write_bytes(Path(path).read_bytes() + records)
    assert journal_mod.read(path).blocks == set()
    data = bytearray(Path(path).read_bytes())
    data[12] ^= 1
    Path(path).write_bytes(bytes(data))
    c = journal_mod.read(path)
    assert c.identity is None and c.blocks == set() and "checksum" in c.problem
    assert journal_mod.read(str(tmp_path / "none")).problem == "no journal"


# ----------------------------------------------------------------------------------- durability order


class RecordingOutput:
    def __init__(self, events: list) -> None:
        self.events = events

    def write(self, block: int) -> None:
        self.events.append(("write", block))

    def flush(self) -> None:
        self.events.append(("flush",))

    def sync(self) -> None:
        time.sleep(0.002)  # a slow disk: blocks keep arriving while the fsync runs
        self.events.append(("sync",))


class RecordingJournal(Journal):
    events: list

    def append(self, blocks):  # type: ignore[no-untyped-def]
        blocks = list(blocks)
        self.events.append(("append", tuple(blocks)))
        super().append(blocks)


def test_blocks_are_journaled_only_after_their_data_was_written_and_fsynced(tmp_path: Path) -> None:
    events: list = []
    out = RecordingOutput(events)
    j = RecordingJournal.create(str(tmp_path / "j"), IDENT)
    j.events = events
    c = Committer(out, j, interval=0.001, max_batch=3)  # type: ignore[arg-type]
    rng = random.Random(5)
    order = list(range(200))
    rng.shuffle(order)
    now = 0.0
    for b in order:
        out.write(b)
        c.add(b, now)
        now += 0.0005
        c.poll(now)
        if rng.random() < 0.1:
            time.sleep(0.001)
    c.close()
    written: set[int] = set()
    synced: set[int] = set()
    appended: list[int] = []
    for ev in list(events):
        if ev[0] == "write":
            written.add(ev[1])
        elif ev[0] == "sync":
            synced |= written
        elif ev[0] == "append":
            assert set(ev[1]) <= synced, f"journaled before fsync: {set(ev[1]) - synced}"
            appended += ev[1]
    assert sorted(appended) == list(range(200))
    assert journal_mod.read(str(tmp_path / "j")).blocks == set(range(200))
    assert c.commits >= 5  # batched, not one fsync per block and not one for everything


CRASH_CHILD = r"""
import os, sys
from clientagent.journal import Committer, Journal
from clientagent.output import FileOutput
out_path, j_path, mode = sys.argv[1:4]
BB, N = 4096, 32
def data(b):
    return bytes([b % 251 + 1]) * BB
out = FileOutput(out_path, N * BB, fresh=True)
j = Journal.create(j_path, {"t": 1})
c = Committer(out, j, interval=0.0, max_batch=1)
for b in range(10):
    out.write_at(b * BB, data(b))
    c.add(b, 0.0)
    c.poll(1.0)
c.close()  # blocks 0..9 are committed
for b in range(10, 20):
    out.write_at(b * BB, data(b))
out.flush()  # 10..19 handed to the OS, not committed
if mode == "after-write":
    os._exit(9)
if mode == "after-fsync":  # the output was fsynced, the process dies before the journal append
    out.sync()
    os._exit(9)
if mode == "torn-append":  # dies in the middle of writing a record
    os.write(j._fd, b"\x0a\x00\x00\x00\x0a\x00")
    os._exit(9)
"""


@pytest.mark.parametrize("mode", ["after-write", "after-fsync", "torn-append"])
def test_a_crash_between_data_and_journal_never_claims_the_unjournaled_blocks(tmp_path: Path, mode: str) -> None:
    out, jpath = tmp_path / "out", tmp_path / "out.j"
    proc = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(out), str(jpath), mode], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    c = journal_mod.read(str(jpath))
    assert c.blocks == set(range(10)), c
    disk = out.read_bytes()
    for b in c.blocks:  # every claimed block is really there
        assert disk[b * 4096:(b + 1) * 4096] == bytes([b % 251 + 1]) * 4096


# ----------------------------------------------------------------------------------- resume decisions


def test_resume_uses_a_matching_journal_and_starts_fresh_otherwise(tmp_path: Path) -> None:
    image = os.urandom(4000)
    offer = offer_for(image)
    out = tmp_path / "o"
    opts = ClientOptions(dp=("127.0.0.1", 1), out=str(out), client_id="c")
    notes: list[str] = []
    first = _open_output(opts, offer, notes.append)
    assert first.journal is not None and first.done == set() and not notes
    bb = 400
    committer = Committer(first.output, first.journal, interval=0.0)
    for b in (0, 2, 5):
        first.output.write_at(b * bb, image[b * bb:(b + 1) * bb])
        committer.add(b, 0.0)
    committer.close()
    first.output.close()
    first.journal.close()

    again = _open_output(opts, offer, notes.append)
    assert again.done == {0, 2, 5} and "resuming from journal" in notes[-1] and "3 of 10 blocks" in notes[-1]
    assert out.read_bytes()[:bb] == image[:bb]  # kept, not truncated
    again.output.close()
    assert again.journal is not None
    again.journal.close()

    other = offer_for(os.urandom(4000))
    fresh = _open_output(opts, other, notes.append)
    assert fresh.done == set() and "starting fresh" in notes[-1] and "image_sha256" in notes[-1]
    assert out.read_bytes() == bytes(4000)  # truncated: nothing of the other image is left
    fresh.output.close()
    assert fresh.journal is not None
    fresh.journal.close()

    out.unlink()  # a journal without its output is void
    commit_one(opts, other)
    out.unlink()
    gone = _open_output(opts, other, notes.append)
    assert gone.done == set() and "no longer exists" in notes[-1]
    gone.output.close()

    no_resume = _open_output(ClientOptions(dp=None, out=str(out), client_id="c", resume=False), other, notes.append)
    assert no_resume.journal is None and no_resume.done == set()
    no_resume.output.close()


def commit_one(opts: ClientOptions, offer: Offer) -> None:
    opened = _open_output(opts, offer, lambda _: None)
    assert opened.journal is not None
    c = Committer(opened.output, opened.journal, interval=0.0)
    opened.output.write_at(0, b"x" * 400)
    c.add(0, 0.0)
    c.close()
    opened.output.close()
    opened.journal.close()


def test_receiver_with_done_blocks_never_asks_for_them_and_completes_at_once_when_all_are_done() -> None:
    image = os.urandom(4000)  # 10 blocks of 4 x 100 bytes
    offer = offer_for(image)
    r = Receiver(offer, "c", 0.0, done_blocks=[0, 2, 3, 3, 99])
    assert r.blocks_done == 3 and r.next_event() is None
    r.receive_datagram(packets.encode_heartbeat(42, 10, 10, 0), 0.0)
    msgs = [codec.decode(codec.encode(m)) for m in r.datagrams_to_send(0.01)]
    status = next(m for m in msgs if isinstance(m, Status))
    needed = {b for first, count, _ in status.needs for b in range(first, first + count)}
    assert needed == set(range(10)) - {0, 2, 3} and status.blocks_done == 3
    assert r.receive_datagram(packets.encode_data(42, 0, 0, image[:100]), 0.02) is None  # a done block: duplicate
    assert r.duplicates == 1
    full = Receiver(offer, "c", 0.0, done_blocks=range(10))
    assert isinstance(full.next_event(), TransferComplete)


# ----------------------------------------------------------------------------------- kill -9 on real sockets


def block_matches(disk: bytes, image: bytes, bb: int) -> set[int]:
    return {b for b in range((len(image) + bb - 1) // bb) if disk[b * bb:(b + 1) * bb] == image[b * bb:(b + 1) * bb]}


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_receiver_killed_mid_transfer_resumes_needing_only_what_it_lacks(
        procs: Procs, tmp_path: Path) -> None:  # noqa: F811
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    image = tmp_path / "image.bin"
    payload = os.urandom(24 * 1024 * 1024)
    image.write_bytes(payload)
    out, jpath = tmp_path / "out.img", tmp_path / "out.img.mcdeploy-journal"
    port = free_port()
    t0 = time.monotonic()
    sender = procs.start(mcdeploy("send", str(image), "--port", str(port), "--control-port", "0", "--rate", "40",
                                  "--min-receivers", "1", "--fec", "rs", "--json"))  # the k = 128 geometry below
    receive = mcdeploy("receive", "--out", str(out), "--port", str(port), "--id", "resumer", "--wait", "30", "--json")
    first = procs.start(receive)
    threshold = rng.randint(8, 60)  # kill at a random point after some blocks were committed
    deadline = time.monotonic() + 30
    while len(journal_mod.read(str(jpath)).blocks) < threshold:
        assert first.poll() is None, first.communicate()[1]
        assert time.monotonic() < deadline, "the receiver committed nothing"
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.5))
    os.kill(first.pid, 9)
    first.wait(timeout=10)
    killed_at = time.monotonic() - t0

    journaled = journal_mod.read(str(jpath))
    bb = 128 * 1400
    on_disk = block_matches(out.read_bytes(), payload, bb)
    blocks = (len(payload) + bb - 1) // bb
    assert journaled.blocks, "nothing committed before the kill"
    assert len(journaled.blocks) < blocks, "the transfer was over before the kill"
    assert journaled.blocks <= on_disk, f"journal claims blocks not on disk: {journaled.blocks - on_disk}"
    lag = len(on_disk - journaled.blocks)  # written before the kill, not yet committed: received again

    second = procs.start(receive)
    rc, rout, rerr = finish(second, 60)
    assert rc == 0, rerr
    res = last_json(rout)
    assert res["verified"] and res["acknowledged"], res
    assert "resuming from journal" in rerr, rerr
    assert res["resumed_blocks"] == len(journaled.blocks), res
    missing = blocks - len(journaled.blocks)
    assert res["blocks"] == blocks
    assert res["blocks_received"] <= missing + 2, res  # only what the journal lacked (at most a couple more)
    assert out.read_bytes() == payload
    assert not jpath.exists(), "the journal outlived a successful receive"
    code, sout, serr = finish(sender, 30)
    assert code == 0, serr
    summary = last_json(sout)
    assert summary["done"] == 1 and summary["failed"] == 0, summary
    print(f"resume (seed {seed}): killed at {killed_at:.2f} s with {len(journaled.blocks)}/{blocks} blocks journaled, "
          f"{len(on_disk)} on disk ({lag} written but not yet committed); second run received "
          f"{res['blocks_received']} blocks for {missing} missing, {res['journal_commits']} journal commits; "
          f"whole test {time.monotonic() - t0:.1f} s")


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.parametrize("corrupt", [False, True], ids=["intact", "corrupted"])
def test_a_journal_claiming_every_block_goes_straight_to_verification(
        procs: Procs, tmp_path: Path, corrupt: bool) -> None:  # noqa: F811
    """Killed after the last commit: the restart receives nothing and verifies.  A damaged output fails
    verification (exit 5) and its journal is removed, so the next run starts fresh."""
    payload = os.urandom(3 * 1024 * 1024 + 17)
    image, out = tmp_path / "image.bin", tmp_path / "out.img"
    image.write_bytes(payload)
    out.write_bytes(payload[:1000] + (b"\x00" if corrupt else payload[1000:1001]) + payload[1001:])
    blocks = (len(payload) + 128 * 1400 - 1) // (128 * 1400)
    jpath = str(out) + ".mcdeploy-journal"
    j = Journal.create(jpath, journal_mod.identity(hashlib.sha256(payload).hexdigest(), len(payload), 1400, 128,
                                                   str(out), len(payload)))
    j.append(range(blocks))
    j.sync()
    j.close()
    port = free_port()
    sender = procs.start(mcdeploy("send", str(image), "--port", str(port), "--control-port", "0", "--fec", "rs",
                                  "--json"))
    rc, rout, rerr = finish(procs.start(mcdeploy("receive", "--out", str(out), "--port", str(port), "--id", "again",
                                                 "--wait", "30", "--json")), 45)
    res = last_json(rout)
    assert res["resumed_blocks"] == blocks and res["blocks_received"] == 0, res
    assert not os.path.exists(jpath)
    if corrupt:
        assert rc == 5, rerr
        assert "did not verify, so a restart starts fresh" in rerr
        assert finish(sender, 30)[0] == 1
    else:
        assert rc == 0, rerr
        assert out.read_bytes() == payload
        assert finish(sender, 30)[0] == 0
