"""Outputs: stdout in order with a bounded spool, sparse files, block devices, bounded memory.

Real-socket tests use the standalone sender (`mcdeploy send`, loopback, TTL 1, free ports) and
`mcdeploy-client --discover` as the receiver, so no Redis is needed.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clientagent.output import FileOutput, OutputError, PipeOutput
from tests.test_standalone import ENV, REPO, Procs, finish, free_port, last_json, mcdeploy, procs  # noqa: F401

HASH_STDIN = ("import hashlib, sys\nh = hashlib.sha256(); n = 0\n"
              "while b := sys.stdin.buffer.read(1 << 20):\n    h.update(b); n += len(b)\n"
              "print(n, h.hexdigest())")


def client(port: int, out: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "clientagent", "--discover", f"239.255.78.1:{port}", "--interface", "127.0.0.1",
            "--out", out, "--wait", "30", "--json", *args]


def sparse_image(path: Path, size: int, data_every: int, data_len: int) -> bytes:
    """Zeros with random data runs every ``data_every`` bytes; the file itself is sparse."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, data_every):
            f.seek(off)
            f.write(os.urandom(min(data_len, size - off)))
    return path.read_bytes() if size <= 64 * 1024 * 1024 else b""


# ----------------------------------------------------------------------------------- units


@pytest.mark.parametrize("use_pwrite", [True, False], ids=["pread", "seek-read"])
def test_pipe_output_writes_in_order_with_memory_bounded_and_the_rest_spooled(tmp_path: Path, use_pwrite: bool) -> None:
    bb = 1000
    data = os.urandom(200 * bb + 123)
    blocks = [(off, data[off:off + bb]) for off in range(0, len(data), bb)]
    random.Random(3).shuffle(blocks)
    with open(tmp_path / "stream", "wb+") as sink:
        out = PipeOutput(len(data), bb, fd=sink.fileno(), memory_limit=10 * bb, spool_dir=str(tmp_path),
                         use_pwrite=use_pwrite)
        for off, chunk in blocks:
            out.write_at(off, chunk)
            assert out.memory_bytes <= 10 * bb
        out.finish()
        assert out.sha256() == hashlib.sha256(data).hexdigest()
        stats = out.stats()
        out.close()
    assert (tmp_path / "stream").read_bytes() == data
    assert stats["spool_peak_memory"] <= 10 * bb and stats["spooled_blocks"] > 0
    assert stats["spool_peak_bytes"] <= 201 * bb  # slots are reused: at most what waits at one time


def test_pipe_output_reports_a_reader_that_went_away(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.close(r)
    out = PipeOutput(10, 5, fd=w)
    with pytest.raises(OutputError, match="broken pipe"):
        out.write_at(0, b"12345")
    os.close(w)


def test_sparse_file_output_leaves_zero_blocks_as_holes(tmp_path: Path) -> None:
    bb = 64 * 1024
    data = bytearray(64 * bb)
    for b in range(0, 64, 16):
        data[b * bb:(b + 1) * bb] = os.urandom(bb)
    path = tmp_path / "o"
    path.write_bytes(os.urandom(len(data)))  # old contents: a fresh start must not leave them in the holes
    out = FileOutput(str(path), len(data), sparse=True)
    for b in reversed(range(64)):
        out.write_at(b * bb, bytes(data[b * bb:(b + 1) * bb]))
    out.finish()
    assert out.sha256() == hashlib.sha256(data).hexdigest()
    assert out.hole_bytes == 60 * bb
    out.close()
    assert path.read_bytes() == data
    assert os.stat(path).st_blocks * 512 <= 8 * bb


def test_outputs_that_are_not_files_or_block_devices_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="is a directory"):
        FileOutput(str(tmp_path), 10)
    if os.path.exists("/dev/null"):
        with pytest.raises(OutputError, match="not a regular file or block device"):
            FileOutput("/dev/null", 10)


def test_journal_with_stdout_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "clientagent", "--dp", "127.0.0.1:9", "--out", "-", "--journal",
                           "/tmp/x"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot resume" in lines[0], proc.stderr


# ----------------------------------------------------------------------------------- real sockets


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_stdout_piped_into_a_reader_is_byte_for_byte_with_a_small_spool(procs: Procs, tmp_path: Path) -> None:  # noqa: F811
    image = tmp_path / "image.bin"
    payload = os.urandom(12 * 1024 * 1024 + 321)
    image.write_bytes(payload)
    port = free_port()
    sender = procs.start(mcdeploy("send", str(image), "--port", str(port), "--control-port", "0", "--rate", "200",
                                  "--json"))
    rx = subprocess.Popen(client(port, "-", "--id", "piper", "--spool-memory", "0.5", "--spool-dir", str(tmp_path),
                                 "--test-impair", "loss=3,reorder=25", "--test-seed", "7"),
                          cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader = subprocess.Popen([sys.executable, "-c", HASH_STDIN], stdin=rx.stdout, stdout=subprocess.PIPE, text=True)
    assert rx.stdout is not None
    rx.stdout.close()
    try:
        got, _ = reader.communicate(timeout=45)
        _, err = rx.communicate(timeout=15)
    finally:
        for p in (rx, reader):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)
    err_text = err.decode()
    assert rx.returncode == 0, err_text
    n, digest = got.split()
    assert int(n) == len(payload) and digest == hashlib.sha256(payload).hexdigest()
    res = last_json(err_text)  # --out -: the JSON line goes to stderr
    assert res["verified"] and res["output"] == "stdout", res
    assert res["spooled_blocks"] > 0, res  # out-of-order blocks went beyond the memory bound to the spool file
    assert res["spool_peak_memory"] <= 512 * 1024, res
    assert "resume does not apply to --out -" in err_text
    assert not list(tmp_path.glob("mcdeploy-spool-*")), "the spool file was left behind"
    code, _, serr = finish(sender, 30)
    assert code == 0, serr
    print(f"pipe: spooled {res['spooled_blocks']} blocks, spool peak {res['spool_peak_bytes']} bytes on disk, "
          f"{res['spool_peak_memory']} in memory")


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_mostly_zero_image_is_received_sparse_and_bit_exact(procs: Procs, tmp_path: Path) -> None:  # noqa: F811
    image = tmp_path / "image.bin"
    payload = sparse_image(image, 32 * 1024 * 1024, 4 * 1024 * 1024, 300 * 1024)
    port = free_port()
    sender = procs.start(mcdeploy("send", str(image), "--port", str(port), "--control-port", "0", "--rate", "400",
                                  "--json"))
    out = tmp_path / "out.img"
    rc, rout, rerr = finish(subprocess.Popen(client(port, str(out), "--id", "sparse"), cwd=REPO, env=ENV,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), 45)
    assert rc == 0, rerr
    res = last_json(rout)
    assert out.read_bytes() == payload
    allocated = os.stat(out).st_blocks * 512
    assert allocated < len(payload) // 4, (allocated, len(payload))
    assert res["sparse_bytes"] > len(payload) // 2, res
    assert finish(sender, 30)[0] == 0
    print(f"sparse: {len(payload)} bytes, {allocated} allocated, {res['sparse_bytes']} left as holes")


