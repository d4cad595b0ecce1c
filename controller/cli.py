"""``mcdeploy``: the operator's command line (and the controller worker, demo and one-machine site).

Server side.  Every operator mistake (unknown image, unknown DP, no Redis)
ends in one clear line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from mcproto.errors import ConfigError, McdeployError
from mcproto.messages import ALL_MESSAGES, DeployRequest

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64MiB', '64M', '1.5GB', '1000' -> bytes (K/M/G/T are binary with or without 'i')."""
    m = SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64MiB)")
    num, unit, _ = m.groups()
    power = " kmgt".index(unit.lower() or " ")
    return int(float(num) * (1024**power))


def parse_time(text: str) -> float:
    """ISO 8601 local time ('2026-12-01T20:00') or Unix seconds -> Unix seconds."""
    import datetime as dt

    try:
        return float(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (try 2026-12-01T20:00)") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcdeploy", description="Multicast OS-image deployment: operator CLI. "
                                "Uses MCDEPLOY_REDIS_URL, or the site a running `mcdeploy up` published.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="a whole deployment on this machine (private Redis, real processes)")
    d.add_argument("--clients", type=int, default=3, help="client agents to start (default 3)")
    d.add_argument("--size", type=parse_size, default=64 * 1024 * 1024, help="random image size (default 64MiB)")
    d.add_argument("--image", help="deploy this file instead of a random image")
    d.add_argument("--loss", type=float, default=0.0, help="receive loss %% at each client (test feature)")
    d.add_argument("--keep", metavar="DIR", help="leave each client's output in DIR")
    d.add_argument("--json", action="store_true", help="last line of stdout: one JSON object of figures")
    d.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    d.add_argument("--rate", type=float, default=800.0, help="max send rate in Mbit/s (default 800)")
    d.add_argument("--dps", type=int, default=1, help="DP agents to start (default 1); with more, the clients are "
                   "spread over them by boundary group (one collection deployment, one session per DP)")

    u = sub.add_parser("up", help="run a one-machine site (Redis, controller worker, one DP) until Ctrl-C")
    u.add_argument("--dp-name", default="local", help="name of the local DP (default local)")
    u.add_argument("--control-port", type=int, default=47100, help="its UDP control port (default 47100)")
    u.add_argument("--data-dir", help="keep the site's Redis data (AOF) here across restarts")

    w = sub.add_parser("worker", help="run the controller worker (queue 'controller')")
    w.add_argument("--concurrency", type=int, default=4)
    w.add_argument("--loglevel", default="INFO")
    w.add_argument("--beat", action="store_true", help="also run the beat that schedules the reconciler "
                   "(every MCDEPLOY_RECONCILE_INTERVAL_S, default 10 s)")
    w.add_argument("--log-format", choices=("text", "json"), help="log lines as key=value text (default) or JSON "
                   "(MCDEPLOY_LOG_FORMAT)")
    b = sub.add_parser("beat", help="run only the beat that schedules the reconciler (controller.reconcile)")
    b.add_argument("--loglevel", default="INFO")
    b.add_argument("--log-format", choices=("text", "json"))

    s = sub.add_parser("schema", help="print the JSON Schema of every message and task body")
    s.add_argument("--type", dest="msg_type", help="only this message type (e.g. deploy_request)")

    k = sub.add_parser("key", help="show the controller's public key, for clients to pin (--controller-key)",
                       description="The controller signs every image manifest with its Ed25519 key (created on "
                       "first use; MCDEPLOY_CONTROLLER_KEY_FILE). Put the public key on the clients' boot media "
                       "as mcdeploy-client --controller-key KEY: they then commit only data the manifest vouches for.")
    k.add_argument("--json", action="store_true")

    img = sub.add_parser("image", help="manage images").add_subparsers(dest="image_cmd", required=True)
    ia = img.add_parser("add", help="record a file as an image: size, SHA-256, and a manifest signed by the "
                        "controller's key (a digest per chunk, which clients check before committing)")
    ia.add_argument("path")
    ia.add_argument("--name", help="image name (default: the file name)")
    img.add_parser("list", help="list images")
    ish = img.add_parser("show", help="show one image")
    ish.add_argument("name")

    dep = sub.add_parser(
        "deploy", help="deployments: create (also `deploy IMAGE --dp DP --clients N`), list, show, cancel, retry, "
        "report", description="`mcdeploy deploy IMAGE ...` is short for `mcdeploy deploy create IMAGE ...`."
    ).add_subparsers(dest="deploy_cmd", required=True, metavar="ACTION")
    dc = dep.add_parser("create", help="deploy an image to a collection (one session per DP its clients map to) "
                        "or to any N clients of one DP")
    _add_deploy_options(dc)
    dl = dep.add_parser("list", help="deployments, newest first")
    dl.add_argument("--json", action="store_true")
    dsh = dep.add_parser("show", help="one deployment: states with timings, sessions, every client")
    dsh.add_argument("deployment")
    dsh.add_argument("--json", action="store_true")
    dca = dep.add_parser("cancel", help="stop a deployment: its DPs abort their sessions, its clients are cancelled")
    dca.add_argument("deployment")
    dca.add_argument("--reason", default="cancelled by the operator")
    dre = dep.add_parser("retry", help="new sessions for the clients of an ended deployment that failed "
                         "(or were cancelled)")
    dre.add_argument("deployment")
    drp = dep.add_parser("report", help="a deployment's report: one row per client (state, reason, timings)")
    drp.add_argument("deployment")
    drp.add_argument("--format", choices=("csv", "json"), default="csv")
    drp.add_argument("--output", "-o", metavar="FILE", help="write it here (default: stdout)")

    cl = sub.add_parser("client", help="client machines (by MAC and SMBIOS UUID)").add_subparsers(
        dest="client_cmd", required=True, metavar="ACTION")
    ca = cl.add_parser("add", help="add a client (the same identity again is a no-op)")
    ca.add_argument("name")
    ca.add_argument("--mac", help="its MAC address")
    ca.add_argument("--uuid", dest="smbios_uuid", help="its SMBIOS UUID")
    ca.add_argument("--ip", help="its last-known address (boundary groups map it to a DP); learnt from results too")
    ca.add_argument("--collection", help="also add it to this collection")
    cli_ = cl.add_parser("list", help="list clients")
    cli_.add_argument("--json", action="store_true")
    csh = cl.add_parser("show", help="show one client")
    csh.add_argument("name")
    crm = cl.add_parser("remove", help="remove a client (and from every collection)")
    crm.add_argument("name")
    cim = cl.add_parser("import", help="import clients from a CSV: name,mac,uuid[,collection] (header optional); "
                        "any bad row (reported by line) means nothing is imported")
    cim.add_argument("file")
    cim.add_argument("--collection", help="also put every imported client into this collection")

    co = sub.add_parser("collection", help="collections: named sets of clients").add_subparsers(
        dest="collection_cmd", required=True, metavar="ACTION")
    cc = co.add_parser("create", help="create a collection")
    cc.add_argument("name")
    col = co.add_parser("list", help="list collections")
    col.add_argument("--json", action="store_true")
    cs = co.add_parser("show", help="a collection's clients")
    cs.add_argument("name")
    cs.add_argument("--json", action="store_true")
    cad = co.add_parser("add", help="add existing clients to a collection")
    cad.add_argument("name")
    cad.add_argument("clients", nargs="+")
    crem = co.add_parser("remove", help="remove clients from a collection")
    crem.add_argument("name")
    crem.add_argument("clients", nargs="+")
    cdel = co.add_parser("delete", help="delete a collection (its clients stay)")
    cdel.add_argument("name")
    cimp = co.add_parser("import", help="import clients from a CSV (name,mac,uuid[,collection]) into a collection")
    cimp.add_argument("name")
    cimp.add_argument("file")

    bo = sub.add_parser("boundary", help="boundary groups: client subnets -> DPs").add_subparsers(
        dest="boundary_cmd", required=True, metavar="ACTION")
    ba = bo.add_parser("add", help="map subnets to DPs in fallback order (overlapping another group is refused)")
    ba.add_argument("name")
    ba.add_argument("--subnet", action="append", required=True, metavar="CIDR",
                    help="IPv4 or IPv6 subnet, e.g. 10.1.0.0/16 or 2001:db8:1::/48 (repeat, or comma-separate)")
    ba.add_argument("--dp", required=True, metavar="DP[,DP2...]", help="DPs in fallback order")
    bl = bo.add_parser("list", help="list boundary groups")
    bl.add_argument("--json", action="store_true")
    br = bo.add_parser("remove", help="remove a boundary group")
    br.add_argument("name")

    st = sub.add_parser("status", help="deployments, or one deployment's clients (--watch: live progress bars)")
    st.add_argument("deployment", nargs="?")
    st.add_argument("--json", action="store_true")
    st.add_argument("--watch", action="store_true", help="live progress bars per deployment and per client "
                    "until every shown deployment ended (Ctrl-C leaves)")
    st.add_argument("--once", action="store_true", help="with --watch: draw the bars once and exit (for scripts)")
    st.add_argument("--interval", type=float, default=1.0, help="with --watch: seconds between refreshes "
                    "(0.2-60, default 1)")
    st.add_argument("--all", action="store_true", help="with --watch and no DEPLOYMENT: also ended deployments")

    dp = sub.add_parser("dp", help="distribution points: list, show, drain, undrain, set").add_subparsers(
        dest="dp_cmd", required=True, metavar="ACTION")
    dpl = dp.add_parser("list", help="registered DPs: alive, drained, sessions, capacity, rate")
    dpl.add_argument("--json", action="store_true")
    dps = dp.add_parser("show", help="one DP: its registration (interfaces, ranges, capacity), settings, sessions")
    dps.add_argument("name")
    dps.add_argument("--json", action="store_true")
    dpd = dp.add_parser("drain", help="the DP finishes its running sessions but gets no new ones (deployments "
                        "map its clients to the next DP of their boundary group)")
    dpd.add_argument("name")
    dpu = dp.add_parser("undrain", help="the DP gets new sessions again")
    dpu.add_argument("name")
    dpset = dp.add_parser("set", help="change a DP's settings at run time (read when each session opens)")
    dpset.add_argument("name")
    dpset.add_argument("--max-rate", type=float, metavar="MBPS", help="ceiling of its sessions' rate (0: back to "
                       "the agent's own setting)")
    dpset.add_argument("--max-clients", type=int, metavar="N", help="at most N clients of one deployment mapped "
                       "to it; the rest go to the next DP of their boundary group (0: no limit)")

    # Transport-only tools: no Redis, no controller (like udp-sender / udp-receiver).
    from controller import simulate, standalone

    standalone.add_send_arguments(sub.add_parser(
        "send", help="multicast a file to receivers, standalone (no Redis or controller)",
        description=standalone.SEND_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))
    standalone.add_receive_arguments(sub.add_parser(
        "receive", help="receive a file from `mcdeploy send`, standalone",
        description=standalone.RECEIVE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))
    simulate.add_arguments(sub.add_parser(
        "simulate", help="run the real sender against many virtual receivers on a virtual clock",
        description=simulate.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))
    return p


DEPLOY_ACTIONS = ("create", "list", "show", "cancel", "retry", "report", "-h", "--help")


def parse_duration(text: str) -> float:
    """'90m', '2h', '1d', '45s', '3600' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90m, 2h or 3600)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _add_deploy_options(dep: argparse.ArgumentParser) -> None:
    dep.add_argument("image")
    dep.add_argument("--collection", help="deploy to exactly the clients of this collection (one session per DP "
                     "their boundary groups map them to; only they are offered the session)")
    dep.add_argument("--dp", help="the DP that multicasts it (with --collection: the DP of clients whose address "
                     "is unknown or in no boundary group)")
    dep.add_argument("--clients", type=int, default=0, help="without --collection: expected clients, start when "
                     "they joined")
    dep.add_argument("--deadline", type=parse_duration, default=4 * 3600.0, metavar="DURATION",
                     help="give up on clients still receiving this long after a session opened (e.g. 90m; "
                     "default 4h)")
    dep.add_argument("--start-timeout", type=float, default=60.0,
                     help="start with whoever joined after this many seconds (default 60)")
    dep.add_argument("--start-clients", type=int, help="start when this many joined (default: --clients, or every "
                     "targeted client of the DP; 1 = start as soon as one client is there)")
    dep.add_argument("--start-at", type=parse_time, help="start at this time (ISO 8601, e.g. 2026-12-01T20:00)")
    dep.add_argument("--rate", type=float, help="max rate in Mbit/s (default: the DP's)")
    dep.add_argument("--idempotency-key", help="the same key twice makes one deployment")
    dep.add_argument("--slow-policy", choices=("hold", "drop", "tier"), default="hold",
                     help="a client that cannot keep up: hold the session to it (slow down, default), drop it, "
                     "or move it to a slower stream (tier: 1/3, then 1/10 of the rate)")
    dep.add_argument("--drop-below", type=float, metavar="MBPS",
                     help="with --slow-policy drop/tier: a client receiving below this rate (Mbit/s) is slow")
    dep.add_argument("--min-rate", type=float, metavar="MBPS", help="never slow the session below this (Mbit/s)")
    dep.add_argument("--slow-grace", type=float, default=2.0, metavar="S",
                     help="how long a client may stay below --drop-below before it is dropped or moved (default 2)")
    dep.add_argument("--unicast-fallback", action="store_true",
                     help="tell dropped clients they may fetch the image by unicast")
    dep.add_argument("--no-encrypt", dest="encrypt", action="store_false",
                     help="send this deployment's packets in the clear, unauthenticated (default: sealed when "
                     "the DP has an identity; manifest checks still apply)")


def _state() -> Any:
    from mcsite.settings import SiteSettings
    from mcsite.site import resolve_redis_url
    from mcsite.state import State

    site = SiteSettings()
    url = resolve_redis_url(site)
    st = State.from_url(url, site.key_prefix)
    st.ping()
    return st, url


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "deploy" and argv[1] not in DEPLOY_ACTIONS:
        argv.insert(1, "create")  # the short form: mcdeploy deploy IMAGE --dp DP --clients N
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        return _dispatch(args, console)
    except McdeployError as exc:
        print(f"mcdeploy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    if args.cmd == "demo":
        from controller.demo import DemoOptions, run_demo

        if args.clients < 1 or args.clients > 64:
            print("mcdeploy: error: --clients must be between 1 and 64 for the demo", file=sys.stderr)
            return 2
        if not 1 <= args.dps <= 16:
            print("mcdeploy: error: --dps must be between 1 and 16 for the demo", file=sys.stderr)
            return 2
        if not 0 <= args.loss < 100:
            print("mcdeploy: error: --loss must be in [0, 100)", file=sys.stderr)
            return 2
        return run_demo(DemoOptions(clients=args.clients, size=args.size, image=args.image, loss=args.loss,
                                    keep=args.keep, json=args.json, timeout=args.timeout,
                                    max_rate_mbps=args.rate, dps=args.dps))
    if args.cmd == "up":
        from controller.up import run_up

        return run_up(args.dp_name, args.control_port, args.data_dir)
    if args.cmd in ("worker", "beat"):
        import os

        from controller.worker import run_beat, run_worker

        if args.log_format:
            os.environ["MCDEPLOY_LOG_FORMAT"] = args.log_format
        if args.cmd == "beat":
            return run_beat(args.loglevel)
        return run_worker(args.concurrency, args.loglevel, beat=args.beat)
    if args.cmd in ("send", "receive"):
        from controller import standalone

        return standalone.run_send(args) if args.cmd == "send" else standalone.run_receive(args)
    if args.cmd == "simulate":
        from controller import simulate

        return simulate.run(args)
    if args.cmd == "schema":
        schemas = {m.model_fields["type"].default: m.model_json_schema() for m in ALL_MESSAGES}
        if args.msg_type:
            if args.msg_type not in schemas:
                print(f"mcdeploy: error: unknown message type {args.msg_type!r} "
                      f"(known: {', '.join(sorted(schemas))})", file=sys.stderr)
                return 2
            schemas = {args.msg_type: schemas[args.msg_type]}
        print(json.dumps(schemas, indent=2))
        return 0
    if args.cmd == "key":
        return _key(args, console)
    state, url = _state()
    if args.cmd == "image":
        return _image(args, state, console)
    if args.cmd == "deploy":
        from mcsite.celeryapp import app, configure

        configure(app, url)
        return _deploy(args, state, app, console)
    if args.cmd in ("client", "collection", "boundary"):
        from controller import inventory_cli

        return inventory_cli.run(args, state, console)
    if args.cmd == "status":
        return _status(args, state, console)
    if args.cmd == "dp":
        from controller import dps

        return dps.run(args, state, console)
    return 2


def _image(args: argparse.Namespace, state: Any, console: Console) -> int:
    from controller import api

    if args.image_cmd == "add":
        rec = api.describe_image(api.add_image(state, args.path, args.name))
        m = rec["manifest"]
        signed = f"manifest of {m['chunks']} chunks signed by {m['signed_by']}" if isinstance(m, dict) else str(m)
        console.print(f"image {rec['name']}: {int(str(rec['size']))} bytes, sha256 {rec['sha256']}, at "
                      f"{rec['path']}; {signed}")
        return 0
    if args.image_cmd == "show":
        console.print_json(json.dumps(api.describe_image(state.get_image(args.name))))
        return 0
    table = Table("name", "bytes", "sha256", "manifest", "path")
    for rec in state.list_images():
        table.add_row(rec["name"], rec["size"], rec["sha256"][:16] + "…", "signed" if rec.get("manifest") else "-",
                      rec["path"])
    console.print(table)
    return 0


def _key(args: argparse.Namespace, console: Console) -> int:
    from mcproto import manifest as mf
    from mcsite import identity
    from mcsite.settings import ControllerSettings

    public = identity.controller_key(ControllerSettings().key_file).public_key()
    raw = mf.public_bytes(public).hex()
    if args.json:
        print(json.dumps({"public_key": raw, "key_id": mf.key_id(public)}))
    else:
        console.print(f"controller public key (pin on clients: --controller-key {raw})")
        console.print(f"key id: {mf.key_id(public)}")
        print(raw)
    return 0


def _status(args: argparse.Namespace, state: Any, console: Console) -> int:
    if getattr(args, "watch", False):
        from controller import watch

        if args.json:
            raise ConfigError("--watch draws progress bars; use --json without --watch for data")
        if not 0.2 <= args.interval <= 60:
            raise ConfigError("--interval must be between 0.2 and 60 seconds")
        return watch.run(state, console, args.deployment, interval=args.interval, once=args.once,
                         show_all=args.all)
    if not args.deployment:
        deps = state.list_deployments()
        if args.json:
            print(json.dumps(deps))
            return 0
        table = Table("deployment", "state", "image", "dp", "expected", "done", "failed", "reason")
        for d in deps:
            table.add_row(d["id"], d["state"], d["image"], d["dp"], d["expected"], d.get("clients_done", "0"),
                          d.get("clients_failed", "0"), d.get("reason", ""))
        console.print(table)
        return 0
    dep = state.get_deployment(args.deployment)
    if args.json:
        print(json.dumps(dep))
        return 0
    console.print(f"deployment {dep['id']}: [bold]{dep['state']}[/] — image {dep['image']} from DP {dep['dp']}, "
                  f"{dep.get('clients_done', 0)}/{dep['expected']} done, {dep.get('clients_failed', 0)} failed "
                  f"{dep.get('reason', '')}")
    table = Table("client", "state", "seconds", "sha256", "reason")
    names = sorted(set(dep["clients"]) | set(dep["progress"]))
    for cid in names:
        r = dep["clients"].get(cid)
        table.add_row(cid, r["outcome"] if r else f"receiving ({dep['progress'].get(cid, 0)} blocks)",
                      f"{r['seconds']:.2f}" if r else "-", (r.get("sha256") or "-")[:16] if r else "-",
                      r.get("reason", "") if r else "")
    console.print(table)
    return 0


def _deploy(args: argparse.Namespace, state: Any, app: Any, console: Console) -> int:
    from controller import api, deployments

    if args.deploy_cmd == "create":
        if not args.collection and not args.dp:
            raise ConfigError("give --collection COLLECTION, or --dp DP (with --clients N for any N clients)")
        if args.collection and args.clients:
            raise ConfigError("--clients is for deployments without --collection (a collection names its clients)")
        try:
            req = DeployRequest(image=args.image, dp=args.dp, collection=args.collection, clients=args.clients,
                                start_timeout_s=args.start_timeout, start_clients=args.start_clients,
                                start_at=args.start_at, max_rate_mbps=args.rate, slow_policy=args.slow_policy,
                                drop_below_mbps=args.drop_below, min_rate_mbps=args.min_rate,
                                slow_grace_s=args.slow_grace, unicast_fallback=args.unicast_fallback,
                                encrypt=args.encrypt, idempotency_key=args.idempotency_key,
                                deadline_s=args.deadline)
        except ValueError as exc:
            raise ConfigError(f"bad deployment: {_first_error(exc)}") from None
        if not args.encrypt:
            console.print("[bold red]WARNING[/]: this deployment is NOT ENCRYPTED: the image crosses the network "
                          "in the clear and its packets are not authenticated (the signed manifest still guards "
                          "what clients commit)")
        dep_id, jobs, created = api.deploy_all(state, app, req)
        verb = "created" if created else "already exists (same idempotency key)"
        if args.collection:
            where = ", ".join(f"{j.dp} ({len(j.targets or [])} client(s) on {j.group}:{j.port})" for j in jobs)
            console.print(f"deployment {dep_id} {verb}: image {args.image} to collection {args.collection}: "
                          f"{sum(len(j.targets or []) for j in jobs)} client(s) in {len(jobs)} session(s): {where}")
        else:
            console.print(f"deployment {dep_id} {verb}: image {args.image} from DP {args.dp} on "
                          f"{jobs[0].group}:{jobs[0].port}, expecting {args.clients} client(s)")
        print(dep_id)
        return 0
    if args.deploy_cmd == "list":
        return _status(argparse.Namespace(deployment=None, json=args.json, watch=False), state, console)
    if args.deploy_cmd == "show":
        return _show(args, state, console)
    if args.deploy_cmd == "cancel":
        told = deployments.cancel(state, app, args.deployment, args.reason)
        if told is None:
            console.print(f"deployment {args.deployment} was already cancelled")
        else:
            console.print(f"deployment {args.deployment} cancelled: {told} session(s) told to stop")
        return 0
    if args.deploy_cmd == "retry":
        names, jobs = deployments.retry(state, app, args.deployment)
        console.print(f"deployment {args.deployment}: retrying {len(names)} client(s) ({', '.join(names[:10])}"
                      f"{' ...' if len(names) > 10 else ''}) in {len(jobs)} new session(s), attempt {jobs[0].attempt}")
        return 0
    if args.deploy_cmd == "report":
        rep = deployments.report(state, args.deployment)
        text = deployments.report_csv(rep) if args.format == "csv" else deployments.report_json(rep) + "\n"
        if args.output:
            try:
                with open(args.output, "w", encoding="utf-8", newline="") as fh:
                    fh.write(text)
            except OSError as exc:
                raise ConfigError(f"cannot write {args.output}: {exc.strerror}") from None
            console.print(f"report of {args.deployment} written to {args.output} ({len(rep['clients'])} client(s))")
        else:
            sys.stdout.write(text)
        return 0
    return 2


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        return f"{loc + ': ' if loc else ''}{first.get('msg', exc)}"
    return str(exc).splitlines()[0]


def _show(args: argparse.Namespace, state: Any, console: Console) -> int:
    from controller import deployments

    rep = deployments.report(state, args.deployment)
    if args.json:
        print(deployments.report_json(rep))
        return 0
    d = rep["deployment"]
    target = f"collection {d['collection']}" if d.get("collection") else f"any {d['expected']} client(s)"
    console.print(f"deployment {d['id']}: [bold]{d['state']}[/] — image {d['image']} to {target} via DP(s) {d['dp']}; "
                  f"{d.get('clients_done', 0)}/{d['expected']} done, {d.get('clients_failed', 0)} failed, "
                  f"{d.get('clients_cancelled', 0)} cancelled; attempt {d.get('attempt', 1)}"
                  + (f" — {d['reason']}" if d.get("reason") else ""))
    t0 = float(d.get("created_at") or 0)
    console.print("  timings: " + ", ".join(f"{s} +{v - t0:.2f}s" for s, v in d["timings"].items()))
    st = Table("session", "DP", "attempt", "state", "clients", "group", "reason")
    for s in rep["sessions"]:
        st.add_row(f"{int(s['id']):x}", s["dp"], s.get("attempt", "1"), s["state"], s.get("clients", ""),
                   f"{s.get('group')}:{s.get('port')}", s.get("reason", ""))
    console.print(st)
    ct = Table("client", "DP", "state", "joined", "ended", "seconds", "reason")
    for r in rep["clients"]:
        def rel(v: Any) -> str:
            return f"+{float(v) - t0:.2f}s" if v not in ("", None) else "-"
        ct.add_row(r["client"], r["dp"], r["state"], rel(r["joined_at"]), rel(r["ended_at"]),
                   f"{float(r['seconds']):.2f}" if r["seconds"] != "" else "-", r["reason"])
    console.print(ct)
    return 0
