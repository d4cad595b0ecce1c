#!/usr/bin/env python3
"""Side-by-side transport benchmark: ``mcdeploy send/receive`` vs udpcast, UFTP and N parallel HTTP downloads.

Run as root (it builds network namespaces)::

    sudo .venv/bin/python -m bench.transport --quick            # smoke check, about a minute
    sudo .venv/bin/python -m bench.transport --sizes 128MiB --receivers 1,4,16 --loss 0,1 --mtu 1500 --json

Topology (``bench/topology.py``): one sender namespace and N receiver namespaces on a bridge in a
namespace of its own, addresses 10.78.0.0/24 inside those namespaces only; nothing touches the
host's interfaces, routes or firewall, and everything is removed at the end (also on Ctrl-C).

For every cell of the matrix (size x MTU x N x loss x regime) each peer moves the same random file
from the sender to all N receivers: one warm-up run per peer on every fresh topology, then
``--runs`` measured runs, the peers interleaved (run 1 of every peer, then run 2, ...) so drift
hits them alike.  Every receiver's output is checked by SHA-256; a run that fails, times out or
delivers a wrong byte is recorded as failed (with the reason), never dropped.

Regimes: ``uncapped`` (nothing limits the sender's link: aggregate delivered MB/s = N x size / T)
and ``capped`` (htb on the sender's veth at ``--cap-mbit``: T against the ideal
size / (cap x (1 - loss))).  Loss is random, per packet, on the receivers' ingress (nftables,
else a tc BPF filter).  How each peer is driven is in ``bench/peers.py`` and in the JSON.

Output: progress on stderr; a table per regime on stdout; with ``--json`` the last stdout line is
one JSON object with every figure (runs, median/min/max, MB/s, fraction of ideal, mcdeploy's
speed-up against each peer in the same cell, and the issue's targets checked).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.peers import McDeploy, Peer, RunOutcome, RunSpec, all_peers
from bench.topology import Topology, TopologyError

MB = 1e6
MIB = 1 << 20
APT_PACKAGES = ["udpcast", "uftp", "nginx-light", "curl", "nftables", "ethtool"]
QUICK = {"sizes": "32MiB", "receivers": "1,4", "loss": "0", "mtu": "1500", "runs": 3}
DEFAULTS = {"sizes": "128MiB", "receivers": "1,4,16", "loss": "0,1,5", "mtu": "1500,9000", "runs": 3}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- arguments


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 128MiB, 1GiB)")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    value = int(num * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])
    if not MIB <= value <= 64 << 30:
        raise argparse.ArgumentTypeError(f"size {text!r} out of range (1 MiB .. 64 GiB)")
    return value


def _csv(text: str, conv: Any, what: str) -> list[Any]:
    try:
        values = [conv(t) for t in text.split(",") if t.strip()]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise SystemExit(f"bench.transport: bad {what}: {text!r} ({exc})") from None
    if not values:
        raise SystemExit(f"bench.transport: empty {what}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", help=f"file sizes, comma-separated (default {DEFAULTS['sizes']})")
    p.add_argument("--receivers", help=f"N values (default {DEFAULTS['receivers']})")
    p.add_argument("--loss", help=f"random ingress loss per receiver, %% (default {DEFAULTS['loss']})")
    p.add_argument("--mtu", help=f"MTUs (default {DEFAULTS['mtu']}); at 9000 every peer uses 8800-byte blocks")
    p.add_argument("--runs", type=int, help=f"measured runs per cell (default {DEFAULTS['runs']})")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per peer on each fresh topology (default 1)")
    p.add_argument("--regimes", default="uncapped,capped", help="uncapped,capped (default both)")
    p.add_argument("--cap-mbit", type=float, default=200.0, help="sender link cap of the capped regime (default 200)")
    p.add_argument("--peers", default="mcdeploy,udpcast,uftp,http", help="which peers (default all four)")
    p.add_argument("--mcdeploy-rate", type=float, default=3000.0, metavar="MBPS",
                   help="mcdeploy send --rate in the uncapped regime (default 3000; capped: the cap)")
    p.add_argument("--mcdeploy", default=None, metavar="PATH",
                   help="the mcdeploy executable (default: beside this Python, else on PATH)")
    p.add_argument("--mcdeploy-ref", default=None, metavar="GIT_REF",
                   help="benchmark mcdeploy as committed at GIT_REF (git archive into the work dir, run with "
                   "PYTHONPATH) instead of the working tree, e.g. HEAD while others edit the tree")
    p.add_argument("--timeout", type=float, default=None,
                   help="per-run timeout in seconds (default: estimated from size, N and regime)")
    p.add_argument("--no-segment", action="store_true",
                   help="let UDP GSO super-packets reach receivers whole (default: bridge ports segment them)")
    p.add_argument("--install", action="store_true",
                   help=f"apt-get install -y {' '.join(APT_PACKAGES)} first")
    p.add_argument("--workdir", default=None, help="where files go (default: a new directory in /dev/shm)")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 32MiB, N=1,4, loss 0, MTU 1500, 3 runs (explicit options still win)")
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON object with every figure")
    return p


# --------------------------------------------------------------------------- helpers


def make_image(path: Path, size: int) -> str:
    h = hashlib.sha256()
    chunk = 8 * MIB
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(chunk, left))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def _file_sha256(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(4 * MIB):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


def verify(outputs: list[Path], size: int, digest: str) -> list[bool]:
    def one(p: Path) -> bool:
        try:
            if p.stat().st_size != size:
                return False
        except OSError:
            return False
        return _file_sha256(p) == digest

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, outputs))


def estimate_timeout(size: int, n: int, regime: str, cap: float, loss: float, peer: str) -> float:
    mb = size / MB
    if regime == "capped":
        ideal = size * 8 / (cap * 1e6 * (1 - loss / 100))
        return 60 + 4 * ideal * (n if peer == "http" else 1)
    return 60 + mb / 4 * (1 + n / 8) * (1 + loss / 5)


def median_range(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def git_commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        here = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    return ""


# --------------------------------------------------------------------------- the matrix


class Bench:
    def __init__(self, args: argparse.Namespace, peers: dict[str, Peer], workdir: Path) -> None:
        self.args = args
        self.peers = peers
        self.workdir = workdir
        self.cells: list[dict[str, Any]] = []
        self.env: dict[str, Any] = {}
        self.loss_backends: set[str] = set()
        self.segmentation: set[str] = set()

    def run_one(self, peer: Peer, topo: Topology, cell: dict[str, Any], image: Path, digest: str,
                label: str) -> dict[str, Any]:
        size, n = cell["size_bytes"], cell["n"]
        outdir = self.workdir / "out" / f"{peer.name}-{label}"
        shutil.rmtree(outdir, ignore_errors=True)
        outdir.mkdir(parents=True)
        timeout = self.args.timeout or estimate_timeout(size, n, cell["regime"], cell["cap_mbit"] or 0,
                                                        cell["loss_pct"], peer.name)
        spec = RunSpec(topo=topo, n=n, mtu=cell["mtu"], loss=cell["loss_pct"], regime=cell["regime"],
                       cap_mbit=self.args.cap_mbit, image=image, outdir=outdir, timeout=timeout,
                       mcdeploy_rate=self.args.mcdeploy_rate)
        drops_before = [topo.loss_drops(ns) for ns in topo.receivers] if cell["loss_pct"] else []
        try:
            outcome = peer.run(spec)
        except (OSError, subprocess.SubprocessError, TopologyError, RuntimeError) as exc:
            outcome = RunOutcome(None, [], f"{type(exc).__name__}: {exc}")
        ok_files = verify(outcome.outputs, size, digest) if outcome.outputs else []
        verified = sum(ok_files)
        error = outcome.error
        if not error and verified != n:
            error = f"digest check: {verified} of {n} outputs bit-exact"
        rec: dict[str, Any] = {"label": label, "ok": not error and outcome.seconds is not None,
                               "seconds": round(outcome.seconds, 3) if outcome.seconds is not None else None,
                               "verified": verified, "error": error[:500], "timeout_s": round(timeout)}
        rs = [s for s in outcome.receiver_seconds if s is not None]
        if rs:
            rec["first_receiver_s"], rec["last_receiver_s"] = min(rs), max(rs)
        if drops_before:
            after = [topo.loss_drops(ns) for ns in topo.receivers]
            if all(a is not None and b is not None for a, b in zip(after, drops_before, strict=True)):
                rec["injected_drops"] = sum(a - b for a, b in zip(after, drops_before, strict=True))  # type: ignore[operator]
        if error:
            rec["detail"] = outcome.detail
        shutil.rmtree(outdir, ignore_errors=True)
        state = f"{rec['seconds']:.2f} s" if rec["ok"] else f"FAILED ({error[:160]})"
        log(f"    {peer.name:9s} {label:7s} {state}")
        return rec

    def run_cell(self, topo: Topology, cell: dict[str, Any], image: Path, digest: str, warm: bool) -> None:
        names = list(self.peers)
        res: dict[str, dict[str, Any]] = {name: {"runs": [], "warmup": []} for name in names}
        cell["peers"] = res
        self.cells.append(cell)
        log(f"  cell: {cell['size_mib']:g} MiB, MTU {cell['mtu']}, N={cell['n']}, loss {cell['loss_pct']:g} %, "
            f"{cell['regime']}" + (f" {cell['cap_mbit']:g} Mbit/s" if cell["regime"] == "capped" else ""))
        if warm:
            for i in range(self.args.warmup):
                for name in names:
                    rec = self.run_one(self.peers[name], topo, cell, image, digest, f"warm{i + 1}")
                    res[name]["warmup"].append(rec)
        for i in range(self.args.runs):
            k = i % len(names)
            for name in names[k:] + names[:k]:  # rotate the order run by run
                res[name]["runs"].append(self.run_one(self.peers[name], topo, cell, image, digest, f"run{i + 1}"))
        self.summarize(cell)

    def summarize(self, cell: dict[str, Any]) -> None:
        size, n = cell["size_bytes"], cell["n"]
        for pr in cell["peers"].values():
            secs = [r["seconds"] for r in pr["runs"] if r["ok"]]
            pr["ok_runs"], pr["failed_runs"] = len(secs), len(pr["runs"]) - len(secs)
            st = median_range(secs)
            pr["median_s"], pr["min_s"], pr["max_s"] = st["median"], st["min"], st["max"]
            med = pr["median_s"]
            pr["aggregate_mb_s"] = round(n * size / med / MB, 1) if med else None
            pr["per_receiver_mb_s"] = round(size / med / MB, 1) if med else None
            if cell["regime"] == "capped" and med:
                pr["goodput_fraction_of_cap"] = round(size * 8 / med / (cell["cap_mbit"] * 1e6), 3)
                pr["fraction_of_ideal"] = round(cell["ideal_s"] / med, 3)
        mc = cell["peers"].get("mcdeploy", {}).get("median_s")
        cell["mcdeploy_speedup"] = {}
        for name, pr in cell["peers"].items():
            if name != "mcdeploy":
                cell["mcdeploy_speedup"][name] = round(pr["median_s"] / mc, 2) if mc and pr["median_s"] else None

    def run(self) -> None:
        a = self.args
        sizes, ns_, losses, mtus, regimes = a.size_list, a.n_list, a.loss_list, a.mtu_list, a.regime_list
        for size in sizes:
            image = self.workdir / "serve" / f"image-{size // MIB}MiB.bin"
            log(f"writing {size / MIB:g} MiB of random data to {image}")
            (self.workdir / "serve").mkdir(exist_ok=True)
            digest = make_image(image, size)
            self.env.setdefault("images", {})[str(size)] = digest
        for mtu in mtus:
            for n in ns_:
                log(f"topology: N={n}, MTU {mtu}")
                with Topology(n, mtu, segment_at_ports=not a.no_segment) as topo:
                    self.segmentation.add(topo.segmentation)
                    try:
                        for peer in self.peers.values():
                            peer.setup(topo, self.workdir, self.workdir / "serve" / "x")
                        warm = a.warmup > 0
                        for size in sizes:
                            image = self.workdir / "serve" / f"image-{size // MIB}MiB.bin"
                            digest = self.env["images"][str(size)]
                            for regime in regimes:
                                if regime == "capped":
                                    topo.set_rate(topo.sender, a.cap_mbit)
                                else:
                                    topo.clear_rate(topo.sender)
                                for loss in losses:
                                    for ns in topo.receivers:
                                        self.loss_backends.add(topo.set_loss(ns, loss))
                                    cell = {"size_bytes": size, "size_mib": size / MIB, "mtu": mtu, "n": n,
                                            "loss_pct": loss, "regime": regime,
                                            "cap_mbit": a.cap_mbit if regime == "capped" else None}
                                    if regime == "capped":
                                        cell["ideal_s"] = round(size * 8 / (a.cap_mbit * 1e6 * (1 - loss / 100)), 3)
                                    self.run_cell(topo, cell, image, digest, warm)
                                    warm = False
                    finally:
                        for peer in self.peers.values():
                            peer.teardown(topo)

    # ------------------------------------------------------------------------ targets (issue 5)

    def targets(self) -> list[dict[str, Any]]:
        out = []
        by_key = {(c["size_bytes"], c["mtu"], c["n"], c["loss_pct"], c["regime"]): c for c in self.cells}
        for c in self.cells:
            peers = c["peers"]
            if "mcdeploy" not in peers:
                continue
            mc = peers["mcdeploy"]
            where = {k: c[k] for k in ("size_mib", "mtu", "n", "loss_pct", "regime")}
            if c["regime"] == "uncapped" and c["loss_pct"] in (0, 1):
                best = [peers[p]["aggregate_mb_s"] for p in ("udpcast", "uftp") if p in peers
                        and peers[p]["aggregate_mb_s"]]
                need = 1.5 if c["loss_pct"] == 0 else 2.0
                if best and mc["aggregate_mb_s"]:
                    ratio = mc["aggregate_mb_s"] / max(best)
                    out.append({**where, "target": f">= {need}x the better of udpcast and UFTP (aggregate MB/s)",
                                "value": round(ratio, 2), "met": ratio >= need})
                if "http" in peers and peers["http"]["aggregate_mb_s"] and mc["aggregate_mb_s"]:
                    ratio = mc["aggregate_mb_s"] / peers["http"]["aggregate_mb_s"]
                    out.append({**where, "target": "moonshot: faster than HTTP unicast", "value": round(ratio, 2),
                                "met": ratio > 1})
            if c["regime"] == "capped" and mc.get("fraction_of_ideal") is not None:
                need = 0.95 if c["loss_pct"] == 0 else 0.90
                out.append({**where, "target": f"goodput >= {need:.0%} of cap x (1 - p)",
                            "value": mc["fraction_of_ideal"], "met": mc["fraction_of_ideal"] >= need})
                one = by_key.get((c["size_bytes"], c["mtu"], 1, c["loss_pct"], "capped"))
                if c["n"] == 16 and one and one["peers"]["mcdeploy"]["median_s"] and mc["median_s"]:
                    ratio = mc["median_s"] / one["peers"]["mcdeploy"]["median_s"]
                    out.append({**where, "target": "T(N=16)/T(N=1) <= 1.1", "value": round(ratio, 2),
                                "met": ratio <= 1.1})
        return out


# --------------------------------------------------------------------------- output


def print_tables(bench: Bench, skipped: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, width=170)
    for regime in bench.args.regime_list:
        cells = [c for c in bench.cells if c["regime"] == regime]
        if not cells:
            continue
        capped = regime == "capped"
        title = (f"capped: sender link {bench.args.cap_mbit:g} Mbit/s (htb); ideal = size / (cap x (1 - loss))"
                 if capped else "uncapped: aggregate delivered MB/s = N x size / T")
        t = Table(title=title, title_justify="left")
        for col in ("size", "MTU", "N", "loss", "peer", "ok/runs", "T median s", "range s"):
            t.add_column(col, justify="right" if col not in ("peer",) else "left")
        if capped:
            t.add_column("ideal s", justify="right")
            t.add_column("ideal/T", justify="right")
        else:
            t.add_column("agg MB/s", justify="right")
        t.add_column("mcdeploy x", justify="right")
        for c in cells:
            first = True
            for name, pr in c["peers"].items():
                med = pr["median_s"]
                row = [f"{c['size_mib']:g}M" if first else "", str(c["mtu"]) if first else "",
                       str(c["n"]) if first else "", f"{c['loss_pct']:g}%" if first else "", name,
                       f"{pr['ok_runs']}/{len(pr['runs'])}",
                       f"{med:.2f}" if med else "FAIL",
                       f"{pr['min_s']:.2f}-{pr['max_s']:.2f}" if med else ""]
                if capped:
                    row += [f"{c['ideal_s']:.2f}" if first else "",
                            f"{pr['fraction_of_ideal']:.2f}" if med else ""]
                else:
                    row += [f"{pr['aggregate_mb_s']:.1f}" if med else ""]
                sp = c["mcdeploy_speedup"].get(name)
                row.append("" if name == "mcdeploy" else (f"{sp:.2f}" if sp else "-"))
                t.add_row(*row, end_section=name == list(c["peers"])[-1])
                first = False
        console.print(t)
    fails = [(c, name, r) for c in bench.cells for name, pr in c["peers"].items() for r in pr["runs"] if not r["ok"]]
    if fails:
        console.print(f"[bold]{len(fails)} failed run(s):[/bold]")
        for c, name, r in fails[:30]:
            console.print(f"  {name} {c['size_mib']:g}MiB MTU {c['mtu']} N={c['n']} loss {c['loss_pct']:g}% "
                          f"{c['regime']} {r['label']}: {r['error'][:200]}", markup=False)
    for name, why in skipped.items():
        console.print(f"skipped: {name}: {why}", markup=False)
    console.print("'mcdeploy x' = that peer's median T / mcdeploy's median T in the same cell (> 1: mcdeploy faster).",
                  markup=False)


# --------------------------------------------------------------------------- main


def _resolve(args: argparse.Namespace) -> None:
    base = QUICK if args.quick else DEFAULTS
    for key in ("sizes", "receivers", "loss", "mtu", "runs"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.size_list = _csv(args.sizes, parse_size, "--sizes")
    args.n_list = _csv(args.receivers, int, "--receivers")
    args.loss_list = _csv(args.loss, float, "--loss")
    args.mtu_list = _csv(args.mtu, int, "--mtu")
    args.regime_list = _csv(args.regimes, str.strip, "--regimes")
    args.peer_list = _csv(args.peers, str.strip, "--peers")
    checks = [
        (all(1 <= n <= 64 for n in args.n_list), "--receivers must be 1..64"),
        (all(0 <= p < 50 for p in args.loss_list), "--loss must be 0..50"),
        (all(m in (1500, 9000) or 1280 <= m <= 9000 for m in args.mtu_list), "--mtu must be 1280..9000"),
        (set(args.regime_list) <= {"uncapped", "capped"}, "--regimes: uncapped,capped"),
        (1 <= args.runs <= 50 and 0 <= args.warmup <= 5, "--runs 1..50, --warmup 0..5"),
        (0 < args.cap_mbit <= 100_000, "--cap-mbit must be > 0"),
        (args.timeout is None or 5 <= args.timeout <= 7200, "--timeout must be 5..7200"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"bench.transport: {msg}")


def _mcdeploy_exe(args: argparse.Namespace) -> str:
    if args.mcdeploy:
        return os.path.abspath(args.mcdeploy)
    beside = Path(sys.executable).parent / "mcdeploy"
    if beside.exists():
        return str(beside)
    return shutil.which("mcdeploy") or str(beside)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _resolve(args)
    if os.geteuid() != 0:
        log("bench.transport: needs root (it builds network namespaces); run it with sudo")
        return 2
    for tool in ("ip", "tc", "ss"):
        if shutil.which(tool) is None:
            log(f"bench.transport: '{tool}' not found (apt-get install iproute2)")
            return 2
    if args.install:
        log(f"apt-get install -y {' '.join(APT_PACKAGES)}")
        res = subprocess.run(["apt-get", "install", "-y", *APT_PACKAGES], capture_output=True, text=True,
                             timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if res.returncode != 0:
            log(f"apt-get failed ({res.returncode}): {res.stderr.strip()[-400:]}; going on with what is installed")

    known = all_peers(_mcdeploy_exe(args))
    unknown = [p for p in args.peer_list if p not in known]
    if unknown:
        log(f"bench.transport: unknown peer(s) {unknown}; choose from {', '.join(known)}")
        return 2
    peers: dict[str, Peer] = {}
    skipped: dict[str, str] = {}
    for name in args.peer_list:
        ok, why = known[name].available()
        if ok:
            peers[name] = known[name]
        else:
            skipped[name] = why
            log(f"skipped: {name}: {why}")
    if not peers:
        log("bench.transport: no peer available")
        return 2

    # SIGINT/SIGTERM/SIGHUP end the benchmark (even if started with SIGINT ignored): the finally blocks clean up.
    def _interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    base = Path(args.workdir) if args.workdir else (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    workdir = Path(tempfile.mkdtemp(prefix="mcbench-", dir=base))
    os.chmod(workdir, 0o755)  # the HTTP server's workers read the image
    mc = peers.get("mcdeploy")
    if args.mcdeploy_ref and isinstance(mc, McDeploy):
        src = workdir / "mcdeploy-src"
        try:
            here = Path(__file__).resolve().parent.parent
            commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", args.mcdeploy_ref + "^{commit}"],
                                    capture_output=True, text=True, timeout=30, check=True).stdout.strip()
            src.mkdir()
            archive = subprocess.run(["git", "-C", str(here), "archive", commit], capture_output=True, timeout=120,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, timeout=120, check=True)
        except (OSError, subprocess.SubprocessError) as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            log(f"bench.transport: cannot export --mcdeploy-ref {args.mcdeploy_ref}: {exc}")
            return 2
        mc.use_source(str(src), f"{args.mcdeploy_ref} = {commit}")
        log(f"mcdeploy: source tree of {args.mcdeploy_ref} ({commit}) from git archive")
    bench = Bench(args, peers, workdir)
    started = time.time()
    interrupted = ""
    try:
        bench.run()
    except KeyboardInterrupt as exc:
        interrupted = str(exc) or "SIGINT"
        log(f"interrupted ({interrupted}): cleaning up, reporting what was measured")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    for cell in bench.cells:  # a cell cut short still gets its figures
        if "mcdeploy_speedup" not in cell:
            bench.summarize(cell)
    print_tables(bench, skipped)
    if args.json:
        result = {
            "benchmark": "bench.transport",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "wall_s": round(time.time() - started, 1),
            "interrupted": interrupted or None,
            "config": {k: getattr(args, k) for k in ("size_list", "n_list", "loss_list", "mtu_list", "regime_list",
                                                     "runs", "warmup", "cap_mbit", "mcdeploy_rate", "timeout",
                                                     "no_segment", "quick", "mcdeploy_ref")},
            "environment": {
                "kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
                "repo_head": git_commit(), "workdir_fs": "tmpfs (/dev/shm)" if base == Path("/dev/shm")
                else str(base), "loss_injection": sorted(bench.loss_backends - {"none"}) or ["none needed"],
                "segmentation": sorted(bench.segmentation), "image_sha256": bench.env.get("images", {}),
            },
            "peers": {name: {"version": p.version(), "settings": p.describe()} for name, p in peers.items()},
            "skipped": skipped,
            "timing": ("T = sender start (receivers already listening) to the first moment a process confirmed all N "
                       "have the file: last receiver exit, or the sender's successful exit for udpcast/uftp"),
            "cells": bench.cells,
            "targets": bench.targets(),
        }
        print(json.dumps(result, separators=(",", ":")))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
