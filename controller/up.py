"""``mcdeploy up``: a one-machine site in the foreground until Ctrl-C.

Server side.  Starts the embedded Redis (persistent when ``--data-dir`` is
given), a controller worker (with the beat that runs the reconciler) and one local DP agent, publishes the Redis URL
so later ``mcdeploy`` commands of this user find the site, and stops all of
it on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

from rich.console import Console

from mcsite.embedded_redis import EmbeddedRedis
from mcsite.procs import ProcessGroup, python_module, site_env
from mcsite.settings import SiteSettings
from mcsite.site import publish_site, unpublish_site


def run_up(dp_name: str, control_port: int, data_dir: str | None) -> int:
    console = Console(stderr=True)
    site = SiteSettings()
    redis = EmbeddedRedis(data_dir=data_dir, persist=bool(data_dir))
    procs = ProcessGroup()

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        redis.start()
        env = site_env(redis.url)
        procs.spawn("controller", python_module("controller", "worker", "--beat"), env)  # + the reconciler
        procs.spawn("dp", python_module("dpagent", "--name", dp_name, "--control-port", str(control_port)), env)
        path = publish_site(site, redis.url)
        console.print(f"[bold green]mcdeploy site up[/]: Redis {redis.binary} on 127.0.0.1:{redis.port} "
                      f"(URL in {path}), controller worker, DP [bold]{dp_name}[/] on udp 127.0.0.1:{control_port}")
        console.print("In another terminal:\n"
                      "  mcdeploy image add ./image.img\n"
                      f"  mcdeploy deploy image.img --dp {dp_name} --clients 1\n"
                      f"  mcdeploy-client --dp 127.0.0.1:{control_port} --out /tmp/out.img\n"
                      "  mcdeploy status\n"
                      "Ctrl-C stops the site.")
        while all(p.poll() is None for _, p in procs.procs):
            time.sleep(0.5)
        dead = [n for n, p in procs.procs if p.poll() is not None]
        console.print(f"[red]{', '.join(dead)} exited; stopping the site[/]")
        return 1
    except KeyboardInterrupt:
        console.print("stopping the site")
        return 0
    finally:
        unpublish_site(site)
        procs.stop()
        redis.stop()