@pytest.fixture
def loop_devices(tmp_path: Path):  # type: ignore[no-untyped-def]
    """``make(size)`` -> a loop device over a new temp file; every one is detached afterwards."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("a loop device needs Linux, root and losetup")
    made: list[str] = []

    def make(size: int) -> str:
        backing = tmp_path / f"backing{len(made)}"
        with open(backing, "wb") as f:
            f.truncate(size)
        r = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            pytest.skip(f"cannot create a loop device here: {r.stderr.strip()}")
        made.append(r.stdout.strip())
        return made[-1]

    try:
        yield make
    finally:
        for dev in made:
            subprocess.run(["losetup", "--detach", dev], capture_output=True, timeout=30)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_receive_into_a_loop_block_device_and_refuse_a_small_one(procs: Procs, tmp_path: Path,  # noqa: F811
                                                                   loop_devices) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "image.bin"
    payload = sparse_image(image, 6 * 1024 * 1024 + 4096, 1024 * 1024, 200 * 1024)  # zero blocks: written anyway
    dev = loop_devices(8 * 1024 * 1024)
    with open(dev, "wb") as d:  # garbage where the image has zeros: a device must get its zeros written
        d.write(b"\xa5" * (8 * 1024 * 1024))
    small = loop_devices(4 * 1024 * 1024)
    port = free_port()
    sender = procs.start(mcdeploy("send", str(image), "--port", str(port), "--control-port", "0", "--rate", "400",
                                  "--min-receivers", "2", "--exit-when-done", "--json"))
    good = subprocess.Popen(client(port, dev, "--id", "loop"), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    bad = subprocess.Popen(client(port, small, "--id", "small-loop"), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    rc, rout, rerr = finish(good, 45)
    rc_bad, _, err_bad = finish(bad, 45)
    assert rc == 0, rerr
    res = last_json(rout)
    assert res["output"] == "device" and res["sparse_bytes"] == 0, res
    assert "resume is off" in rerr and "--journal" in rerr  # no journal beside /dev without --journal
    with open(dev, "rb") as d:
        assert d.read(len(payload)) == payload
    assert rc_bad == 6, err_bad
    assert "less than the image" in err_bad and "refusing" in err_bad
    finish(sender, 30)


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from /proc")
def test_a_large_sparse_image_is_received_with_bounded_memory(procs: Procs, tmp_path: Path) -> None:  # noqa: F811
    """The issue's 4 GiB / 100 MiB target, scaled to 1 GiB to stay fast (the 4 GiB run is in the closing note)."""
    image = tmp_path / "image.bin"
    size = 1024 * 1024 * 1024
    sparse_image(image, size, 64 * 1024 * 1024, 1024 * 1024)
    port = free_port()
    # 1,500 Mbit/s: fast, yet a rate one Python receiver keeps up with on a busy 2-core machine.  (Overdriven
    # at 4,000 Mbit/s it falls behind, and its peak RSS reached 110-300 MB; the receive window added for that
    # case bounds the held symbols at 32 MiB, and the rest is noted as open in issue 4's closing note.)
    sender = procs.start(mcdeploy("send", str(image), "--port", str(port), "--control-port", "0", "--rate", "1500",
                                  "--symbol-size", "8800", "--json"))
    out = tmp_path / "out.img"
    t0 = time.monotonic()
    rx = subprocess.Popen(client(port, str(out), "--id", "big"), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    hwm = 0
    while rx.poll() is None and time.monotonic() - t0 < 50:
        try:
            status = Path(f"/proc/{rx.pid}/status").read_text()
        except OSError:
            break
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                hwm = max(hwm, int(line.split()[1]) * 1024)
        time.sleep(0.05)
    rc, rout, rerr = finish(rx, 30)
    assert rc == 0, rerr
    res = last_json(rout)
    assert res["verified"] and res["image_bytes"] == size
    assert 0 < hwm <= 100 * 1024 * 1024, hwm
    with open(image, "rb") as a, open(out, "rb") as b:
        while chunk := a.read(16 * 1024 * 1024):
            assert b.read(len(chunk)) == chunk
    assert finish(sender, 30)[0] == 0
    print(f"1 GiB sparse image: receiver peak RSS {hwm / 2**20:.1f} MiB, {res['seconds']} s, "
          f"{os.stat(out).st_blocks * 512 / 2**20:.1f} MiB allocated")
