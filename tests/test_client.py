"""The client agent: portable by construction, honest about failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clientagent.output import FileOutput, OutputError
from controller import api
from mcproto.messages import DeployRequest
from mcsite.celeryapp import app
from tests.conftest import Site, wait_for

SERVER_ONLY = {"celery", "kombu", "redis", "rich", "pydantic_settings", "billiard", "mcsite", "controller",
               "dpagent"}
LINUX_ONLY = {"fcntl", "termios", "resource", "pwd", "grp", "posix_ipc"}


def test_client_import_path_has_no_server_or_linux_only_modules() -> None:
    code = ("import sys, clientagent.cli, clientagent.transfer, clientagent.output, clientagent.net; "
            "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = set(proc.stdout.split())
    assert not loaded & SERVER_ONLY, loaded & SERVER_ONLY
    assert not loaded & LINUX_ONLY, loaded & LINUX_ONLY


@pytest.mark.parametrize("use_pwrite", [True, False], ids=["pwrite", "seek-write"])
def test_file_output_writes_out_of_order_and_reads_back(tmp_path: Path, use_pwrite: bool) -> None:
    data = os.urandom(100_000)
    out = FileOutput(str(tmp_path / "o"), len(data), use_pwrite=use_pwrite)
    chunks = [(off, data[off:off + 1400]) for off in range(0, len(data), 1400)]
    for off, chunk in reversed(chunks):
        out.write_at(off, chunk)
    out.finish()
    import hashlib

    assert out.sha256() == hashlib.sha256(data).hexdigest()
    out.close()
    assert (tmp_path / "o").read_bytes() == data


def test_file_output_to_unwritable_place_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot write"):
        FileOutput(str(tmp_path / "no" / "such" / "dir" / "x"), 10)


@pytest.mark.integration
def test_portable_fallback_receives_bit_exact(site: Site, tmp_path: Path) -> None:
    """The WinPE path (wildcard bind, seek + write), forced on Linux."""
    image = tmp_path / "img"
    image.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    api.add_image(site.state, str(image), name="portable-img")
    dep_id, _, _ = api.deploy(site.state, app, DeployRequest(image="portable-img", dp=site.dp, clients=1))
    env = {**site.env, "MCDEPLOY_CLIENT_PORTABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "clientagent", "--dp", site.dp_addr, "--out", str(tmp_path / "o"),
                           "--id", "winpe-like", "--deployment", dep_id, "--test-loss", "2", "--wait", "30"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o").read_bytes() == image.read_bytes()


@pytest.fixture
def tiny_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.integration
def test_disk_full_is_reported_with_its_reason_never_verified(site: Site, tmp_path: Path, tiny_disk: Path) -> None:
    image = tmp_path / "big"
    image.write_bytes(os.urandom(3 * 1024 * 1024))
    api.add_image(site.state, str(image), name="too-big-img")
    dep_id, _, _ = api.deploy(site.state, app, DeployRequest(image="too-big-img", dp=site.dp, clients=1))
    proc = site.client("--out", str(tiny_disk / "out.img"), "--id", "small-disk", "--deployment", dep_id,
                       "--wait", "30", "--json")
    assert proc.returncode == 6, proc.stderr
    assert "disk full" in proc.stderr
    assert '"verified": false' in proc.stdout
    dep = wait_for(lambda: (d := site.state.get_deployment(dep_id))["clients"].get("small-disk") and d)
    assert dep["clients"]["small-disk"]["outcome"] == "failed"
    assert "disk full" in dep["clients"]["small-disk"]["reason"]
    assert wait_for(lambda: site.state.get_deployment(dep_id)["state"] == "failed")
