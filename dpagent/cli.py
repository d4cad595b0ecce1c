"""``mcdeploy-dp``: start a DP agent (Celery worker on ``dp.<name>`` + UDP control port).

Server side.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading

from celery.signals import worker_shutting_down

from dpagent import runtime
from dpagent.host import SessionHost
from dpagent.imageserver import ImageServer
from dpagent.relay import Relay
from mcproto.errors import McdeployError
from mcproto.keyexchange import fingerprint
from mcsite import identity as identity_key
from mcsite.celeryapp import app, configure, dp_queue
from mcsite.logs import setup_logging
from mcsite.settings import ControllerSettings, DPSettings, SiteSettings
from mcsite.site import resolve_redis_url
from mcsite.state import State

log = logging.getLogger("mcdeploy.dp")

VERSION = "0.1.0"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcdeploy-dp",
        description="Run a distribution point agent: consumes queue dp.NAME on the site's Redis, "
        "listens for clients on a UDP control port and multicasts sessions. Settings come from "
        "MCDEPLOY_DP_* environment variables or the [dp] table of $MCDEPLOY_CONFIG; options here "
        "override them.",
    )
    p.add_argument("--name", help="DP name; its queue is dp.NAME (default: dp1)")
    p.add_argument("--control-host", help="address of the UDP control port (default 127.0.0.1)")
    p.add_argument("--control-port", type=int, help="UDP control port (default 47100; 0 = any free)")
    p.add_argument("--http-port", type=int, help="TCP port of the unicast fallback's HTTP server on the control "
                   "host (default 0 = any free port, named in offers; -1 = off)")
    p.add_argument("--mcast-interface", help="IPv4 address multicast leaves by (default 127.0.0.1)")
    p.add_argument("--ttl", type=int, dest="mcast_ttl", help="multicast TTL (default 1)")
    p.add_argument("--max-rate-mbps", type=float, help="ceiling of any session's rate (default 400)")
    p.add_argument("--concurrency", type=int, help="sessions run at once (default 4)")
    p.add_argument("--loglevel", default="INFO", help="log level (default INFO)")
    p.add_argument("--log-format", choices=("text", "json"), help="log lines as key=value text (default) or JSON "
                   "(MCDEPLOY_LOG_FORMAT)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.loglevel, args.log_format)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("loglevel", "log_format")}
    try:
        settings = DPSettings(**overrides)
        site = SiteSettings()
        url = resolve_redis_url(site)
        configure(app, url)
        state = State.from_url(url, site.key_prefix)
        state.ping()
        identity = identity_key.load_or_create(settings.key_file or identity_key.default_key_path(settings.name))
        host = SessionHost(settings.name, settings.control_host, settings.control_port).start()
        if settings.http_port >= 0:
            try:
                host.http = ImageServer(settings.control_host, settings.http_port, settings.http_rate_mbps,
                                        advertise=settings.advertise_host).start()
            except McdeployError:
                host.stop()
                raise
    except McdeployError as exc:
        print(f"mcdeploy-dp: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # pydantic validation of settings
        print(f"mcdeploy-dp: error: invalid setting: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    try:
        spool = None if settings.spool_dir == "memory" else (
            settings.spool_dir or str(identity_key.default_spool_dir(settings.name)))
        relay = Relay(app, state, spool)
    except McdeployError as exc:
        print(f"mcdeploy-dp: error: {exc}", file=sys.stderr)
        host.stop()
        return 2
    runtime.install(runtime.Runtime(settings, host, relay, state, identity))
    dp_fingerprint = fingerprint(identity.public_key())
    control = f"{settings.advertise_host or host.address[0]}:{host.address[1]}"
    unicast = host.http.url(0).rsplit("/sessions/", 1)[0] if host.http is not None else "-"
    stop = threading.Event()

    ctl = ControllerSettings()  # the site's multicast ranges, which the controller allocates from
    group_range = f"{ctl.group_prefix}1-{ctl.group_prefix}{'ffff' if ':' in ctl.group_prefix else '254'}"

    def heartbeat() -> None:
        info = {"name": settings.name, "control": control, "version": VERSION, "pid": os.getpid(),
                "hostname": socket.gethostname(), "max_rate_mbps": settings.max_rate_mbps,
                "mcast_interface": settings.mcast_interface, "mcast_interface6": settings.mcast_interface6 or "-",
                "interfaces": ",".join(x for x in (settings.control_host, settings.mcast_interface,
                                                   settings.mcast_interface6) if x),
                "ttl": settings.mcast_ttl, "group_range": group_range, "port_range": f"{ctl.port_min}-{ctl.port_max}",
                "concurrency": settings.concurrency, "key_fingerprint": dp_fingerprint, "encrypt": settings.encrypt,
                "unicast_http": unicast}
        while True:
            try:
                cfg = state.dp_config(settings.name)
                active = host.active_sessions
                state.register_dp(settings.name, {**info, "sessions": active,
                                                  "capacity": max(0, settings.concurrency - active),
                                                  "max_clients": cfg.get("max_clients") or "-",
                                                  "drained": cfg.get("drained") == "1",
                                                  "bad_datagrams": host.bad_datagrams},
                                  ttl=3 * settings.heartbeat_s)
                relay.flush()
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            if stop.wait(settings.heartbeat_s):
                return

    threading.Thread(target=heartbeat, name="dp-heartbeat", daemon=True).start()

    @worker_shutting_down.connect
    def _on_shutdown(**_: object) -> None:
        stop.set()
        host.stop()
        if host.http is not None:
            host.http.stop()

    log.info("DP agent %s: queue %s, control port %s, multicast via %s ttl %d, unicast fallback %s, identity %s%s",
             settings.name, dp_queue(settings.name), control, settings.mcast_interface, settings.mcast_ttl, unicast,
             dp_fingerprint,
             "" if settings.encrypt else " — ENCRYPTION OFF: sessions are sent in the clear")
    app.worker_main([
        "worker", "-Q", dp_queue(settings.name), "-n", f"dp-{settings.name}@%h", "--pool", "threads",
        "-c", str(settings.concurrency), "--loglevel", args.loglevel, "-E", "--without-gossip",
        "--without-mingle",
    ])
    stop.set()
    return 0
