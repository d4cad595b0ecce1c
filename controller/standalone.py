"""``mcdeploy send`` / ``mcdeploy receive``: the transport alone, without Redis or a controller.

Server side (send) and client side (receive) adapters, in the spirit of
udp-sender / udp-receiver: one machine multicasts a file, others receive it,
and nothing else has to run.  Neither command has transport code of its own:

* ``send`` runs the DP's own :class:`~dpagent.host.SessionHost` (control port)
  and :class:`~dpagent.session.SessionRunner` (the real sender on real
  sockets) with a session made up locally instead of a ``SessionJob`` from the
  controller, and a :class:`LocalRelay` that keeps results in this process
  instead of publishing them to Celery.  The runner is given the standalone
  start policy and an ``Announce`` to repeat on the group, which a DP session
  job has no field for.
* ``receive`` is the client agent (:mod:`clientagent.transfer`) with discovery:
  if no ``--from`` is given it finds the sender by its announce on the group.
  Exit codes are the client agent's.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from clientagent.cli import (
    add_common_arguments,
    add_key_arguments,
    add_output_arguments,
    check_common,
    check_output,
    default_client_id,
    load_shared_key,
    output_options,
    run,
)
from clientagent.net import format_hostport, host_of, interface_index, is_ipv6, is_multicast, parse_hostport
from clientagent.transfer import EXIT_USAGE, ClientOptions
from controller.cli import parse_time
from dpagent.host import SessionHost
from dpagent.session import SessionRunner
from dpagent.staging import file_sha256
from mcproto import codec, seal
from mcproto.errors import ConfigError
from mcproto.fec import DEFAULT_FEC, DEFAULT_K, FEC_RS, FEC_RS16, default_k
from mcproto.fec_wide import K_MAX, R_MAX
from mcproto.messages import Announce, ClientResult, ImageRef, Message, SessionJob, SessionReport
from mcproto.sender import StartPolicy
from mcsite.settings import DPSettings

# Safe defaults: loopback and TTL 1, so nothing leaves this machine until an interface is named.
DEFAULT_GROUP = "239.255.78.1"
DEFAULT_PORT = 47301
DEFAULT_CONTROL_PORT = 47300
DEFAULT_INTERFACE = "127.0.0.1"
DEFAULT_TTL = 1
DEFAULT_RATE_MBPS = 400.0
JOIN_WINDOW_S = 60.0  # after the start, how long receivers --min-receivers still expects are waited for
LINGER_QUIET_S = 1.5  # after the end, re-acknowledge late results until the control port is quiet this long
LINGER_MAX_S = 10.0
DP_NAME = "standalone"

EXIT_OK = 0
EXIT_RECEIVER_FAILED = 1
EXIT_INTERRUPTED = 130

_NAME_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")

SEND_DESCRIPTION = f"""\
Multicast FILE to every `mcdeploy receive` (or `mcdeploy-client --discover`) that joins,
like udp-sender: no Redis, no controller, no DP agent.

The sender listens for receivers on a UDP control port and repeats an announce on the
group (control address, session, deployment name, file size), so a receiver that knows
only the group finds it.  The transfer starts when the first of these is met: --min-receivers
joined, --start-delay elapsed, --start-at reached; with none of them, as soon as the first
receiver joined.  Nothing is sent before one receiver joined.  Receivers joining later are
served too.  The session ends when every joined receiver has verified the file or failed
(with --min-receivers and fewer joined, receivers still missing are waited for up to
{JOIN_WINDOW_S:g} s after the start, unless --exit-when-done).  A summary follows.

Safe by default: multicast leaves by {DEFAULT_INTERFACE} with TTL {DEFAULT_TTL}; name a LAN
address (IPv4) or an interface (IPv6) with --interface to reach other machines.

Exit status: 0 every receiver that joined verified the file and was acknowledged;
1 a receiver failed, or none joined; 2 usage or setup error; 130 interrupted.
"""

RECEIVE_DESCRIPTION = f"""\
Receive a file from `mcdeploy send`, like udp-receiver: verify its SHA-256 and report
to the sender.  Without --from, listen on the group for the sender's announce (at most
--wait seconds) and join the session it names; with --from, join that control address.

