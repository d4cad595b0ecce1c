"""``mcdeploy send`` / ``mcdeploy receive`` on loopback: real processes, real multicast sockets, no Redis.

Everything stays on 127.0.0.1 with TTL 1 (the commands' defaults).  Ports are picked free per
test, so parallel runs do not meet; every process is started here and ended here by PID; every
wait is bounded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller import standalone

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

SEND_OPTIONS = ["--group", "--port", "--interface", "--ttl", "--control-host", "--control-port", "--rate",
                "--min-receivers", "--start-delay", "--start-at", "--fec", "--block-symbols", "--repair-symbols",
                "--symbol-size",
                "--deployment", "--exit-when-done", "--json"]
RECEIVE_OPTIONS = ["--out", "--group", "--port", "--interface", "--from", "--id", "--wait", "--json", "--journal",
                   "--test-loss"]


def free_port() -> int:
    """A UDP port free on loopback right now (the group's data port, not shared with other runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mcdeploy(*args: str) -> list[str]:
    return [sys.executable, "-m", "controller", *args]


class Procs:
    """Processes of one test: started with pipes, collected with a deadline, ended by PID."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, argv: list[str]) -> subprocess.Popen[str]:
        p = subprocess.Popen(argv, cwd=REPO, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)


@pytest.fixture
def procs() -> Iterator[Procs]:
    group = Procs()
    try:
        yield group
    finally:
        group.stop()


def finish(p: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.bin"
    path.write_bytes(os.urandom(4 * 1024 * 1024))
    return path


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_three_receivers_find_the_sender_by_announce_and_get_bit_exact_copies(
        procs: Procs, image: Path, tmp_path: Path) -> None:
    port = free_port()
    t0 = time.monotonic()
    sender = procs.start(mcdeploy("send", str(image), "--port", str(port), "--control-port", "0",
                                  "--min-receivers", "3", "--json"))
    receivers = [procs.start(mcdeploy("receive", "--out", str(tmp_path / f"out{i}"), "--port", str(port),
                                      "--id", f"rx{i}", "--test-loss", "5", "--test-seed", str(i), "--json",
                                      "--wait", "30"))
                 for i in range(3)]
    results = [finish(p, 60) for p in receivers]
    code, out, err = finish(sender, 30)
    elapsed = time.monotonic() - t0
    for i, (rc, rout, rerr) in enumerate(results):
        assert rc == 0, rerr
        res = last_json(rout)
        assert res["verified"] and res["acknowledged"], res
        assert res["test_dropped"] > 0, res  # the loss knob dropped packets and repair healed them
        assert (tmp_path / f"out{i}").read_bytes() == image.read_bytes()
    assert code == 0, err
    summary = last_json(out)
    assert summary["receivers"] == summary["done"] == 3 and summary["failed"] == 0, summary
    assert summary["image_bytes"] == 4 * 1024 * 1024 and summary["bytes_sent"] >= summary["image_bytes"]
    assert {c["client_id"] for c in summary["clients"]} == {"rx0", "rx1", "rx2"}
    print(f"standalone loopback: {summary['mb_per_s']} MB/s over {summary['seconds']} s, "
          f"{summary['bytes_sent']} bytes sent; whole test {elapsed:.1f} s")


@pytest.mark.integration
@pytest.mark.timeout(90)
@pytest.mark.parametrize("fec, args, k", [
    ("rs16", [], 1024),  # the default: GF(2^16), k = 1024, R = 1024
    ("rs", ["--fec", "rs"], 128),  # zfec
], ids=["rs16-default", "rs"])
def test_each_code_is_bit_exact_under_loss_on_real_sockets(procs: Procs, image: Path, tmp_path: Path, fec: str,
                                                           args: list[str], k: int) -> None:
    port = free_port()
    sender = procs.start(mcdeploy("send", str(image), "--port", str(port), "--control-port", "0",
                                  "--min-receivers", "2", "--json", *args))
    receivers = [procs.start(mcdeploy("receive", "--out", str(tmp_path / f"out{i}"), "--port", str(port),
                                      "--id", f"rx{i}", "--test-loss", "8", "--test-seed", str(i + 10), "--json",
                                      "--wait", "30"))
                 for i in range(2)]
    results = [finish(p, 60) for p in receivers]
    code, out, err = finish(sender, 30)
    for i, (rc, rout, rerr) in enumerate(results):
        assert rc == 0, rerr
        res = last_json(rout)
        assert res["verified"] and res["acknowledged"] and res["test_dropped"] > 0, res
        assert (tmp_path / f"out{i}").read_bytes() == image.read_bytes()
    assert code == 0, err
    summary = last_json(out)
    assert summary["done"] == 2 and summary["fec"] == fec and summary["block_symbols"] == k, summary
    assert summary["repair_symbols"] > 0  # the losses were healed by repair symbols of this code


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_receive_from_address_and_client_agent_discovery_share_one_session(
        procs: Procs, image: Path, tmp_path: Path) -> None:
    """--from skips discovery; `mcdeploy-client --discover` is the same discovery in the client agent."""
    port, control = free_port(), free_port()
    sender = procs.start(mcdeploy("send", str(image), "--port", str(port), "--control-port", str(control),
                                  "--min-receivers", "2", "--deployment", "lab-7", "--json"))
    by_address = procs.start(mcdeploy("receive", "--out", str(tmp_path / "a"), "--from", f"127.0.0.1:{control}",
                                      "--id", "by-address", "--wait", "30"))
    by_group = procs.start([sys.executable, "-m", "clientagent", "--discover", f"239.255.78.1:{port}",
                            "--interface", "127.0.0.1", "--out", str(tmp_path / "b"), "--id", "by-group",
                            "--wait", "30", "--json"])
    rc_a, _, err_a = finish(by_address, 60)
    rc_b, out_b, err_b = finish(by_group, 60)
    code, out, err = finish(sender, 30)
    assert rc_a == 0, err_a
    assert rc_b == 0, err_b
    assert last_json(out_b)["deployment"] == "lab-7"
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == image.read_bytes()
    assert code == 0, err
    assert last_json(out)["done"] == 2


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_failing_receiver_makes_the_sender_fail_with_its_reason(procs: Procs, image: Path, tmp_path: Path) -> None:
    port = free_port()
    sender = procs.start(mcdeploy("send", str(image), "--port", str(port), "--control-port", "0", "--json"))
    receiver = procs.start(mcdeploy("receive", "--out", str(tmp_path / "no" / "such" / "dir" / "x"), "--port",
                                    str(port), "--id", "broken-disk", "--wait", "30"))
    rc, _, rerr = finish(receiver, 40)
    code, out, err = finish(sender, 30)
    assert rc == 6, rerr  # output failed
    assert code == 1, err
    summary = last_json(out)
    assert summary["receivers"] == summary["failed"] == 1 and summary["done"] == 0
    assert "cannot write" in summary["clients"][0]["reason"]
    assert "broken-disk" in err and "cannot write" in err


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_receive_with_nothing_sending_says_so_and_exits_3_in_bounded_time(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(mcdeploy("receive", "--out", str(tmp_path / "x"), "--port", str(free_port()),
                                   "--wait", "2"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no session announced on 239.255.78.1:" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("cmd, options", [("send", SEND_OPTIONS), ("receive", RECEIVE_OPTIONS)])
def test_help_documents_every_option(cmd: str, options: list[str]) -> None:
    proc = subprocess.run(mcdeploy(cmd, "--help"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    missing = [o for o in options if o not in proc.stdout]
    assert not missing, missing
    assert "Exit status" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["send", "IMAGE", "--group", "10.1.2.3"], "not a multicast group"),
    (["send", "IMAGE", "--group", "ff15::78:1"], "is an IPv4 address, but ff15::78:1 is an IPv6 group"),
    (["send", "IMAGE", "--interface", "eth-nonesuch"], "must be an IPv4 address"),
    (["send", "IMAGE", "--ttl", "300"], "--ttl"),
    (["send", "/no/such/file"], "cannot read /no/such/file"),
    (["send", "IMAGE", "--fec", "rs", "--block-symbols", "1024"], "--block-symbols must be 1..255 with --fec rs"),
    (["send", "IMAGE", "--fec", "rs", "--repair-symbols", "64"], "--repair-symbols applies to --fec rs16 only"),
    (["send", "IMAGE", "--symbol-size", "1401"], "--symbol-size must be even with --fec rs16"),
    (["receive", "--out", "X", "--from", "host:99999"], "HOST:PORT"),
    (["receive", "--out", "X", "--group", "10.1.2.3"], "not a multicast group"),
    (["receive", "--out", "X", "--test-loss", "100"], "--test-loss"),
])
def test_usage_errors_are_one_line_and_exit_2(image: Path, args: list[str], needle: str) -> None:
    args = [str(image) if a == "IMAGE" else a for a in args]
    proc = subprocess.run(mcdeploy(*args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.parametrize("control, interface, announced", [
    ("127.0.0.1", "127.0.0.1", ""),  # the packets' source: receivers use it
    ("0.0.0.0", "127.0.0.1", ""),
    ("::", "eth0", ""),
    ("fe80::1%eth0", "eth0", ""),  # link-local: the scope comes with the packet, not the string
    ("fd00:77::1", "m0s", "fd00:77::1"),
    ("10.0.0.5", "10.0.0.6", "10.0.0.5"),
])
def test_announce_names_the_control_host_only_when_the_source_would_be_wrong(
        control: str, interface: str, announced: str) -> None:
    assert standalone._announced_host(control, interface) == announced
