"""``mcdeploy demo``: a whole deployment on one machine, every role a real process.

Server side.  Starts a private Redis (the embedded default), a controller
worker (with the reconciler's beat), one DP agent (or ``--dps N``: N agents,
the clients spread over them by boundary group) and N client agents on loopback; makes a random image
(or uses one); deploys it; shows live progress; prints a summary.  Exit 0
only if every client verified its image and was acknowledged.  Everything it
started is stopped again, also on Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controller import api
from mcproto import manifest as mf
from mcproto.errors import ConfigError
from mcproto.fec import layout_for
from mcproto.messages import DeployRequest
from mcsite import identity
from mcsite.celeryapp import app, configure
from mcsite.embedded_redis import EmbeddedRedis
from mcsite.procs import ProcessGroup, python_module, site_env
from mcsite.settings import ControllerSettings, DPSettings
from mcsite.state import State


@dataclass
class DemoOptions:
    clients: int = 3
    size: int = 64 * 1024 * 1024
    image: str | None = None
    loss: float = 0.0
    keep: str | None = None
    json: bool = False
    timeout: float = 300.0
    max_rate_mbps: float = 800.0
    dps: int = 1


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_image(path: str, size: int, seed: int | None = None) -> str:
    """Write ``size`` random bytes to ``path``; returns the SHA-256."""
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 4 * 1024 * 1024))
            fh.write(chunk)
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()


def run_demo(opts: DemoOptions) -> int:
    """Run the demo; returns the process exit code."""
    out = Console(stderr=opts.json)
    err = Console(stderr=True)
    workdir = tempfile.mkdtemp(prefix="mcdeploy-demo-")
    outdir = opts.keep or workdir
    os.makedirs(outdir, exist_ok=True)
    procs = ProcessGroup()
    redis = EmbeddedRedis()
    try:
        return _run(opts, out, err, workdir, outdir, procs, redis)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: stopping everything the demo started[/]")
        return 130
    finally:
        procs.stop()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(opts: DemoOptions, out: Console, err: Console, workdir: str, outdir: str, procs: ProcessGroup,
         redis: EmbeddedRedis) -> int:
    err.print("[bold]mcdeploy demo[/]: starting a private Redis, a controller worker, "
              f"{'a DP agent' if opts.dps == 1 else f'{opts.dps} DP agents'} and {opts.clients} client(s) on loopback")
    redis.start()
    configure(app, redis.url)
    state = State.from_url(redis.url)
    logdir = os.path.join(opts.keep or workdir, "logs")
    os.makedirs(logdir, exist_ok=True)
    # The demo's own identities, in its work directory: it leaves no keys behind.
    ctl = ControllerSettings(key_file=os.path.join(workdir, "controller.key"))
    env = site_env(redis.url, MCDEPLOY_DP_KEY_FILE=os.path.join(workdir, "dp-identity.key"),
                   MCDEPLOY_CONTROLLER_KEY_FILE=ctl.key_file,
                   MCDEPLOY_DP_SPOOL_DIR=os.path.join(workdir, "dp-spool"))
    port = free_udp_port()
    ctl_log = open(os.path.join(logdir, "controller.log"), "wb")  # noqa: SIM115
    dp_log = open(os.path.join(logdir, "dp.log"), "wb")  # noqa: SIM115
    procs.spawn("controller", python_module("controller", "worker", "--beat", "--loglevel", "WARNING"), env,
                stdout=ctl_log, stderr=subprocess.STDOUT)
    if opts.dps > 1:
        return _run_spread(opts, out, err, workdir, outdir, procs, redis, state, env, ctl, logdir)
    procs.spawn("dp", python_module("dpagent", "--name", "demo-dp", "--control-port", str(port),
                                    "--max-rate-mbps", str(opts.max_rate_mbps), "--loglevel", "INFO"),
                env, stdout=dp_log, stderr=subprocess.STDOUT)

    image = _demo_image(opts, state, workdir, ctl)
    controller_key = mf.public_bytes(identity.controller_key(ctl.key_file).public_key()).hex()
    size = int(image["size"])

    deadline = time.monotonic() + 30
    while state.get_dp("demo-dp") is None:
        if time.monotonic() > deadline or procs.procs[1][1].poll() is not None:
            raise ConfigError("the DP agent did not start; its log:\n" + _tail(os.path.join(logdir, "dp.log")))
        time.sleep(0.1)

    dp_info = state.get_dp("demo-dp") or {}
    dp_fingerprint = dp_info.get("key_fingerprint", "")
    dp_sealing = dp_info.get("encrypt") == "True" and bool(dp_fingerprint)
    t0 = time.monotonic()
    dep_id, job, _ = api.deploy(state, app, DeployRequest(
        image="demo-image", dp="demo-dp", clients=opts.clients, start_timeout_s=30.0,
        max_rate_mbps=opts.max_rate_mbps), ctl)
    err.print(f"deployment [bold]{dep_id}[/]: {size / 2**20:.1f} MiB to {opts.clients} client(s) on "
              f"{job.group}:{job.port}, receive loss {opts.loss:g} %")
    clients = []
    for i in range(opts.clients):
        cid = f"demo-pc{i + 1}"
        path = os.path.join(outdir, f"{cid}.img")
        # Pin the controller's key, as boot media would: every chunk is checked against its signed manifest.
        args = ["--dp", f"127.0.0.1:{port}", "--out", path, "--id", cid, "--json", "--quiet", "--wait", "60",
                "--controller-key", controller_key]
        if dp_sealing:  # pin the DP's identity, as boot media would
            args += ["--dp-key", dp_fingerprint]
        if opts.loss:
            args += ["--test-loss", str(opts.loss), "--test-seed", str(i + 1)]
        proc = procs.spawn(cid, python_module("clientagent", *args), env, stdout=subprocess.PIPE,
                           stderr=open(os.path.join(logdir, f"{cid}.log"), "wb"))  # noqa: SIM115
        clients.append((cid, path, proc))

    dps = DPSettings()
    total_blocks = layout_for(dps.fec, size, dps.symbol_size, dps.block_symbols, dps.repair_symbols).blocks or 1
    results: dict[str, dict[str, Any]] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f} %"),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=err,
                  transient=opts.json) as bar:
        tasks = {cid: bar.add_task(cid, total=total_blocks, status="joining") for cid, _, _ in clients}
        while True:
            dep = state.get_deployment(dep_id)
            for cid, _, proc in clients:
                got = dep["progress"].get(cid, 0)
                res = dep["clients"].get(cid)
                status = res["outcome"] if res else ("receiving" if got else "joining")
                if cid not in results and proc.poll() is not None:
                    results[cid] = _client_json(proc)
                    got = total_blocks if results[cid].get("exit_code") == 0 else got
                bar.update(tasks[cid], completed=got, status=status)
            if len(results) == len(clients) and dep.get("session_state") in ("finished", "failed"):
                break
            if len(results) == len(clients) and time.monotonic() - t0 > 10 + max(
                    (r.get("seconds", 0) for r in results.values()), default=0):
                break  # every client is out; don't wait forever for the controller's record
            if time.monotonic() - t0 > opts.timeout:
                err.print(f"[red]demo timed out after {opts.timeout:g} s[/]")
                break
            time.sleep(0.2)
    seconds = time.monotonic() - t0
    dep = state.get_deployment(dep_id)
    return _summarize(opts, out, err, dep, clients, results, image, seconds, outdir,
                      {"redis_version": redis.version or "", "redis_binary": redis.binary or ""})


def _demo_image(opts: DemoOptions, state: State, workdir: str, ctl: ControllerSettings) -> dict[str, str]:
    if opts.image:
        image_path = os.path.abspath(opts.image)
        if not os.path.isfile(image_path):
            raise ConfigError(f"no such image file: {image_path}")
    else:
        image_path = os.path.join(workdir, "demo-image.img")
        make_image(image_path, opts.size)
    return api.add_image(state, image_path, name="demo-image", ctl=ctl)


def _run_spread(opts: DemoOptions, out: Console, err: Console, workdir: str, outdir: str, procs: ProcessGroup,
                redis: EmbeddedRedis, state: State, env: dict[str, str], ctl: ControllerSettings,
                logdir: str) -> int:
    """``--dps N``: N DP agents, one boundary group each (127.0.<i>.0/24), the clients spread over them.

    Every client is recorded with an address in one group's subnet (as ``client add --ip`` would),
    the deployment targets the collection ``demo``, and each client agent joins the DP its boundary
    group maps it to, with its own MAC (they share a host).
    """
    from controller import deployments
    from controller.inventory import Inventory

    names = [f"demo-dp{i + 1}" for i in range(opts.dps)]
    ports = {}
    for name in names:
        ports[name] = free_udp_port()
        dp_env = {**env, "MCDEPLOY_DP_KEY_FILE": os.path.join(workdir, f"{name}.key"),
                  "MCDEPLOY_DP_SPOOL_DIR": os.path.join(workdir, f"{name}-spool")}
        procs.spawn(name, python_module("dpagent", "--name", name, "--control-port", str(ports[name]),
                                        "--max-rate-mbps", str(opts.max_rate_mbps), "--loglevel", "INFO"),
                    dp_env, stdout=open(os.path.join(logdir, f"{name}.log"), "wb"),  # noqa: SIM115
                    stderr=subprocess.STDOUT)
    image = _demo_image(opts, state, workdir, ctl)
    controller_key = mf.public_bytes(identity.controller_key(ctl.key_file).public_key()).hex()
    size = int(image["size"])
    deadline = time.monotonic() + 30
    while any(state.get_dp(n) is None for n in names):
        dead = [n for n, p in procs.procs if p.poll() is not None]
        if time.monotonic() > deadline or dead:
            raise ConfigError(f"DP agent(s) did not start ({', '.join(dead) or 'timeout'}); log:\n"
                              + _tail(os.path.join(logdir, f"{(dead or names)[0]}.log")))
        time.sleep(0.1)
    inv = Inventory(state)
    inv.create_collection("demo")
    for i, name in enumerate(names):  # fallback: the next DP of the ring
        inv.add_boundary(f"demo-site{i + 1}", [f"127.0.{i + 1}.0/24"], [name, names[(i + 1) % len(names)]])
    cids = [f"demo-pc{k + 1}" for k in range(opts.clients)]
    for k, cid in enumerate(cids):
        inv.add_client(cid, f"02:00:00:de:{k // 256:02x}:{k % 256:02x}", None,
                       f"127.0.{k % opts.dps + 1}.{k // opts.dps + 10}", collection="demo")
    t0 = time.monotonic()
    dep_id, jobs, _ = api.deploy_all(state, app, DeployRequest(
        image="demo-image", collection="demo", start_timeout_s=30.0, max_rate_mbps=opts.max_rate_mbps), ctl)
    dp_of = {t.name: j.dp for j in jobs for t in j.targets or []}
    err.print(f"deployment [bold]{dep_id}[/]: {size / 2**20:.1f} MiB to collection demo ({opts.clients} clients) "
              f"in {len(jobs)} session(s), receive loss {opts.loss:g} %")
    spread = Table(title="clients by boundary group")
    for col in ("DP", "boundary subnet", "session group:port", "clients"):
        spread.add_column(col)
    for i, name in enumerate(names):
        job = next((j for j in jobs if j.dp == name), None)
        spread.add_row(name, f"127.0.{i + 1}.0/24", f"{job.group}:{job.port}" if job else "-",
                       ", ".join(c for c in cids if dp_of.get(c) == name))
    err.print(spread)
    fingerprints = {n: (state.get_dp(n) or {}).get("key_fingerprint", "") for n in names}
    clients = []
    for k, cid in enumerate(cids):
        path = os.path.join(outdir, f"{cid}.img")
        dp = dp_of[cid]
        args = ["--dp", f"127.0.0.1:{ports[dp]}", "--out", path, "--id", cid, "--mac",
                f"02:00:00:de:{k // 256:02x}:{k % 256:02x}", "--json", "--quiet", "--wait", "60",
                "--controller-key", controller_key]
        if fingerprints[dp]:
            args += ["--dp-key", fingerprints[dp]]
        if opts.loss:
            args += ["--test-loss", str(opts.loss), "--test-seed", str(k + 1)]
        proc = procs.spawn(cid, python_module("clientagent", *args), env, stdout=subprocess.PIPE,
                           stderr=open(os.path.join(logdir, f"{cid}.log"), "wb"))  # noqa: SIM115
        clients.append((cid, path, proc))
    results: dict[str, dict[str, Any]] = {}
    while True:
        for cid, _, proc in clients:
            if cid not in results and proc.poll() is not None:
                results[cid] = _client_json(proc)
        dep = state.get_deployment(dep_id)
        if len(results) == len(clients) and dep["state"] in ("finished", "failed", "cancelled"):
            break
        if len(results) == len(clients) and time.monotonic() - t0 > 10 + max(
                (r.get("seconds", 0) for r in results.values()), default=0):
            break
        if time.monotonic() - t0 > opts.timeout:
            err.print(f"[red]demo timed out after {opts.timeout:g} s[/]")
            break
        time.sleep(0.2)
    seconds = time.monotonic() - t0
    from controller import watch

    err.print(watch.frame(state, [dep_id])[0])
    dep = state.get_deployment(dep_id)
    dep["bytes_sent"] = sum(int(s.get("bytes_sent") or 0) for s in state.list_sessions(dep_id))
    rows = deployments.report(state, dep_id)["clients"]
    per_dp = {n: sum(1 for r in rows if r["dp"] == n and r["state"] == "finished") for n in names}
    return _summarize(opts, out, err, dep, clients, results, image, seconds, outdir,
                      {"redis_version": redis.version or "", "redis_binary": redis.binary or "", "dps": len(names),
                       "clients_per_dp": {n: sum(1 for c in cids if dp_of.get(c) == n) for n in names},
                       "finished_per_dp": per_dp, "sessions": len(jobs)})


def _client_json(proc: subprocess.Popen[Any]) -> dict[str, Any]:
    data = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    lines = [ln for ln in data.splitlines() if ln.startswith("{")]
    try:
        return json.loads(lines[-1]) if lines else {"exit_code": proc.returncode, "reason": "no result"}
    except ValueError:
        return {"exit_code": proc.returncode, "reason": "unreadable result"}


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, "rb") as fh:
            return b"\n".join(fh.read().splitlines()[-n:]).decode(errors="replace")
    except OSError:
        return "(no log)"


def _summarize(opts: DemoOptions, out: Console, err: Console, dep: dict[str, Any], clients: list[Any],
               results: dict[str, dict[str, Any]], image: dict[str, str], seconds: float, outdir: str,
               extra: dict[str, Any]) -> int:
    size = int(image["size"])
    table = Table(title=f"deployment {dep.get('id')} — {dep.get('state')}")
    for col in ("client", "verified", "acked", "bytes", "transfer s", "MB/s", "recorded", "reason"):
        table.add_column(col)
    verified = acked = 0
    transfer_seconds = 0.0
    for cid, _path, _ in clients:
        r = results.get(cid, {})
        rec = dep["clients"].get(cid, {})
        ok_v = bool(r.get("verified")) and r.get("sha256") == image["sha256"]
        ok_a = bool(r.get("acknowledged")) and r.get("exit_code") == 0 and rec.get("outcome") == "done"
        verified += ok_v
        acked += ok_a
        secs = float(r.get("transfer_seconds", 0.0))
        transfer_seconds = max(transfer_seconds, secs)
        table.add_row(cid, "yes" if ok_v else "[red]no[/]", "yes" if ok_a else "[red]no[/]", str(size),
                      f"{secs:.2f}", f"{size / secs / 1e6:.1f}" if secs and ok_v else "-",
                      rec.get("outcome", "-"), r.get("reason", "") if not ok_a else "")
    out.print(table)
    bytes_sent = int(dep.get("bytes_sent", 0) or 0)
    summary = {
        "clients": len(clients), "verified": verified, "acked": acked, "image_bytes": size,
        "seconds": round(seconds, 3), "transfer_seconds": round(transfer_seconds, 3),
        "mb_per_s": round(size / transfer_seconds / 1e6, 1) if transfer_seconds else 0.0,
        "aggregate_mb_per_s": round(size * verified / transfer_seconds / 1e6, 1) if transfer_seconds else 0.0,
        "loss_percent": opts.loss, "bytes_sent": bytes_sent,
        "wire_overhead": round(bytes_sent / size, 3) if size else 0.0,
        "deployment": dep.get("id"), "state": dep.get("state"),
        "encrypted": bool(results) and all(r.get("encrypted") for r in results.values()),
        "manifest_signed": bool(results) and all(r.get("manifest") == "signed" for r in results.values()),
        "rejected_chunks": sum(int(r.get("rejected_chunks", 0)) for r in results.values()),
        "rejected_packets": sum(int(r.get("rejected", 0)) for r in results.values()),
        "foreign_packets": sum(int(r.get("foreign", 0)) for r in results.values()), **extra,
    }
    ok = verified == acked == len(clients)
    err.print(f"{'[green]OK' if ok else '[red]FAILED'}[/]: {verified}/{len(clients)} verified, "
              f"{acked}/{len(clients)} acknowledged; {size / 2**20:.1f} MiB in {transfer_seconds:.2f} s per client "
              f"({summary['mb_per_s']} MB/s), {seconds:.2f} s end to end, wire bytes {summary['wire_overhead']}x "
              "the image")
    if opts.keep:
        err.print(f"outputs kept in {outdir}")
    if opts.json:
        print(json.dumps(summary))
    return 0 if ok else 1