Exit status (the client agent's): 0 verified and acknowledged; 2 usage; 3 no sender
found / no session; 4 transfer failed; 5 verification failed; 6 output failed (e.g. disk
full); 7 verified but never acknowledged.

Defaults stay on this machine, matching `mcdeploy send`: group {DEFAULT_GROUP}, port
{DEFAULT_PORT}, interface {DEFAULT_INTERFACE} when discovering.
"""


# --------------------------------------------------------------------------- arguments


def add_send_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``mcdeploy send`` (each documented in ``--help``)."""
    p.add_argument("file", help="the file (or block device) to send")
    add_key_arguments(p, "send")
    p.add_argument("--group", default=DEFAULT_GROUP,
                   help=f"multicast group, IPv4 or IPv6 (e.g. ff15::78:1) (default {DEFAULT_GROUP})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"UDP port of the group: data and announces (default {DEFAULT_PORT})")
    p.add_argument("--interface", default=DEFAULT_INTERFACE,
                   help="where multicast leaves: an IPv4 address for an IPv4 group; an interface name, "
                   f"index or address for an IPv6 group (default {DEFAULT_INTERFACE})")
    p.add_argument("--ttl", type=int, default=DEFAULT_TTL,
                   help=f"multicast TTL / hop limit (default {DEFAULT_TTL}: this link only)")
    p.add_argument("--control-host", default=None,
                   help="address of the UDP control port receivers join on, IPv4 or IPv6 "
                   "(default: the --interface address; '::' for an interface name)")
    p.add_argument("--control-port", type=int, default=DEFAULT_CONTROL_PORT,
                   help=f"UDP control port (default {DEFAULT_CONTROL_PORT}; 0 = any free port, announced)")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE_MBPS, metavar="MBPS",
                   help=f"maximum send rate in Mbit/s (default {DEFAULT_RATE_MBPS:g}); the sender slows "
                   "down below it when receivers report congestion")
    p.add_argument("--min-receivers", type=int, default=0, metavar="N",
                   help="start when N receivers joined (default: when the first one joined)")
    p.add_argument("--start-delay", type=float, default=None, metavar="S",
                   help="start S seconds after the sender started (if a receiver joined by then)")
    p.add_argument("--start-at", type=parse_time, default=None, metavar="TIME",
                   help="start at TIME, ISO 8601 local time or Unix seconds (if a receiver joined by then)")
    p.add_argument("--fec", choices=(FEC_RS16, FEC_RS), default=DEFAULT_FEC,
                   help=f"erasure code: {FEC_RS16} (Reed-Solomon over GF(2^16): large blocks, least overhead) or "
                        f"{FEC_RS} (zfec, GF(2^8): blocks of at most 255 symbols) (default {DEFAULT_FEC})")
    p.add_argument("--block-symbols", type=int, default=None, metavar="K",
                   help=f"source symbols per Reed-Solomon block: 1..{K_MAX} for {FEC_RS16} (default "
                        f"{DEFAULT_K[FEC_RS16]}, fewer for symbols over 1400 bytes: blocks of ~1.4 MB), "
                        f"1..255 for {FEC_RS} (default {DEFAULT_K[FEC_RS]})")
    p.add_argument("--repair-symbols", type=int, default=0, metavar="R",
                   help=f"{FEC_RS16} only: repair symbol ids per block, 1..{R_MAX} (default: the power of two "
                        ">= K, at least 64)")
    p.add_argument("--symbol-size", type=int, default=None, metavar="B",
                   help="payload bytes per packet, 256..8900 (default 1400, or 1392 with a key: fits a 1,500-byte "
                   "MTU either way)")
    p.add_argument("--deployment", default=None, metavar="NAME",
                   help="session name receivers see and may filter on (default: the file's name)")
    p.add_argument("--exit-when-done", action="store_true",
                   help="end as soon as every joined receiver is done, without waiting for receivers "
                   "--min-receivers still expects")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress or event lines, only the summary")


def add_receive_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``mcdeploy receive`` (each documented in ``--help``)."""
    p.add_argument("--out", required=True, help="output file, block device, or - for stdout (in order)")
    p.add_argument("--group", default=DEFAULT_GROUP,
                   help=f"multicast group to find the sender on, IPv4 or IPv6 (default {DEFAULT_GROUP})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"UDP port of the group (default {DEFAULT_PORT})")
    p.add_argument("--interface", default=None,
                   help="where to join the group: an IPv4 address; for IPv6 an interface name, index or "
                   f"address (default: {DEFAULT_INTERFACE} when discovering, else the interface towards "
                   "--from)")
    p.add_argument("--from", dest="source", default=None, metavar="HOST:PORT",
                   help=f"the sender's control address ([V6]:PORT for IPv6; port default {DEFAULT_CONTROL_PORT}) "
                   "instead of waiting for its announce")
    p.add_argument("--id", dest="client_id", default=None,
                   help="receiver identity the sender reports (default: mac-<MAC>-<hash of --out>: stable, so a "
                   "restarted receive resumes as the same receiver)")
    p.add_argument("--wait", type=float, default=120.0, metavar="S",
                   help="seconds to wait for the sender's announce and for joining it (default 120)")
    add_common_arguments(p)
    add_output_arguments(p)
    add_key_arguments(p, "accept")


# --------------------------------------------------------------------------- send


class LocalRelay:
    """Stands in for the Celery relay of a DP agent: results stay in this process, for the summary."""

    def __init__(self) -> None:
        self.results: dict[str, ClientResult] = {}
        self.reports: list[SessionReport] = []
        self.per_client: dict[str, int] = {}
        self._lock = threading.Lock()

    def send(self, msg: Message) -> bool:
        with self._lock:
            if isinstance(msg, ClientResult):
                self.results[msg.client_id] = msg
            elif isinstance(msg, SessionReport):
                self.reports.append(msg)
        return True

    def flush(self) -> bool:
        return True

    def progress(self, deployment: str, per_client: dict[str, int]) -> None:
        with self._lock:
            self.per_client = dict(per_client)

    @property
    def spooled(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {"spooled": 0}


class StandaloneRunner(SessionRunner):
    """A DP session runner with the standalone start policy and an announce.

    ``SessionJob`` has no field for either (a DP session always has a start timeout and is
    found through the controller), so the sender is rebuilt with them; everything else, the
    socket loop included, is the DP's.
    """

    def __init__(self, job: SessionJob, settings: DPSettings, reply: Callable[[Message, object], None],
                 relay: LocalRelay, *, start_clients: int, start_delay: float | None, start_at: float | None,
                 join_window: float, announce: bytes, key: bytes | None = None,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__(job, settings, reply, relay, progress)
        at = None if start_at is None else self.opened_at + (start_at - time.time())
        self.config = dataclasses.replace(
            self.config, start=StartPolicy(clients=start_clients, delay=start_delay, at=at),
            expected_clients=start_clients, join_window=join_window, announce=announce, key=key)
        self.sender = self._make_sender()


def _check_send(args: argparse.Namespace) -> None:
    """Every usage error of ``send`` as a ConfigError with one clear line."""
    group = args.group
    if not is_multicast(group):
        raise ConfigError(f"--group {group} is not a multicast group address")
    if len(group) > 64:
        raise ConfigError("--group is too long")
    if is_ipv6(group):
        if _is_ipv4(args.interface):
            raise ConfigError(f"--interface {args.interface} is an IPv4 address, but {group} is an IPv6 group: "
                              "give an interface name or IPv6 address")
        try:
            if interface_index(args.interface) == 0:
                raise ConfigError(f"--interface {args.interface}: cannot find its network interface "
                                  "(give the interface name)")
        except ValueError as exc:
            raise ConfigError(f"--interface: {exc}") from None
    elif not _is_ipv4(args.interface):
        raise ConfigError(f"--interface must be an IPv4 address for the IPv4 group {group}, not {args.interface!r}")
    checks = [
        (1 <= args.port <= 65535, "--port must be 1..65535"),
        (0 <= args.control_port <= 65535, "--control-port must be 0..65535"),
        (0 <= args.ttl <= 255, "--ttl must be 0..255"),
        (0 < args.rate <= 100_000, "--rate must be in (0, 100000] Mbit/s"),
        (0 <= args.min_receivers <= 100_000, "--min-receivers must be 0..100000"),
        (args.start_delay is None or args.start_delay > 0, "--start-delay must be > 0"),
        (args.fec != FEC_RS or 1 <= args.block_symbols <= 255, f"--block-symbols must be 1..255 with --fec {FEC_RS}"),
        (args.fec != FEC_RS16 or 1 <= args.block_symbols <= K_MAX,
         f"--block-symbols must be 1..{K_MAX} with --fec {FEC_RS16}"),
        (args.fec != FEC_RS or args.repair_symbols == 0, f"--repair-symbols applies to --fec {FEC_RS16} only"),
        (0 <= args.repair_symbols <= R_MAX, f"--repair-symbols must be 1..{R_MAX}"),
        (256 <= args.symbol_size <= 8900, "--symbol-size must be 256..8900"),
        (args.fec != FEC_RS16 or args.symbol_size % 2 == 0, f"--symbol-size must be even with --fec {FEC_RS16}"),
        (args.deployment is None or bool(_NAME_RE.match(args.deployment)),
         "--deployment: use 1-128 of A-Z a-z 0-9 . _ : @ -"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return False
    return True


def _default_deployment(path: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path))[:100].strip("._")
    return name or "standalone"


def _announced_host(control_host: str, interface: str) -> str:
    """What the announce says the control host is; "" = the packet's source address.

    Empty when the control port listens on every address or on the one the packets come from,
    and for link-local IPv6 (the receiver knows the scope from the packet, not from a string).
    """
    bare = control_host.partition("%")[0]
    if bare in ("", "0.0.0.0", "::") or bare == interface.partition("%")[0]:
        return ""
    try:
        if ipaddress.ip_address(bare).is_link_local:
            return ""
    except ValueError:
        pass  # a host name: receivers resolve it
    return bare[:64]


@contextmanager
def _graceful(runner: SessionRunner, flag: list[str]) -> Iterator[None]:
    """SIGINT/SIGTERM end the session cleanly (receivers are told it finished) instead of killing it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        flag.append(signal.Signals(signum).name)
        runner.abort(f"the sender was interrupted ({signal.Signals(signum).name})")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _linger(host: SessionHost, stop: list[str]) -> None:
    """Keep the control port open until it has been quiet a while (bounded), re-acknowledging
    results whose Ack was lost: the finished session still answers them, and a receiver that got
    no Ack would otherwise end with "not acknowledged" although it has the file."""
    end = time.monotonic() + LINGER_MAX_S
    seen, quiet_since = host.datagrams, time.monotonic()
    while not stop and (now := time.monotonic()) < end and now - quiet_since < LINGER_QUIET_S:
        time.sleep(0.05)
        if host.datagrams != seen:
            seen, quiet_since = host.datagrams, time.monotonic()


def _setup_logging(quiet: bool) -> None:
    """The session's own log lines (joins, start, results) as the command's event lines."""
    log = logging.getLogger("mcdeploy.dp")
    if quiet or any(getattr(h, "_mcdeploy_send", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mcdeploy send: %(message)s"))
    handler._mcdeploy_send = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def run_send(args: argparse.Namespace) -> int:
    """``mcdeploy send``: serve one session of ``args.file``; the exit status of the summary."""
    prog = "mcdeploy send"
    try:
        shared_key = load_shared_key(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.symbol_size is None:
        args.symbol_size = 1392 if shared_key else 1400
    if args.block_symbols is None:
        args.block_symbols = default_k(args.fec, args.symbol_size)
    _check_send(args)
    path = os.path.abspath(args.file)
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
    except OSError as exc:
        raise ConfigError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    deployment = args.deployment or _default_deployment(path)
    tty = sys.stderr.isatty() and not args.quiet
    if tty and size > 256 * 1024 * 1024:
        print(f"{prog}: computing the SHA-256 of {args.file} ...", file=sys.stderr)
    try:
        sha256 = file_sha256(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    control_host = args.control_host or (args.interface if _is_ip(args.interface) else "::")
    host = SessionHost(DP_NAME, control_host, args.control_port).start()
    relay = LocalRelay()
    try:
        session_id = secrets.randbelow(2**63 - 1) + 1
        announce = codec.encode(Announce(session_id=session_id, deployment=deployment,
                                         control_host=_announced_host(control_host, args.interface),
                                         control_port=host.address[1], image_size=size))
        job = SessionJob(deployment=deployment, session_id=session_id, dp=DP_NAME,
                         image=ImageRef(name=deployment, path=path, size=size, sha256=sha256),
                         group=args.group, port=args.port, expected_clients=args.min_receivers,
                         max_rate_mbps=args.rate)
        # model_construct: the standalone sender takes nothing from MCDEPLOY_DP_* or a site file.
        settings = DPSettings.model_construct(
            name=DP_NAME, control_host=control_host, control_port=host.address[1],
            mcast_interface=args.interface, mcast_interface6=args.interface, mcast_ttl=args.ttl, encrypt=False,
            max_rate_mbps=args.rate,
            symbol_size=args.symbol_size, block_symbols=args.block_symbols, fec=args.fec,
            repair_symbols=args.repair_symbols)
        runner = StandaloneRunner(
            job, settings, host.reply, relay, start_clients=args.min_receivers, start_delay=args.start_delay,
            start_at=args.start_at, join_window=0.0 if args.exit_when_done else JOIN_WINDOW_S,
            announce=announce, key=seal.session_key(shared_key, session_id) if shared_key else None,
            progress=_progress_printer(prog, size) if tty else None)
    except BaseException:
        host.stop()
        raise
    _setup_logging(args.quiet)
    if not args.quiet:
        if not shared_key:
            print(f"{prog}: NOTE: packets are not encrypted or authenticated (CRC-32 only); give --key-file "
                  "to seal them", file=sys.stderr)
        print(f"{prog}: {args.file}: {size} bytes, sha256 {sha256[:16]}…; group "
              f"{format_hostport(args.group, args.port)} via {args.interface} ttl {args.ttl}, "
              f"control {format_hostport(host.address[0], host.address[1])}; {_start_text(args)}",
              file=sys.stderr)
    interrupted: list[str] = []
    try:
        host.register(runner)
        with _graceful(runner, interrupted):
            runner.run()
            host.unregister(runner)
            if runner.sender.clients:
                _linger(host, interrupted)
    finally:
        host.stop()
    if tty:
        print(file=sys.stderr)
    summary = _summary(runner, relay, size, sha256)
    code = EXIT_INTERRUPTED if interrupted else (
        EXIT_OK if summary["receivers"] and summary["done"] == summary["receivers"] else EXIT_RECEIVER_FAILED)
    summary["exit_code"] = code
    figures = (f"{size} bytes in {summary['seconds']:.2f} s ({summary['mb_per_s']:.1f} MB/s), "
               f"{summary['bytes_sent']} bytes sent ({summary['wire_mb_per_s']:.1f} MB/s on the wire)"
               if runner.sender.started_at is not None else "the transfer never started")
    print(f"{prog}: {summary['receivers']} receiver(s): {summary['done']} done, {summary['failed']} failed; "
          f"{figures}" + (f"; {summary['finish_reason']}" if code else ""), file=sys.stderr)
    for c in summary["clients"]:
        if c["outcome"] != "done":
            print(f"{prog}:   {c['client_id']} ({c['address']}) failed: {c['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary), flush=True)
    return code


def _start_text(args: argparse.Namespace) -> str:
    conds = []
    if args.min_receivers:
        conds.append(f"{args.min_receivers} receiver(s) joined")
    if args.start_delay is not None:
        conds.append(f"{args.start_delay:g} s passed")
    if args.start_at is not None:
        conds.append(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(args.start_at)))
    return "starting when " + (" or ".join(conds) if conds else "the first receiver joined")


def _progress_printer(prog: str, size: int) -> Callable[[dict[str, Any]], None]:
    def progress(stats: dict[str, Any]) -> None:
        print(f"\r{prog}: {stats.get('session_state', '')} {stats.get('percent', 0):5.1f} % of the first pass, "
              f"{stats.get('clients_done', 0)}/{stats.get('clients_joined', 0)} receivers done, "
              f"{stats.get('rate_mbps', 0):.0f} Mbit/s   ", end="", file=sys.stderr)

    return progress


def _summary(runner: SessionRunner, relay: LocalRelay, size: int, sha256: str) -> dict[str, Any]:
    """The figures of the finished session, from the sender and the relayed results."""
    sender = runner.sender
    stats = sender.stats()
    started, finished = sender.started_at, sender.finished_at or time.monotonic()
    seconds = max(0.0, finished - started) if started is not None else 0.0
    clients = []
    for cid, rec in sender.clients.items():
        res = relay.results.get(cid)
        addr = rec.addr if isinstance(rec.addr, tuple) else None
        address = format_hostport(host_of(addr), addr[1]) if addr else rec.address
        clients.append({"client_id": cid, "address": address, "outcome": rec.state,
                        "reason": rec.reason, "seconds": round(res.seconds if res else rec.seconds, 3)})
    bytes_sent = int(stats["bytes_sent"])
    return {
        "deployment": runner.deployment, "session_id": runner.session_id, "image_bytes": size, "sha256": sha256,
        "receivers": int(stats["clients_joined"]), "done": int(stats["clients_done"]),
        "failed": int(stats["clients_failed"]), "bytes_sent": bytes_sent, "seconds": round(seconds, 3),
        "mb_per_s": round(size / seconds / 1e6, 2) if seconds else 0.0,
        "wire_mb_per_s": round(bytes_sent / seconds / 1e6, 2) if seconds else 0.0,
        "repair_symbols": int(stats["repair_symbols"]), "source_symbols": int(stats["source_symbols"]),
        "fec": sender.layout.fec, "block_symbols": sender.layout.k, "repair_ids": sender.layout.repair_ids,
        "finish_reason": sender.finish_reason, "clients": clients,
    }


# --------------------------------------------------------------------------- receive


def _stable_receiver_id(out: str) -> str:
    """mac-<MAC>-<6 hex of the output's absolute path>: distinct per output on one machine, the same
    after a restart (so the sender sees the same receiver resume, not a new one)."""
    import hashlib

    where = out if out == "-" else os.path.abspath(out)
    return f"{default_client_id()}-{hashlib.sha256(where.encode()).hexdigest()[:6]}"


def run_receive(args: argparse.Namespace) -> int:
    """``mcdeploy receive``: the client agent's receive, finding the sender by announce unless --from."""
    prog = "mcdeploy receive"
    problem = check_common(args) or check_output(args)
    shared_key = None
    if problem is None:
        try:
            shared_key = load_shared_key(args)
        except ValueError as exc:
            problem = str(exc)
    dp = None
    if problem is None and args.source:
        try:
            dp = parse_hostport(args.source, DEFAULT_CONTROL_PORT)
        except ValueError as exc:
            problem = f"--from: {exc}"
    if problem is None and not is_multicast(args.group):
        problem = f"--group {args.group} is not a multicast group address"
    if problem is None and not 1 <= args.port <= 65535:
        problem = "--port must be 1..65535"
    if problem is None and args.client_id is not None and not _NAME_RE.match(args.client_id):
        problem = "--id: use 1-128 of A-Z a-z 0-9 . _ : @ -"
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    interface = args.interface
    if interface is None and dp is None:
        interface = DEFAULT_INTERFACE
    opts = ClientOptions(
        dp=dp, out=args.out, client_id=args.client_id or _stable_receiver_id(args.out),
        wait_s=args.wait, idle_timeout_s=args.idle_timeout, test_loss=args.test_loss / 100.0,
        test_impair=args.test_impair, seed=args.test_seed,
        discover=None if dp else (args.group, args.port), interface=interface, agent="mcdeploy-receive/0.1",
        shared_key=shared_key, **output_options(args))
    return run(opts, prog, json_out=args.json, quiet=args.quiet)
