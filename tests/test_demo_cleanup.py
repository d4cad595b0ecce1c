"""The demo stops everything it started, also when the operator presses Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_every_process_the_demo_started(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mcdeploy"), "demo", "--clients", "2", "--size", "256MiB",
         "--rate", "40", "--keep", str(tmp_path / "keep")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        # Wait until the transfer is under way: Redis, controller, DP and both clients exist.
        started = wait_for(lambda: len(_descendants(demo.pid)) >= 5 and list((tmp_path / "keep").glob("*.img")),
                           timeout=60)
        assert started, "demo did not get going"
        time.sleep(1.0)
        spawned = _descendants(demo.pid)
        os.killpg(demo.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    assert demo.returncode == 130
    assert wait_for(lambda: not [p for p in spawned if _alive(p)], timeout=15), [p for p in spawned if _alive(p)]
