"""Starting and stopping the processes of a one-machine site (demo, `mcdeploy up`, tests).

Server side.  We end only processes we started, by their PID: terminate,
wait, then kill; never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO, Any


class ProcessGroup:
    """Child processes started together and stopped together (also on Ctrl-C)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[Any]]] = []

    def spawn(self, name: str, args: Sequence[str], env: dict[str, str] | None = None,
              stdout: IO[Any] | int | None = None, stderr: IO[Any] | int | None = None) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(list(args), env=env, stdout=stdout, stderr=stderr,
                                stdin=subprocess.DEVNULL)
        self.procs.append((name, proc))
        return proc

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM everyone we started, wait up to ``timeout``, then SIGKILL the rest."""
        for _, p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.procs.clear()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def python_module(module: str, *args: str) -> list[str]:
    """Command line running one of our modules with this interpreter (no PATH lookup needed)."""
    return [sys.executable, "-m", module, *args]


def site_env(redis_url: str, **extra: str) -> dict[str, str]:
    """Environment for child processes of a site: the Redis URL, unbuffered output."""
    env = dict(os.environ)
    env["MCDEPLOY_REDIS_URL"] = redis_url
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
